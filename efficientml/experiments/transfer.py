"""Chapter 4's experiments: a pretrained ResNet-18 transferred fully, partly frozen, and with LoRA."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data import DATASETS
from ..lora import add_lora, freeze, optimizer_state_bytes, parameter_count
from ..models import resnet18
from ..train import fit, make_optimizer, select_device
from .core import _checkpoint, register, seed_for, train_loaders


def pretrained_backbone(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """The pretrained ResNet-18 that Chapter 4 transfers; returns (model, History or None).

    ``s["backbone"] == "imagenet"``: torchvision's ImageNet weights (``IMAGENET1K_V1``).
    ``"pretrain"``: the substitute used where those weights cannot be had; a ResNet-18 trained
    here on ``source_classes`` only (``pretrain_per_class`` images each, ``pretrain_epochs``
    epochs of SGD at ``pretrain_lr`` with a cosine schedule); the target classes are never seen.
    """
    in_channels = DATASETS[s["dataset"]].shape[0]
    if s["backbone"] == "imagenet":
        return resnet18(in_channels=in_channels, weights="IMAGENET1K_V1"), None
    if s["backbone"] != "pretrain":
        raise ValueError(f"backbone must be 'imagenet' or 'pretrain', got {s['backbone']!r}")
    seed_for(s["seed"], device)
    train_loader, test_loader, train = train_loaders(s, device, s["source_classes"], s["pretrain_per_class"])
    model = resnet18(train.num_classes, in_channels)
    hist = fit(model, train_loader, test_loader, epochs=s["pretrain_epochs"], lr=s["pretrain_lr"],
               momentum=s["momentum"], weight_decay=s["weight_decay"], scheduler="cosine", device=device,
               checkpoint=_checkpoint(out_dir, "lora-pretrain", s), progress=progress, desc="pretrain")
    return model, hist


TRANSFER_RUNS = ("pt_net", "net_freeze", "net_freeze_lora", "scratch")


def transfer_model(name: str, backbone, num_classes: int, s: dict):
    """Chapter 4.2's models, built from a copy of ``backbone`` with a new ``num_classes`` classifier:
    ``pt_net`` trains every layer; ``net_freeze`` freezes every stage up to ``s["freeze_up_to"]``;
    ``net_freeze_lora`` freezes the same stages and also the new classifier, which it adapts with
    a rank-``s["r"]`` LoRA update; ``scratch`` is the same ResNet-18 from a random initialisation
    (no pretraining), for comparison."""
    if name not in TRANSFER_RUNS:
        raise ValueError(f"unknown transfer run {name!r}: choose one of {', '.join(TRANSFER_RUNS)}")
    if name == "scratch":
        return resnet18(num_classes, backbone.conv1.in_channels)
    model = copy.deepcopy(backbone)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    if name == "net_freeze_lora":
        add_lora(model, "fc", s["r"], s["alpha"])
    if name != "pt_net":
        freeze(model, up_to=s["freeze_up_to"])
    return model


def train_transfer_runs(s: dict, out_dir: Path | None = None, device=None, progress=None, backbone=None) -> dict:
    """Train every model named in ``s["runs"]`` (see ``transfer_model``) on the target task with
    the same data, epochs and optimizer (SGD, cosine schedule), starting from ``backbone``
    (default: ``pretrained_backbone(s)``, pretrained or loaded here). Returns ``{"pretrain":
    History or None, "runs": {name: (model, History, cost)}}``, where cost holds trainable and
    total parameters, gradient bytes and optimizer-state bytes (measured after training)."""
    pre_hist = None
    if backbone is None:
        backbone, pre_hist = pretrained_backbone(s, device, progress, out_dir)
    device = select_device(device)
    train_loader, test_loader, train = train_loaders(s, device, s["target_classes"])
    runs = {}
    for name in s["runs"]:
        seed_for(s["seed"], device)  # every run: the same new classifier, the same batches
        model = transfer_model(name, backbone, train.num_classes, s)
        opt = make_optimizer((p for p in model.parameters() if p.requires_grad), "sgd", s["lr"], s["momentum"],
                             s["weight_decay"])
        hist = fit(model, train_loader, test_loader, epochs=s["epochs"], optimizer=opt, scheduler="cosine",
                   device=device, checkpoint=_checkpoint(out_dir, f"lora-{name}", s), progress=progress, desc=name)
        count = parameter_count(model)
        runs[name] = (model, hist, {"trainable": count.trainable, "total": count.total,
                                    "gradient_bytes": sum(p.numel() * p.element_size()
                                                          for p in model.parameters() if p.requires_grad),
                                    "optimizer_state_bytes": optimizer_state_bytes(opt)})
    return {"pretrain": pre_hist, "runs": runs}


# Each half of Fashion-MNIST holds tops, footwear and other clothes, so that what is learned on
# one half is of use on the other, as ImageNet's features are on CIFAR-10:
# source T-shirt, Trouser, Coat, Sandal, Bag; target Pullover, Dress, Shirt, Sneaker, Ankle boot.
LORA_QUICK = dict(dataset="fashion-mnist", backbone="pretrain", source_classes=[0, 1, 4, 5, 8],
                  target_classes=[2, 3, 6, 7, 9], pretrain_per_class=1000, pretrain_epochs=4, pretrain_lr=0.05,
                  n_per_class=100, test_per_class=200, epochs=8, batch_size=64, lr=0.01, momentum=0.9,
                  weight_decay=5e-4, augment=True, freeze_up_to="layer3", r=4, alpha=8, runs=list(TRANSFER_RUNS),
                  seed=0)
LORA_FULL = LORA_QUICK | dict(dataset="cifar10", backbone="imagenet", source_classes=None, target_classes=None,
                              n_per_class=None, test_per_class=None)


@register("lora", "Chapter 4: a pretrained ResNet-18 fine-tuned fully, partly frozen, and frozen with a LoRA "
          "classifier (and trained from scratch).", quick=LORA_QUICK, full=LORA_FULL)
def run_lora(s: dict, out_dir: Path | None, device, progress) -> dict:
    out = train_transfer_runs(s, out_dir, device, progress)
    return {"pretrain": out["pretrain"], "runs": {name: hist for name, (_, hist, _) in out["runs"].items()},
            "cost": {name: cost for name, (_, _, cost) in out["runs"].items()}}

