"""Procedural grayscale face images, one class per facial expression.

Used by the tests and the CPU demo in place of FER2013: each expression is a
cartoon face drawn with PIL whose brows, eyes and mouth take the shapes that
FER's classes are told apart by, with enough random pose, lighting, noise and
per-feature jitter that a classifier has to learn those shapes rather than a
pixel or two.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fer_ray.constants import FER_CLASSES

IMAGE_FORMATS = ("png", "jpg")

# Drawing at 4x and downscaling with LANCZOS antialiases the strokes.
_SUPERSAMPLE = 4
# Mouth curves are sampled at these points across the mouth, -1 = left corner.
_S = np.linspace(-1.0, 1.0, 25)
# Below this opening (face units) a mouth is drawn as a closed line.
_CLOSED_MOUTH = 0.015
_JPEG_QUALITY = 92

_Point = tuple[float, float]  # (x, y) in face units


@dataclass(frozen=True)
class _Mouth:
    half_width: float
    upper: np.ndarray  # lip line heights over _S, relative to the mouth's y
    lower: np.ndarray  # equal to `upper` where the mouth is closed
    teeth_top: float = 0.0  # height of the upper teeth band, 0 for none
    teeth_bottom: float = 0.0
    y_offset: float = 0.0  # shifts the mouth down from its usual place


@dataclass(frozen=True)
class _Expression:
    """Shape parameters in face units: the face spans y in [-1, 1], y down."""

    brow_inner_dy: tuple[float, float]  # (left, right); negative = raised
    brow_outer_dy: tuple[float, float]
    brow_arch: float
    brow_inner_x: float  # gap from the midline to each brow's inner end
    brow_thickness: float  # multiplier of the face's stroke width
    eye_open: float  # multiplier of the face's eye height
    mouth: _Mouth
    nose_wrinkles: bool = False


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _both(value: float) -> tuple[float, float]:
    return (value, value)


def _pair(rng: np.random.Generator, mean: float, jitter: float) -> tuple[float, float]:
    # Brows are never exactly symmetric in real faces; small independent jitter.
    return (mean + _u(rng, -jitter, jitter), mean + _u(rng, -jitter, jitter))


def _angry(rng: np.random.Generator) -> _Expression:
    if rng.random() < 0.6:
        # Pressed lips: a short flat line, corners a touch down.
        line = _u(rng, 0.0, 0.06) * _S**2 + _u(rng, -0.02, 0.02) * _S
        mouth = _Mouth(half_width=_u(rng, 0.17, 0.27), upper=line, lower=line)
    else:
        # Bared teeth: a boxy opening with both rows showing.
        upper = -0.05 + 0.03 * _S**2
        mouth = _Mouth(
            half_width=_u(rng, 0.22, 0.32),
            upper=upper,
            lower=upper + _u(rng, 0.10, 0.17) * (1 - _S**6),
            teeth_top=_u(rng, 0.035, 0.055),
            teeth_bottom=_u(rng, 0.03, 0.05),
        )
    return _Expression(
        brow_inner_dy=_pair(rng, _u(rng, 0.07, 0.14), 0.02),
        brow_outer_dy=_pair(rng, _u(rng, -0.08, -0.02), 0.02),
        brow_arch=_u(rng, -0.01, 0.02),
        brow_inner_x=_u(rng, 0.07, 0.12),
        brow_thickness=_u(rng, 1.3, 1.8),
        eye_open=_u(rng, 0.45, 0.7),
        mouth=mouth,
    )


def _disgust(rng: np.random.Generator) -> _Expression:
    side = 1.0 if rng.random() < 0.5 else -1.0
    # The sneer: the upper lip lifts on one side, opening the mouth there.
    lift = _u(rng, 0.06, 0.13) * np.exp(-(((_S * side) - _u(rng, 0.3, 0.6)) / 0.3) ** 2)
    base = _u(rng, 0.0, 0.05) * _S**2 - side * _u(rng, 0.01, 0.04) * _S
    upper = base - lift
    low_brow = _u(rng, 0.06, 0.12)
    inner = _both(_u(rng, 0.01, 0.05))
    outer = _both(_u(rng, -0.04, 0.02))
    # The brow on the sneering side comes down.
    if side > 0:
        inner, outer = (inner[0], inner[1] + low_brow), (outer[0], outer[1] + low_brow)
    else:
        inner, outer = (inner[0] + low_brow, inner[1]), (outer[0] + low_brow, outer[1])
    return _Expression(
        brow_inner_dy=inner,
        brow_outer_dy=outer,
        brow_arch=_u(rng, 0.0, 0.03),
        brow_inner_x=_u(rng, 0.09, 0.14),
        brow_thickness=_u(rng, 1.0, 1.5),
        eye_open=_u(rng, 0.55, 0.8),
        mouth=_Mouth(
            half_width=_u(rng, 0.21, 0.30),
            upper=upper,
            lower=base + _u(rng, 0.0, 0.02),
            teeth_top=_u(rng, 0.03, 0.05) if rng.random() < 0.5 else 0.0,
            y_offset=_u(rng, -0.04, 0.0),
        ),
        nose_wrinkles=True,
    )


def _fear(rng: np.random.Generator) -> _Expression:
    # Lips stretched sideways, corners pulled slightly down, a little open.
    upper = 0.01 + _u(rng, 0.02, 0.06) * _S**2
    raise_ = _u(rng, -0.12, -0.06)
    return _Expression(
        brow_inner_dy=_pair(rng, raise_ + _u(rng, -0.08, -0.04), 0.015),
        brow_outer_dy=_pair(rng, raise_ + _u(rng, 0.0, 0.04), 0.015),
        brow_arch=_u(rng, -0.01, 0.02),
        brow_inner_x=_u(rng, 0.06, 0.10),
        brow_thickness=_u(rng, 0.9, 1.3),
        eye_open=_u(rng, 1.3, 1.65),
        mouth=_Mouth(
            half_width=_u(rng, 0.32, 0.42),
            upper=upper,
            lower=upper + _u(rng, 0.04, 0.10) * (1 - _S**2) ** 0.7,
            teeth_top=_u(rng, 0.025, 0.04) if rng.random() < 0.4 else 0.0,
        ),
    )


def _happy(rng: np.random.Generator) -> _Expression:
    upper = 0.04 - _u(rng, 0.09, 0.2) * _S**2
    opened = rng.random() < 0.5
    return _Expression(
        brow_inner_dy=_pair(rng, _u(rng, -0.04, 0.02), 0.02),
        brow_outer_dy=_pair(rng, _u(rng, -0.03, 0.03), 0.02),
        brow_arch=_u(rng, 0.02, 0.06),
        brow_inner_x=_u(rng, 0.11, 0.17),
        brow_thickness=_u(rng, 0.9, 1.3),
        eye_open=_u(rng, 0.65, 0.95),
        mouth=_Mouth(
            half_width=_u(rng, 0.27, 0.38),
            upper=upper,
            lower=upper + _u(rng, 0.12, 0.25) * (1 - _S**2) if opened else upper,
            teeth_top=_u(rng, 0.05, 0.08) if opened and rng.random() < 0.7 else 0.0,
        ),
    )


def _neutral(rng: np.random.Generator) -> _Expression:
    upper = _u(rng, -0.02, 0.02) * _S**2 + _u(rng, -0.015, 0.015) * _S
    return _Expression(
        brow_inner_dy=_pair(rng, _u(rng, -0.02, 0.03), 0.015),
        brow_outer_dy=_pair(rng, _u(rng, -0.02, 0.02), 0.015),
        brow_arch=_u(rng, 0.01, 0.04),
        brow_inner_x=_u(rng, 0.11, 0.17),
        brow_thickness=_u(rng, 0.9, 1.3),
        eye_open=_u(rng, 0.85, 1.1),
        mouth=_Mouth(half_width=_u(rng, 0.2, 0.3), upper=upper, lower=upper),
    )


def _sad(rng: np.random.Generator) -> _Expression:
    upper = -0.03 + _u(rng, 0.07, 0.17) * _S**2
    opened = rng.random() < 0.2
    return _Expression(
        brow_inner_dy=_pair(rng, _u(rng, -0.15, -0.07), 0.02),
        brow_outer_dy=_pair(rng, _u(rng, 0.01, 0.06), 0.02),
        brow_arch=_u(rng, -0.02, 0.01),
        brow_inner_x=_u(rng, 0.09, 0.14),
        brow_thickness=_u(rng, 0.9, 1.3),
        eye_open=_u(rng, 0.7, 0.95),
        mouth=_Mouth(
            half_width=_u(rng, 0.18, 0.28),
            upper=upper,
            lower=upper + _u(rng, 0.03, 0.06) * (1 - _S**2) if opened else upper,
            y_offset=_u(rng, 0.0, 0.04),
        ),
    )


def _surprise(rng: np.random.Generator) -> _Expression:
    # An "O": the two lips are the halves of an ellipse.
    half_height = _u(rng, 0.11, 0.19)
    arc = half_height * np.sqrt(1 - _S**2)
    raise_ = _u(rng, -0.17, -0.09)
    return _Expression(
        brow_inner_dy=_pair(rng, raise_, 0.015),
        brow_outer_dy=_pair(rng, raise_ + _u(rng, 0.0, 0.04), 0.015),
        brow_arch=_u(rng, 0.05, 0.10),
        brow_inner_x=_u(rng, 0.11, 0.16),
        brow_thickness=_u(rng, 0.9, 1.3),
        eye_open=_u(rng, 1.35, 1.75),
        mouth=_Mouth(
            half_width=_u(rng, 0.09, 0.15),
            upper=-arc,
            lower=arc,
            y_offset=_u(rng, 0.02, 0.07),
        ),
    )


_EXPRESSIONS: dict[str, Callable[[np.random.Generator], _Expression]] = {
    "angry": _angry,
    "disgust": _disgust,
    "fear": _fear,
    "happy": _happy,
    "neutral": _neutral,
    "sad": _sad,
    "surprise": _surprise,
}


class _Canvas:
    """An ImageDraw that takes points in face units and applies the face's pose."""

    def __init__(self, image: Image.Image, scale: float, angle: float, shift: np.ndarray) -> None:
        self.draw = ImageDraw.Draw(image)
        self.scale = scale  # canvas pixels per face unit
        cos, sin = np.cos(angle), np.sin(angle)
        self.rotation = np.array([[cos, -sin], [sin, cos]]) * scale
        self.shift = shift

    def _points(self, xy: np.ndarray) -> list[tuple[float, float]]:
        return [tuple(p) for p in (xy @ self.rotation.T + self.shift).tolist()]

    def width(self, units: float) -> int:
        return max(1, round(units * self.scale))

    def polygon(self, xy: np.ndarray, fill: int) -> None:
        self.draw.polygon(self._points(xy), fill=fill)

    def line(self, xy: np.ndarray, fill: int, width: float) -> None:
        self.draw.line(self._points(xy), fill=fill, width=self.width(width), joint="curve")


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _bezier(p0: _Point, p1: _Point, p2: _Point) -> np.ndarray:
    t = np.linspace(0.0, 1.0, 12)[:, None]
    return (1 - t) ** 2 * np.array(p0) + 2 * t * (1 - t) * np.array(p1) + t**2 * np.array(p2)


def _draw_mouth(
    c: _Canvas, mouth: _Mouth, y: float, ink: int, cavity: int, teeth: int, stroke: float
) -> None:
    x = mouth.half_width * _S
    upper = y + mouth.y_offset + mouth.upper
    lower = y + mouth.y_offset + mouth.lower
    upper_xy = np.stack([x, upper], axis=1)
    if np.max(lower - upper) < _CLOSED_MOUTH:
        c.line(upper_xy, ink, stroke)
        return
    lower_xy = np.stack([x, lower], axis=1)
    c.polygon(np.concatenate([upper_xy, lower_xy[::-1]]), cavity)
    # Bands follow the lips and are clipped to the opening pointwise, which works
    # because both lips are sampled at the same x positions.
    if mouth.teeth_top:
        edge = np.stack([x, np.minimum(upper + mouth.teeth_top, lower)], axis=1)
        c.polygon(np.concatenate([upper_xy, edge[::-1]]), teeth)
    if mouth.teeth_bottom:
        edge = np.stack([x, np.maximum(lower - mouth.teeth_bottom, upper)], axis=1)
        c.polygon(np.concatenate([edge, lower_xy[::-1]]), teeth)
    c.line(np.concatenate([upper_xy, lower_xy[::-1], upper_xy[:1]]), ink, stroke)


def _draw_expression(c: _Canvas, e: _Expression, rng: np.random.Generator, face: int) -> None:
    ink = round(face * _u(rng, 0.05, 0.35))
    light = min(255, face + round(_u(rng, 20, 60)))
    stroke = _u(rng, 0.035, 0.05)
    eye_y = _u(rng, -0.2, -0.08)
    eye_x = _u(rng, 0.28, 0.38)
    eye_rx = _u(rng, 0.12, 0.16)
    eye_ry = _u(rng, 0.065, 0.085) * e.eye_open
    brow_y = eye_y - _u(rng, 0.2, 0.27)
    brow_len = _u(rng, 0.24, 0.32)
    mouth_y = _u(rng, 0.42, 0.56)
    gaze = (_u(rng, -0.04, 0.04), _u(rng, -0.01, 0.01))

    for side, index in ((-1.0, 0), (1.0, 1)):
        c.polygon(_ellipse(side * eye_x, eye_y, eye_rx, eye_ry), light)
        c.line(_ellipse(side * eye_x, eye_y, eye_rx, eye_ry, n=49), ink, stroke * 0.8)
        pupil = min(0.055, 0.85 * eye_ry)
        c.polygon(_ellipse(side * eye_x + gaze[0], eye_y + gaze[1], pupil, pupil, n=16), ink)

        inner = (side * e.brow_inner_x, brow_y + e.brow_inner_dy[index])
        outer = (side * (e.brow_inner_x + brow_len), brow_y + e.brow_outer_dy[index])
        middle = ((inner[0] + outer[0]) / 2, (inner[1] + outer[1]) / 2 - 2 * e.brow_arch)
        c.line(_bezier(inner, middle, outer), ink, stroke * 1.5 * e.brow_thickness)

    if rng.random() < 0.8:
        tip_y = _u(rng, 0.18, 0.28)
        half = _u(rng, 0.05, 0.09)
        c.line(np.array([[0.0, eye_y + 0.05], [0.02, tip_y]]), ink, stroke * 0.7)
        c.line(_bezier((-half, tip_y), (0.0, tip_y + 0.06), (half, tip_y)), ink, stroke * 0.8)
    if e.nose_wrinkles:
        for side in (-1.0, 1.0):
            for k in range(int(rng.integers(2, 4))):
                y0 = eye_y + 0.06 + 0.055 * k
                x0 = side * _u(rng, 0.06, 0.1)
                c.line(np.array([[x0, y0], [x0 + side * 0.07, y0 + 0.035]]), ink, stroke * 0.6)

    _draw_mouth(c, e.mouth, mouth_y, ink, round(ink * 0.6), light, stroke)


def draw_face(expression: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Draw one face with `expression` and random pose, lighting and noise.

    Returns a uint8 array of shape (size, size).
    """
    if expression not in _EXPRESSIONS:
        raise ValueError(
            f"Unknown expression {expression!r}; expected one of {', '.join(FER_CLASSES)}."
        )
    shape = _EXPRESSIONS[expression](rng)

    canvas_size = size * _SUPERSAMPLE
    background = int(rng.integers(0, 256))
    face = int(rng.integers(90, 231))
    if abs(face - background) < 30:
        # Keep the face outline visible: mirror the background to the far side.
        background = 255 - background if abs(face - (255 - background)) >= 30 else 0
    image = Image.new("L", (canvas_size, canvas_size), background)

    scale = _u(rng, 0.7, 1.0) * canvas_size / 2
    angle = np.deg2rad(_u(rng, -15.0, 15.0))
    shift = canvas_size / 2 + rng.uniform(-0.07, 0.07, size=2) * canvas_size
    c = _Canvas(image, scale, angle, shift)

    outline = _ellipse(0.0, 0.0, _u(rng, 0.7, 0.88), 1.0, n=64)
    # Narrow the lower half towards the chin for an egg shape.
    outline[:, 0] *= 1 - _u(rng, 0.05, 0.2) * np.clip(outline[:, 1], 0, None)
    c.polygon(outline, face)
    _draw_expression(c, shape, rng, face)

    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(_u(rng, 0.3, 0.6) * size / 48))

    pixels = np.asarray(image, dtype=np.float32)
    grid = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    direction = _u(rng, 0.0, 2 * np.pi)
    ramp = np.cos(direction) * grid[None, :] + np.sin(direction) * grid[:, None]
    pixels *= 1 + _u(rng, 0.0, 0.35) * ramp
    pixels += rng.normal(0.0, _u(rng, 1.0, 10.0), size=pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _stable_code(name: str) -> int:
    # Python's hash() is salted per process; crc32 keeps seeds stable across runs.
    return zlib.crc32(name.encode("utf-8"))


def image_rng(seed: int, split: str, expression: str, index: int) -> np.random.Generator:
    """The generator for one image: keyed by its split, class and index.

    Equivalent to a SeedSequence spawn tree, so an image's pixels do not depend
    on which other images are generated or in what order.
    """
    key = (_stable_code(split), _stable_code(expression), index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def generate_dataset(
    output: str | PathLike[str],
    per_split: dict[str, int],
    size: int = 48,
    seed: int = 0,
    image_format: str = "png",
    classes: Sequence[str] = FER_CLASSES,
) -> dict[str, dict[str, int]]:
    """Write `output/<split>/<class>/<class>_<index:05d>.<ext>` images.

    `per_split` maps each split to images per class; splits with 0 are skipped.
    Returns the counts written, {split: {class: n}}. Same seed, same bytes.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
    unknown = [name for name in classes if name not in _EXPRESSIONS]
    if unknown:
        raise ValueError(
            f"Unknown classes {unknown}; expected names from {', '.join(FER_CLASSES)}."
        )
    # (checked before any folder is made: 1.5 failed after making one; True wrote one image)
    bad = {split: n for split, n in per_split.items()
           if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0}
    if bad:
        raise ValueError(f"Images per class must be whole numbers >= 0, got {bad}.")

    save_options = {"quality": _JPEG_QUALITY} if image_format == "jpg" else {}
    counts: dict[str, dict[str, int]] = {}
    for split, per_class in per_split.items():
        if per_class == 0:
            continue
        counts[split] = {}
        for name in classes:
            folder = Path(output) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = draw_face(name, image_rng(seed, split, name, index), size)
                path = folder / f"{name}_{index:05d}.{image_format}"
                Image.fromarray(pixels).save(path, **save_options)
            counts[split][name] = per_class
    return counts
