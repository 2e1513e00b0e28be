"""The on-device half of preprocessing: resize and normalise uint8 batches on the
worker's device (GPU or CPU), after Ray Data has decoded them at their small size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from fer_ray.blur import gaussian_blur
from fer_ray.config import per_image_norm

if TYPE_CHECKING:
    from fer_ray.model import ModelSpec


def match_channels(values: Sequence[float], in_chans: int) -> list[float]:
    """Per-channel statistics for a model's input channels: a gray-input model (in_chans=1)
    takes the average of the RGB mean/std."""
    values = list(values)
    if in_chans == 1 and len(values) == 3:
        return [sum(values) / 3]
    return values


class DeviceNormalize(torch.nn.Module):
    """uint8 [B, H, W, C] on the device -> normalised float [B, in_chans, S, S] for the model.

    `blur_sigma` (the model's `input_blur`, see fer_ray.blur) blurs images at the size
    they arrive in before the resize: applied to what the model evaluates or scores, not to
    its training batches (`match_blur=False`).

    `per_image` (the model's `input_norm: image`) takes each image to zero mean and unit
    standard deviation instead of the dataset's mean/std: brightness and contrast go."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
        channels_last: bool = False,
        blur_sigma: float = 0.0,
        per_image: bool = False,
    ) -> None:
        super().__init__()
        self.per_image = bool(per_image)
        self.image_size = image_size
        self.in_chans = in_chans
        self.channels_last = channels_last
        self.blur_sigma = float(blur_sigma)
        mean, std = match_channels(mean, in_chans), match_channels(std, in_chans)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    @classmethod
    def for_model(
        cls, spec: "ModelSpec", blur_sigma: float | None = None, channels_last: bool = False
    ) -> "DeviceNormalize":
        """As a model folder describes its input: size, statistics, stem channels and the
        blur it recorded (`blur_sigma` overrides it)."""
        return cls(
            spec.image_size, spec.mean, spec.std, in_chans=spec.in_chans, channels_last=channels_last,
            blur_sigma=spec.input_blur if blur_sigma is None else blur_sigma,
            per_image=per_image_norm(spec.input_norm),
        )

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Each image to zero mean and unit std over all its pixels (input_norm: image); a
        flat image (std < 1 grey level) is only centred."""
        std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True)
        return (x - mean) / std.clamp_min(1.0)

    def forward(self, images: torch.Tensor, match_blur: bool = True, standardize: bool = True) -> torch.Tensor:
        """`standardize=False` leaves per-image standardisation to the caller (ten-crop takes
        its crops first: a crop of a standardised image is not standardised)."""
        x = images.permute(0, 3, 1, 2).float()
        if match_blur and self.blur_sigma > 0:
            x = gaussian_blur(x, self.blur_sigma)
        if x.shape[-2:] != (self.image_size, self.image_size):
            # Resize before expanding gray to RGB: a third of the work.
            down = x.shape[-1] > self.image_size
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=down,
            )
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if self.per_image:
            if standardize:
                x = self.standardize(x)
        else:
            x = x * self.scale + self.shift
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        # Plain NCHW strides, not just "contiguous": a batch permuted from [B, H, W, 1] counts
        # as contiguous with channels-last strides, and a convolution carries its input's
        # layout on through the network.
        b, c, h, w = x.shape
        return x if x.stride() == (c * h * w, h * w, w, 1) else x.clone(memory_format=torch.contiguous_format)
