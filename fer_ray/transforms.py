"""Decoding and augmentation (CPU, in Ray Data) and the on-device resize and normalise.

Ray Data tasks decode and augment at `data_size` (48 px for FER2013) and hand the
workers uint8 images; the resize to the model's input size and the normalisation run
on the worker's device, so the object store never carries float32 at 224x224.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fer_ray.constants import IMAGE_COL, LABEL_COL

# cv2 would start its own thread pool in every Ray worker; Ray already runs one task per CPU.
cv2.setNumThreads(1)


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Encoded bytes -> uint8 HxWxC (C=1 grayscale or 3 RGB), the way training sees images.

    cv2 is fast for JPEG/PNG/BMP/WebP and converts 16-bit and alpha images to 8-bit
    gray or RGB; Pillow covers what it cannot read (GIF: first frame). Raises ValueError.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imdecode(buf, flag) if buf.size else None
    if img is None:
        img = _decode_with_pillow(data, channels)
    elif channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img)


def _decode_with_pillow(data: bytes, channels: int) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            return np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except Exception as e:  # noqa: BLE001 - every decoder failure is "cannot decode"
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from None


def create_transform(is_training: bool, size: int, augment: str = "medium") -> A.Compose:
    """Albumentations pipeline to `size` x `size`; the eval one is deterministic."""
    ops: list[A.BasicTransform] = [A.Resize(size, size, interpolation=cv2.INTER_AREA)]
    if is_training and augment != "none":
        strength = {"light": 0.5, "medium": 1.0, "strong": 1.5}[augment]
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
                translate_percent=(-0.08 * strength, 0.08 * strength),
                rotate=(-10 * strength, 10 * strength),
                border_mode=cv2.BORDER_REFLECT_101,
                p=min(1.0, 0.7 * strength),
            ),
            A.RandomBrightnessContrast(
                brightness_limit=0.2 * strength, contrast_limit=0.2 * strength, p=0.5
            ),
            A.CoarseDropout(
                num_holes_range=(1, max(1, round(2 * strength))),
                hole_height_range=(0.1, 0.25),
                hole_width_range=(0.1, 0.25),
                fill=0,
                p=min(1.0, 0.35 * strength),
            ),
        ]
    return A.Compose(ops)


@lru_cache(maxsize=8)
def _cached_transform(is_training: bool, size: int, augment: str) -> A.Compose:
    return create_transform(is_training, size, augment)


def transform_batch(
    batch: dict[str, np.ndarray], size: int, channels: int, is_training: bool, augment: str
) -> dict[str, np.ndarray]:
    """Ray Data UDF: encoded images -> uint8 [B, size, size, C] plus labels."""
    transform = _cached_transform(is_training, size, augment)
    blobs = batch[IMAGE_COL]
    out = np.empty((len(blobs), size, size, channels), dtype=np.uint8)
    for i, data in enumerate(blobs):
        image = transform(image=decode_image(data, channels))["image"]
        out[i] = image.reshape(size, size, channels)
    return {IMAGE_COL: out, LABEL_COL: batch[LABEL_COL].astype(np.int64)}


def match_channels(values: Sequence[float], in_chans: int) -> list[float]:
    """Per-channel statistics for a model's input channels: a gray-input model (in_chans=1)
    takes the average of the RGB mean/std."""
    values = list(values)
    if in_chans == 1 and len(values) == 3:
        return [sum(values) / 3]
    return values


class DeviceNormalize(torch.nn.Module):
    """uint8 [B, H, W, C] on the device -> normalised float [B, 3, S, S] for the model."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_chans = in_chans
        self.channels_last = channels_last
        mean, std = match_channels(mean, in_chans), match_channels(std, in_chans)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            # Resize before expanding gray to RGB: a third of the work.
            down = x.shape[-1] > self.image_size
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=down,
            )
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        x = x * self.scale + self.shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
