"""Experiments the CLI can run without a notebook: ``python -m efficientml run NAME``.

Each experiment has settings for the ``quick`` and ``full`` profiles and a function that runs
it and returns its results; ``run_experiment`` adds provenance and writes the JSON result.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data import DATASETS, CharTokenizer, SequenceTask, TensorLoader, TokenBatches, load_dataset, load_text, split_tokens
from .lora import add_lora, freeze, optimizer_state_bytes, parameter_count
from .models import MLP, ConvNet, count_macs, count_parameters, resnet18
from .profiles import get_profile
from .pruning import PruningSchedule, SparseConvNet
from .quantization import dequantized_model
from .reproducibility import seed_everything
from .results import provenance, result_path, write_json
from .train import evaluate, fit, make_optimizer, select_device
from .transformer import LanguageModel, Transformer


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    settings: dict[str, dict]          # profile -> settings
    run: Callable[..., dict]           # run(settings, out_dir, device, progress) -> results


EXPERIMENTS: dict[str, Experiment] = {}


def register(name: str, description: str, quick: dict, full: dict):
    def wrap(fn):
        EXPERIMENTS[name] = Experiment(name, description, {"quick": quick, "full": full}, fn)
        return fn
    return wrap


def seed_for(seed: int, device) -> None:
    """Seed a run: on the CPU with 2 threads and deterministic kernels (repeatable, as CI checks);
    on a GPU with cuDNN's fastest kernels (full-profile runs, where speed matters more)."""
    gpu = select_device(device).type == "cuda"
    seed_everything(seed, threads=None if gpu else 2, deterministic=not gpu)


def train_loaders(s: dict, device, classes: list[int] | None = None, n_per_class: int | None = None):
    """Train/test loaders for settings with ``dataset``, ``n_per_class`` (None: all),
    ``test_per_class``, ``batch_size``, ``augment`` and ``seed``; returns (train loader, test
    loader, training ImageDataset). ``classes``: only those classes, relabelled 0..k-1 (see
    ``class_split``); ``n_per_class`` overrides ``s["n_per_class"]``. ``device`` None means the
    best available."""
    device = select_device(device)
    train = class_split(s, classes, True, n_per_class or s.get("n_per_class"))
    test = class_split(s, classes, False, s.get("test_per_class"))
    return (TensorLoader(train, s["batch_size"], shuffle=True, augment=s.get("augment", False),
                         device=device, seed=s["seed"]),
            TensorLoader(test, 1000, device=device), train)


def class_split(s: dict, classes: list[int] | None, train: bool, n_per_class: int | None):
    """One split of ``s["dataset"]`` restricted to ``classes`` (None: all), relabelled 0..k-1,
    then a class-balanced subset of ``n_per_class`` (None: all of it)."""
    ds = load_dataset(s["dataset"], train=train)
    if classes is not None:
        ds = ds.select_classes(classes)
    return ds.subset(n_per_class, seed=s["seed"]) if n_per_class else ds


MLP_QUICK = dict(dataset="fashion-mnist", n_per_class=None, test_per_class=None, hidden=[256, 128],
                 epochs=5, batch_size=128, lr=0.05, seed=0)
MLP_FULL = MLP_QUICK | dict(epochs=20)


def train_mlp(s: dict, out_dir: Path | None = None, device=None, progress=None, tag: str = "mlp"):
    """Train the MLP of settings ``s`` with SGD; returns (model, History, test loader)."""
    seed_for(s["seed"], device)
    train_loader, test_loader, train = train_loaders(s, device)
    c, h, w = train.shape
    model = MLP(c * h * w, tuple(s["hidden"]), train.num_classes)
    hist = fit(model, train_loader, test_loader, epochs=s["epochs"], lr=s["lr"], device=device,
               checkpoint=_checkpoint(out_dir, tag, s), progress=progress, desc=tag)
    return model, hist, test_loader


@register("mlp", "An MLP classifier on Fashion-MNIST (MNIST where available).", quick=MLP_QUICK, full=MLP_FULL)
def run_mlp(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, _ = train_mlp(s, out_dir, device, progress)
    if out_dir is not None:
        torch.save(model.state_dict(), out_dir / f"mlp-{s['profile']}.weights.pt")
    return {"parameters": count_parameters(model), "final_test_acc": hist.test_acc[-1] if hist.epochs else None,
            "history": hist}


# -- Chapter 2: quantization -------------------------------------------------------------------

def quantization_sweep(model, test_loader, bits: list[int]) -> dict:
    """Test (loss in bits, accuracy) of ``model`` in fp32 and after quantizing every parameter to
    each bit width, per tensor and per output channel."""
    def measure(m):
        loss, acc = evaluate(m, test_loader)
        return {"test_loss": loss, "test_acc": acc}
    return {"fp32": measure(model),
            **{mode: {str(b): measure(dequantized_model(model, b, per_channel=mode == "per_channel")) for b in bits}
               for mode in ("per_tensor", "per_channel")}}


@register("quantization", "Chapter 2.2: an MLP's parameters quantized to 8..2 bits, per tensor and per channel.",
          quick=MLP_QUICK | dict(bits=[8, 7, 6, 5, 4, 3, 2]), full=MLP_FULL | dict(bits=[8, 7, 6, 5, 4, 3, 2]))
def run_quantization(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, test_loader = train_mlp(s, out_dir, device, progress, tag="quantization-mlp")
    return {"parameters": count_parameters(model), "history": hist} | quantization_sweep(model, test_loader, s["bits"])


def _checkpoint(out_dir: Path | None, stem: str, s: dict) -> Path | None:
    return None if out_dir is None else out_dir / f"{stem}-{s['profile']}.ckpt.pt"


# -- Chapter 1: learning rates and schedules ---------------------------------------------------

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


def settings(name: str, profile: str | None = None) -> dict:
    """A copy of experiment ``name``'s settings under ``profile`` (default: ``get_profile()``)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(sorted(EXPERIMENTS))}")
    profile = get_profile(profile)
    return dict(EXPERIMENTS[name].settings[profile]) | {"profile": profile}


def run(name: str, profile: str | None = None, overrides: dict | None = None, out_dir: str | Path | None = None,
        device=None, progress: bool | None = None) -> dict:
    """Run experiment ``name`` under ``profile`` (default ``$EFFICIENTML_PROFILE`` or quick).

    Returns ``{"experiment", "profile", "settings", "results", "wall_time_s", "provenance"}``;
    results hold ``History`` objects where the experiment trained something.
    overrides: settings to change (keys must exist). out_dir: where per-epoch checkpoints go
    (None: no checkpoints); an interrupted run resumes from them when started again.
    """
    s = settings(name, profile)  # each experiment's training helpers seed before building a model
    profile = s.pop("profile")
    for k, v in (overrides or {}).items():
        if k not in s:
            raise ValueError(f"{name} has no setting {k!r}; its settings are {', '.join(s)}")
        s[k] = v
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(device)
    t0 = time.perf_counter()
    results = EXPERIMENTS[name].run(s | {"profile": profile}, out_dir, device, progress)
    return {"experiment": name, "profile": profile, "settings": s, "results": results,
            "wall_time_s": time.perf_counter() - t0, "provenance": provenance(device)}


def run_experiment(name: str, profile: str | None = None, out_dir: str | Path = "results",
                   overrides: dict | None = None, device=None, progress: bool | None = None) -> Path:
    """``run`` the experiment with checkpoints in ``out_dir`` and write ``OUT_DIR/NAME-PROFILE.json``."""
    payload = run(name, profile, overrides, out_dir, device, progress)
    return write_json(result_path(out_dir, name, payload["profile"]), payload)


# -- Chapter 3: pruning ------------------------------------------------------------------------

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


# -- Chapter 4: transfer learning and LoRA -----------------------------------------------------

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


# -- Chapter 5: the Transformer on a toy task --------------------------------------------------

TRANSFORMER_QUICK = dict(task="reverse", n_symbols=10, length=8, batch_size=64, steps_per_epoch=100, epochs=4,
                         d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.0, lr=3e-3, warmup=50,
                         test_size=500, seed=0)
TRANSFORMER_FULL = TRANSFORMER_QUICK | dict(length=16, steps_per_epoch=250, epochs=20, d_model=128, n_layers=3,
                                            d_ff=512, dropout=0.1, lr=1e-3, warmup=400, test_size=2000)


def train_sequence_transformer(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """Train an encoder-decoder ``Transformer`` on the ``s["task"]`` (copy/reverse) task with Adam and a
    warm-up + cosine schedule; returns (model, History, test ``SequenceTask``), the test batches
    drawn with another seed than the training ones."""
    seed_for(s["seed"], device)
    device = select_device(device)
    task = SequenceTask(s["task"], s["n_symbols"], s["length"], s["batch_size"], s["steps_per_epoch"], s["seed"], device)
    test = SequenceTask(s["task"], s["n_symbols"], s["length"], s["test_size"], 1, s["seed"] + 1, device)
    model = Transformer(task.vocab_size, task.vocab_size, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"],
                        s["dropout"], max_len=s["length"] + 2, pad=task.PAD)
    hist = fit(model, task, test, epochs=s["epochs"], lr=s["lr"], optimizer="adam", weight_decay=0.0,
               scheduler="warmup-cosine", warmup=s["warmup"], device=device,
               checkpoint=_checkpoint(out_dir, "transformer", s), progress=progress, desc=s["task"])
    return model, hist, test


def sequence_accuracy(model: Transformer, test: SequenceTask) -> float:
    """Fraction of test sources whose greedily decoded output is exactly right (every symbol and EOS)."""
    (src, _), tgt_out = next(iter(test))
    out = model.greedy_decode(src, test.length + 1, bos=test.BOS, eos=test.EOS)
    return float((out[:, 1:] == tgt_out).all(1).float().mean())


@register("transformer", "Chapter 5: an encoder-decoder Transformer trained to reverse sequences.",
          quick=TRANSFORMER_QUICK, full=TRANSFORMER_FULL)
def run_transformer(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, test = train_sequence_transformer(s, device, progress, out_dir)
    return {"parameters": count_parameters(model), "history": hist, "sequence_accuracy": sequence_accuracy(model, test)}


# -- Chapter 6: a character-level language model on Tiny Shakespeare --------------------------

LM_QUICK = dict(text="tinyshakespeare", val_fraction=0.1, d_model=128, n_heads=4, n_layers=4, d_ff=512, dropout=0.0,
                block_size=64, batch_size=12, steps_per_epoch=200, epochs=10, lr=1e-3, warmup=100, weight_decay=0.1,
                clip_grad_norm=1.0, val_batches=20, val_batch_size=64, seed=0)
LM_FULL = LM_QUICK | dict(d_model=384, n_heads=6, n_layers=6, d_ff=1536, dropout=0.2, block_size=256, batch_size=64,
                          steps_per_epoch=500, epochs=10, warmup=200, val_batches=50)


def language_model_data(s: dict, device=None):
    """(tokenizer, train tokens, validation tokens, train batches, validation batches) for settings ``s``."""
    device = select_device(device)
    text = load_text(s["text"])
    tok = CharTokenizer(text)
    train, val = split_tokens(tok.encode(text), s["val_fraction"])
    return (tok, train, val,
            TokenBatches(train, s["block_size"], s["batch_size"], s["steps_per_epoch"], s["seed"], device),
            TokenBatches(val, s["block_size"], s["val_batch_size"], s["val_batches"], s["seed"] + 1, device))


def train_language_model(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """Train a ``LanguageModel`` with AdamW, warm-up + cosine schedule and gradient clipping;
    an "epoch" is ``steps_per_epoch`` random batches, after which the validation loss is measured
    on the same ``val_batches`` windows every time. Returns (model, History, tokenizer, train
    tokens, validation tokens); History losses are in bits per character."""
    seed_for(s["seed"], device)
    device = select_device(device)
    tok, train, val, train_batches, val_batches = language_model_data(s, device)
    model = LanguageModel(tok.vocab_size, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"], s["dropout"],
                          max_len=s["block_size"])
    hist = fit(model, train_batches, val_batches, epochs=s["epochs"], lr=s["lr"], optimizer="adamw",
               weight_decay=s["weight_decay"], scheduler="warmup-cosine", warmup=s["warmup"],
               clip_grad_norm=s["clip_grad_norm"], device=device, checkpoint=_checkpoint(out_dir, "language-model", s),
               progress=progress, desc="language model")
    return model, hist, tok, train, val


@register("language-model", "Chapter 6: a character-level decoder-only Transformer on Tiny Shakespeare.",
          quick=LM_QUICK, full=LM_FULL)
def run_language_model(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, tok, train, val = train_language_model(s, device, progress, out_dir)
    steps = s["steps_per_epoch"] * hist.epochs
    prompt = tok.encode("\n")[None].to(next(model.parameters()).device)
    same = torch.equal(model.generate(prompt, 200, temperature=0, use_cache=True),
                       model.generate(prompt, 200, temperature=0, use_cache=False))
    return {"parameters": count_parameters(model), "history": hist, "kv_cache_equal": same,
            "val_loss_nats": hist.test_loss[-1] * math.log(2),
            "train_tokens_per_s": steps * s["batch_size"] * s["block_size"] / sum(hist.train_time)}
