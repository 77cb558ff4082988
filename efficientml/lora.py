"""Transfer learning and LoRA: freeze a pretrained network, or adapt it with a low-rank update.

Freezing sets ``requires_grad=False`` on the parameters of chosen layers: they get no gradient,
no optimizer state, and backpropagation stops at the first trainable layer. (BatchNorm layers
in frozen parts still update their running statistics in training mode; only their affine
parameters are frozen.)

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") keeps a pretrained
linear layer's weight W (out x in) frozen and learns a low-rank update in its place:

    y = W x + b + (alpha / r) * B (A x),     A: (r x in), B: (out x r), r << min(in, out)

so the layer trains r * (in + out) numbers instead of in * out. B starts at zero, so the adapted
layer starts equal to the pretrained one; after training, ``merge`` folds (alpha / r) B A into W
and inference costs exactly what the original layer cost. ``LoRAConv2d`` does the same for a
convolution, whose weight (out, in, kh, kw) is an out x (in kh kw) matrix.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class LoRALayer(nn.Module):
    """What LoRA layers share: a frozen ``base`` layer, a rank ``r``, ``scaling = alpha / r``,
    trainable ``lora_A`` and ``lora_B`` (B starts at zero, so the layer starts equal to its
    base), and ``merge``/``unmerge``. Subclasses give ``delta_weight`` (shaped like the base
    weight) and ``_update(x)`` (the update's output, without the scaling)."""

    def _setup(self, base: nn.Module, r: int, r_max: int, alpha: float, dropout: float) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= r_max:
            raise ValueError(f"rank r must be an int in 1..{r_max} for this layer, got {r!r}")
        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, float(alpha), alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # the update is inside base.weight already
            return y
        return y + self.scaling * self._update(self.dropout(x))

    @torch.no_grad()
    def merge(self) -> "LoRALayer":
        """Fold the update into the base weight: W <- W + (alpha / r) B A. One operation per call
        afterwards, as before adaptation (dropout of the LoRA branch no longer applies). A no-op
        when already merged; ``unmerge`` before training A and B again."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> "LoRALayer":
        """Undo ``merge``: W <- W - (alpha / r) B A (equal up to float rounding). A no-op when not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """``base`` (frozen) plus a trainable rank-``r`` update scaled by ``alpha / r``.

    base: the ``nn.Linear`` to adapt; its weight (out x in) and bias are frozen in place.
    r: the rank, an int with 1 <= r <= min(in_features, out_features).
    alpha: the scale numerator (> 0); the update is multiplied by ``scaling = alpha / r`` (the
        paper's convention, tuned there for small r; it does not keep the update's size fixed
        as r grows: B starts at zero and its SGD gradient is proportional to A x, whose squared
        norm grows like r, so the update after a step grows like alpha**2 / r and alpha / r
        slows large ranks, which rank-stabilised LoRA, Kalajdzievski 2023, corrects with
        alpha / sqrt(r)).
    dropout: probability of dropping inputs of the LoRA branch only (0 disables it).
    Parameters: ``lora_A`` (r x in), initialised like an ``nn.Linear`` weight (Kaiming uniform),
    and ``lora_B`` (out x r), initialised to zero. Input (..., in); output (..., out).
    """

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}")
        self._setup(base, r, min(base.in_features, base.out_features), alpha, dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) B A, shape (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAConv2d(LoRALayer):
    """A frozen ``nn.Conv2d`` plus a trainable rank-``r`` update, as PEFT adapts convolutions.

    The base weight W has shape (out, in, kh, kw): as a matrix, out x (in kh kw), one row per
    output channel. The update is that matrix's low-rank product, (alpha / r) B A, with
    ``lora_A`` (r, in, kh, kw), i.e. r x (in kh kw), and ``lora_B`` (out, r). It is computed
    as two convolutions: A with the base's stride, padding and dilation (r output channels),
    then B as a 1 x 1 convolution; it trains r (in kh kw + out) numbers instead of
    out in kh kw. Grouped convolutions are not supported. Input (N, in, H, W); output
    (N, out, H', W') as the base's. ``r``, ``alpha``, ``dropout``: as ``LoRALinear``.
    """

    def __init__(self, base: nn.Conv2d, r: int = 4, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d adapts an nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRAConv2d supports convolutions with groups=1 and zero padding only")
        out_c, in_c, kh, kw = base.weight.shape
        self._setup(base, r, min(out_c, in_c * kh * kw), alpha, dropout)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, in_c, kh, kw, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_c, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Conv2d (and PEFT) initialise

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) B A, shape (out, in, kh, kw) like the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A.flatten(1)).view_as(self.base.weight)

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return F.conv2d(h, self.lora_B[:, :, None, None])


def add_lora(model: nn.Module, name: str, r: int = 4, alpha: float = 1.0, dropout: float = 0.0) -> LoRALayer:
    """Replace the ``nn.Linear`` or ``nn.Conv2d`` called ``name`` in ``model`` (e.g. ``"fc"``,
    ``"layer4.0.conv1"``) by a ``LoRALinear`` or ``LoRAConv2d`` around it, in place; returns
    the new layer."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or not hasattr(parent, child) or not isinstance(getattr(parent, child), nn.Module):
        raise ValueError(f"model has no submodule {name!r}")
    old = getattr(parent, child)
    kind = LoRAConv2d if isinstance(old, nn.Conv2d) else LoRALinear
    layer = kind(old, r, alpha, dropout)
    setattr(parent, child, layer)
    return layer


def lora_targets(model: nn.Module, under: str = "", kinds=(nn.Linear, nn.Conv2d)) -> list[str]:
    """Names of the layers of ``kinds`` inside submodule ``under`` ("" : the whole model) that
    ``add_lora`` can adapt, in order, e.g. ``lora_targets(resnet, "layer4", (nn.Conv2d,))``
    gives layer4's five convolutions (two per block and the shortcut's 1 x 1)."""
    prefix = f"{under}." if under else ""
    adapted = {id(m.base) for m in model.modules() if isinstance(m, LoRALayer)}
    names = [n for n, m in model.named_modules()
             if n.startswith(prefix) and isinstance(m, kinds) and id(m) not in adapted]
    if not names:
        raise ValueError(f"no {'/'.join(k.__name__ for k in kinds)} layer under {under!r}")
    return names


def merge_lora(model: nn.Module) -> int:
    """``merge`` every LoRA layer in ``model`` (in place); returns how many there are. The merged
    model computes what the adapted one did with the original layers' cost."""
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    for m in layers:
        m.merge()
    return len(layers)


@dataclass(frozen=True)
class ParameterCount:
    """Scalar parameters of a model: how many train, how many in all."""
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def parameter_count(model: nn.Module) -> ParameterCount:
    """Trainable (``requires_grad``) and total scalar parameters of ``model``."""
    params = list(model.parameters())
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def stages(model: nn.Module) -> list[str]:
    """Names of ``model``'s top-level children that hold parameters, in order: its stages.
    For torchvision's ResNet-18: conv1, bn1, layer1, layer2, layer3, layer4, fc."""
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


def freeze(model: nn.Module, trainable: Iterable[str] = (), *, up_to: str | None = None) -> ParameterCount:
    """Freeze ``model`` except chosen layers; returns the resulting ``ParameterCount``.

    trainable: names of submodules (``"fc"``, ``"layer4"``, ``"layer4.1.conv2"``) whose parameters
        stay trainable; everything else is frozen.
    up_to: instead, a stage name (see ``stages``): that stage and every stage before it are frozen,
        every later one is trainable. ``freeze(resnet, up_to="layer3")`` trains layer4 and fc.
    Unknown names raise ``ValueError``.
    """
    trainable = list(trainable)
    if up_to is not None:
        if trainable:
            raise ValueError("give either trainable names or up_to, not both")
        order = stages(model)
        if up_to not in order:
            raise ValueError(f"unknown stage {up_to!r}: the stages are {', '.join(order)}")
        trainable = order[order.index(up_to) + 1:]
    modules = dict(model.named_modules())
    for name in trainable:
        if name not in modules or name == "":
            raise ValueError(f"model has no submodule {name!r}; its stages are {', '.join(stages(model))}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trainable:
        for p in modules[name].parameters():
            p.requires_grad_(True)
    for m in model.modules():  # LoRA keeps its base frozen whatever contains it
        if isinstance(m, LoRALayer):
            for p in m.base.parameters():
                p.requires_grad_(False)
    return parameter_count(model)


def gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      names: Iterable[str] | None = None) -> dict[str, float]:
    """Which weights can learn from data ``x`` (B, ...) with labels ``y`` (B,): for each named
    parameter of ``model``, the fraction of its entries whose gradient is nonzero after one
    backward pass of cross-entropy, every parameter made trainable, on a copy of ``model`` in
    training mode (``model`` itself is not touched). ``names``: parameter names as
    ``named_parameters`` gives them (default: the weight of every ``nn.Conv2d``). A weight that
    only ever multiplies zero padding (a 3 x 3 kernel's outer taps on a 1 x 1 map) gets an
    exact zero gradient, whatever the data, the CPU's kernels or the device."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the batch size: {x.shape[0]} and {y.shape[0]}")
    m = copy.deepcopy(model).train()
    params = dict(m.named_parameters())
    if names is None:
        names = [f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    names = list(names)
    for name in names:
        if name not in params:
            raise ValueError(f"model has no parameter {name!r}")
    for p in m.parameters():
        p.requires_grad_(True)
        p.grad = None
    nn.functional.cross_entropy(m(x), y).backward()
    # a count, not a float64 mean: exact, and float64 does not exist on an Apple GPU
    return {name: int(torch.count_nonzero(params[name].grad)) / params[name].numel() for name in names}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer``'s state tensors (momentum buffers, Adam's moments), i.e. what
    training costs in memory beyond the weights and their gradients. Zero before the first step.
    Of a sharded tensor (FSDP2's ``DTensor``) only this process's shard is counted."""
    local = [t.to_local() if hasattr(t, "to_local") else t for state in optimizer.state.values()
             for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local if t.dim() > 0)


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def gradient_bytes(model: nn.Module) -> int:
    """Bytes held in the ``.grad`` tensors of ``model``'s parameters (after a backward pass;
    parameters without a gradient, frozen ones, hold none)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def saved_activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors that autograd saves for the backward pass in one forward call
    ``model(*inputs)``, measured with ``torch.autograd.graph.saved_tensors_hooks``: the memory
    that training holds between the forward and the backward pass besides the weights.

    Each distinct storage counts once, in full (a tensor saved by two operations, or a view of
    it, is held once); the model's own parameters and buffers (which autograd also saves, e.g. a
    convolution's weight) are not counted, as they are in memory anyway. Operations whose inputs
    need no gradient (frozen layers before the first trainable one) record nothing. The count
    depends on shapes, dtypes and which parameters train, not on values.
    """
    own = _storages(list(model.parameters()) + list(model.buffers()))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ library logs its start and stop there)."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(null)


def peak_memory_bytes(fn, *args, device=None) -> int:
    """Peak bytes allocated while ``fn(*args)`` runs, above what was allocated when it started.

    ``device``: where ``fn`` allocates; None means the CPU. On a CUDA device:
    ``torch.cuda.max_memory_allocated`` (reset before the call). On the CPU, which keeps no such
    statistic: every CPU allocation and free the PyTorch profiler records (``profile_memory=True``),
    summed in time order, and the running sum's maximum; if ``fn`` allocates on another device
    there, ``ValueError`` (pass that device). Both count tensors only (what PyTorch's allocator
    hands out: activations, gradients, optimizer state, temporaries, library workspaces), not the
    process's other memory. Workspaces depend on the kernels a CPU uses, so the figure varies a
    little between machines. Apple's MPS (and any other device) keeps no peak statistic that
    PyTorch exposes, so there it is not measured: ``ValueError``; measure on the CPU, as
    ``experiments.transfer.measure_cost`` does, or on CUDA.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return _peak_cuda_bytes(fn, args, device)
    if device.type != "cpu":
        raise ValueError(f"peak memory is not measured on {device.type}: PyTorch keeps no peak "
                         "statistic there; measure on the CPU or on a CUDA device")
    return _peak_cpu_bytes(fn, args)


def _peak_cuda_bytes(fn, args, device: torch.device) -> int:
    """``peak_memory_bytes`` on a CUDA device, from the caching allocator's statistics."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _peak_cpu_bytes(fn, args) -> int:
    """``peak_memory_bytes`` on the CPU, from the profiler's memory events (bytes, time order)."""
    return cpu_memory_levels(fn, *args)[0]


def cpu_memory_levels(fn, *args) -> tuple[int, int]:
    """(peak, end): the most bytes allocated on the CPU at once while ``fn(*args)`` ran, and the
    bytes still allocated when it returned (what it left alive, e.g. the tensors a forward pass
    keeps for the backward), both above the level when it started; from every allocation and
    free the PyTorch profiler records, summed in time order."""
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    other = {str(e.device_type()) for e in events if e.device_type() != torch.autograd.DeviceType.CPU}
    if other:
        raise ValueError(f"fn allocated on {', '.join(sorted(other))}, not the CPU: pass device=")
    level = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events):
        level += nbytes
        peak = max(peak, level)
    return peak, level
