"""Batch scoring speed and memory: fer_ray.predict against a plain PyTorch DataLoader loop.

    python bench/bench_scoring.py                                   # FER2013 val and train
    python bench/bench_scoring.py --model runs/r50/best --data ../shared/datasets/fer2013
    python bench/bench_scoring.py --skip-memory                     # speed on val only
    python bench/bench_scoring.py --use-gpu --model runs/r50/best    # both sides on the GPU

Speed: one run each over DATA/val (and, with the memory run, DATA/train) with the same
model, preprocessing (decode_image, the eval transform, DeviceNormalize) and batch size,
timed from listing the folder to the predictions' Parquet on disk, with the Ray cluster
already started and every file read once beforehand (both sides read from the page
cache, whichever runs first). Ray workers run at niceness 0 here like the plain loop (Ray's default
is 15), so other work on a shared machine does not tilt the comparison.
The plain loop is what one writes without Ray, run as a script of its own and timed from
its start (its imports included, as fer_ray's scoring actors import theirs): a DataLoader with 2 worker processes
decoding, the model in eval mode (inference_mode; in the precision and memory format the
same probe as fer_ray's scorer picks on this CPU for the same --amp, fp32 or bf16 autocast,
channels_last or not, timed on the model as saved: fer_ray's scorer times its BatchNorm-folded
copy, so the two may pick differently, which each side's printed format shows) in the main process,
pandas to Parquet at the end.

Memory and CPU: during every run a thread samples, once a second, the proportional set
size (PSS, from /proc/PID/smaps_rollup) of this process and all its descendants (the Ray
GCS, raylet, dashboard, workers and actors, DataLoader workers; shared memory such as the
object store is counted once, split among the processes mapping it), and the CPU time of
each of them (processes that end between samples lose at most a second of it). A sweep
costs ~0.1 s of CPU, a few percent of this 2-core machine, carried by both sides; the
plain loop's tree includes the idle Ray cluster too. `memory_growth` is fer_ray's peak PSS
above the idle cluster on DATA/train (28,709 images) over the same on DATA/val (3,589
images): 1.0 means memory does not grow with the size of the folder (the ratio of the
totals, idle cluster included, is printed beside it). jobs/predict.py's default (`--num-actors auto`)
scores the train folder with more actors than val (one per 10,000 images, up to the cores),
and each actor holds its own torch and model; so with the default, fer_ray also scores the
train folder with val's number of actors, and memory_growth compares those two runs (same
configuration, 8x the images), run back to back before the plain loop (which ran in this
process, fer_ray's driver, before it became a script of its own). The speed rows use the
default.

Bytes: Ray Data's per-operator output sizes from fer_ray's val run (jobs/predict.py logs
`Dataset.stats()` at DEBUG level): the bytes per image each stage puts in the object store,
against the encoded files' mean size.

The last line is `scoring_vs_plain=X memory_growth=Y` (X > 1: fer_ray is faster).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.common import MiB, Sampler, operator_outputs, read_all, split_folders, tree_memory  # noqa: E402
from fer_ray.constants import FER_CLASSES, IMAGE_EXTENSIONS  # noqa: E402
from fer_ray.model import (  # noqa: E402
    ModelSpec,
    create_model,
    data_config,
    fastest_inference_format,
    format_name,
    load_model_dir,
    resolve_amp,
    save_model_dir,
)
from fer_ray.normalize import DeviceNormalize  # noqa: E402
from fer_ray.transforms import create_transform, decode_image  # noqa: E402


# --------------------------------------------------------------------------------------
# The plain PyTorch loop
# --------------------------------------------------------------------------------------


class FolderImages(torch.utils.data.Dataset):
    """Images under a folder of class folders, decoded and resized as fer_ray does."""

    def __init__(self, root: str, class_names: list[str], size: int, channels: int) -> None:
        self.items = []
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root).split(os.sep)
            label = class_names.index(rel[0]) if rel[0] in class_names else -1
            self.items += [
                (os.path.join(dirpath, f), label) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        self.items.sort()
        self.size, self.channels = size, channels
        self.transform = create_transform(False, size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with open(path, "rb") as f:
            image = decode_image(f.read(), self.channels)
        image = self.transform(image=image)["image"].reshape(self.size, self.size, self.channels)
        return torch.from_numpy(image), label, path


def plain_loop(
    model_dir: str, source: str, output: str, batch_size: int, workers: int, amp: str, use_gpu: bool = False,
) -> int:
    model, spec = load_model_dir(model_dir)
    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu:  # as fer_ray's scorer runs on a GPU
        torch.backends.cudnn.benchmark = True
        amp_dtype, channels_last = resolve_amp(amp, device), True
        print(f"plain loop: {format_name(amp_dtype, channels_last)} on {torch.cuda.get_device_name()}")
    else:
        (amp_dtype, channels_last), timed = fastest_inference_format(model, spec.in_chans, spec.image_size, amp)
        print(f"plain loop: {timed}")  # as fer_ray's scorer picks it
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt).eval()
    normalize = DeviceNormalize.for_model(spec).to(device)  # as fer_ray's scorer prepares images
    data = FolderImages(source, spec.class_names, spec.data_size, spec.channels)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, pin_memory=use_gpu)
    paths, labels, probs = [], [], []
    with torch.inference_mode():
        for images, label, path in loader:
            x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probs.append(model(x).float().softmax(1).cpu().numpy())
            labels.append(label.numpy())
            paths += list(path)
    p = np.concatenate(probs)
    df = pd.DataFrame({"path": paths, "label": np.concatenate(labels), "pred": p.argmax(1),
                       "confidence": p.max(1)})
    for i, name in enumerate(spec.class_names):
        df[f"prob_{name}"] = p[:, i]
    os.makedirs(output, exist_ok=True)
    df.to_parquet(os.path.join(output, "predictions.parquet"), index=False)
    return len(df)


# --------------------------------------------------------------------------------------
# Bytes through the object store
# --------------------------------------------------------------------------------------


class StatsLog(logging.Handler):
    """Keeps the Ray Data stats text that fer_ray.predict logs at DEBUG level, while in use."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text = ""
        self.logger = logging.getLogger("fer_ray.predict")

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Ray Data stats:"):
            self.text = record.getMessage()

    def __enter__(self) -> "StatsLog":
        self.saved = self.logger.level, self.logger.propagate
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False  # the job's own INFO lines stay out of the report
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def store_bytes(stats: str, folder: str, paths: list[str]) -> list[str]:
    """Lines: bytes per image each stage of jobs/predict.py's pipeline put in the object store
    when it scored `folder` (its logged `stats`), against the encoded size of its files
    (`paths`)."""
    encoded = sum(os.path.getsize(p) for p in paths) / len(paths)
    lines = [f"bytes per image through the object store, scoring {len(paths)} images of {folder} "
             f"(encoded files: {encoded:.0f} B per image):"]
    for name, rows, nbytes in operator_outputs(stats):
        lines.append(f"  {name}: {nbytes / len(paths):.0f} B per image ({rows} rows out)")
    return lines


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def fresh_model(folder: str) -> str:
    """A randomly initialised resnet18 for 48 px grayscale faces (no pretrained weights)."""
    torch.manual_seed(0)
    model = create_model("resnet18", len(FER_CLASSES))
    cfg = data_config(model)
    spec = ModelSpec(model="resnet18", class_names=list(FER_CLASSES), image_size=48, data_size=48,
                     channels=1, mean=list(cfg["mean"]), std=list(cfg["std"]))
    save_model_dir(model, folder, spec, pretrained=False)
    return folder


def print_report(
    rows: list, speed: dict, memory: dict, idle_pss: int, idle_rss: int, load_before: str,
    notes: list[str] = (),
) -> None:
    """The table, memory above idle, start-up vs steady rate, `notes`, and the summary line.
    `speed` maps (who, split) to (images, seconds); `memory` maps a split to fer_ray's
    sampler for the memory comparison."""
    print(f"\n{'run':<50}{'folder':<8}{'images':>8}{'seconds':>9}{'images/s':>10}"
          f"{'CPU s':>8}{'peak PSS MiB':>14}{'peak RSS MiB':>14}")
    for name, split, n, seconds, m in rows:
        print(f"{name:<50}{split:<8}{n:>8}{seconds:>9.1f}{n / seconds:>10.0f}{m.cpu_seconds:>8.1f}"
              f"{m.peak_pss / MiB:>14.0f}{m.peak_rss / MiB:>14.0f}")
    print(f"idle Ray cluster + this process: PSS {idle_pss / MiB:.0f} MiB, RSS {idle_rss / MiB:.0f} MiB; "
          f"load average before/after: {load_before} / {os.getloadavg()[0]:.1f}")

    ratio = (speed[("fer_ray.predict", "val")][0] / speed[("fer_ray.predict", "val")][1]) / (
        speed[("plain", "val")][0] / speed[("plain", "val")][1])
    # The job's own memory: peak PSS above the idle cluster (the idle part does not depend
    # on the folder); the ratio of the totals is printed beside it.
    growth, total_growth = float("nan"), float("nan")
    if "train" in memory:
        growth = (memory["train"].peak_pss - idle_pss) / (memory["val"].peak_pss - idle_pss)
        total_growth = memory["train"].peak_pss / memory["val"].peak_pss
    above = ", ".join(f"{name} {split} {(m.peak_pss - idle_pss) / MiB:.0f} MiB"
                      for name, split, _, _, m in rows)
    print(f"peak PSS above idle: {above}")
    print(f"fer_ray's peak PSS, train folder / val folder (same actors): {growth:.2f} above the idle cluster, "
          f"{total_growth:.2f} with it")
    if "train, default actors" in memory:  # jobs/predict.py as run, more actors on the larger folder
        default = memory["train, default actors"].peak_pss
        print(f"  with jobs/predict.py's default actors on the train folder: "
              f"{(default - idle_pss) / (memory['val'].peak_pss - idle_pss):.2f} above the idle cluster, "
              f"{default / memory['val'].peak_pss:.2f} with it (each actor holds its own torch and model)")
    if "train" in memory:
        # Images per extra second from val to train: the rate once start-up is paid (fer_ray's
        # train run: the default actors, more than val's where the folder is larger).
        for who in ("fer_ray.predict", "plain"):
            (n0, s0), (n1, s1) = speed[(who, "val")], speed[(who, "train")]
            how = " (each folder with the default actors)" if who == "fer_ray.predict" else ""
            print(f"{who}: {(n1 - n0) / max(s1 - s0, 1e-9):.0f} images/s beyond start-up "
                  f"({s0 - n0 * (s1 - s0) / (n1 - n0):.1f} s of start-up){how}")
    for line in notes:
        print(line)
    print(f"scoring_vs_plain={ratio:.2f} memory_growth={growth:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "fer2013"),
                        help="folder with train/ and val/ of class folders (train/ is scored by the memory run)")
    parser.add_argument("--model", default=None, help="model folder (default: a fresh resnet18)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="fer_ray's scoring actors (default: jobs/predict.py's default)")
    parser.add_argument("--amp", default="auto", choices=("auto", "off", "bf16"),
                        help="jobs/predict.py's --amp for fer_ray; the plain loop takes the same choice")
    parser.add_argument("--use-gpu", action="store_true",
                        help="both sides score on the GPU (fer_ray: one GPU per actor, as jobs/predict.py --use-gpu)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the train-folder memory run")
    parser.add_argument("--plain-loop", nargs=3, metavar=("MODEL", "FOLDER", "OUT"),
                        help="run only the plain loop, in this process (the benchmark runs it so, as a script of its own)")
    args = parser.parse_args(argv)
    if args.plain_loop:
        n = plain_loop(*args.plain_loop, args.batch_size, args.workers, args.amp, args.use_gpu)
        print(f"scored={n}")
        return 0

    folders = split_folders(args.data)
    if folders is None:
        return 0
    train, val = folders
    logging.basicConfig(level=logging.WARNING)
    from fer_ray.cli import init_ray
    from fer_ray.predict import predict

    tmp = tempfile.mkdtemp(prefix="bench_scoring_")
    try:
        model_dir = args.model or fresh_model(os.path.join(tmp, "model"))
        _, spec = load_model_dir(model_dir)
        print(f"model {spec.model} ({model_dir}), {spec.data_size}->{spec.image_size} px, "
              f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, batch {args.batch_size}, "
              f"--amp {args.amp}{', GPU' if args.use_gpu else ''}")
        # Ray runs its workers at niceness 15 so the driver stays responsive; on a machine
        # shared with other work that alone would decide this race, so both sides run at 0.
        os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of its own: all of it in the samples
        os.environ.setdefault("RAY_worker_niceness", "0")
        init_ray()
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        rows, speed, memory = [], {}, {}  # the table; what the ratios compare
        ray_stats = {}  # (split, run name): Ray Data's stats text of that fer_ray run

        def plain_run(split: str, folder: str) -> None:
            # A script of its own, as one writes it without Ray: timed from its start, so it
            # pays its imports (torch, timm, ...) as fer_ray's scoring actors pay theirs.
            # (It ran in this process before, where they were already imported, ~3 s on val.)
            cmd = [sys.executable, __file__, "--plain-loop", model_dir, folder, os.path.join(tmp, f"plain_{split}"),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--amp", args.amp,
                   *(["--use-gpu"] if args.use_gpu else [])]
            with Sampler() as sampler:
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                seconds = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"the plain loop failed:\n{proc.stderr[-3000:]}")
            *said, last = proc.stdout.strip().splitlines()
            print("\n".join(said))
            n = int(last.removeprefix("scored="))
            rows.append(("plain DataLoader loop (a script)", split, n, seconds, sampler))
            speed[("plain", split)] = (n, seconds)

        def fer_ray_run(
            split: str, folder: str, actors: int | None = args.num_actors, name: str = "",
            for_speed: bool = True, for_memory: bool = True,
        ) -> int:
            with Sampler() as sampler, StatsLog() as stats:
                start = time.perf_counter()
                summary = predict(model_dir, folder, os.path.join(tmp, f"fer_ray_{split}{name}"),
                                  batch_size=args.batch_size, num_actors=actors, amp=args.amp,
                                  use_gpu=args.use_gpu)
                seconds = time.perf_counter() - start
            ray_stats[(split, name)] = stats.text
            label = f"fer_ray.predict ({summary['num_actors']} actor{'s' if summary['num_actors'] > 1 else ''})"
            rows.append((label + name, split, summary["scored"], seconds, sampler))
            if for_speed:
                speed[("fer_ray.predict", split)] = (summary["scored"], seconds)
            if for_memory:
                memory[split] = sampler
            else:
                memory[f"{split}, default actors"] = sampler
            return summary["num_actors"]

        from fer_ray.predict import list_images

        # Every file the runs will read, listed once; read once here so that both sides
        # read from memory (the first run would otherwise pay the disk).
        folders = [val] + ([train] if not args.skip_memory and os.path.isdir(train) else [])
        paths = {folder: list_images(folder, spec.class_names).column("path").to_pylist() for folder in folders}
        for folder in folders:
            read_all(paths[folder])
        idle_pss, idle_rss = tree_memory()
        load_before = f"{os.getloadavg()[0]:.1f}"
        val_actors = fer_ray_run("val", val)
        memory_run = not args.skip_memory and os.path.isdir(train)
        pair = False
        if memory_run:
            # fer_ray's memory pair back to back, before anything else runs: the plain loop
            # runs in this process, and what its heap keeps would count in fer_ray's train
            # peak (this process is the driver of both); later runs also find processes of
            # earlier ones still winding down in the tree.
            from fer_ray.predict import auto_actors

            pair = args.num_actors is None and auto_actors(len(paths[train]), args.use_gpu)[1] != val_actors
            fer_ray_run("train", train, val_actors, ", same actors as val" if pair else "", for_speed=not pair)
        elif not args.skip_memory:
            print(f"memory run skipped: {train} does not exist")
        plain_run("val", val)
        if memory_run:
            if pair:
                fer_ray_run("train", train, for_memory=False)
            plain_run("train", train)

        notes = store_bytes(ray_stats[("val", "")], val, paths[val])
        ray.shutdown()  # (nothing of Ray's may print after the summary line)
        print_report(rows, speed, memory, idle_pss, idle_rss, load_before, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
