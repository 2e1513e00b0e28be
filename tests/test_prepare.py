"""Preparing shards: the three source kinds, counts, class order, splits, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fer_ray.config import ConfigError
from fer_ray.constants import FER_CLASSES, FER_CSV_CODES
from fer_ray.prepare import class_order, list_source, prepare, stratified_split


def png(value: int = 128, size: int = 12, mode: str = "L") -> bytes:
    out = io.BytesIO()
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, (size, size), color).save(out, format="PNG")
    return out.getvalue()


def make_tree(root: Path, spec: dict[str, int]) -> None:
    """spec: 'split/class' or 'class' -> number of images."""
    for rel, n in spec.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"img_{i}.png").write_bytes(png(i * 10 % 255))


def read_split(shards: Path, split: str):
    return pq.read_table(shards / split).to_pandas()


# ---------------------------------------------------------------- pure: listing


def test_fer_classes_keep_canonical_order() -> None:
    shuffled = ["surprise", "Happy", "angry", "neutral", "disgust", "sad", "fear"]
    assert [c.lower() for c in class_order(shuffled)] == list(FER_CLASSES)
    assert class_order(["dog", "cat", "bird"]) == ["bird", "cat", "dog"]


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = [0] * 100 + [1] * 20 + [2] * 1
    tr, va = stratified_split(labels, 0.25, seed=3)
    assert sorted(tr + va) == list(range(len(labels)))
    val_labels = [labels[i] for i in va]
    assert val_labels.count(0) == 25 and val_labels.count(1) == 5
    assert val_labels.count(2) == 0  # a single image stays in train
    assert stratified_split(labels, 0.25, seed=3) == (tr, va)
    assert stratified_split(labels, 0.25, seed=4) != (tr, va)


def test_split_folders_listing(tmp_path) -> None:
    make_tree(tmp_path, {"train/happy": 3, "train/sad": 2, "validation/happy": 1, "test/sad": 1})
    listing = list_source(str(tmp_path))
    assert listing.kind == "split_folders"
    assert listing.classes == ["happy", "sad"]
    assert {k: len(v) for k, v in listing.items.items()} == {"train": 5, "val": 1, "test": 1}
    assert all(lab == 1 for p, lab in listing.items["test"])
    assert listing.val_fraction is None  # val was given


def test_split_folders_without_val_carve_it_from_train_and_say_so(tmp_path) -> None:
    """The Kaggle layout (train/ and test/): val comes out of train at --val-fraction, and
    the listing (so the manifest) records the fraction (it said None)."""
    make_tree(tmp_path, {"train/happy": 10, "train/sad": 10, "test/sad": 1})
    listing = list_source(str(tmp_path), val_fraction=0.2)
    assert {k: len(v) for k, v in listing.items.items()} == {"train": 16, "val": 4, "test": 1}
    assert listing.val_fraction == 0.2


def test_class_folders_listing_splits_by_fraction(tmp_path) -> None:
    make_tree(tmp_path, {"a": 10, "b": 20})
    listing = list_source(str(tmp_path), val_fraction=0.2, seed=0)
    assert listing.kind == "class_folders"
    val = [lab for _, lab in listing.items["val"]]
    assert val.count(0) == 2 and val.count(1) == 4
    assert len(listing.items["train"]) == 24
    assert listing.val_fraction == 0.2


def test_split_class_missing_from_train_is_an_error(tmp_path) -> None:
    make_tree(tmp_path, {"train/happy": 2, "val/happy": 1, "val/angry": 1})
    with pytest.raises(ConfigError, match="classes that train/ lacks \\(angry\\)"):
        list_source(str(tmp_path))
    make_tree(tmp_path / "b", {"Training/happy": 2, "val/happy": 1, "val/angry": 1})
    with pytest.raises(ConfigError, match="classes that Training/ lacks \\(angry\\); add them to Training/"):
        list_source(str(tmp_path / "b"))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no class folders"),
        (lambda p: (p / "happy").mkdir(parents=True), "holds no files"),
        (lambda p: (p.parent / "x.txt").write_text("hi"), "not a .csv"),
    ],
)
def test_bad_sources(tmp_path, setup, message) -> None:
    src = tmp_path / "src"
    setup(src)
    target = tmp_path / "x.txt" if message == "not a .csv" else src
    with pytest.raises(ConfigError, match=message):
        list_source(str(target))


def test_a_source_one_level_too_high_is_named_not_taken_for_one_class(tmp_path) -> None:
    """SRC/fer2013/{train,val}/<class>: one class folder, 'fer2013', whose train and val
    images were pooled into one label and written as shards that no training can use. Two
    datasets side by side were two classes, a classifier of the dataset an image is in."""
    make_tree(tmp_path / "src" / "fer2013", {"train/happy": 2, "train/sad": 2, "val/happy": 1, "val/sad": 1})
    with pytest.raises(ConfigError, match=r"holds a dataset, not class folders: fer2013 holds a train/ folder; "
                                          r"give that folder as --source"):
        list_source(str(tmp_path / "src"))
    assert sorted(list_source(str(tmp_path / "src" / "fer2013")).classes) == ["happy", "sad"]
    make_tree(tmp_path / "src" / "ck", {"Training/happy": 2, "Training/sad": 2})
    with pytest.raises(ConfigError, match=r"The folders ck, fer2013 of .* each hold a train/ folder: give one of "
                                          r"them as --source if each is a dataset; if they are classes split inside"):
        list_source(str(tmp_path / "src"))
    make_tree(tmp_path / "one", {"x/happy": 2})  # a class folder of subfolders is still one class
    with pytest.raises(ConfigError, match=r"has one class folder \(x\); a classifier needs at least two"):
        list_source(str(tmp_path / "one"))


def test_a_val_share_that_rounds_to_nothing_is_named(tmp_path) -> None:
    make_tree(tmp_path, {"a": 5, "b": 5})  # 5 x 0.05 rounds to no val image in either class
    with pytest.raises(ConfigError, match="--val-fraction 0.05 leaves no val images"):
        list_source(str(tmp_path), val_fraction=0.05)


def test_an_empty_val_folder_is_named_and_an_empty_test_folder_left_out(tmp_path, caplog) -> None:
    make_tree(tmp_path / "a", {"train/happy": 2, "train/sad": 2})
    (tmp_path / "a" / "val" / "happy").mkdir(parents=True)
    with pytest.raises(ConfigError, match="The val folder 'val' of .* holds no images"):
        list_source(str(tmp_path / "a"))

    make_tree(tmp_path / "b", {"train/happy": 2, "train/sad": 2, "val/happy": 1})
    (tmp_path / "b" / "test" / "sad").mkdir(parents=True)
    listing = list_source(str(tmp_path / "b"))
    assert sorted(listing.items) == ["train", "val"]
    assert "The test folder 'test' of" in caplog.text


def test_split_folders_of_loose_images_are_named_so(tmp_path, caplog) -> None:
    """A val/ or test/ of images but no class folders was said to hold no images."""
    make_tree(tmp_path / "a", {"train/happy": 2, "train/sad": 2, "val": 2})
    with pytest.raises(ConfigError, match="The val folder 'val' of .* holds files but no class folders; "
                                          "put each image in the folder of its class, as in train/"):
        list_source(str(tmp_path / "a"))

    make_tree(tmp_path / "b", {"train/happy": 2, "train/sad": 2, "val/happy": 1, "test": 2})
    listing = list_source(str(tmp_path / "b"))
    assert sorted(listing.items) == ["train", "val"]
    assert "The test folder 'test' of" in caplog.text and "holds files but no class folders" in caplog.text


def test_loose_images_beside_split_folders_or_of_any_image_name_are_listed_as_unclassed(tmp_path) -> None:
    """Images beside train/ and val/ were passed over unsaid, and a loose .jfif or .pgm in a
    split folder too (only eight extensions were looked for; in a class folder it is kept)."""
    make_tree(tmp_path, {"train/happy": 2, "train/sad": 2, "val/happy": 1, "val/sad": 1})
    for name in ("stray.png", "train/loose.jfif", "val/loose.pgm"):
        (tmp_path / name).write_bytes(png(1))
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    listing = list_source(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in listing.unclassed) == [
        "stray.png", "train/loose.jfif", "val/loose.pgm"]


def test_two_folders_of_one_split_are_named(tmp_path) -> None:
    """val/ and validation/ side by side: one was taken for a class folder, and the message
    said the source mixed split folders with other folders."""
    make_tree(tmp_path, {"train/happy": 2, "train/sad": 2, "val/happy": 1, "validation/sad": 1})
    with pytest.raises(ConfigError, match="has val and validation folders, each the val split; keep one"):
        list_source(str(tmp_path))


def test_class_folders_in_either_unicode_form_are_one_class(tmp_path) -> None:
    """val/colère with a separate accent (a zip made on macOS) was refused as a class train/
    lacks, beside train/colère with the composed one; two such folders in one split were two
    classes (scoring matches them as one)."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", "colère")
    make_tree(tmp_path / "a", {"train/colère": 2, "train/joie": 2, f"val/{decomposed}": 1, "val/joie": 1})
    listing = list_source(str(tmp_path / "a"))
    assert listing.classes == ["colère", "joie"] and sorted(lab for _, lab in listing.items["val"]) == [0, 1]
    make_tree(tmp_path / "b", {"colère": 2, decomposed: 2, "joie": 2})
    with pytest.raises(ConfigError, match="differ only in letter case or accent encoding"):
        list_source(str(tmp_path / "b"))


def test_csv_without_expected_columns(tmp_path) -> None:
    path = tmp_path / "fer.csv"
    path.write_text("label,image\n1,0 0 0\n")
    with pytest.raises(ConfigError, match="lacks the column\\(s\\) emotion, pixels, Usage"):
        list_source(str(path))


@pytest.mark.parametrize("usages, lacking", [
    (["Training", "PrivateTest"], "PublicTest"),
    (["PublicTest"], "Training"),
])
def test_csv_without_a_train_or_val_split_is_refused(tmp_path, usages, lacking) -> None:
    """It used to write shards with no val split, which training then refused ("re-run
    jobs/prepare.py": the same shards again)."""
    path = tmp_path / "fer.csv"
    path.write_text("emotion,pixels,Usage\n" + "".join(f"0,0 0 0 0,{u}\n" for u in usages))
    with pytest.raises(ConfigError, match=f"has no {lacking} rows"):
        list_source(str(path))


def test_csv_rows_of_no_known_usage_are_listed_and_blank_lines_passed_over(tmp_path, caplog) -> None:
    """Rows of a misspelt Usage, or a last line cut short before it, were left out with a
    count in the log only (the same row with its Usage whole was listed with its reason);
    a blank line at the end was counted as such a row."""
    import logging

    path = tmp_path / "fer.csv"
    path.write_text("emotion,pixels,Usage\n0,0 0 0 0,Training\n1,0 0 0 0,training\n\n2,0 0 0 0,PublicTest\n"
                    "3,0 0 0 0,PublicTest\n3,70 80 9\n4,9 9,\n\n")
    with caplog.at_level(logging.WARNING, logger="fer_ray.prepare"):
        listing = list_source(str(path))
    assert listing.rejected == [("csv:1", "unknown Usage 'training' (Training, PublicTest or PrivateTest)"),
                                ("csv:5", "no Usage (the line ends before its column)"),
                                ("csv:6", "an empty Usage")]
    assert "3 CSV rows have an unknown Usage" in caplog.text
    rows = {split: [(c["row"], c["rows"]) for c in chunks] for split, chunks in listing.csv_chunks.items()}
    assert rows == {"train": [(0, 1)], "val": [(3, 2)]}  # (row 2 the blank line, read by no task)


# ---------------------------------------------------------------- Ray: whole job


def test_prepare_split_folders_skips_bad_files(ray_cluster, tmp_path, caplog) -> None:
    src = tmp_path / "src"
    make_tree(src, {"train/happy": 4, "train/sad": 3, "val/happy": 2, "val/sad": 1})
    (src / "train/happy/empty.jpg").write_bytes(b"")
    (src / "train/sad/notes.jpg").write_text("not an image")
    (src / "train/sad/photo.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))  # a HEIC so named
    (src / "train/sad/truncated.png").write_bytes(png(size=40)[:60])
    (src / "train/happy/deep/er").mkdir(parents=True)
    (src / "train/happy/deep/er/rgb.png").write_bytes(png(mode="RGB"))
    # A link to nothing is skipped with its reason (it was left out unseen), and a link back
    # to a folder above is not followed (it listed every image again, 40 links deep).
    (src / "train/sad/gone.png").symlink_to(tmp_path / "deleted.png")
    (src / "train/happy/deep/again").symlink_to(src / "train", target_is_directory=True)
    # Images beside the class folders have no class: they were left out unseen.
    (src / "train/loose.png").write_bytes(png())
    (src / "val/stray.JPG").write_bytes(png())
    (src / "val/notes.txt").write_text("not an image, not listed")
    out = tmp_path / "shards"
    with caplog.at_level("WARNING", logger="fer_ray.prepare"):
        manifest = prepare(str(src), str(out), shard_rows=2)
    assert "2 image file(s) lie beside the class folders, with no class" in caplog.text

    assert manifest["classes"] == ["happy", "sad"]
    assert manifest["splits"]["train"] == {"total": 8, "per_class": {"happy": 5, "sad": 3}}
    assert manifest["splits"]["val"]["total"] == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.jpg"] == "not an image file"
    assert reasons["photo.jpg"] == "a HEIC/HEIF image, a format not decoded here; convert it to JPEG or PNG"
    assert reasons["truncated.png"].startswith("corrupt image")
    assert reasons["gone.png"].startswith("cannot read: ")
    assert reasons["loose.png"] == reasons["stray.JPG"] == "not in a class folder (no label)"
    assert "notes.txt" not in reasons
    assert manifest["image"]["channels"] == 3  # one RGB image among gray ones
    assert json.loads((out / "manifest.json").read_text()) == manifest

    train = read_split(out, "train")
    assert list(train.columns) == ["image", "label", "path"]
    assert len(train) == 8 and train["label"].tolist().count(0) == 5
    assert len(list((out / "train").glob("*.parquet"))) >= 2  # --shard-rows splits files
    first = train.iloc[0]
    assert Path(first["path"]).read_bytes() == first["image"]  # bytes as found


def test_image_sizes_and_channels_are_the_training_images(ray_cluster, tmp_path) -> None:
    """The manifest's image summary sets training's defaults (input channels, data size):
    one colour image in test/ made every image decode as RGB."""
    src = tmp_path / "src"
    make_tree(src, {"train/happy": 3, "train/sad": 3, "val/happy": 1, "val/sad": 1, "test/sad": 1})
    (src / "test/sad/colour.png").write_bytes(png(mode="RGB", size=64))
    manifest = prepare(str(src), str(tmp_path / "shards"))
    assert manifest["splits"]["test"]["total"] == 2
    assert manifest["image"]["channels"] == 1 and manifest["image"]["max_side"] == 12


def test_prepare_class_folders_and_rerun_overwrites(ray_cluster, tmp_path) -> None:
    src = tmp_path / "src"
    make_tree(src, {"cat": 10, "dog": 10})
    (src / "cover.png").write_bytes(png())  # beside the class folders: no class
    out = tmp_path / "shards"
    m1 = prepare(str(src), str(out), val_fraction=0.3, seed=1)
    assert m1["source_kind"] == "class_folders"
    assert m1["skipped"] == [{"path": str(src / "cover.png"), "reason": "not in a class folder (no label)"}]
    assert m1["splits"]["val"]["per_class"] == {"cat": 3, "dog": 3}
    m2 = prepare(str(src), str(out), val_fraction=0.5, seed=1)
    assert m2["splits"]["val"]["total"] == 10
    assert len(read_split(out, "val")) == 10 and len(read_split(out, "train")) == 10
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_prepare_fer_csv(ray_cluster, tmp_path, caplog) -> None:
    rng = np.random.default_rng(0)
    rows = []
    usages = ["Training"] * 6 + ["PublicTest"] * 3 + ["PrivateTest"] * 2
    for i, usage in enumerate(usages):
        pixels = " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))
        rows.append(f"{i % 7},{pixels},{usage}")
    rows.insert(4, "3,1 2 3,Training")  # not 48x48: skipped, rows still counted
    rows.append("3,300 " + " ".join(["0"] * 3) + ",Training")  # a pixel above 255 (row 12)
    rows.append("-1,0 0 0 0,Training")  # codes are 0-6 (row 13)
    rows.append("7,0 0 0 0,Training")  # (row 14)
    rows.append("3,0 0 caf\udce9 0,Training")  # a byte that is not UTF-8 (row 15): it stopped the job
    rows.append("3,5,Training")  # a row cut short (row 16): it was a 1x1 image of its class
    rows.append("3,0 0 0 0,Validation")  # no such Usage (row 17): listed, no longer in the log only
    path = tmp_path / "fer2013.csv"
    path.write_bytes(("emotion,pixels,Usage\n" + "\n".join(rows) + "\n").encode("utf-8", "surrogateescape"))
    out = tmp_path / "shards"
    with caplog.at_level("WARNING", logger="fer_ray.prepare"):
        manifest = prepare(str(path), str(out))
    # (codes 0-5 have a Training row each: the CSV's code 6 has none, which is said)
    assert f"Class(es) {FER_CSV_CODES[6]} have no training row in {path}: a model trained on these" in caplog.text

    assert manifest["classes"] == list(FER_CLASSES)
    assert {k: v["total"] for k, v in manifest["splits"].items()} == {"train": 6, "val": 3, "test": 2}
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert skipped.pop("csv:4") == "bad CSV row: 3 pixels, not the FER2013 CSV's 48x48 (2304)"
    assert skipped.pop("csv:16") == "bad CSV row: 1 pixels, not the FER2013 CSV's 48x48 (2304)"
    assert skipped == {
        "csv:12": "bad CSV row: pixel values must be 0-255, found 0..300",
        "csv:13": "bad CSV row: emotion code -1 is not 0-6",
        "csv:14": "bad CSV row: emotion code 7 is not 0-6",
        "csv:15": "bad CSV row: 'utf-8' codec can't decode byte 0xe9 in position 9: invalid continuation byte",
        "csv:17": "unknown Usage 'Validation' (Training, PublicTest or PrivateTest)",
    }
    train = read_split(out, "train").sort_values("path")
    # CSV code 4 is "sad" in the CSV, which is label 5 in the project's order.
    row = train[train["path"] == "csv:5"].iloc[0]
    assert FER_CLASSES[row["label"]] == FER_CSV_CODES[4]
    img = Image.open(io.BytesIO(row["image"]))
    assert img.format == "PNG" and img.size == (48, 48) and img.mode == "L"


def test_a_shuffled_csv_is_read_in_tasks_of_many_rows(ray_cluster, tmp_path, monkeypatch) -> None:
    """A CSV whose Usage changes from row to row (not grouped by split as Kaggle's is) was
    read in a Ray task per run of rows of one split: thousands of tasks of a row or two."""
    from fer_ray.prepare import csv_tasks

    usages = ["Training", "PublicTest", "Training", "Training", "PublicTest"] * 6
    rows = [f"{i % 7},{' '.join([str(i)] * 48 * 48)},{usage}" for i, usage in enumerate(usages)]
    path = tmp_path / "shuffled.csv"
    path.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")

    chunks = list_source(str(path)).csv_chunks
    assert len(chunks["train"]) == 12 and len(chunks["val"]) == 12  # runs of one split
    tasks = csv_tasks(chunks["train"], rows=5)
    assert [t.num_rows for t in tasks] == [4, 4, 4]  # chunks of 1, 2, 1, 2 rows: 6 rows a task (5 or more)
    assert [r for t in tasks for r in t.column("row").to_pylist()] == [c["row"] for c in chunks["train"]]
    assert [t.num_rows for t in csv_tasks(chunks["val"])] == [12]  # 12 rows: one task

    import fer_ray.prepare as prepare_module

    tasks_made = []
    monkeypatch.setattr(prepare_module, "csv_tasks", lambda chunks: tasks_made.append(csv_tasks(chunks)) or tasks_made[-1])
    manifest = prepare(str(path), str(tmp_path / "shards"))
    assert [len(t) for t in tasks_made] == [1, 1]  # train, val: a read task each
    assert {k: v["total"] for k, v in manifest["splits"].items()} == {"train": 18, "val": 12}
    for split, usage in (("train", "Training"), ("val", "PublicTest")):
        table = read_split(tmp_path / "shards", split)
        assert sorted(table["path"]) == sorted(f"csv:{i}" for i, u in enumerate(usages) if u == usage)
        for path_, image in zip(table["path"], table["image"]):  # each row's own pixels
            assert np.asarray(Image.open(io.BytesIO(image))).flat[0] == int(path_[4:])


def test_a_csv_split_of_bad_rows_names_its_own_rows(ray_cluster, tmp_path) -> None:
    """The message counted and quoted every skipped row of the CSV, other splits' too."""
    pixels = " ".join(["0"] * 48 * 48)
    rows = [f"3,{pixels},Training"] * 4 + ["3,1 2 3,Training"] * 3 + ["9,0 0 0 0,PublicTest"] * 2
    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"No readable images in split 'val' .*\(2 skipped, e\.g\. 'csv:7': bad CSV row: "
                                          r"emotion code 9 is not 0-6; 'csv:8'"):
        prepare(str(path), str(tmp_path / "shards"))


@pytest.mark.parametrize("header, quote, eol", [("Usage,pixels,emotion", "", "\n"),
                                                ("index,emotion,Usage,pixels", "", "\n"),
                                                ("emotion,pixels,Usage", '"', "\r\n"),
                                                ("emotion,pixels,Usage", "", "\r\r\n")])
def test_fer_csv_columns_are_read_by_their_header(ray_cluster, tmp_path, header, quote, eol) -> None:
    """The header's names were checked but the rows read as emotion,pixels,...: another
    order (or pandas' index column) skipped every row or read row numbers as labels. A CSV
    written with every value quoted was refused as having no Training rows. Rows ending
    "\r\r\n" (Python's csv module writing to a file opened without newline="" on Windows)
    each gave a skipped empty row, and every row after the first its neighbour's number."""
    rng = np.random.default_rng(1)
    columns = header.split(",")
    rows, codes = [], []
    for i, usage in enumerate(["Training"] * 5 + ["PublicTest"] * 2):
        values = {"index": str(i), "emotion": str(i % 7), "Usage": usage,
                  "pixels": " ".join(str(v) for v in rng.integers(0, 256, 48 * 48))}
        rows.append(",".join(quote + values[c] + quote for c in columns))
        codes.append(i % 7)
    path = tmp_path / "fer2013.csv"
    path.write_bytes((header + eol + eol.join(rows) + eol).encode())
    manifest = prepare(str(path), str(tmp_path / "shards"))

    assert manifest["skipped"] == []
    assert {k: v["total"] for k, v in manifest["splits"].items()} == {"train": 5, "val": 2}
    train = read_split(tmp_path / "shards", "train")
    labels = dict(zip(train["path"], train["label"]))
    assert labels == {f"csv:{i}": FER_CLASSES.index(FER_CSV_CODES[codes[i]]) for i in range(5)}
    assert {Image.open(io.BytesIO(b)).size for b in train["image"]} == {(48, 48)}


def test_a_file_that_cannot_be_read_is_skipped_with_the_reason(ray_cluster, tmp_path) -> None:
    import ray

    from fer_ray.prepare import PrepareLog, read_files_batch

    (tmp_path / "good.png").write_bytes(png())
    log_actor = ray.remote(PrepareLog).options(num_cpus=0).remote()
    batch = {"path": np.array([str(tmp_path / "good.png"), str(tmp_path / "gone.png")], dtype=object),
             "label": np.array([0, 1])}

    out = read_files_batch(batch, log_actor)

    assert out["path"].tolist() == [str(tmp_path / "good.png")] and out["label"].tolist() == [0]
    skipped = ray.get(log_actor.summary.remote())["skipped"]
    assert list(skipped) == [str(tmp_path / "gone.png")]
    assert skipped[str(tmp_path / "gone.png")].startswith("cannot read: ")  # not "empty file"


def test_a_read_task_run_again_counts_its_images_once(ray_cluster, tmp_path) -> None:
    """Ray runs a task again when its worker dies: its batches' image sizes and modes were
    counted a second time (the manifest's median side, --data-size's default, from them)."""
    import ray

    from fer_ray.prepare import PrepareLog, read_csv_chunks, read_files_batch

    for name, size, mode in (("a.png", 12, "L"), ("b.png", 12, "L"), ("c.png", 40, "RGB")):
        (tmp_path / name).write_bytes(png(size=size, mode=mode))
    log_actor = ray.remote(PrepareLog).options(num_cpus=0).remote()
    first = {"path": np.array([str(tmp_path / "a.png"), str(tmp_path / "b.png")], dtype=object),
             "label": np.array([0, 1])}
    second = {"path": np.array([str(tmp_path / "c.png")], dtype=object), "label": np.array([0])}
    read_files_batch(first, log_actor)
    read_files_batch(second, log_actor)
    read_files_batch(first, log_actor)  # run again

    stats = ray.get(log_actor.summary.remote())
    assert stats["sides"] == {12: 2, 40: 1} and stats["modes"] == {"L": 2, "RGB": 1}

    csv = tmp_path / "fer.csv"
    row = "3," + " ".join(["7"] * 48 * 48) + ",Training\n"
    csv.write_text("emotion,pixels,Usage\n" + row * 2)
    start = len("emotion,pixels,Usage\n")
    chunk = {"start": np.array([start]), "nbytes": np.array([2 * len(row)]), "row": np.array([0])}
    csv_log = ray.remote(PrepareLog).options(num_cpus=0).remote()
    assert len(read_csv_chunks(chunk, str(csv), csv_log)["path"]) == 2
    read_csv_chunks(chunk, str(csv), csv_log)  # run again
    assert ray.get(csv_log.summary.remote())["sides"] == {48: 2}


def test_prepare_refuses_unsafe_outputs(ray_cluster, tmp_path) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a": 2, "b": 2})
    with pytest.raises(ConfigError, match="inside --source"):
        prepare(str(src), str(src / "shards"))
    (tmp_path / "link").symlink_to(src)  # the same folder through a link: inside it too
    with pytest.raises(ConfigError, match="inside --source"):
        prepare(str(tmp_path / "link"), str(src / "shards"))
    assert not (src / "shards").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a shards folder"):
        prepare(str(src), str(other))
    assert (other / "keep.txt").read_text() == "mine"
    # Another tool's manifest.json does not make a folder shards (its train/ was replaced).
    (other / "manifest.json").write_text('{"version": 1}')
    make_tree(other, {"train/a": 1})
    with pytest.raises(ConfigError, match="not a shards folder"):
        prepare(str(src), str(other))
    assert (other / "train/a/img_0.png").exists() and (other / "manifest.json").read_text() == '{"version": 1}'


def test_a_folder_that_cannot_be_listed_is_in_the_manifests_skipped_files(ray_cluster, tmp_path, monkeypatch) -> None:
    """A class's subfolder without permission was named in a warning only: the manifest
    said nothing of the images left out."""
    src = tmp_path / "src"
    make_tree(src, {"a": 4, "b": 4, "b/locked": 2})
    real_scandir = os.scandir

    def scandir(path):  # (the tests run as root, whom chmod does not stop)
        if str(path) == str(src / "b" / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    manifest = prepare(str(src), str(tmp_path / "shards"), val_fraction=0.25)
    assert sum(s["total"] for s in manifest["splits"].values()) == 8
    assert {"path": str(src / "b" / "locked"), "reason": "a folder that could not be listed (Permission denied); "
            "its files were left out"} in manifest["skipped"]


def test_a_run_stopped_while_publishing_is_replaced_by_the_rerun(ray_cluster, tmp_path, caplog) -> None:
    """Stopped between removing the old manifest and writing the new one, prepare left split
    folders of Parquet files and no manifest; the rerun it asked for was refused ("not a
    shards folder"). A folder of images in split folders is still never replaced. A run
    killed while writing leaves its hidden staging folder: the rerun names it."""
    src = tmp_path / "src"
    make_tree(src, {"a": 4, "b": 4})
    out = tmp_path / "shards"
    prepare(str(src), str(out), val_fraction=0.5)
    (out / "manifest.json").unlink()  # as _publish leaves it when stopped there
    (out / "manifest.json.tmp").write_text("{")  # stopped before the new one's move (storage.write_bytes)
    (out / ".staging-0badf00d" / "train").mkdir(parents=True)  # as a killed run leaves it
    with caplog.at_level("WARNING", logger="fer_ray.prepare"):
        manifest = prepare(str(src), str(out), val_fraction=0.5)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert f"{out / '.staging-0badf00d'} is left from an interrupted run" in caplog.text

    images = tmp_path / "images"
    make_tree(images, {"train/a": 1, "val/a": 1})
    with pytest.raises(ConfigError, match="not a shards folder"):
        prepare(str(src), str(images))
    assert (images / "train/a/img_0.png").exists()


def test_a_run_stopped_while_writing_leaves_no_staging_folder_a_late_write_task_made(ray_cluster, tmp_path,
                                                                                     monkeypatch) -> None:
    """Ctrl-C while Ray Data wrote: a write task still running put its Parquet file down
    ~0.1 s after the run deleted its staging folder, which then stayed behind (against "the
    output is a complete shards folder or none")."""
    import threading

    import ray.data

    src = tmp_path / "src"
    make_tree(src, {"a": 4, "b": 4})
    out = tmp_path / "new" / "shards"

    def stopped_while_writing(self, path, **kwargs):
        def late_task():  # (a write task finishing after the driver gave up)
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "late.parquet").write_bytes(b"PAR1")

        threading.Timer(0.3, late_task).start()
        raise KeyboardInterrupt

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", stopped_while_writing)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), str(out), val_fraction=0.5)
    time.sleep(0.5)
    assert not (tmp_path / "new").exists()


def test_a_split_of_only_unreadable_files_is_named_with_examples(ray_cluster, tmp_path) -> None:
    """The error pointed to "the skipped files in the log", which held none of them, and an
    unreadable test/ stopped the run while an empty one was only left out."""
    src = tmp_path / "src"
    make_tree(src, {"train/a": 2, "train/b": 2, "val/a": 1, "test/a": 0})
    (src / "test/a/photo.heic").write_bytes(b"ftypheic...")
    manifest = prepare(str(src), str(tmp_path / "shards"))
    assert sorted(manifest["splits"]) == ["train", "val"]
    assert not (tmp_path / "shards" / "test").exists()
    assert [s["reason"] for s in manifest["skipped"]] == ["not an image file"]

    for f in (src / "val/a").iterdir():
        f.write_text("not an image")
    with pytest.raises(ConfigError, match=r"No readable images in split 'val' .*\(1 skipped, e\.g\. "
                                          r"'.*img_0\.png': not an image file\); nothing was written"):
        prepare(str(src), str(tmp_path / "new" / "shards2"))
    assert not (tmp_path / "new").exists()  # the folders the run made for its staging too

    # A class whose every training file is unreadable: refused as an empty class folder is
    # (it was written with 0 images, and training then had a class it could never learn).
    make_tree(src, {"val/a": 1})
    for f in (src / "train/b").iterdir():
        f.write_text("not an image")
    with pytest.raises(ConfigError, match=r"Class\(es\) b of .* have no readable training image \(every file "
                                          r"skipped, e\.g\. '.*img_0\.png': not an image file; .*\); nothing was written"):
        prepare(str(src), str(tmp_path / "new" / "shards3"))
    assert not (tmp_path / "new").exists()


def test_folders_that_are_not_classes_are_named(tmp_path) -> None:
    make_tree(tmp_path / "src", {"happy": 2, "sad": 2, "Happy": 1})
    with pytest.raises(ConfigError, match="differ only in letter case or accent encoding \\(Happy and happy\\); merge each pair"):
        list_source(str(tmp_path / "src"))
    (tmp_path / "src" / "Happy" / "img_0.png").unlink()
    (tmp_path / "src" / "Happy").rmdir()
    (tmp_path / "src" / "__MACOSX" / "happy").mkdir(parents=True)  # an archiver's, not a class
    assert list_source(str(tmp_path / "src"), val_fraction=0.5).classes == ["happy", "sad"]
    (tmp_path / "src" / "manifest.json").write_text(json.dumps({"classes": ["happy", "sad"], "splits": {}}))
    with pytest.raises(ConfigError, match="is a shards folder jobs/prepare.py wrote; train on it as it is"):
        list_source(str(tmp_path / "src"))


def test_a_file_reached_twice_through_symbolic_links_is_listed_once(tmp_path, caplog) -> None:
    """The listing follows symbolic links: a link inside happy/ to sad/ listed sad's images
    as happy too (one file, two labels), and val/ linking to train/'s images validated on
    training images. One file in two classes is refused; a second copy elsewhere is left out."""
    import logging

    src = tmp_path / "src"
    make_tree(src, {"happy": 4, "sad": 4})
    (src / "happy" / "more").symlink_to(src / "sad")
    with pytest.raises(ConfigError, match=r"are one file \(through a symbolic link\) in two classes, happy and "
                                          r"sad; give each image one class"):
        list_source(str(src))
    (src / "happy" / "more").unlink()
    (src / "happy" / "again").symlink_to(src / "happy")  # a link to the folder above is not followed
    (src / "happy" / "copy.png").symlink_to(src / "happy" / "img_0.png")
    # A hard link is two files to the user (a DVC or git-annex cache links identical images).
    os.link(src / "happy" / "img_1.png", src / "sad" / "same_bytes.png")
    with caplog.at_level(logging.WARNING):
        listing = list_source(str(src), val_fraction=0.25)
    assert sum(len(v) for v in listing.items.values()) == 9  # img_0.png once, in one split
    assert "1 file(s) of train are listed twice through symbolic links; each is used once" in caplog.text

    split = tmp_path / "split"
    make_tree(split, {"train/happy": 4, "train/sad": 4, "val/sad": 2})
    (split / "val" / "happy").mkdir()
    for i in range(2):
        (split / "val" / "happy" / f"link_{i}.png").symlink_to(split / "train" / "happy" / f"img_{i}.png")
    (split / "val" / "happy" / "own.png").write_bytes(png(7))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        listing = list_source(str(split))
    assert {k: len(v) for k, v in listing.items.items()} == {"train": 8, "val": 3}
    assert "2 file(s) of val are train images too (symbolic links); left out of val" in caplog.text

    # Every val image a link to a training one: the folder was said to hold no images.
    (split / "val" / "happy" / "own.png").unlink()
    shutil.rmtree(split / "val" / "sad")
    with pytest.raises(ConfigError, match=r"Every image in the val folder 'val' of .* is a training image too "
                                          r"\(through symbolic links\); give it images of its own"):
        list_source(str(split))
    (split / "test").symlink_to(split / "train")
    (split / "val" / "happy" / "own.png").write_bytes(png(7))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        listing = list_source(str(split))
    assert sorted(listing.items) == ["train", "val"]
    assert "Every image in the test folder 'test' of" in caplog.text and "holds no images" not in caplog.text


def test_an_image_above_pillows_bomb_limit_is_kept_as_scoring_reads_it(monkeypatch) -> None:
    """Pillow refuses images above ~179 Mpx (DecompressionBombError): prepare skipped them
    as "corrupt image" while jobs/predict.py scored the same file."""
    from fer_ray.prepare import check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # a 12x12 image is then a "bomb"
    assert check_image(png(200, size=12)) == (None, (12, 12, "L"))
    monkeypatch.setattr("fer_ray.transforms.decode_image", lambda data, channels: 1 / 0)
    reason, _ = check_image(png(200, size=12))
    assert reason.startswith("image too large to decode (")


def test_class_folders_of_a_split_match_trains_in_any_letter_case(tmp_path) -> None:
    """val/happy beside train/Happy was refused as a class train/ lacks; scoring matches
    class folders in any case, and so does preparing now."""
    make_tree(tmp_path, {"train/Happy": 3, "train/Sad": 2, "val/happy": 2, "val/SAD": 1})
    listing = list_source(str(tmp_path))
    assert listing.classes == ["Happy", "Sad"]
    assert sorted(lab for _, lab in listing.items["val"]) == [0, 0, 1]
    assert {Path(p).parent.name for p, _ in listing.items["val"]} == {"happy", "SAD"}


def test_identical_images_linked_into_a_content_store_stay_separate_files(tmp_path) -> None:
    """git-annex (DataLad) and DVC link each image of a working tree into their store, and
    identical images to one file there: two such images in two classes stopped preparing
    ("one file in two classes"), and in one class or across splits one was dropped."""
    store = tmp_path / "ds" / ".git" / "annex" / "objects" / "Xx" / "Yy"
    store.mkdir(parents=True)
    (store / "SHA256E-s100--abc.png").write_bytes(png(9))
    make_tree(tmp_path / "ds", {"train/happy": 2, "train/sad": 2, "val/happy": 1})
    for rel in ("train/happy/dup_a.png", "train/happy/dup_b.png", "train/sad/dup.png", "val/happy/dup.png"):
        (tmp_path / "ds" / rel).symlink_to(store / "SHA256E-s100--abc.png")
    listing = list_source(str(tmp_path / "ds"))
    assert {k: len(v) for k, v in listing.items.items()} == {"train": 7, "val": 2}


def test_files_not_named_as_images_stay_in_train_when_val_is_carved(tmp_path) -> None:
    """desktop.ini beside a class's only image counted in the carve: the image went to val,
    and prepare refused the class as having no readable training image."""
    make_tree(tmp_path / "src", {"a": 4, "b": 1})
    (tmp_path / "src" / "b" / "desktop.ini").write_text("[.ShellClassInfo]")
    for seed in range(4):
        listing = list_source(str(tmp_path / "src"), val_fraction=0.5, seed=seed)
        train = {Path(p).name for p, label in listing.items["train"] if label == 1}
        assert train == {"desktop.ini", *[n.name for n in (tmp_path / "src" / "b").glob("*.png")]}, seed
        assert len(listing.items["val"]) == 2 and all(label == 0 for _, label in listing.items["val"])


def test_nas_thumbnail_folders_are_not_images_of_a_class(tmp_path) -> None:
    """Synology's @eaDir/<image>/SYNOPHOTO_THUMB_S.jpg inside each class folder: read as
    more images of the class, a val image's thumbnail landed in train."""
    make_tree(tmp_path / "src", {"a": 4, "b": 4})
    for cls in ("a", "b"):
        for image in (tmp_path / "src" / cls).glob("*.png"):
            (tmp_path / "src" / cls / "@eaDir" / image.name).mkdir(parents=True)
            (tmp_path / "src" / cls / "@eaDir" / image.name / "SYNOPHOTO_THUMB_S.jpg").write_bytes(png())
    listing = list_source(str(tmp_path / "src"), val_fraction=0.25, seed=0)
    paths = [p for split in listing.items.values() for p, _ in split]
    assert len(paths) == 8 and not [p for p in paths if "@eaDir" in p]


def test_loose_images_of_a_test_folder_without_classes_are_listed_as_skipped(tmp_path) -> None:
    make_tree(tmp_path / "src", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1})
    (tmp_path / "src" / "test").mkdir()
    (tmp_path / "src" / "test" / "t1.png").write_bytes(png())
    listing = list_source(str(tmp_path / "src"))
    assert "test" not in listing.items and not listing.unclassed  # (not "beside the class folders")
    assert listing.rejected == [(str(tmp_path / "src" / "test" / "t1.png"),
                                 "in a test folder with no class folders (the test split left out)")]


def test_a_source_that_cannot_be_read_is_one_sentence(tmp_path, monkeypatch) -> None:
    """(Permissions do not stop root, who runs the tests here: the listing is made to fail.)"""
    from fer_ray import storage

    make_tree(tmp_path / "src", {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1})
    list_dir = storage.list_dir

    def no_permission(path, hidden=False):
        if path.endswith("val"):
            raise PermissionError(f"Cannot list directory '{path}'. Detail: [errno 13] Permission denied")
        return list_dir(path, hidden)

    monkeypatch.setattr(storage, "list_dir", no_permission)
    with pytest.raises(ConfigError, match=r"^Source '.*src' cannot be read: Cannot list directory '.*src/val'\. "
                                          r"Detail: \[errno 13\] Permission denied; check its permissions\.$"):
        list_source(str(tmp_path / "src"))


def test_class_order_is_the_same_for_composed_and_decomposed_accents() -> None:
    import unicodedata

    names = ["émotion", "fear", "zeal"]
    orders = [[unicodedata.normalize("NFC", n) for n in class_order([unicodedata.normalize(form, n) for n in names])]
              for form in ("NFC", "NFD")]
    assert orders[0] == orders[1] == ["fear", "zeal", "émotion"]  # (NFD's "e" + accent sorted first)


def test_gray_images_saved_in_colour_modes_count_as_gray() -> None:
    """A gray GIF (palette), a lossless WebP (always RGB) or an RGB PNG of gray pixels made
    the whole set RGB (the manifest's channels, the model's default input channels)."""
    from fer_ray.prepare import GRAY_MODES, check_image

    gray = Image.fromarray((np.arange(16 * 12).reshape(12, 16) % 256).astype(np.uint8), "L")
    colour = gray.convert("RGB")
    colour.putpixel((15, 11), (200, 10, 10))  # one pixel, not on the first look's grid

    def encoded(img, fmt, **options) -> bytes:
        out = io.BytesIO()
        img.save(out, format=fmt, **options)
        return out.getvalue()

    for img, fmt, options in ((gray, "GIF", {}), (gray.convert("RGB"), "WEBP", {"lossless": True}),
                              (gray.convert("RGB"), "PNG", {}), (gray.convert("RGBA"), "PNG", {})):
        reason, (width, height, mode) = check_image(encoded(img, fmt, **options))
        assert reason is None and (width, height) == (16, 12) and mode in GRAY_MODES, (fmt, mode)
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {})):
        assert check_image(encoded(colour, fmt, **options))[1][2] not in GRAY_MODES, fmt
