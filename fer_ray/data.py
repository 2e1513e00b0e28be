"""Ray Datasets over prepared shards, and what the manifest says about them."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyarrow.fs as pafs

from fer_ray import storage
from fer_ray.constants import IMAGE_COL, LABEL_COL, TRAIN, VAL
from fer_ray.transforms import decode_batch, transform_batch

MAP_BATCH_SIZE = 256
# Training images leave the transform in blocks of a few MB at most (train_block_bytes), so
# they stream to the loop as they are made: with Ray's default (128 MiB) a task's whole
# output is one block, and every epoch began with the loop idle until the first tasks had
# decoded a quarter of the split each (`data_wait_s` in the history shows what is left).
MIN_BLOCK_BYTES = 1 << 20
# Splits up to this share of the object store are kept there between epochs.
CACHE_FRACTION = 0.2
# A cached training split is kept decoded when its pixels are at most this share: besides
# the decoded copy, every epoch's shuffle holds two more copies of it for a while, and a
# sweep's concurrent trials each keep their own (FER2013's train split at 48 px: 66 MB).
DECODED_FRACTION = 0.05
# Ray's shuffle warns, in every epoch, about each input block larger than this many times
# the dataset's block target (ray.data.context.MAX_SAFE_BLOCK_SIZE_FACTOR, 1.5), with some
# room for blocks that the class resampling makes larger.
SHUFFLE_BLOCK_FACTOR = 1.2


def train_block_bytes(size: int, channels: int, shuffle_block_bytes: int = 0) -> int:
    """The block target of training data: one map batch of uint8 images and int64 labels,
    at least MIN_BLOCK_BYTES, and large enough that the shuffle's input blocks
    (`shuffle_block_bytes` at most) draw no warning."""
    return max(MIN_BLOCK_BYTES, MAP_BATCH_SIZE * (size * size * channels + 8),
               math.ceil(shuffle_block_bytes / SHUFFLE_BLOCK_FACTOR))


def class_weights(counts: Sequence[int]) -> list[float]:
    """Inverse class frequency, normalised to mean 1 over the classes present (absent: 0)."""
    c = np.asarray(counts, dtype=np.float64)
    inv = np.where(c > 0, 1.0 / np.maximum(c, 1), 0.0)
    present = c > 0
    return (inv / inv[present].mean()).tolist()


SAMPLER_POWERS = {"none": 0.0, "sqrt": 0.5, "balanced": 1.0}


def sampling_rates(counts: Sequence[int], sampler: str) -> list[float]:
    """--sampler: the mean number of times each class's training images are drawn per
    epoch, proportional to count ** -power and scaled so the epoch keeps its size."""
    c = np.asarray(counts, dtype=np.float64)
    w = np.where(c > 0, np.maximum(c, 1) ** -SAMPLER_POWERS[sampler], 0.0)
    return (w * c.sum() / max((w * c).sum(), 1e-12)).tolist()


def resample_batch(batch: dict[str, np.ndarray], rates: Sequence[float]) -> dict[str, np.ndarray]:
    """A weighted sampler for streamed data: each row is repeated a random number of times
    whose mean is its class's rate (the whole part, plus one with the fraction's
    probability), freshly drawn every epoch."""
    rate = np.asarray(rates, dtype=np.float64)[batch[LABEL_COL]]
    whole = np.floor(rate)
    copies = whole.astype(np.int64) + (np.random.default_rng().random(len(rate)) < rate - whole)
    rows = np.repeat(np.arange(len(rate)), copies)
    return {k: v[rows] for k, v in batch.items()}


def train_counts(manifest: dict[str, Any]) -> list[int]:
    per_class = manifest["splits"][TRAIN]["per_class"]
    return [int(per_class[c]) for c in manifest["classes"]]


def resolve_data_size(image_size: int, manifest: dict[str, Any], override: int | None) -> int:
    """Decode size in Ray Data: no larger than the model input or than the images themselves."""
    if override:
        return override
    return max(8, min(image_size, int(manifest["image"]["median_side"]) or image_size))


def encoded_bytes(folder: str) -> int:
    """Size of a split's Parquet files (the encoded images)."""
    fs, inner = storage.resolve(folder)
    return sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)))


def sample_images(shards: str, split: str, size: int, channels: int, rows: int = 1024) -> np.ndarray:
    """Up to `rows` images of a split, decoded as eval sees them: uint8 [N, size, size, C].
    Reads the first rows of the shards (prepare writes an image folder's rows in a random
    order, a CSV's in the file's own)."""
    import pyarrow.dataset as pads

    fs, inner = storage.resolve(storage.join(storage.normalize(shards), split))
    table = pads.dataset(inner, filesystem=fs, format="parquet").head(rows, columns=[IMAGE_COL, LABEL_COL])
    batch = {IMAGE_COL: np.array(table.column(IMAGE_COL).to_pylist(), dtype=object),
             LABEL_COL: np.asarray(table.column(LABEL_COL))}
    return transform_batch(batch, size, channels, is_training=False, augment="none")[IMAGE_COL]


def read_shards(paths: str | list[str]) -> Any:
    """`ray.data.read_parquet` through Ray Data's V1 Parquet reader.

    Ray 2.60 reads Parquet with its V2 datasource by default, which starts 32 footer-reader
    actors (a process each) for every read and kills them after it: on a 2-core machine
    2-6 s for FER2013's train or val shards and for a 280-image split alike, with the actor
    processes starting beside whatever else runs. The V1 reader lists the files and reads
    the schema in the driver and samples a few files in plain tasks: 0.4-1.1 s for train,
    0.2 s for val (bench/PERFORMANCE.md). Same rows. The switch is set only for this
    call, and so is silencing the V1 reader's progress bar for sampling a few files.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, False
    try:
        return ray.data.read_parquet(paths)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = before


def fits_in_object_store(nbytes: int, fraction: float = CACHE_FRACTION) -> bool:
    """Whether `nbytes` are at most `fraction` of the cluster's object store."""
    import ray

    return nbytes <= fraction * ray.cluster_resources().get("object_store_memory", 0)


def split_dataset(
    shards: str,
    split: str,
    size: int,
    channels: int,
    is_training: bool,
    augment: str = "medium",
    rates: Sequence[float] | None = None,
    erasing: float | None = None,
    blur_jitter: float = 0.0,
):
    """A Dataset of uint8 [size, size, channels] images and int64 labels.

    The dataset re-executes every epoch: training data gets a fresh global shuffle (into
    one block per CPU so the augmentation runs in parallel) and fresh augmentations each
    time. A split that fits easily in the object store (FER2013's 24 MB) is read once and
    kept there, which saves each epoch the Parquet planning (1-2 s), and kept decoded at
    `size` when that fits too (FER2013's train split at 48 px: 66 MB), so that epochs run
    only the augmentation's random steps; eval data, the same every epoch, is kept as it
    leaves the eval transform. Larger splits stream from Parquet every epoch and are
    shuffled as encoded bytes. `rates` (sampling_rates) resample the training rows by class
    before the shuffle.
    """
    folder = storage.join(storage.normalize(shards), split)
    cache = fits_in_object_store(encoded_bytes(folder))
    ds = read_shards(folder).select_columns([IMAGE_COL, LABEL_COL])
    _quiet(ds)
    # Training data is shuffled into one block per CPU, so that every CPU decodes.
    blocks = shuffle_parallelism() if is_training else 0
    shuffle_block = 0
    if cache:
        ds = ds.materialize()
        if is_training and fits_in_object_store(ds.count() * (size * size * channels + 8), DECODED_FRACTION):
            # Decoded once: the train transform's first step (the resize to `size`) is
            # deterministic, so epochs need only its random steps (bit for bit the same
            # images; the decode was ~15% of an image's CPU time at 48 px). The shuffle
            # then moves 2.3 kB of pixels per FER2013 image instead of 0.8 kB of JPEG.
            ds = ds.map_batches(
                decode_batch, fn_kwargs={"size": size, "channels": channels},
                batch_size=MAP_BATCH_SIZE, batch_format="numpy",
            ).materialize()
        if is_training:
            # Kept as one block per CPU (and 1 MiB at least): the shuffle's output has as
            # many blocks as its input, so an epoch needs one all-to-all exchange of N x N
            # pieces, not 22 x 22 pieces of 1 MB and a repartition after them (FER2013's
            # train split, 22 MB, reads as 24 blocks of ~1 MB on 4 logical CPUs).
            # Measured with the decoded blocks below: 6,367-6,633 against 5,229-5,937
            # images/s into the loop on 2 cores (bench/PERFORMANCE.md).
            ds = cut_blocks(ds, shuffle_blocks(ds.size_bytes(), blocks))
            shuffle_block = largest_block(ds)
    if is_training and rates is not None:
        ds = ds.map_batches(resample_batch, fn_kwargs={"rates": list(rates)}, batch_format="numpy")
    if is_training:
        # A global row shuffle; a streamed split arrives in blocks of any number and size.
        ds = ds.random_shuffle()
        if not cache:
            ds = ds.repartition(num_blocks=blocks)
        # This dataset's own. For FER2013 on 4 CPUs, 4.8 MB (2,060 images at 48 px): fewer
        # objects per epoch than at 1 MB, and the first reaches the loop in about a second.
        ds.context.target_max_block_size = train_block_bytes(size, channels, shuffle_block)
    ds = ds.map_batches(
        transform_batch,
        fn_kwargs={"size": size, "channels": channels, "is_training": is_training, "augment": augment,
                   "erasing": erasing, "blur_jitter": blur_jitter},
        batch_size=MAP_BATCH_SIZE,
        batch_format="numpy",
    )
    _quiet(ds)
    if cache and not is_training:
        ds = ds.materialize()
    return ds


def shuffle_parallelism() -> int:
    """The CPUs the training data's augmentation may run on, 2 at least: those up now or,
    where more, those an autoscaler may bring up (its node types' max_workers). Counted
    on the nodes up when the dataset was built, a cold cluster.yaml cluster (a head of no
    CPUs, the GPU workers' 4 each) cut the data into 2-4 blocks for the whole run, however
    many CPU workers Ray Data then brought up."""
    import ray

    from fer_ray.cli import autoscaler_limits

    most = (autoscaler_limits() or {}).get("CPU", 0)
    return max(2, int(ray.cluster_resources().get("CPU", 0)), int(most))


def shuffle_blocks(nbytes: int, cpus: int) -> int:
    """Blocks to cut a cached training split of `nbytes` into: one per CPU, 2 at least, and
    none below MIN_BLOCK_BYTES unless there would be fewer than 2."""
    return min(max(2, cpus), max(2, math.ceil(nbytes / max(1, MIN_BLOCK_BYTES))))


def cut_blocks(ds: Any, blocks: int) -> Any:
    """A materialized dataset again, in `blocks` blocks of about equal size."""
    return ds.repartition(num_blocks=blocks).materialize()


def largest_block(ds: Any) -> int:
    """Bytes of a materialized dataset's largest block."""
    return max((m.size_bytes or 0 for b in ds.iter_internal_ref_bundles() for m in b.metadata), default=0)


def _quiet(ds: Any) -> None:
    # The per-epoch progress line replaces Ray Data's bars, which would re-run every epoch.
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False


def train_val_datasets(
    shards: str, size: int, channels: int, augment: str, rates: Sequence[float] | None = None,
    erasing: float | None = None, blur_jitter: float = 0.0,
) -> dict[str, Any]:
    return {
        TRAIN: split_dataset(shards, TRAIN, size, channels, True, augment, rates, erasing, blur_jitter),
        VAL: split_dataset(shards, VAL, size, channels, False),
    }
