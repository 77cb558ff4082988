"""Chapter 1's experiments: the ConvNet trained at three learning rates, and two schedules."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..data import DATASETS
from ..models import ConvNet, count_macs, count_parameters
from ..train import fit
from .core import _checkpoint, register, seed_for, train_loaders


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
    model = make_model(train.shape[0], train.num_classes, s["width"])
    hist = fit(model, train_loader, test_loader, epochs=epochs, lr=lr, momentum=s["momentum"],
               weight_decay=s["weight_decay"], scheduler=scheduler, milestones=milestones, gamma=gamma, device=device,
               callback=callback, checkpoint=_checkpoint(out_dir, tag, s), progress=progress, desc=tag)
    return model, hist


def convnet_size(s: dict) -> dict:
    """Parameters and multiply-accumulates per image of the ConvNet that settings ``s`` train."""
    spec = DATASETS[s["dataset"]]
    net = ConvNet(spec.shape[0], spec.num_classes, s["width"])
    return {"parameters": count_parameters(net), "macs_per_image": count_macs(net, spec.shape)}


@register("lr-sweep", "Chapter 1.1: ConvNet trained for 5 epochs at lr 0.0001, 0.1 and 1.0.",
          quick=CONVNET_QUICK | dict(lrs=[0.0001, 0.1, 1.0], epochs=5),
          full=CONVNET_FULL | dict(lrs=[0.0001, 0.1, 1.0], epochs=5))
def run_lr_sweep(s: dict, out_dir: Path | None, device, progress) -> dict:
    runs = {}
    for lr in s["lrs"]:
        _, runs[str(lr)] = train_convnet(s, lr, s["epochs"], out_dir=out_dir, tag=f"lr-sweep-lr{lr}",
                                         device=device, progress=progress)
    return convnet_size(s) | {"runs": runs}


@register("schedules", "Chapter 1.2: ConvNet at lr 0.1 with MultiStepLR (/10 every quarter) vs CosineAnnealingLR.",
          quick=CONVNET_QUICK | dict(lr=0.1, epochs=12, milestones=[3, 6, 9], gamma=0.1),
          full=CONVNET_FULL | dict(lr=0.1, epochs=100, milestones=[25, 50, 75], gamma=0.1))
def run_schedules(s: dict, out_dir: Path | None, device, progress) -> dict:
    runs = {}
    for name in ("multistep", "cosine"):
        _, runs[name] = train_convnet(s, s["lr"], s["epochs"], name, s["milestones"] if name == "multistep" else None,
                                      s["gamma"], out_dir=out_dir, tag=f"schedules-{name}", device=device, progress=progress)
    return convnet_size(s) | {"runs": runs}

