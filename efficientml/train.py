"""The one training engine: ``fit`` trains a classifier and returns its ``History``.

Losses are cross-entropy in bits (log base 2): a uniform guess over 10 classes costs
log2(10) = 3.32 bits, a perfect classifier 0. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars: no widget machinery (and no warning) in notebooks

LN2 = math.log(2.0)


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else ``$EFFICIENTML_DEVICE``, else the first of cuda, mps, cpu that is available."""
    name = device if device is not None else os.environ.get("EFFICIENTML_DEVICE")
    if name is not None:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def show_progress(progress: bool | None = None) -> bool:
    """Progress bars: ``progress`` if given, else ``$EFFICIENTML_PROGRESS``, else only on a terminal.

    In a notebook kernel stderr is no terminal, so executed chapters keep bars out of their
    stored outputs; pass ``progress=True`` to see them while reading interactively.
    """
    if progress is not None:
        return progress
    env = os.environ.get("EFFICIENTML_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return sys.stderr is not None and sys.stderr.isatty()


@dataclass
class History:
    """What a run of ``fit`` measured.

    Per iteration: ``iter_loss`` (training loss of the batch, bits) and ``iter_epoch`` (the
    position in epochs, fractional: 0.5 is halfway through the first epoch).
    Per epoch (index e is epoch e + 1): ``train_loss`` and ``test_loss`` (mean bits per example),
    ``train_acc`` (running accuracy over the epoch's augmented batches) and ``test_acc``,
    ``lr`` (the learning rate the epoch was trained with), ``epoch_time`` (seconds, training and
    evaluation), ``train_time`` (seconds, training only). ``total_time`` is the sum of epoch
    times. ``diverged_at`` is the fractional epoch at which the loss became NaN or infinite, if
    it did; training stopped there.
    """
    iter_loss: list[float] = field(default_factory=list)
    iter_epoch: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    train_time: list[float] = field(default_factory=list)
    diverged_at: float | None = None

    @property
    def epochs(self) -> int:
        """Number of completed epochs."""
        return len(self.train_loss)

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def total_time(self) -> float:
        return float(sum(self.epoch_time))

    def to_dict(self) -> dict:
        return asdict(self) | {"total_time": self.total_time, "diverged": self.diverged}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters of ``model`` as two optimizer groups, decayed as nanoGPT (after
    GPT-2) decays them: tensors of 2 or more dimensions (matmul weights, embeddings, convolution
    kernels) with ``weight_decay``; the rest (biases, LayerNorm and BatchNorm gains and shifts),
    whose size is no measure of a model's complexity, with none. Groups are ``{"params": [...],
    "weight_decay": float}`` for ``make_optimizer`` or any torch optimizer; an empty group is
    left out, and a parameter shared by several modules appears once."""
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], name: str = "sgd", lr: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD with momentum (the default), Adam or AdamW over ``params``: parameters, or parameter
    groups (dicts with a ``"params"`` list, e.g. from ``param_groups``), whose own settings
    override ``lr``, ``momentum`` and ``weight_decay`` for their parameters."""
    params = list(params)
    if any(isinstance(g, dict) for g in params):
        if not all(isinstance(g, dict) and "params" in g for g in params):
            raise TypeError("params must be all parameters or all groups (dicts with a 'params' list)")
        params = [g | {"params": list(g["params"])} for g in params]
    if not sum(len(g["params"]) if isinstance(g, dict) else 1 for g in params):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, adam or adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str = "none", epochs: int = 1,
                   milestones: Iterable[int] | None = None, gamma: float = 0.1, warmup: int = 0,
                   total_steps: int = 1, min_lr_ratio: float = 0.1):
    """A learning-rate schedule: ``none``; per epoch, ``multistep`` (lr *= gamma at each milestone
    epoch) or ``cosine`` (cosine annealing from lr to 0 over ``epochs``); per iteration,
    ``warmup-cosine`` (linear warm-up from 0 over ``warmup`` iterations, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``), as language models are trained."""
    name = name.lower()
    if name == "none":
        return None
    if name == "warmup-cosine":
        if not 0 <= warmup < total_steps:
            raise ValueError(f"need 0 <= warmup < total_steps, got warmup={warmup}, total_steps={total_steps}")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            _warmup_cosine, warmup=warmup, total=total_steps, floor=min_lr_ratio))
    if name == "multistep":
        if not milestones:
            raise ValueError("the multistep schedule needs milestones (epochs at which lr *= gamma)")
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    raise ValueError(f"unknown scheduler {name!r}: choose none, multistep, cosine or warmup-cosine")


def _warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """The learning-rate factor at iteration ``step`` (0-based) of the warm-up + cosine schedule."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to(x, device):
    """A batch input (a tensor, or a tuple of tensors for models with several inputs) on ``device``."""
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def _call(model: nn.Module, x):
    return model(*x) if isinstance(x, tuple) else model(x)


IGNORE_INDEX = -100  # targets F.cross_entropy leaves out (its default ignore_index): padding


def _flat(logits: torch.Tensor, y: torch.Tensor):
    """Sequence outputs (B, T, V) with targets (B, T) as (B*T, V) and (B*T,): one prediction per token."""
    return (logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) if logits.dim() > 2 else (logits, y)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | None = None) -> tuple[float, float]:
    """(mean cross-entropy in bits per example, accuracy) of ``model`` over ``loader``.

    For sequence models (logits (B, T, V), targets (B, T)) both are per token. Targets equal to
    ``IGNORE_INDEX`` (-100, ``F.cross_entropy``'s default: e.g. padding) count in neither."""
    if device is None:  # the model's device; CPU for models without parameters (e.g. packed int8 ones)
        device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    total_loss, correct, n = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    for x, y in loader:  # sums stay on the device: one synchronisation at the end, not two per batch
        logits, y = _flat(_call(model, _to(x, device)), y.to(device))
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += (y != IGNORE_INDEX).sum()
    n = int(n)
    return total_loss.item() / n / LN2, int(correct) / n


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interruption leaves the previous checkpoint intact


def fit(model: nn.Module, train_loader, test_loader=None, *, epochs: int, lr: float = 0.1,
        optimizer: str | torch.optim.Optimizer = "sgd", momentum: float = 0.9,
        weight_decay: float = 5e-4, scheduler: str = "none", milestones: Iterable[int] | None = None,
        gamma: float = 0.1, warmup: int = 0, clip_grad_norm: float | None = None,
        decay_2d_only: bool = False,
        callback: Callable[[int, nn.Module, History], None] | None = None,
        device: str | torch.device | None = None, checkpoint: str | os.PathLike | None = None,
        progress: bool | None = None, desc: str = "fit") -> History:
    """Train ``model`` on ``train_loader`` for ``epochs`` epochs and return its ``History``.

    optimizer: ``"sgd"`` (momentum and weight decay as given), ``"adam"``, ``"adamw"``, built over
        the parameters that require gradients; or a ready optimizer, used as it is.
    decay_2d_only: if True, ``weight_decay`` applies only to parameters of 2 or more dimensions,
        not to biases and normalisation gains (``param_groups``, as nanoGPT); the default, False,
        decays every trained parameter. Only for an optimizer that ``fit`` builds.
    scheduler: ``"none"``, ``"multistep"`` (with ``milestones`` and ``gamma``) or ``"cosine"``,
        stepped once per epoch; or ``"warmup-cosine"`` (``warmup`` iterations), stepped per iteration.
    clip_grad_norm: if given, gradients are rescaled so that their global L2 norm is at most this.
    callback: called as ``callback(epoch, model, history)`` after each epoch (1-based) has been
        trained, evaluated and recorded; pruning schedules hook in here.
    checkpoint: a file; after every epoch the model, optimizer, scheduler, history and RNG state
        are saved there atomically, and a later call with the same file resumes after the last
        saved epoch instead of starting over.
    Loaders are ``TensorLoader``s or any iterable of (x, y) batches, where x may be a tuple of
    inputs (``model(*x)``) and the model may output sequences, logits (B, T, V) for targets (B, T),
    whose loss and accuracy are then per token; a loader's ``set_epoch`` is called before each
    epoch when it has one. A NaN or infinite loss stops training cleanly and
    is recorded in ``history.diverged_at``.
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    device = select_device(device)
    model.to(device)
    if isinstance(optimizer, torch.optim.Optimizer):
        if decay_2d_only:
            raise ValueError("decay_2d_only applies to an optimizer that fit builds, not a ready one: "
                             "build it over param_groups(model, weight_decay) instead")
        opt = optimizer
    else:
        params = (param_groups(model, weight_decay) if decay_2d_only
                  else (p for p in model.parameters() if p.requires_grad))
        opt = make_optimizer(params, optimizer, lr, momentum, weight_decay)
    sched = make_scheduler(opt, scheduler, epochs, milestones, gamma, warmup, max(1, epochs * len(train_loader)))
    per_iteration = scheduler == "warmup-cosine"
    history, start = History(), 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history = History.from_dict(state["history"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = history.epochs

    n_batches = len(train_loader)
    quiet = not show_progress(progress)
    bar = tqdm(total=epochs, initial=start, desc=desc, unit="epoch", disable=quiet, dynamic_ncols=True)
    for epoch in range(start, epochs):
        if history.diverged:
            break
        t0 = time.perf_counter()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        epoch_lr = opt.param_groups[0]["lr"]
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = tqdm(train_loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=quiet,
                       dynamic_ncols=True)
        for i, (x, y) in enumerate(batches):
            logits, y = _flat(_call(model, _to(x, device)), y.to(device, non_blocking=True))
            loss = F.cross_entropy(logits, y)
            value = loss.item()
            if not math.isfinite(value):
                history.diverged_at = epoch + i / n_batches
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            opt.step()
            if sched is not None and per_iteration:
                sched.step()
            history.iter_loss.append(value / LN2)
            history.iter_epoch.append(epoch + (i + 1) / n_batches)
            counted = int((y != IGNORE_INDEX).sum())      # targets that count (not padding)
            loss_sum += value * counted                  # the loss is the mean over counted targets
            correct += (logits.argmax(1) == y).sum()  # on the device; read once per epoch
            seen += counted
        if history.diverged:
            bar.set_postfix_str(f"diverged at epoch {history.diverged_at:.2f}")
            break
        train_time = time.perf_counter() - t0
        if sched is not None and not per_iteration:
            sched.step()
        test_loss, test_acc = evaluate(model, test_loader, device) if test_loader is not None else (math.nan, math.nan)
        history.train_loss.append(loss_sum / seen / LN2)
        history.train_acc.append(int(correct) / seen)
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
        history.lr.append(epoch_lr)
        history.epoch_time.append(time.perf_counter() - t0)
        history.train_time.append(train_time)
        if callback is not None:
            callback(epoch + 1, model, history)
        if ckpt is not None:
            _save_checkpoint(ckpt, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "history": history.to_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        bar.update(1)
        bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}b", test_acc=f"{test_acc:.3f}")
    bar.close()
    return history
