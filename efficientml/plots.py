"""The book's standard figures: smoothed training loss and accuracy against epochs.

Every ``runs`` argument is one ``History``, a mapping ``{label: History}``, or a mapping
``{label: [History, ...]}`` of the same run over several seeds, drawn as the mean with a shaded
band from the lowest to the highest seed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

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


Runs = History | Mapping[str, History] | Mapping[str, Sequence[History]]


def _runs(runs: Runs) -> Mapping[str, list[History]]:
    """{label: [History, ...]} (one History per seed) from any accepted form of ``runs``."""
    if isinstance(runs, History):
        runs = {"": runs}
    out = {}
    for label, h in runs.items():
        seeds = [h] if isinstance(h, History) else list(h)
        if not seeds or not all(isinstance(x, History) for x in seeds):
            raise TypeError(f"run {label!r} must be a History or a non-empty list of Histories")
        out[label] = seeds
    return out


def _band(ax, x, ys: list, label: str, **kw):
    """The mean of the equally long series ``ys`` as a line; their min..max as a band if several."""
    n = min(len(y) for y in ys)
    a = np.array([np.asarray(y[:n], dtype=float) for y in ys])
    x = np.asarray(x)[len(x) - n:] if len(x) >= n else np.arange(n)
    line, = ax.plot(x, a.mean(0), label=label or None, **kw)
    if len(ys) > 1:
        ax.fill_between(x, a.min(0), a.max(0), color=line.get_color(), alpha=0.2, lw=0)
    return line


def plot_loss(runs: Runs, window: int = 50, ax=None, title: str | None = None):
    """Per-iteration training loss (bits), smoothed by ``moving_average``, against fractional epochs.

    The smoothed value at an iteration is the mean of the ``window`` iterations ending there.
    With several seeds, the line is the mean of the seeds' smoothed losses, the band their range.
    """
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, hs in _runs(runs).items():
        hs = [h for h in hs if h.iter_loss]
        if not hs:
            continue
        ys = [moving_average(h.iter_loss, window) for h in hs]
        _band(ax, hs[0].iter_epoch, ys, label)
        for h in hs:
            if h.diverged:
                ax.axvline(h.diverged_at, color="red", ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="training loss (bits)", title=title)
    if any(_runs(runs)):
        ax.legend()
    return ax


def plot_accuracy(runs: Runs, split: str = "test", ax=None,
                  title: str | None = None):
    """Accuracy (%) after each epoch, for the ``test`` or ``train`` split, one line per run
    (with several seeds: their mean, and a band from the lowest to the highest)."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, hs in _runs(runs).items():
        accs = [np.asarray(getattr(h, f"{split}_acc")) * 100 for h in hs]
        n = min(len(a) for a in accs)
        _band(ax, np.arange(1, n + 1), accs, label, marker="o", ms=3)
    ax.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(_runs(runs)):
        ax.legend()
    return ax


def plot_lr(runs: Runs, ax=None, title: str | None = None):
    """The learning rate each epoch was trained with, one step line per run: epoch k (1-based)
    trains from x = k - 1 to x = k, so a change of rate shows where it happens, at an epoch's
    start. (Seeds share a schedule: the first seed's is drawn.)"""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    for label, hs in _runs(runs).items():
        lr = list(hs[0].lr)
        ax.step(np.arange(len(lr) + 1), lr + lr[-1:], where="post", label=label or None)
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(_runs(runs)):
        ax.legend()
    return ax


def plot_history(runs: Runs, window: int = 50, title: str | None = None):
    """The standard two-panel figure: smoothed training loss and test accuracy against epochs."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    plot_loss(runs, window, ax=a)
    plot_accuracy(runs, "test", ax=b)
    if title:
        fig.suptitle(title)
    return fig


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage, e.g. ``pct(0.6987) == '69.9%'``."""
    return f"{100 * x:.{digits}f}%"


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


def plot_roofline(roofs: Sequence, workloads: Sequence = (), ax=None, title: str | None = None):
    """Chapter 7's roofline on log-log axes: for each ``cost.Roofline`` in ``roofs`` the
    attainable FLOP/s against arithmetic intensity (FLOP per byte), min(peak, bandwidth x I), its
    ridge marked; each ``cost.Workload`` as a point at its intensity and measured FLOP/s."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8.5, 5))
    points = [w.intensity for w in workloads] + [r.ridge for r in roofs]
    lo, hi = min(points + [1.0]) / 3, max(points + [100.0]) * 3
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    for r, style in zip(roofs, ("-", "--", ":", "-.")):
        label = f"{r.threads} thread{'s' if r.threads != 1 else ''}: roof"
        ax.plot(x, np.minimum(r.peak_flops, r.bandwidth * x) / 1e9, "k" + style, lw=1.5, label=label)
        ax.plot([r.ridge], [r.peak_flops / 1e9], "ko", ms=4)
    markers = "osD^v<>p*h"
    for i, w in enumerate(workloads):
        ax.plot([w.intensity], [w.flops_per_s / 1e9], markers[i % len(markers)], ms=8, label=w.name)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte moved)",
           ylabel="GFLOP/s", title=title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_data_parallel(single: Sequence[float], runs: Mapping[str, Sequence[float]], window: int = 10,
                       axes=None, title: str | None = None):
    """Chapter 8's comparison of training runs: left, the training loss per step (nats) of the
    one-process run ``single`` and of each run of ``runs`` ({label: losses}), smoothed over
    ``window`` steps; right, each run's loss minus the one-process run's at the same step, raw."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    left, right = axes
    steps = np.arange(1, len(single) + 1)
    w = min(window, len(single))
    left.plot(steps[w - 1:], moving_average(single, w), "k", lw=2.5, label="one process, whole batch")
    for (label, losses), style in zip(runs.items(), ("--", ":", "-.", "-")):
        n = len(losses)
        left.plot(steps[w - 1:n], moving_average(losses, w), style, label=label)
        right.plot(steps[:n], np.asarray(losses) - np.asarray(single[:n]), style, label=label)
    left.set(xlabel="step", ylabel=f"training loss (nats, mean of {w} steps)", title=title)
    right.set(xlabel="step", ylabel="loss minus one process's (nats)", title="the differences")
    right.axhline(0, color="k", lw=0.8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return axes


def plot_allreduce(sizes: Sequence[int], seconds: Sequence[float], fastest: Sequence[float] | None = None,
                   ax=None, title: str | None = None):
    """Chapter 8's all-reduce cost: seconds of one ``all_reduce`` of a float32 tensor against
    its size in bytes, log-log: the median call, the fastest call if given, and the cost model
    ``a + n / b`` drawn from the fastest calls' end points (the median's without them): a fixed
    latency ``a`` (the smallest message) and a rate ``b`` (the largest)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.2))
    nbytes = 4 * np.asarray(sizes, dtype=float)
    ms = 1e3 * np.asarray(seconds)
    ax.plot(nbytes, ms, "o-", label="median call")
    best = ms if fastest is None else 1e3 * np.asarray(fastest)
    if fastest is not None:
        ax.plot(nbytes, best, "s:", label="fastest call")
    latency, rate = best[0], nbytes[-1] / best[-1]
    x = np.logspace(np.log10(nbytes[0]), np.log10(nbytes[-1]), 100)
    ax.plot(x, latency + x / rate, "k--", lw=1, label="latency of the smallest + size / rate of the largest")
    ax.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="ms per all-reduce", title=title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return ax


def plot_memory_curves(x: Sequence[float], curves: Mapping[str, Sequence[float]], xlabel: str, ax=None,
                       title: str | None = None):
    """Bytes against ``x`` (log-log), one line per ``{label: bytes}`` of ``curves``, in GB."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.3))
    for (label, y), style in zip(curves.items(), ("o-", "s--", "D:", "^-.", "v-", "x--")):
        ax.plot(x, np.asarray(y, dtype=float) / 1e9, style, label=label, ms=4)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="GB", title=title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return ax


def plot_weight_quantization(rows: Sequence[Mapping], float32_loss: float, split: str, ax=None,
                             title: str | None = None):
    """The serving chapter's sweep: loss (nats) on ``split`` against bits per weight, one line per
    (method, group size), the mean over calibration sets with their range as error bars; the
    float32 model's loss dashed."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.3))
    keys = sorted({(r["group"], r["method"]) for r in rows}, key=lambda k: (k[0], "rtn awq gptq".index(k[1])))
    styles = {"rtn": "o-", "awq": "s--", "gptq": "D:"}
    names = {"rtn": "round to nearest", "awq": "AWQ", "gptq": "GPTQ"}
    for group, method in keys:
        bits = sorted({r["bits"] for r in rows if (r["group"], r["method"]) == (group, method)}, reverse=True)
        vals = [[r[split] for r in rows if (r["group"], r["method"], r["bits"]) == (group, method, b)] for b in bits]
        mean = np.array([np.mean(v) for v in vals])
        err = np.array([[m - min(v) for v, m in zip(vals, mean)], [max(v) - m for v, m in zip(vals, mean)]])
        ax.errorbar(bits, mean, yerr=err, fmt=styles[method], ms=4, capsize=3,
                    color="C0" if group == min(k[0] for k in keys) else "C3", label=f"{names[method]}, groups of {group}")
    ax.axhline(float32_loss, color="k", ls="--", lw=1, label="float32")
    ax.invert_xaxis()
    ax.set(xlabel="bits per code (b)", ylabel=f"loss on the {split} text (nats)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return ax


def plot_decode_speeds(speeds: Mapping[str, Mapping], bandwidth: float, ax=None, title: str | None = None):
    """The serving chapter's decoding: milliseconds per generated token against the megabytes of
    weights each variant reads per token (log-log), and the time reading those bytes takes at the
    measured copy rate ``bandwidth`` (bytes/s): the memory roof."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.2))
    mb = np.array([v["weight_bytes"] for v in speeds.values()]) / 1e6
    for (name, v), marker in zip(speeds.items(), "osD^v"):
        ax.plot(v["weight_bytes"] / 1e6, 1e3 * v["decode_s"], marker, ms=7, label=name)
    x = np.logspace(np.log10(mb.min() / 1.5), np.log10(mb.max() * 1.5), 50)
    ax.plot(x, 1e3 * x * 1e6 / bandwidth, "k--", lw=1, label="reading the weights at the copy rate")
    ax.set(xscale="log", yscale="log", xlabel="weights read per token (MB)", ylabel="ms per token (batch 1)",
           title=title)
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ticks = [t for t in (10, 20, 50, 100, 200, 500, 1000, 2000) if x.min() <= t <= x.max()]
    if ticks:                     # a range under a decade: plain labels, not crowded minor ones
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))   # beside the points, not on them
    return ax


def plot_speculative(sweeps: Mapping[str, Mapping], axes=None):
    """The serving chapter's speculative decoding: tokens gained per target call, and the measured
    speed-up over the target alone, against the draft length k; one line per ``{label: sweep}``
    (``experiments.serving.speculative_sweep``'s results)."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for (label, sw), style in zip(sweeps.items(), ("o-", "s--", "D:", "^-.", "v-", "x--")):
        ks = sorted(sw["k"])
        axes[0].plot(ks, [sw["k"][k]["tokens_per_round"] for k in ks], style, label=label)
        axes[1].plot(ks, [sw["k"][k]["speedup"] for k in ks], style, label=label)
    axes[0].plot(ks, [k + 1 for k in ks], "k:", lw=1, label="every guess kept (k + 1)")
    axes[1].axhline(1, color="k", lw=1, ls=":")
    axes[0].set(xlabel="draft length k", ylabel="tokens per target call")
    axes[1].set(xlabel="draft length k", ylabel="speed-up over the target alone")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8)
    return axes
