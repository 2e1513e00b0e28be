"""Turn image folders or the FER2013 CSV into Parquet shards with a manifest.

Three source kinds:
- split folders: SRC/{train|training,val|valid|validation,test}/<class>/... ;
- class folders: SRC/<class>/..., split into train/val by a stratified, seeded fraction;
- the FER2013 CSV (emotion,pixels,Usage).

The listing (paths and labels, never image bytes) is made on the driver; reading,
checking and writing the images is a streaming Ray Data pipeline per split, so no
process holds the dataset. Files that are empty, corrupt or not images are skipped and
listed in the manifest with the reason, and so are image files beside the class folders
(no class, no label).
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from fer_ray import storage
from fer_ray.config import ConfigError, require_paths
from fer_ray.constants import (
    FER_CLASSES,
    FER_CSV_CODES,
    FER_CSV_USAGE,
    IMAGE_COL,
    LABEL_COL,
    MANIFEST_FILE,
    PATH_COL,
    SPLIT_ALIASES,
    SPLITS,
    TEST,
    TRAIN,
    VAL,
    class_key,
)

log = logging.getLogger(__name__)

CSV_COLUMNS = ("emotion", "pixels", "Usage")
CSV_SIDE = 48  # a FER2013 CSV row: 48x48 grayscale pixels
CSV_ROWS_PER_TASK = 2000
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass
class Listing:
    """What a source holds: classes in label order and (path, label) per split."""

    kind: str
    classes: list[str]
    items: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    csv_chunks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    csv_columns: dict[str, int] = field(default_factory=dict)  # a CSV's column -> its index
    val_fraction: float | None = None  # the share of train carved out as val; None: val given
    # Image files beside the class folders (in train/, say): no class, so no label. Left
    # out, and listed with the skipped files.
    unclassed: list[str] = field(default_factory=list)
    # Folders inside the class folders that could not be listed (no permission): their
    # files are left out, and the folders listed with the skipped files with the reason.
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    # Entries left out as the listing found them, with the reason: a CSV's rows of no known
    # Usage (a misspelt one, or a line cut short before it). Listed with the skipped files.
    rejected: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Listing (driver side, no image bytes)
# --------------------------------------------------------------------------------------


def class_order(names: list[str]) -> list[str]:
    """The FER classes keep their canonical order; any other set is sorted."""
    if {n.lower() for n in names} == set(FER_CLASSES) and len(names) == len(FER_CLASSES):
        by_lower = {n.lower(): n for n in names}
        return [by_lower[c] for c in FER_CLASSES]
    # (by class_key: a name's accents written composed or decomposed, as a zip from macOS
    # gives them, sort alike, so the labels and the carve are the same either way)
    return sorted(names, key=lambda n: (class_key(n), n))


def stratified_split(
    labels: list[int], val_fraction: float, seed: int, images: list[bool] | None = None
) -> tuple[list[int], list[int]]:
    """Indices for train and val, the val share taken per class (at least one stays in train).
    `images`: which files are named as images; val is carved from those alone, the others
    (desktop.ini, notes.txt beside a class's images) stay in train, where reading skips
    them: counted, they sent a class's only image to val and its training split held none.
    (A class with no file named as an image is carved from all its files.)"""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    named = np.ones(len(labels), dtype=bool) if images is None else np.asarray(images, dtype=bool)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in np.unique(labels_arr):
        in_class = labels_arr == label
        carved = in_class & named if (in_class & named).any() else in_class
        idx = np.flatnonzero(carved)
        rng.shuffle(idx)
        n_val = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
        train_idx.extend(np.flatnonzero(in_class & ~carved).tolist())  # (not named as images)
    return sorted(train_idx), sorted(val_idx)


def _carve_val(
    items: list[tuple[str, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, val) of listed (path, label) items: val carved per class from the files
    named as images (stratified_split; a URI's ?options are not part of the name)."""
    from fer_ray.transforms import has_image_name

    tr, va = stratified_split([lab for _, lab in items], val_fraction, seed,
                              [has_image_name(storage.without_options(p)) for p, _ in items])
    return [items[i] for i in tr], [items[i] for i in va]


# Folders that archivers add beside the content (macOS's zip resource forks): never a class.
NOT_CLASSES = ("__MACOSX",)


def _class_dirs(folder: str) -> list[str]:
    names = [e.base_name for e in storage.list_dir(folder)
             if e.type.name == "Directory" and e.base_name not in NOT_CLASSES]
    by_case = defaultdict(list)
    for name in names:
        by_case[class_key(name)].append(name)
    twins = [" and ".join(sorted(group)) for group in by_case.values() if len(group) > 1]
    if twins:  # two classes to training, one to scoring (which matches names in any case)
        raise ConfigError(
            f"{folder!r} has class folders whose names differ only in letter case or accent encoding ({'; '.join(twins)}); "
            "merge each pair into one folder."
        )
    return names


def _holds_a_train_folder(folder: str) -> bool:
    try:
        entries = storage.list_dir(folder)
    except OSError:  # (no permission: its listing says so, in one sentence)
        return False
    return any(e.type.name == "Directory" and SPLIT_ALIASES.get(e.base_name.lower()) == TRAIN for e in entries)


def _loose_images(folder: str) -> list[str]:
    """Image files (by their name, as scoring tells them; not hidden) directly in a folder
    of class folders or of split folders."""
    from fer_ray.transforms import has_image_name

    return [storage.child(folder, e.base_name) for e in storage.list_dir(folder)
            if e.type.name == "File" and has_image_name(e.base_name)]


UNCLASSED = "not in a class folder (no label)"


def _holds_files(folder: str) -> bool:
    """Whether a folder holds files (not hidden) directly."""
    return any(e.type.name == "File" for e in storage.list_dir(folder))


def _files_by_class(folder: str, classes: list[str],
                    unlisted: list[tuple[str, str]] | None = None) -> list[tuple[str, int]]:
    items = []
    for label, name in enumerate(classes):
        class_dir = storage.child(folder, name)
        if storage.is_dir(class_dir):
            fs, _ = storage.resolve(class_dir)
            items.extend((storage.full_path(fs, p, class_dir), label)
                         for p in storage.list_files(class_dir, unlisted=unlisted))
    return items


def _each_file_once(source: str, items: dict[str, list[tuple[str, int]]], classes: list[str]) -> dict[str, list[tuple[str, int]]]:
    """`items` (per split) with every file once: symbolic links (to a file, or a folder
    followed by the listing) can list one file under two names. One file in two classes is
    a ConfigError (its label is both); a later copy in the same class or another split is
    left out with a warning (a val or test image that is a training image overstates its
    accuracy). Local folders only: buckets have no links."""
    if storage.local_path(source) is None:
        return items
    first: dict[tuple[int, int], str] = {}  # (device, inode): the path listed first
    where: dict[str, tuple[str, int]] = {}  # that path: its split and label
    out, again = {}, Counter()
    for split in sorted(items, key=SPLITS.index):  # train first: its copy is the one kept
        out[split] = []
        for path, label in items[split]:
            path0 = storage.same_file_as(path, first)
            if path0 is None:
                where[path] = (split, label)
                out[split].append((path, label))
                continue
            split0, label0 = where[path0]
            if label0 != label:
                raise ConfigError(
                    f"{path!r} and {path0!r} are one file (through a symbolic link) in two classes, "
                    f"{classes[label0]} and {classes[label]}; give each image one class."
                )
            again[(split0, split)] += 1
    for (split0, split), n in sorted(again.items()):
        if split0 == split:
            log.warning("%d file(s) of %s are listed twice through symbolic links; each is used once", n, split)
        else:
            log.warning("%d file(s) of %s are %s images too (symbolic links); left out of %s, where they "
                        "would overstate its accuracy", n, split, split0, split)
    return out


def list_source(source: str, val_fraction: float = 0.1, seed: int = 0) -> Listing:
    """Inspect SRC and list its images per split; raise ConfigError on unusable input (a
    source or split folder this process may not read, too: it was a traceback)."""
    try:
        return _list_source(source, val_fraction, seed)
    except PermissionError as e:
        raise ConfigError(f"Source {source!r} cannot be read: {e}; check its permissions.") from None


def _list_source(source: str, val_fraction: float, seed: int) -> Listing:
    if not storage.exists(source):
        raise ConfigError(f"Source {source!r} does not exist; give a folder of images or the FER2013 CSV.")
    if storage.is_file(source):
        if not storage.without_options(source).lower().endswith(".csv"):
            raise ConfigError(
                f"Source {source!r} is a file but not a .csv; give a folder of class folders or the FER2013 CSV."
            )
        return _list_csv(source)

    if is_shards(source):
        raise ConfigError(
            f"Source {source!r} is a shards folder jobs/prepare.py wrote; train on it as it is "
            "(--data), or give the image folder it was made from."
        )
    subdirs = _class_dirs(source)
    if not subdirs:
        raise ConfigError(
            f"Source {source!r} has no class folders; put each class's images in a folder named after the class."
        )
    named = defaultdict(list)  # split -> its folders (val/ and validation/ are both val)
    for d in subdirs:
        if d.lower() in SPLIT_ALIASES:
            named[SPLIT_ALIASES[d.lower()]].append(d)
    for split, dirs in named.items():
        if len(dirs) > 1:
            raise ConfigError(
                f"Source {source!r} has {' and '.join(sorted(dirs))} folders, each the {split} split; "
                "keep one (merge their class folders)."
            )
    split_dirs = {split: dirs[0] for split, dirs in named.items()}
    if split_dirs:
        return _list_split_folders(source, subdirs, split_dirs, val_fraction, seed)
    return _list_class_folders(source, subdirs, val_fraction, seed)


def _list_split_folders(
    source: str, subdirs: list[str], split_dirs: dict[str, str], val_fraction: float, seed: int
) -> Listing:
    others = sorted(set(subdirs) - set(split_dirs.values()))
    if others:
        raise ConfigError(
            f"Source {source!r} mixes split folders ({', '.join(sorted(split_dirs.values()))}) "
            f"with other folders ({', '.join(others)}); keep only the split folders (train/, val/, test/, "
            "or training/, valid/, validation/) at the top level."
        )
    if TRAIN not in split_dirs:
        raise ConfigError(f"Source {source!r} has split folders but no train/ folder; add one.")
    train_dir = storage.child(source, split_dirs[TRAIN])
    classes = class_order(_class_dirs(train_dir))
    if not classes:
        raise ConfigError(f"{train_dir!r} has no class folders; put each class's images in a folder named after the class.")
    listing = Listing(kind="split_folders", classes=classes)
    known = {class_key(c) for c in classes}
    for split, dirname in split_dirs.items():
        folder = storage.child(source, dirname)
        # Matched to train's class folders in any letter case, as scoring matches them.
        here = {class_key(name): name for name in _class_dirs(folder)}
        if not here and split != TRAIN and _holds_files(folder):
            if split == TEST:
                log.warning("The test folder %r of %s holds files but no class folders (one per class, as "
                            "in %s/); leaving the test split out", dirname, source, split_dirs[TRAIN])
                listing.rejected += [(p, "in a test folder with no class folders (the test split left out)")
                                     for p in _loose_images(folder)]  # (in the manifest's skipped files)
                continue
            raise ConfigError(
                f"The {split} folder {dirname!r} of {source!r} holds files but no class folders; put "
                f"each image in the folder of its class, as in {split_dirs[TRAIN]}/."
            )
        extra = sorted(name for key, name in here.items() if key not in known)
        if extra:
            raise ConfigError(
                f"Split {dirname!r} has classes that {split_dirs[TRAIN]}/ lacks ({', '.join(extra)}); "
                f"add them to {split_dirs[TRAIN]}/ or remove them."
            )
        listing.items[split] = _files_by_class(folder, [here.get(class_key(c), c) for c in classes], listing.unlisted)
        listing.unclassed += _loose_images(folder)
    listing.unclassed += _loose_images(source)  # (beside the split folders)
    listed = {split: len(items) for split, items in listing.items.items()}
    listing.items = _each_file_once(source, listing.items, classes)
    for split in (VAL, TEST):
        if listed.get(split) and not listing.items[split]:
            # (else read as an empty folder: "holds no images", beside the warning above)
            what = (f"Every image in the {split} folder {split_dirs[split]!r} of {source!r} is a "
                    f"training image too (through symbolic links)")
            if split == VAL:
                raise ConfigError(f"{what}; give it images of its own, or remove it to carve val from train.")
            log.warning("%s; leaving the test split out", what)
            del listing.items[split]
    if VAL not in split_dirs:
        # No val folder: carve a stratified val split out of train.
        listing.items[TRAIN], listing.items[VAL] = _carve_val(listing.items[TRAIN], val_fraction, seed)
        listing.val_fraction = val_fraction
    _check_not_empty(listing, source, None if VAL in split_dirs else val_fraction, split_dirs)
    return listing


def _list_class_folders(source: str, subdirs: list[str], val_fraction: float, seed: int) -> Listing:
    # A folder one level too high, holding datasets of split folders (or classes split inside
    # them): each became a class, its train/ and val/ (or test/) images pooled and carved again.
    split_inside = [d for d in subdirs if _holds_a_train_folder(storage.child(source, d))]
    if len(split_inside) == 1:
        raise ConfigError(
            f"Source {source!r} holds a dataset, not class folders: {split_inside[0]} holds a train/ "
            "folder; give that folder as --source."
        )
    if split_inside:
        raise ConfigError(
            f"The folders {', '.join(split_inside)} of {source!r} each hold a train/ folder: give one of "
            "them as --source if each is a dataset; if they are classes split inside, arrange them as "
            "train/<class>/ and val/<class>/."
        )
    classes = class_order(subdirs)
    unlisted: list[tuple[str, str]] = []
    items = _each_file_once(source, {TRAIN: _files_by_class(source, classes, unlisted)}, classes)[TRAIN]
    train, val = _carve_val(items, val_fraction, seed)
    listing = Listing(
        kind="class_folders",
        classes=classes,
        items={TRAIN: train, VAL: val},
        val_fraction=val_fraction,
        unclassed=_loose_images(source),
        unlisted=unlisted,
    )
    _check_not_empty(listing, source, val_fraction)
    return listing


def _check_not_empty(
    listing: Listing, source: str, val_fraction: float | None, split_dirs: dict[str, str] | None = None
) -> None:
    """Every class in train, and files in val (carved from train at `val_fraction`, or its
    own folder); an empty test folder is left out with a warning."""
    if not listing.items.get(TRAIN):
        raise ConfigError(f"Source {source!r} holds no files in its class folders; add images.")
    if len(listing.classes) < 2:
        # A folder one level too high (SOURCE/fer2013/train/...) reads as one class.
        raise ConfigError(
            f"Source {source!r} has one class folder ({listing.classes[0]}); a classifier needs at "
            "least two: give the folder whose subfolders are the classes (or train/ and val/)."
        )
    counts = Counter(lab for _, lab in listing.items[TRAIN])
    empty = [c for i, c in enumerate(listing.classes) if counts[i] == 0]
    if empty:
        raise ConfigError(
            f"Class folder(s) {', '.join(empty)} hold no training files in {source!r}; "
            "add images or remove the folder."
        )
    if not listing.items.get(VAL):
        if val_fraction is not None:
            raise ConfigError(
                f"--val-fraction {val_fraction} leaves no val images (a class keeps at least one "
                f"training image and rounds its share down to none); raise it or add a val/ folder."
            )
        raise ConfigError(
            f"The val folder {(split_dirs or {}).get(VAL, VAL)!r} of {source!r} holds no images; "
            "add images, or remove it to carve val from train."
        )
    if TEST in listing.items and not listing.items[TEST]:
        log.warning("The test folder %r of %s holds no images; leaving the test split out",
                    (split_dirs or {}).get(TEST, TEST), source)
        del listing.items[TEST]


def _listed_in(listing: Listing, split: str) -> Any:
    """Whether a file (or a CSV row, csv:<row>) is one of `split`'s: a test of paths."""
    if listing.kind == "csv":
        ranges = [(c["row"], c["row"] + c["rows"]) for c in listing.csv_chunks.get(split, [])]
        return lambda path: any(lo <= int(path.split(":", 1)[1]) < hi for lo, hi in ranges)
    return {p for p, _ in listing.items.get(split, [])}.__contains__


def _iter_lines(stream: Any, chunk: int = 1 << 23) -> Any:
    """Lines of a pyarrow stream, each with its newline (so offsets add up)."""
    rest = b""
    while data := stream.read(chunk):
        *lines, rest = (rest + data).split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _list_csv(source: str) -> Listing:
    """Find row ranges per split by scanning lines (csv_tasks groups them into read tasks)."""
    fs, inner = storage.resolve(source)
    chunks: dict[str, list[dict[str, Any]]] = {}
    with fs.open_input_stream(inner) as f:
        lines = _iter_lines(f)
        first = next(lines, b"")
        # (utf-8-sig: a CSV saved by Excel, or by pandas with that encoding, begins with a BOM)
        header = [c.strip().strip('"') for c in first.decode("utf-8-sig", errors="replace").strip().split(",")]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ConfigError(
                f"CSV {source!r} lacks the column(s) {', '.join(missing)}; the FER2013 CSV has "
                "the header emotion,pixels,Usage."
            )
        usage_col = header.index("Usage")
        row, offset = 0, len(first)
        current: dict[str, Any] | None = None
        rejected: list[tuple[str, str]] = []
        for line in lines:
            if not line.strip():  # (a blank line, at the end say: no row, said as none)
                current, offset, row = None, offset + len(line), row + 1
                continue
            parts = line.rstrip(b"\r\n").split(b",")
            usage = parts[usage_col].decode(errors="replace").strip().strip('"') if len(parts) > usage_col else ""
            split = FER_CSV_USAGE.get(usage, "?")
            if split == "?":
                rejected.append((f"csv:{row}", f"unknown Usage {usage!r} (Training, PublicTest or PrivateTest)"
                                 if usage else "no Usage (the line ends before its column)"
                                 if len(parts) <= usage_col else "an empty Usage"))
            if current is None or current["split"] != split or current["rows"] >= CSV_ROWS_PER_TASK:
                current = {"split": split, "start": offset, "row": row, "rows": 0, "nbytes": 0}
                chunks.setdefault(split, []).append(current)
            current["rows"] += 1
            current["nbytes"] += len(line)
            offset += len(line)
            row += 1
    lacking = [usage for usage, split in FER_CSV_USAGE.items() if split in (TRAIN, VAL) and split not in chunks]
    if lacking:
        raise ConfigError(
            f"CSV {source!r} has no {' or '.join(lacking)} rows (its Usage column names each row's "
            "split: Training, PublicTest for val, PrivateTest for test); give the full FER2013 CSV."
        )
    unknown = chunks.pop("?", [])
    listing = Listing(kind="csv", classes=list(FER_CLASSES), csv_chunks=chunks,
                      csv_columns={c: header.index(c) for c in CSV_COLUMNS}, rejected=rejected)
    if unknown:
        log.warning("%d CSV rows have an unknown Usage and are skipped (listed in the manifest's skipped files)",
                    sum(c["rows"] for c in unknown))
    return listing


def csv_tasks(chunks: list[dict[str, Any]], rows: int = CSV_ROWS_PER_TASK) -> list[Any]:
    """A split's row ranges in tables of consecutive ranges of about `rows` rows, one read
    task each: a CSV whose Usage changes from row to row (shuffled, not grouped by split as
    Kaggle's is) has thousands of ranges of a row or two, which were a task each."""
    import pyarrow as pa

    tasks: list[pa.Table] = []
    group: list[dict[str, Any]] = []
    in_group = 0
    for i, chunk in enumerate(chunks):
        group.append(chunk)
        in_group += chunk["rows"]
        if in_group >= rows or i == len(chunks) - 1:
            tasks.append(pa.table({key: [int(c[key]) for c in group] for key in ("start", "nbytes", "row")}))
            group, in_group = [], 0
    return tasks


# --------------------------------------------------------------------------------------
# Reading and checking (Ray Data tasks)
# --------------------------------------------------------------------------------------


# Colour modes whose pixels may all be gray: a gray image saved as a GIF (palette), as a WebP
# (always RGB) or as an RGB PNG made every image of the set RGB to train on.
_MAY_BE_GRAY = {"P", "PA", "RGB", "RGBA"}


def _gray_in_colour(img: Any) -> bool:
    """Whether a decoded image of a colour mode holds gray pixels only (R = G = B; alpha
    aside). A few pixels first: a colour image is told at once, a gray one in full."""
    from PIL import Image, ImageChops

    if img.mode not in _MAY_BE_GRAY:
        return False
    try:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except Exception:  # noqa: BLE001 - (a mode Pillow cannot convert keeps its mode: not a bad file)
        return False
    # (a 0.8 Mpx colour JPEG: 0.06 ms for the look at every 7th pixel, against 4 ms for
    # all of them in numpy; a gray one: 0.8 ms in Pillow's C)
    few = np.asarray(rgb.resize((max(1, rgb.width // 7), max(1, rgb.height // 7)), Image.NEAREST))
    if not ((few[..., 0] == few[..., 1]).all() and (few[..., 1] == few[..., 2]).all()):
        return False
    r, g, b = rgb.split()
    return ImageChops.difference(r, g).getbbox() is None and ImageChops.difference(g, b).getbbox() is None


def check_image(data: bytes) -> tuple[str | None, tuple[int, int, str] | None]:
    """(reason it cannot be used, or None; (width, height, mode) when it can: "L" for an
    image of a colour mode whose pixels are all gray, _gray_in_colour)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file", None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully, so truncated files are caught here, not in training
            return None, (img.width, img.height, "L" if _gray_in_colour(img) else img.mode)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        # What training's decoder reads beyond Pillow: TIFFs of float RGB samples, and images
        # above Pillow's decompression-bomb limit (~179 Mpx), which scoring reads too.
        try:
            from fer_ray.transforms import decode_image

            img = decode_image(data, 3)
            gray = bool((img == img[:, :, :1]).all())  # a gray TIFF must not make the set colour
            return None, (img.shape[1], img.shape[0], "L" if gray else "RGB")
        except Exception:  # noqa: BLE001 - neither decoder reads it
            if isinstance(e, Image.DecompressionBombError):
                return f"image too large to decode ({e})", None
            from fer_ray.transforms import unread_bytes_reason

            return unread_bytes_reason(data) or "not an image file", None  # (the name is not here)
    except Exception as e:  # noqa: BLE001 - any decoder failure means a corrupt file
        return f"corrupt image: {type(e).__name__}: {e}", None


class PrepareLog:
    """Collects skipped files and image statistics from the read tasks (a Ray actor).

    Statistics are held per batch, by the batch's first file: a read task that Ray runs
    again (its worker died) records its batches again, in place of the first time's, so
    no image counts twice in the sizes and modes the manifest gives (--data-size's default
    is their median). The skipped files are by path already."""

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        self.batches: dict[str, tuple[Counter[int], Counter[str]]] = {}

    def record(self, skipped: dict[str, str], sides: list[int], modes: list[str], batch: str | None = None) -> None:
        self.skipped.update(skipped)
        if batch is not None:
            self.batches[batch] = (Counter(sides), Counter(modes))

    def summary(self) -> dict[str, Any]:
        sides: Counter[int] = Counter()
        modes: Counter[str] = Counter()
        for batch_sides, batch_modes in self.batches.values():
            sides.update(batch_sides)
            modes.update(batch_modes)
        return {"skipped": dict(self.skipped), "sides": dict(sides), "modes": dict(modes)}


def _keep_good(
    paths: list[str], labels: list[int], blobs: list[bytes], log_actor: Any, batch: str | None
) -> dict[str, np.ndarray]:
    """The rows whose bytes decode; the others recorded as skipped, and the sizes and
    modes of the good ones recorded under `batch` (the batch's first listed file)."""
    keep, skipped, sides, modes = [], {}, [], []
    for i, data in enumerate(blobs):
        reason, meta = check_image(data)
        if reason:
            skipped[paths[i]] = reason
        else:
            keep.append(i)
            sides.append(min(meta[0], meta[1]))
            modes.append(meta[2])
    # Waited for: calls from many tasks reach the actor in no set order, and the driver's
    # final summary() must come after every batch's record.
    ray.get(log_actor.record.remote(skipped, sides, modes, batch))
    return {
        IMAGE_COL: np.array([blobs[i] for i in keep], dtype=object),
        LABEL_COL: np.array([labels[i] for i in keep], dtype=np.int64),
        PATH_COL: np.array([paths[i] for i in keep], dtype=object),
    }


def read_files_batch(batch: dict[str, np.ndarray], log_actor: Any) -> dict[str, np.ndarray]:
    """Read each listed file and keep the ones that decode."""
    paths, labels, blobs, unreadable = [], [], [], {}
    for p, label in zip((str(p) for p in batch[PATH_COL]), batch[LABEL_COL].tolist()):
        try:
            blobs.append(storage.read_bytes(p))
        except (OSError, ValueError) as e:  # ValueError: a URI pyarrow cannot parse
            unreadable[p] = f"cannot read: {e}"
            continue
        paths.append(p)
        labels.append(label)
    if unreadable:
        ray.get(log_actor.record.remote(unreadable, [], []))
    return _keep_good(paths, labels, blobs, log_actor, str(batch[PATH_COL][0]) if len(batch[PATH_COL]) else None)


def pixels_to_png(pixels: str) -> bytes:
    """One FER2013 CSV row's space-separated pixels (48x48 of them) as a grayscale PNG."""
    from PIL import Image

    try:
        values = np.array(pixels.split(), dtype=np.int64)
    except ValueError:
        raise ValueError("pixels are not whole numbers") from None
    if values.size and not (0 <= values.min() and values.max() <= 255):
        raise ValueError(f"pixel values must be 0-255, found {values.min()}..{values.max()}")
    values = values.astype(np.uint8)
    # (any square was taken: a row cut short to "5" became a 1x1 image of its class)
    if values.size != CSV_SIDE * CSV_SIDE:
        raise ValueError(f"{values.size} pixels, not the FER2013 CSV's {CSV_SIDE}x{CSV_SIDE} ({CSV_SIDE * CSV_SIDE})")
    out = io.BytesIO()
    Image.fromarray(values.reshape(CSV_SIDE, CSV_SIDE), mode="L").save(out, format="PNG")
    return out.getvalue()


def read_csv_chunks(
    batch: dict[str, np.ndarray], source: str, log_actor: Any, columns: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Read byte ranges of the CSV (their first row number known) and encode rows as PNG;
    `columns` gives the emotion and pixels columns' places (the header's order)."""
    columns = columns or {c: i for i, c in enumerate(CSV_COLUMNS)}
    emotion_at, pixels_at = columns["emotion"], columns["pixels"]
    fs, inner = storage.resolve(source)
    label_of_code = [FER_CLASSES.index(name) for name in FER_CSV_CODES]
    paths, labels, blobs, skipped = [], [], [], {}
    with fs.open_input_file(inner) as f:
        for start, nbytes, first_row in zip(batch["start"], batch["nbytes"], batch["row"]):
            f.seek(int(start))
            # Lines end at "\n" alone, as _list_csv counted them (splitlines() also broke at
            # "\r": a row ending "\r\r\n" became two, numbering every later row wrong).
            lines = f.read(int(nbytes)).split(b"\n")
            if not lines[-1]:
                lines.pop()
            for k, line in enumerate(line.rstrip(b"\r") for line in lines):
                path = f"csv:{int(first_row) + k}"
                try:
                    # (a CSV may quote its values; a byte that is not UTF-8 skips its row only)
                    parts = [p.strip().strip('"') for p in line.decode().split(",")]
                    code = int(parts[emotion_at])
                    if not 0 <= code < len(label_of_code):
                        raise ValueError(f"emotion code {code} is not 0-{len(label_of_code) - 1}")
                    label, blob = label_of_code[code], pixels_to_png(parts[pixels_at])
                except (ValueError, IndexError, OverflowError) as e:  # Overflow: a pixel outside 0-255; Unicode: a ValueError
                    skipped[path] = f"bad CSV row: {e}"
                    continue
                paths.append(path)
                labels.append(label)
                blobs.append(blob)
    if skipped:
        ray.get(log_actor.record.remote(skipped, [], []))
    first = f"csv:{int(batch['row'][0])}" if len(batch["row"]) else None
    return _keep_good(paths, labels, blobs, log_actor, first)


# --------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------


def _check_output(source: str, output: str) -> None:
    """Both normalized. Refuses an output in the source folder (a bucket's too) or one that
    holds something other than shards."""
    if storage.inside(output, source) and storage.is_dir(source):  # (a CSV source has no inside)
        where = "--source itself" if storage.inside(source, output) else "inside --source"
        raise ConfigError(f"--output {output!r} is {where}; choose a folder outside it.")
    if not storage.exists(output):
        storage.check_creatable(output, "--output")
    elif not storage.is_dir(output):
        raise ConfigError(f"--output {output!r} is a file; choose a folder.")
    else:
        entries = storage.list_dir(output)
        shards = is_shards(output) or _half_published(output, entries)
        if entries and not shards:
            raise ConfigError(
                f"--output {output!r} is a non-empty folder that is not a shards folder; "
                "choose a new or empty folder (nothing was written)."
            )


def _half_published(output: str, entries: list[Any]) -> bool:
    """Whether `output`, a folder without a manifest, holds shards that a stopped run left
    while it swapped them in (_publish): only split folders of Parquet files (a folder of
    images in split folders has class folders in them), and perhaps the manifest's
    temporary file."""
    return all(
        (e.type.name == "Directory" and e.base_name in SPLITS
         and all(c.type.name == "File" and c.base_name.endswith(".parquet")
                 for c in storage.list_dir(storage.join(output, e.base_name))))
        # the manifest's temporary name (storage.write_bytes): stopped before its move
        or (e.type.name == "File" and e.base_name == MANIFEST_FILE + ".tmp")
        for e in entries
    )


def check_inputs(source: str, output: str, val_fraction: float = 0.1, seed: int = 0,
                 shard_rows: int = 5000) -> Listing:
    """Every check of prepare's arguments, without Ray: the settings, the output, and the
    source's listing (returned, for prepare to use)."""
    require_paths(source=source, output=output)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be greater than 0 and less than 1, got {val_fraction}.")
    if shard_rows < 1:
        raise ConfigError(f"--shard-rows must be at least 1, got {shard_rows}.")
    source, output = storage.normalize(source), storage.normalize(output)
    _check_output(source, output)
    return list_source(source, val_fraction=val_fraction, seed=seed)


def prepare(
    source: str,
    output: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_rows: int = 5000,
    batch_size: int = 256,
    listing: Listing | None = None,
) -> dict[str, Any]:
    """Write SHARDS/<split>/*.parquet and SHARDS/manifest.json; return the manifest.
    `listing`: what check_inputs returned for the same arguments (else it runs here)."""
    if listing is None:
        listing = check_inputs(source, output, val_fraction, seed, shard_rows)
    source, output = storage.normalize(source), storage.normalize(output)
    splits = sorted(set(listing.items) | set(listing.csv_chunks), key=SPLITS.index)
    log.info("Source %s (%s): classes %s", source, listing.kind, ", ".join(listing.classes))
    if listing.unclassed:
        log.warning("%d image file(s) lie beside the class folders, with no class, e.g. %s; left out (listed "
                    "in the manifest's skipped files)", len(listing.unclassed), listing.unclassed[0])

    start = time.time()
    # Written under a temporary folder and moved into place at the end: a half-written
    # output never looks finished, and an earlier complete output stays until then.
    staging = storage.join(output, f".staging-{uuid.uuid4().hex[:8]}")
    if storage.is_dir(output):
        for entry in storage.list_dir(output, hidden=True):
            if entry.base_name.startswith(".staging-"):
                log.warning("%s is left from an interrupted run (its unfinished shards); remove it when "
                            "no other jobs/prepare.py writes to %s", entry.path, output)
    made = storage.missing_folders(output)  # removed again if they are left empty
    log_actor = ray.remote(PrepareLog).options(num_cpus=0).remote()
    train_stats, writing = None, False  # (writing: stopped inside write_parquet, whose tasks may go on)
    try:
        for split in splits:
            if listing.kind == "csv":
                ds = ray.data.from_blocks(csv_tasks(listing.csv_chunks[split])).map_batches(
                    read_csv_chunks,
                    fn_kwargs={"source": source, "log_actor": log_actor, "columns": listing.csv_columns},
                    batch_size=None,  # a block, one task's row ranges, at a time
                    batch_format="numpy",
                )
            else:
                # Rows in a seeded random order, not class by class: a reader that streams
                # or shuffles only locally still sees every class in every batch.
                items = listing.items[split]
                order = np.random.default_rng(seed).permutation(len(items))
                rows = [{PATH_COL: items[i][0], LABEL_COL: items[i][1]} for i in order]
                if not rows:
                    continue
                ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))
                ds = ds.map_batches(
                    read_files_batch,
                    fn_kwargs={"log_actor": log_actor},
                    batch_size=batch_size,
                    batch_format="numpy",
                )
            # Streaming repartition: blocks (and so files) of at most --shard-rows rows.
            ds = ds.repartition(target_num_rows_per_block=shard_rows, strict=True)
            writing = True
            ds.write_parquet(storage.join(staging, split), max_rows_per_file=shard_rows)
            writing = False
            log.info("Wrote split %s", split)
            if split == TRAIN:  # (the first) the images training takes its defaults from
                train_stats = ray.get(log_actor.summary.remote())
        stats = ray.get(log_actor.summary.remote())
        counts = count_labels(staging, splits, listing.classes)
        for split in list(splits):
            if counts.get(split, {}).get("total"):
                continue
            listed = _listed_in(listing, split)
            skipped = [(p, r) for p, r in sorted(stats["skipped"].items()) if listed(p)]
            examples = "; ".join(f"{p!r}: {r}" for p, r in skipped[:3])
            if split == TEST:  # optional, as an empty test folder is
                log.warning("No readable images in the test split of %s (%s); leaving it out", source, examples)
                splits.remove(split)
                counts.pop(split, None)
                storage.delete_dir(storage.join(staging, split))
                continue
            raise ConfigError(
                f"No readable images in split {split!r} of {source!r} ({len(skipped)} skipped, "
                f"e.g. {examples}); nothing was written."
            )
        _check_every_class_read(counts, listing, stats["skipped"], source)
        manifest = {
            "classes": listing.classes,
            "source": source,
            "source_kind": listing.kind,
            "splits": counts,
            # Sizes and channels of the training images (the defaults of --data-size and
            # the model's input channels): one colour image in test/ made every image RGB.
            "image": _image_summary(train_stats or stats),
            "skipped": [{"path": p, "reason": r} for p, r in
                        sorted({**dict.fromkeys(listing.unclassed, UNCLASSED), **dict(listing.rejected),
                                **stats["skipped"],
                                **{folder: f"a folder that could not be listed ({why}); its files were left out"
                                   for folder, why in listing.unlisted}}.items())],
            "val_fraction": listing.val_fraction,  # None when the source had its val split
            "seed": seed,
            "shard_rows": shard_rows,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - start, 1),
        }
        _publish(staging, output, splits, manifest)
    finally:
        try:
            _delete_staging(staging)
            if writing:
                _delete_late_writes(staging)
        finally:
            storage.remove_empty(made)
            ray.kill(log_actor)
    return manifest


LATE_WRITES_S = 2.0  # how long a stopped run watches for its write tasks' last files


def _delete_late_writes(staging: str) -> None:
    """A run stopped while writing (Ctrl-C, an error): a write task that was running when
    Ray Data gave up may still put its file down (seen ~0.1 s after the job ended), which
    made `staging` again after it was deleted and left it behind. Deleted again for a moment."""
    deadline = time.monotonic() + LATE_WRITES_S
    while time.monotonic() < deadline:
        time.sleep(0.25)
        _delete_staging(staging)


def _delete_staging(staging: str) -> None:
    """Delete `staging`; a file a write task adds while it is deleted (OSError: the folder
    is not empty) is left to the next try, or named by the next run."""
    try:
        if storage.exists(staging):
            storage.delete_dir(staging)
    except OSError as e:
        log.debug("Could not delete %s yet (%s)", staging, e)


def _check_every_class_read(
    counts: dict[str, dict[str, Any]], listing: Listing, skipped: dict[str, str], source: str
) -> None:
    """ConfigError when a class lost every training file to decoding: as a class folder with
    no files is refused, a class the model could never learn is not written. (The FER2013
    CSV names its seven classes whatever rows it holds: a small one may lack some.)"""
    lost = [c for c, n in counts[TRAIN]["per_class"].items() if n == 0]
    if not lost:
        return
    if listing.kind == "csv":  # (written, as the CSV's seven classes always are; said)
        log.warning("Class(es) %s have no training row in %s: a model trained on these shards never predicts "
                    "them (they count in its macro averages with recall 0)", ", ".join(lost), source)
        return
    examples = [f"{p!r}: {skipped[p]}" for p, lab in listing.items.get(TRAIN, [])
                if p in skipped and listing.classes[lab] in lost][:2]
    raise ConfigError(
        f"Class(es) {', '.join(lost)} of {source!r} have no readable training image"
        + (f" (every file skipped, e.g. {'; '.join(examples)})" if examples else "")
        + "; nothing was written."
    )


def _image_summary(stats: dict[str, Any]) -> dict[str, Any]:
    sides = Counter({int(k): v for k, v in stats["sides"].items()})
    modes = stats["modes"]
    ordered = sorted(sides.elements()) if sides else [0]
    gray = all(m in GRAY_MODES for m in modes) if modes else True
    return {
        "median_side": int(ordered[len(ordered) // 2]),
        "min_side": int(ordered[0]),
        "max_side": int(ordered[-1]),
        "channels": 1 if gray else 3,
        "modes": modes,
    }


def count_labels(root: str, splits: list[str], classes: list[str]) -> dict[str, dict[str, Any]]:
    """Per split and class counts, read back from the label column of the shards."""
    import pyarrow.dataset as pads

    counts: dict[str, dict[str, Any]] = {}
    for split in splits:
        folder = storage.join(root, split)
        if not storage.exists(folder):
            continue
        fs, inner = storage.resolve(folder)
        table = pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=[LABEL_COL])
        per = Counter(table.column(LABEL_COL).to_pylist())
        counts[split] = {
            "total": int(table.num_rows),
            "per_class": {c: int(per.get(i, 0)) for i, c in enumerate(classes)},
        }
    return counts


def _publish(staging: str, output: str, splits: list[str], manifest: dict[str, Any]) -> None:
    """Swap the staged splits in, then write the manifest last (it marks completion)."""
    manifest_path = storage.join(output, MANIFEST_FILE)
    storage.delete_file(manifest_path)
    for split in SPLITS:
        storage.delete_dir(storage.join(output, split))
    for split in splits:
        if storage.exists(storage.join(staging, split)):
            storage.move(storage.join(staging, split), storage.join(output, split))
    storage.write_json(manifest_path, manifest)


def _manifest_or_none(shards: str) -> dict[str, Any] | None:
    """The folder's manifest.json when jobs/prepare.py wrote it (other tools write files of
    that name too), else None."""
    manifest = storage.read_json_or_none(storage.join(storage.normalize(shards), MANIFEST_FILE))
    ok = isinstance(manifest, dict) and isinstance(manifest.get("classes"), list) and isinstance(
        manifest.get("splits"), dict)
    return manifest if ok else None


def is_shards(folder: str) -> bool:
    """Whether `folder` is a shards folder jobs/prepare.py wrote."""
    return _manifest_or_none(folder) is not None


def read_manifest(shards: str) -> dict[str, Any]:
    """The manifest of a shards folder; ConfigError when the folder is not one."""
    manifest = _manifest_or_none(shards)
    if manifest is None:
        folder = storage.normalize(shards)
        if not storage.exists(folder):
            raise ConfigError(f"{shards!r} does not exist; give the folder jobs/prepare.py wrote.")
        parent, name = storage.split_last(folder)
        if name in SPLITS and parent and _manifest_or_none(parent) is not None:
            raise ConfigError(f"{shards!r} is one split of the shards folder {parent!r}; give that folder.")
        written = storage.exists(storage.join(folder, MANIFEST_FILE))
        raise ConfigError(
            f"{shards!r} is not a prepared shards folder "
            f"({'its ' + MANIFEST_FILE + ' is not one jobs/prepare.py wrote' if written else 'no ' + MANIFEST_FILE}); "
            "run jobs/prepare.py first."
        )
    return manifest
