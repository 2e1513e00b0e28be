"""Matching the sharpness of evaluation images to the training images.

A training set can be blurrier than the images a model will score: a different camera,
heavier compression, or a copy that was smoothed (the FER2013 copy in this workplace has
every training image blurred by a Gaussian of about 3 px, while PublicTest is sharp). A
model trained on blurred faces and shown sharp ones sees a shift it never learnt: on
FER2013 val accuracy fell from 46% to 32% for the same weights.

The cure that needs nothing but the data: measure how much blur turns typical val images
into images as sharp as typical training images, and apply that blur to every image the
model evaluates or scores (val during training, `jobs/predict.py` later). The sigma is
part of the model folder's description, so scoring applies it without being told.

Sharpness is the median over images of the variance of the Laplacian (a standard focus
measure), measured at the size images are decoded at.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Train images this many times less sharp than val (median focus measure) count as
# blurred; natural splits of one dataset differ by far less (FER2013 as released: ~1.1x).
BLUR_RATIO = 0.5
SIGMA_STEP = 0.05
MAX_SIGMA = 8.0

# The measurements (sharpness, match_sharpness, estimate_blur) run in numpy: scoring's
# driver measures a sample of its input and imports no torch (~1.3 s of its start-up);
# only gaussian_blur on a tensor (validation and the scoring actors, on their device) does.


def gaussian_kernel(sigma: float, max_radius: int) -> np.ndarray:
    """A normalised 1-D Gaussian (float32) reaching 4 sigma each side, at most `max_radius`."""
    radius = min(max(1, math.ceil(4 * sigma)), max_radius)
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(np.float32(-0.5) * (t / np.float32(sigma)) ** 2)
    return k / k.sum()


def gaussian_blur(x, sigma: float):
    """Blur float images [B, C, H, W] channel by channel (reflected borders); sigma in px. A
    torch tensor is blurred on its device in its dtype, a numpy array in float32.

    Each pass is a product with a small [n, n] matrix that holds the kernel and the
    reflection: 10-20x faster on a CPU than a convolution of one channel."""
    if sigma <= 0:
        return x
    if isinstance(x, np.ndarray):
        rows, cols_t = _blur_matrices_np(float(sigma), x.shape[-2], x.shape[-1])
        return rows @ x.astype(np.float32, copy=False) @ cols_t
    rows, cols_t = _blur_matrices(float(sigma), x.shape[-2], x.shape[-1], x.device, x.dtype)
    return rows @ x @ cols_t


@lru_cache(maxsize=16)
def _blur_matrices_np(sigma: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The row matrix and the transposed column matrix (float32), made once per size."""
    # Reflect padding needs a border thinner than the image: tiny inputs get a shorter kernel.
    k = gaussian_kernel(sigma, min(height, width) - 1)
    return _blur_matrix(k, height), np.ascontiguousarray(_blur_matrix(k, width).T)


@lru_cache(maxsize=16)
def _blur_matrices(
    sigma: float, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same matrices on a device, made once per size and device: a copy from the CPU to
    a GPU per batch would wait for the GPU's queued work each time. Plain tensors (not
    inference tensors), whatever mode the first caller runs in."""
    import torch

    rows, cols_t = _blur_matrices_np(sigma, height, width)
    with torch.inference_mode(False), torch.no_grad():
        return (torch.from_numpy(rows.copy()).to(device=device, dtype=dtype),
                torch.from_numpy(cols_t.copy()).to(device=device, dtype=dtype))


def _blur_matrix(k: np.ndarray, n: int) -> np.ndarray:
    """M [n, n] with (M @ v)[i] = sum_j k[j] v[reflect(i + j - r)] (reflect without repeating
    the edge, OpenCV's BORDER_REFLECT_101, torch's 'reflect'); radius r <= n - 1."""
    r = (len(k) - 1) // 2
    src = np.arange(n).reshape(-1, 1) + np.arange(-r, r + 1).reshape(1, -1)
    src = np.where(src < 0, -src, src)
    src = np.where(src > n - 1, 2 * (n - 1) - src, src)
    m = np.zeros((n, n), dtype=np.float32)
    np.add.at(m, (np.arange(n).reshape(-1, 1).repeat(len(k), 1), src), np.broadcast_to(k, src.shape))
    return m


def sharpness(images) -> np.ndarray:
    """Per-image focus measure of float images [B, C, H, W] in 0..255 (numpy, or a CPU
    tensor): variance (unbiased) of the Laplacian (4-neighbour, reflected borders) of the
    channel mean."""
    gray = np.asarray(images, dtype=np.float32).mean(1, keepdims=True, dtype=np.float32)
    p = np.pad(gray, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * gray
    return lap.reshape(len(lap), -1).var(1, ddof=1, dtype=np.float32)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W]."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32)


def median_sharpness(images) -> float:
    """The median of `sharpness`, the lower of the middle two for an even count (as
    torch.median, which measured the training sets recorded before)."""
    v = sharpness(images)
    return float(np.partition(v, (len(v) - 1) // 2)[(len(v) - 1) // 2])


def estimate_blur(train: np.ndarray, val: np.ndarray) -> tuple[float, dict[str, float]]:
    """The Gaussian sigma (px) that makes `val` images as sharp as `train` ones, or 0 when
    train is not clearly blurrier; uint8 [B, H, W, C] samples of each split. Also returns
    the measurements, for the log and the run's config."""
    target = median_sharpness(to_float(train))
    sigma, val_sharpness = match_sharpness(target, val)
    return sigma, {"train_sharpness": round(target, 3), "val_sharpness": round(val_sharpness, 3)}


def match_sharpness(target: float, images: np.ndarray) -> tuple[float, float]:
    """The Gaussian sigma (px) that brings the median sharpness of `images` (uint8
    [B, H, W, C]) down to `target`, 0 unless they are clearly sharper (BLUR_RATIO); and
    their median sharpness. Training uses it for val, scoring for the images it scores."""
    x = to_float(images)
    measured = median_sharpness(x)
    if not target < BLUR_RATIO * measured:
        return 0.0, measured

    def blurred(sigma: float) -> float:
        # Rounded to 8 bits as the training images were: the rounding noise alone is a
        # Laplacian variance of about 1.7, a quarter of FER2013's blurred train images' 6.2.
        return median_sharpness(np.round(gaussian_blur(x, sigma)))

    # Sharpness falls monotonically with sigma: bisect on the median.
    lo, hi = 0.0, MAX_SIGMA
    if blurred(hi) > target:
        return hi, measured
    while hi - lo > SIGMA_STEP:
        mid = (lo + hi) / 2
        if blurred(mid) > target:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 2), measured


def same_sigma(a: float, b: float) -> bool:
    """Whether two blurs resolved for one run or sweep are the same: within a bisection step,
    as `auto` measures again on a resume, and a last-digit difference of floating point
    between machines or versions may move it one step."""
    return abs(a - b) <= SIGMA_STEP


def describe(sigma: float, found: dict[str, float], source: str) -> str:
    t, v = found.get("train_sharpness"), found.get("val_sharpness")
    measured = f" (sharpness train {t:.3g} vs val {v:.3g})" if t is not None else ""
    if sigma > 0 and t is None:  # given, not measured
        return (f"Val and scored images get a Gaussian blur of sigma {sigma:g} px ({source}; "
                "--input-blur auto measures the blur that matches them to the train images).")
    if sigma > 0:
        return (
            f"Train images are blurrier than val{measured}: val and scored images get a "
            f"Gaussian blur of sigma {sigma:g} px to match ({source}; --input-blur off to disable)."
        )
    return f"No input blur{measured} ({source})."

