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
    override ``lr``, ``momentum`` and ``weight_decay`` for their parameters.

    Adam and AdamW take PyTorch's fused implementation (``fused=True``: one kernel updates every
    parameter) where all parameters are floating-point tensors on a CPU or a CUDA GPU, and its
    default elsewhere (e.g. on an Apple GPU). The update is the same formula; its float
    rounding differs from the default's in the last bits. On a CPU, the default loops over the
    parameters with about ten operations each: Chapter 7 measures what the fused step saves."""
    params = list(params)
    if any(isinstance(g, dict) for g in params):
        if not all(isinstance(g, dict) and "params" in g for g in params):
            raise TypeError("params must be all parameters or all groups (dicts with a 'params' list)")
        params = [g | {"params": list(g["params"])} for g in params]
    if not sum(len(g["params"]) if isinstance(g, dict) else 1 for g in params):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    name = _name(name, "optimizer")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=weight_decay, fused=_fusable(params) or None)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd, adam or adamw")


def _fusable(params: list) -> bool:
    """Whether every parameter in ``params`` (parameters or groups) is a floating-point tensor on
    a CPU or a CUDA GPU, where PyTorch's fused Adam and AdamW are known to run."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)


def _name(name, what: str) -> str:
    """A name given as a string, compared case-insensitively: ``"Warmup-Cosine"`` is ``"warmup-cosine"``."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a name (str), got {type(name).__name__}")
    return name.strip().lower()


# When each schedule steps: once per epoch, or once per iteration (language models' warm-up).
SCHEDULES = {"none": None, "multistep": "epoch", "cosine": "epoch", "warmup-cosine": "iteration"}


def make_scheduler(optimizer: torch.optim.Optimizer, name: str = "none", epochs: int = 1,
                   milestones: Iterable[int] | None = None, gamma: float = 0.1, warmup: int = 0,
                   total_steps: int = 1, min_lr_ratio: float = 0.1):
    """A learning-rate schedule: ``none``; per epoch, ``multistep`` (lr *= gamma at each milestone
    epoch) or ``cosine`` (cosine annealing from lr to 0 over ``epochs``); per iteration,
    ``warmup-cosine`` (linear warm-up from 0 over ``warmup`` iterations, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``), as language models are trained. ``SCHEDULES``
    says when each steps; ``Schedule`` steps it then."""
    name = _name(name, "scheduler")
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler {name!r}: choose none, multistep, cosine or warmup-cosine")
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
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def _warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """The learning-rate factor at iteration ``step`` (0-based) of the warm-up + cosine schedule."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """A learning-rate schedule that knows when it steps: ``after_iteration`` and ``after_epoch``
    are called by the training loop after every iteration and every epoch, and step the
    schedule only at its own interval (``SCHEDULES``). Arguments as ``make_scheduler``."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "none", **kwargs):
        self.scheduler = make_scheduler(optimizer, name, **kwargs)
        self.interval = SCHEDULES[_name(name, "scheduler")]

    def after_iteration(self) -> None:
        if self.interval == "iteration":
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.interval == "epoch":
            self.scheduler.step()

    def state_dict(self) -> dict | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def _to(x, device):
    """A batch input (a tensor, or a tuple of tensors for models with several inputs) on ``device``."""
    if isinstance(x, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def _call(model: nn.Module, x):
    return model(*x) if isinstance(x, tuple) else model(x)


# fit's ``precision``: the dtype autocast computes the forward pass in (float32: no autocast).
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

IGNORE_INDEX = -100  # targets F.cross_entropy leaves out (its default ignore_index): padding


def _flat(logits: torch.Tensor, y: torch.Tensor):
    """Sequence outputs (B, T, V) with targets (B, T) as (B*T, V) and (B*T,): one prediction per token."""
    return (logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) if logits.dim() > 2 else (logits, y)


def _check_targets(y: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless every target is a class index in 0..num_classes-1 or IGNORE_INDEX
    (on a GPU, a target out of range would stop the device with an assertion instead)."""
    if y.dtype != torch.int64:
        raise TypeError(f"targets must be int64 class indices, got {y.dtype}")
    bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= num_classes))
    if bad.any():
        raise ValueError(f"target {int(y[bad][0])} is no class of a model with {num_classes} outputs: "
                         f"targets must be in 0..{num_classes - 1} (or {IGNORE_INDEX}, ignored)")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | None = None) -> tuple[float, float]:
    """(mean cross-entropy in bits per example, accuracy) of ``model`` over ``loader``.

    For sequence models (logits (B, T, V), targets (B, T)) both are per token. Targets equal to
    ``IGNORE_INDEX`` (-100, ``F.cross_entropy``'s default: e.g. padding) count in neither.
    Sums stay on the device until the end (one synchronisation, not one per batch); the batches'
    float32 loss sums are added in float64 on the CPU (no float64 on the device: MPS has none)."""
    if device is None:  # the model's device; CPU for models without parameters (e.g. packed int8 ones)
        device = next(model.parameters(), torch.empty(0, device="cpu")).device
    model.eval()
    losses, correct, n = [], 0, 0
    for x, y in loader:
        logits, y = _flat(_call(model, _to(x, device)), y.to(device))
        _check_targets(y, logits.shape[-1])
        losses.append(F.cross_entropy(logits, y, reduction="sum"))
        correct += (logits.argmax(1) == y).sum()
        n += (y != IGNORE_INDEX).sum()
    n = int(n)
    if n == 0:
        raise ValueError("the loader gave no targets to evaluate on")
    total = sum(torch.stack(losses).cpu().tolist())  # float64 on the host, in batch order
    return total / n / LN2, int(correct) / n


@dataclass
class Checkpoint:
    """Where ``fit`` saves its state after every epoch, and resumes from.

    The file holds the model, optimizer and schedule state, the History, the random-number
    generators' state and ``settings``: everything that decides the run (learning rate,
    schedule, epochs, the model's parameter shapes, batches per epoch, and whatever the caller
    adds, e.g. an experiment's settings). Resuming with other settings raises ValueError naming
    them, instead of continuing a different run. Files are written atomically and read onto the
    CPU first (``map_location="cpu"``), so a checkpoint written on a GPU resumes anywhere.
    """
    path: Path
    settings: dict

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
             scaler: torch.amp.GradScaler | None = None) -> History | None:
        """Restore a saved run into ``model``, ``optimizer`` and ``schedule``; its History, or
        None if there is no file yet."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        saved = state.get("settings")
        if saved is None:
            raise ValueError(f"checkpoint {self.path} records no settings (written by an older version): "
                             "delete it to start the run again")
        differ = [f"{k}: {saved.get(k, '(absent)')!r} there, {self.settings.get(k, '(absent)')!r} here"
                  for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
        if differ:
            raise ValueError(f"checkpoint {self.path} was made by a run with other settings; delete it or "
                             "write elsewhere to start this run. Differences:\n  " + "\n  ".join(differ))
        model.load_state_dict(state["model"])        # copied onto the model's device
        optimizer.load_state_dict(state["optimizer"])  # moved to each parameter's device
        schedule.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return History.from_dict(state["history"])

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
             history: History, scaler: torch.amp.GradScaler | None = None) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"settings": self.settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(), "history": history.to_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp)
        os.replace(tmp, self.path)  # atomic: an interruption leaves the previous checkpoint intact


def _plain(v):
    """A setting as plain, comparable data: tuples as lists, tensors and others by their repr."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return repr(v)


@dataclass
class EpochResult:
    """What one epoch of training measured: mean training loss (bits per counted target),
    running accuracy, seconds, and the fractional epoch of a divergence (None if none)."""
    loss: float
    accuracy: float
    seconds: float
    diverged_at: float | None = None


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, schedule: Schedule, epoch: int,
                history: History, device: torch.device, clip_grad_norm: float | None = None,
                progress: bool = False, precision: str = "float32",
                scaler: torch.amp.GradScaler | None = None, forward: nn.Module | None = None) -> EpochResult:
    """One epoch of training (``epoch`` counts from 0): forward, cross-entropy, backward, optional
    gradient clipping, optimizer step, and the schedule after every iteration. Appends each
    iteration's loss (bits) to ``history.iter_loss`` and its fractional epoch to ``iter_epoch``;
    a NaN or infinite loss stops the epoch before its step (``EpochResult.diverged_at``).

    precision: the forward pass and loss run under ``torch.autocast`` in this dtype unless it is
    "float32" (``PRECISIONS``); ``scaler``, a GradScaler, scales the loss before backward (float16).
    forward: the module that computes the forward pass (e.g. ``torch.compile(model)``), default
    ``model``; it must share ``model``'s parameters."""
    t0 = time.perf_counter()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    model.train()
    n_batches = len(loader)
    loss_sum, correct, seen = 0.0, 0, 0
    batches = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress,
                   dynamic_ncols=True)
    forward = model if forward is None else forward
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "float32")
    for i, (x, y) in enumerate(batches):
        with autocast:
            logits, y = _flat(_call(forward, _to(x, device)), y.to(device, non_blocking=True))
            _check_targets(y, logits.shape[-1])
            loss = F.cross_entropy(logits, y)        # autocast computes it in float32
        value = loss.item()
        if not math.isfinite(value):
            return EpochResult(math.nan, math.nan, time.perf_counter() - t0, epoch + i / n_batches)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:                                        # float16: scaled so small gradients stay nonzero
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)               # true gradients, for clipping
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        if scaler is None:
            optimizer.step()
        else:                                        # skips the step if a gradient overflowed
            scaler.step(optimizer)
            scaler.update()
        schedule.after_iteration()
        history.iter_loss.append(value / LN2)
        history.iter_epoch.append(epoch + (i + 1) / n_batches)
        counted = int((y != IGNORE_INDEX).sum())      # targets that count (not padding)
        loss_sum += value * counted                  # the loss is the mean over counted targets
        correct += (logits.argmax(1) == y).sum()     # on the device; read once per epoch
        seen += counted
    return EpochResult(loss_sum / seen / LN2, int(correct) / seen, time.perf_counter() - t0)


def fit(model: nn.Module, train_loader, test_loader=None, *, epochs: int, lr: float = 0.1,
        optimizer: str | torch.optim.Optimizer = "sgd", momentum: float = 0.9,
        weight_decay: float = 5e-4, scheduler: str = "none", milestones: Iterable[int] | None = None,
        gamma: float = 0.1, warmup: int = 0, clip_grad_norm: float | None = None,
        decay_2d_only: bool = False,
        callback: Callable[[int, nn.Module, History], None] | None = None,
        device: str | torch.device | None = None, checkpoint: str | os.PathLike | None = None,
        checkpoint_settings: dict | None = None, progress: bool | None = None, desc: str = "fit",
        precision: str = "float32", compile: bool = False) -> History:
    """Train ``model`` on ``train_loader`` for ``epochs`` epochs and return its ``History``.

    optimizer: ``"sgd"`` (momentum and weight decay as given), ``"adam"``, ``"adamw"``, built over
        the parameters that require gradients; or a ready optimizer, used as it is.
    decay_2d_only: if True, ``weight_decay`` applies only to parameters of 2 or more dimensions,
        not to biases and normalisation gains (``param_groups``, as nanoGPT); the default, False,
        decays every trained parameter. Only for an optimizer that ``fit`` builds.
    scheduler: ``"none"``, ``"multistep"`` (with ``milestones`` and ``gamma``) or ``"cosine"``,
        stepped once per epoch; or ``"warmup-cosine"`` (``warmup`` iterations), stepped per
        iteration (names are case-insensitive).
    clip_grad_norm: if given (a number > 0), gradients are rescaled so that their global L2 norm
        is at most this.
    callback: called as ``callback(epoch, model, history)`` after each epoch (1-based) has been
        trained, evaluated and recorded; pruning schedules hook in here.
    checkpoint: a file; after every epoch the run's state is saved there, and a later call with
        the same file and the same settings resumes after the last saved epoch (``Checkpoint``).
        ``checkpoint_settings``: more settings the file must match (e.g. the data's).
    precision: ``"float32"`` (the default: no autocast), ``"bfloat16"`` or ``"float16"``: the
        forward pass and the loss of training run under ``torch.autocast`` in that dtype (matrix
        products in it, reductions and the loss in float32; the weights, gradients and optimizer
        stay float32). float16 also scales the loss (``torch.amp.GradScaler``), so that small
        gradients do not round to zero; its state is saved in the checkpoint. Evaluation runs
        in float32. (Chapter 7.)
    compile: if True, training's forward passes run through ``torch.compile(model)`` (the first
        batch pays the compilation); evaluation runs the model as it is. (Chapter 7.)
    Loaders are ``TensorLoader``s or any sized iterable of (x, y) batches, where x may be a tuple
    of inputs (``model(*x)``) and the model may output sequences, logits (B, T, V) for targets
    (B, T), whose loss and accuracy are then per token; targets are class indices (or -100,
    ignored). A loader's ``set_epoch`` is called before each epoch when it has one. A NaN or
    infinite loss stops training cleanly and is recorded in ``history.diverged_at``.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if clip_grad_norm is not None and not (clip_grad_norm > 0 and math.isfinite(clip_grad_norm)):
        raise ValueError(f"clip_grad_norm must be a positive number (or None), got {clip_grad_norm}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    n_batches = len(train_loader)
    if n_batches == 0:
        raise ValueError("the training loader gives no batches")
    milestones = list(milestones) if milestones is not None else None
    device = select_device(device)
    model.to(device)
    if isinstance(optimizer, torch.optim.Optimizer):
        if decay_2d_only:
            raise ValueError("decay_2d_only applies to an optimizer that fit builds, not a ready one: "
                             "build it over param_groups(model, weight_decay) instead")
        opt, opt_name = optimizer, {"class": type(optimizer).__name__} | _plain(optimizer.defaults)
    else:
        params = (param_groups(model, weight_decay) if decay_2d_only
                  else (p for p in model.parameters() if p.requires_grad))
        opt, opt_name = make_optimizer(params, optimizer, lr, momentum, weight_decay), _name(optimizer, "optimizer")
    schedule = Schedule(opt, scheduler, epochs=epochs, milestones=milestones, gamma=gamma, warmup=warmup,
                        total_steps=max(1, epochs * n_batches))
    history = History()
    scaler = torch.amp.GradScaler(device.type) if precision == "float16" else None
    forward = torch.compile(model) if compile else model
    ckpt = None
    if checkpoint is not None:
        sched_name = _name(scheduler, "scheduler")
        ckpt = Checkpoint(Path(checkpoint), _plain({
            # a run extended by more epochs continues exactly, unless its schedule spans the epochs
            "epochs": epochs if sched_name in ("cosine", "warmup-cosine") else "any", "lr": lr, "optimizer": opt_name, "momentum": momentum,
            "weight_decay": weight_decay, "decay_2d_only": decay_2d_only, "scheduler": sched_name,
            "milestones": milestones, "gamma": gamma, "warmup": warmup, "clip_grad_norm": clip_grad_norm,
            "batches_per_epoch": n_batches, "model": type(model).__name__,
            "parameters": {k: list(v.shape) for k, v in model.state_dict().items()},
        } | ({"precision": precision} if precision != "float32" else {})  # (older files: float32)
          | {f"extra/{k}": v for k, v in (checkpoint_settings or {}).items()}))
        history = ckpt.load(model, opt, schedule, scaler) or history
        if history.epochs > epochs:
            raise ValueError(f"checkpoint {checkpoint} holds {history.epochs} epochs, more than the {epochs} asked "
                             "for: delete it or write elsewhere to start this run")

    quiet = not show_progress(progress)
    bar = tqdm(total=epochs, initial=history.epochs, desc=desc, unit="epoch", disable=quiet, dynamic_ncols=True)
    for epoch in range(history.epochs, epochs):
        if history.diverged:
            break
        epoch_lr = opt.param_groups[0]["lr"]
        result = train_epoch(model, train_loader, opt, schedule, epoch, history, device, clip_grad_norm,
                             progress=not quiet, precision=precision, scaler=scaler, forward=forward)
        if result.diverged_at is not None:
            history.diverged_at = result.diverged_at
            bar.set_postfix_str(f"diverged at epoch {history.diverged_at:.2f}")
            break
        schedule.after_epoch()
        t_eval = time.perf_counter()
        test_loss, test_acc = (evaluate(model, test_loader, device) if test_loader is not None
                               else (math.nan, math.nan))
        history.train_loss.append(result.loss)
        history.train_acc.append(result.accuracy)
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
        history.lr.append(epoch_lr)
        history.train_time.append(result.seconds)
        history.epoch_time.append(result.seconds + time.perf_counter() - t_eval)
        if callback is not None:
            callback(epoch + 1, model, history)
        if ckpt is not None:
            ckpt.save(model, opt, schedule, history, scaler)
        bar.update(1)
        bar.set_postfix(loss=f"{history.train_loss[-1]:.3f}b", test_acc=f"{test_acc:.3f}")
    bar.close()
    return history
