"""Batch scoring: a model folder over an image folder or a shards folder, to Parquet.

One streaming Ray Data pipeline: no image is held longer than its batch, however large the
input (the driver's listing, error paths and the metrics' label columns grow by bytes a file):

    listing (driver: paths and true labels, no bytes)
      -> read, decode, resize to the model's data size (CPU tasks, uint8 images)
      -> normalise and run the model, optionally with flip TTA (an actor pool, one GPU each)
      -> OUT/predictions/*.parquet (driver: the rows as they come, ~135 bytes per image)

On CPU, Ray fuses the decode tasks into the scoring actors (same resources): each actor
decodes its own batches, with no copy of the decoded images between processes, and
`num_actors` sets how many decode and score in parallel (by default, see auto_actors, one per
AUTO_IMAGES_PER_ACTOR images up to the cores or GPUs). With GPUs the decode stays in
CPU tasks that feed the GPU actors.

Files that cannot be scored travel on as rows with the reason (REASON_COL) and no
prediction; the driver appends them to OUT/errors.parquet as they come. The driver writing
both keeps a local --output right on a cluster of many nodes and starts no writer
processes (on the 2-core VM, Ray Data's write tasks and an error-writer actor cost ~2.5 s of
FER2013 val's ~10.7, bench/PERFORMANCE.md). Metrics are computed afterwards from the label
columns read back from the written predictions. Everything is written under `OUT.tmp-<id>` beside OUT and moved into
place at the end: OUT is complete or absent, and a rerun replaces it only once done.

Prediction columns: path, label and label_name (the true class, null when the file's
first-level folder is not a class of the model), pred and pred_name (the predicted
class), confidence (its probability) and one `prob_<class>` column per class.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from fer_ray import storage
from fer_ray.cli import StoppedLate, autoscaler_limits, cluster_cpus, is_stop, require_cpus, require_gpus
from fer_ray.config import AMP_MODES, ConfigError, require_paths
from fer_ray.constants import (
    IMAGE_COL, LABEL_COL, PATH_COL, SPLITS, TTA_MODES, class_key,
)

if TYPE_CHECKING:
    from fer_ray.model_spec import ModelSpec

# torch and timm are imported where they are used: the driver (its checks, its writing
# of the results) should not pay for them.

log = logging.getLogger(__name__)

# Output layout.
PREDICTIONS_DIR = "predictions"
ERRORS_FILE = "errors.parquet"
METRICS_FILE = "metrics.parquet"
CONFUSION_TABLE_FILE = "confusion_matrix.parquet"
CONFUSION_PLOT_FILE = "confusion_matrix.png"
SUMMARY_FILE = "summary.json"

# Prediction and error columns (path and label: fer_ray.constants).
LABEL_NAME_COL = "label_name"
PRED_COL = "pred"
PRED_NAME_COL = "pred_name"
CONFIDENCE_COL = "confidence"
PROB_PREFIX = "prob_"
REASON_COL = "reason"
# The precision and memory format the actor scored in (fer_ray.model.format_name), on the
# first row of each table an actor returns (null on the others): the driver collects it
# for summary.json and drops it, as it drops REASON_COL.
FORMAT_COL = "scored_in"

# Bytes a file name may have on Linux, macOS and Windows filesystems.
NAME_MAX = 255
# Listed files with no true label carry this until the output, where it becomes null.
NO_LABEL = -1
# Parquet files of predictions hold this many rows (fewer only the last), in row groups of
# at most ROWS_PER_GROUP.
ROWS_PER_FILE = 50_000
ROWS_PER_GROUP = 10_000
# The error writer writes a row group once this many errors are waiting.
ERROR_ROWS_PER_WRITE = 10_000
# By default one scoring actor per this many images, up to the cores (GPUs with --use-gpu).
# An actor's start-up (a fresh process importing torch and timm) costs ~3.5 s on the 2-core
# VM, and a second actor saves ~0.35 ms per image there (1,005 against 744 images/s with
# resnet18 at 48 px), so it pays for itself from about 10,000 images.
AUTO_IMAGES_PER_ACTOR = 10_000


# --input-blur auto measures the input's sharpness on this many images, as training
# measures val's (fer_ray.data.sample_images).
BLUR_SAMPLE = 1024
# Times a batch is run again after the process running it died (score_dataset).
RETRIES = 3
# Splits of one shards folder scored together when the blurs measured for them differ by at
# most this (px): 0.23-0.27 px off the measured sigma cost FER2013 val 0.5-2.0 points
# (flip TTA, bench/ACCURACY.md).
BLUR_AGREE = 0.2


# Test-time augmentation (--tta, TTA_MODES): "flip" averages the image with its mirror image;
# "ten-crop" adds the four corners and the centre cropped to CROP_FRACTION of the side (each
# resized back to the model's input and mirrored): 12 views. Measured on FER2013 val with
# five CPU-preset models: 0 to +1.4 points of accuracy over "flip", +0.9 on average
# (bench/ACCURACY.md).
CROP_FRACTION = 15 / 16


def tta_mode(tta: bool | str | None) -> str | None:
    """None, "flip" or "ten-crop" from what predict() was given (True means "flip")."""
    if tta is True:
        return "flip"
    if not tta:
        return None
    if tta not in TTA_MODES:
        raise ConfigError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}.")
    return str(tta)


def tta_views(x: Any, mode: str | None) -> list[Any]:
    """The normalised batch [B, C, S, S] as the model sees it under `mode`: the batch, its
    mirror image, and for ten-crop the five crops and their mirror images."""
    import torch.nn.functional as F

    views = [x]
    if mode:
        views.append(x.flip(-1))
    if mode == "ten-crop":
        side = x.shape[-1]
        crop = max(1, round(side * CROP_FRACTION))
        mid, end = (side - crop) // 2, side - crop
        for top, left in ((mid, mid), (0, 0), (0, end), (end, 0), (end, end)):
            view = F.interpolate(
                x[..., top : top + crop, left : left + crop], size=x.shape[-2:], mode="bilinear",
                align_corners=False,
            )
            views += [view, view.flip(-1)]
    return views


def prob_col(class_name: str) -> str:
    return PROB_PREFIX + class_name


def prediction_schema(class_names: Sequence[str]) -> pa.Schema:
    return pa.schema(
        [
            (PATH_COL, pa.string()),
            (LABEL_COL, pa.int64()),
            (LABEL_NAME_COL, pa.string()),
            (PRED_COL, pa.int64()),
            (PRED_NAME_COL, pa.string()),
            (CONFIDENCE_COL, pa.float32()),
            *[(prob_col(c), pa.float32()) for c in class_names],
        ]
    )


# The true class of a file that could not be scored, when its folder names one: which
# classes lost files, for metrics that leave them out.
ERROR_SCHEMA = pa.schema([(PATH_COL, pa.string()), (REASON_COL, pa.string()), (LABEL_NAME_COL, pa.string())])


def scored_schema(class_names: Sequence[str]) -> pa.Schema:
    """What the scoring actors return: prediction rows (reason null) and the rows of files
    that could not be scored (reason set, no prediction)."""
    return prediction_schema(class_names).append(pa.field(REASON_COL, pa.string())).append(
        pa.field(FORMAT_COL, pa.string()))


# --------------------------------------------------------------------------------------
# Checks (driver, before any Ray work)
# --------------------------------------------------------------------------------------


def find_shards(source: str) -> tuple[str, str | None] | None:
    """(shards root, split) when SRC is a prepared shards folder or one split of one."""
    from fer_ray.prepare import is_shards

    if is_shards(source):
        return source, None
    parent, name = storage.split_last(source)  # (a URI's ?options stay on the root)
    if name in SPLITS and parent and is_shards(parent):
        return parent, name
    return None


def check_inputs(
    model_dir: str,
    source: str,
    output: str,
    split: str | None = None,
    batch_size: int = 256,
    num_actors: int | None = None,
    amp: str = "auto",
    use_gpu: bool = False,
) -> ModelSpec:
    """Raise ConfigError, with what to do, for anything that would make the run fail; the
    model's description when nothing would."""
    from fer_ray.model_spec import check_model_folder

    require_paths(model=model_dir, input=source, output=output)
    model_dir, source, output = (storage.normalize(p) for p in (model_dir, source, output))
    output = storage.through_link(output)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    if num_actors is not None and num_actors < 1:
        raise ConfigError(f"--num-actors must be at least 1, got {num_actors}.")
    if amp not in AMP_MODES:
        raise ConfigError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}.")
    if amp == "fp16" and not use_gpu:
        raise ConfigError("--amp fp16 is for GPUs (add --use-gpu); on a CPU use --amp bf16 or auto.")
    # The clearest sentences for a wrong folder; the weights file's header is checked too,
    # but the model is built only in the scoring actors (timm and torch cost the driver ~4 s).
    spec = check_model_folder(model_dir)
    if not storage.exists(source):
        raise ConfigError(f"Input {source!r} does not exist; give a folder of images or a shards folder.")
    if not storage.is_dir(source):
        raise ConfigError(f"Input {source!r} is a file; give the folder that holds the images.")
    _check_output(model_dir, source, output)
    shards = find_shards(source)
    if shards is None:
        if split:
            raise ConfigError(f"--split is for shards folders, and {source!r} is an image folder; drop --split.")
        if not _has_any_file(source):
            raise ConfigError(f"Input {source!r} holds no files; give a folder with images in it.")
    else:
        if split and shards[1] and split != shards[1]:
            raise ConfigError(
                f"--split {split} contradicts --input {source!r}, the {shards[1]!r} split of a shards "
                "folder; drop --split, or give the shards folder itself."
            )
        _check_shards(shards[0], split or shards[1], spec)
    return spec


def _check_shards(root: str, split: str | None, spec: ModelSpec) -> None:
    from fer_ray.prepare import read_manifest

    manifest = read_manifest(root)
    if (shard_labels(manifest["classes"], spec.class_names) == NO_LABEL).all():
        raise ConfigError(
            f"The shards in {root!r} have the classes {', '.join(manifest['classes'])} but the model "
            f"predicts {', '.join(spec.class_names)}; score them with a model trained on these classes."
        )
    if split and split not in manifest["splits"]:
        raise ConfigError(
            f"Shards {root!r} have no {split!r} split; choose one of {', '.join(manifest['splits'])}."
        )


def shard_labels(shard_classes: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """The model's label for each label of a shards folder: its class of the same name in
    any letter case (as an image folder's class folders are matched), NO_LABEL for a class
    the model does not predict (scored without a true label)."""
    index = {class_key(name): i for i, name in enumerate(class_names)}
    return np.array([index.get(class_key(c), NO_LABEL) for c in shard_classes], dtype=np.int64)


def _relabel(table: pa.Table, lookup: np.ndarray) -> pa.Table:
    """A shards block with its labels turned into the model's (shard_labels)."""
    labels = lookup[table.column(LABEL_COL).to_numpy()]
    return table.set_column(table.schema.get_field_index(LABEL_COL), LABEL_COL, pa.array(labels, pa.int64()))


def _check_output(model_dir: str, source: str, output: str) -> None:
    if storage.is_uri(output) and not storage.split_last(output)[0]:
        # Written beside itself under a temporary name: beside a bucket is another bucket.
        raise ConfigError(f"--output {output!r} is a bucket; give a folder inside it (e.g. {storage.join(output, 'preds')}).")
    if storage.inside(output, source):
        where = "--input itself" if storage.inside(source, output) else "inside --input"
        raise ConfigError(f"--output {output!r} is {where}; choose a folder outside it.")
    name = storage.name_of(output)  # (decoded: a file:// URI names it percent-encoded)
    if storage.local_here(output) is not None and len(f"{name}.tmp-00000000".encode()) > NAME_MAX:
        raise ConfigError(
            f"--output's last name is {len(name.encode())} bytes long, and the run writes beside it under "
            f"that name and 13 more characters, over the {NAME_MAX} a file name may have; choose a shorter one."
        )
    for name, path in (("--input", source), ("--model", model_dir)):
        if storage.inside(path, output):
            raise ConfigError(
                f"{name} {path!r} is inside --output, which a run replaces; choose another --output."
            )
    if not storage.exists(output):
        storage.check_creatable(output, "--output")
    elif not storage.is_dir(output):
        raise ConfigError(f"--output {output!r} is a file; choose a folder.")
    elif problem := _unreplaceable(output):
        raise ConfigError(
            f"--output {output!r} cannot be replaced: {problem} (a run writes its results beside it and "
            f"moves them into place at the end); give a folder inside it (e.g. {storage.join(output, 'preds')})."
        )
    # Hidden entries count (a folder holding only .git is not empty): a rerun replaces it.
    elif storage.list_dir(output, hidden=True) and not _is_scoring_output(output):
        raise ConfigError(
            f"--output {output!r} is a non-empty folder that jobs/predict.py did not write; "
            "choose a new folder (a predictions folder is replaced on rerun)."
        )


def _unreplaceable(folder: str) -> str | None:
    """Why the existing local `folder` cannot be swapped for a new one (_publish renames it
    and writes beside it), or None: found before the run, not after its work is done."""
    local = storage.local_path(folder)
    if local is None:
        return None
    local = os.path.abspath(local)
    if os.path.ismount(local):  # (rename: EBUSY; a container's volume, a mounted disk)
        return "it is a mount point"
    parent = os.path.dirname(local)
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its parent folder {parent!r} is not writable"
    return None


def _is_scoring_output(folder: str) -> bool:
    """Written by jobs/predict.py: its summary.json (other tools write files of that name
    too) beside its predictions folder, or, on an object store, one copied there in part
    when the run was stopped while publishing it (_publish copies summary.json last): only
    the job's own files, and the run's `.old-`/`.tmp-` folder beside it. Only such a folder
    is replaced by a rerun."""
    summary = storage.read_json_or_none(storage.join(folder, SUMMARY_FILE))
    if (isinstance(summary, dict) and {"input_kind", "classes", "scored", "total"} <= summary.keys()
            and storage.is_dir(storage.join(folder, PREDICTIONS_DIR))):
        return True
    own = {PREDICTIONS_DIR, ERRORS_FILE, METRICS_FILE, CONFUSION_TABLE_FILE, CONFUSION_PLOT_FILE}
    return (summary is None and not storage.exists(storage.join(folder, SUMMARY_FILE))
            and {e.base_name for e in storage.list_dir(folder, hidden=True)} <= own
            and bool(_stale_temp_folders(folder)))


def _has_any_file(folder: str) -> bool:
    """Whether a folder holds a file (not hidden) at any depth, stopping at the first: on a
    bucket a folder at a time, not a listing of every key (list_images makes that one)."""
    local = storage.local_path(folder)
    if local is not None:
        return next(storage.local_files(local), None) is not None
    fs, _ = storage.resolve(folder)
    pending = [folder]
    while pending:
        entries = storage.list_dir(pending.pop(0))
        if any(e.type.name == "File" for e in entries):
            return True
        pending += [storage.full_path(fs, e.path, folder) for e in entries if e.type.name == "Directory"]
    return False


# --------------------------------------------------------------------------------------
# Listing (driver, no image bytes)
# --------------------------------------------------------------------------------------


def list_images(source: str, class_names: Sequence[str], skip: Sequence[str] = (),
                unlisted: list[tuple[str, str]] | None = None) -> pa.Table:
    """Every file under SRC with its true label: the class its first-level folder names,
    else NO_LABEL. Files that are not images are listed too; they end in errors.parquet.
    A link in SRC to one of the folders `skip` (the output) is not followed. Folders inside
    SRC that cannot be listed are appended to `unlisted` (path, reason)."""
    fs, inner = storage.resolve(source)
    index = {class_key(name): i for i, name in enumerate(class_names)}
    paths, labels = [], []
    outside: dict[int, str] = {}  # row -> its first-level folder, not a class's
    # One file reached through symbolic links under two paths (a linked folder) is scored
    # once: it was two rows, counted twice in the metrics, under two true labels when the
    # paths lay in two class folders (then it has none).
    first: dict[tuple[int, int], str] | None = {} if storage.local_path(source) is not None else None
    row_of: dict[str, int] = {}
    twice, torn = 0, set()
    for path in storage.list_files(source, skip, unlisted):
        parts = path[len(inner) :].strip("/").split("/")
        label = index.get(class_key(parts[0]), NO_LABEL) if len(parts) > 1 else NO_LABEL
        if first is not None and (path0 := storage.same_file_as(path, first)) is not None:
            twice += 1
            row = row_of[path0]
            if label != NO_LABEL and row not in torn:  # (a path outside the class folders names none)
                if labels[row] == NO_LABEL:  # (class folders of links into a pool of images)
                    labels[row] = label
                    outside.pop(row, None)
                elif labels[row] != label:
                    torn.add(row)
                    labels[row] = NO_LABEL
            continue
        if label == NO_LABEL and len(parts) > 1:
            outside[len(paths)] = parts[0]
        if first is not None:
            row_of[path] = len(paths)
        paths.append(storage.full_path(fs, path, source))
        labels.append(label)
    if twice:
        log.warning("%d file(s) are reached a second time through symbolic links; each is scored once, under "
                    "the path listed first%s", twice,
                    f" ({len(torn)} of them under two classes: scored without a true label)" if torn else "")
    unlabelled = labels.count(NO_LABEL)
    strangers = set(outside.values())
    if unlabelled == len(labels) and strangers and not torn:
        log.warning(
            "None of the folders in %s (%s) is a class of the model (%s): every file is scored "
            "without a true label; for metrics, give the folder whose subfolders are the classes",
            source, ", ".join(sorted(strangers)[:5]) + (", ..." if len(strangers) > 5 else ""),
            ", ".join(class_names),
        )
    elif labels and unlabelled == len(labels) and not torn:
        # Every file directly in SRC: unlabelled photos, or one class's folder given alone (warned).
        name = storage.name_of(source)
        hint = (f"; {name!r} is a class of the model: give its parent folder for metrics"
                if class_key(name) in index else "")
        log.log(logging.WARNING if hint else logging.INFO,
                "The files of %s are in no class folder: they are scored without a true label%s", source, hint)
    elif 0 < unlabelled - len(torn) < len(labels):  # (a file under two classes is warned above)
        where = f" (in {', '.join(sorted(strangers))})" if strangers else ""
        log.warning(
            "%d of %d files are outside the class folders%s; they are scored without a true "
            "label and left out of the metrics", unlabelled - len(torn), len(labels), where,
        )
    return pa.table({PATH_COL: pa.array(paths, pa.string()), LABEL_COL: pa.array(labels, pa.int64())})


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


# --------------------------------------------------------------------------------------
# Ray Data stages
# --------------------------------------------------------------------------------------


class ErrorWriter:
    """Appends the files that cannot be scored to errors.parquet (in the driver)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0
        self.labelled = 0  # of them, files with a true label
        self.pending: dict[str, list[Any]] = {PATH_COL: [], REASON_COL: [], LABEL_NAME_COL: []}
        self.writer: Any = None
        self.seen: set[str] = set()  # a batch Ray runs again (its worker died) reports its files again

    def write(self, paths: list[str], reasons: list[str], label_names: list[str | None] | None = None) -> None:
        for path, reason, name in zip(paths, reasons, label_names or [None] * len(paths)):
            if path not in self.seen:
                self.seen.add(path)
                self.pending[PATH_COL].append(path)
                self.pending[REASON_COL].append(reason)
                self.pending[LABEL_NAME_COL].append(name)
                self.count += 1
                self.labelled += name is not None
        if len(self.pending[PATH_COL]) >= ERROR_ROWS_PER_WRITE:
            self._flush()

    def _flush(self) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            fs, inner = storage.resolve(self.path)
            self.writer = pq.ParquetWriter(inner, ERROR_SCHEMA, filesystem=fs)
        self.writer.write_table(pa.table(self.pending, schema=ERROR_SCHEMA))
        self.pending = {PATH_COL: [], REASON_COL: [], LABEL_NAME_COL: []}

    def close(self) -> int:
        """Write what is left (an empty table makes a valid file with no rows); the count."""
        self._flush()
        self.writer.close()
        self.writer = None
        return self.count


class PartWriter:
    """Parquet files `part-00000.parquet`, ... of `rows_per_file` rows (the last fewer) in
    `folder`, written in row groups of up to ROWS_PER_GROUP rows; at least one file, with
    no rows when nothing came, so that readers find the columns."""

    def __init__(self, folder: str, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE) -> None:
        self.folder, self.schema, self.rows_per_file = folder, schema, rows_per_file
        self.pending: list[pa.Table] = []
        self.pending_rows = self.rows = self.in_file = self.files = 0
        self.writer: Any = None

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= ROWS_PER_GROUP:
            self._flush(whole_groups=True)

    def _flush(self, whole_groups: bool = False) -> None:
        """Write what is pending; with `whole_groups`, whole row groups only (the rest waits)."""
        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        ready = table.num_rows - table.num_rows % ROWS_PER_GROUP if whole_groups else table.num_rows
        rest = table.slice(ready)
        self.pending, self.pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        table = table.slice(0, ready)
        while table.num_rows or (not whole_groups and not self.files and self.writer is None):
            if self.writer is None:
                import pyarrow.parquet as pq

                fs, inner = storage.resolve(storage.join(self.folder, f"part-{self.files:05d}.parquet"))
                self.writer = pq.ParquetWriter(inner, self.schema, filesystem=fs)
                self.files += 1
            take = min(table.num_rows, self.rows_per_file - self.in_file)
            self.writer.write_table(table.slice(0, take), row_group_size=ROWS_PER_GROUP)
            table = table.slice(take)
            self.in_file += take
            self.rows += take
            if self.in_file >= self.rows_per_file:
                self.writer.close()
                self.writer, self.in_file = None, 0

    def close(self) -> int:
        """Write what is left; the rows written."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.rows


class _NotAnImage(Exception):
    pass


_POINTER = re.compile(r" <_io\.BytesIO object at 0x[0-9a-f]+>")


def load_batch(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Ray Data task: read (or take) each file's bytes, decode and resize it to `size` as
    the eval transform does. Every row goes on: a file that fails with its reason
    (REASON_COL, "" for the others) and a blank image that is not scored."""
    paths, labels = batch[PATH_COL], batch[LABEL_COL]
    images, keep, _, reasons = decode_files(paths, batch.get(IMAGE_COL), size, channels)
    if len(keep) == len(paths):
        return {IMAGE_COL: images, PATH_COL: paths, LABEL_COL: labels, REASON_COL: np.full(len(paths), "")}
    every = np.zeros((len(paths), *images.shape[1:]), dtype=np.uint8)
    every[keep] = images
    failed = np.ones(len(paths), dtype=bool)
    failed[keep] = False
    why = np.full(len(paths), "", dtype=object)
    why[failed] = reasons  # decode_files lists the failures in the files' order
    return {IMAGE_COL: every, PATH_COL: paths, LABEL_COL: labels, REASON_COL: why.astype(str)}


def decode_files(
    paths: Sequence[Any], blobs: Sequence[bytes] | None, size: int, channels: int
) -> tuple[np.ndarray, list[int], list[str], list[str]]:
    """Read (or take) each file's bytes, decode and resize it to `size` as the eval
    transform does: (uint8 images [len(keep), size, size, channels], the indices that
    decoded, the paths that did not and why)."""
    import cv2

    from fer_ray.transforms import (
        SIGNATURE_BYTES, create_transform, decode_image, has_image_name, looks_like_image, unread_bytes_reason,
        unread_format, unread_format_reason,
    )

    # Undecodable files are expected here and reported in errors.parquet instead.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    transform = create_transform(False, size)
    images = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    keep: list[int] = []
    bad_paths: list[str] = []
    reasons: list[str] = []
    for i, path in enumerate(paths):
        path = str(path)
        try:
            # A file named as no image is read only if its first bytes are an image's (a
            # PNG without extension: prepare keeps what decodes, whatever its name).
            named = storage.without_options(path)  # (a URI's ?options follow the extension)
            if blobs is None and not has_image_name(named):
                head = storage.read_head(path, SIGNATURE_BYTES)
                if not looks_like_image(head):  # (a JPEG named .heic is read as the JPEG it is)
                    if (fmt := unread_format(named, head)) is not None:
                        raise _NotAnImage(unread_format_reason(fmt))
                    raise _NotAnImage(f"not an image file (extension {os.path.splitext(named)[1] or 'none'})")
            data = storage.read_bytes(path) if blobs is None else blobs[i]
            if not data:
                raise ValueError("empty file")
            try:
                decoded = decode_image(data, channels)
            except Exception:  # noqa: BLE001 - (an iPhone's HEIC exported as .jpg: named as such)
                if (why := unread_bytes_reason(data)) is not None:
                    raise _NotAnImage(why) from None
                raise
            image = transform(image=decoded)["image"]
            images[len(keep)] = image.reshape(size, size, channels)
            keep.append(i)
            continue
        except _NotAnImage as e:
            reason = str(e)
        except OSError as e:
            reason = f"cannot read file: {e}"
        except Exception as e:  # noqa: BLE001 - any decoder failure means an unusable file
            reason = _POINTER.sub("", str(e)) or type(e).__name__
        bad_paths.append(path)
        reasons.append(reason)
    return images[: len(keep)], keep, bad_paths, reasons


def prediction_table(
    paths: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> pa.Table:
    """One prediction row per image; labels < 0 (unknown) become nulls."""
    names = pa.array(list(class_names), pa.string())
    pred = probs.argmax(1)
    columns = [
        pa.array(paths, pa.string()),
        *label_columns(labels, class_names),
        pa.array(pred, pa.int64()),
        names.take(pa.array(pred)),
        pa.array(probs.max(1), pa.float32()),
        *[pa.array(probs[:, i], pa.float32()) for i in range(len(class_names))],
    ]
    return pa.Table.from_arrays(columns, schema=prediction_schema(class_names))


def label_columns(labels: np.ndarray, class_names: Sequence[str]) -> tuple[pa.Array, pa.Array]:
    """The label and label_name columns of true labels (< 0, unknown: nulls)."""
    labels = np.asarray(labels, dtype=np.int64)
    label = pa.array(labels, pa.int64(), mask=labels < 0)
    return label, pa.array(list(class_names), pa.string()).take(label)


def scored_table(
    predictions: pa.Table, failed_paths: np.ndarray, reasons: np.ndarray, class_names: Sequence[str],
    scored_in: str | None = None, failed_labels: np.ndarray | None = None,
) -> pa.Table:
    """The scoring actors' output (scored_schema): `predictions`, then one row per file
    that could not be scored, with its path, reason and true label (when known, < 0 not);
    `scored_in` on the first row."""
    schema = scored_schema(class_names)
    n = predictions.num_rows + len(failed_paths)
    formats = pa.array([scored_in] + [None] * (n - 1), pa.string()) if n else pa.nulls(0, pa.string())
    good = predictions.append_column(schema.field(REASON_COL), pa.nulls(predictions.num_rows, pa.string()))
    good = good.append_column(schema.field(FORMAT_COL), formats[:predictions.num_rows])
    if not len(failed_paths):
        return good
    given = {PATH_COL: pa.array(failed_paths, pa.string()), REASON_COL: pa.array(reasons, pa.string()),
             FORMAT_COL: formats[predictions.num_rows:]}
    if failed_labels is not None:
        given[LABEL_COL], given[LABEL_NAME_COL] = label_columns(failed_labels, class_names)
    bad = pa.Table.from_arrays([given.get(f.name, pa.nulls(len(failed_paths), f.type)) for f in schema],
                               schema=schema)
    return pa.concat_tables([good, bad])


def in_own_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a thread of its own, which ends with it; its exception is raised here.

    torch's OpenMP runtime keeps a team of threads for each thread that runs parallel work,
    until that thread ends. Once the teams hold more threads than there are cores, OpenMP
    stops spinning between parallel regions and every region waits for its threads to wake:
    a thread's forward passes then took 1.2-1.6x as long as on its own (bench/PERFORMANCE.md,
    "Two OpenMP thread teams"). Ray Data builds a callable class on the actor's main thread
    and calls it on another, so the constructor's torch work runs here instead.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="fer_ray-setup")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


NOT_FINITE = "the model's output is not a finite number (NaN or inf): its weights, or fp16 overflowing (--amp off)"


class Scorer:
    """Ray Data callable class: uint8 images -> class probabilities, one model per actor."""

    def __init__(
        self, model_dir: str, use_gpu: bool, tta: str | None, num_actors: int,
        input_blur: float | None = None, amp: str = "auto",
    ) -> None:
        # Loading, the format timing and the conversions run torch's parallel loops: in a
        # thread that ends before the first batch, which runs in another (in_own_thread).
        in_own_thread(lambda: self._setup(model_dir, use_gpu, tta, num_actors, input_blur, amp))

    def _setup(
        self, model_dir: str, use_gpu: bool, tta: str | None, num_actors: int,
        input_blur: float | None, amp: str,
    ) -> None:
        import torch

        from fer_ray.model import fastest_inference_format, fold_batchnorm, format_name, resolve_amp
        from fer_ray.normalize import DeviceNormalize

        # Read from the folder: faster than shipping the pickled model through the object store.
        model, spec = load_model(model_dir)
        model, folded = fold_batchnorm(model)  # before the format timing: what scores is timed
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # On a GPU every batch is padded to the largest size seen: cudnn.benchmark tunes its
        # kernels once per shape, and batches shrink wherever files fail to decode.
        self.pad_rows = 0 if use_gpu else None
        if use_gpu:
            torch.backends.cudnn.benchmark = True
            self.memory_format = torch.channels_last  # tensor cores
            self.amp_dtype = resolve_amp(amp, self.device)
            self.scored_in = format_name(self.amp_dtype, True)
            print(f"Scorer: scoring in {self.scored_in} on {torch.cuda.get_device_name()}"
                  f"{_folded_note(folded)}", file=sys.stderr, flush=True)
        else:
            # Ray allows one thread per reserved CPU, but the model is nearly all the work
            # here: the actors share the node's cores (decode runs in them too, fused).
            torch.set_num_threads(_cpu_threads(num_actors))
            (self.amp_dtype, channels_last), timed = fastest_inference_format(
                model, spec.in_chans, spec.image_size, amp
            )
            self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
            self.scored_in = format_name(self.amp_dtype, channels_last)
            print(f"Scorer: {timed}{_folded_note(folded)}", file=sys.stderr, flush=True)  # Ray forwards it
        self.model = model.to(self.device).to(memory_format=self.memory_format).eval()
        # With the blur that matches these images to the training images (fer_ray.blur).
        self.normalize = DeviceNormalize.for_model(spec, blur_sigma=input_blur).to(self.device)
        self.class_names = list(spec.class_names)
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Rows of scored_schema: a prediction per image, and the files load_batch could not
        decode (a REASON_COL other than "") passed on with their reasons."""
        images, paths, labels = batch[IMAGE_COL], batch[PATH_COL], batch[LABEL_COL]
        failed = np.zeros(len(paths), dtype=bool)
        if REASON_COL in batch:
            failed = batch[REASON_COL].astype(str) != ""
        if failed.any():
            kept = ~failed
            images, paths, labels = images[kept], paths[kept], labels[kept]
        probs = self._probabilities(images)
        failed_paths, failed_labels = batch[PATH_COL][failed], batch[LABEL_COL][failed]
        reasons = list(batch[REASON_COL][failed]) if failed.any() else []
        # NaN or inf out of the model (weights gone NaN, an fp16 overflow): an error row,
        # not a prediction of the first class (argmax of NaN) that the reports cannot bin.
        broken = ~np.isfinite(probs).all(1)
        if broken.any():
            failed_paths = np.concatenate([failed_paths, paths[broken]])
            failed_labels = np.concatenate([failed_labels, labels[broken]])
            reasons += [NOT_FINITE] * int(broken.sum())
            paths, labels, probs = paths[~broken], labels[~broken], probs[~broken]
        return scored_table(
            prediction_table(paths, labels, probs, self.class_names),
            failed_paths, reasons, self.class_names, self.scored_in, failed_labels,
        )

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        import torch

        if not len(images):
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        x = torch.from_numpy(np.require(images, requirements="W"))
        n = len(x)
        if self.pad_rows is not None:
            self.pad_rows = max(self.pad_rows, n)
            if n < self.pad_rows:  # with copies of a real image (a blank one's std is 0)
                x = torch.cat([x, x[:1].expand(self.pad_rows - n, *x.shape[1:])])
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            # Normalised (and blurred) in fp32 outside autocast, as validation in training is;
            # each view standardised on its own with input_norm: image, as every image the
            # model saw was (ten-crop's crops of a standardised image were not).
            per_image = self.normalize.per_image
            views = tta_views(self.normalize(x, standardize=not per_image), self.tta)
            if per_image:
                views = [self.normalize.standardize(v) for v in views]
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                probs = sum(
                    self.model(v.contiguous(memory_format=self.memory_format)).float().softmax(1)
                    for v in views
                )[:n] / len(views)  # (eval-mode BatchNorm: the padding rows change no other row)
        return probs.cpu().numpy()


def _folded_note(folded: int) -> str:
    return f"; {folded} BatchNorm layers folded into the convolutions before them" if folded else ""


def auto_actors(total: int, use_gpu: bool) -> tuple[int, int]:
    """(fewest, most) scoring actors for `total` images: one per AUTO_IMAGES_PER_ACTOR, at
    least one, at most this machine's cores. With GPUs the most is what the cluster's GPUs
    allow, counting those its autoscaler may add (cluster.yaml starts none), and the pool
    starts with the GPUs up now (at least one) and grows as Ray Data's queue asks for actors."""
    want = 1 + total // AUTO_IMAGES_PER_ACTOR
    if not use_gpu:
        cpus = cluster_cpus()  # a cluster joined: no more actors than it may hold
        n = max(1, min(cores(), want, *([int(cpus[1])] if cpus else [])))
        return n, n
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    most = max(1, min(max(have, int((autoscaler_limits() or {}).get("GPU", 0))), want))
    return max(1, min(have, most)), most


def require_actor_cpus(actors: int, use_gpu: bool) -> None:
    """On a cluster joined, ConfigError unless it may hold the first `actors` scoring actors
    (one CPU each) and, with GPUs, a CPU for the decode tasks: Ray Data would wait for them
    forever."""
    require_cpus(actors + use_gpu, (
        f"scoring needs {actors} for its GPU actors (--num-actors) and one more for the decode "
        "tasks that feed them" if use_gpu else
        f"scoring needs {actors} for its actors (--num-actors; one each, decoding their own batches)"
    ) + ", which would wait forever: lower --num-actors, or add nodes.")


def cores() -> int:
    """The cores this process may run on."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1


def _cpu_threads(num_actors: int) -> int:
    return max(1, cores() // num_actors)


# --------------------------------------------------------------------------------------
# Reports from the written predictions
# --------------------------------------------------------------------------------------


def _write_parquet(df: Any, path: str) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(path, buf.getvalue())


def write_reports(folder: str, class_names: Sequence[str], title: str) -> dict[str, Any]:
    """Counts, and with true labels the metrics files and the calibration error; reads only
    label, pred and confidence back."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from fer_ray.metrics import calibration_error, confusion_table, metrics_table, summary
    from fer_ray.reports import plot_confusion_matrix

    fs, inner = storage.resolve(storage.join(folder, PREDICTIONS_DIR))
    table = pads.dataset(inner, filesystem=fs, format="parquet").to_table(
        columns=[LABEL_COL, PRED_COL, CONFIDENCE_COL]
    )
    out: dict[str, Any] = {"scored": table.num_rows}
    table = table.filter(pc.is_valid(table[LABEL_COL]))
    out["labelled"] = table.num_rows
    if not table.num_rows:
        return out
    y_true, y_pred = table[LABEL_COL].to_numpy(), table[PRED_COL].to_numpy()
    metrics = metrics_table(y_true, y_pred, class_names)
    _write_parquet(metrics, storage.join(folder, METRICS_FILE))
    cm = confusion_table(y_true, y_pred, class_names)
    _write_parquet(cm, storage.join(folder, CONFUSION_TABLE_FILE))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, CONFUSION_PLOT_FILE)
        plot_confusion_matrix(cm[list(class_names)].to_numpy(), class_names, png, title=title)
        with open(png, "rb") as f:
            storage.write_bytes(storage.join(folder, CONFUSION_PLOT_FILE), f.read())
    calibration = calibration_error(y_true == y_pred, table[CONFIDENCE_COL].to_numpy())
    return {**out, **summary(metrics), "calibration_error": round(calibration, 4)}


# --------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------


def input_dataset(
    source: str, class_names: Sequence[str], split: str | None, rows_per_block: int, skip: Sequence[str] = (),
    unlisted: list[tuple[str, str]] | None = None,
):
    """(Dataset of path, label and, for shards, image bytes; number of rows; split scored;
    the folder's listing, None for shards). `skip`, `unlisted`: see list_images."""
    import ray

    shards = find_shards(source)
    if shards is None:
        listing = list_images(source, class_names, skip, unlisted)
        if not listing.num_rows:
            raise ConfigError(f"Input {source!r} holds no files; give a folder with images in it.")
        # from_blocks takes the blocks' metadata from the driver's own tables; from_arrow
        # computes it in a task, which waits ~2 s for a worker process on a just-started Ray.
        return ray.data.from_blocks(_blocks(listing, rows_per_block)), listing.num_rows, None, listing
    from fer_ray.prepare import read_manifest

    root, split = shards[0], split or shards[1]
    manifest = read_manifest(root)
    splits = [split] if split else [s for s in SPLITS if s in manifest["splits"]]
    total = sum(int(manifest["splits"][s]["total"]) for s in splits)
    folders = [storage.join(root, s) for s in splits]
    from fer_ray.data import read_shards

    ds = read_shards(folders).select_columns([IMAGE_COL, LABEL_COL, PATH_COL])
    lookup = shard_labels(manifest["classes"], class_names)
    if not np.array_equal(lookup, np.arange(len(class_names))):  # other names, order or case
        ds = ds.map_batches(_relabel, fn_kwargs={"lookup": lookup}, batch_format="pyarrow", batch_size=None)
        foreign = [c for c, label in zip(manifest["classes"], lookup) if label == NO_LABEL]
        if foreign:
            log.warning("The shards' classes %s are not the model's; their images are scored without "
                        "a true label and left out of the metrics", ", ".join(foreign))
    return ds, total, split, None


def sample_input(
    source: str, listing: pa.Table | None, split: str | None, spec: ModelSpec, rows: int = BLUR_SAMPLE
) -> np.ndarray | dict[str, np.ndarray]:
    """Up to `rows` of the images to score, decoded as the scorer sees them: a fixed random
    choice of a folder's files (the ones that decode), or a shards split's first rows; for
    a whole shards folder, those of each split, by split (the splits can differ: FER2013's
    train images here are blurred, val and test are not)."""
    if listing is None:
        from fer_ray.data import sample_images
        from fer_ray.prepare import read_manifest

        root, named = find_shards(source)
        split = split or named
        if split is None:
            splits = [s for s in SPLITS if s in read_manifest(root)["splits"]]
            return {s: sample_images(root, s, spec.data_size, spec.channels, rows) for s in splits}
        return sample_images(root, split, spec.data_size, spec.channels, rows)
    pick = np.sort(np.random.default_rng(0).permutation(listing.num_rows)[:rows])
    paths = listing.column(PATH_COL).take(pa.array(pick)).to_numpy(zero_copy_only=False)
    return decode_files(paths, None, spec.data_size, spec.channels)[0]


def scoring_blur(
    input_blur: float | str | None, spec: ModelSpec,
    sample: Callable[[], np.ndarray | dict[str, np.ndarray]],
) -> tuple[float, str]:
    """The Gaussian sigma the scorer applies and where it came from. `auto` (None): for a
    model trained with a blur that recorded its training images' sharpness, the blur that
    brings a sample of the input (`sample()`) to that sharpness, so images already as blurry
    as the training images are left alone; otherwise the model's sigma. `model`: the
    model's sigma. A number: that sigma. A sample by split (a whole shards folder) is
    measured split by split: one blur for all when they agree (within BLUR_AGREE px), else
    ConfigError, as one blur would suit some splits and not others."""
    if input_blur is None or input_blur == "auto":
        if not spec.input_blur or spec.train_sharpness is None:
            return spec.input_blur, "the model's"
        from fer_ray import blur

        images = sample()
        if isinstance(images, dict):
            by_split = {s: x for s, x in images.items() if len(x)}
            sigmas = {s: blur.match_sharpness(spec.train_sharpness, x)[0] for s, x in by_split.items()}
            if len(sigmas) > 1 and max(sigmas.values()) - min(sigmas.values()) > BLUR_AGREE:
                each = ", ".join(f"{s} {v:g}" for s, v in sigmas.items())
                raise ConfigError(
                    f"The splits of this shards folder need different input blurs to match the "
                    f"training images ({each} px); score one --split at a time, or give --input-blur."
                )
            images = np.concatenate(list(by_split.values())) if by_split else np.zeros((0,))
        if not len(images):
            return spec.input_blur, "the model's: no sampled image decoded"
        sigma, measured = blur.match_sharpness(spec.train_sharpness, images)
        return sigma, (
            f"measured on {len(images)} input images: sharpness {measured:.3g} against the "
            f"training images' {spec.train_sharpness:.3g}"
        )
    if input_blur == "model":
        return spec.input_blur, "the model's"
    return float(input_blur), "given"


def score_dataset(
    ds: Any,
    model_dir: str,
    spec: ModelSpec,
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
    tta: str | None,
    input_blur: float | None = None,
    amp: str = "auto",
    min_actors: int | None = None,
) -> Any:
    """Decode in CPU tasks, score on the actor pool (fused into it on CPU, see above): from
    `min_actors` (default `num_actors`) up to `num_actors` actors."""
    import ray

    # With --use-gpu, retries held to RETRIES (Ray Data's default is without end): a batch
    # whose file kills the process that decodes or scores it (a decoder's crash, an image
    # too large for the node's memory) was run again for ever, the job never ending. Actors
    # themselves are still restarted without end (a spot node taken back). On CPUs the
    # decode is fused into the scoring actors, which Ray Data does only for maps of equal
    # remote args; a retry argument on both would be a task's invalid one wherever it did
    # not fuse them: left as Ray Data has it there.
    ds = _with_retries(
        ds.map_batches, {"max_retries": RETRIES} if use_gpu else {},
        load_batch,
        fn_kwargs={"size": spec.data_size, "channels": spec.channels},
        batch_size=batch_size,
        batch_format="numpy",
    )
    return _with_retries(
        ds.map_batches, {"max_task_retries": RETRIES} if use_gpu else {},
        Scorer,
        fn_constructor_kwargs={
            "model_dir": model_dir, "use_gpu": use_gpu, "tta": tta, "num_actors": num_actors,
            "input_blur": input_blur, "amp": amp,
        },
        compute=ray.data.ActorPoolStrategy(min_size=min_actors or num_actors, max_size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )


def _with_retries(map_batches: Callable[..., Any], retries: dict[str, int], *args: Any, **kwargs: Any) -> Any:
    """map_batches(*args, **kwargs) with `retries` (none: as it is) among the remote args,
    where this Ray's map_batches still takes them (its **ray_remote_args: deprecated for Ray
    2.64, with no named parameter for retries; its warning, said on every job, is left out)."""
    import inspect
    import warnings

    extra = inspect.signature(map_batches).parameters.get("ray_remote_args")
    if not retries or extra is None or extra.kind is not inspect.Parameter.VAR_KEYWORD:
        return map_batches(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return map_batches(*args, **retries, **kwargs)


def load_model(model_dir: str) -> tuple[Any, ModelSpec]:
    """load_model_dir (in a scoring actor), with a damaged folder reported as a ConfigError
    of one line."""
    from fer_ray.model import load_model_dir

    try:
        return load_model_dir(model_dir)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable weights or config, whatever the library
        first = (str(e).strip().splitlines() or [""])[0].rstrip(":. ")
        raise ConfigError(
            f"Could not load the model in {model_dir!r} ({type(e).__name__}: {first}); "
            "it is damaged, copy the run's best/ folder again."
        ) from None


# A ConfigError raised in a scoring actor's constructor reaches the driver as the text of
# Ray's ActorDiedError (which keeps no exception object): its sentence, found again.
_ACTOR_CONFIG_ERROR = re.compile(r"fer_ray\.config\.ConfigError: (.+)")


def _config_error_in(e: BaseException) -> ConfigError | None:
    found = _ACTOR_CONFIG_ERROR.search(str(e))
    return ConfigError(found.group(1).strip()) if found else None


def predict(
    model_dir: str,
    source: str,
    output: str,
    batch_size: int = 256,
    num_actors: int | None = None,
    use_gpu: bool = False,
    tta: bool | str | None = False,
    split: str | None = None,
    input_blur: float | str | None = None,
    amp: str = "auto",
) -> dict[str, Any]:
    """Score every image under SOURCE (or every row of a shards folder, or of its `split`)
    with the model in MODEL_DIR; write OUTPUT and return its summary.json. `input_blur`:
    None or "auto" (measured for this input), "model" or a sigma (scoring_blur);
    `num_actors` None sizes the actor pool to the input (auto_actors); `tta` is None,
    "flip" (or True) or "ten-crop" (tta_views); `amp` the autocast precision (Scorer: auto
    is bf16 or fp16 on a GPU, and on a CPU whichever of fp32 and bf16 its scorers time faster)."""
    start = time.time()
    model_dir, source, output = (storage.normalize(p) for p in (model_dir, source, output))
    target = storage.through_link(output)
    if target != output:
        log.info("--output %s is a link to %s: the results replace that folder", output, target)
        output = target
    tta = tta_mode(tta)  # before check_inputs, which loads the model
    spec = check_inputs(model_dir, source, output, split, batch_size, num_actors, amp, use_gpu)
    stale_folders = _stale_temp_folders(output)
    for stale in stale_folders:
        what = "the output before it, kept" if ".old-" in stale.rsplit("/", 1)[-1] else "its unfinished output"
        log.warning("%s is left from an interrupted run (%s); remove it when not needed", stale, what)
    # (A link in the input to the output would read the last run's results as input.)
    unlisted: list[tuple[str, str]] = []  # (folders inside the input that could not be listed)
    ds, total, split, listing = input_dataset(
        source, spec.class_names, split, batch_size, skip=[output, *stale_folders], unlisted=unlisted
    )  # starts Ray if needed
    sigma, blur_source = scoring_blur(input_blur, spec, lambda: sample_input(source, listing, split, spec))
    if sigma or spec.input_blur:
        log.info("Input blur: sigma %g px (%s)", sigma, blur_source)
    min_actors = num_actors
    if num_actors is None:
        min_actors, num_actors = auto_actors(total, use_gpu)
    if use_gpu:
        require_gpus(min_actors)  # one GPU per scoring actor
    require_actor_cpus(min_actors, use_gpu)
    shards = find_shards(source)
    kind = "shards" if shards else "folder"
    described = kind
    if shards and split is None:
        from fer_ray.prepare import read_manifest

        counts = {s: c["total"] for s, c in read_manifest(shards[0])["splits"].items()}
        described = "shards: " + ", ".join(f"{s} {n}" for s, n in counts.items())
        if len(counts) > 1:
            log.warning("Scoring every split of %s together: the accuracy and metrics are over all of "
                        "them (%s), the training split included; --split val scores val alone.",
                        source, ", ".join(counts))
    # (a folder's count is of its files: those that are no image end in errors.parquet)
    log.info("Scoring %d %s (%s) from %s with %s", total, "images" if shards else "files", described, source,
             model_dir)

    tmp = storage.sibling(output, f".tmp-{uuid.uuid4().hex[:8]}")
    copying: set[str] = set()  # holds tmp while _publish copies it into OUT
    parent = storage.split_last(tmp)[0]
    made = storage.missing_folders(parent) if parent else []  # removed again if the run fails
    predictions = storage.join(tmp, PREDICTIONS_DIR)
    errors = ErrorWriter(storage.join(tmp, ERRORS_FILE))
    writer = PartWriter(predictions, prediction_schema(spec.class_names))
    scored_all = False
    try:
        storage.makedirs(tmp)
        storage.makedirs(predictions)
        scored = score_dataset(
            ds, model_dir, spec, batch_size, num_actors, use_gpu, tta, sigma, amp, min_actors
        )
        # The reports' libraries (matplotlib, scikit-learn: ~1.6 s) load while the actors start.
        threading.Thread(target=_import_reports, daemon=True).start()
        try:
            scored_in = write_scored(scored, writer, errors, spec.class_names)
        except Exception as e:
            config_error = _config_error_in(e)  # a model the actors could not build
            if config_error is None:
                raise
            raise config_error from None
        if log.isEnabledFor(logging.DEBUG):  # per stage: rows, bytes, time (bench_scoring reads it)
            log.debug("Ray Data stats:\n%s", scored.stats())
        writer.close()
        n_errors = errors.close()
        scored_all = True  # (from here a failure keeps the predictions: see finally)

        name = storage.name_of(source)
        if split and split != name:  # (a split's own folder is named after it: not "val/val")
            name += f"/{split}"
        counts = write_reports(tmp, spec.class_names, title=f"Predictions on {name}")
        seconds = time.time() - start
        summary = {
            "model": model_dir,
            "input": source,
            "input_kind": kind,
            "split": split,
            "output": output,
            "tta": tta,
            "input_blur": sigma,
            "input_blur_source": blur_source,
            "use_gpu": use_gpu,
            "amp": amp,
            # What --amp chose: the precision and memory format of each actor's forward
            # passes (--amp auto times them per actor; --amp off scores in fp32 everywhere).
            "scored_in": scored_in,
            "num_actors": num_actors,
            "batch_size": batch_size,
            "classes": list(spec.class_names),
            "total": total,
            "errors": n_errors,
            "labelled_errors": errors.labelled,  # of them, files with a true label
            # Folders whose files could not even be listed (no permission): in no count.
            "unlisted_folders": [{"path": path, "reason": reason} for path, reason in unlisted],
            **counts,  # scored, labelled and, with labels, accuracy and macro_f1
            "seconds": round(seconds, 2),
            "images_per_second": round(counts["scored"] / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if summary["scored"] + n_errors != total:
            log.warning("%d scored + %d errors != %d listed", summary["scored"], n_errors, total)
        storage.write_json(storage.join(tmp, SUMMARY_FILE), summary)
        _publish(tmp, output, copying)
        made = []
    finally:
        for open_writer in (writer.writer, errors.writer):  # (closed and None when done)
            with contextlib.suppress(Exception):  # the error that ended the run is the one to see
                if open_writer is not None:
                    open_writer.close()
        failure = sys.exc_info()[1]
        stopped = is_stop(failure) and not isinstance(failure, StoppedLate)
        if tmp in copying and not storage.renames_folders(output):
            if _has_summary(output):
                # The copy into the bucket ended (summary.json goes last); the failure came while
                # the temporary copy was deleted (a Ctrl-C waits for pyarrow's call to return).
                left = (f"its temporary copy {tmp} may be partly left there, and a previous output moved "
                        f"aside as {storage.name_of(output)}.old-<id> beside it: remove them by hand")
                log.warning("The output is complete in %s; %s", output, left)
                if stopped:
                    raise StoppedLate(f"interrupted once the output was complete in {output}; {left}") from None
            else:
                # Stopped while copied into a bucket (no folder renames there): OUT holds part of
                # it; the finished copy beside it marks OUT as this job's, for the rerun to replace.
                log.warning("The copy into %s stopped part way: it holds part of the output, and the "
                            "whole is in %s; a rerun replaces %s (remove %s when not needed)",
                            output, tmp, output, tmp)
                if stopped:
                    raise StoppedLate(f"interrupted while the output was copied into {output}: the whole of "
                                      f"it is in {tmp}; a rerun scores again and replaces {output}") from None
        elif scored_all and failure is not None and storage.exists(storage.join(tmp, PREDICTIONS_DIR)):
            # Every image was scored, then the reports or the move failed (memory for the
            # metrics, a bucket's error): the predictions, hours of work on a large input,
            # are kept where they are; a rerun scores again (and names this folder).
            if _has_summary(tmp):  # (not moved into OUT: _publish put any old OUT back)
                kept = f"the finished output is in {tmp} (not moved to {output})"
            else:
                kept = f"the predictions and errors are kept in {tmp} (not a finished output: no summary.json)"
            log.warning("Every file was scored, then the job failed: %s", kept)
            made = []
            if stopped:
                raise StoppedLate(f"interrupted once every file was scored: {kept}; a rerun scores "
                                  f"again and replaces {output}") from None
        else:
            storage.delete_dir(tmp)
        with contextlib.suppress(Exception):
            storage.remove_empty(made)
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The one line a job prints at the end."""
    quality = (
        f"; accuracy {summary['accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}, "
        f"calibration error {summary['calibration_error']:.3f} on {summary['labelled']} labelled"
        if "accuracy" in summary else "; nothing scored" if not summary["scored"]
        # (every labelled file failed: their errors are in errors.parquet, the rest had no label)
        else f"; no labelled image scored ({summary['labelled_errors']} labelled files failed: errors.parquet)"
        if summary.get("labelled_errors") else "; no true labels"
    )
    unlisted = len(summary.get("unlisted_folders") or [])
    unlisted_said = f"; {unlisted} folder(s) could not be listed, their files not scored (summary.json)" if unlisted else ""
    return (
        f"scored {summary['scored']} of {summary['total']} ({summary['errors']} errors) in "
        f"{summary['seconds']:.1f} s, {summary['images_per_second']:.{0 if summary['images_per_second'] >= 10 else 1}f} images/s"
        f"{' with ' + summary['tta'] + ' TTA' if summary['tta'] else ''}{quality}{unlisted_said}; output: {summary['output']}"
    )


def _import_reports() -> None:
    try:
        import fer_ray.metrics  # noqa: F401
        import fer_ray.reports  # noqa: F401
        import sklearn.metrics  # noqa: F401 - fer_ray.metrics imports it where a report is made
    except Exception:  # noqa: BLE001 - write_reports imports them again and reports the error
        pass


def write_scored(scored: Any, writer: PartWriter, errors: ErrorWriter, class_names: Sequence[str]) -> list[str]:
    """Run the pipeline, the driver writing its rows as they come: predictions to `writer`,
    the files that could not be scored to `errors`. Returns the formats the actors scored in."""
    import pyarrow.compute as pc

    schema = scored_schema(class_names)
    formats: set[str] = set()
    for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
        table = table.select(schema.names).cast(schema)
        formats.update(f for f in table.column(FORMAT_COL).to_pylist() if f is not None)
        table = table.drop_columns([FORMAT_COL])
        if table.column(REASON_COL).null_count < table.num_rows:  # some file failed
            failed = pc.is_valid(table.column(REASON_COL))
            bad = table.filter(failed)
            errors.write(bad.column(PATH_COL).to_pylist(), bad.column(REASON_COL).to_pylist(),
                         bad.column(LABEL_NAME_COL).to_pylist())
            table = table.filter(pc.invert(failed))
        writer.write(table.drop_columns([REASON_COL]))
    return sorted(formats)


def _has_summary(folder: str) -> bool:
    """Whether a finished output's summary.json is in `folder` (False when that cannot be told)."""
    try:
        return storage.exists(storage.join(folder, SUMMARY_FILE))
    except Exception:  # noqa: BLE001 (asked while another error ends the job: that one is shown)
        return False


def _stale_temp_folders(output: str) -> list[str]:
    """Folders an interrupted run left beside OUT: its unfinished `.tmp-` folder, or the
    previous output (`.old-`) when it ended between the two moves of _publish."""
    # (A URI's parent keeps its ?options, and its listing gives decoded names.)
    parent, name = storage.split_last(output)[0], storage.name_of(output)
    if not parent or not storage.is_dir(parent):
        return []
    return [
        storage.child(parent, e.base_name) for e in storage.list_dir(parent)
        if e.base_name.startswith((f"{name}.tmp-", f"{name}.old-"))
    ]


def _publish(tmp: str, output: str, copying: set[str] | None = None) -> None:
    """Swap the finished folder in; the old output goes only once the new one is complete.
    On an object store the folder is copied with summary.json last (storage.move); `copying`
    holds `tmp` while it is moved into OUT, so a failure then is told from one before or
    after it."""
    copying = set() if copying is None else copying
    if storage.exists(output):
        old = storage.sibling(output, f".old-{uuid.uuid4().hex[:8]}")
        storage.move(output, old)
        copying.add(tmp)
        try:
            storage.move(tmp, output, last=SUMMARY_FILE)
        except BaseException:
            # A folder rename failed (OUT made again in between, a permission): the previous
            # output goes back in place. (A bucket's copy, part made, is told of by predict.)
            if storage.renames_folders(output) and not storage.exists(output):
                with contextlib.suppress(Exception):
                    storage.move(old, output)
            raise
        copying.discard(tmp)
        try:
            storage.delete_dir(old)
        except OSError as e:  # (files another user made in it) the new output is in place
            log.warning("The previous output, moved to %s, could not be removed (%s); remove it by hand",
                        old, e)
        except (KeyboardInterrupt, SystemExit) as e:  # (the usual line, "nothing was written",
            if not is_stop(e):                        # would send the user to score it all again)
                raise
            raise StoppedLate(
                f"interrupted once the output was complete in {output}; the previous output, moved "
                f"to {old}, may be partly left there: remove it by hand"
            ) from None
    else:
        copying.add(tmp)
        storage.move(tmp, output, last=SUMMARY_FILE)
        copying.discard(tmp)
