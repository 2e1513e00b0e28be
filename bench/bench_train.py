"""Training overhead: fer_ray's loop in a 1-worker TorchTrainer against a plain PyTorch loop.

    python bench/bench_train.py                      # resnet18, 48 px, FER2013 train, 2 epochs
    python bench/bench_train.py --model resnet18 --epochs 2 --batch-size 64

Both sides train the same timm model from scratch with the same batch size, AdamW, the
class-weighted, label-smoothed loss, the same Albumentations train transform and the same
on-device normalisation, with as many torch threads as cores:

- plain: the images decoded once and held in memory, a DataLoader (2 worker processes)
  applying the transform, the model in the main process;
- fer_ray: `jobs/train.py`'s path (`fer_ray.trainer.train`): the train split read from its
  Parquet shards and decoded once into the object store (as it is for FER2013), each epoch
  shuffled and augmented by Ray Data, one Ray Train worker holding all cores, a checkpoint
  per epoch.

fer_ray's side runs on a local Ray started as `jobs/train.py` starts one (with the dashboard,
whose State API Ray Train needs).

Compared: the last whole epoch, after Ray has started: the training pass, a validation
pass over val and a checkpoint (fer_ray's between two checkpoint folders appearing; the
plain loop validates over val decoded and resized once beforehand, and saves its model and
optimizer with torch.save); each side's training pass alone is printed beside it (fer_ray's
history gives it as images / images_per_s); Ray's start-up and the
first epoch's warm-up are reported separately. fer_ray runs first (`--amp auto` times the
formats in its worker); the plain loop then trains in the precision and memory format
fer_ray's history says it chose, so both run the same kernels. A CPU
table follows: the cores each kind of process had in the last epoch on each side (fer_ray:
between its last two checkpoints, validation included; the plain loop: its last training
pass, so the two windows are not the same work) (the process training the model, the data workers, Ray's other processes by name, the rest of
the machine and the hypervisor's steal), sampled from /proc every second, which tells
Ray's share of the machine from a VM that merely ran slower. The last line is
`train_overhead=X` (fer_ray epoch time / plain epoch time; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.bench_ingest import folder_items  # noqa: E402
from bench.common import DEFAULT_FER, CpuTimeline, machine, split_folders  # noqa: E402
from fer_ray.data import class_weights  # noqa: E402
from fer_ray.model import create_model, data_config, fastest_format, format_name, time_cpu_formats  # noqa: E402
from fer_ray.normalize import DeviceNormalize  # noqa: E402
from fer_ray.transforms import create_transform, decode_image  # noqa: E402

SIZE, CHANNELS, AUGMENT, LR, WD, SMOOTHING = 48, 1, "medium", 1e-3, 0.05, 0.1


class InMemory(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels, self.transform = images, labels, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.transform is None:
            self.transform = create_transform(True, SIZE, AUGMENT)
        image = self.transform(image=self.images[i])["image"].reshape(SIZE, SIZE, CHANNELS)
        return torch.from_numpy(image), int(self.labels[i])


def parse_format(name: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, channels_last) from a name format_name gives (history's `format`)."""
    dtype, _, layout = name.partition("+")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype], layout == "channels_last"


def plain_epochs(
    items, model_name: str, batch_size: int, epochs: int, workers: int, fmt: str | None = None,
    val_items=(), checkpoint: str | None = None,
) -> tuple[list[float], list[tuple[float, float]], list[float]]:
    """Seconds per training pass of a plain PyTorch loop over in-memory images, each
    training pass's start and end (time.time()), and each whole epoch's seconds: the
    training pass, then, as fer_ray's epoch does, a validation pass over `val_items`
    (decoded and resized once, beforehand, as the training images) and a checkpoint of the
    model and optimizer to `checkpoint`. `fmt`: the format to train in (format_name's
    name); None: the fastest by fer_ray's measurement."""
    images = np.stack([decode_image(open(p, "rb").read(), CHANNELS) for p, _ in items])
    labels = np.array([label for _, label in items])
    resize = create_transform(False, SIZE)
    val_images = torch.from_numpy(np.stack([
        resize(image=decode_image(open(p, "rb").read(), CHANNELS))["image"].reshape(SIZE, SIZE, CHANNELS)
        for p, _ in val_items])) if val_items else None
    val_labels = torch.tensor([label for _, label in val_items])
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = create_model(model_name, 7)
    # The precision and memory format fer_ray's worker trained in, so that both sides run the
    # same kernels (or, alone, what its --amp auto would pick by the same measurement).
    if fmt:
        amp_dtype, channels_last = parse_format(fmt)
    else:
        amp_dtype, channels_last = fastest_format(time_cpu_formats(model, batch_size, 3, SIZE))
    print(f"plain loop: {format_name(amp_dtype, channels_last)}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = data_config(model)
    normalize = DeviceNormalize(SIZE, cfg["mean"], cfg["std"], channels_last=channels_last)
    weight = torch.tensor(class_weights(np.bincount(labels, minlength=7).tolist()), dtype=torch.float32)
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=SMOOTHING)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    loader = torch.utils.data.DataLoader(
        InMemory(images, labels), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=True,
    )
    times, bounds, whole = [], [], []
    for _ in range(epochs):
        model.train()
        wall, start = time.time(), time.perf_counter()
        for x, y in loader:
            with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(normalize(x))
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
        bounds.append((wall, time.time()))
        if val_images is not None:
            model.eval()
            right = 0
            with torch.inference_mode(), torch.autocast("cpu", dtype=amp_dtype or torch.float32,
                                                        enabled=amp_dtype is not None):
                for i in range(0, len(val_images), batch_size):
                    logits = model(normalize(val_images[i:i + batch_size]))
                    right += int((logits.argmax(1) == val_labels[i:i + batch_size]).sum())
        if checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
        whole.append(time.perf_counter() - start)
    return times, bounds, whole


def fer_ray_history(data: str, out: str, model_name: str, batch_size: int, epochs: int) -> pd.DataFrame:
    import argparse as ap

    from fer_ray.config import TrainConfig, parse_config
    from fer_ray.trainer import check_inputs, train

    cfg, _ = parse_config(TrainConfig, [
        "--data", data, "--output", out, "--model", model_name, "--no-pretrained",
        "--image-size", str(SIZE), "--batch-size", str(batch_size), "--epochs", str(epochs),
        "--lr", str(LR), "--weight-decay", str(WD), "--label-smoothing", str(SMOOTHING),
        "--augment", AUGMENT, "--warmup-epochs", "0", "--cpus-per-worker", str(os.cpu_count() or 1),
    ], ap.ArgumentParser())
    train(cfg, check_inputs(cfg))
    return pd.read_csv(os.path.join(out, "history.csv"))


# The kinds of process in the CPU table, in its order.
MODEL, LOADER, RAY_DATA, RAY_OTHER, DRIVER, REST, STEAL = (
    "model process", "DataLoader workers", "Ray Data tasks, idle workers", "Ray's other processes",
    "driver (this script, sampling included)", "rest of the machine", "steal (hypervisor)")

# Ray's helper actors and agents: control, not data.
RAY_HELPERS = ("TrainController", "PlacementGroupCleaner", "SplitCoordinator", "_StatsActor",
               "_AutoscalingCoordinatorActor", "PreemptionWatcher", "DatasetManager",
               "SynchronizationActor", "DashboardAgent", "RuntimeEnvAgent")


def short_name(name: str) -> str:
    """A process's name for the table: the Ray task or actor, else its script or program."""
    tokens = name.split()
    if not tokens:
        return "?"
    if tokens[0].startswith("ray::") or tokens[0].startswith("ray-dashboard-"):
        return tokens[0]
    return next((os.path.basename(t) for t in tokens if t.endswith(".py")), os.path.basename(tokens[0]))


def cpu_shares(timeline: CpuTimeline, t0: float, t1: float, kind) -> tuple[float, dict[str, float], dict[str, float]]:
    """(seconds, cores per kind, cores per process name within "Ray's other processes")
    over a window; kind(pid, names) names each process's share. What the tree did not
    use of the machine's busy time is "rest of the machine"; "steal" is what the
    hypervisor took."""
    seconds, per, busy, steal = timeline.window(t0, t1)
    kinds: dict[str, float] = {}
    ray_other: dict[str, float] = {}
    for pid, (names, cpu) in per.items():
        k = kind(pid, names)
        kinds[k] = kinds.get(k, 0.0) + cpu
        if k == RAY_OTHER:
            n = short_name(sorted(names)[0])
            ray_other[n] = ray_other.get(n, 0.0) + cpu
    kinds[REST] = max(0.0, busy - sum(cpu for _, cpu in per.values()))
    kinds[STEAL] = steal
    s = max(seconds, 1e-9)
    return seconds, {k: v / s for k, v in kinds.items()}, {k: v / s for k, v in ray_other.items()}


def checkpoint_folders(run: str) -> list[str]:
    """The checkpoint folders a training run has written so far (none yet: [])."""
    try:
        return os.listdir(os.path.join(run, "ray_train"))
    except OSError:
        return []


def plain_kind(main_pid: int):
    return lambda pid, names: MODEL if pid == main_pid else LOADER


def fer_ray_kind(driver_pid: int):
    def kind(pid: int, names: set[str]) -> str:
        if pid == driver_pid:
            return DRIVER
        if any("RayTrainWorker" in n for n in names):
            return MODEL
        if any(h in n for n in names for h in RAY_HELPERS):
            return RAY_OTHER
        if all(n.startswith("ray::") for n in names):
            return RAY_DATA
        return RAY_OTHER
    return kind


def print_cpu(plain: tuple, fer_ray: tuple | None) -> None:
    """The CPU table: cores each kind of process used in the last epoch, both sides."""
    cores = os.cpu_count() or 1
    (ps, pk, _), (fs, fk, fo) = plain, fer_ray if fer_ray else (0.0, {}, {})
    side = (f"fer_ray: {fs:.0f} s of training, validation and checkpoint, between two checkpoints"
            if fer_ray else "fer_ray: not measured, fewer than two checkpoints seen")
    print(f"\nCPU in the last epoch, in cores of {cores} (plain: {ps:.0f} s of training; {side})")
    print(f"{'process':<42}{'plain':>8}{'fer_ray':>9}")
    for k in (MODEL, LOADER, RAY_DATA, RAY_OTHER, DRIVER, REST, STEAL):
        if k in pk or k in fk:
            p = f"{pk[k]:.2f}" if k in pk else ""
            f = f"{fk[k]:.2f}" if k in fk else ""
            print(f"{k:<42}{p:>8}{f:>9}")
    if fo:
        top = sorted(fo.items(), key=lambda kv: -kv[1])
        print("Ray's other processes, cores: " + ", ".join(f"{n} {c:.3f}" for n, c in top))
    if fk.get(MODEL):
        print(f"the plain loop's model process had {pk[MODEL] / fk[MODEL]:.2f}x "
              f"the cores of fer_ray's Train worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_FER), help="folder with train/ and val/ class folders")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    args = parser.parse_args(argv)

    folders = split_folders(args.data)
    if folders is None:
        return 0
    train_dir, val_dir = folders
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of its own: all of it in the samples
    os.environ.setdefault("RAY_worker_niceness", "0")
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    try:
        items, val_items = folder_items(train_dir), folder_items(val_dir)
        print(f"{machine()}; {args.model} from scratch, {SIZE}px, batch {args.batch_size}, "
              f"{len(items)} images, {args.epochs} epochs")
        from fer_ray.cli import init_ray
        from fer_ray.prepare import prepare
        import ray

        shards = os.path.join(tmp, "shards")
        start = time.perf_counter()
        init_ray(min_cpus=(os.cpu_count() or 1) + 2, dashboard=True)  # as jobs/train.py starts it
        startup = time.perf_counter() - start
        ray.data.DataContext.get_current().enable_progress_bars = False
        prepare(args.data, shards)
        start = time.perf_counter()
        run = os.path.join(tmp, "run")
        # An epoch ends when its checkpoint folder appears: the last epoch lies between two.
        with CpuTimeline(marks=lambda: checkpoint_folders(run)) as timeline:
            history = fer_ray_history(shards, run, args.model, args.batch_size, args.epochs)
        total = time.perf_counter() - start
        ends = sorted(t for name, t in timeline.marks.items() if name.startswith("epoch_"))
        fer_ray_cpu = (cpu_shares(timeline, ends[-2], ends[-1], fer_ray_kind(os.getpid()))
                       if len(ends) >= 2 else None)
        ray.shutdown()
        train_s = history["steps"] * args.batch_size / history["images_per_s"]
        val_s = history["seconds"] - train_s
        print(f"fer_ray trained in {history['format'].iloc[-1]}")

        with CpuTimeline() as timeline:
            plain, bounds, plain_whole = plain_epochs(
                items, args.model, args.batch_size, args.epochs, args.workers, fmt=history["format"].iloc[-1],
                val_items=val_items,
                checkpoint=os.path.join(tmp, "plain_checkpoint.pt"))
        plain_cpu = cpu_shares(timeline, *bounds[-1], plain_kind(os.getpid()))

        # A whole epoch: between two checkpoint folders appearing (train, val, report, checkpoint).
        whole = [ends[i] - ends[i - 1] if 0 < i < len(ends) else float("nan") for i in range(args.epochs)]
        print(f"\n{'epoch':<7}{'plain train s':>15}{'plain whole s':>15}{'fer_ray train s':>17}"
              f"{'fer_ray val s':>22}{'fer_ray whole s':>17}{'train ratio':>13}{'whole ratio':>13}")
        for i in range(args.epochs):
            print(f"{i + 1:<7}{plain[i]:>15.1f}{plain_whole[i]:>15.1f}{train_s[i]:>17.1f}{val_s[i]:>22.1f}"
                  f"{whole[i]:>17.1f}{train_s[i] / plain[i]:>13.2f}{whole[i] / plain_whole[i]:>13.2f}")
        print("(whole epoch: the training pass, validation on val and a checkpoint, on both sides; "
              "fer_ray's between two checkpoint folders appearing, so known from the second epoch)")
        print(f"Ray start-up {startup:.1f} s; fer_ray job {total:.1f} s for {args.epochs} epochs "
              f"(TorchTrainer start, per-epoch val and checkpoints, reports)")
        print_cpu(plain_cpu, fer_ray_cpu)
        print(f"train_overhead={whole[-1] / plain_whole[-1]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
