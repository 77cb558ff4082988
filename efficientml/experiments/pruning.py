"""Chapter 3's experiments: the ConvNet pruned structurally and unstructurally on a schedule."""
from __future__ import annotations

import functools
from pathlib import Path

from ..models import ConvNet
from ..pruning import PruningSchedule, SparseConvNet
from .core import register
from .learning_rates import CONVNET_FULL, CONVNET_QUICK, train_convnet


def train_pruning_runs(s: dict, out_dir: Path | None = None, device=None, progress=None) -> dict:
    """The baseline ConvNet, and SparseConvNets pruned structurally and unstructurally on the
    schedule of ``s`` (prune_start, prune_every, prune_stop, prune_step), all with the multistep
    schedule. Returns {name: (model, History, PruningSchedule or None)}."""
    runs = {}
    for name in ("baseline", "structured", "unstructured"):
        schedule = None if name == "baseline" else PruningSchedule(
            name, s["prune_start"], s["prune_every"], s["prune_stop"], s["prune_step"])
        granularity = "filter" if name == "structured" else "weight"
        make_model = ConvNet if name == "baseline" else functools.partial(SparseConvNet, granularity=granularity)
        model, hist = train_convnet(s, s["lr"], s["epochs"], "multistep", s["milestones"], s["gamma"],
                                    out_dir=out_dir, tag=f"pruning-{name}", device=device, progress=progress,
                                    callback=schedule, make_model=make_model)
        runs[name] = (model, hist, schedule)
    return runs


PRUNING_QUICK = CONVNET_QUICK | dict(n_per_class=200, test_per_class=100, lr=0.1, epochs=20, milestones=[5, 10, 15],
                                     gamma=0.1, prune_start=2, prune_every=2, prune_stop=10, prune_step=0.1)
PRUNING_FULL = CONVNET_FULL | dict(lr=0.1, epochs=100, milestones=[25, 50, 75], gamma=0.1,
                                   prune_start=10, prune_every=10, prune_stop=50, prune_step=0.1)


@register("pruning", "Chapter 3: ConvNet baseline vs structured (filter L1) and unstructured pruning to 50%.",
          quick=PRUNING_QUICK, full=PRUNING_FULL)
def run_pruning(s: dict, out_dir: Path | None, device, progress) -> dict:
    runs = train_pruning_runs(s, out_dir, device, progress)
    return {"runs": {name: hist for name, (_, hist, _) in runs.items()},
            "sparsity": {name: sched.log for name, (_, _, sched) in runs.items() if sched is not None}}

