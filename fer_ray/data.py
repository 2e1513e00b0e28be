"""Ray Datasets over prepared shards, and what the manifest says about them."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fer_ray import storage
from fer_ray.constants import IMAGE_COL, LABEL_COL, TRAIN, VAL
from fer_ray.transforms import transform_batch

MAP_BATCH_SIZE = 256


def class_weights(counts: Sequence[int]) -> list[float]:
    """Inverse class frequency, normalised to mean 1 over the classes present (absent: 0)."""
    c = np.asarray(counts, dtype=np.float64)
    inv = np.where(c > 0, 1.0 / np.maximum(c, 1), 0.0)
    present = c > 0
    return (inv / inv[present].mean()).tolist()


def train_counts(manifest: dict[str, Any]) -> list[int]:
    per_class = manifest["splits"][TRAIN]["per_class"]
    return [int(per_class[c]) for c in manifest["classes"]]


def resolve_data_size(image_size: int, manifest: dict[str, Any], override: int | None) -> int:
    """Decode size in Ray Data: no larger than the model input or than the images themselves."""
    if override:
        return override
    return max(8, min(image_size, int(manifest["image"]["median_side"]) or image_size))


def split_dataset(
    shards: str,
    split: str,
    size: int,
    channels: int,
    is_training: bool,
    augment: str = "medium",
):
    """A streaming Dataset of uint8 [size, size, channels] images and int64 labels.

    Training data is shuffled globally on the small encoded bytes, before decoding; the
    dataset re-executes every epoch, so every epoch gets a fresh shuffle and fresh
    augmentations.
    """
    import ray

    ds = ray.data.read_parquet(storage.join(storage.normalize(shards), split), columns=[IMAGE_COL, LABEL_COL])
    if is_training:
        ds = ds.random_shuffle()
    ds = ds.map_batches(
        transform_batch,
        fn_kwargs={"size": size, "channels": channels, "is_training": is_training, "augment": augment},
        batch_size=MAP_BATCH_SIZE,
        batch_format="numpy",
    )
    # The per-epoch progress line replaces Ray Data's bars, which re-run every epoch.
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


def train_val_datasets(shards: str, size: int, channels: int, augment: str) -> dict[str, Any]:
    return {
        TRAIN: split_dataset(shards, TRAIN, size, channels, True, augment),
        VAL: split_dataset(shards, VAL, size, channels, False),
    }
