"""The book's standard figures: smoothed training loss and accuracy against epochs."""
from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from .train import History


def moving_average(x, window: int) -> np.ndarray:
    """Mean of each run of ``window`` consecutive values of the 1-D ``x``; length len(x) - window + 1.

    A window longer than ``x`` shrinks to len(x) (one value, the mean). NaN or inf in ``x``
    is rejected: a diverged run's losses should be cut at ``History.diverged_at`` first.
    """
    a = np.asarray(x, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"moving_average needs a non-empty 1-D sequence, got shape {a.shape}")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if not np.isfinite(a).all():
        raise ValueError("moving_average got NaN or inf values")
    window = min(int(window), a.size)
    c = np.cumsum(np.concatenate([[0.0], a]))
    return (c[window:] - c[:-window]) / window


def _runs(runs: History | Mapping[str, History]) -> Mapping[str, History]:
    return {"": runs} if isinstance(runs, History) else runs


def plot_loss(runs: History | Mapping[str, History], window: int = 50, ax=None, title: str | None = None):
    """Per-iteration training loss (bits), smoothed by ``moving_average``, against fractional epochs.

    The smoothed value at an iteration is the mean of the ``window`` iterations ending there.
    """
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, h in _runs(runs).items():
        if not h.iter_loss:
            continue
        y = moving_average(h.iter_loss, window)
        ax.plot(h.iter_epoch[len(h.iter_epoch) - len(y):], y, label=label or None)
        if h.diverged:
            ax.axvline(h.diverged_at, color="red", ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="training loss (bits)", title=title)
    if any(_runs(runs)):
        ax.legend()
    return ax


def plot_accuracy(runs: History | Mapping[str, History], split: str = "test", ax=None,
                  title: str | None = None):
    """Accuracy (%) after each epoch, for the ``test`` or ``train`` split, one line per run."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, h in _runs(runs).items():
        acc = np.asarray(getattr(h, f"{split}_acc")) * 100
        ax.plot(np.arange(1, len(acc) + 1), acc, marker="o", ms=3, label=label or None)
    ax.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(_runs(runs)):
        ax.legend()
    return ax


def plot_lr(runs: History | Mapping[str, History], ax=None, title: str | None = None):
    """The learning rate each epoch was trained with, one step line per run."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, h in _runs(runs).items():
        ax.step(np.arange(1, len(h.lr) + 1), h.lr, where="mid", marker="o", ms=3, label=label or None)
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(_runs(runs)):
        ax.legend()
    return ax


def plot_history(runs: History | Mapping[str, History], window: int = 50, title: str | None = None):
    """The standard two-panel figure: smoothed training loss and test accuracy against epochs."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    plot_loss(runs, window, ax=a)
    plot_accuracy(runs, "test", ax=b)
    if title:
        fig.suptitle(title)
    return fig


def seconds(t: float) -> str:
    """A duration as the book prints it, e.g. ``'12.3 s'`` (nbval's sanitizer masks this form)."""
    return f"{t:.1f} s"


def markdown_table(rows: list[list], headers: list[str]) -> str:
    """A Markdown table; floats print with 4 significant digits, None as an empty cell."""
    def cell(v):
        if v is None:
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row needs one cell per header")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
