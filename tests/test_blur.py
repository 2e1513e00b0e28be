"""Input-blur matching: training images blurrier than the images a model scores."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, settings_for
from fer_ray.blur import estimate_blur, gaussian_blur, sharpness, to_float
from fer_ray.config import ConfigError, TrainConfig, parse_config, parse_input_blur
from fer_ray.constants import FER_CLASSES
from fer_ray.model import ModelSpec, create_model, load_model_dir, save_model_dir
from fer_ray.normalize import DeviceNormalize


def gray_images(folder, n: int = 200) -> np.ndarray:
    files = sorted(folder.rglob("*.png"))[:n]
    assert files, folder
    return np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)[:, :, None] for f in files])


def cv2_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(i, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)[:, :, None]
                     for i in images[..., 0]])


@pytest.mark.parametrize("sigma", [0.7, 2.0, 3.0])
def test_blur_matches_opencv(sigma) -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 1), dtype=np.uint8)
    ours = gaussian_blur(torch.from_numpy(to_float(x)), sigma)[:, 0].numpy()
    ref = np.stack([cv2.GaussianBlur(i.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
                    for i in x[..., 0]])
    np.testing.assert_allclose(ours, ref, atol=0.05)
    # The numpy path (scoring's driver measures its input without torch) gives the same.
    np.testing.assert_allclose(gaussian_blur(to_float(x), sigma)[:, 0], ours, atol=1e-4)


def test_blur_keeps_flat_images_and_works_on_tiny_ones() -> None:
    flat = torch.full((2, 3, 8, 8), 77.0)
    torch.testing.assert_close(gaussian_blur(flat, 5.0), flat)  # kernel wider than the image
    x = torch.rand(1, 1, 8, 8)
    assert gaussian_blur(x, 0) is x
    assert sharpness(gaussian_blur(x * 255, 1.0)) < sharpness(x * 255)


def test_blur_matrices_are_made_once_per_size_and_serve_any_mode(monkeypatch) -> None:
    """On a GPU a per-batch copy of the matrices waited for the GPU's queued work."""
    import fer_ray.blur as blur

    made = []
    original = blur._blur_matrix
    monkeypatch.setattr(blur, "_blur_matrix", lambda k, n: made.append(n) or original(k, n))
    blur._blur_matrices.cache_clear()
    blur._blur_matrices_np.cache_clear()
    x = np.random.default_rng(1).integers(0, 256, (2, 30, 44, 1), dtype=np.uint8)  # not square
    with torch.inference_mode():  # as the scorer calls it first
        first = gaussian_blur(torch.from_numpy(to_float(x)), 1.3)
    again = gaussian_blur(torch.from_numpy(to_float(x)), 1.3)
    assert made == [30, 44]  # once each, not per call
    torch.testing.assert_close(first, again)
    ref = np.stack([cv2.GaussianBlur(i.astype(np.float32), (0, 0), 1.3, borderType=cv2.BORDER_REFLECT_101)
                    for i in x[..., 0]])
    np.testing.assert_allclose(again[:, 0].numpy(), ref, atol=0.05)
    # Matrices first made in inference mode still serve a computation that needs gradients.
    y = torch.from_numpy(to_float(x)).requires_grad_()
    gaussian_blur(y, 1.3).sum().backward()
    assert y.grad is not None


def test_estimate_recovers_the_blur_of_a_blurred_split(synth_folder) -> None:
    val = gray_images(synth_folder / "val")
    train = cv2_blur(gray_images(synth_folder / "train"), 1.5)
    sigma, found = estimate_blur(train, val)
    assert found["train_sharpness"] < found["val_sharpness"]
    assert sigma == pytest.approx(1.5, abs=0.3)


def test_no_blur_when_splits_are_alike(synth_folder) -> None:
    sigma, _ = estimate_blur(gray_images(synth_folder / "train"), gray_images(synth_folder / "val"))
    assert sigma == 0
    # Val blurrier than train: nothing to match by blurring.
    sigma, _ = estimate_blur(gray_images(synth_folder / "train"), cv2_blur(gray_images(synth_folder / "val"), 2))
    assert sigma == 0


def test_device_normalize_blurs_only_what_is_scored() -> None:
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8))
    plain = DeviceNormalize(32, [0.5], [0.25], in_chans=1)
    blurred = DeviceNormalize(32, [0.5], [0.25], in_chans=1, blur_sigma=2.0)
    torch.testing.assert_close(blurred(x, match_blur=False), plain(x))
    assert not torch.allclose(blurred(x), plain(x))
    expected = (gaussian_blur(x.permute(0, 3, 1, 2).float(), 2.0) / 255 - 0.5) / 0.25
    torch.testing.assert_close(blurred(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("value,expected", [("auto", None), ("off", 0.0), ("0", 0.0), ("2.5", 2.5), (3, 3.0)])
def test_parse_input_blur(value, expected) -> None:
    assert parse_input_blur(value) == expected


@pytest.mark.parametrize("value", ["blurry", "-1", "nan"])
def test_bad_input_blur_is_one_sentence(value) -> None:
    cfg, _ = parse_config(TrainConfig, ["--data", "d", "--output", "o", "--input-blur", value],
                          argparse.ArgumentParser())
    with pytest.raises(ConfigError, match="--input-blur must be auto, off or a sigma"):
        cfg.validate()


def test_model_folder_carries_the_blur_and_old_folders_load(tmp_path) -> None:
    model = create_model("test_resnet", 7).eval()
    spec = ModelSpec("test_resnet", list(FER_CLASSES), 32, 32, 1, [0.5] * 3, [0.5] * 3, input_blur=1.5)
    save_model_dir(model, tmp_path, spec)
    assert load_model_dir(str(tmp_path))[1].input_blur == 1.5
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["fer_ray"]["input_blur"]  # a folder written before input_blur existed
    cfg_path.write_text(json.dumps(cfg))
    assert load_model_dir(str(tmp_path))[1].input_blur == 0.0


def test_model_folder_carries_the_input_norm(tmp_path) -> None:
    from fer_ray.predict import Scorer

    model = create_model("test_resnet", 7).eval()
    spec = ModelSpec("test_resnet", list(FER_CLASSES), 32, 32, 1, [0.5] * 3, [0.5] * 3, input_norm="image")
    save_model_dir(model, tmp_path, spec)
    assert load_model_dir(str(tmp_path))[1].input_norm == "image"
    assert Scorer(str(tmp_path), False, False, 1).normalize.per_image
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fer_ray"]["input_norm"] = "per-pixel"  # not a value this version knows
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown input_norm 'per-pixel'"):
        load_model_dir(str(tmp_path))
    del cfg["fer_ray"]["input_norm"]  # a folder written before input_norm existed
    cfg_path.write_text(json.dumps(cfg))
    assert load_model_dir(str(tmp_path))[1].input_norm == "dataset"
    assert not Scorer(str(tmp_path), False, False, 1).normalize.per_image


def test_scorer_uses_the_models_blur_unless_overridden(tmp_path) -> None:
    from fer_ray.predict import Scorer

    model = create_model("test_resnet", 7).eval()
    save_model_dir(model, tmp_path, ModelSpec("test_resnet", list(FER_CLASSES), 32, 32, 1,
                                              [0.5] * 3, [0.5] * 3, input_blur=1.5))
    assert Scorer(str(tmp_path), False, False, 1).normalize.blur_sigma == 1.5
    assert Scorer(str(tmp_path), False, False, 1, input_blur=0.0).normalize.blur_sigma == 0.0


def test_predict_rejects_a_bad_blur_flag(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs/predict.py"), "--model", str(tmp_path), "--input", str(tmp_path),
         "--output", str(tmp_path / "o"), "--input-blur", "sharp"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--input-blur: must be auto, model, off or a sigma" in out.stderr


@pytest.fixture(scope="module")
def blurred_shards(synth_shards, tmp_path_factory):
    """The synthetic shards with every training image blurred (sigma 1.5)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("blurred") / "shards"
    shutil.copytree(synth_shards, out)
    for f in (out / "train").glob("*.parquet"):
        table = pq.read_table(f)
        blurred = []
        for data in table.column("image").to_pylist():
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            img = cv2.GaussianBlur(img, (0, 0), 1.5, borderType=cv2.BORDER_REFLECT_101)
            blurred.append(cv2.imencode(".png", img)[1].tobytes())
        idx = table.schema.get_field_index("image")
        pq.write_table(table.set_column(idx, table.schema.field(idx), pa.array(blurred, pa.binary())), f)
    return out


def test_training_measures_the_blur_it_must_match(blurred_shards, synth_shards) -> None:
    measured = settings_for(blurred_shards).spec
    assert measured.input_blur == pytest.approx(1.5, abs=0.3)
    # The training images' sharpness is recorded with a blur, for scoring to match again.
    val = settings_for(synth_shards).spec
    assert val.input_blur == 0 and val.train_sharpness is None  # alike splits: nothing to do
    off = settings_for(blurred_shards, "--input-blur", "off").spec
    assert off.input_blur == 0 and off.train_sharpness is None
    given = settings_for(synth_shards, "--input-blur", "0.8").spec
    assert given.input_blur == 0.8
    assert 0 < measured.train_sharpness < 0.5 * given.train_sharpness  # blurred train vs sharp


def test_scoring_blur_matches_the_input_not_only_val(synth_folder) -> None:
    """auto: sharp input gets about the blur training measured; input already as blurry as
    the training images gets none; 'model' and a number are taken as they are."""
    from fer_ray.blur import median_sharpness
    from fer_ray.predict import scoring_blur

    sharp = gray_images(synth_folder / "val")
    blurred = cv2_blur(sharp, 1.5)
    spec = ModelSpec("test_resnet", list(FER_CLASSES), 48, 48, 1, [0.5] * 3, [0.5] * 3, input_blur=1.4,
                     train_sharpness=median_sharpness(to_float(blurred)))
    assert scoring_blur(None, spec, lambda: sharp)[0] == pytest.approx(1.5, abs=0.3)
    sigma, source = scoring_blur("auto", spec, lambda: blurred)
    assert sigma == 0 and f"measured on {len(blurred)} input images" in source
    assert scoring_blur("model", spec, lambda: blurred)[0] == 1.4
    assert scoring_blur(0.6, spec, lambda: blurred)[0] == 0.6
    assert scoring_blur("auto", spec, lambda: sharp[:0])[0] == 1.4  # nothing decoded: the model's
    old = ModelSpec("test_resnet", list(FER_CLASSES), 48, 48, 1, [0.5] * 3, [0.5] * 3, input_blur=1.4)
    assert scoring_blur(None, old, lambda: blurred) == (1.4, "the model's")  # no sharpness recorded
    none = ModelSpec("test_resnet", list(FER_CLASSES), 48, 48, 1, [0.5] * 3, [0.5] * 3)
    assert scoring_blur(None, none, lambda: 1 / 0)[0] == 0  # trained without a blur: nothing sampled


def test_scoring_blur_measures_a_whole_shards_folder_split_by_split(synth_folder) -> None:
    """FER2013 here: train blurred, val and test sharp. One blur for every split would be
    measured on whichever split came first; now the splits must agree or the job says so."""
    from fer_ray.blur import median_sharpness
    from fer_ray.predict import scoring_blur

    sharp = gray_images(synth_folder / "val")
    blurred = cv2_blur(sharp, 1.5)
    spec = ModelSpec("test_resnet", list(FER_CLASSES), 48, 48, 1, [0.5] * 3, [0.5] * 3, input_blur=1.4,
                     train_sharpness=median_sharpness(to_float(blurred)))

    with pytest.raises(ConfigError, match=r"different input blurs .*\(train 0, val 1\.\d+, test 1\.\d+ px\)"):
        scoring_blur(None, spec, lambda: {"train": blurred, "val": sharp, "test": sharp})
    sigma, source = scoring_blur("auto", spec, lambda: {"val": sharp[:100], "test": sharp[100:]})
    assert sigma == pytest.approx(1.5, abs=0.3) and f"measured on {len(sharp)} input images" in source
    assert scoring_blur(None, spec, lambda: {"train": blurred, "val": sharp[:0]})[0] == 0  # empty split left out
    assert scoring_blur(0.6, spec, lambda: 1 / 0)[0] == 0.6  # a given blur: nothing measured


def test_scoring_measures_its_input_blur_without_torch_in_the_driver() -> None:
    """The driver measures a sample of the input against the model's training images; that
    imported torch (~1.3 s of every blurred model's scoring start-up), which only the scoring
    actors need (README, "Batch scoring")."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from fer_ray.model_spec import ModelSpec\n"
        "from fer_ray.predict import scoring_blur\n"
        "x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)\n"
        "spec = ModelSpec('test_resnet', ['a', 'b'], 32, 32, 1, [0.5] * 3, [0.5] * 3, input_blur=1.4,"
        " train_sharpness=5.0)\n"
        "print(scoring_blur(None, spec, lambda: x)[0] > 0, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]


def test_a_given_blur_is_not_described_as_measured() -> None:
    """--input-blur 1.5 was logged as "Train images are blurrier than val ...", though
    nothing was measured."""
    from fer_ray import blur

    given = blur.describe(1.5, {}, "--input-blur")
    assert "blurrier" not in given and "sigma 1.5 px (--input-blur;" in given
    measured = blur.describe(3.05, {"train_sharpness": 6.2, "val_sharpness": 2150.0}, "measured")
    assert measured.startswith("Train images are blurrier than val (sharpness train 6.2 vs val 2.15e+03)")
