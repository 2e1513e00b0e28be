"""Batch scoring (fer_ray.predict, jobs/predict.py): outputs, errors, metrics, bad inputs."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fer_ray import cli
from fer_ray.config import ConfigError
from fer_ray.constants import FER_CLASSES, LABEL_COL, PATH_COL
from fer_ray.model import ModelSpec, create_model, data_config, load_model_dir, save_model_dir
from fer_ray.predict import (
    CONFIDENCE_COL,
    CONFUSION_PLOT_FILE,
    CONFUSION_TABLE_FILE,
    ERRORS_FILE,
    FORMAT_COL,
    LABEL_NAME_COL,
    METRICS_FILE,
    PRED_COL,
    PRED_NAME_COL,
    PREDICTIONS_DIR,
    REASON_COL,
    ErrorWriter,
    PartWriter,
    SUMMARY_FILE,
    _stale_temp_folders,
    check_inputs,
    predict,
    prob_col,
)
from fer_ray.synthetic import generate_dataset
from fer_ray.normalize import DeviceNormalize
from fer_ray.transforms import create_transform, decode_image
from jobs.predict import main as predict_main

SIZE = 32
PROB_COLS = [prob_col(c) for c in FER_CLASSES]


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("test_resnet", len(FER_CLASSES))
    cfg = data_config(model)
    folder = tmp_path_factory.mktemp("model") / "best"
    spec = ModelSpec(model="test_resnet", class_names=list(FER_CLASSES), image_size=SIZE,
                     data_size=SIZE, channels=1, mean=list(cfg["mean"]), std=list(cfg["std"]))
    save_model_dir(model, folder, spec)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, set[str], dict[str, str]]:
    """Class folders with nested subfolders, odd formats and bad files.

    Returns (folder, paths that must be scored, {bad path: expected reason fragment}).
    """
    root = tmp_path_factory.mktemp("images")
    generate_dataset(root, {"src": 2}, size=SIZE, seed=1)
    src = root / "src"
    rng = np.random.default_rng(0)
    rgb = lambda h, w: (rng.random((h, w, 3)) * 255).astype(np.uint8)  # noqa: E731
    (src / "happy" / "deep" / "er").mkdir(parents=True)
    shutil.copy(src / "happy" / "happy_00000.png", src / "happy" / "deep" / "er" / "nested.png")
    _save(Image.fromarray(rgb(40, 30)).convert("RGBA"), src / "sad" / "rgba.png")
    gray16 = Image.fromarray((rng.random((36, 36)) * 65535).astype(np.uint16))
    assert gray16.mode == "I;16"
    _save(gray16, src / "fear" / "gray16.png")
    _save(Image.fromarray(rgb(1500, 2000)), src / "neutral" / "big.jpg", quality=85)
    frames = [Image.fromarray(rgb(24, 24)).convert("P") for _ in range(2)]
    frames[0].save(src / "surprise" / "anim.gif", save_all=True, append_images=frames[1:])
    _save(Image.fromarray(rgb(20, 28)), src / "angry" / "pic.bmp")
    _save(Image.fromarray(rgb(20, 28)), src / "disgust" / "pic.webp")
    # Named as no image but holding one (prepare keeps such files): read for their first bytes.
    (src / "disgust" / "photo.img").write_bytes(_jpeg(rgb(30, 30)))
    (src / "disgust" / "IMG_0002.HEIC").write_bytes(_jpeg(rgb(30, 30)))  # a JPEG, whatever its name says
    _save(Image.fromarray(rgb(26, 26)), src / "neutral" / "no_extension", format="PNG")
    # Formats Pillow reads beyond the usual ones (prepare keeps them): TGA has no signature.
    _save(Image.fromarray(rgb(22, 18)), src / "happy" / "pic.tga")
    _save(Image.fromarray(rgb(32, 32)).convert("RGBA"), src / "sad" / "icon.ico")
    _save(Image.fromarray(rgb(21, 19)), src / "angry" / "pic.ppm")
    # and those cv2 reads: PAM, float PFM
    (src / "surprise" / "pic.pam").write_bytes(cv2.imencode(".pam", rgb(23, 17))[1].tobytes())
    pfm = cv2.imencode(".pfm", rgb(25, 21).astype(np.float32) / 255)[1].tobytes()
    (src / "fear" / "pic.pfm").write_bytes(pfm)
    # Float samples in [0, 1] (Pillow made them black, cv2's default read refuses them).
    ok, tiff = cv2.imencode(".tiff", rng.random((40, 40)).astype(np.float32))
    (src / "fear" / "float.tiff").write_bytes(tiff.tobytes())
    good = {str(p) for p in src.rglob("*") if p.is_file()}
    # A link back to the folder above (pyarrow's listing followed it 40 links deep, listing
    # every file again each turn) and a link to nothing (left out of the listing, unreported).
    (src / "surprise" / "back").symlink_to(src, target_is_directory=True)
    (src / "angry" / "gone.jpg").symlink_to(root / "deleted.jpg")

    bad = {
        src / "angry" / "truncated.jpg": "truncated",
        src / "happy" / "empty.jpg": "empty file",
        src / "sad" / "notes.jpg": "cannot decode",
        src / "neutral" / "readme.txt": "not an image file",
        src / "angry" / "gone.jpg": "cannot read file",
        # a phone's photo in a format not decoded here: named, not "not an image file"
        src / "surprise" / "IMG_0001.HEIC": "a HEIC/HEIF image, a format not decoded here; convert it",
    }
    (src / "surprise" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))
    (src / "angry" / "truncated.jpg").write_bytes(_jpeg(rgb(64, 64))[:700])
    (src / "happy" / "empty.jpg").write_bytes(b"")
    (src / "sad" / "notes.jpg").write_text("these are not pixels\n")
    (src / "neutral" / "readme.txt").write_text("scored by fer_ray\n")
    (src / ".DS_Store").write_bytes(b"\0\1hidden")  # hidden: neither scored nor an error
    return src, good, {str(p): reason for p, reason in bad.items()}


@pytest.fixture(scope="module")
def labelled_run(ray_cluster, model_dir, image_folder, tmp_path_factory) -> tuple[Path, dict]:
    src, _, _ = image_folder
    out = tmp_path_factory.mktemp("pred") / "out"
    # fp32, so that the scores can be checked against the model's to 1e-4 (bf16: below).
    summary = predict(str(model_dir), str(src), str(out), batch_size=8, amp="off")
    return out, summary


@pytest.fixture
def scored_here(monkeypatch) -> None:
    """predict() with its decode and scoring done in this process, by load_batch and the
    Scorer as the scoring actors run them, for the tests of what comes before and after
    them (the listing, the summary, the reports, the move into OUT, stops and failures): a
    scoring actor's start (its process, torch, timm) is ~10 s of a small run's ~12 here. The
    actors themselves score in the other tests' runs (labelled_run's and the rest)."""
    import ray

    from fer_ray import predict as scoring

    def score_dataset(ds, model_dir, spec, batch_size, num_actors, use_gpu, tta, input_blur=None, amp="auto",
                      min_actors=None):
        threads = torch.get_num_threads()  # (the Scorer sets an actor's; this process keeps its own)
        try:
            scorer = scoring.Scorer(model_dir, use_gpu, tta, num_actors, input_blur, amp)
            tables = [scorer(scoring.load_batch(batch, spec.data_size, spec.channels))
                      for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy")]
        finally:
            torch.set_num_threads(threads)
        return ray.data.from_arrow(tables)

    monkeypatch.setattr(scoring, "score_dataset", score_dataset)


def _predictions(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / PREDICTIONS_DIR)


def _no_temp_left(out: Path) -> None:
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_every_good_file_scored_and_every_bad_one_in_errors(labelled_run, image_folder) -> None:
    out, summary = labelled_run
    _, good, bad = image_folder
    preds = _predictions(out)
    errors = pd.read_parquet(out / ERRORS_FILE)

    assert sorted(preds[PATH_COL]) == sorted(good)
    assert sorted(errors[PATH_COL]) == sorted(bad)
    for path, reason in zip(errors[PATH_COL], errors[REASON_COL]):
        assert bad[path] in reason, (path, reason)
    # Each bad file's true class when its folder names one (which classes lost files).
    src = str(image_folder[0])
    for path, name in zip(errors[PATH_COL], errors[LABEL_NAME_COL]):
        parts = path[len(src):].strip("/").split("/")
        known = parts[0].lower() if len(parts) > 1 and parts[0].lower() in FER_CLASSES else None
        assert name == known, (path, name)
    assert errors[LABEL_NAME_COL].notna().any()
    assert summary["labelled_errors"] == errors[LABEL_NAME_COL].notna().sum()
    assert (summary["scored"], summary["errors"], summary["total"]) == (len(good), len(bad), len(good) + len(bad))
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert summary["tta"] is None and summary["amp"] == "off" and summary["images_per_second"] > 0
    _no_temp_left(out)


def test_blur_sample_holds_what_decodes(model_dir, image_folder, labelled_run) -> None:
    """--input-blur auto measures the input on a sample decoded as the scorer decodes."""
    from fer_ray.model import read_model_spec
    from fer_ray.predict import list_images, sample_input

    src, good, bad = image_folder
    spec = read_model_spec(str(model_dir))
    listing = list_images(str(src), FER_CLASSES)
    everything = sample_input(str(src), listing, None, spec, rows=1000)
    assert everything.shape == (len(good), SIZE, SIZE, 1) and everything.dtype == np.uint8
    # three files drawn (seeded), of which those that decode
    drawn = listing.column(PATH_COL).take(np.sort(np.random.default_rng(0).permutation(listing.num_rows)[:3]))
    decodable = sum(path in good for path in drawn.to_pylist())
    assert decodable > 0 and sample_input(str(src), listing, None, spec, rows=3).shape == (decodable, SIZE, SIZE, 1)
    # This model was trained without a blur: nothing is measured, none applied.
    assert labelled_run[1]["input_blur"] == 0 and labelled_run[1]["input_blur_source"] == "the model's"


def test_prediction_columns(labelled_run) -> None:
    out, _ = labelled_run
    preds = _predictions(out)

    assert list(preds.columns) == [PATH_COL, LABEL_COL, LABEL_NAME_COL, PRED_COL, PRED_NAME_COL,
                                   CONFIDENCE_COL, *PROB_COLS]
    probs = preds[PROB_COLS].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(preds[PRED_COL], probs.argmax(1))
    np.testing.assert_allclose(preds[CONFIDENCE_COL], probs.max(1))
    assert list(preds[PRED_NAME_COL]) == [FER_CLASSES[i] for i in preds[PRED_COL]]
    # The first-level folder is the true class, however deep the file sits.
    src = Path(preds[PATH_COL].iloc[0]).parent.parent
    first_level = [Path(p).relative_to(src).parts[0] for p in preds[PATH_COL]]
    assert list(preds[LABEL_NAME_COL]) == first_level
    assert list(preds[LABEL_COL]) == [FER_CLASSES.index(n) for n in first_level]
    assert any(p.endswith("happy/deep/er/nested.png") for p in preds[PATH_COL])


ODD_FILES = ("big.jpg", "gray16.png", "rgba.png", "anim.gif")


def _expected_probs(model_dir: Path, paths: list[str], flip: bool = False) -> np.ndarray:
    """Decode + resize as the eval transform does, normalise on the device, then the model
    in fp32; with `flip`, averaged with the mirrored image's."""
    model, spec = load_model_dir(str(model_dir))
    transform = create_transform(False, spec.data_size)
    normalize = DeviceNormalize(spec.image_size, spec.mean, spec.std)
    images = np.stack([
        transform(image=decode_image(Path(p).read_bytes(), spec.channels))["image"].reshape(SIZE, SIZE, 1)
        for p in paths
    ])
    with torch.inference_mode():
        x = normalize(torch.from_numpy(images))
        probs = model(x).softmax(1)
        if flip:
            probs = (probs + model(x.flip(-1)).softmax(1)) / 2
    return probs.numpy()


def test_scores_equal_eval_transform_then_model(labelled_run, model_dir) -> None:
    out, _ = labelled_run
    preds = _predictions(out).set_index(PATH_COL)
    odd = [p for p in preds.index if Path(p).name in ODD_FILES]
    assert len(odd) == 4
    np.testing.assert_allclose(preds.loc[odd, PROB_COLS].to_numpy(), _expected_probs(model_dir, odd), atol=1e-4)


def test_metrics_equal_scikit_learn(labelled_run) -> None:
    from sklearn.metrics import classification_report, confusion_matrix

    out, summary = labelled_run
    preds = _predictions(out)
    y_true, y_pred = preds[LABEL_COL].to_numpy(), preds[PRED_COL].to_numpy()
    report = classification_report(y_true, y_pred, labels=list(range(7)), target_names=list(FER_CLASSES),
                                   output_dict=True, zero_division=0)
    metrics = pd.read_parquet(out / METRICS_FILE).set_index("name")

    for name in [*FER_CLASSES, "macro avg", "weighted avg"]:
        row = metrics.loc[name]
        assert row["precision"] == pytest.approx(report[name]["precision"])
        assert row["recall"] == pytest.approx(report[name]["recall"])
        assert row["f1"] == pytest.approx(report[name]["f1-score"])
        assert row["support"] == report[name]["support"]
    assert metrics.loc["accuracy", "f1"] == pytest.approx(report["accuracy"])
    assert summary["accuracy"] == pytest.approx(report["accuracy"])
    assert summary["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    # Calibration: the same 15 bins by hand, one bin at a time.
    conf, right = preds["confidence"].to_numpy(), (y_true == y_pred)
    bins = np.minimum((conf * 15).astype(int), 14)
    expected = sum(abs(right[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
                   for b in np.unique(bins))
    assert summary["calibration_error"] == pytest.approx(expected, abs=1e-4)

    cm = pd.read_parquet(out / CONFUSION_TABLE_FILE)
    counts = cm[list(FER_CLASSES)].to_numpy()
    assert counts.sum() == summary["scored"]
    np.testing.assert_array_equal(counts, confusion_matrix(y_true, y_pred, labels=list(range(7))))
    assert (out / CONFUSION_PLOT_FILE).stat().st_size > 0


def test_cli_rerun_with_tta_replaces_the_output(labelled_run, model_dir, image_folder, tmp_path, capsys) -> None:
    out = tmp_path / "again"
    shutil.copytree(labelled_run[0], out)  # a finished output, as a first run leaves it
    (out / "stale.txt").write_text("from the first run")
    # Given as a link to it (to another disk, say): the folder it leads to is replaced and
    # the link kept (replacing the link left the results beside the folder meant).
    (tmp_path / "link").symlink_to(out)

    code = predict_main(["--model", str(model_dir), "--input", str(image_folder[0]),
                             "--output", str(tmp_path / "link"), "--tta", "--batch-size", "16", "--amp", "off"])

    assert code == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == out
    _, good, bad = image_folder
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        f"scored {len(good)} of {len(good) + len(bad)} ({len(bad)} errors)")
    assert not (out / "stale.txt").exists()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["tta"] == "flip" and summary["amp"] == "off" and summary["scored"] == len(good)
    preds = _predictions(out).set_index(PATH_COL)
    np.testing.assert_allclose(preds[PROB_COLS].to_numpy().sum(1), 1.0, atol=1e-5)
    # Each image's probabilities averaged with its mirror's. In fp32: the flip moves this
    # model's probabilities by ~6e-4, less than bf16's rounding (an --amp auto run in bf16
    # differed from the fp32 run without TTA whether TTA was applied or not).
    odd = [p for p in preds.index if Path(p).name in ODD_FILES]
    got = preds.loc[odd, PROB_COLS].to_numpy()
    flipped, unflipped = _expected_probs(model_dir, odd, flip=True), _expected_probs(model_dir, odd)
    assert np.abs(got - flipped).max() < np.abs(flipped - unflipped).max() / 4
    _no_temp_left(out)


def test_shards_folder_input(ray_cluster, model_dir, tmp_path, caplog) -> None:
    """Every split of a shards folder scored. Its classes are some of the model's, spelt in
    capitals, and one it lacks: each row gets the model's label of the same name, as an
    image folder's class folders do (such shards were refused, while the same images as a
    folder were scored)."""
    from fer_ray.prepare import prepare

    generate_dataset(tmp_path / "gen", {"x": 3}, size=SIZE, seed=2, classes=["happy", "sad", "fear"])
    faces = tmp_path / "faces"
    for theirs, ours in (("happy", "Happy"), ("sad", "Sad"), ("fear", "Cats")):
        shutil.copytree(tmp_path / "gen" / "x" / theirs, faces / ours)
    manifest = prepare(str(faces), str(tmp_path / "shards"), val_fraction=0.34)
    assert manifest["classes"] == ["Cats", "Happy", "Sad"]
    out = tmp_path / "scored"

    with caplog.at_level("INFO", logger="fer_ray.predict"):
        summary = predict(str(model_dir), str(tmp_path / "shards"), str(out))

    totals = {s: c["total"] for s, c in manifest["splits"].items()}
    # The metrics mix the splits, the training split included: said, and each split named.
    assert f"(shards: train {totals['train']}, val {totals['val']})" in caplog.text
    assert "the accuracy and metrics are over all of them (train, val), the training split included" in caplog.text
    assert summary["input_kind"] == "shards" and summary["scored"] == summary["total"] == sum(totals.values()) == 9
    assert summary["amp"] == "auto" and len(summary["scored_in"]) == 1 and summary["scored_in"][0] in (
        "fp32", "fp32+channels_last", "bf16", "bf16+channels_last")  # what auto chose
    preds = _predictions(out)
    folder = preds[PATH_COL].str.split("/").str[-2]
    assert (preds[LABEL_NAME_COL][folder == "Happy"] == "happy").all()
    assert (preds[LABEL_NAME_COL][folder == "Sad"] == "sad").all()
    assert preds[LABEL_NAME_COL][folder == "Cats"].isna().all() and (folder == "Cats").sum() == 3
    truth = {str(p): FER_CLASSES.index(p.parent.name.lower()) for p in faces.rglob("*.png") if p.parent.name != "Cats"}
    assert dict(zip(preds[PATH_COL][folder != "Cats"], preds[LABEL_COL][folder != "Cats"])) == truth
    assert summary["labelled"] == 6
    assert "The shards' classes Cats are not the model's" in caplog.text
    assert (out / METRICS_FILE).exists()
    from fer_ray.model import read_model_spec
    from fer_ray.predict import sample_input

    sample = sample_input(str(tmp_path / "shards"), None, None, read_model_spec(str(model_dir)))
    assert {s: x.shape for s, x in sample.items()} == {s: (n, SIZE, SIZE, 1) for s, n in totals.items()}
    # One split, named by flag or by pointing at its folder.
    assert check_inputs(str(model_dir), str(tmp_path / "shards" / "val"), str(tmp_path / "o")).class_names
    with pytest.raises(ConfigError, match="no 'test' split"):
        check_inputs(str(model_dir), str(tmp_path / "shards"), str(tmp_path / "o"), split="test")
    # A split folder with another --split scored the other split without a word.
    with pytest.raises(ConfigError, match="--split train contradicts --input .*the 'val' split"):
        check_inputs(str(model_dir), str(tmp_path / "shards" / "val"), str(tmp_path / "o"), split="train")
    assert check_inputs(str(model_dir), str(tmp_path / "shards" / "val"), str(tmp_path / "o"), split="val")
    # --split train: that split's rows only, relabelled the same way.
    from fer_ray.predict import input_dataset

    ds, total, split, _ = input_dataset(str(tmp_path / "shards"), FER_CLASSES, "train", 64)
    rows = pd.DataFrame(ds.select_columns([PATH_COL, LABEL_COL]).take_all())
    assert (total, split, len(rows)) == (totals["train"], "train", totals["train"])
    assert set(rows[PATH_COL]) < set(preds[PATH_COL])
    # (-1: no label, the row of a class the model lacks)
    labels = preds.set_index(PATH_COL)[LABEL_COL].fillna(-1).astype(int)
    assert dict(zip(rows[PATH_COL], rows[LABEL_COL].astype(int))) == labels[rows[PATH_COL]].to_dict()
    assert (rows[LABEL_COL] == -1).sum() == 2  # Cats' training rows


def test_a_folder_with_another_tools_manifest_is_scored_as_images(model_dir, image_folder, tmp_path) -> None:
    """A manifest.json that jobs/prepare.py did not write (in the folder, or above a folder
    named val) made the job take images for shards and end in a KeyError traceback."""
    src = tmp_path / "photos"
    shutil.copytree(image_folder[0], src / "val", symlinks=True)
    for folder in (src, src / "val"):
        (folder / "manifest.json").write_text('{"version": 1}')
    from fer_ray.predict import find_shards

    assert find_shards(str(src)) is None and find_shards(str(src / "val")) is None
    assert check_inputs(str(model_dir), str(src / "val"), str(tmp_path / "o")).class_names
    with pytest.raises(ConfigError, match="is an image folder"):
        check_inputs(str(model_dir), str(src / "val"), str(tmp_path / "o"), split="val")


def test_class_folders_that_are_symlinks_are_scored(ray_cluster, model_dir, image_folder, labelled_run, tmp_path,
                                                    capsys) -> None:
    """The listing follows symlinks; the check that the input holds any file did not, and
    refused such a folder as empty."""
    src = tmp_path / "links"
    src.mkdir()
    for name in ("happy", "sad"):
        (src / name).symlink_to(image_folder[0] / name, target_is_directory=True)
    # A link in the input to the output: a second run read the first one's results as input
    # (their confusion_matrix.png, parquet and json files). The output holds an earlier run's.
    out = tmp_path / "out"
    shutil.copytree(labelled_run[0], out)
    assert (out / CONFUSION_PLOT_FILE).is_file()
    (src / "last_results").symlink_to(out, target_is_directory=True)
    expected = sum(1 for name in ("happy", "sad") for p in (image_folder[0] / name).rglob("*") if p.is_file())
    assert predict_main(["--model", str(model_dir), "--input", str(src), "--output", str(out)]) in (0, 1)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["total"] == expected and summary["scored"] > 0


def test_shards_with_other_classes_are_refused(model_dir, tmp_path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"classes": ["cat", "dog"], "splits": {}}))
    with pytest.raises(ConfigError, match="have the classes cat, dog but the model predicts angry"):
        check_inputs(str(model_dir), str(tmp_path / "shards"), str(tmp_path / "out"))


def _unlabelled_photos(tmp_path: Path) -> Path:
    """No class folders: one loose file and one in a folder named otherwise."""
    generate_dataset(tmp_path / "gen", {"x": 1}, size=SIZE, classes=["happy", "sad"])
    src = tmp_path / "photos"
    (src / "2024").mkdir(parents=True)
    shutil.copy(tmp_path / "gen" / "x" / "happy" / "happy_00000.png", src / "a.png")
    shutil.copy(tmp_path / "gen" / "x" / "sad" / "sad_00000.png", src / "2024" / "b.png")
    return src


def test_unlabelled_folder_writes_no_metrics(ray_cluster, model_dir, tmp_path, caplog) -> None:
    from bench.bench_scoring import operator_outputs

    src = _unlabelled_photos(tmp_path)

    with caplog.at_level(logging.DEBUG, logger="fer_ray.predict"):
        summary = predict(str(model_dir), str(src), str(tmp_path / "out"))

    # Ray Data's stats, logged at debug level: the decode is fused into the scoring.
    [text] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ray Data stats:")]
    stages = {name: rows for name, rows, _ in operator_outputs(text)}
    assert stages["MapBatches(load_batch)->MapBatches(Scorer)"] == 2

    # Folders, none of them a class (a dataset's root with train/ and val/, say): named.
    assert f"None of the folders in {src} (2024) is a class of the model (angry, " in caplog.text

    out = tmp_path / "out"
    preds = _predictions(out)
    assert summary["scored"] == 2 and summary["labelled"] == 0 and "accuracy" not in summary
    assert preds[LABEL_COL].isna().all() and preds[LABEL_NAME_COL].isna().all()
    for name in (METRICS_FILE, CONFUSION_TABLE_FILE, CONFUSION_PLOT_FILE):
        assert not (out / name).exists()
    assert len(pd.read_parquet(out / ERRORS_FILE)) == 0


def test_a_labelled_file_that_failed_beside_unlabelled_ones_is_named_in_the_last_line(
    ray_cluster, model_dir, tmp_path, capsys, scored_here
) -> None:
    """Every labelled file failed, an unlabelled one scored: the last line said "no true
    labels" of an input that had some."""
    src = _unlabelled_photos(tmp_path)
    (src / "happy").mkdir()
    (src / "happy" / "cut.jpg").write_bytes(b"")

    assert predict_main(["--model", str(model_dir), "--input", str(src), "--output", str(tmp_path / "out")]) == 0

    out = capsys.readouterr().out
    assert "; no labelled image scored (1 labelled files failed: errors.parquet); output:" in out
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert (summary["scored"], summary["labelled"], summary["errors"], summary["labelled_errors"]) == (2, 0, 1, 1)


def test_decode_in_tasks_of_its_own_as_with_gpus_scores_the_same(labelled_run, model_dir, image_folder, tmp_path,
                                                                  monkeypatch, caplog) -> None:
    """With --use-gpu the decode runs in CPU tasks of its own, not fused into the scoring
    actors (their remote args differ), and its rows reach the scorer re-batched by Ray
    Data. That layout, run here on the CPU: the decode given its GPU retries, which keeps
    it apart. The same predictions and errors as the fused run's."""
    from bench.bench_scoring import operator_outputs
    from fer_ray import predict as scoring

    apart = scoring._with_retries

    def as_with_gpus(map_batches, retries, fn, *args, **kwargs):
        if fn is scoring.load_batch:
            retries = {"max_retries": scoring.RETRIES}
        return apart(map_batches, retries, fn, *args, **kwargs)

    monkeypatch.setattr(scoring, "_with_retries", as_with_gpus)
    src, good, bad = image_folder
    with caplog.at_level(logging.DEBUG, logger="fer_ray.predict"):
        summary = predict(str(model_dir), str(src), str(tmp_path / "out"), batch_size=8, amp="off")
    [text] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ray Data stats:")]
    stages = {name: rows for name, rows, _ in operator_outputs(text)}
    assert stages["MapBatches(load_batch)"] == len(good) + len(bad) and "MapBatches(Scorer)" in stages
    assert (summary["scored"], summary["errors"]) == (len(good), len(bad))
    fused = _predictions(labelled_run[0]).sort_values(PATH_COL).reset_index(drop=True)
    apart_preds = _predictions(tmp_path / "out").sort_values(PATH_COL).reset_index(drop=True)
    pd.testing.assert_frame_equal(apart_preds, fused, atol=1e-5, rtol=0)
    errors = pd.read_parquet(tmp_path / "out" / ERRORS_FILE).sort_values(PATH_COL).reset_index(drop=True)
    pd.testing.assert_frame_equal(
        errors, pd.read_parquet(labelled_run[0] / ERRORS_FILE).sort_values(PATH_COL).reset_index(drop=True))


def test_folder_of_bad_files_scores_nothing_lists_them_and_fails(ray_cluster, model_dir, tmp_path, capsys,
                                                                 scored_here) -> None:
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.png").write_text("not a png")

    code = predict_main(["--model", str(model_dir), "--input", str(src), "--output", str(tmp_path / "out")])

    assert code == 1  # a script must not take an empty result for a finished one
    assert f"error: none of the 2 files could be scored; the reasons are in {tmp_path / 'out' / ERRORS_FILE}" \
        in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert (summary["scored"], summary["errors"]) == (0, 2)
    assert len(pd.read_parquet(tmp_path / "out" / ERRORS_FILE)) == 2
    preds = _predictions(tmp_path / "out")
    assert len(preds) == 0 and prob_col("happy") in preds.columns


@pytest.mark.parametrize("case", [
    "missing_model", "model_file", "not_a_model", "damaged_model", "missing_input", "empty_input", "output_inside_input",
    "input_inside_output", "foreign_output", "foreign_output_with_a_summary", "hidden_only_output", "input_is_file",
    "fp16_on_cpu", "output_is_input", "output_name_too_long", "file_uri_output_name_too_long", "input_linked_inside_output", "model_linked_inside_output", "output_inside_input_through_a_link",
])
def test_bad_inputs_exit_2_with_one_sentence(case, model_dir, image_folder, tmp_path, capsys) -> None:
    src = str(image_folder[0])
    model, out = str(model_dir), str(tmp_path / "out")
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "model_file":
        model = str(model_dir / "model.safetensors")
    elif case == "not_a_model":
        model = str(tmp_path)
    elif case == "damaged_model":
        model = str(shutil.copytree(model_dir, tmp_path / "damaged"))
        (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\0" * 100)
    elif case == "missing_input":
        src = str(tmp_path / "nothing-here")
    elif case == "empty_input":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / ".hidden").write_text("x")
        src = str(tmp_path / "empty")
    elif case == "output_inside_input":
        out = str(Path(src) / "preds")
    elif case == "input_inside_output":
        out = str(Path(src).parent)
    elif case == "foreign_output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "thesis.tex").write_text("precious")
    elif case == "foreign_output_with_a_summary":  # other tools write summary.json files too
        (tmp_path / "out" / "chapters").mkdir(parents=True)
        (tmp_path / "out" / "thesis.tex").write_text("precious")
        (tmp_path / "out" / SUMMARY_FILE).write_text('{"loss": 0.1}')
    elif case == "hidden_only_output":  # hidden entries are not nothing
        (tmp_path / "out" / ".git").mkdir(parents=True)
        (tmp_path / "out" / ".git" / "HEAD").write_text("precious")
    elif case == "input_is_file":
        src = str(next(Path(src).rglob("*.png")))
    elif case in ("input_linked_inside_output", "model_linked_inside_output"):
        # An earlier output holding the images (or the model), reached through a link
        # outside it: a run replacing the output deleted them.
        (tmp_path / "out" / "predictions").mkdir(parents=True)
        (tmp_path / "out" / "summary.json").write_text(
            json.dumps({"input_kind": "folder", "classes": [], "scored": 0, "total": 0}))
        if case == "input_linked_inside_output":
            kept = shutil.copytree(src, tmp_path / "out" / "photos", symlinks=True)
            src = str(tmp_path / "photolink")
        else:
            kept = shutil.copytree(model_dir, tmp_path / "out" / "mymodel")
            model = str(tmp_path / "modellink")
        os.symlink(kept, tmp_path / ("photolink" if case == "input_linked_inside_output" else "modellink"))
        before = sorted(p.name for p in kept.rglob("*"))
    elif case == "output_is_input":
        out = src
    elif case == "output_name_too_long":  # its OUT.tmp-<id> could not be made: a traceback
        out = str(tmp_path / ("o" * 250))
    elif case == "file_uri_output_name_too_long":  # (the check passed URIs by, file: ones too)
        out = "file://" + str(tmp_path / "new" / ("o" * 250))
    elif case == "output_inside_input_through_a_link":
        os.symlink(src, tmp_path / "srclink")
        out = str(tmp_path / "srclink" / "preds")
    extra = ["--amp", "fp16"] if case == "fp16_on_cpu" else []

    code = predict_main(["--model", model, "--input", src, "--output", out, *extra])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert err.count(". ") + err.count("; ") <= 2  # one sentence (maybe with a clause after ';')
    assert not Path(out).exists() or case in ("output_is_input", "foreign_output", "foreign_output_with_a_summary",
                                              "hidden_only_output", "input_inside_output",
                                              "input_linked_inside_output", "model_linked_inside_output")
    if case in ("input_linked_inside_output", "model_linked_inside_output"):
        assert "is inside --output" in err and sorted(p.name for p in kept.rglob("*")) == before
    if case == "output_inside_input_through_a_link":
        assert "is inside --input" in err
    if case == "output_is_input":
        assert "is --input itself" in err
    if case == "input_inside_output":
        assert "is inside --output" in err
    if case == "foreign_output_with_a_summary":
        assert (Path(out) / "thesis.tex").read_text() == "precious" and (Path(out) / "chapters").is_dir()
    if case == "hidden_only_output":
        assert (Path(out) / ".git" / "HEAD").read_text() == "precious"
    if case == "model_file":
        assert "is a file; pass the folder that holds it" in err
    if case == "file_uri_output_name_too_long":
        assert "last name is 250 bytes long" in err and not (tmp_path / "new").exists()
    # Each case refused for its own reason, not by a check that happens to come first.
    reasons = {
        "missing_model": "' does not exist; pass a run's best/ folder",
        "not_a_model": "is not a fer_ray model folder (it needs model.safetensors and config.json)",
        "damaged_model": "is not a whole safetensors file (unreadable header); the model folder is damaged",
        "missing_input": "nothing-here' does not exist; give a folder of images or a shards folder",
        "empty_input": "empty' holds no files; give a folder with images in it",
        "output_inside_input": "preds' is inside --input; choose a folder outside it",
        "foreign_output": "is a non-empty folder that jobs/predict.py did not write",
        "foreign_output_with_a_summary": "is a non-empty folder that jobs/predict.py did not write",
        "hidden_only_output": "is a non-empty folder that jobs/predict.py did not write",
        "input_is_file": ".png' is a file; give the folder that holds the images",
        "fp16_on_cpu": "--amp fp16 is for GPUs (add --use-gpu)",
        "output_name_too_long": "--output's last name is 250 bytes long",
    }
    assert reasons.get(case, "") in err


def test_a_run_stopped_while_copied_into_a_bucket_is_replaced_by_the_rerun(
    ray_cluster, model_dir, tmp_path, monkeypatch, caplog, capsys, scored_here,
) -> None:
    """On an object store (no folder renames) a run stopped while its output was copied into
    OUT deleted the finished copy, leaving part of OUT and nothing beside it: the rerun
    refused OUT as a folder the job did not write."""
    import pyarrow.fs as pafs
    from test_storage import FolderlessHandler

    from fer_ray import storage

    generate_dataset(tmp_path, {"src": 1}, size=SIZE, seed=3)
    handler = FolderlessHandler()
    copy = handler.copy_file

    def cut_short(src: str, dest: str) -> None:
        if handler.copies:  # the connection drops after the first file
            raise OSError("connection reset")
        copy(src, dest)

    handler.copy_file = cut_short
    fs = pafs.PyFileSystem(handler)
    out, resolve = tmp_path / "out", storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda path: (  # the output's folder is a bucket's
        (fs, storage.normalize(path)) if storage.normalize(path).startswith(str(out)) else resolve(path)))
    with pytest.raises(OSError, match="connection reset"):
        predict(str(model_dir), str(tmp_path / "src"), str(out), batch_size=64, num_actors=1)
    assert out.is_dir() and not (out / "summary.json").exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]
    assert len(kept) == 1 and (kept[0] / "summary.json").is_file()
    assert "The copy into" in caplog.text and "stopped part way" in caplog.text
    # A Ctrl-C there says where the whole output is (it said "nothing was written").
    from fer_ray.cli import run_job

    def stopped(src: str, dest: str) -> None:
        if handler.copies:
            raise KeyboardInterrupt
        copy(src, dest)

    handler.copy_file = stopped
    handler.copies.clear()
    shutil.rmtree(out)  # (no old output to move aside first: the stop falls in the copy into OUT)
    for stale in tmp_path.glob("out.tmp-*"):
        shutil.rmtree(stale)
    job = lambda: predict(str(model_dir), str(tmp_path / "src"), str(out), batch_size=64, num_actors=1)  # noqa: E731
    assert run_job(job, interrupted="interrupted; nothing was written") == 130
    err = capsys.readouterr().err
    assert f"interrupted while the output was copied into {out}: the whole of it is in {tmp_path}" in err, err
    assert len(list(tmp_path.glob("out.tmp-*"))) == 1  # (kept, as it says)

    handler.copy_file = copy
    summary = predict(str(model_dir), str(tmp_path / "src"), str(out), batch_size=64, num_actors=1)
    assert summary["scored"] == len(FER_CLASSES), summary
    assert json.loads((out / "summary.json").read_text())["scored"] == summary["scored"]

    # A Ctrl-C in the last call of the copy (pyarrow's calls finish before Python sees it):
    # here the temporary copy's deletion. The output is complete; the job said it stopped
    # part way and sent the user to a folder then gone.
    shutil.rmtree(out)
    delete = handler.delete_dir

    def stopped_in_delete(path: str) -> None:
        if ".tmp-" in path:
            raise KeyboardInterrupt
        delete(path)

    handler.delete_dir = stopped_in_delete
    assert run_job(job, interrupted="interrupted; nothing was written") == 130
    err = capsys.readouterr().err
    assert f"interrupted once the output was complete in {out}; its temporary copy {tmp_path}" in err, err
    assert "and a previous output moved aside as out.old-<id> beside it: remove them by hand" in err
    assert json.loads((out / "summary.json").read_text())["scored"] == summary["scored"]


def test_an_old_output_that_cannot_be_removed_leaves_the_new_one_in_place(tmp_path, monkeypatch, caplog) -> None:
    """The swap succeeded but removing the old output raised (its files another user's): the
    job ended in a traceback and exit 1 with its new output complete."""
    from fer_ray import storage
    from fer_ray.predict import SUMMARY_FILE, _publish

    out, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    for folder, text in ((out, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / SUMMARY_FILE).write_text(text)
    delete = storage.delete_dir

    def refuse_old(path: str) -> None:
        if ".old-" in path:
            raise PermissionError(13, "Permission denied", path)
        delete(path)

    monkeypatch.setattr(storage, "delete_dir", refuse_old)
    _publish(str(tmp), str(out))
    assert (out / SUMMARY_FILE).read_text() == "new" and not tmp.exists()
    assert "could not be removed" in caplog.text and "remove it by hand" in caplog.text


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch) -> None:
    """The rename of the new output into OUT failed after OUT had been moved aside: the
    previous output was left under OUT.old-<id>, which no message named."""
    from fer_ray import storage
    from fer_ray.predict import SUMMARY_FILE, _publish

    out, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    for folder, text in ((out, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / SUMMARY_FILE).write_text(text)
    move = storage.move

    def refuse_new(src: str, dst: str, **kwargs) -> None:
        if ".tmp-" in src:
            raise PermissionError(13, "Permission denied", dst)
        move(src, dst, **kwargs)

    monkeypatch.setattr(storage, "move", refuse_new)
    with pytest.raises(PermissionError):
        _publish(str(tmp), str(out))
    assert (out / SUMMARY_FILE).read_text() == "old" and (tmp / SUMMARY_FILE).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-1"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, lambda: SystemExit(15)], ids=["ctrl-c", "sigterm"])
def test_a_stop_once_the_new_output_is_in_place_says_so(tmp_path, monkeypatch, capsys, stop) -> None:
    """Ctrl-C while the old output was being removed, the new one complete in OUT: the job
    said "nothing was written ... score from the start". So did SIGTERM (Ray's handler
    exits with SystemExit) until the check took that too."""
    import signal

    from fer_ray import storage
    from fer_ray.cli import run_job
    from fer_ray.predict import SUMMARY_FILE, _publish

    out, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    for folder, text in ((out, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / SUMMARY_FILE).write_text(text)
    delete = storage.delete_dir

    def stopped_on_old(path: str) -> None:
        if ".old-" in path:
            raise stop()
        delete(path)

    monkeypatch.setattr(storage, "delete_dir", stopped_on_old)
    assert run_job(lambda: _publish(str(tmp), str(out)), interrupted="interrupted; nothing was written") == (
        130 if stop is KeyboardInterrupt else 128 + signal.SIGTERM)
    err = capsys.readouterr().err
    assert f"interrupted once the output was complete in {out}; the previous output, moved to {tmp_path}" in err
    assert "nothing was written" not in err and (out / SUMMARY_FILE).read_text() == "new"


def test_leftovers_of_interrupted_runs_are_named(tmp_path) -> None:
    for name in ("out.tmp-1a2b3c4d", "out.old-5e6f7a8b", "out", "outer.tmp-1", "other"):
        (tmp_path / name).mkdir()

    found = _stale_temp_folders(str(tmp_path / "out"))

    assert sorted(Path(p).name for p in found) == ["out.old-5e6f7a8b", "out.tmp-1a2b3c4d"]


def test_a_batch_run_again_lists_its_bad_files_once(tmp_path) -> None:
    """Ray Data runs a batch again when its worker dies; its bad files arrive twice."""
    writer = ErrorWriter(str(tmp_path / ERRORS_FILE))
    writer.write(["a.jpg", "b.jpg"], ["empty file", "not an image"], ["happy", None])
    writer.write(["b.jpg", "c.jpg"], ["not an image", "empty file"])

    assert writer.close() == 3
    table = pd.read_parquet(tmp_path / ERRORS_FILE)
    assert table[PATH_COL].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert table[LABEL_NAME_COL].fillna("-").tolist() == ["happy", "-", "-"]
    assert table[REASON_COL].tolist() == ["empty file", "not an image", "empty file"]


def test_part_writer_rolls_files_at_the_row_count_and_keeps_the_order(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(PATH_COL, pa.string()), ("n", pa.int64())])
    writer = PartWriter(str(tmp_path), schema, rows_per_file=5)
    for start in (0, 4, 8):
        writer.write(pa.table({PATH_COL: [f"{i}.png" for i in range(start, start + 4)],
                               "n": list(range(start, start + 4))}, schema=schema))

    assert writer.close() == 12
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(tmp_path / f).num_rows for f in files] == [5, 5, 2]
    assert pd.read_parquet(tmp_path)["n"].tolist() == list(range(12))


def test_part_writer_writes_whole_row_groups_as_rows_come_in_small_batches(tmp_path, monkeypatch) -> None:
    """Ray Data's blocks of 256 rows left a row group of 240 after every 10,000."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import fer_ray.predict as P

    monkeypatch.setattr(P, "ROWS_PER_GROUP", 2)
    schema = pa.schema([("n", pa.int64())])
    writer = PartWriter(str(tmp_path), schema, rows_per_file=4)
    for start in range(0, 13, 3):
        writer.write(pa.table({"n": list(range(start, start + 3))}, schema=schema))
    assert writer.close() == 15
    groups = [[pq.ParquetFile(p).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(p).num_row_groups)]
              for p in sorted(tmp_path.iterdir())]
    assert groups == [[2, 2], [2, 2], [2, 2], [2, 1]]
    assert pd.read_parquet(tmp_path)["n"].tolist() == list(range(15))


def test_part_writer_with_no_rows_leaves_one_file_with_the_columns(tmp_path) -> None:
    import pyarrow as pa

    schema = pa.schema([(PATH_COL, pa.string()), ("n", pa.int64())])
    assert PartWriter(str(tmp_path), schema).close() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
    table = pd.read_parquet(tmp_path)
    assert len(table) == 0 and list(table.columns) == [PATH_COL, "n"]


def test_files_that_failed_to_decode_pass_the_scorer_with_their_reason(model_dir) -> None:
    """load_batch keeps every row, a failed file with its reason and a blank image; the
    scorer scores the others only and passes the failures on, with no prediction."""
    from fer_ray.constants import IMAGE_COL
    from fer_ray.predict import Scorer, load_batch

    good = _jpeg(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    paths = np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    blobs = np.array([good, b"", b"not an image", good], dtype=object)
    batch = load_batch({PATH_COL: paths, LABEL_COL: np.array([0, 1, 2, -1]), IMAGE_COL: blobs}, SIZE, 1)
    assert len(batch[PATH_COL]) == 4 and batch[REASON_COL][0] == "" and batch[REASON_COL][1] == "empty file"
    assert batch[REASON_COL][2] and not batch[IMAGE_COL][1].any()

    scorer = Scorer(str(model_dir), use_gpu=False, tta=None, num_actors=1, amp="off")
    table = scorer(batch).to_pandas()
    scored, failed = table[table[REASON_COL].isna()], table[table[REASON_COL].notna()]
    assert scored[PATH_COL].tolist() == ["a.jpg", "d.jpg"] and scored[PRED_COL].notna().all()
    assert failed[PATH_COL].tolist() == ["b.jpg", "c.jpg"] and failed[PRED_COL].isna().all()
    assert failed[REASON_COL].tolist() == batch[REASON_COL][1:3].tolist()
    assert table[FORMAT_COL].tolist()[0] in ("fp32", "fp32+channels_last")  # --amp off, once per table
    assert table[FORMAT_COL].iloc[1:].isna().all()
    alone = scorer({IMAGE_COL: batch[IMAGE_COL][[0, 3]], PATH_COL: paths[[0, 3]],
                    LABEL_COL: np.array([0, -1])}).to_pandas()
    np.testing.assert_allclose(scored[PROB_COLS].to_numpy(), alone[PROB_COLS].to_numpy(), atol=1e-6)
    assert scored[LABEL_COL].tolist()[0] == 0 and pd.isna(scored[LABEL_COL].tolist()[1])


def test_auto_actors_one_per_ten_thousand_images_up_to_the_cores(monkeypatch) -> None:
    import fer_ray.predict as P

    monkeypatch.setattr(P, "cores", lambda: 2)
    assert [P.auto_actors(n, use_gpu=False)[1] for n in (1, 3_589, 9_999, 10_000, 28_709)] == [1, 1, 1, 2, 2]
    monkeypatch.setattr(P, "cores", lambda: 8)
    assert P.auto_actors(28_709, use_gpu=False) == (3, 3)
    assert P.auto_actors(10**7, use_gpu=False) == (8, 8)
    monkeypatch.setattr(P, "cores", lambda: 1)
    assert P.auto_actors(10**7, use_gpu=False) == (1, 1)


@pytest.mark.parametrize("cpus, limits, expected", [
    (1, None, (1, 1)),  # `ray start --num-cpus 1`: a second actor would wait forever
    (3, None, (3, 3)),
    (0, {"CPU": 48}, (8, 8)),  # cluster.yaml: its autoscaler adds them
])
def test_auto_actors_on_a_joined_cluster_fit_its_cpus(monkeypatch, cpus, limits, expected) -> None:
    import ray

    import fer_ray.predict as P

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: limits)
    monkeypatch.setattr(P, "cores", lambda: 8)
    assert P.auto_actors(10**7, use_gpu=False) == expected


@pytest.mark.parametrize("address, actors, use_gpu, refused", [
    ("127.0.0.1:6379", 3, False, "scoring needs 3 for its actors"),
    ("127.0.0.1:6379", 2, False, None),
    ("127.0.0.1:6379", 2, True, "scoring needs 2 for its GPU actors .* and one more for the decode"),
    ("", 3, False, None),  # a Ray of the job's own is sized for the job (init_ray)
])
def test_a_joined_cluster_too_small_for_the_scoring_actors_is_refused(
    monkeypatch, address, actors, use_gpu, refused,
) -> None:
    """Ray Data waited forever for actors the cluster could not hold."""
    import ray

    from fer_ray.predict import require_actor_cpus

    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    monkeypatch.setattr(cli, "autoscaler_limits", lambda: None)
    if refused:
        with pytest.raises(ConfigError, match=f"The Ray cluster has 2 CPU.*; {refused}"):
            require_actor_cpus(actors, use_gpu)
    else:
        require_actor_cpus(actors, use_gpu)


@pytest.mark.parametrize("gpus, limits, total, expected", [
    (2, None, 10**6, (2, 2)),  # a fixed GPU machine
    (0, {"CPU": 48, "GPU": 4}, 10**6, (1, 4)),  # cluster.yaml: none up yet, four may come
    (1, {"CPU": 48, "GPU": 4}, 25_000, (1, 3)),  # one per 10,000 images
    (3, {"CPU": 48, "GPU": 4}, 5_000, (1, 1)),
])
def test_gpu_scoring_grows_into_the_gpus_an_autoscaler_may_add(monkeypatch, gpus, limits, total, expected) -> None:
    """On cluster.yaml (no GPU node up at the start) the pool was sized to the GPUs up, one."""
    import ray

    import fer_ray.predict as P

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": gpus})
    monkeypatch.setattr(P, "autoscaler_limits", lambda: limits)
    assert P.auto_actors(total, use_gpu=True) == expected


def test_num_actors_flag_takes_auto_or_a_count(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        predict_main(["--model", "m", "--input", "i", "--output", "o", "--num-actors", "many"])
    assert e.value.code == 2
    assert "must be auto or a number, got 'many'" in capsys.readouterr().err


def test_ten_crop_views_are_the_corners_and_centre_and_their_mirrors() -> None:
    import torch.nn.functional as F

    from fer_ray.predict import tta_views

    x = torch.arange(2 * 1 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    assert len(tta_views(x, None)) == 1
    plain, mirror = tta_views(x, "flip")
    assert torch.equal(plain, x) and torch.equal(mirror, x.flip(-1))
    views = tta_views(x, "ten-crop")
    assert len(views) == 12 and all(v.shape == x.shape for v in views)
    # 30 of 32 px (15/16): the centre crop starts at 1, the bottom-right one at 2.
    resize = lambda c: F.interpolate(c, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    assert torch.equal(views[2], resize(x[..., 1:31, 1:31]))
    assert torch.equal(views[3], views[2].flip(-1))
    assert torch.equal(views[10], resize(x[..., 2:, 2:]))
    assert len({tuple(v.flatten()[:50].tolist()) for v in views}) == 12  # all different


def test_scorer_averages_the_softmax_of_every_view(model_dir) -> None:
    from fer_ray.constants import IMAGE_COL, LABEL_COL, PATH_COL
    from fer_ray.predict import PROB_PREFIX, Scorer, tta_views

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 1), dtype=np.uint8)
    batch = {IMAGE_COL: images, PATH_COL: np.array([f"{i}.png" for i in range(5)]), LABEL_COL: np.full(5, -1)}
    scorer = Scorer(str(model_dir), use_gpu=False, tta="ten-crop", num_actors=1, amp="off")
    table = scorer(batch)
    got = np.stack([table.column(c).to_numpy() for c in table.column_names if c.startswith(PROB_PREFIX)], 1)
    with torch.inference_mode():
        views = tta_views(scorer.normalize(torch.from_numpy(images)), "ten-crop")
        want = sum(scorer.model(v).softmax(1) for v in views).numpy() / 12
        one = scorer.model(scorer.normalize(torch.from_numpy(images))).softmax(1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, one, atol=1e-3)  # the views change the answer


def test_ten_crop_views_are_each_standardised_for_a_per_image_norm_model(tmp_path) -> None:
    """With input_norm: image every image the model saw had zero mean and unit std; the
    crops of a standardised batch did not (|mean| up to 0.2, std 0.68-1.04 on FER2013 val)."""
    from fer_ray.constants import IMAGE_COL, LABEL_COL, PATH_COL
    from fer_ray.predict import Scorer

    model = create_model("test_resnet", 7).eval()
    spec = ModelSpec("test_resnet", list(FER_CLASSES), 32, 48, 1, [0.5] * 3, [0.5] * 3, input_norm="image")
    save_model_dir(model, tmp_path, spec)
    scorer = Scorer(str(tmp_path), use_gpu=False, tta="ten-crop", num_actors=1, amp="off")
    seen = []
    scorer.model = lambda x: seen.append(x.clone()) or torch.zeros(len(x), 7)  # what the model is given
    yy, xx = np.mgrid[0:48, 0:48]
    images = np.stack([((yy * k + xx * 3) % 256).astype(np.uint8) for k in (1, 2, 5)])[..., None]  # uneven
    scorer({IMAGE_COL: images, PATH_COL: np.array(["a", "b", "c"]), LABEL_COL: np.full(3, -1)})
    assert len(seen) == 12
    for view in seen:
        std, mean = torch.std_mean(view.float(), dim=(1, 2, 3))
        assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-4)


def test_padded_batches_score_as_unpadded_ones(model_dir) -> None:
    """On a GPU the scorer pads a short batch (files that failed to decode leave gaps) to the
    largest size seen, so cudnn tunes one shape: the rows it returns are the same."""
    from fer_ray.constants import IMAGE_COL, LABEL_COL, PATH_COL
    from fer_ray.predict import Scorer

    rng = np.random.default_rng(2)

    def batch(n: int) -> dict:
        images = rng.integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)
        return {IMAGE_COL: images, PATH_COL: np.array([f"{i}.png" for i in range(n)]), LABEL_COL: np.full(n, -1)}

    plain = Scorer(str(model_dir), use_gpu=False, tta="flip", num_actors=1, amp="off")
    padded = Scorer(str(model_dir), use_gpu=False, tta="flip", num_actors=1, amp="off")
    assert plain.pad_rows is None
    padded.pad_rows = 0  # as on a GPU
    big, small = batch(12), batch(5)
    padded(big)
    assert padded.pad_rows == 12
    got, want = padded(small).to_pandas(), plain(small).to_pandas()
    assert len(got) == 5
    pd.testing.assert_frame_equal(got, want, atol=1e-5)


def test_scorer_in_bf16_scores_close_to_fp32(model_dir) -> None:
    """--amp bf16 on a CPU: the model runs under bf16 autocast, its probabilities are still
    float32 rows summing to 1 and within bf16's rounding of fp32's; --amp off is fp32."""
    from fer_ray.constants import IMAGE_COL, LABEL_COL, PATH_COL
    from fer_ray.predict import PROB_PREFIX, Scorer

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, SIZE, SIZE, 1), dtype=np.uint8)
    batch = {IMAGE_COL: images, PATH_COL: np.array([f"{i}.png" for i in range(16)]), LABEL_COL: np.full(16, -1)}

    def probs(amp: str) -> tuple[Scorer, np.ndarray]:
        scorer = Scorer(str(model_dir), use_gpu=False, tta=None, num_actors=1, amp=amp)
        table = scorer(batch)
        return scorer, np.stack([table.column(c).to_numpy() for c in table.column_names
                                 if c.startswith(PROB_PREFIX)], 1)

    (fp32, p32), (bf16, p16) = probs("off"), probs("bf16")
    assert fp32.amp_dtype is None and bf16.amp_dtype is torch.bfloat16
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16.sum(1), 1.0, atol=1e-5)
    # bf16's rounding, well under what another image's scores differ by (this random model's
    # probabilities all lie within ~0.02 of 1/7: a wide tolerance passed uniform scores)
    assert np.abs(p16 - p32).max() < np.abs(p32 - p32[::-1]).max() / 4
    assert not np.array_equal(p16, p32)  # bf16 did run


def test_images_the_model_scores_as_nan_are_errors_not_predictions(model_dir, tmp_path) -> None:
    """NaN probabilities became predictions of the first class (argmax of NaN), and the
    calibration error's binning then failed after the work, losing the run's output."""
    from fer_ray.constants import IMAGE_COL
    from fer_ray.predict import NOT_FINITE, REASON_COL, Scorer

    rng = np.random.default_rng(3)
    batch = {IMAGE_COL: rng.integers(0, 256, (4, SIZE, SIZE, 1), dtype=np.uint8),
             PATH_COL: np.array(["a.png", "b.png", "c.png", "d.png"]), LABEL_COL: np.array([0, 1, 2, 3]),
             REASON_COL: np.array(["", "", "", "corrupt"])}
    scorer = Scorer(str(model_dir), use_gpu=False, tta=None, num_actors=1, amp="off")
    probabilities = scorer._probabilities

    def one_nan_row(images: np.ndarray) -> np.ndarray:
        probs = probabilities(images)
        probs[1] = np.nan  # b.png
        return probs

    scorer._probabilities = one_nan_row
    table = scorer(batch).to_pandas().set_index(PATH_COL)
    assert table[REASON_COL].isna().tolist() == [True, True, False, False]  # predictions first
    assert table.loc["b.png", REASON_COL] == NOT_FINITE and table.loc["b.png", LABEL_COL] == 1
    assert table.loc["d.png", REASON_COL] == "corrupt" and table.loc["d.png", LABEL_COL] == 3
    assert table.loc[["a.png", "c.png"], "confidence"].notna().all()

    # Weights gone NaN: every image an error.
    model, spec = load_model_dir(str(model_dir))
    with torch.no_grad():
        next(p for p in model.parameters() if p.is_floating_point()).fill_(float("nan"))
    save_model_dir(model, tmp_path / "nan_model", spec, pretrained=False)
    table = Scorer(str(tmp_path / "nan_model"), use_gpu=False, tta=None, num_actors=1, amp="off")(batch).to_pandas()
    assert sorted(table[REASON_COL]) == ["corrupt"] + [NOT_FINITE] * 3


def test_in_own_thread_returns_the_result_and_raises_the_error() -> None:
    import threading

    from fer_ray.predict import in_own_thread

    ran: list[threading.Thread] = []

    def work() -> int:
        ran.append(threading.current_thread())
        return 42

    assert in_own_thread(work) == 42
    assert ran[0] is not threading.current_thread() and not ran[0].is_alive()  # it has ended

    def fail() -> None:
        raise ConfigError("the sentence")

    with pytest.raises(ConfigError, match="the sentence"):
        in_own_thread(fail)


def test_scorer_sets_up_torch_in_a_thread_that_ends_before_scoring(model_dir, monkeypatch) -> None:
    """Ray Data builds the Scorer on an actor's main thread and calls it on another: the
    model's loading and the format timing (torch's parallel loops) run in a thread of their
    own, so only the scoring thread keeps an OpenMP team (fer_ray.predict.in_own_thread)."""
    import threading

    import fer_ray.model
    import fer_ray.predict as predict

    threads: dict[str, threading.Thread] = {}
    load, timing = predict.load_model, fer_ray.model.fastest_inference_format

    def recorded(name: str, fn):
        def wrapper(*args, **kwargs):
            threads[name] = threading.current_thread()
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(predict, "load_model", recorded("load", load))
    monkeypatch.setattr(fer_ray.model, "fastest_inference_format", recorded("timing", timing))
    predict.Scorer(str(model_dir), use_gpu=False, tta=None, num_actors=1, amp="auto")

    assert set(threads) == {"load", "timing"}
    assert threads["load"] is threads["timing"] is not threading.current_thread()
    assert not threads["load"].is_alive()


def test_tta_flag_takes_flip_or_ten_crop(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        predict_main(["--model", "m", "--input", "i", "--output", "o", "--tta", "five-crop"])
    assert e.value.code == 2
    assert "invalid choice: 'five-crop'" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "other_class_count"])
def test_a_damaged_weights_file_is_found_from_its_header(model_dir, tmp_path, damage) -> None:
    from fer_ray.model_spec import check_model_folder

    folder = Path(shutil.copytree(model_dir, tmp_path / "m"))
    if damage == "truncated":  # an interrupted copy
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:-100])
        match = "not a whole safetensors file"
    else:  # a config that names six classes for seven outputs
        cfg = json.loads((folder / "config.json").read_text())
        cfg["fer_ray"]["class_names"] = cfg["fer_ray"]["class_names"][:6]
        (folder / "config.json").write_text(json.dumps(cfg))
        match = "has 7 outputs but names 6 classes"
    assert check_model_folder(str(model_dir)).class_names == list(FER_CLASSES)
    with pytest.raises(ConfigError, match=match):
        check_model_folder(str(folder))


def test_the_drivers_checks_import_neither_torch_nor_timm(model_dir, image_folder, tmp_path) -> None:
    """The scoring actors build the model; the job's driver only reads the folder (torch and
    timm took it ~4 s on 2 cores)."""
    import subprocess
    import sys

    code = (
        "import sys; from fer_ray.predict import check_inputs; "
        f"spec = check_inputs({str(model_dir)!r}, {str(image_folder[0])!r}, {str(tmp_path / 'o')!r}); "
        "print(len(spec.class_names), 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["7", "False", "False"]


def test_the_reports_libraries_load_before_the_reports(tmp_path) -> None:
    """predict() imports the reports' libraries in a thread while the actors start: writing
    the reports after it imports no more of scikit-learn (or scipy, which it brings): 0.9 s
    of writing them here (an end-to-end gain only where start-up leaves a core spare)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    (tmp_path / PREDICTIONS_DIR).mkdir()
    pd.DataFrame({LABEL_COL: rng.integers(0, 7, 200), PRED_COL: rng.integers(0, 7, 200),
                  CONFIDENCE_COL: rng.random(200)}).to_parquet(tmp_path / PREDICTIONS_DIR / "part-0.parquet")
    code = (
        "import sys; from fer_ray.predict import _import_reports, write_reports; "
        "_import_reports(); before = set(sys.modules); "
        f"out = write_reports({str(tmp_path)!r}, {list(FER_CLASSES)!r}, 't'); "
        "late = [m for m in set(sys.modules) - before if m.split('.')[0] in ('sklearn', 'scipy')]; "
        "print(out['labelled'], len(late))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["200", "0"]


def test_a_model_the_actors_cannot_build_ends_in_one_sentence(ray_cluster, model_dir, image_folder,
                                                              tmp_path, capsys) -> None:
    """Weights that do not fit the architecture config.json names: whole by their header,
    found only when a scoring actor builds the model. The folders the run made for its
    output (new/ and new/deep/) go with it."""
    folder = Path(shutil.copytree(model_dir, tmp_path / "m"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"] = "resnet18"
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "new" / "deep" / "out"

    code = predict_main(["--model", str(folder), "--input", str(image_folder[0]), "--output", str(out)])

    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith(f"error: The weights in {str(folder)!r} do not fit the model its config.json names "
                           "(resnet18): ")
    assert "copy the run's best/ folder again" in last
    assert not (tmp_path / "new").exists()


def test_an_output_that_cannot_be_swapped_for_a_new_one_is_refused_before_the_run(
    model_dir, image_folder, tmp_path, monkeypatch, capsys
) -> None:
    """The finished results are moved into place by renaming the old output away: a mount
    point (a container's volume) cannot be renamed, and a parent without write permission
    takes no folder beside it. Both failed after the work was done, and the finished folder
    was deleted."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--model", str(model_dir), "--input", str(image_folder[0]), "--output", str(out)]
    real_ismount, real_access = os.path.ismount, os.access
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(out) or real_ismount(p))
    assert predict_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --output {str(out)!r} cannot be replaced: it is a mount point (")
    assert err.endswith(f"; give a folder inside it (e.g. {out / 'preds'}).") and len(err.splitlines()) == 1
    monkeypatch.setattr(os.path, "ismount", real_ismount)
    monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(tmp_path) and real_access(p, mode))
    assert predict_main(args) == 2
    assert f"its parent folder {str(tmp_path)!r} is not writable" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_last_line_gives_a_small_rate_with_a_decimal() -> None:
    """Two images in 6.6 s printed "0 images/s"."""
    from fer_ray.predict import describe

    summary = {"scored": 2, "total": 3, "errors": 1, "seconds": 6.6, "images_per_second": 0.3, "tta": None,
               "output": "out"}
    assert "in 6.6 s, 0.3 images/s; no true labels" in describe(summary)
    # Every file failed: the input may have had labels, nothing was scored.
    assert describe({**summary, "scored": 0, "errors": 3}).endswith("; nothing scored; output: out")
    assert ", 1242 images/s" in describe({**summary, "images_per_second": 1241.6})


def test_class_folders_match_the_models_classes_in_any_case(tmp_path) -> None:
    """Folders matched with str.lower(), shards and prepare with casefold(): a model class
    'Straße' scored on a folder STRASSE/ lost its true labels."""
    from fer_ray.predict import list_images

    for folder in ("STRASSE", "happy", "other"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(b"x")
    table = list_images(str(tmp_path), ["Straße", "Happy"]).to_pandas()
    labels = dict(zip(table[PATH_COL].map(lambda p: Path(p).parent.name), table[LABEL_COL]))
    assert labels["STRASSE"] == 0 and labels["happy"] == 1 and labels["other"] < 0


def test_a_file_reached_twice_through_symbolic_links_is_scored_once(tmp_path, caplog) -> None:
    """A linked folder listed its files a second time: two rows for one image, counted
    twice in the metrics, and under two true labels when the link named another class."""
    import os

    from fer_ray.predict import list_images

    for name in ("happy", "sad"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(name.encode())
    (tmp_path / "joy").symlink_to(tmp_path / "happy", target_is_directory=True)  # another class
    (tmp_path / "sad" / "again.png").symlink_to(tmp_path / "sad" / "a.png")  # the same class
    os.link(tmp_path / "sad" / "a.png", tmp_path / "sad" / "hard.png")  # a hard link: a file of its own
    table = list_images(str(tmp_path), ["happy", "sad", "joy"]).to_pandas()
    rows = dict(zip(table[PATH_COL].map(lambda p: os.path.relpath(p, tmp_path)), table[LABEL_COL]))
    assert rows == {"happy/a.png": -1, "sad/a.png": 1, "sad/hard.png": 1}, rows
    assert ("2 file(s) are reached a second time through symbolic links; each is scored once, under the path "
            "listed first (1 of them under two classes: scored without a true label)") in caplog.text
    assert "outside the class folders" not in caplog.text  # (it was counted as one such)

    # Class folders of links into a pool of images beside them: scored once, with the class.
    pool = tmp_path / "pooled"
    (pool / "all").mkdir(parents=True)
    (pool / "happy").mkdir()
    (pool / "all" / "1.png").write_bytes(b"x")
    (pool / "happy" / "1.png").symlink_to(pool / "all" / "1.png")
    (pool / "zoo").mkdir()  # listed after the pool: a class's link there keeps its class too
    (pool / "zoo" / "2.png").write_bytes(b"y")
    (pool / "happy" / "2.png").symlink_to(pool / "zoo" / "2.png")
    (pool / "notes").mkdir()
    (pool / "notes" / "3.png").write_bytes(b"z")  # outside, and no class links to it
    caplog.clear()
    table = list_images(str(pool), ["happy", "sad"]).to_pandas()
    rows = dict(zip(table[PATH_COL].map(lambda p: os.path.relpath(p, pool)), table[LABEL_COL]))
    assert rows == {"all/1.png": 0, "happy/2.png": 0, "notes/3.png": -1}, rows
    # The pool's folders, whose files all took a class, are not named as outside.
    assert "1 of 3 files are outside the class folders (in notes);" in caplog.text

    # Two classes' folders both links to one pool, and a folder of no class beside: the
    # classes' files are torn, not in folders that are "not a class of the model".
    torn = tmp_path / "torn"
    for name in ("all", "notes"):
        (torn / name).mkdir(parents=True)
        (torn / name / f"{name}.png").write_bytes(name.encode())
    (torn / "happy").symlink_to(torn / "all", target_is_directory=True)
    (torn / "sad").symlink_to(torn / "all", target_is_directory=True)
    caplog.clear()
    table = list_images(str(torn), ["happy", "sad"]).to_pandas()
    assert table[LABEL_COL].tolist() == [-1, -1]
    assert "None of the folders" not in caplog.text and "under two classes" in caplog.text
    assert "1 of 2 files are outside the class folders (in notes);" in caplog.text


def test_a_folder_that_cannot_be_listed_is_in_the_summary_and_the_last_line(ray_cluster, model_dir, tmp_path,
                                                                            monkeypatch, scored_here) -> None:
    """A class folder without permission was named in a warning only: OUT said "scored N of
    N (0 errors)", with nothing to tell a later reader that a folder's files were missing."""
    from fer_ray.predict import describe

    src = tmp_path / "src"
    for name in ("happy/a.png", "sad/b.png", "angry/c.png"):
        _save(Image.fromarray(np.full((20, 20), 128, np.uint8)), src / name)
    real_scandir = os.scandir

    def scandir(path):  # (the tests run as root, whom chmod does not stop)
        if str(path) == str(src / "angry"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = predict(str(model_dir), str(src), str(tmp_path / "out"), batch_size=8, amp="off")
    assert (summary["total"], summary["scored"], summary["errors"]) == (2, 2, 0)
    assert summary["unlisted_folders"] == [{"path": str(src / "angry"), "reason": "Permission denied"}]
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["unlisted_folders"] == summary["unlisted_folders"]
    assert "; 1 folder(s) could not be listed, their files not scored (summary.json); output:" in describe(summary)
    assert "could not be listed" not in describe({**summary, "unlisted_folders": []})


def test_a_class_folder_given_as_the_input_is_named(tmp_path, caplog) -> None:
    """--input val/happy: every file scored without a label, and nothing said why."""
    from fer_ray.predict import list_images

    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "a.png").write_bytes(b"x")
    assert list_images(str(tmp_path / "happy"), ["happy", "sad"]).column(LABEL_COL).to_pylist() == [-1]
    assert "are in no class folder" in caplog.text and "'happy' is a class of the model: give its parent" in caplog.text


def test_class_folders_match_the_models_classes_in_either_unicode_form(tmp_path) -> None:
    """A folder named "colère" with a separate accent (as a zip made on macOS names it) was
    no class of a model trained on "colère" with the composed one: no true labels at all."""
    import unicodedata

    from fer_ray.predict import list_images, shard_labels

    decomposed = unicodedata.normalize("NFD", "colère")
    assert decomposed != "colère"
    (tmp_path / decomposed).mkdir()
    (tmp_path / decomposed / "a.png").write_bytes(b"x")
    assert list_images(str(tmp_path), ["colère", "joie"]).column(LABEL_COL).to_pylist() == [0]
    assert shard_labels([decomposed.upper(), "joie"], ["colère", "joie"]).tolist() == [0, 1]


def test_the_scoring_actors_apply_the_blur_measured_on_the_input(ray_cluster, synth_folder, tmp_path) -> None:
    """--input-blur auto measures the input against the model's training images; the actors
    must score with that sigma, not the model's recorded one: a folder as blurry as the
    training images is scored as `--input-blur 0` scores it."""
    from fer_ray.blur import median_sharpness, to_float

    blurred = tmp_path / "blurred"
    for f in sorted((synth_folder / "val").rglob("*.png")):
        gray = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        (blurred / f.parent.name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(blurred / f.parent.name / f.name), cv2.GaussianBlur(gray, (0, 0), 1.5))
    sample = np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)[:, :, None] for f in sorted(blurred.rglob("*.png"))])
    torch.manual_seed(0)
    model = create_model("test_resnet", len(FER_CLASSES), in_chans=1)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # outputs that a blur moves
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.2, 2.0)
    folder = tmp_path / "best"
    save_model_dir(model.eval(), folder, ModelSpec(
        "test_resnet", list(FER_CLASSES), 32, 32, 1, [0.5], [0.25], model_kwargs={"in_chans": 1},
        input_blur=1.4, train_sharpness=median_sharpness(to_float(sample))))

    def scores(blur, name: str) -> tuple[dict, pd.DataFrame]:
        summary = predict(str(folder), str(blurred), str(tmp_path / name), batch_size=32, num_actors=1,
                          input_blur=blur, amp="off")
        preds = pd.concat(pd.read_parquet(f) for f in sorted((tmp_path / name / "predictions").glob("*.parquet")))
        return summary, preds.sort_values(PATH_COL).reset_index(drop=True)

    auto, by_auto = scores(None, "auto")
    assert auto["input_blur"] == 0 and auto["input_blur_source"].startswith("measured on")
    _, by_none = scores(0.0, "none")
    probs = [f"prob_{c}" for c in FER_CLASSES]
    np.testing.assert_allclose(by_auto[probs].to_numpy(), by_none[probs].to_numpy(), atol=1e-6)
    _, by_model = scores("model", "model")  # (the model's 1.4: the scores move)
    assert np.abs(by_model[probs].to_numpy() - by_none[probs].to_numpy()).max() > 1e-4


def test_a_batch_that_kills_its_process_is_retried_a_few_times_not_for_ever(ray_cluster) -> None:
    """Ray Data runs a task again without end when its process dies (and an actor task too):
    with --use-gpu, a file that crashed its decoder, or an image too large for the node's
    memory, hung the job for ever without naming the file. On CPUs the decode stays fused
    into the scoring actors (their remote args left equal: test_unlabelled_folder_writes_no_metrics)."""
    import ray.data

    from fer_ray.predict import RETRIES, score_dataset

    spec = ModelSpec("test_resnet", list(FER_CLASSES), SIZE, SIZE, 1, [0.5], [0.25])

    def remote_args(use_gpu: bool) -> dict[str, dict]:
        ds = ray.data.from_items([{"path": "a.png"}])
        op, found = score_dataset(ds, "unused", spec, batch_size=8, num_actors=1, use_gpu=use_gpu,
                                  tta=None)._logical_plan.dag, {}
        while op is not None:
            found[op.name] = getattr(op, "ray_remote_args", None)
            op = op.input_dependencies[0] if op.input_dependencies else None
        return found

    gpu = remote_args(True)
    assert gpu["MapBatches(load_batch)"]["max_retries"] == RETRIES == 3
    assert gpu["MapBatches(Scorer)"]["max_task_retries"] == RETRIES
    cpu = remote_args(False)
    assert "max_retries" not in cpu["MapBatches(load_batch)"] and "max_task_retries" not in cpu["MapBatches(Scorer)"]


def test_a_failure_after_every_file_was_scored_keeps_the_predictions(ray_cluster, model_dir, tmp_path, monkeypatch,
                                                                     caplog, scored_here) -> None:
    """The metrics read every prediction back at the end: a failure there (memory, on a
    large input) deleted predictions that had taken the whole run to make."""
    import fer_ray.predict as predict_module

    generate_dataset(tmp_path, {"src": 1}, size=SIZE, seed=4)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(predict_module, "write_reports", no_memory)
    with pytest.raises(MemoryError):
        predict(str(model_dir), str(tmp_path / "src"), str(tmp_path / "out"), batch_size=64, num_actors=1)
    kept = list(tmp_path.glob("out.tmp-*"))
    assert len(kept) == 1 and not (tmp_path / "out").exists()
    assert sum(len(pd.read_parquet(f)) for f in (kept[0] / "predictions").glob("*.parquet")) == len(FER_CLASSES)
    assert f"Every file was scored, then the job failed: the predictions and errors are kept in {kept[0]}" in caplog.text



@pytest.mark.parametrize("stop", [KeyboardInterrupt, lambda: SystemExit(15)], ids=["ctrl-c", "sigterm"])
def test_a_stop_after_every_file_was_scored_says_where_the_predictions_are(
    ray_cluster, model_dir, tmp_path, monkeypatch, capsys, stop, scored_here,
) -> None:
    """A Ctrl-C (or SIGTERM: Ray's handler exits with SystemExit) while the reports were
    written kept the predictions beside OUT, and the last line said "nothing was written"."""
    import signal

    import fer_ray.predict as predict_module
    from fer_ray.cli import run_job

    generate_dataset(tmp_path, {"src": 1}, size=SIZE, seed=4)

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(predict_module, "write_reports", stopped)
    job = lambda: predict(str(model_dir), str(tmp_path / "src"), str(tmp_path / "out"), batch_size=64,  # noqa: E731
                          num_actors=1)
    assert run_job(job, interrupted="interrupted; nothing was written") == (
        130 if stop is KeyboardInterrupt else 128 + signal.SIGTERM)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (the job's closing line)
    kept = list(tmp_path.glob("out.tmp-*"))
    assert len(kept) == 1 and not (tmp_path / "out").exists()
    assert last.startswith(f"interrupted once every file was scored: the predictions and errors are kept in "
                           f"{kept[0]} (not a finished output: no summary.json)"), last


def test_a_heic_named_as_a_jpeg_is_named_as_heic(tmp_path) -> None:
    """An iPhone's photo exported as IMG_1.jpg but HEIC inside read "cannot identify image
    file": the format is named by its first bytes there too (files of other names were)."""
    from fer_ray.predict import decode_files

    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64)
    (tmp_path / "IMG_1.jpg").write_bytes(heic)
    (tmp_path / "notes.jpg").write_text("these are not pixels\n")
    paths = [str(tmp_path / "IMG_1.jpg"), str(tmp_path / "notes.jpg")]
    for blobs in (None, [heic, b"these are not pixels\n"]):  # (read here, or a shards folder's bytes)
        images, keep, bad, reasons = decode_files(paths, blobs, 16, 1)
        assert keep == [] and bad == paths
        assert reasons[0] == "a HEIC/HEIF image, a format not decoded here; convert it to JPEG or PNG"
        assert "HEIC" not in reasons[1]
