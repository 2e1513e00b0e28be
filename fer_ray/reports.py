"""Plots for a run: learning curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # jobs run headless on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_learning_curves(history: pd.DataFrame, path: str | Path) -> None:
    """Loss and accuracy per epoch, train vs val, with the fine-tuning phase change marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history["epoch"]
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "acc", "Accuracy")):
        ax.plot(epochs, history[f"train_{metric}"], marker="o", label="train")
        ax.plot(epochs, history[f"val_{metric}"], marker="o", label="val")
        phases = history["phase"].tolist()
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(epochs.iloc[i] - 0.5, color="gray", linestyle="--", label="unfrozen")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    best = history["val_acc"].idxmax()
    axes[1].annotate(
        f"best {history['val_acc'][best]:.3f}",
        (epochs[best], history["val_acc"][best]),
        textcoords="offset points", xytext=(0, -15), ha="center",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(
    counts: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> None:
    """Row-normalised heatmap (recall per true class) with the counts written in."""
    counts = np.asarray(counts)
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2.5, 1.0 * k + 1.8))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, f"{counts[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n={int(counts.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: pd.DataFrame, histories: dict[str, pd.DataFrame], path: str | Path) -> None:
    """Best val accuracy against LR coloured by label smoothing, and every trial's val curve."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scored = results.dropna(subset=["best_val_acc"])
    if len(scored):
        points = left.scatter(
            scored["lr"], scored["best_val_acc"], c=scored["label_smoothing"], cmap="viridis",
            s=60, edgecolors="black",
        )
        fig.colorbar(points, ax=left, label="label smoothing")
        best = scored.loc[scored["best_val_acc"].idxmax()]
        left.annotate(f"best {best['best_val_acc']:.3f}", (best["lr"], best["best_val_acc"]),
                      textcoords="offset points", xytext=(0, 8), ha="center")
    left.set_xscale("log")
    left.set_xlabel("learning rate")
    left.set_ylabel("best val accuracy")
    left.set_title(f"{len(scored)} of {len(results)} trials scored")
    left.grid(alpha=0.3)
    for trial_id, history in sorted(histories.items()):
        right.plot(history["epoch"], history["val_acc"], marker=".", label=trial_id)
    right.set_xlabel("epoch")
    right.set_ylabel("val accuracy")
    right.set_title("Val accuracy per trial (ASHA stops weak ones early)")
    right.grid(alpha=0.3)
    if 0 < len(histories) <= 12:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
