"""Decoding, Albumentations pipelines and the on-device normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fer_ray.constants import IMAGE_COL, LABEL_COL
from fer_ray.normalize import DeviceNormalize
from fer_ray.transforms import create_transform, decode_image, transform_batch


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 arrays become L/RGB/RGBA images, uint16 ones 16-bit (I;16) images."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def face(size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "data",
    [
        encode(face()),  # gray PNG
        encode(np.stack([face()] * 3, -1)),  # RGB PNG
        encode(np.dstack([face()] * 3 + [np.full((40, 40), 200, np.uint8)])),  # RGBA PNG
        encode(face().astype(np.uint16) * 257),  # 16-bit PNG
        encode(face(), fmt="GIF"),
        encode(face(), fmt="JPEG"),
    ],
    ids=["gray", "rgb", "rgba", "png16", "gif", "jpeg"],
)
def test_decode_any_format_to_uint8(data: bytes, channels: int) -> None:
    img = decode_image(data, channels)
    assert img.dtype == np.uint8 and img.shape == (40, 40, channels)


def test_decode_16_bit_keeps_the_picture() -> None:
    img16 = decode_image(encode(face().astype(np.uint16) * 257), 1)
    assert np.abs(img16[:, :, 0].astype(int) - face().astype(int)).max() <= 1


@pytest.mark.parametrize("bits", [8, 12, 14])
@pytest.mark.parametrize("alpha", [False, True])
def test_decode_16_bit_images_of_fewer_bits_keeps_the_picture(bits: int, alpha: bool) -> None:
    """cv2 keeps a 16-bit sample's high byte: 8- to 14-bit values saved in 16 bits decoded
    black or nearly (0-255 to 0, 0-4095 to 0-15). They are scaled by their bits, an
    opaque alpha channel (65535) not counted."""
    import cv2

    gray = face().astype(np.uint16) * ((2**bits - 1) // 255)
    img = np.dstack([gray, gray, gray, np.full_like(gray, 65535)]) if alpha else gray
    data = cv2.imencode(".png", img)[1].tobytes()
    for channels in (1, 3):
        assert np.abs(decode_image(data, channels) - face()[:, :, None].astype(int)).max() <= 1.5, channels


def test_decode_16_bit_colour_of_fewer_bits_counts_every_colour_channel() -> None:
    """The bits of a 12-bit colour image come from its brightest colour sample: a warm picture
    (little blue) was scaled by its blue channel alone, and came out white."""
    import cv2

    rgb = np.dstack([face(), (face() * 0.6).astype(np.uint8), (face() * 0.4).astype(np.uint8)])
    bgr16 = rgb[:, :, ::-1].astype(np.uint16) * (4095 // 255)
    data = cv2.imencode(".png", bgr16)[1].tobytes()
    assert np.abs(decode_image(data, 3).astype(int) - rgb).max() <= 1.5
    gray8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert np.abs(decode_image(data, 1)[:, :, 0].astype(int) - gray8).max() <= 1.5


@pytest.mark.parametrize("bits", [12, 16])
def test_decode_16_bit_turns_by_exif_orientation_whatever_the_bits(bits: int) -> None:
    """cv2's 8-bit reads turn an image by its EXIF orientation; the 16-bit read of an image of
    fewer bits did not, so whether a picture was turned hung on its brightness."""
    wide = face(40)[:20].astype(np.uint16) * ((2**bits - 1) // 255)  # 20 x 40
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees: shown 40 high, 20 wide
    out = io.BytesIO()
    Image.fromarray(wide).save(out, format="PNG", exif=exif.tobytes())
    img = decode_image(out.getvalue(), 1)
    assert img.shape == (40, 20, 1)
    assert np.abs(img[:, :, 0].astype(int) - np.rot90(face(40)[:20], -1)).max() <= 1.5


def test_decode_float_images_pillow_reads_keeps_the_picture() -> None:
    """Pillow's convert() clipped float samples (FITS, mode F) in [0, 1] to black."""
    gray = face().astype(np.float32) / 255
    cards = ["SIMPLE  = %20s" % "T", "BITPIX  = %20d" % -32, "NAXIS   = %20d" % 2,
             "NAXIS1  = %20d" % gray.shape[1], "NAXIS2  = %20d" % gray.shape[0], "END"]
    pixels = gray[::-1].astype(">f4").tobytes()  # FITS keeps the bottom row first
    fits = "".join(c.ljust(80) for c in cards).ljust(2880).encode() + pixels + bytes(-len(pixels) % 2880)
    assert Image.open(io.BytesIO(fits)).mode == "F"
    for channels in (1, 3):
        assert np.abs(decode_image(fits, channels) - face()[:, :, None].astype(int)).max() <= 1, channels


@pytest.mark.parametrize("kind", ["float gray", "float64 gray", "float BGR", "int32 gray", "float beyond 0-1"])
def test_decode_float_and_32_bit_tiffs_keep_the_picture(kind: str) -> None:
    """Pillow clipped float samples in [0, 1] to 0-255 (a black image) and cannot open float
    RGB TIFFs at all; 32-bit integers are stretched to the 8 bits."""
    import cv2

    from fer_ray.prepare import check_image

    gray = face().astype(np.float32) / 255
    array = {
        "float gray": gray,
        "float64 gray": gray.astype(np.float64),  # Pillow cannot open it: prepare asks OpenCV
        "float BGR": np.dstack([gray, gray * 0.5, gray * 0.25]),
        "int32 gray": (gray * 1e6).astype(np.int32),
        "float beyond 0-1": gray * 4 - 2,
    }[kind]
    ok, buf = cv2.imencode(".tiff", array)
    data = buf.tobytes()
    rgb = decode_image(data, 3)
    expected = face().astype(int)
    if kind == "float BGR":  # blue is the picture, red a quarter of it
        assert np.abs(rgb[:, :, 2].astype(int) - expected).max() <= 1
        assert np.abs(rgb[:, :, 0].astype(int) - expected // 4).max() <= 1
    else:
        lo, hi = expected.min(), expected.max()
        if kind not in ("float gray", "float64 gray"):  # a range other than [0, 1] is stretched to 0-255
            expected = (expected - lo) * 255 / (hi - lo)
        assert np.abs(decode_image(data, 1)[:, :, 0] - expected).max() <= 1.5
        assert np.abs(rgb - expected[:, :, None]).max() <= 1.5
    from fer_ray.prepare import GRAY_MODES

    reason, (width, height, mode) = check_image(data)  # prepare keeps it, as gray or colour
    assert reason is None and (width, height) == (40, 40)
    assert (mode == "RGB") if kind == "float BGR" else (mode in GRAY_MODES), mode


def test_image_signatures_of_every_format_read_and_not_of_text() -> None:
    """Scoring reads a file named as no image only when its first bytes are an image's."""
    import cv2

    from fer_ray.transforms import SIGNATURE_BYTES, looks_like_image

    img = np.stack([face()] * 3, -1)
    encoded = [encode(img, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]
    encoded.append(cv2.imencode(".tiff", face().astype(np.float32))[1].tobytes())
    # and formats Pillow reads that have a signature: ICO, Netpbm (P5 here, P2 as text)
    encoded += [encode(img, "ICO"), encode(face(), "PPM"), b"P2\n# a comment\n2 1\n255\n0 255\n"]
    # and those cv2 reads: PAM, float PFM (colour and gray), Radiance HDR
    floats = img.astype(np.float32) / 255
    encoded += [cv2.imencode(ext, x)[1].tobytes() for ext, x in
                ((".pam", img), (".pfm", floats), (".pfm", floats[:, :, 0]), (".hdr", floats))]
    assert all(looks_like_image(data[:SIGNATURE_BYTES]) for data in encoded)
    assert all(decode_image(data, 1).shape[-1] == 1 for data in encoded)  # and decode_image reads them
    for text in (b"BMW drivers, 2024 list\n", b"", b"RIFF....WAVEfmt ", b"{\"a\": 1}", b"P1 drivers\n",
                 b"P3\nabc", b"\0\0\1\0\0\0", b"P7 drivers\n", b"PF drivers\n", b"#?readme"):
        assert not looks_like_image(text[:SIGNATURE_BYTES]), text


def test_float_pfm_images_decode_to_their_brightness() -> None:
    """PFM holds float samples, [0, 1] for white; cv2's 8-bit read truncated them to black."""
    import cv2

    from fer_ray.prepare import check_image

    img = face()
    for channels in (1, 3):
        pfm = cv2.imencode(".pfm", img.astype(np.float32) / 255)[1].tobytes()
        decoded = decode_image(pfm, channels)
        assert np.abs(decoded.astype(int) - img[:, :, None]).max() <= 1, channels
        assert check_image(pfm)[0] is None  # prepare keeps it


@pytest.mark.parametrize("ext", [".hdr", ".pfm"])
def test_float_images_of_radiances_above_one_are_stretched(ext: str) -> None:
    """Radiances above 1 (0-4) in the formats made for them: a Radiance HDR came out white
    (cv2's 8-bit read clips them) and a PFM near black (kept as 0-4 of 255). A float TIFF
    of values in 0-255, fractions included (a resized image), keeps its brightness."""
    import cv2

    img = face().astype(np.float32)
    radiance = img / 255 * 3.5 + 0.01  # 0.01 .. ~3.5
    decoded = decode_image(cv2.imencode(ext, radiance)[1].tobytes(), 1)[:, :, 0].astype(float)
    expected = (img - img.min()) * 255 / (img.max() - img.min())
    assert np.abs(decoded - expected).max() <= (4 if ext == ".hdr" else 1.5)  # (HDR: 8-bit mantissas)
    dark = img * 0.45 + 10.3  # 10.3 .. ~125: fractions, within 0-255
    kept = decode_image(cv2.imencode(".tiff", dark)[1].tobytes(), 1)[:, :, 0].astype(float)
    assert np.abs(kept - dark).max() <= 0.5


def test_train_transform_of_decoded_images_equals_that_of_the_encoded_ones() -> None:
    """Training splits kept decoded in the object store (fer_ray.data) skip the decode and
    resize; the random steps after them must give the same images, draw for draw."""
    import random

    from fer_ray.transforms import _cached_transform, decode_batch

    rng = np.random.default_rng(1)
    blobs = np.array([encode(rng.integers(0, 256, (48, 48), dtype=np.uint8), fmt="JPEG") for _ in range(32)],
                     dtype=object)
    batch = {IMAGE_COL: blobs, LABEL_COL: np.arange(32)}
    for size in (48, 32):
        decoded = decode_batch(batch, size, 1)
        assert decoded[IMAGE_COL].shape == (32, size, size, 1) and decoded[IMAGE_COL].dtype == np.uint8
        out = []
        for source in (batch, decoded):
            _cached_transform(True, size, "medium", None, 0.0).set_random_seed(7)
            random.seed(7)
            np.random.seed(7)
            out.append(transform_batch(source, size, 1, True, "medium"))
        assert np.array_equal(out[0][IMAGE_COL], out[1][IMAGE_COL])
        assert out[1][LABEL_COL].tolist() == list(range(32))


def test_decode_garbage_raises() -> None:
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"definitely not an image", 1)


def test_eval_transform_is_deterministic_and_sized() -> None:
    t = create_transform(False, 32, "strong")
    img = face(48)[:, :, None]
    a, b = t(image=img)["image"], t(image=img)["image"]
    assert a.shape[:2] == (32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_train_transform_is_random_and_sized() -> None:
    t = create_transform(True, 32, "medium")
    img = face(48)[:, :, None]
    outs = [t(image=img)["image"] for _ in range(6)]
    assert all(o.shape[:2] == (32, 32) and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])
    none = create_transform(True, 32, "none")
    np.testing.assert_array_equal(none(image=img)["image"], none(image=img)["image"])


@pytest.mark.parametrize("erasing, share", [(None, (0.10, 0.26)), (0.0, (0.0, 0.0)), (1.0, (1.0, 1.0))])
def test_random_erasing_share_is_the_levels_or_the_one_given(erasing, share) -> None:
    """On a flat gray image only the erased holes are black: the share of outputs with a
    hole is --random-erasing's, or the level's (light: 0.175) when it is not given."""
    t = create_transform(True, 32, "light", erasing)
    t.set_random_seed(0)  # (unseeded, 300 draws left the bounds about once in 2,500 runs)
    gray = np.full((48, 48, 1), 128, dtype=np.uint8)
    erased = np.mean([(t(image=gray)["image"] == 0).any() for _ in range(300)])
    assert share[0] <= erased <= share[1]


def test_blur_jitter_moves_the_sharpness_of_its_share_of_images_both_ways() -> None:
    """--blur-jitter: a share of the training images a little blurrier, a share a little
    sharper (variance of the Laplacian against the image's own); without it, none sharper
    and none far blurrier (the affine step's interpolation softens some a little)."""
    from fer_ray.blur import sharpness, to_float

    img = face(32)[:, :, None]
    own = sharpness(to_float(img[None]))[0]
    for jitter in (0.0, 1.0):
        t = create_transform(True, 32, "light", 0.0, jitter)
        t.set_random_seed(3)  # (the affine step's half-pixel shifts soften noise a lot now and then)
        ratio = sharpness(to_float(np.stack([t(image=img)["image"].reshape(32, 32, 1) for _ in range(300)]))) / own
        sharper, blurrier = (ratio > 1.25).mean(), (ratio < 0.15).mean()
        if jitter:
            assert sharper > 0.1 and blurrier > 0.2, (sharper, blurrier)
        else:
            assert sharper == 0 and blurrier == 0, (sharper, blurrier)
    batch = {IMAGE_COL: np.stack([img] * 64), LABEL_COL: np.zeros(64, dtype=np.int64)}
    out = transform_batch(batch, size=32, channels=1, is_training=True, augment="light", erasing=0.0, blur_jitter=1.0)
    assert (sharpness(to_float(out[IMAGE_COL])) / own > 1.25).any()


def test_transform_batch_gives_uint8_nhwc() -> None:
    batch = {IMAGE_COL: np.array([encode(face(48)), encode(face(60))], dtype=object),
             LABEL_COL: np.array([3, 5])}
    out = transform_batch(batch, size=24, channels=1, is_training=True, augment="medium")
    assert out[IMAGE_COL].shape == (2, 24, 24, 1) and out[IMAGE_COL].dtype == np.uint8
    assert out[LABEL_COL].tolist() == [3, 5] and out[LABEL_COL].dtype == np.int64


def test_device_normalize_resizes_expands_and_normalises() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = DeviceNormalize(64, mean, std)
    images = torch.full((2, 32, 32, 1), 255, dtype=torch.uint8)
    x = norm(images)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x[0, :, 10, 10], expected)
    same_size = DeviceNormalize(32, mean, std)(torch.zeros((1, 32, 32, 3), dtype=torch.uint8))
    torch.testing.assert_close(same_size[0, :, 0, 0], -torch.tensor(mean) / torch.tensor(std))


def test_device_normalize_per_image_removes_brightness_and_contrast() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(60, 140, size=(32, 32, 1))
    # The same face darker and flatter, and a blank image
    images = torch.from_numpy(np.stack([base, (base - 60) // 2 + 10, np.full_like(base, 200)]).astype(np.uint8))
    norm = DeviceNormalize(32, [0.5], [0.25], in_chans=1, per_image=True)
    x = norm(images)
    assert x.shape == (3, 1, 32, 32)
    torch.testing.assert_close(x[:2].mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:2].std(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[0], x[1], atol=0.05, rtol=0)  # only rounding tells them apart
    assert torch.equal(x[2], torch.zeros_like(x[2]))  # a flat image: centred, no division by 0
    dataset = DeviceNormalize(32, [0.5], [0.25], in_chans=1)(images)
    assert not torch.allclose(dataset[0], dataset[1], atol=0.05)


@pytest.mark.parametrize("in_chans,channels", [(1, 1), (3, 1), (3, 3)])
def test_device_normalize_gives_the_memory_format_asked_for(in_chans: int, channels: int) -> None:
    """A convolution carries its input's memory format through the network, so the batch
    must be plainly NCHW when channels_last is off: a 1-channel batch permuted from NHWC
    counts as contiguous but has channels-last strides."""
    images = torch.zeros((4, 32, 32, channels), dtype=torch.uint8)
    conv = torch.nn.Conv2d(in_chans, 8, 3)
    for channels_last in (False, True):
        x = DeviceNormalize(32, [0.5] * in_chans, [0.25] * in_chans, in_chans=in_chans,
                            channels_last=channels_last)(images)
        y = conv(x)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:
            assert x.stride() == (in_chans * 32 * 32, 32 * 32, 32, 1)
            assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)


def test_eval_resize_matches_albumentations_resize() -> None:
    import albumentations as A
    import cv2

    for img in (face(48)[:, :, None], np.stack([face(60)] * 3, -1), face(20)[:, :, None]):
        ours = create_transform(False, 32)(image=img)["image"]
        theirs = A.Resize(32, 32, interpolation=cv2.INTER_AREA)(image=img)["image"]
        np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)
        assert ours.shape == (32, 32, img.shape[2])


def test_decoding_does_not_import_torch_or_albumentations() -> None:
    import subprocess
    import sys

    code = ("import sys, fer_ray.transforms, fer_ray.predict; "
            "print(sorted(m for m in ('torch', 'albumentations', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_with_an_interrupted_torch_import_is_replaced(ray_cluster, tmp_path) -> None:
    """Ray cancels a running task by raising KeyboardInterrupt in it (Ray Data does when a
    consumer goes away, e.g. a killed training worker). Landing while a fresh worker's first
    task imports Albumentations and torch, it leaves torch half-imported: every later import
    in that process fails. The task must then run again on a fresh worker, not fail."""
    import os

    import ray

    marker = tmp_path / "interrupted-pid"
    batch = {IMAGE_COL: np.array([encode(face(48)), encode(face(60))], dtype=object),
             LABEL_COL: np.array([3, 5])}

    def task(batch):
        import sys

        if not marker.exists():  # first attempt: interrupt the import of torch midway
            marker.write_text(str(os.getpid()))
            assert "torch" not in sys.modules, "needs a fresh worker"

            class InterruptTorchExport:
                def find_spec(self, name, path=None, target=None):
                    if name == "torch.export":
                        raise KeyboardInterrupt
                    return None

            sys.meta_path.insert(0, InterruptTorchExport())
            try:
                import albumentations  # noqa: F401
            except KeyboardInterrupt:
                pass
            finally:
                sys.meta_path.pop(0)
            assert "torch" not in sys.modules and "torch._C" in sys.modules
        out = transform_batch(batch, size=24, channels=1, is_training=True, augment="light")
        return os.getpid(), out[IMAGE_COL].shape

    # A runtime env of its own gives the task a worker that has not imported torch yet.
    fresh = {"env_vars": {"FER_RAY_TEST_WORKER": str(tmp_path)}}
    remote = ray.remote(task).options(max_retries=1, runtime_env=fresh)
    pid, shape = ray.get(remote.remote(batch), timeout=120)
    assert shape == (2, 24, 24, 1)
    assert pid != int(marker.read_text())  # ran again in another process


def test_importing_fer_ray_asks_no_server_for_albumentations_updates() -> None:
    """Every Ray worker imports albumentations; none of them may reach out to PyPI."""
    import os
    import subprocess
    import sys

    code = (
        "import urllib.request\n"
        "calls = []\n"
        "def refuse(self, *args, **kwargs):\n"
        "    calls.append(args)\n"
        "    raise OSError('no network')\n"
        "urllib.request.OpenerDirector.open = refuse\n"
        "import fer_ray.transforms\n"
        "fer_ray.transforms.create_transform(True, 48)  # imports albumentations\n"
        "print(len(calls))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_image_formats_not_decoded_here_are_named_by_name_or_first_bytes() -> None:
    from fer_ray.transforms import SIGNATURE_BYTES, has_image_name, unread_format

    heic = b"\0\0\0\x18ftypheic\0\0\0\0"
    assert unread_format("IMG_0001.HEIC", b"") == unread_format("x.bin", heic[:SIGNATURE_BYTES]) == "HEIC/HEIF"
    assert unread_format("x", b"\0\0\0\x0cJXL \r\n\x87\n") == unread_format("a.jxl", b"") == "JPEG XL"
    assert unread_format("a.avif", b"") == (None if has_image_name("a.avif") else "AVIF")
    for head in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"\0\0\0\x18ftypmp42"):  # JPEG, PNG, MP4
        assert unread_format("x", head) is None
