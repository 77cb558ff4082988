"""Chapter 4's experiments: a pretrained ResNet-18 transferred fully, partly frozen, and with LoRA."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data import DATASETS, TensorLoader
from ..lora import (add_lora, freeze, gradient_bytes, lora_targets, optimizer_state_bytes, parameter_count,
                    peak_memory_bytes, saved_activation_bytes, stages)
from ..models import resnet18
from ..seeds import SEEDS, paired_gap, spread
from ..train import evaluate, fit, make_optimizer, select_device
from .core import _checkpoint, class_split, per_seed, register, seed_for, train_loaders


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
        if s["width"] != 64 or s["small_input"]:
            raise ValueError("ImageNet weights need width=64 and small_input=False")
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
    model = backbone_model(s, train.num_classes, in_channels)
    hist = fit(model, train_loader, test_loader, epochs=s["pretrain_epochs"], lr=s["pretrain_lr"],
               momentum=s["momentum"], weight_decay=s["weight_decay"], scheduler="cosine", device=device,
               checkpoint=_checkpoint(out_dir, "lora-pretrain", s), progress=progress, desc="pretrain")
    return model, hist


def backbone_model(s: dict, num_classes: int, in_channels: int):
    """A randomly initialised ResNet-18 of the shape settings ``s`` give: ``width`` channels in
    its first stage and, if ``small_input``, the stem for small images (see ``models.resnet18``)."""
    return resnet18(num_classes, in_channels, width=s["width"], small_input=s["small_input"])


TRANSFER_RUNS = ("pt_net", "net_freeze", "net_freeze_lora", "lora_layer4", "scratch")


def transfer_model(name: str, backbone, num_classes: int, s: dict, r: int | None = None):
    """Chapter 4.2's models, built from a copy of ``backbone`` with a new ``num_classes`` classifier:
    ``pt_net`` trains every layer; ``net_freeze`` freezes every stage up to ``s["freeze_up_to"]``;
    ``net_freeze_lora`` freezes the same stages and also the new classifier, which it adapts with
    a rank-``s["r"]`` LoRA update (alpha ``s["alpha"]``); ``lora_layer4`` freezes the whole
    backbone, adapts each of ``layer4``'s convolutions (three quarters of the parameters) with a
    rank-``r`` LoRA update (default ``s["r_backbone"]``; alpha = ``s["lora_alpha_per_rank"]`` x r)
    and trains the new classifier in full, as PEFT's ``modules_to_save`` does; ``scratch`` is the
    same ResNet-18 from a random initialisation (no pretraining), for comparison."""
    if name not in TRANSFER_RUNS:
        raise ValueError(f"unknown transfer run {name!r}: choose one of {', '.join(TRANSFER_RUNS)}")
    if name == "scratch":
        return backbone_model(s, num_classes, backbone.conv1.in_channels)
    model = copy.deepcopy(backbone)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    if name == "net_freeze_lora":
        add_lora(model, "fc", s["r"], s["alpha"])
    if name == "lora_layer4":
        r = s["r_backbone"] if r is None else r
        names = lora_targets(model, "layer4", (torch.nn.Conv2d,))
        for conv in names:
            add_lora(model, conv, r, s["lora_alpha_per_rank"] * r)
        freeze(model, ["fc", *names])  # A and B of each adapted convolution, and the classifier
    elif name != "pt_net":
        freeze(model, up_to=s["freeze_up_to"])
    return model


def measure_cost(model, batch_shape: tuple[int, ...], num_classes: int, s: dict) -> dict:
    """What one training step of ``model`` holds in memory besides the weights, measured from the
    tensors on a copy of it (in training mode, one SGD step of settings ``s`` on a zero batch of
    ``batch_shape``, on the CPU): ``trainable`` and ``total`` parameters, ``gradient_bytes`` (the
    ``.grad`` tensors after the backward pass), ``optimizer_state_bytes`` (the momentum buffers
    after the step), ``saved_activation_bytes`` (what autograd saves for the backward pass; see
    ``lora.saved_activation_bytes``) and ``peak_step_bytes`` (the most memory the step held at
    once above the weights: activations, gradients, optimizer state and temporaries; see
    ``lora.peak_memory_bytes``), measured on one thread, so that it does not grow with the
    reader's cores. All but the peak depend only on shapes and on what trains; the peak includes
    library workspaces, which vary a little between CPUs' kernels."""
    m = copy.deepcopy(model).cpu().train()
    for p in m.parameters():
        p.grad = None
    x = torch.zeros(batch_shape, device="cpu")
    y = torch.zeros(batch_shape[0], dtype=torch.long, device="cpu")
    saved = saved_activation_bytes(m, x)
    opt = make_optimizer((p for p in m.parameters() if p.requires_grad), "sgd", s["lr"], s["momentum"],
                         s["weight_decay"])

    def step():
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # some kernels (AVX2's convolutions) take a workspace per thread
    try:
        peak = peak_memory_bytes(step)
    finally:
        torch.set_num_threads(threads)
    count = parameter_count(m)
    return {"trainable": count.trainable, "total": count.total, "gradient_bytes": gradient_bytes(m),
            "optimizer_state_bytes": optimizer_state_bytes(opt), "saved_activation_bytes": saved,
            "peak_step_bytes": peak}


@torch.no_grad()
def _features(model, ds, device) -> torch.Tensor:
    net = copy.deepcopy(model).to(device).eval()
    net.fc = torch.nn.Identity()
    return torch.cat([net(x) for x, _ in TensorLoader(ds, 1000, device=device)]).cpu().double()


def linear_probe(backbone, s: dict, device=None, steps: int = 300) -> float:
    """Test accuracy of a linear classifier on ``backbone``'s frozen features (the 512 numbers
    before its classifier, in eval mode, computed on ``device``) for the target task of ``s``
    (its ``seed`` picks the training and test images), fitted by ``probe_accuracy`` on the CPU
    in float64 (weight decay ``s["probe_l2"]``, ``steps`` L-BFGS iterations at most)."""
    device = select_device(device)
    train = class_split(s, s["target_classes"], True, s["n_per_class"])
    test = class_split(s, s["target_classes"], False, s["test_per_class"])
    ftr, fte = _features(backbone, train, device), _features(backbone, test, device)
    return probe_accuracy(ftr, train.labels.cpu(), fte, test.labels.cpu(), train.num_classes, s["probe_l2"],
                          steps)


def probe_accuracy(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor, num_classes: int,
                   l2: float, steps: int = 300) -> float:
    """Test accuracy of multinomial logistic regression fitted to training features ``ftr`` (N, F)
    with labels ``ytr`` (N,) int64 and measured on ``fte`` (M, F), ``yte`` (M,): features
    standardised with the training mean and std, zero-initialised weights, L-BFGS (``steps``
    iterations at most, strong Wolfe line search) on cross-entropy + ``l2`` x squared weights.
    All on the CPU in float64 (MPS has none), so the result is the same on every machine to
    many digits; inputs on other devices or dtypes are converted."""
    ftr, fte = ftr.detach().to("cpu", torch.float64), fte.detach().to("cpu", torch.float64)
    ytr, yte = ytr.to("cpu", torch.int64), yte.to("cpu", torch.int64)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    clf = torch.nn.Linear(ftr.shape[1], num_classes, dtype=torch.float64, device="cpu")
    torch.nn.init.zeros_(clf.weight), torch.nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(ftr), ytr) + l2 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((clf(fte).argmax(1) == yte).double().mean())


def sweep_ranks(s: dict) -> list[int]:
    """The ranks of ``lora_layer4`` that 4.3 compares: ``s["r_backbone"]`` (the main run) and
    ``s["lora_ranks"]``, in increasing order; none if ``lora_layer4`` is not in ``s["runs"]``."""
    if "lora_layer4" not in s["runs"]:
        return []
    return sorted(set(s.get("lora_ranks") or []) | {s["r_backbone"]})


def rank_label(r: int, s: dict) -> str:
    """The label of ``lora_layer4`` at rank ``r`` in costs and tables: plain ``"lora_layer4"``
    for the main run's rank ``s["r_backbone"]``, else ``"lora_layer4 r=R"``."""
    return "lora_layer4" if r == s["r_backbone"] else f"lora_layer4 r={r}"


def _fine_tune(model, train_loader, test_loader, s: dict, lr: float, device, out_dir, stem: str, progress):
    """Chapter 4's fine-tuning of ``model``: SGD with momentum over its trainable parameters at
    ``lr``, cosine schedule, ``s["epochs"]`` epochs; the test set evaluated after every epoch
    unless ``test_loader`` is None. Returns the History."""
    opt = make_optimizer((p for p in model.parameters() if p.requires_grad), "sgd", lr, s["momentum"],
                         s["weight_decay"])
    return fit(model, train_loader, test_loader, epochs=s["epochs"], optimizer=opt, scheduler="cosine",
               device=device, checkpoint=_checkpoint(out_dir, stem, s), progress=progress, desc=stem)


def train_transfer_runs(s: dict, out_dir: Path | None = None, device=None, progress=None, backbone=None) -> dict:
    """Train Chapter 4's models on the target task, once per seed in ``s["seeds"]`` (each seed
    draws its own target images, new classifier and batch order, the same for every model), all
    fine-tuned alike (``_fine_tune``), starting from ``backbone`` (default:
    ``pretrained_backbone(s)``, pretrained once with ``s["seed"]``, or loaded):

    - ``runs``: every run of ``s["runs"]`` on ``s["n_per_class"]`` images per class at
      ``s["lr"]``, the test set evaluated after every epoch;
    - ``ranks``: ``lora_layer4`` at each other rank of ``sweep_ranks(s)`` (final test accuracy);
    - ``ranks_more_data``: ``lora_layer4`` at every rank of ``sweep_ranks(s)`` on
      ``s["rank_n_per_class"]`` images per class at learning rate ``s["rank_lr"]`` (final test
      accuracy; none if ``rank_n_per_class`` is None): the setting where the rank matters;
    - ``data``: each run of ``s["data_runs"]`` on ``n`` images per class for each ``n`` in
      ``s["data_sizes"]`` (final test accuracy);
    - ``lrs``: each run of ``s["data_runs"]`` at each learning rate of ``s["lr_grid"]`` (final
      test accuracy), to check that the comparison does not hinge on one learning rate.

    Returns ``{"pretrain": History or None, "runs": {name: [History per seed]}, "models": {name:
    the first seed's trained model}, "cost": {label: measure_cost(...)} (labels as
    ``rank_label``), "ranks": {r: [accuracy per seed]}, "ranks_more_data": {r: [...]}, "data":
    {name: {n: [...]}}, "lrs": {name: {lr: [...]}}, "probe": {"pretrained" | "random":
    [linear_probe accuracy per seed]}}``
    (``probe`` only if ``s["probe"]``)."""
    pre_hist = None
    if backbone is None:
        backbone, pre_hist = pretrained_backbone(s, device, progress, out_dir)
    device = select_device(device)
    extra_ranks = [r for r in sweep_ranks(s) if r != s["r_backbone"]]
    more_ranks = sweep_ranks(s) if s.get("rank_n_per_class") else []
    data_runs, data_sizes, lr_grid = s.get("data_runs") or [], s.get("data_sizes") or [], s.get("lr_grid") or []
    models, cost = {}, {}

    def build(name, target, label, r=None):
        """A new model ``name`` for the target data set ``target``; its cost measured once per label."""
        model = transfer_model(name, backbone, target.num_classes, s, r)
        if label not in cost:
            cost[label] = measure_cost(model, (s["batch_size"], *target.shape), target.num_classes, s)
        return model

    def one_seed(si: dict) -> dict:
        """Every training of seed ``si["seed"]``, in this order: the runs, the ranks, the data
        sizes, the learning rates, the probes; ``{"runs": {name: History}, "ranks": {r: acc},
        "data": {(name, n): acc}, "lrs": {(name, lr): acc}, "probe": {kind: acc}}``."""
        seed = si["seed"]
        train_loader, test_loader, train = train_loaders(si, device, s["target_classes"])
        out = {"runs": {}, "ranks": {}, "ranks_more_data": {}, "data": {}, "lrs": {}, "probe": {}}
        for name in s["runs"]:
            seed_for(seed, device)  # every run of a seed: the same new classifier, the same batches
            model = build(name, train, name)
            out["runs"][name] = _fine_tune(model, train_loader, test_loader, s, s["lr"], device, out_dir,
                                           f"lora-{name}-seed{seed}", progress)
            models.setdefault(name, model)

        def final_accuracy(name, loader, lr, stem, r=None):
            seed_for(seed, device)
            model = build(name, train, rank_label(r, s) if r is not None else name, r)
            _fine_tune(model, loader, None, s, lr, device, out_dir, f"{stem}-seed{seed}", progress)
            return evaluate(model, test_loader, device)[1]

        for r in extra_ranks:
            out["ranks"][r] = final_accuracy("lora_layer4", train_loader, s["lr"], f"lora-lora_layer4-r{r}", r)
        if more_ranks:
            n = s["rank_n_per_class"]
            loader_r = train_loaders(si, device, s["target_classes"], n_per_class=n)[0]
            for r in more_ranks:
                out["ranks_more_data"][r] = final_accuracy("lora_layer4", loader_r, s["rank_lr"],
                                                           f"lora-lora_layer4-r{r}-n{n}", r)
        for n in data_sizes:
            loader_n = train_loaders(si, device, s["target_classes"], n_per_class=n)[0]
            for name in data_runs:
                out["data"][name, n] = final_accuracy(name, loader_n, s["lr"], f"lora-{name}-n{n}")
        for lr in lr_grid:
            for name in data_runs:
                out["lrs"][name, lr] = final_accuracy(name, train_loader, lr, f"lora-{name}-lr{lr}")
        if s.get("probe"):
            seed_for(seed, device)
            out["probe"]["pretrained"] = linear_probe(backbone, si, device)
            untrained = backbone_model(s, train.num_classes, backbone.conv1.in_channels)
            out["probe"]["random"] = linear_probe(untrained, si, device)
        return out

    seeds = per_seed(s, one_seed)

    def over_seeds(key, k):
        return [r[key][k] for r in seeds]
    out = {"pretrain": pre_hist, "runs": {name: over_seeds("runs", name) for name in s["runs"]},
           "models": models, "cost": cost, "ranks": {r: over_seeds("ranks", r) for r in extra_ranks},
           "ranks_more_data": {r: over_seeds("ranks_more_data", r) for r in more_ranks},
           "data": {name: {n: over_seeds("data", (name, n)) for n in data_sizes} for name in data_runs},
           "lrs": {name: {lr: over_seeds("lrs", (name, lr)) for lr in lr_grid} for name in data_runs}}
    if s.get("probe"):
        out["probe"] = {kind: over_seeds("probe", kind) for kind in ("pretrained", "random")}
    return out


# The source task holds seven classes of every kind (Trouser, Dress, Coat, Sandal, Sneaker, Bag,
# Ankle boot); the target task the three tops it never sees and that are hardest to tell apart
# (T-shirt/top, Pullover, Shirt), as ImageNet's features serve a finer task on other images. The
# quick profile pretrains once (seed 0) on 3,000 training images of each source class (half;
# all of them took 2 minutes, over the chapter's budget with the rest) for 2 epochs, then
# transfers to a LOW-DATA target task (n_per_class = 10 images per class), where pretrained
# features matter; each target run is repeated for every seed in SEEDS. The network is ResNet-18
# for small images (width 16: channels 16-128; a 3x3 stride-1 stem, no max pooling), so that
# layer4 sees 4x4 maps on 28x28 images, not torchvision's 1x1, for fewer MACs per image (28.6M
# against 33.0M). Measured while choosing, with torchvision's design (5 seeds, this 2-core CPU):
# with 1 pretraining epoch the fine-tuned network failed on one seed of five (52% against
# 60-64%), with 2 or 3 it did not; lr 0.003 was the best of 0.001, 0.003, 0.01 and 0.03 for both
# pt_net and scratch with 20 images per class (the chapter re-checks the grid with its own seeds
# and data size: lr_grid). With the small design (2 seeds): ranks 1 to 64 of lora_layer4 ended
# within a point of each other with 10 images per class at lr 0.003 or 0.03 and with 100 at
# 0.003, and rank 64 about 5 points above rank 1 with 100 at 0.03 (rank_n_per_class, rank_lr).
LORA_QUICK = dict(dataset="fashion-mnist", backbone="pretrain", source_classes=[1, 3, 4, 5, 7, 8, 9],
                  target_classes=[0, 2, 6], pretrain_per_class=3000, pretrain_epochs=2, pretrain_lr=0.05,
                  pretrain_batch_size=128,
                  n_per_class=10, test_per_class=300, epochs=12, batch_size=20, lr=0.003, momentum=0.9,
                  weight_decay=5e-4, augment=True, width=16, small_input=True, freeze_up_to="layer3",
                  r=2, alpha=4, r_backbone=8,
                  lora_alpha_per_rank=2, lora_ranks=[1, 64], rank_n_per_class=100, rank_lr=0.03,
                  runs=list(TRANSFER_RUNS),
                  data_runs=["pt_net", "scratch"], data_sizes=[5, 50], lr_grid=[0.001, 0.01, 0.03],
                  seed=0, seeds=list(SEEDS), probe=True, probe_l2=1e-3)
# Full: ImageNet weights on all of CIFAR-10 (the assignment's 8 epochs), and the same model
# comparisons with 10 and 100 training images per class.
LORA_FULL = LORA_QUICK | dict(dataset="cifar10", backbone="imagenet", width=64, small_input=False,
                              source_classes=None, target_classes=None,
                              n_per_class=None, test_per_class=None, epochs=8, batch_size=64, lr=0.01,
                              probe=False, r=4, alpha=8, data_sizes=[10, 100], lr_grid=[],
                              rank_n_per_class=None)


@register("lora", "Chapter 4: a pretrained ResNet-18 fine-tuned fully, partly frozen, with LoRA on the classifier "
          "or on layer4, and trained from scratch, once per seed; rank, data-size and learning-rate sweeps.",
          quick=LORA_QUICK, full=LORA_FULL)
def run_lora(s: dict, out_dir: Path | None, device, progress) -> dict:
    out = train_transfer_runs(s, out_dir, device, progress)
    return {k: v for k, v in out.items() if k != "models"}


SWEEPS = ("ranks", "ranks_more_data", "data", "lrs")


def summarize(out: dict) -> dict:
    """The trained numbers Chapter 4 shows, as ``Spread``s over seeds: ``{name: {"epoch 1",
    "final"}}`` test accuracies of each run, ``{"probe": {"pretrained" | "random"}}`` when the
    linear probes ran, and the sweeps' final accuracies ``"ranks": {r}``, ``"ranks_more_data":
    {r}``, ``"data": {name: {n}}``, ``"lrs": {name: {lr}}`` (keys as numbers, also when read
    from a result file, where they are strings). Histories may be ``History`` objects or their dicts (a result file)."""
    def acc(h):
        return h["test_acc"] if isinstance(h, dict) else h.test_acc
    res = {name: {"epoch 1": spread(acc(h)[0] for h in hs), "final": spread(acc(h)[-1] for h in hs)}
           for name, hs in out["runs"].items()}
    if out.get("probe"):
        res["probe"] = {k: spread(v) for k, v in out["probe"].items()}
    for key in ("ranks", "ranks_more_data"):
        if out.get(key):
            res[key] = {int(r): spread(v) for r, v in out[key].items()}
    for key in ("data", "lrs"):
        if out.get(key):
            num = int if key == "data" else float
            res[key] = {name: {num(x): spread(v) for x, v in d.items()} for name, d in out[key].items()}
    return res


def main_runs(d: dict) -> dict:
    """The entries of ``d`` (a summary, costs or runs) that are the main runs: not the probes,
    the sweeps, nor the extra ranks' costs ("lora_layer4 r=R")."""
    return {k: v for k, v in d.items() if " r=" not in k and k != "probe" and k not in SWEEPS}


def rank_sweep(summary: dict, s: dict) -> dict:
    """``{rank: Spread of final test accuracy}`` of ``lora_layer4`` at every rank of
    ``sweep_ranks(s)`` that ran, the main run's rank from the main run."""
    out = dict(summary.get("ranks", {}))
    if "lora_layer4" in summary:
        out[s["r_backbone"]] = summary["lora_layer4"]["final"]
    return dict(sorted(out.items()))


def _sweep(summary: dict, key: str, main_x) -> dict:
    """``{name: {x: Spread}}`` of ``summary[key]`` with each run's main result (its ``"final"``)
    added at ``main_x`` (None: not added), in increasing x."""
    out = {}
    for name, d in summary.get(key, {}).items():
        d = dict(d)
        if main_x is not None and name in summary:
            d[main_x] = summary[name]["final"]
        out[name] = dict(sorted(d.items()))
    return out


def data_sweep(summary: dict, s: dict) -> dict:
    """``{name: {images per class: Spread of final test accuracy}}`` for the runs of
    ``s["data_runs"]``, the main runs' size ``s["n_per_class"]`` (if not all) included."""
    return _sweep(summary, "data", s["n_per_class"])


def lr_sweep(summary: dict, s: dict) -> dict:
    """``{name: {lr: Spread of final test accuracy}}`` for the runs of ``s["data_runs"]`` at the
    learning rates of ``s["lr_grid"]`` and, from the main runs, ``s["lr"]``."""
    return _sweep(summary, "lrs", s["lr"])


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def stage_macs(model, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of one forward pass of one input of ``input_shape`` (channels,
    height, width), stage by stage (see ``lora.stages``): each convolution and linear layer
    counted as ``models.count_macs`` counts it (output elements x fan-in) and added to the
    stage that holds it."""
    owner = {id(m): name for name in stages(model) for m in getattr(model, name).modules()}
    macs = dict.fromkeys(stages(model), 0)

    def hook(m, inp, out):
        fan_in = m.weight[0].numel()  # in_channels / groups x kernel area, or in_features
        macs[owner[id(m)]] += out[0].numel() * fan_in
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and id(m) in owner]
    was_training = model.training
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def stage_table(model, input_shape: tuple[int, ...]) -> tuple[list[list], list[str]]:
    """Rows and headers of where ``model``'s parameters and arithmetic sit, stage by stage (see
    ``lora.stages``): parameters, share of all, multiply-accumulates for one input of
    ``input_shape`` (channels, height, width; ``stage_macs``), their share, and the stage's
    output shape."""
    shapes, hooks = {}, []
    for name in stages(model):
        hooks.append(getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:]))))
    was_training = model.training
    p = next(model.parameters())
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    model.train(was_training)
    for h in hooks:
        h.remove()
    macs = stage_macs(model, input_shape)
    total, total_macs = parameter_count(model).total, sum(macs.values())
    rows = []
    for name in stages(model):
        n = parameter_count(getattr(model, name)).total
        rows.append([name, f"{n:,}", f"{n / total:.1%}", f"{macs[name]:,}", f"{macs[name] / total_macs:.1%}",
                     " × ".join(map(str, shapes[name]))])
    return (rows + [["total", f"{total:,}", "100%", f"{total_macs:,}", "100%", ""]],
            ["stage", "parameters", "share", "MACs per image", "share", "output shape"])


def gradient_table(model, fractions: dict[str, float]) -> tuple[list[list], list[str]]:
    """Rows and headers of which weights can learn, stage by stage: of the parameters named in
    ``fractions`` (from ``lora.gradient_fraction``), how many each stage holds and the share of
    them whose gradient was nonzero; stages with none of them are left out."""
    params = dict(model.named_parameters())
    rows = []
    for stage in stages(model):
        names = [n for n in fractions if n.startswith(stage + ".")]
        if names:
            size = sum(params[n].numel() for n in names)
            live = sum(fractions[n] * params[n].numel() for n in names)
            rows.append([stage, f"{size:,}", f"{live / size:.1%}"])
    return rows, ["stage", "convolution weights", "with a nonzero gradient"]


def lora_size_table(layers: list[tuple[str, int, int]], ranks=(1, 4, 16)) -> tuple[list[list], list[str]]:
    """Rows and headers of what a rank-r update costs for layers ``(name, d_in, d_out)`` (a
    convolution counts as a d_out x (in kh kw) matrix): weights, r (d_in + d_out) LoRA
    parameters, and their ratio, for each rank r <= min(d_in, d_out)."""
    rows = [[name, f"{d_in * d_out:,}", r, f"{r * (d_in + d_out):,}", f"{r * (d_in + d_out) / (d_in * d_out):.2%}"]
            for name, d_in, d_out in layers for r in ranks if r <= min(d_in, d_out)]
    return rows, ["layer", "weights W", "rank r", "LoRA parameters", "LoRA / W"]


def cost_table(cost: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of Chapter 4's cost table from ``train_transfer_runs(...)["cost"]``:
    exact counts and bytes (MiB with two decimals), the same on every machine."""
    rows = [[name, f"{c['trainable']:,}", f"{c['trainable'] / c['total']:.1%}", _mib(c["gradient_bytes"]),
             _mib(c["optimizer_state_bytes"]), _mib(c["saved_activation_bytes"])] for name, c in cost.items()]
    return rows, ["model", "trainable parameters", "of all", "gradients", "optimizer state (SGD momentum)",
                  "activations saved for backward"]


def seconds_per_epoch(histories) -> float:
    """Mean training time per epoch (seconds, training only) over the seeds' Histories."""
    return sum(sum(h.train_time) / h.epochs for h in histories) / len(histories)


def speed_memory_table(runs: dict, cost: dict, reference: str = "pt_net") -> tuple[list[list], list[str]]:
    """Rows and headers of each run's peak memory of a training step (measured, see
    ``measure_cost``) and training time per epoch, both also relative to ``reference``."""
    t_ref, m_ref = seconds_per_epoch(runs[reference]), cost[reference]["peak_step_bytes"]
    rows = [[name, _mib(cost[name]["peak_step_bytes"]), f"{cost[name]['peak_step_bytes'] / m_ref:.0%}",
             f"{seconds_per_epoch(hs):.2f} s", f"{t_ref / seconds_per_epoch(hs):.2f}x"] for name, hs in runs.items()]
    return rows, ["model", "peak memory of a training step", f"of {reference}'s", "training time per epoch",
                  f"speed-up over {reference}"]


def rank_table(summary: dict, cost: dict, s: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of the rank sweep of ``lora_layer4``: trainable parameters, share of the
    model, peak memory of a training step, and final test accuracy (mean ± std over seeds) in
    the chapter's setting and, if it ran, with ``s["rank_n_per_class"]`` images per class at
    learning rate ``s["rank_lr"]``."""
    more = summary.get("ranks_more_data", {})
    rows = []
    for r, sp in rank_sweep(summary, s).items():
        c = cost[rank_label(r, s)]
        rows.append([r, f"{c['trainable']:,}", f"{c['trainable'] / c['total']:.2%}", _mib(c["peak_step_bytes"]),
                     sp.pct()] + ([more[r].pct() if r in more else ""] if more else []))
    head = ["rank r", "trainable parameters", "of the model", "peak memory of a step",
            f"final test accuracy: {s['n_per_class']} images per class, lr {s['lr']:g}"]
    if more:
        head.append(f"{s['rank_n_per_class']} images per class, lr {s['rank_lr']:g}")
    return rows, head


def _errorbar(ax, x, sp, **kw):
    """One point at (x, mean in %), its bar from the lowest to the highest seed."""
    return ax.errorbar([x], [100 * sp.mean], yerr=[[100 * (sp.mean - sp.min)], [100 * (sp.max - sp.mean)]],
                       capsize=3, **kw)


def plot_accuracy_vs_parameters(summary: dict, cost: dict, s: dict, ax=None, title: str | None = None):
    """Final test accuracy (%, mean over seeds; bars from the lowest to the highest seed) against
    the number of trainable parameters (log scale): one point per main run, squares joined by a
    line for ``lora_layer4``'s rank sweep, the linear probes as horizontal lines."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    for name, v in main_runs(summary).items():
        _errorbar(ax, cost[name]["trainable"], v["final"], fmt="o", label=name)
    sweep = rank_sweep(summary, s)
    if len(sweep) > 1:
        xs = [cost[rank_label(r, s)]["trainable"] for r in sweep]
        ax.plot(xs, [100 * sp.mean for sp in sweep.values()], "s-", color="gray", ms=4, lw=1,
                label="lora_layer4, r = " + ", ".join(map(str, sweep)))
    for (k, sp), ls in zip(summary.get("probe", {}).items(), ("--", ":")):
        ax.axhline(100 * sp.mean, color="gray", ls=ls, lw=1, label=f"linear probe, {k} features")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="final test accuracy (%)", title=title)
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_data_sweep(summary: dict, s: dict, ax=None, title: str | None = None):
    """Final test accuracy (%, mean over seeds; bars from the lowest to the highest seed) against
    the number of training images per target class, one line per run of ``data_sweep``."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(6, 3.8))[1]
    sweep = data_sweep(summary, s)
    for name, d in sweep.items():
        line, = ax.plot(list(d), [100 * sp.mean for sp in d.values()], "o-", label=name)
        for n, sp in d.items():
            _errorbar(ax, n, sp, fmt="none", ecolor=line.get_color())
    ax.set(xscale="log", xlabel="training images per class", ylabel="final test accuracy (%)", title=title)
    ax.set_xticks(sorted({n for d in sweep.values() for n in d}))
    ax.xaxis.set_major_formatter(plt.ScalarFormatter())
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend()
    return ax


def data_table(summary: dict, s: dict, a: str = "pt_net", b: str = "scratch") -> tuple[list[list], list[str]]:
    """Rows and headers of the data-size sweep: for each number of images per class, the final
    test accuracy of runs ``a`` and ``b`` (mean ± std over seeds) and the mean of their per-seed
    differences in points (the seeds pair them: the same images, classifier and batches)."""
    d = data_sweep(summary, s)
    rows = [[n, d[a][n].pct(), d[b][n].pct(), f"{100 * paired_gap(d[a][n], d[b][n]).mean:+.1f}"] for n in d[a]]
    return rows, ["images per class", a, b, f"{a} - {b} (points, mean over seeds)"]


def lr_table(summary: dict, s: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of the learning-rate check: the final test accuracy (mean ± std over
    seeds) of each run of ``lr_sweep`` at each learning rate."""
    d = lr_sweep(summary, s)
    names = list(d)
    lrs = sorted({lr for v in d.values() for lr in v})
    rows = [[f"{lr:g}" + (" (the chapter's)" if lr == s["lr"] else "")] + [d[n][lr].pct() for n in names]
            for lr in lrs]
    return rows, ["learning rate", *names]


def accuracy_table(summary: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of the test accuracies (mean ± standard deviation over seeds) after the
    first and the last epoch, and of the linear probes if any, from ``summarize(...)``."""
    rows = [[name, v["epoch 1"].pct(), v["final"].pct()] for name, v in main_runs(summary).items()]
    rows += [[f"linear probe on {k} features", "", sp.pct()] for k, sp in summary.get("probe", {}).items()]
    return rows, ["model", "test acc. after epoch 1", "after the last epoch"]


def record_values(summary: dict, cost: dict, pretrain=None) -> dict:
    """What Chapter 4 records (``checks.record``): ``{name: mean final test accuracy}`` of the
    main runs (the keys the results page reads), their standard deviations, the sweeps
    (``"ranks"``, ``"data"``, ``"lrs"``: mean and std of each point), the linear probes, the
    pretraining's final source test accuracy, the exact costs (``cost``) and the measured peak
    memory of a training step in MiB (``peak MiB``, on one thread; it varies a little with the
    CPU's kernels). Not the accuracy after the first epoch: two steps in, it is near chance and
    moved by up to 11 points between CPU kernel paths, so no tolerance would check anything."""
    runs = main_runs(summary)
    out = {name: v["final"].mean for name, v in runs.items()}
    out |= {"final std": {name: v["final"].std for name, v in runs.items()},
            "cost": {name: {k: v for k, v in c.items() if k != "peak_step_bytes"} for name, c in cost.items()},
            "peak MiB": {name: c["peak_step_bytes"] / 2**20 for name, c in cost.items()}}

    def ms(sp):
        return {"mean": sp.mean, "std": sp.std}
    for key in ("ranks", "ranks_more_data"):
        if key in summary:
            out[key] = {str(r): ms(sp) for r, sp in summary[key].items()}
    for key in ("data", "lrs"):
        if key in summary:
            out[key] = {name: {f"{x:g}": ms(sp) for x, sp in d.items()} for name, d in summary[key].items()}
    if "probe" in summary:
        out["probe"] = {k: ms(sp) for k, sp in summary["probe"].items()}
    if pretrain is not None:
        out["pretrain test acc"] = pretrain.test_acc[-1]
    return out
