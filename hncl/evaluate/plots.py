"""PNG figures: confusion matrix, training curves, heatmap-neighbour grid."""

from __future__ import annotations

from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_png(cm: Sequence[Sequence[int]], classes: List[str], path: str, title: str = "") -> None:
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(classes), 0.8 + 0.8 * len(classes)))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(cm[i, j])}\n{rows[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_png(history: List[Dict[str, float]], keys: List[str], path: str, title: str = "") -> None:
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys):
        pts = [(h["epoch"] if "epoch" in h else h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch" if history and "epoch" in history[0] else "step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def neighbour_grid_png(images: np.ndarray, labels: np.ndarray, neighbours: np.ndarray, classes: List[str],
                       path: str, title: str = "query | its heatmap nearest neighbours") -> None:
    """images [N, H, W, 3] uint8; neighbours [Q, k] indices into images; row q shows query q."""
    q, k = neighbours.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.3 * (k + 1), 1.45 * q))
    axes = np.atleast_2d(axes)
    for r in range(q):
        for c, idx in enumerate([r] + list(neighbours[r])):
            ax = axes[r, c]
            ax.imshow(images[idx])
            same = labels[idx] == labels[r]
            ax.set_title(classes[labels[idx]] if labels[idx] >= 0 else "?", fontsize=7,
                         color="black" if c == 0 else ("green" if same else "red"))
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
