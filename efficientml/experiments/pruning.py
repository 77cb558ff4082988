"""Chapter 3's experiments: the ConvNet pruned structurally and unstructurally on a schedule."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..models import ConvNet
from ..pruning import PruningSchedule, SparseConvNet
from ..seeds import SEEDS, spread
from ..train import History
from .core import register, train_loaders
from .learning_rates import CONVNET_FULL, CONVNET_QUICK, train_convnet

PRUNING_NAMES = ("baseline", "structured", "unstructured")


@dataclass
class PruningRun:
    """One seed's run: the trained model, its History, and its PruningSchedule (None for the
    baseline), whose ``log`` holds the sparsities and ``acc_after`` the test accuracy right
    after each pruning step."""
    model: nn.Module
    history: History
    schedule: PruningSchedule | None


def train_pruning_runs(s: dict, out_dir: Path | None = None, device=None, progress=None) -> dict:
    """The baseline ConvNet, and SparseConvNets pruned structurally and unstructurally on the
    schedule of ``s`` (prune_start, prune_every, prune_stop, prune_step), all with the multistep
    schedule, once for every seed of ``s["seeds"]`` (the seed picks the data subset, the initial
    weights and the batches; the three runs of a seed share them). The schedules also evaluate
    the test accuracy right after each pruning step. Returns {name: [PruningRun per seed]}."""
    runs = {name: [] for name in PRUNING_NAMES}
    for seed in s["seeds"]:
        ss = s | {"seed": seed}
        test_loader = train_loaders(ss, device)[1]
        for name in PRUNING_NAMES:
            schedule = None if name == "baseline" else PruningSchedule(
                name, ss["prune_start"], ss["prune_every"], ss["prune_stop"], ss["prune_step"],
                evaluate_on=test_loader)
            granularity = "filter" if name == "structured" else "weight"
            make_model = ConvNet if name == "baseline" else functools.partial(SparseConvNet,
                                                                              granularity=granularity)
            model, hist = train_convnet(ss, ss["lr"], ss["epochs"], "multistep", ss["milestones"],
                                        ss["gamma"], out_dir=out_dir, tag=f"pruning-{name}-seed{seed}",
                                        device=device, progress=progress, callback=schedule,
                                        make_model=make_model)
            runs[name].append(PruningRun(model, hist, schedule))
    return runs


# Quick: 3 seeds in the chapter's budget, so 150 training images per class (20 epochs, the
# assignment's schedule scaled down by 5). Full: the assignment's single run on CIFAR-10.
PRUNING_QUICK = CONVNET_QUICK | dict(n_per_class=150, test_per_class=100, lr=0.1, epochs=20,
                                     milestones=[5, 10, 15], gamma=0.1, prune_start=2, prune_every=2,
                                     prune_stop=10, prune_step=0.1, seeds=list(SEEDS))
PRUNING_FULL = CONVNET_FULL | dict(lr=0.1, epochs=100, milestones=[25, 50, 75], gamma=0.1,
                                   prune_start=10, prune_every=10, prune_stop=50, prune_step=0.1,
                                   seeds=[0])


@register("pruning", "Chapter 3: ConvNet baseline vs structured (filter L1) and unstructured pruning to 50%.",
          quick=PRUNING_QUICK, full=PRUNING_FULL)
def run_pruning(s: dict, out_dir: Path | None, device, progress) -> dict:
    runs = train_pruning_runs(s, out_dir, device, progress)
    return {"runs": {name: [r.history for r in rs] for name, rs in runs.items()},
            "sparsity": {name: rs[0].schedule.log for name, rs in runs.items() if name != "baseline"},
            "acc_after_pruning": {name: [r.schedule.acc_after for r in rs]
                                  for name, rs in runs.items() if name != "baseline"}}


def accuracy_around_pruning(runs: dict, name: str) -> list[dict]:
    """For each pruning step of ``runs[name]`` (PruningRuns of several seeds), the test accuracy
    over seeds as ``Spread``s: ``before`` (end of the pruning epoch, as ``fit`` measures it),
    ``after`` (right after pruning, no retraining yet) and ``next`` (after one more epoch)."""
    rs = runs[name]
    out = []
    for i, epoch in enumerate(rs[0].schedule.epochs):
        out.append({"epoch": epoch,
                    "before": spread(r.history.test_acc[epoch - 1] for r in rs),
                    "after": spread(r.schedule.acc_after[i] for r in rs),
                    "next": spread(r.history.test_acc[epoch] for r in rs)})
    return out


def plot_pruning(runs: dict, ax=None, title: str | None = None):
    """Test accuracy per epoch of every run (mean over seeds, min..max band), and for the pruned
    runs the accuracy right after each pruning step: a marker at the pruning epoch with a bar
    from the lowest to the highest seed, joined by dotted lines to the accuracy before pruning
    (same epoch) and after one more epoch of training."""
    import matplotlib.pyplot as plt
    import numpy as np

    from ..plots import plot_accuracy

    ax = ax or plt.subplots(figsize=(8, 4.2))[1]
    plot_accuracy({name: [r.history for r in rs] for name, rs in runs.items()}, "test", ax=ax, title=title)
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for name, rs in runs.items():
        if rs[0].schedule is None:
            continue
        steps = accuracy_around_pruning(runs, name)
        x = np.array([st["epoch"] for st in steps])
        mean = {k: np.array([100 * st[k].mean for st in steps]) for k in ("before", "after", "next")}
        lo = np.array([100 * st["after"].min for st in steps])
        hi = np.array([100 * st["after"].max for st in steps])
        c = colors.get(name)
        for xi, b, a, n in zip(x, mean["before"], mean["after"], mean["next"]):
            ax.plot([xi, xi, xi + 1], [b, a, n], color=c, ls=":", lw=1)
        yerr = np.maximum(0, [mean["after"] - lo, hi - mean["after"]])  # no -1e-15 from rounding
        ax.errorbar(x, mean["after"], yerr=yerr, color=c, fmt="v", ms=5, capsize=2, lw=1,
                    label=f"{name}, right after pruning")
    for epoch in next(rs[0].schedule for rs in runs.values() if rs[0].schedule is not None).epochs:
        ax.axvline(epoch, color="gray", ls=":", lw=0.8, zorder=0)
    ax.legend(fontsize="small")
    return ax


def final_of_result(result: dict | None, name: str, key: str = "test_acc"):
    """The ``Spread`` over seeds of the last ``key`` of run ``name`` in a stored result file of
    this experiment (``results.load_result``), or None if there is no result. Reads one History
    per name (files written before the seeds setting) as well as a list of them."""
    if result is None:
        return None
    hs = result["results"]["runs"][name]
    return spread(h[key][-1] for h in (hs if isinstance(hs, list) else [hs]))
