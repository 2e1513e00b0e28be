"""Plots for a run: learning curves and the confusion matrix."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # jobs run headless on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402


def _literal_text(plot: Callable[..., None]) -> Callable[..., None]:
    """`plot` with its text drawn as written: matplotlib otherwise reads the text between two
    `$` as mathtext, and a folder or class name such as `tips_$5_$10` failed the drawing
    (a ValueError at savefig, after the job's work was done)."""

    @functools.wraps(plot)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        with plt.rc_context({"text.parse_math": False}):
            plot(*args, **kwargs)

    return wrapped


@_literal_text
def plot_learning_curves(history: pd.DataFrame, path: str | Path, ema_decay: float = 0.0) -> None:
    """Loss and accuracy per epoch, train vs val, with the fine-tuning phase change marked.
    With `ema_decay`, val scores the moving average of the weights (--ema-decay), and its
    label says so: the train curves are the weights the optimizer steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history["epoch"]
    val = f"val (weights averaged, EMA {ema_decay:g})" if ema_decay else "val"
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, history[f"train_{metric}"], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label=val)
        phases = history["phase"].tolist()
        for i in range(1, len(phases)):
            # (a run from random weights resumed across the rename of its phase changes nothing)
            if phases[i - 1] == "head" and phases[i] != "head":
                ax.axvline(epochs.iloc[i] - 0.5, color="gray", linestyle="--", label="unfrozen")
        ax.set_xlabel("epoch")
        whole_epochs(ax, epochs)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    # The best epoch marked, and named in the legend (a label beside the point ran into the
    # curve or off the plot). The first of equal epochs, as best/ holds it; never an epoch
    # whose weights had diverged (its val_acc is empty).
    val_acc = history["val_acc"].to_numpy(dtype=float)
    if np.isfinite(val_acc).any():
        best = int(np.nanargmax(val_acc))
        axes[1].plot(epochs.iloc[best], val_acc[best], marker="o", markersize=14, markerfacecolor="none",
                     markeredgecolor="red", markeredgewidth=2, linestyle="none",
                     label=f"best {val_acc[best]:.3f} (epoch {epochs.iloc[best]})")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def whole_epochs(ax: Any, epochs: Iterable[int]) -> None:
    """Epoch ticks at whole numbers: matplotlib's integer locator falls back to fractions
    (0.95, 1.00, 1.05) when fewer than two whole numbers are in view, as with one epoch."""
    shown = sorted(set(epochs))
    if len(shown) < 2:
        ax.set_xticks(shown)
    else:
        # Every epoch in view, also one whose values are not finite (a diverged last epoch
        # left the loss panel one epoch of data, and its fractional ticks)
        ax.set_xlim(shown[0] - 0.5, shown[-1] + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


@_literal_text
def plot_confusion_matrix(
    counts: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> None:
    """Row-normalised heatmap (recall per true class) with the counts written in; a class
    with no true images has no recall: its row is grey, with a dash for each share."""
    counts = np.asarray(counts)
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    k = len(class_names)
    # Up to CELL_TEXT_MAX classes a cell of 1.1 inches, its count and share written in; more
    # share MATRIX_MAX_IN inches, the colour alone (k² texts on a figure growing with k:
    # 40 classes took 7 s and 5,000 px a side, a few hundred ran for minutes).
    cell = min(1.1, MATRIX_MAX_IN / max(k, 1))
    fig, ax = plt.subplots(figsize=(cell * k + 2.5, cell * k / 1.1 + 1.8))
    cmap = plt.get_cmap("Blues").with_extremes(bad="lightgray")
    im = ax.imshow(np.ma.masked_where(np.broadcast_to(totals == 0, norm.shape), norm), cmap=cmap, vmin=0, vmax=1)
    for i in range(k if k <= CELL_TEXT_MAX else 0):
        for j in range(k):
            share = f"{norm[i, j]:.0%}" if totals[i, 0] else "-"
            ax.text(
                j, i, f"{counts[i, j]}\n{share}", ha="center", va="center", fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    names = short_labels(list(map(str, class_names)))
    size = 10 if k <= CELL_TEXT_MAX else max(2.0, 10 * CELL_TEXT_MAX / k)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=size)
    ax.set_yticks(range(k), names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n={int(counts.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CELL_TEXT_MAX = 30  # classes up to which the confusion matrix's cells hold their numbers
MATRIX_MAX_IN = 33.0  # inches the matrix of more classes takes, whatever their number
LABEL_MAX = 32  # characters of a class name shown on the confusion matrix's axes


def short_labels(names: list[str]) -> list[str]:
    """Class names cut to LABEL_MAX characters for the axes (a long one pushed the matrix
    off the figure): the start kept, or, where two names would then read alike (names
    that differ only at their end), the start and the end around the cut."""
    def cut(n: str, tail: int) -> str:
        return n if len(n) <= LABEL_MAX else n[: LABEL_MAX - 1 - tail] + "\u2026" + n[len(n) - tail:]

    shown = [cut(n, 0) for n in names]
    alike = {s for s in shown if shown.count(s) > 1}
    return [cut(n, LABEL_MAX // 3) if s in alike else s for n, s in zip(names, shown)]


@_literal_text
def plot_sweep(results: pd.DataFrame, histories: dict[str, pd.DataFrame], path: str | Path) -> None:
    """Best val accuracy against LR coloured by label smoothing, and every trial's val curve."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    # The best ringed among the trials that finished (as best/ is chosen); failed trials
    # marked x, at their best epoch's accuracy or, with none, on the axis.
    finished = results[results["status"] == "TERMINATED"].dropna(subset=["best_val_acc"])
    failed = results[results["status"] != "TERMINATED"]
    if len(finished):
        points = left.scatter(
            finished["lr"], finished["best_val_acc"], c=finished["label_smoothing"], cmap="viridis",
            s=60, edgecolors="black",
        )
        fig.colorbar(points, ax=left, label="label smoothing")
        best = finished.loc[finished["best_val_acc"].idxmax()]
        left.plot(best["lr"], best["best_val_acc"], marker="o", markersize=16, markerfacecolor="none",
                  markeredgecolor="red", markeredgewidth=2, linestyle="none", label=f"best {best['best_val_acc']:.3f} (trial {best['trial_id']})")
    if len(failed):
        left.scatter(failed["lr"], failed["best_val_acc"].fillna(0.0), marker="x", color="red", s=60,
                     clip_on=False, label=f"failed ({len(failed)})")
    if not len(finished):
        left.set_ylim(0, 1)
    if len(finished) or len(failed):
        left.legend(fontsize=8)
    left.set_xscale("log")
    lrs = results["lr"].dropna()
    if len(lrs):
        # Labelled ticks of our own: within one decade matplotlib labels every minor tick,
        # and the labels ran into each other.
        ticks = lr_ticks(lrs.min(), lrs.max())
        left.xaxis.set_major_locator(FixedLocator(ticks))
        left.xaxis.set_major_formatter(FuncFormatter(tick_labels(ticks)))
        left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("learning rate")
    left.set_ylabel("best val accuracy")
    left.set_title(f"{len(finished)} of {len(results)} trials finished" + (f", {len(failed)} failed" if len(failed) else ""))
    left.grid(alpha=0.3)
    for trial_id, history in sorted(histories.items()):
        right.plot(history["epoch"], history["val_acc"], marker=".", label=trial_id)
    right.set_xlabel("epoch")
    whole_epochs(right, (e for h in histories.values() for e in h["epoch"]))
    right.set_ylabel("val accuracy")
    longest = max((len(h) for h in histories.values()), default=0)
    short = sum(len(h) < longest for h in histories.values())
    # (shorter for any reason: ASHA, --patience, the time budget, a failure or divergence)
    right.set_title(f"Val accuracy per trial ({short} shorter than the longest)" if short else "Val accuracy per trial")
    right.grid(alpha=0.3)
    if 0 < len(histories) <= 12:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Ticks for learning rates from lo to hi on a log axis: 1, 2 and 5 of each decade in
    range, only the decades when those are too many, and lo and hi when fewer than two fall
    in range."""
    lo, hi = float(lo), float(hi)
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    inside = [m * 10.0 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    if len(inside) > most:
        inside = [t for t in inside if np.isclose(t, 10.0 ** np.round(np.log10(t)))]
    if len(inside) >= 2:
        return inside
    # lo and hi as they are (rounded, 1.261e-3 and 1.268e-3 were one tick outside the data,
    # and the axis had no label; tick_labels writes them short), but not one that would sit
    # on a 1-2-5 tick in range (1.95e-4 beside 2e-4: two labels one on the other)
    ends = [e for e in (lo, hi) if not any(abs(np.log10(e / t)) < 0.05 for t in inside)]
    return sorted({*ends, *inside})


def tick_labels(ticks: Sequence[float]) -> Callable[[float, Any], str]:
    """A formatter that writes each of `ticks` with the fewest significant digits (2 to 6)
    that tell them apart."""
    digits = next((d for d in range(2, 7) if len({f"{t:.{d}g}" for t in ticks}) == len(set(ticks))), 6)
    return lambda v, _: f"{v:.{digits}g}"

