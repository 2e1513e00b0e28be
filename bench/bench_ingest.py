"""Training ingest speed: fer_ray's Ray Data pipeline against a torch DataLoader and the ceiling.

    python bench/bench_ingest.py                          # FER2013 train (28,709 images)
    python bench/bench_ingest.py --data ../shared/datasets/fer2013 --epochs 2 --batch-size 64

Three ways to deliver augmented uint8 batches (decode, the Albumentations train transform,
batching) to a training loop that does nothing else, over the FER2013 train images:

- fer_ray: the Parquet shards through `fer_ray.data.split_dataset` (decoded once per run into
  the object store, then each epoch a global shuffle and the augmentation in Ray Data tasks)
  to a 1-worker TorchTrainer iterating `get_dataset_shard("train").iter_torch_batches()`,
  exactly the training path; Ray's start-up and the one-off decode are left out (the decode
  is printed on its own), each epoch's own pipeline start-up is in;
- a torch DataLoader with 2 worker processes over the image folder, same transform, the
  decode in every epoch (as a plain script does it), for as many epochs, the first (its
  workers' start) left out as fer_ray's is;
- the ceiling: the same decode and transform in a tight single-process loop, times the cores.

So the two ratios compare fer_ray's epochs, which decode nothing, with loops that decode in
every epoch: decoding is about 15% of an image's CPU time here (README, Performance). A
line below them gives fer_ray's rate with the decode and its warm-up epoch counted.

The fer_ray pipeline runs on a local Ray started as `jobs/train.py` starts one (with the
dashboard, whose State API Ray Train needs).
Every image file is read once before anything is timed, so all three read from the page
cache (the fer_ray side reads shards this script has just written).

It also reports the bytes per image that cross the object store (into the shuffle: the
decoded uint8 images where the split is kept decoded, as FER2013's is (fer_ray.data), else
the encoded ones; uint8 images out of the transform) against the encoded source size. The last line
is `ingest_vs_dataloader=X ingest_vs_ceiling=Y`.
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

import torch  # noqa: E402

from bench.common import DEFAULT_FER, machine, operator_outputs, read_all, split_folders  # noqa: E402
from fer_ray.constants import FER_CLASSES, IMAGE_COL, IMAGE_EXTENSIONS, LABEL_COL  # noqa: E402
from fer_ray.transforms import create_transform, decode_image  # noqa: E402

SIZE, CHANNELS, AUGMENT = 48, 1, "medium"


def folder_items(root: str) -> list[tuple[str, int]]:
    """(path, label) of the images in `root`'s FER class folders, their names in any case (as
    jobs/prepare.py reads them); a class without a folder has no images. The benchmarks are
    FER2013's: folders of other names are left out (prepare would train on them too)."""
    folders = {name.lower(): name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))}
    items = []
    for label, name in enumerate(FER_CLASSES):
        if name not in folders:
            continue
        d = os.path.join(root, folders[name])
        items += [(os.path.join(d, f), label) for f in sorted(os.listdir(d)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return items


class AugmentedFolder(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, int]]) -> None:
        self.items = items
        self.transform = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if self.transform is None:  # built in the worker process
            self.transform = create_transform(True, SIZE, AUGMENT)
        path, label = self.items[i]
        with open(path, "rb") as f:
            image = decode_image(f.read(), CHANNELS)
        image = self.transform(image=image)["image"].reshape(SIZE, SIZE, CHANNELS)
        return torch.from_numpy(image), label


def dataloader_rates(items, batch_size: int, workers: int, epochs: int) -> list[float]:
    """Images/s of each epoch of a DataLoader over the folder (its workers start anew each
    epoch, as a DataLoader's do by default)."""
    loader = torch.utils.data.DataLoader(
        AugmentedFolder(items), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=True, persistent_workers=False,
    )
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            n += len(images)
        rates.append(n / (time.perf_counter() - start))
    return rates


def ceiling_rate(items, count: int) -> float:
    """Decode + transform in one process (files read into memory first), images/s; over a
    sample of every class (the listing is sorted by class: its first 4,000 were all angry)."""
    import random

    blobs = []
    for path, _ in random.Random(0).sample(list(items), min(count, len(items))):
        with open(path, "rb") as f:
            blobs.append(f.read())
    transform = create_transform(True, SIZE, AUGMENT)
    transform(image=decode_image(blobs[0], CHANNELS))  # warm up
    start = time.perf_counter()
    for data in blobs:
        transform(image=decode_image(data, CHANNELS))
    return len(blobs) / (time.perf_counter() - start)


def ingest_loop(config: dict) -> None:
    """Per-worker loop that only consumes batches; one JSON line per epoch to config["log"]."""
    import json

    import ray.train

    shard = ray.train.get_dataset_shard("train")
    for _ in range(config["epochs"]):
        start, n, nbytes = time.perf_counter(), 0, 0
        for batch in shard.iter_torch_batches(
            batch_size=config["batch_size"], drop_last=True,
            dtypes={IMAGE_COL: torch.uint8, LABEL_COL: torch.int64}, prefetch_batches=2,  # as training
        ):
            n += len(batch[LABEL_COL])
            nbytes += batch[IMAGE_COL].nbytes + batch[LABEL_COL].nbytes
        seconds = time.perf_counter() - start
        with open(config["log"], "a") as f:
            # Ray Data's stats of the epoch: what each operator put in the object store.
            f.write(json.dumps({"images": n, "seconds": seconds, "bytes_per_image": nbytes / max(n, 1),
                                "stats": shard.stats()}) + "\n")
        ray.train.report({"images": n, "seconds": seconds})


def ray_rates(shards: str, batch_size: int, epochs: int, storage_path: str) -> tuple[list[dict], float]:
    """Each epoch's figures, and the seconds split_dataset took to read and decode the split
    into the object store (once per run, before the trainer starts: not in any epoch)."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    from fer_ray.data import split_dataset

    log = os.path.join(storage_path, "epochs.jsonl")  # the worker runs on this machine
    os.makedirs(storage_path, exist_ok=True)
    began = time.perf_counter()
    train = split_dataset(shards, "train", SIZE, CHANNELS, True, AUGMENT)
    decode_seconds = time.perf_counter() - began
    trainer = TorchTrainer(
        ingest_loop,
        train_loop_config={"epochs": epochs, "batch_size": batch_size, "log": log},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="ingest", storage_path=storage_path),
        datasets={"train": train},
    )
    trainer.fit()
    with open(log) as f:
        return [json.loads(line) for line in f], decode_seconds


def encoded_bytes_per_image(shards: str) -> float:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(os.path.join(shards, "train"), format="parquet").to_table(columns=[IMAGE_COL])
    return pc.sum(pc.binary_length(table[IMAGE_COL])).as_py() / table.num_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_FER), help="folder with train/ and val/ of class folders")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of each side; the first is warm-up, the mean of the others is compared")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--ceiling-images", type=int, default=4000)
    args = parser.parse_args(argv)

    folders = split_folders(args.data)
    if folders is None:
        return 0
    train = folders[0]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of its own: all of it in the samples
    os.environ.setdefault("RAY_worker_niceness", "0")  # as the DataLoader's processes
    from fer_ray.cli import init_ray
    from fer_ray.prepare import prepare

    tmp = tempfile.mkdtemp(prefix="bench_ingest_")
    try:
        items = folder_items(train)
        read_all(path for path, _ in items)  # every side reads the files from memory
        print(f"{machine()}; {len(items)} images, batch {args.batch_size}, {SIZE}px, augment {AUGMENT}")
        ceiling_one = ceiling_rate(items, args.ceiling_images)
        ceiling = ceiling_one * (os.cpu_count() or 1)
        loader_rates = dataloader_rates(items, args.batch_size, args.workers, args.epochs)
        loader = sum(loader_rates[1:] or loader_rates) / len(loader_rates[1:] or loader_rates)

        import ray

        shards = os.path.join(tmp, "shards")
        init_ray(dashboard=True)  # as jobs/train.py starts it
        ray.data.DataContext.get_current().enable_progress_bars = False
        prepare(args.data, shards)
        history, decode_seconds = ray_rates(shards, args.batch_size, args.epochs, os.path.join(tmp, "runs"))
        ray.shutdown()
        rates = [h["images"] / h["seconds"] for h in history]
        steady = rates[1:] or rates
        best = sum(steady) / len(steady)
        encoded = encoded_bytes_per_image(shards)
        delivered = history[-1]["bytes_per_image"]

        print(f"\n{'pipeline':<44}{'images/s':>10}")
        print(f"{'ceiling: 1 process x ' + str(os.cpu_count()) + ' cores':<44}{ceiling:>10.0f}"
              f"   (one process: {ceiling_one:.0f})")
        print(f"{'torch DataLoader, ' + str(args.workers) + ' workers, epochs 2..' + str(len(loader_rates)):<44}"
              f"{loader:>10.0f}   (each epoch: {', '.join(f'{r:.0f}' for r in loader_rates)})")
        for i, r in enumerate(rates, 1):
            note = "   (warm-up: the worker and the pipeline start)" if i == 1 else ""
            print(f"{'fer_ray Ray Data -> TorchTrainer, epoch ' + str(i):<44}{r:>10.0f}{note}")
        print(f"{'fer_ray, mean of epochs 2..' + str(len(rates)):<44}{best:>10.0f}")
        print(f"(fer_ray reads and decodes the split into the object store once per run, before its first "
              f"epoch: {decode_seconds:.1f} s, {len(items) / decode_seconds:.0f} images/s, in none of the rates "
              f"above; the DataLoader and the ceiling decode in every epoch)")
        spread = len(items) * len(rates) / (decode_seconds + sum(h["seconds"] for h in history))
        print(f"(with that decode and the warm-up epoch counted: {spread:.0f} images/s over the "
              f"{len(rates)} epochs, {spread / loader:.2f}x the DataLoader's epochs 2..{len(loader_rates)})")
        print(f"\nbytes per image through the object store in the last epoch (Ray Data's stats), against "
              f"{encoded:.0f} B of encoded image in the shards:")
        for name, rows, nbytes in operator_outputs(history[-1].get("stats", "")):
            print(f"  {name}: {nbytes / max(rows, 1):.0f} B per image ({rows} rows out)")
        print(f"  delivered to the loop: {delivered:.0f} B per image ({SIZE}x{SIZE}x{CHANNELS} uint8 + label)")
        print(f"ingest_vs_dataloader={best / loader:.2f} ingest_vs_ceiling={best / ceiling:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
