"""Metrics tables match scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from fer_ray.metrics import TRUE_COL, calibration_error, confusion_table, metrics_table, summary


def test_metrics_table_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
    y_pred[y_pred == 3] = 2  # class 3 never predicted: precision 0, no warning
    names = ["a", "b", "c", "d"]
    table = metrics_table(y_true, y_pred, names).set_index("name")
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose(table.loc[names, "precision"], p)
    np.testing.assert_allclose(table.loc[names, "recall"], r)
    np.testing.assert_allclose(table.loc[names, "f1"], f)
    assert table.loc[names, "support"].tolist() == s.tolist()
    assert np.isclose(table.loc["macro avg", "f1"], f1_score(y_true, y_pred, average="macro"))
    assert np.isclose(table.loc["weighted avg", "f1"], f1_score(y_true, y_pred, average="weighted"))
    assert summary(table.reset_index())["accuracy"] == accuracy_score(y_true, y_pred)


def test_confusion_table_counts() -> None:
    table = confusion_table(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), ["x", "y", "z"])
    assert table[TRUE_COL].tolist() == ["x", "y", "z"]
    assert table[["x", "y", "z"]].to_numpy().tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_classes_named_like_the_reports_own_rows_and_columns() -> None:
    """A class "true" clashed with the confusion table's column of that name (pandas
    refused it); classes "accuracy" or "macro avg" replaced scikit-learn's entries of those
    names, and the summary read two rows as one number."""
    names = ["accuracy", "macro avg", "true", "weighted avg"]
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 3, 3, 2, 3])
    table = metrics_table(y_true, y_pred, names)
    assert table["name"].tolist() == [*names, "macro avg", "weighted avg", "accuracy"]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    np.testing.assert_allclose(table["f1"][:4], f)
    assert table["support"][:4].tolist() == s.tolist()
    assert summary(table) == pytest.approx(
        {"accuracy": accuracy_score(y_true, y_pred), "macro_f1": f1_score(y_true, y_pred, average="macro")}
    )
    cm = confusion_table(y_true, y_pred, names)
    assert cm.columns.tolist() == [TRUE_COL, *names]
    assert cm[names].to_numpy().sum() == len(y_true)


def test_calibration_error() -> None:
    # Two bins: confidence 0.95 right half the time, 0.55 always right: 0.45 off in each.
    assert calibration_error([1, 0, 1, 1], [0.95, 0.95, 0.55, 0.55]) == pytest.approx(0.45)
    # Right exactly as often as the confidence says, in every bin: 0.
    right = [1] * 3 + [0] + [1] * 2 + [0] * 2
    assert calibration_error(right, [0.75] * 4 + [0.5] * 4) == pytest.approx(0.0)
    assert calibration_error([1, 1], [1.0, 1.0]) == pytest.approx(0.0)  # confidence 1 is in the last bin
    assert calibration_error([], []) == 0.0


def test_plots_draw_names_with_dollar_signs_as_written(tmp_path) -> None:
    """Matplotlib reads text between two `$` as mathtext: a folder named `tips_$5_$10` in
    the title, or such class names, failed the drawing after a scoring job's work."""
    import matplotlib

    from fer_ray.reports import plot_confusion_matrix

    names = ["cost_$5", "cost_$10^{", "happy"]
    path = tmp_path / "cm.png"
    plot_confusion_matrix(np.array([[2, 1, 0], [0, 3, 0], [1, 0, 4]]), names, path, title="Predictions on tips_$5_$10")
    assert path.stat().st_size > 0
    assert matplotlib.rcParams["text.parse_math"]  # the setting is the plot's, not the process's


class _KeptFigures:
    """The figures a plotting function draws, kept open for the test to read (plt.close
    is skipped while in use)."""

    def __init__(self, monkeypatch) -> None:
        import matplotlib.pyplot as plt

        self.figures = []
        subplots = plt.subplots

        def kept(*args, **kwargs):
            fig, axes = subplots(*args, **kwargs)
            self.figures.append(fig)
            return fig, axes

        monkeypatch.setattr(plt, "subplots", kept)
        monkeypatch.setattr(plt, "close", lambda fig=None: None)


def test_learning_curves_tick_whole_epochs_and_never_mark_a_diverged_epoch_best(tmp_path, monkeypatch) -> None:
    """One epoch drew ticks at 0.95 ... 1.05; and an epoch whose weights had diverged (its
    val_acc empty) was marked best (argmax of NaN is its index)."""
    import pandas as pd

    from fer_ray.reports import plot_learning_curves

    kept = _KeptFigures(monkeypatch)
    row = {"phase": "scratch", "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.3}
    plot_learning_curves(pd.DataFrame([{**row, "epoch": 1, "val_acc": 0.4}]), tmp_path / "one.png")
    for ax in kept.figures[0].axes:
        assert [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] == [1]
    history = pd.DataFrame([{**row, "epoch": e, "val_acc": a} for e, a in ((1, 0.4), (2, 0.5), (3, float("nan")))])
    plot_learning_curves(history, tmp_path / "diverged.png")
    labels = kept.figures[1].axes[1].get_legend_handles_labels()[1]
    assert "best 0.500 (epoch 2)" in labels and "val" in labels
    plot_learning_curves(history, tmp_path / "ema.png", ema_decay=0.999)  # val scores the average
    assert "val (weights averaged, EMA 0.999)" in kept.figures[2].axes[0].get_legend_handles_labels()[1]
    assert (tmp_path / "diverged.png").stat().st_size > 0
    # Diverged in epoch 2 (losses NaN and inf): the loss panel's only finite epoch drew
    # ticks at 1.02 ... 1.50, and epoch 2 was off its axis.
    two = pd.DataFrame([{**row, "epoch": 1, "val_acc": 0.4},
                        {**row, "epoch": 2, "val_acc": float("nan"), "train_loss": float("nan"), "val_loss": float("inf")}])
    plot_learning_curves(two, tmp_path / "diverged2.png")
    for ax in kept.figures[3].axes:
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1, 2] and lo < 1 and hi > 2


def test_a_class_with_no_true_images_has_no_recall_in_the_heatmap(tmp_path, monkeypatch) -> None:
    """Its row read "0 / 0%" in the colour of a class the model always misses."""
    from fer_ray.reports import plot_confusion_matrix

    kept = _KeptFigures(monkeypatch)
    plot_confusion_matrix(np.array([[2, 1, 0], [0, 0, 0], [1, 0, 4]]), ["a", "b", "c"], tmp_path / "cm.png")
    texts = [t.get_text() for t in kept.figures[0].axes[0].texts]
    assert texts[3:6] == ["0\n-"] * 3 and texts[0] == "2\n67%"
    shown = kept.figures[0].axes[0].images[0].get_array()
    assert shown.mask[1].all() and not shown.mask[[0, 2]].any()  # drawn grey, not as 0%


def test_a_confusion_matrix_of_many_classes_keeps_its_size_and_long_names_fit(tmp_path, monkeypatch) -> None:
    """The figure grew with the classes and wrote k² numbers: 40 classes took 7 s and made
    a 5,000-px image, a few hundred ran for minutes. A long class name pushed the matrix off
    the figure."""
    from PIL import Image

    from fer_ray.reports import plot_confusion_matrix

    kept = _KeptFigures(monkeypatch)
    k = 150
    counts = np.random.default_rng(0).integers(0, 5, (k, k))
    plot_confusion_matrix(counts, [f"class {i}" for i in range(k)], tmp_path / "many.png")
    assert not kept.figures[0].axes[0].texts  # the colour alone
    assert max(Image.open(tmp_path / "many.png").size) < 4000
    long = "a very long class name that goes on and on past any axis"
    plot_confusion_matrix(np.eye(3, dtype=int), [long, "b", "c"], tmp_path / "long.png")
    shown = [t.get_text() for t in kept.figures[1].axes[0].get_yticklabels()]
    assert shown[0] == long[:31] + "\u2026" and shown[1:] == ["b", "c"]
    # Names alike in their first 31 characters: their ends shown too, so they read apart.
    alike = ["x" * 31 + "_happy", "x" * 31 + "_sad", "y"]
    plot_confusion_matrix(np.eye(3, dtype=int), alike, tmp_path / "alike.png")
    shown = [t.get_text() for t in kept.figures[2].axes[0].get_yticklabels()]
    assert len(set(shown)) == 3 and all(len(n) <= 32 for n in shown) and shown[0].endswith("_happy"), shown
    assert len(kept.figures[1].axes[0].texts) == 9  # few classes: the numbers written in
