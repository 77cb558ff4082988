"""Chapter 1's experiments: the ConvNet trained at three learning rates, and two schedules, each
once per seed in ``settings["seeds"]`` (the results hold one History per seed)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..data import DATASETS
from ..models import ConvNet, count_macs, count_parameters
from ..seeds import SEEDS, Spread, spread
from ..train import fit
from .core import _checkpoint, per_seed, register, seed_for, train_loaders


CONVNET_QUICK = dict(dataset="fashion-mnist", n_per_class=300, test_per_class=200, width=0.5, batch_size=128,
                     augment=True, momentum=0.9, weight_decay=5e-4, seed=0)
CONVNET_FULL = dict(dataset="cifar10", n_per_class=None, test_per_class=None, width=1.0, batch_size=128,
                    augment=True, momentum=0.9, weight_decay=5e-4, seed=0)


def train_convnet(s: dict, lr: float, epochs: int, scheduler: str = "none", milestones=None, gamma: float = 0.1, *,
                  out_dir: Path | None = None, tag: str = "convnet", device=None, progress=None,
                  callback=None, make_model: Callable = ConvNet):
    """Train ``make_model(in_channels, num_classes, width)`` (default: the ``width``-scaled ConvNet)
    on ``s["dataset"]`` with SGD; returns (model, History).

    Seeds before building the model, so every run starts from the same weights and sees the same
    batches whatever ran before it.
    """
    seed_for(s["seed"], device)
    train_loader, test_loader, train = train_loaders(s, device)
    # channels-last (NHWC) weights: the CPU's convolution kernels (oneDNN), like cuDNN's, run
    # faster on it (a quarter less time per step here); every result is the same network's
    model = make_model(train.shape[0], train.num_classes, s["width"]).to(memory_format=torch.channels_last)
    hist = fit(model, train_loader, test_loader, epochs=epochs, lr=lr, momentum=s["momentum"],
               weight_decay=s["weight_decay"], scheduler=scheduler, milestones=milestones, gamma=gamma, device=device,
               callback=callback, checkpoint=_checkpoint(out_dir, tag, s),
               checkpoint_settings={k: v for k, v in s.items() if k != "epochs"},  # fit checks the epochs
               progress=progress, desc=tag)
    return model, hist


def convnet_size(s: dict) -> dict:
    """Parameters and multiply-accumulates per image of the ConvNet that settings ``s`` train."""
    spec = DATASETS[s["dataset"]]
    net = ConvNet(spec.shape[0], spec.num_classes, s["width"])
    return {"parameters": count_parameters(net), "macs_per_image": count_macs(net, spec.shape)}


# Chapter 1 runs every setting once per seed of SEEDS: its effects are compared with the seed spread.
# The quick profile trains on 250 images per class and tests on 150 (not the ConvNet's 300/200), so
# that 3 seeds of both experiments fit in about 4 minutes on 2 CPU cores. Each seed draws its own
# training subset, initial weights and batch order; "seed" is set per run from "seeds".
CH1_QUICK = {k: v for k, v in CONVNET_QUICK.items() if k != "seed"} | dict(
    n_per_class=250, test_per_class=150, seeds=list(SEEDS))
CH1_FULL = {k: v for k, v in CONVNET_FULL.items() if k != "seed"} | dict(seeds=list(SEEDS))


@register("lr-sweep", "Chapter 1.1: ConvNet trained for 5 epochs at lr 0.0001, 0.1 and 1.0, once per seed.",
          quick=CH1_QUICK | dict(lrs=[0.0001, 0.1, 1.0], epochs=5),
          full=CH1_FULL | dict(lrs=[0.0001, 0.1, 1.0], epochs=5))
def run_lr_sweep(s: dict, out_dir: Path | None, device, progress) -> dict:
    """``{"parameters", "macs_per_image", "runs": {str(lr): [History per seed]}}``."""
    runs = {}
    for lr in s["lrs"]:
        runs[str(lr)] = per_seed(s, lambda si: train_convnet(
            si, lr, si["epochs"], out_dir=out_dir, tag=f"lr-sweep-lr{lr}-seed{si['seed']}", device=device,
            progress=progress)[1])
    return convnet_size(s) | {"runs": runs}


@register("schedules", "Chapter 1.2: ConvNet at lr 0.1 with MultiStepLR (/10 every quarter) vs CosineAnnealingLR, "
          "once per seed.",
          quick=CH1_QUICK | dict(lr=0.1, epochs=12, milestones=[3, 6, 9], gamma=0.1),
          full=CH1_FULL | dict(lr=0.1, epochs=100, milestones=[25, 50, 75], gamma=0.1))
def run_schedules(s: dict, out_dir: Path | None, device, progress) -> dict:
    """``{"parameters", "macs_per_image", "runs": {"multistep"|"cosine": [History per seed]}}``."""
    runs = {}
    for name in ("multistep", "cosine"):
        runs[name] = per_seed(s, lambda si: train_convnet(
            si, si["lr"], si["epochs"], name, si["milestones"] if name == "multistep" else None, si["gamma"],
            out_dir=out_dir, tag=f"schedules-{name}-seed{si['seed']}", device=device, progress=progress)[1])
    return convnet_size(s) | {"runs": runs}


def summarize(histories) -> dict[str, Spread]:
    """What Chapter 1's tables show of one setting, each a ``Spread`` over its seeds' Histories
    (``History`` objects or their dicts, as in a result file): the last epoch's training loss
    (bits), training and test accuracy, and the best test accuracy of any epoch."""
    hs = [h if isinstance(h, dict) else h.to_dict() for h in histories]
    return {"train loss": spread(h["train_loss"][-1] for h in hs),
            "train acc": spread(h["train_acc"][-1] for h in hs),
            "test acc": spread(h["test_acc"][-1] for h in hs),
            "best test acc": spread(max(h["test_acc"]) for h in hs)}


def record_values(summaries: dict[str, dict[str, Spread]]) -> dict:
    """The means and standard deviations of ``{setting: summarize(...)}`` as a nested dict for
    ``checks.record``: ``{"mean": {setting: {quantity: mean}}, "std": {...}}``."""
    return {stat: {name: {k: getattr(sp, stat) for k, sp in s.items()} for name, s in summaries.items()}
            for stat in ("mean", "std")}


def full_run(experiment: str, out_dir=None) -> dict | None:
    """``{setting: summarize(...)}`` of a real full-profile run's result file of ``experiment``,
    or None if there is none. A file from before seeds (one History per setting) counts as one seed."""
    from ..results import load_result
    r = load_result(experiment, "full", out_dir)
    if r is None:
        return None
    return {name: summarize(hs if isinstance(hs, list) else [hs]) for name, hs in r["results"]["runs"].items()}
