"""Names defined once: columns, splits, classes and the files a run writes."""

from __future__ import annotations

# Parquet shard columns.
IMAGE_COL = "image"
LABEL_COL = "label"
PATH_COL = "path"

# Split names, and the folder names users give them.
TRAIN = "train"
VAL = "val"
TEST = "test"
SPLITS = (TRAIN, VAL, TEST)
SPLIT_ALIASES = {
    "train": TRAIN,
    "training": TRAIN,
    "val": VAL,
    "valid": VAL,
    "validation": VAL,
    "test": TEST,
}

# FER2013 classes in the project's label order.
FER_CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
# The FER2013 CSV's `emotion` codes (0..6) name the classes in a different order.
FER_CSV_CODES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_CSV_USAGE = {"Training": TRAIN, "PublicTest": VAL, "PrivateTest": TEST}


def class_key(name: str) -> str:
    """A class folder's name as classes are matched: in any letter case, and in Unicode's
    composed form (a zip made on macOS names "colère" with a separate accent)."""
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


# jobs/predict.py --tta modes (fer_ray.predict.tta_views).
TTA_MODES = ("flip", "ten-crop")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Files in a prepared shards folder.
MANIFEST_FILE = "manifest.json"

# Files in a run folder (and in a model folder, `best/`).
CONFIG_FILE = "config.json"
SWEEP_CONFIG_FILE = "sweep_config.json"  # a sweep folder's settings
BEST_CONFIG_FILE = "best_config.json"  # a sweep folder's best trial's settings, to train again
HISTORY_FILE = "history.csv"
BEST_DIR = "best"
WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
LEARNING_CURVES_FILE = "learning_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
VAL_METRICS_FILE = "val_metrics.parquet"
RUN_SUMMARY_FILE = "summary.json"  # the last line's numbers (trainer.finalize_run)
TRAIN_STATE_FILE = "train_state.pt"
VAL_PREDICTIONS_FILE = "val_predictions.parquet"
RAY_RUN_NAME = "ray_train"
# Ray Train's record of the checkpoints a run reported, in RAY_RUN_NAME: there once one was.
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
TRIALS_DIR = "trials"  # a sweep's folder of its trials' run folders

# How the error of a run (a sweep's trial) that diverged before any epoch to keep begins
# (fer_ray.trainer.TrainingDiverged; jobs/tune.py counts such trials by it).
DIVERGED = "Training diverged"
