"""Classification metrics (scikit-learn's numbers) as tables for Parquet."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

AVERAGE_ROWS = ("macro avg", "weighted avg")
ACCURACY_ROW = "accuracy"


def metrics_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support, then macro and weighted averages, then
    accuracy (in the f1 column, support = all images): scikit-learn's classification_report."""
    labels = list(range(len(class_names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names),
        output_dict=True, zero_division=0,
    )
    rows = []
    for name in [*class_names, *AVERAGE_ROWS]:
        r = report[name]
        rows.append((name, r["precision"], r["recall"], r["f1-score"], int(r["support"])))
    accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0
    rows.append((ACCURACY_ROW, np.nan, np.nan, accuracy, int(len(y_true))))
    return pd.DataFrame(rows, columns=["name", "precision", "recall", "f1", "support"])


def summary(table: pd.DataFrame) -> dict[str, float]:
    """Accuracy and macro F1 out of a metrics table."""
    by_name = table.set_index("name")
    return {
        "accuracy": float(by_name.loc[ACCURACY_ROW, "f1"]),
        "macro_f1": float(by_name.loc["macro avg", "f1"]),
    }


def calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017): the images split into `bins` equal-width
    bins of confidence; per bin, |accuracy - mean confidence|, weighted by the bin's share of
    the images. 0: the confidence column is the chance the prediction is right."""
    correct, confidence = np.asarray(correct, dtype=float), np.asarray(confidence, dtype=float)
    if not len(correct):
        return 0.0
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    # Per bin |sum(correct) - sum(confidence)| / n_bin, weighted by n_bin / n.
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / len(correct))


def confusion_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Counts, one row per true class and one column per predicted class."""
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(class_names))))
    df = pd.DataFrame(cm, columns=list(class_names))
    df.insert(0, "true", list(class_names))
    return df
