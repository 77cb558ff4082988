"""Chapter 3's experiments: the ConvNet pruned structurally and unstructurally on a schedule; its
trained baselines pruned after training (one-shot or gradually, with and without fine-tuning), and
per-layer sensitivity scans."""
from __future__ import annotations

import copy
import functools
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import TensorLoader
from ..models import ConvNet
from ..plots import markdown_table
from ..pruning import (KINDS, PruningSchedule, SparseConvNet, choose_sparsities, fold_masks, overall_sparsity,
                       pruner, recalibrate_batchnorm, sensitivity_scan, two_four_pruning)
from ..seeds import SEEDS, Spread, spread
from ..train import History, evaluate, fit, select_device
from .core import per_seed, register, seed_for, train_loaders, validation_split
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
    per_run = per_seed(s, lambda ss: _pruning_runs_of_seed(ss, out_dir, device, progress))
    return {name: [runs[name] for runs in per_run] for name in PRUNING_NAMES}


def _pruning_runs_of_seed(s: dict, out_dir: Path | None, device, progress) -> dict[str, PruningRun]:
    """``train_pruning_runs``'s three runs for the settings ``s`` of one seed: {name: PruningRun}."""
    test_loader = train_loaders(s, device)[1]
    runs = {}
    for name in PRUNING_NAMES:
        schedule = None if name == "baseline" else PruningSchedule(
            name, s["prune_start"], s["prune_every"], s["prune_stop"], s["prune_step"], evaluate_on=test_loader)
        granularity = "filter" if name == "structured" else "weight"
        make_model = ConvNet if name == "baseline" else functools.partial(SparseConvNet, granularity=granularity)
        model, hist = train_convnet(s, s["lr"], s["epochs"], "multistep", s["milestones"], s["gamma"],
                                    out_dir=out_dir, tag=f"pruning-{name}-seed{s['seed']}", device=device,
                                    progress=progress, callback=schedule, make_model=make_model)
        runs[name] = PruningRun(model, hist, schedule)
    return runs


def _per_baseline(baselines: list, s: dict, run) -> list:
    """``run(baselines[i], s | {"seed": s["seeds"][i]})`` for each of ``baselines`` (one per seed, in
    the order of ``s["seeds"]``; there may be fewer baselines than seeds, not more), seed after
    seed (``core.per_seed``). A baseline may be a tuple of what a seed's run needs."""
    if not baselines or len(baselines) > len(s["seeds"]):
        raise ValueError(f"need one baseline per seed, at least one; got {len(baselines)} for seeds {s['seeds']}")
    left = iter(baselines)
    return per_seed(s | {"seeds": s["seeds"][:len(baselines)]}, lambda ss: run(next(left), ss))


# Quick: 3 seeds in the chapter's budget, so 150 training images per class (20 epochs, the
# assignment's schedule scaled down by 5). Full: the assignment's single run on CIFAR-10.
# val_per_class: training-split images held out for the sensitivity scan's choices (3.7); the
# quick profile draws them after its training subset, the full one trains on the rest of the split.
PRUNING_QUICK = CONVNET_QUICK | dict(n_per_class=150, val_per_class=100, test_per_class=100, lr=0.1,
                                     epochs=20, milestones=[5, 10, 15], gamma=0.1, prune_start=2,
                                     prune_every=2, prune_stop=10, prune_step=0.1, seeds=list(SEEDS))
PRUNING_FULL = CONVNET_FULL | dict(val_per_class=500, lr=0.1, epochs=100, milestones=[25, 50, 75],
                                   gamma=0.1, prune_start=10, prune_every=10, prune_stop=50,
                                   prune_step=0.1, seeds=[0])


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
    pruned_at = next(rs[0].schedule for rs in runs.values() if rs[0].schedule is not None).epochs
    for epoch in pruned_at:
        ax.axvline(epoch, color="gray", ls=":", lw=0.8, zorder=0)
    if len(pruned_at) > 1:  # ticks on the pruning epochs' spacing, so that they fall on the dotted lines
        from matplotlib.ticker import MultipleLocator
        ax.xaxis.set_major_locator(MultipleLocator(pruned_at[1] - pruned_at[0]))
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


# Pruning after training: the chapter's trained baselines (one per seed) pruned to each sparsity, their
# BatchNorm statistics re-estimated, and fine-tuned at a small constant learning rate on the
# baseline's own training loader.
METHODS = ("one-shot", "one-shot + BN recalibration", "one-shot + fine-tune", "gradual + fine-tune")
CALIBRATION_BATCHES = 4  # training batches (of 128) that re-estimate BatchNorm statistics after pruning


def calibration_batches(train_loader, n: int = CALIBRATION_BATCHES) -> list:
    """The first ``n`` batches of ``train_loader`` (its current epoch), kept as a list so that every
    ``recalibrate_batchnorm`` of an experiment sees the same images."""
    if n < 1:
        raise ValueError(f"need at least one calibration batch, got {n}")
    return list(itertools.islice(train_loader, n))


class _PruneDuring:
    """A training loader that prunes ``net`` to ``targets[i]`` just before iteration ``i`` (counted
    over all epochs from 0) is drawn: a gradual pruning schedule at the granularity of iterations."""

    def __init__(self, loader, net: nn.Module, prune, targets: dict[int, float]):
        self.loader, self.net, self.prune, self.targets, self.epoch = loader, net, prune, targets, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            target = self.targets.get(self.epoch * len(self.loader) + i)
            if target is not None:
                self.prune(self.net, target)
            yield batch


def gradual_targets(sparsity: float, steps: int, iterations: int) -> dict[int, float]:
    """{iteration: target}: ``steps`` equal pruning steps (sparsity/steps, 2 sparsity/steps, ...,
    sparsity) at iterations 0, iterations/steps, ... (rounded), so that each step is followed by an
    equal share of the ``iterations`` of fine-tuning."""
    if not 1 <= steps <= iterations:
        raise ValueError(f"need 1 <= steps <= iterations, got steps={steps}, iterations={iterations}")
    return {round(j * iterations / steps): round(sparsity * (j + 1) / steps, 10) for j in range(steps)}


def finetune(net: nn.Module, s: dict, train_loader, epochs: int, lr: float, device=None, progress=None,
             kind: str | None = None, sparsity: float | None = None, steps: int = 1) -> nn.Module:
    """Fine-tune ``net`` in place for ``epochs`` epochs with SGD at the constant ``lr`` (momentum and
    weight decay of ``s``); masks keep pruned weights at zero. With ``kind`` and ``sparsity``, the
    net is first pruned gradually: ``steps`` equal steps up to ``sparsity``, spread evenly over the
    fine-tuning (``gradual_targets``). Seeded by ``s["seed"]``; returns ``net``."""
    seed_for(s["seed"], device)
    if kind is not None:
        targets = gradual_targets(sparsity, steps, epochs * len(train_loader))
        train_loader = _PruneDuring(train_loader, net, pruner(kind), targets)
    fit(net, train_loader, None, epochs=epochs, lr=lr, momentum=s["momentum"],
        weight_decay=s["weight_decay"], device=device, progress=progress, desc="fine-tune")
    return net


def sparsity_sweep(baseline: ConvNet, s: dict, sparsities=(0.3, 0.5, 0.7, 0.9),
                   kinds=("structured", "unstructured"), epochs: int = 1, steps: int = 2, lr: float = 0.01,
                   finetune_sparsities=None, calibration: int = CALIBRATION_BATCHES, device=None,
                   progress=None) -> dict:
    """One seed's trained ``baseline`` (left unchanged) pruned after training to each of ``sparsities``,
    structurally and unstructurally, four ways (``METHODS``):

    - ``one-shot``: pruned at once, evaluated as it is;
    - ``one-shot + BN recalibration``: then ``recalibrate_batchnorm`` on ``calibration`` batches of
      the training loader (``calibration_batches``; no weight changes);
    - ``one-shot + fine-tune``: then ``epochs`` epochs of ``finetune`` at ``lr``;
    - ``gradual + fine-tune``: ``steps`` equal pruning steps spread over the same ``epochs`` of
      fine-tuning (the same budget).

    Both fine-tuned nets are recalibrated before evaluation too: the running statistics that
    training keeps (a moving average, momentum 0.1) still remember the unpruned net after an epoch.
    The fine-tuned methods run at ``finetune_sparsities`` only (default: all). ``s`` are the
    baseline's settings with its ``seed``, whose training loader the fine-tuning uses.
    Returns {"dense": test accuracy, kind: {method: {sparsity: test accuracy}}}."""
    finetune_sparsities = sparsities if finetune_sparsities is None else finetune_sparsities
    if not set(finetune_sparsities) <= set(sparsities):
        raise ValueError(f"finetune_sparsities {finetune_sparsities} must be among sparsities {sparsities}")
    train_loader, test_loader, _ = train_loaders(s, device)
    calib = calibration_batches(train_loader, calibration)

    def recalibrated_accuracy(net):
        return evaluate(recalibrate_batchnorm(net, calib), test_loader)[1]

    out = {"dense": evaluate(baseline, test_loader)[1]}
    for kind in kinds:
        prune, base = pruner(kind), SparseConvNet.from_convnet(baseline, KINDS[kind])
        out[kind] = acc = {method: {} for method in METHODS}
        for p in sparsities:
            net = copy.deepcopy(base)
            prune(net, p)
            acc["one-shot"][p] = evaluate(net, test_loader)[1]
            acc["one-shot + BN recalibration"][p] = recalibrated_accuracy(net)
            if p not in finetune_sparsities:
                continue
            acc["one-shot + fine-tune"][p] = recalibrated_accuracy(
                finetune(net, s, train_loader, epochs, lr, device, progress))
            acc["gradual + fine-tune"][p] = recalibrated_accuracy(
                finetune(copy.deepcopy(base), s, train_loader, epochs, lr, device, progress, kind, p, steps))
    return out


def sparsity_sweeps(baselines: list[ConvNet], s: dict, **kwargs) -> list[dict]:
    """``sparsity_sweep`` of each seed's baseline (``baselines[i]`` trained with seed
    ``s["seeds"][i]``, e.g. ``[r.model for r in runs["baseline"]]``); keyword arguments as there."""
    return _per_baseline(baselines, s, lambda model, ss: sparsity_sweep(model, ss, **kwargs))


def sweep_spreads(sweeps: list[dict]) -> dict:
    """The ``Spread`` over seeds of every entry of a list of ``sparsity_sweep`` results:
    {"dense": Spread, kind: {method: {sparsity: Spread}}}."""
    kinds = [k for k in sweeps[0] if k != "dense"]
    return {"dense": spread(w["dense"] for w in sweeps),
            **{kind: {method: {p: spread(w[kind][method][p] for w in sweeps) for p in accs}
                      for method, accs in sweeps[0][kind].items()} for kind in kinds}}


def sweep_table(sweeps: list[dict]) -> str:
    """Markdown table: test accuracy (mean ± std over seeds) per kind and sparsity, one column per
    method; an empty cell where a method did not run."""
    sp = sweep_spreads(sweeps)
    rows = [["unpruned", "0%", *[sp["dense"].pct()] * len(METHODS)]]
    for kind in (k for k in sp if k != "dense"):
        for p in sp[kind]["one-shot"]:
            rows.append([kind, f"{p:.0%}", *[sp[kind][m][p].pct() if p in sp[kind][m] else None
                                             for m in METHODS]])
    return markdown_table(rows, ["pruning", "sparsity", *METHODS])


def plot_sparsity_sweep(sweeps: list[dict], ax=None, kinds=None, title: str | None = None):
    """Test accuracy against sparsity: one color per method, solid lines and squares for structured,
    dashed lines and circles for unstructured pruning (``kinds``: which to draw, default all); the
    mean over seeds with a bar from the lowest to the highest seed; the unpruned baseline's mean as
    a gray line."""
    import matplotlib.pyplot as plt
    import numpy as np
    ax = ax or plt.subplots(figsize=(7.5, 4.5))[1]
    sp = sweep_spreads(sweeps)
    kinds = [k for k in sp if k != "dense"] if kinds is None else kinds
    styles = {"structured": ("-", "s"), "unstructured": ("--", "o")}
    for i, method in enumerate(METHODS):
        for j, kind in enumerate(kinds):
            accs = sp[kind][method]
            if not accs:
                continue
            x = np.array([100 * p for p in accs]) + 0.6 * (i - 1.5)  # side by side, bars apart
            mean = np.array([100 * a.mean for a in accs.values()])
            yerr = np.maximum(0, [mean - [100 * a.min for a in accs.values()],
                                  [100 * a.max for a in accs.values()] - mean])
            ls, marker = styles.get(kind, (":", "^"))
            ax.errorbar(x, mean, yerr=yerr, ls=ls, marker=marker, ms=4, capsize=2, lw=1.2, color=f"C{i}",
                        label=f"{kind}, {method}")
    ax.axhline(100 * sp["dense"].mean, color="gray", lw=1, label="unpruned")
    ax.set(xlabel="sparsity (% of filters or weights pruned per conv layer)", ylabel="test accuracy (%)",
           title=title or f"pruning a trained ConvNet ({len(sweeps)} seeds, mean and min..max)")
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: clear of the markers
    return ax


def sensitivity_scans(baselines: list[ConvNet], s: dict, sparsities=(0.3, 0.5, 0.7, 0.9),
                      kind: str = "unstructured", calibration: int | None = CALIBRATION_BATCHES,
                      device=None) -> list[dict]:
    """``sensitivity_scan`` of each seed's baseline on its own validation split
    (``validation_split``: training images it never trained on; the test set stays for the final
    comparison), BatchNorm statistics re-estimated after each pruning on ``calibration`` batches
    of its training loader (None: not re-estimated): [{layer: {sparsity: validation acc}}]."""
    def scan(model, ss):
        train_loader = train_loaders(ss, device)[0]
        val_loader = TensorLoader(validation_split(ss), 1000, device=select_device(device))
        calib = None if calibration is None else calibration_batches(train_loader, calibration)
        return sensitivity_scan(model, val_loader, sparsities, kind, calib, device)
    return _per_baseline(baselines, s, scan)


def mean_scan(scans: list[dict]) -> dict:
    """The accuracy at every (layer, sparsity) of several ``sensitivity_scan`` results, averaged."""
    return {name: {p: sum(sc[name][p] for sc in scans) / len(scans) for p in accs}
            for name, accs in scans[0].items()}


def plot_sensitivity(scans, ax=None, kind: str | None = None, split: str = "validation"):
    """Accuracy on ``split`` (what the scans measured on: ``sensitivity_scans`` uses the validation
    split) against the sparsity of ONE layer, the others unpruned: one line per layer (dark to light
    from input to output), the mean over the scans of a list (one per seed) or one scan."""
    import matplotlib.pyplot as plt
    scans = [scans] if isinstance(scans, dict) else list(scans)
    ax = ax or plt.subplots(figsize=(7, 4.2))[1]
    scan = mean_scan(scans)
    cmap = plt.get_cmap("viridis")
    colors = [cmap(i / max(1, len(scan) - 1)) for i in range(len(scan))]
    title = (f"per-layer sensitivity{f' ({kind})' if kind else ''}, one-shot, "
             f"mean of {len(scans)} scan{'s' * (len(scans) > 1)}")
    sparsities = {p for accs in scan.values() for p in accs if p > 0}
    if len(sparsities) == 1:  # one sparsity scanned: a bar per layer, not a line through two points
        (p,) = sparsities
        ax.bar(range(len(scan)), [100 * accs[p] for accs in scan.values()], color=colors)
        dense = [accs[0.0] for accs in scan.values() if 0.0 in accs]
        if dense:
            ax.axhline(100 * dense[0], color="gray", ls="--", lw=1, label="unpruned")
            ax.legend(fontsize="small", loc="lower right")
        ax.set_xticks(range(len(scan)), list(scan), rotation=45, ha="right", fontsize="small")
        ax.set(xlabel=f"the one layer pruned to {100 * p:g}%", ylabel=f"{split} accuracy (%)", title=title)
        return ax
    for color, (name, accs) in zip(colors, scan.items()):
        ax.plot([100 * p for p in accs], [100 * a for a in accs.values()], marker=".", color=color, label=name)
    ax.set(xlabel="sparsity of the one pruned layer (%)", ylabel=f"{split} accuracy (%)", title=title)
    ax.legend(fontsize="small", ncol=2)
    return ax


def sensitivity_vs_uniform(baselines: list[ConvNet], s: dict, scans: list[dict], max_drop: float,
                           kind: str = "unstructured", epochs: int = 0, lr: float = 0.01,
                           calibration: int = CALIBRATION_BATCHES, device=None, progress=None) -> list[dict]:
    """Per seed: its baseline pruned one-shot to the per-layer sparsities ``choose_sparsities`` picks
    from its own scan (``scans[i]``) with ``max_drop``, against the same baseline pruned uniformly
    (every layer the same fraction) to the same overall sparsity (fraction of conv weights masked);
    each then fine-tuned ``epochs`` epochs (0: none) and evaluated after ``recalibrate_batchnorm`` on
    ``calibration`` training batches.
    Returns per seed {"chosen": {layer: sparsity}, "overall": {"sensitivity": ..., "uniform": ...},
    "sensitivity": test accuracy, "uniform": test accuracy}."""
    if not len(baselines) == len(scans) <= len(s["seeds"]):
        raise ValueError(f"need one scan per baseline and a seed for each; got {len(baselines)} baselines, "
                         f"{len(scans)} scans, seeds {s['seeds']}")
    prune = pruner(kind)

    def compare(model_and_scan, ss):
        model, scan = model_and_scan
        train_loader, test_loader, _ = train_loaders(ss, device)
        calib = calibration_batches(train_loader, calibration)
        chosen = choose_sparsities(scan, max_drop)
        nets = {"sensitivity": SparseConvNet.from_convnet(model, KINDS[kind]),
                "uniform": SparseConvNet.from_convnet(model, KINDS[kind])}
        prune(nets["sensitivity"], chosen)
        prune(nets["uniform"], overall_sparsity(nets["sensitivity"]))
        r = {"chosen": chosen, "overall": {k: overall_sparsity(n) for k, n in nets.items()}}
        for name, net in nets.items():
            if epochs:
                finetune(net, ss, train_loader, epochs, lr, device, progress)
            r[name] = evaluate(recalibrate_batchnorm(net, calib), test_loader)[1]
        return r
    return _per_baseline(list(zip(baselines, scans)), s, compare)


# -- 2:4 sparsity, and Deep Compression: pruning + quantization + sparse storage -----------------

def two_four_over_seeds(baselines: list[ConvNet], s: dict, calibration: int = CALIBRATION_BATCHES,
                        device=None) -> list[dict]:
    """Each seed's trained baseline pruned one-shot to 2:4 sparsity (every layer whose in*kh*kw is
    a multiple of 4; the first convolution, 1 x 3 x 3, stays dense), evaluated as it is and after
    ``recalibrate_batchnorm``. Per seed {"dense", "2:4", "2:4 + BN recalibration": test accuracy,
    "sparsity": fraction of all conv weights pruned, "groups ok": every group of 4 keeps exactly 2}."""
    def two_four(model, ss):
        train_loader, test_loader, _ = train_loaders(ss, device)
        net = SparseConvNet.from_convnet(model, "weight")
        pruned = two_four_pruning(net, skip_indivisible=True)
        groups_ok = all(net.get_submodule(name).mask.reshape(-1, 4).sum(1).eq(2).all() for name in pruned)
        r = {"dense": evaluate(model, test_loader)[1], "2:4": evaluate(net, test_loader)[1]}
        recalibrate_batchnorm(net, calibration_batches(train_loader, calibration))
        return r | {"2:4 + BN recalibration": evaluate(net, test_loader)[1],
                    "sparsity": overall_sparsity(net), "groups ok": bool(groups_ok)}
    return _per_baseline(baselines, s, two_four)


# Deep Compression's stages: (label, which network, save_compressed arguments or None for fp32 torch.save)
COMPRESSION_STAGES = [
    ("dense, fp32", "dense", None),
    ("pruned, fp32", "pruned", None),
    ("dense, 4-bit k-means", "dense", dict(bits=4, method="kmeans")),
    ("pruned, 4-bit linear", "pruned", dict(bits=4, method="linear")),
    ("pruned, 4-bit k-means", "pruned", dict(bits=4, method="kmeans")),
    ("pruned, 2-bit k-means", "pruned", dict(bits=2, method="kmeans")),
]


def deep_compression(dense: ConvNet, pruned: SparseConvNet, test_loader, stages=COMPRESSION_STAGES) -> dict:
    """Deep Compression (Han et al., 2016) for one seed: the ``dense`` trained network and the
    unstructurally ``pruned`` one (masks folded into the weights, ``fold_masks``), each written to a
    file (in memory) as fp32 (``torch.save`` of the state dict) or by ``save_compressed`` (bitmap of
    the nonzeros where it pays, quantized values packed), read back, and evaluated.
    Returns {stage label: {"bytes": file size, "test_acc": accuracy of the network read back}}."""
    from ..compression import load_compressed, save_compressed
    from ..quantization import cpu_state_dict
    nets = {"dense": copy.deepcopy(dense).eval(), "pruned": fold_masks(pruned).eval()}
    out = {}
    for label, which, kw in stages:
        buf = io.BytesIO()
        if kw is None:
            torch.save(cpu_state_dict(nets[which]), buf)
        else:
            save_compressed(nets[which], buf, **kw)
        size = buf.getbuffer().nbytes
        buf.seek(0)
        back = copy.deepcopy(nets[which])
        if kw is None:
            back.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
        else:
            load_compressed(back, buf)
        out[label] = {"bytes": size, "test_acc": evaluate(back, test_loader)[1]}
    return out


def deep_compression_over_seeds(runs: dict, s: dict, device=None) -> list[dict]:
    """``deep_compression`` of each seed's baseline and unstructured network of ``train_pruning_runs``."""
    def compress(base_and_pruned, ss):
        base, pruned = base_and_pruned
        return deep_compression(base.model, pruned.model, train_loaders(ss, device)[1])
    return _per_baseline(list(zip(runs["baseline"], runs["unstructured"])), s, compress)


def compression_table(results: list[dict]) -> str:
    """Markdown table of ``deep_compression_over_seeds``: bytes on disk (first seed), how many times
    smaller than the dense fp32 file, and test accuracy (mean ± std over seeds)."""
    first = results[0]
    dense = first["dense, fp32"]["bytes"]
    rows = [[label, f"{r['bytes']:,}", f"{dense / r['bytes']:.1f}x",
             spread(res[label]["test_acc"] for res in results).pct()] for label, r in first.items()]
    return markdown_table(rows, ["network, storage", "bytes on disk", "smaller by", "test accuracy"])
