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
and inference costs exactly what the original layer cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """``base`` (frozen) plus a trainable rank-``r`` update scaled by ``alpha / r``.

    base: the ``nn.Linear`` to adapt; its weight (out x in) and bias are frozen in place.
    r: the rank, an int with 1 <= r <= min(in_features, out_features).
    alpha: the scale numerator (> 0); the update is multiplied by ``scaling = alpha / r`` (the
        paper's convention, tuned there for small r; it does not keep the update's size fixed
        as r grows: with A's entries of a fixed size, B A x grows like sqrt(r), so alpha / r
        shrinks large-rank updates, which rank-stabilised LoRA, Kalajdzievski 2023, corrects
        with alpha / sqrt(r)).
    dropout: probability of dropping inputs of the LoRA branch only (0 disables it).
    Parameters: ``lora_A`` (r x in), initialised like an ``nn.Linear`` weight (Kaiming uniform),
    and ``lora_B`` (out x r), initialised to zero. Input (..., in); output (..., out).
    """

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(base.in_features, base.out_features):
            raise ValueError(f"rank r must be an int in 1..min(in, out) = 1..{min(base.in_features, base.out_features)}"
                             f", got {r!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, float(alpha), alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) B A, shape (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # the update is inside base.weight already
            return y
        return y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> "LoRALinear":
        """Fold the update into the base weight: W <- W + (alpha / r) B A. One matmul per call
        afterwards, as before adaptation (dropout of the LoRA branch no longer applies). A no-op
        when already merged; ``unmerge`` before training A and B again."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> "LoRALinear":
        """Undo ``merge``: W <- W - (alpha / r) B A (equal up to float rounding). A no-op when not merged."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


def add_lora(model: nn.Module, name: str, r: int = 4, alpha: float = 1.0, dropout: float = 0.0) -> LoRALinear:
    """Replace the ``nn.Linear`` called ``name`` in ``model`` (e.g. ``"fc"``) by a ``LoRALinear``
    around it, in place; returns the new layer."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child) or not isinstance(getattr(parent, child), nn.Module):
        raise ValueError(f"model has no submodule {name!r}")
    layer = LoRALinear(getattr(parent, child), r, alpha, dropout)
    setattr(parent, child, layer)
    return layer


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
        if isinstance(m, LoRALinear):
            for p in m.base.parameters():
                p.requires_grad_(False)
    return parameter_count(model)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer``'s state tensors (momentum buffers, Adam's moments), i.e. what
    training costs in memory beyond the weights and their gradients. Zero before the first step."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


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
