"""Classification metrics (scikit-learn's numbers) as tables for Parquet."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

AVERAGE_ROWS = ("macro avg", "weighted avg")
ACCURACY_ROW = "accuracy"


def metrics_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1 and support, then macro and weighted averages, then
    accuracy (in the f1 column, support = all images): scikit-learn's classification_report."""
    # (imported here: ~1 s of every process importing fer_ray.trainer, a sweep's trials too)
    from sklearn.metrics import classification_report

    labels = list(range(len(class_names)))
    # Keyed by label id, not name: a class named "accuracy" or "macro avg" would replace
    # the report's own entry of that name.
    report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    rows = []
    for key, name in [*((str(i), n) for i, n in enumerate(class_names)), *((a, a) for a in AVERAGE_ROWS)]:
        r = report[key]
        rows.append((name, r["precision"], r["recall"], r["f1-score"], int(r["support"])))
    accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0
    rows.append((ACCURACY_ROW, np.nan, np.nan, accuracy, int(len(y_true))))
    return pd.DataFrame(rows, columns=["name", "precision", "recall", "f1", "support"])


def summary(table: pd.DataFrame) -> dict[str, float]:
    """Accuracy and macro F1 out of a metrics table (its last three rows: a class may have
    any of their names)."""
    macro, _, accuracy = table.iloc[-3:].itertuples(index=False)
    assert (macro.name, accuracy.name) == (AVERAGE_ROWS[0], ACCURACY_ROW), table.tail(3)
    return {"accuracy": float(accuracy.f1), "macro_f1": float(macro.f1)}


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


# The confusion table's first column, the true class: a name no class can have (class names
# are folder names, which hold no "/"), as a column named "true" clashed with a class "true".
TRUE_COL = "true/pred"


def confusion_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Counts, one row per true class (named in TRUE_COL) and one column per predicted class."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(class_names))))
    df = pd.DataFrame(cm, columns=list(class_names))
    df.insert(0, TRUE_COL, list(class_names))
    return df
