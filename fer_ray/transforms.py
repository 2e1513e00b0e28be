"""Decoding and augmentation on the CPU, in Ray Data tasks.

Ray Data tasks decode and augment at `data_size` (48 px for FER2013) and hand the
workers uint8 images; the resize to the model's input size and the normalisation run on
the worker's device (`fer_ray.normalize`), so the object store never carries float32 at
224x224. Only numpy and OpenCV load at import: decoding tasks start fast and small, and
Albumentations (2 s and 700 MB to import) loads only where training augments.
"""

from __future__ import annotations

import os
import re
import sys
from functools import lru_cache
from typing import Any, Callable

import cv2
import numpy as np

from fer_ray.constants import IMAGE_COL, IMAGE_EXTENSIONS, LABEL_COL

# Random erasing's share of training images at augmentation strength 1 ("medium").
ERASING_SHARE = 0.35
# --blur-jitter: a Gaussian blur of this sigma (px at the data size), or an unsharp mask
# over a blur of this sigma adding back this share of the detail, one or the other.
BLUR_JITTER_SIGMA = (0.3, 1.0)
UNSHARP_ALPHA = (0.2, 0.5)

# cv2 would start its own thread pool in every Ray worker; Ray already runs one task per CPU.
cv2.setNumThreads(1)


# The first bytes of the formats decode_image reads (JPEG, PNG, GIF, BMP, WebP, TIFF,
# Radiance HDR, PFM, and through Pillow QOI, PSD, ICO/CUR and Netpbm): scoring reads a file
# whose name has no image extension only when it begins so (looks_like_image). TGA and PCX
# have no such signature.
_HDR = (b"#?RADIANCE", b"#?RGBE")  # Radiance HDR's first bytes
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
               b"qoif", b"8BPS", *_HDR)  # ... TIFF both ways, QOI, Photoshop, HDR
SIGNATURE_BYTES = 12


# Raster formats Pillow also reads (prepare keeps them, as any file that decodes): scoring
# reads files so named too. Video, PostScript, metafile and scientific containers are left
# out (a file of them is checked by its first bytes like any other name).
_MORE_IMAGE_EXTENSIONS = (
    ".jfif", ".jpe", ".apng", ".dib", ".ico", ".cur", ".tga", ".pbm", ".pgm", ".ppm", ".pnm",
    ".pcx", ".sgi", ".rgb", ".rgba", ".bw", ".ras", ".qoi", ".dds", ".icns", ".psd", ".jp2",
    ".j2k", ".jpx", ".jpf", ".jpc", ".j2c", ".avif", ".avifs", ".xbm", ".xpm", ".msp", ".blp",
)
# Formats cv2 reads (prepare keeps them too: Pillow or decode_image reads each): Netpbm's PAM,
# float PFM, Radiance HDR.
_CV2_IMAGE_EXTENSIONS = (".pam", ".pfm", ".hdr", ".pic")


@lru_cache(maxsize=1)
def _pillow_image_extensions() -> tuple[str, ...]:
    """_MORE_IMAGE_EXTENSIONS that this Pillow opens (AVIF and JPEG 2000 need optional codecs)."""
    from PIL import Image, features

    opens = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    optional = {".avif": "avif", ".avifs": "avif", ".jp2": "jpg_2000", ".j2k": "jpg_2000",
                ".jpx": "jpg_2000", ".jpf": "jpg_2000", ".jpc": "jpg_2000", ".j2c": "jpg_2000"}
    return tuple(ext for ext in _MORE_IMAGE_EXTENSIONS
                 if ext in opens and (ext not in optional or features.check(optional[ext])))


def has_image_name(path: str) -> bool:
    """Whether a file's name ends as an image's: the usual formats (IMAGE_EXTENSIONS),
    or another raster format that Pillow or cv2 reads here (TGA, ICO, PPM, PAM, PFM, HDR, ...)."""
    name = path.lower()
    return (name.endswith(IMAGE_EXTENSIONS) or name.endswith(_CV2_IMAGE_EXTENSIONS)
            or name.endswith(_pillow_image_extensions()))


# Netpbm: PBM, PGM, PPM ("P1".."P6", whitespace, then the width or a comment), PAM ("P7",
# whitespace, then a header line's keyword or a comment) and PFM ("PF" colour, "Pf" gray).
_NETPBM = re.compile(rb"P[1-6][ \t\r\n]+[#0-9]|P7[ \t\r\n]+(#|WIDTH|HEIGHT|DEPTH|MAXVAL|TUPLTYPE)"
                     rb"|P[Ff][ \t\r\n]+[0-9]")
_PFM = re.compile(rb"P[Ff][ \t\r\n]")


# Image formats neither Pillow nor OpenCV here reads (phones save HEIC; JPEG XL is newer):
# a file of them is named as such, not as "not an image file". ISO-BMFF brands of HEIF.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def unread_format(name: str, head: bytes) -> str | None:
    """The format of an image file that fer_ray cannot decode, from its name or first
    SIGNATURE_BYTES bytes (HEIC/HEIF, JPEG XL, AVIF where Pillow lacks its codec), or None."""
    name = name.lower()
    if name.endswith((".heic", ".heif", ".hif")) or (head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS):
        return "HEIC/HEIF"
    if name.endswith(".jxl") or head.startswith((b"\xff\x0a", b"\0\0\0\x0cJXL ")):
        return "JPEG XL"
    avif = name.endswith((".avif", ".avifs")) or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))
    if avif and ".avif" not in _pillow_image_extensions():
        return "AVIF"
    return None


def unread_format_reason(fmt: str) -> str:
    return f"a {fmt} image, a format not decoded here; convert it to JPEG or PNG"


def unread_bytes_reason(data: bytes) -> str | None:
    """unread_format_reason for a file whose bytes no decoder read, by its first bytes alone
    (its name said nothing: an iPhone's HEIC exported as .jpg); None for another format."""
    fmt = unread_format("", bytes(data[:SIGNATURE_BYTES]))
    return None if fmt is None else unread_format_reason(fmt)


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first SIGNATURE_BYTES bytes are those of an image decode_image reads
    (a BMP: "BM", its size, then 4 reserved zero bytes; "BM" alone begins text too; an ICO
    or CUR: its type and at least one image)."""
    return (head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (head[:2] == b"BM" and head[6:10] == b"\0\0\0\0")
            or (head[:4] in (b"\0\0\1\0", b"\0\0\2\0") and head[4:6] not in (b"", b"\0\0"))
            or _NETPBM.match(head) is not None)


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Encoded bytes -> uint8 HxWxC (C=1 grayscale or 3 RGB), the way training sees images.

    cv2 is fast for JPEG/PNG/BMP/WebP and converts 16-bit and alpha images to 8-bit
    gray or RGB; images of float or 32-bit samples (TIFF, PFM) are scaled to 8 bits
    (_deep_to_uint8), and 16-bit ones whose values fit in 8 to 14 bits by those bits
    (_fewer_bits_to_uint8); Pillow covers what cv2 cannot
    read (GIF: first frame). Raises ValueError.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    # cv2's 8-bit read of a PFM truncates its floats (samples in [0, 1] came out black), and
    # of a Radiance HDR clips them (radiances above 1 came out white): read at their depth
    floats = _PFM.match(data[:3]) or data.startswith(_HDR)
    img = cv2.imdecode(buf, flag) if buf.size and not floats else None
    if img is None:
        deep = _decode_deep(buf) if buf.size else None
        if deep is not None and deep.dtype != np.uint8:  # cv2 reads them, not converted
            img = _deep_to_uint8(deep, channels, radiance=bool(floats))
        else:
            img = _decode_with_pillow(data, channels)
    elif img.max() < 64 and (deep := _decode_deep(buf)) is not None and deep.dtype == np.uint16:
        # cv2 keeps a 16-bit sample's high byte: samples of 8 to 14 bits saved in 16 (a PNG
        # of values 0-255 or 0-4095) came out black
        img = _fewer_bits_to_uint8(deep, channels)
    elif channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img)


def _decode_deep(buf: np.ndarray) -> np.ndarray | None:
    """cv2's decode at the file's own bit depth, turned by its EXIF orientation as cv2's 8-bit
    reads are (IMREAD_UNCHANGED ignores the orientation), alpha dropped; as IMREAD_UNCHANGED
    reads it where that fails (a 32-bit BGRA TIFF, float or integer, which it is not asked to
    read: cv2 logs an error for it)."""
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype == np.uint8 or (img.ndim == 3 and img.shape[2] == 4 and img.dtype.itemsize >= 4):
        return img  # (8-bit: the callers' own reads serve; 4 channels of 32 bits: cv2 cannot drop them)
    turned = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    return turned if turned is not None else img


def _fewer_bits_to_uint8(img: np.ndarray, channels: int) -> np.ndarray:
    """A 16-bit image (cv2's BGR/BGRA order) whose colour samples fit in fewer bits, as uint8
    gray or RGB: scaled by the fewest bits (8 to 16) that hold its brightest colour sample
    (alpha, often 65535, not counted), so 8-bit values are kept and 12-bit ones divided by 16."""
    colour = img[:, :, :3] if img.ndim == 3 and img.shape[2] >= 3 else img[:, :, :1] if img.ndim == 3 else img
    bits = min(16, max(8, int(colour.max()).bit_length()))
    return _bgr_to_channels(
        np.clip(np.rint(img.astype(np.float32) * (255 / (2**bits - 1))), 0, 255).astype(np.uint8), channels)


def _bgr_to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """An image in cv2's order (gray, gray + alpha, BGR or BGRA) as 1-channel gray (HxW) or
    RGB, alpha dropped; any dtype cvtColor takes."""
    if x.ndim == 3 and x.shape[2] in (1, 2):  # gray, gray + alpha
        x = x[:, :, 0]
    if x.ndim == 3:  # BGR or BGRA
        alpha = x.shape[2] == 4
        if channels == 1:
            return cv2.cvtColor(x, cv2.COLOR_BGRA2GRAY if alpha else cv2.COLOR_BGR2GRAY)
        return cv2.cvtColor(x, cv2.COLOR_BGRA2RGB if alpha else cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(x, cv2.COLOR_GRAY2RGB) if channels == 3 else x


def _deep_to_uint8(img: np.ndarray, channels: int, radiance: bool = False) -> np.ndarray:
    """A float or 32-bit image (cv2's BGR/BGRA order) as uint8 gray or RGB. Floats in [0, 1]
    are that share of white, values in [0, 255] are kept (rounded), any other range is
    stretched to 0-255, as are the radiances of a PFM or Radiance HDR file (`radiance`)
    beyond 1 (Pillow clipped floats to 0-255: a [0, 1] image came out black; radiances of
    0-4 were kept, near black); NaN is black."""
    x = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if img.dtype.kind == "f" and lo >= 0 and hi <= 1:
        x = x * 255
    elif lo < 0 or hi > 255 or radiance:
        x = (x - lo) * (255 / max(hi - lo, 1e-12))
    return np.clip(np.rint(_bgr_to_channels(x, channels)), 0, 255).astype(np.uint8)


def _decode_with_pillow(data: bytes, channels: int) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            if im.mode == "F" or im.mode.startswith("I"):  # float or 16/32-bit gray (FITS, ...):
                return _deep_to_uint8(np.asarray(im), channels)  # convert() clipped them
            return np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except Exception as e:  # noqa: BLE001 - every decoder failure is "cannot decode"
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from None


class EvalResize:
    """The eval transform: a plain resize to `size` x `size` (INTER_AREA), called the way
    an Albumentations pipeline is (`t(image=img)["image"]`)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if image.shape[:2] != (self.size, self.size):
            channels = image.shape[2] if image.ndim == 3 else None
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
            if channels == 1:
                image = image[:, :, None]  # cv2 drops a single channel axis
        return {"image": image}


def create_transform(
    is_training: bool, size: int, augment: str = "medium", erasing: float | None = None,
    blur_jitter: float = 0.0,
) -> Callable[..., dict[str, Any]]:
    """Train: an Albumentations pipeline to `size` x `size`, with random erasing
    (CoarseDropout) on a share `erasing` of the images, by default the level's
    (ERASING_SHARE x its strength; 0: none), and on a share `blur_jitter` a little more
    blur or a little less (BLUR_JITTER_SIGMA, UNSHARP_ALPHA). Eval: the same resize and
    nothing random (no Albumentations needed)."""
    if not is_training or augment == "none":
        return EvalResize(size)
    A = _import_albumentations()

    strength = {"light": 0.5, "medium": 1.0, "strong": 1.5}[augment]
    erasing = min(1.0, ERASING_SHARE * strength) if erasing is None else erasing
    return A.Compose(
        [
            A.Resize(size, size, interpolation=cv2.INTER_AREA),
        ]
        # Each image's sharpness moved a little either way, at `size` (where validation and
        # scoring blur): a blur that matches the training images on average leaves some
        # images to score sharper, some blurrier than the training images were.
        + ([A.OneOf([
            A.GaussianBlur(blur_limit=0, sigma_limit=BLUR_JITTER_SIGMA),
            A.UnsharpMask(blur_limit=(7, 7), sigma_limit=BLUR_JITTER_SIGMA, alpha=UNSHARP_ALPHA, threshold=0),
        ], p=blur_jitter)] if blur_jitter > 0 else [])
        + [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                # (each axis's scale drawn on its own: Albumentations' keep_ratio=False, which
                # every accuracy figure in bench/ACCURACY.md trained with)
                scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
                translate_percent=(-0.08 * strength, 0.08 * strength),
                rotate=(-10 * strength, 10 * strength),
                border_mode=cv2.BORDER_REFLECT_101,
                p=min(1.0, 0.7 * strength),
            ),
            A.RandomBrightnessContrast(
                brightness_limit=0.2 * strength, contrast_limit=0.2 * strength, p=0.5
            ),
        ]
        + ([A.CoarseDropout(
            num_holes_range=(1, max(1, round(2 * strength))),
            hole_height_range=(0.1, 0.25),
            hole_width_range=(0.1, 0.25),
            fill=0,
            p=erasing,
        )] if erasing > 0 else [])
    )


def _import_albumentations() -> Any:
    """`import albumentations` (and torch under it) in a Ray task, replacing a broken worker.

    Ray cancels a running task by raising KeyboardInterrupt in it; Ray Data does so when a
    consumer goes away (a training worker that died, a split that is shut down). Landing
    while a fresh worker's first task imports torch (~3 s), it leaves torch half-imported
    (`torch._C` loaded, `torch` gone from sys.modules) and every later import in that
    process fails ("partially initialized module 'torch'"), or crashes. Such a process
    cannot recover: it exits, and Ray runs the task again on a fresh worker (Ray Data
    retries tasks whose worker died).
    """
    try:
        import albumentations
    except Exception:
        broken = [name for name in ("torch", "albumentations") if _half_imported(name)]
        if broken:
            print(f"fer_ray: an earlier task's import of {' and '.join(broken)} was "
                  f"interrupted in this worker (pid {os.getpid()}); exiting so that Ray "
                  "runs the task on a fresh worker", file=sys.stderr, flush=True)
            os._exit(75)
        raise
    return albumentations


def _half_imported(package: str) -> bool:
    """True when submodules of `package` are loaded but the package itself is not."""
    prefix = package + "."
    return package not in sys.modules and any(m.startswith(prefix) for m in list(sys.modules))


@lru_cache(maxsize=8)
def _cached_transform(
    is_training: bool, size: int, augment: str, erasing: float | None, blur_jitter: float,
) -> Callable[..., dict[str, Any]]:
    return create_transform(is_training, size, augment, erasing, blur_jitter)


def transform_batch(
    batch: dict[str, np.ndarray], size: int, channels: int, is_training: bool, augment: str,
    erasing: float | None = None, blur_jitter: float = 0.0,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: encoded images, or uint8 ones decoded at `size` already (decode_batch),
    -> uint8 [B, size, size, C] plus labels."""
    transform = _cached_transform(is_training, size, augment, erasing, blur_jitter)
    images = batch[IMAGE_COL]
    decoded = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, data in enumerate(images):
        # (The train transform's first step, the resize, leaves an image of `size` as it is.)
        image = transform(image=data if decoded else decode_image(data, channels))["image"]
        out[i] = image.reshape(size, size, channels)
    return {IMAGE_COL: out, LABEL_COL: batch[LABEL_COL].astype(np.int64)}


def decode_batch(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: encoded images -> uint8 [B, size, size, C] as every transform's first
    steps make them (decode, resize to `size`), nothing random: what a training split kept
    decoded in the object store holds (fer_ray.data.split_dataset)."""
    return transform_batch(batch, size, channels, is_training=False, augment="none")
