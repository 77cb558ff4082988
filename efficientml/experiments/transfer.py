"""Chapter 4's experiments: a pretrained ResNet-18 transferred fully, partly frozen, and with LoRA."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data import DATASETS, TensorLoader
from ..lora import (add_lora, freeze, gradient_bytes, optimizer_state_bytes, parameter_count,
                    saved_activation_bytes)
from ..models import resnet18
from ..seeds import SEEDS, spread
from ..train import fit, make_optimizer, select_device
from .core import _checkpoint, class_split, register, seed_for, train_loaders


def pretrained_backbone(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """The pretrained ResNet-18 that Chapter 4 transfers; returns (model, History or None).

    ``s["backbone"] == "imagenet"``: torchvision's ImageNet weights (``IMAGENET1K_V1``).
    ``"pretrain"``: the substitute used where those weights cannot be had; a ResNet-18 trained
    here, with ``s["seed"]``, on ``source_classes`` only (``pretrain_per_class`` images each,
    None: all; ``pretrain_epochs`` epochs of SGD at ``pretrain_lr`` with a cosine schedule, batches
    of ``pretrain_batch_size``); the target classes are never seen.
    """
    in_channels = DATASETS[s["dataset"]].shape[0]
    if s["backbone"] == "imagenet":
        return resnet18(in_channels=in_channels, weights="IMAGENET1K_V1"), None
    if s["backbone"] != "pretrain":
        raise ValueError(f"backbone must be 'imagenet' or 'pretrain', got {s['backbone']!r}")
    seed_for(s["seed"], device)
    device = select_device(device)
    train = class_split(s, s["source_classes"], True, s["pretrain_per_class"])
    test = class_split(s, s["source_classes"], False, s["test_per_class"])
    train_loader = TensorLoader(train, s["pretrain_batch_size"], shuffle=True, augment=s["augment"], device=device,
                                seed=s["seed"])
    test_loader = TensorLoader(test, 1000, device=device)
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


def measure_cost(model, batch_shape: tuple[int, ...], num_classes: int) -> dict:
    """What one training step of ``model`` holds in memory besides the weights, measured from the
    tensors on a copy of it (in training mode, on a zero batch of ``batch_shape``): ``trainable``
    and ``total`` parameters, ``gradient_bytes`` (the ``.grad`` tensors after a backward pass) and
    ``saved_activation_bytes`` (what autograd saves for the backward pass; see
    ``lora.saved_activation_bytes``). All depend on shapes and on what trains, not on values."""
    m = copy.deepcopy(model).cpu().train()
    for p in m.parameters():
        p.grad = None
    x = torch.zeros(batch_shape)
    saved = saved_activation_bytes(m, x)
    loss = torch.nn.functional.cross_entropy(m(x), torch.zeros(batch_shape[0], dtype=torch.long))
    loss.backward()
    count = parameter_count(m)
    return {"trainable": count.trainable, "total": count.total, "gradient_bytes": gradient_bytes(m),
            "saved_activation_bytes": saved}


@torch.no_grad()
def _features(model, ds, device) -> torch.Tensor:
    net = copy.deepcopy(model).to(device).eval()
    net.fc = torch.nn.Identity()
    return torch.cat([net(x) for x, _ in TensorLoader(ds, 1000, device=device)]).cpu().double()


def linear_probe(backbone, s: dict, device=None, steps: int = 300) -> float:
    """Test accuracy of a linear classifier on ``backbone``'s frozen features (the 512 numbers
    before its classifier, in eval mode) for the target task of ``s`` (its ``seed`` picks the
    training and test images): features standardised with the training images' mean and std,
    then multinomial logistic regression (L-BFGS, ``steps`` iterations at most, weight decay
    ``s["probe_l2"]``), in float64 so that it is the same on every machine to many digits."""
    device = select_device(device)
    train = class_split(s, s["target_classes"], True, s["n_per_class"])
    test = class_split(s, s["target_classes"], False, s["test_per_class"])
    ftr, fte = _features(backbone, train, device), _features(backbone, test, device)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    ytr, yte = train.labels.cpu(), test.labels.cpu()
    clf = torch.nn.Linear(ftr.shape[1], train.num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(clf.weight), torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(ftr), ytr) + s["probe_l2"] * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((clf(fte).argmax(1) == yte).double().mean())


def train_transfer_runs(s: dict, out_dir: Path | None = None, device=None, progress=None, backbone=None) -> dict:
    """Train every model named in ``s["runs"]`` (see ``transfer_model``) on the target task, once
    per seed in ``s["seeds"]`` (each seed draws its own target images, new classifier and batch
    order, the same for every model), with the same epochs and optimizer (SGD, cosine schedule),
    starting from ``backbone`` (default: ``pretrained_backbone(s)``, pretrained once, with
    ``s["seed"]``, or loaded). Returns ``{"pretrain": History or None, "runs": {name: [History per
    seed]}, "models": {name: the first seed's trained model}, "cost": {name: measure_cost(...)
    plus optimizer_state_bytes, measured after training}, "probe": {"pretrained" | "random":
    [linear_probe accuracy per seed]}}`` (``probe`` only if ``s["probe"]``)."""
    pre_hist = None
    if backbone is None:
        backbone, pre_hist = pretrained_backbone(s, device, progress, out_dir)
    device = select_device(device)
    in_channels = backbone.conv1.in_channels
    runs, models, cost = {name: [] for name in s["runs"]}, {}, {}
    probe = {"pretrained": [], "random": []}
    for seed in s["seeds"]:
        si = s | {"seed": seed}
        train_loader, test_loader, train = train_loaders(si, device, s["target_classes"])
        for name in s["runs"]:
            seed_for(seed, device)  # every run of a seed: the same new classifier, the same batches
            model = transfer_model(name, backbone, train.num_classes, s)
            if name not in cost:
                cost[name] = measure_cost(model, (s["batch_size"], *train.images.shape[1:]), train.num_classes)
            opt = make_optimizer((p for p in model.parameters() if p.requires_grad), "sgd", s["lr"],
                                 s["momentum"], s["weight_decay"])
            hist = fit(model, train_loader, test_loader, epochs=s["epochs"], optimizer=opt, scheduler="cosine",
                       device=device, checkpoint=_checkpoint(out_dir, f"lora-{name}-seed{seed}", s),
                       progress=progress, desc=f"{name} seed {seed}")
            cost[name]["optimizer_state_bytes"] = optimizer_state_bytes(opt)
            runs[name].append(hist)
            models.setdefault(name, model)
        if s.get("probe"):
            seed_for(seed, device)
            probe["pretrained"].append(linear_probe(backbone, si, device))
            probe["random"].append(linear_probe(resnet18(train.num_classes, in_channels), si, device))
    out = {"pretrain": pre_hist, "runs": runs, "models": models, "cost": cost}
    return out | ({"probe": probe} if s.get("probe") else {})


# Each half of Fashion-MNIST holds tops, footwear and other clothes, so that what is learned on
# one half is of use on the other, as ImageNet's features are on CIFAR-10:
# source T-shirt, Trouser, Coat, Sandal, Bag; target Pullover, Dress, Shirt, Sneaker, Ankle boot.
# The quick profile pretrains once (seed 0) on every source training image, then transfers to a
# LOW-DATA target task (n_per_class images per class), where pretrained features matter; each
# target run is repeated for every seed in SEEDS.
LORA_QUICK = dict(dataset="fashion-mnist", backbone="pretrain", source_classes=[0, 1, 4, 5, 8],
                  target_classes=[2, 3, 6, 7, 9], pretrain_per_class=None, pretrain_epochs=1, pretrain_lr=0.05,
                  pretrain_batch_size=128,
                  n_per_class=20, test_per_class=100, epochs=12, batch_size=20, lr=0.01, momentum=0.9,
                  weight_decay=5e-4, augment=True, freeze_up_to="layer3", r=4, alpha=8, runs=list(TRANSFER_RUNS),
                  seed=0, seeds=list(SEEDS), probe=True, probe_l2=1e-3)
LORA_FULL = LORA_QUICK | dict(dataset="cifar10", backbone="imagenet", source_classes=None, target_classes=None,
                              n_per_class=None, test_per_class=None, epochs=8, batch_size=64, probe=False)


@register("lora", "Chapter 4: a pretrained ResNet-18 fine-tuned fully, partly frozen, and frozen with a LoRA "
          "classifier (and trained from scratch), once per seed.", quick=LORA_QUICK, full=LORA_FULL)
def run_lora(s: dict, out_dir: Path | None, device, progress) -> dict:
    out = train_transfer_runs(s, out_dir, device, progress)
    return {k: v for k, v in out.items() if k != "models"}


def summarize(out: dict) -> dict:
    """The trained numbers Chapter 4 shows, as ``Spread``s over seeds: ``{name: {"epoch 1",
    "final"}}`` test accuracies of each run, plus ``{"probe": {"pretrained" | "random"}}`` when
    the linear probes ran. Histories may be ``History`` objects or their dicts (a result file)."""
    def acc(h):
        return h["test_acc"] if isinstance(h, dict) else h.test_acc
    res = {name: {"epoch 1": spread(acc(h)[0] for h in hs), "final": spread(acc(h)[-1] for h in hs)}
           for name, hs in out["runs"].items()}
    if out.get("probe"):
        res["probe"] = {k: spread(v) for k, v in out["probe"].items()}
    return res


def cost_table(cost: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of Chapter 4's cost table from ``train_transfer_runs(...)["cost"]``:
    exact counts and bytes (MiB with two decimals), the same on every machine."""
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    rows = [[name, f"{c['trainable']:,}", f"{c['trainable'] / c['total']:.1%}", mib(c["gradient_bytes"]),
             mib(c["optimizer_state_bytes"]), mib(c["saved_activation_bytes"])] for name, c in cost.items()]
    return rows, ["model", "trainable parameters", "of all", "gradients", "optimizer state (SGD momentum)",
                  "activations saved for backward"]


def accuracy_table(summary: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of the test accuracies (mean ± standard deviation over seeds) after the
    first and the last epoch, and of the linear probes if any, from ``summarize(...)``."""
    rows = [[name, v["epoch 1"].pct(), v["final"].pct()] for name, v in summary.items() if name != "probe"]
    rows += [[f"linear probe on {k} features", "", sp.pct()] for k, sp in summary.get("probe", {}).items()]
    return rows, ["model", "test acc. after epoch 1", "after the last epoch"]


def record_values(summary: dict, cost: dict, pretrain=None) -> dict:
    """What Chapter 4 records (``checks.record``): ``{name: mean final test accuracy}`` (the keys
    the results page reads), the standard deviations and the first epoch's spread, the linear
    probes, the pretraining's final source test accuracy, and the exact costs."""
    runs = {k: v for k, v in summary.items() if k != "probe"}
    out = {name: v["final"].mean for name, v in runs.items()}
    out |= {"final std": {name: v["final"].std for name, v in runs.items()},
            "epoch 1": {name: {"mean": v["epoch 1"].mean, "std": v["epoch 1"].std} for name, v in runs.items()},
            "cost": cost}
    if "probe" in summary:
        out["probe"] = {k: {"mean": sp.mean, "std": sp.std} for k, sp in summary["probe"].items()}
    if pretrain is not None:
        out["pretrain test acc"] = pretrain.test_acc[-1]
    return out
