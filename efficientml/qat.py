"""Quantization-aware training (QAT) and integer-only inference.

**QAT.** Post-training quantization rounds weights that were trained without knowing they would be
rounded. QAT trains the float weights *through* the rounding: the forward pass uses the fake-quantized
weight ``w_hat = dequantize(quantize(w))`` (the exact values b-bit storage can hold), and the backward
pass treats the rounding as the identity, the straight-through estimator (STE; Bengio et al., 2013):
d w_hat / d w := 1. Rounding has derivative 0 almost everywhere, so without the STE no gradient would
reach the weights. The float "master" weights ``w`` accumulate the small SGD steps that a single
rounding step would swallow; only their rounded values are ever used. (The clipped STE also zeroes the
gradient of values outside the clamp range; with min/max ranges every value lies inside it, so here the
STE is exactly the identity.) ``prepare_qat`` attaches a ``FakeQuant`` to every Linear/Conv2d weight and
bias with PyTorch's ``torch.nn.utils.parametrize`` (the master weight lives in
``module.parametrizations.weight.original``); ``convert_qat`` removes it, keeping the master weights, whose
post-training quantization is then the deployed model.

**Integer-only inference** (Jacob et al., 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"). ``IntegerMLP`` runs an ``MLP`` with int8 weights
(symmetric, one scale s_w per output channel) and int8 activations (symmetric, one scale s_x per layer
input, from ``calibrate``'s max |input| over training batches). With x = s_x * x_q and w = s_w * w_q,

    y_c = sum_k w_ck x_k + b_c = s_w,c s_x (sum_k w_q,ck x_q,k + b_q,c),   b_q,c = round(b_c / (s_w,c s_x)),

so each layer is an int8 x int8 matrix product accumulated in int32 plus an int32 bias. The next layer's
input code is round(acc * M_c) with M_c = s_w,c s_x / s_next, a real number that integer hardware
applies as a fixed-point multiplier M0_c * 2**-shift_c, M0_c an int32 in [2**30, 2**31): one int64
product and one rounding right shift. ReLU is then max(code, 0) and saturation clamps to [-127, 127].
Only the last layer's accumulator is turned back into float logits, s_w,c * s_x * acc_c.
Rounding is half away from zero everywhere (activation codes and requantization), as gemmlowp's
rounding right shift does (gemmlowp first keeps the high 32 bits of the product, a second rounding;
here the int64 product is rounded once, exactly). ``fake_quant_forward`` is the float reference.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .models import MLP
from .quantization import _check_bits as _check_quantization_bits
from .quantization import dequantize, quantize

QAT_MODULES = (nn.Linear, nn.Conv2d)
INT8_MAX = 127                       # symmetric int8: codes -127..127 (-128 unused)
INT32_MAX = 2 ** 31 - 1


# -- quantization-aware training -----------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    """Forward: the quantize-dequantize round trip; backward: the identity (the STE).

    A custom Function rather than ``w + (w_hat - w).detach()``: that trick's forward is
    ``w + (w_hat - w)``, which floating-point rounding can leave 1 ulp away from ``w_hat``."""

    @staticmethod
    def forward(ctx, w, bits, axis, symmetric):
        return dequantize(quantize(w, bits, axis, symmetric)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize(w: torch.Tensor, bits: int, axis: int | None = None,
                  symmetric: bool = False) -> torch.Tensor:
    """``dequantize(quantize(w, bits, axis, symmetric))`` (same shape and dtype as ``w``), through which
    gradients pass unchanged (straight-through estimator)."""
    return _StraightThrough.apply(w, bits, axis, symmetric)


def _check_bits(bits, symmetric: bool) -> int:
    """``quantization``'s bit-width check, plus symmetric quantization's 2-bit minimum."""
    bits = _check_quantization_bits(bits)
    if symmetric and bits < 2:
        raise ValueError(f"symmetric quantization needs at least 2 bits, got {bits}")
    return bits


class FakeQuant(nn.Module):
    """A parametrization: ``forward(w)`` is ``fake_quantize(w, bits, axis, symmetric)``.

    axis: None for one scale per tensor, or the channel axis (0: per output channel).
    Use with ``torch.nn.utils.parametrize.register_parametrization(module, "weight", FakeQuant(4))``."""

    def __init__(self, bits: int, axis: int | None = None, symmetric: bool = False):
        super().__init__()
        self.bits, self.axis, self.symmetric = _check_bits(bits, symmetric), axis, symmetric

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.bits, self.axis, self.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}, symmetric={self.symmetric}"


def prepare_qat(model: nn.Module, bits: int, per_channel: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose every Linear/Conv2d weight and bias is fake-quantized as
    ``quantization.quantize_state_dict(model, bits, per_channel)`` quantizes it: affine min/max,
    per output channel (axis 0) for tensors with >= 2 dimensions if ``per_channel``, per tensor
    otherwise. Other modules (BatchNorm, ...) are left as they are. Its forward pass before any
    training is exactly ``dequantized_model(model, bits, per_channel)``'s (for models whose only
    parameters are Linear/Conv2d ones)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat takes an nn.Module, got {type(model).__name__}")
    _check_bits(bits, symmetric=False)
    qat = copy.deepcopy(model)
    targets = [m for m in qat.modules() if isinstance(m, QAT_MODULES)]
    if not targets:
        raise ValueError("the model has no Linear or Conv2d layer to quantize")
    for m in targets:
        for name in ("weight", "bias"):
            t = getattr(m, name)
            if t is None:
                continue
            if parametrize.is_parametrized(m, name):
                raise ValueError(f"{type(m).__name__}.{name} is already parametrized (prepared twice?)")
            axis = 0 if per_channel and t.ndim >= 2 else None
            parametrize.register_parametrization(m, name, FakeQuant(bits, axis))
    return qat


def convert_qat(qat_model: nn.Module) -> nn.Module:
    """Remove the fake quantization of a ``prepare_qat`` model IN PLACE and return it: plain float
    modules holding the float master weights (``leave_parametrized=False``). Quantizing it
    post-training (``dequantized_model(convert_qat(m), bits, per_channel)``) gives the deployed model.

    In place, like ``parametrize.remove_parametrizations`` itself: a deep copy of a parametrized module
    shares its dynamically created class with the original, and removal deletes the parametrized
    property from that class, so converting a copy would break the original."""
    if not isinstance(qat_model, nn.Module):
        raise TypeError(f"convert_qat takes an nn.Module, got {type(qat_model).__name__}")
    targets = [(m, name) for m in qat_model.modules() if parametrize.is_parametrized(m)
               for name in m.parametrizations]
    if not targets:
        raise ValueError("the model has no FakeQuant parametrization: prepare it with prepare_qat first")
    for m, name in targets:  # check everything before changing anything
        if not all(isinstance(p, FakeQuant) for p in m.parametrizations[name]):
            raise ValueError(f"{type(m).__name__}.{name} has parametrizations other than FakeQuant")
    for m, name in targets:
        parametrize.remove_parametrizations(m, name, leave_parametrized=False)
    return qat_model


# -- integer-only inference of an MLP ------------------------------------------------------------

def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round a float tensor to the nearest integer, ties away from zero (2.5 -> 3, -2.5 -> -3),
    unlike ``torch.round``'s ties to even. ``x - trunc(x)`` is exact in floating point, so the
    tie test is too (``floor(|x| + 0.5)`` is not: 0.49999997 + 0.5 rounds to 1.0 in float32)."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def quantize_activation(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric int8 codes of float activations: clamp(round(x / scale), -127, 127), as ``int8``."""
    return round_half_away(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def fixed_point_multiplier(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M0, shift), ``int64`` CPU tensors of ``m``'s shape, with M0 in [2**30, 2**31) (an int32) and
    M0 * 2**-shift = m to within 2**-31 relative. ``m``: positive reals in [2**-32, 2**30) (a tensor
    on any device, a number or a sequence), so that 1 <= shift <= 62 (the rounding shift of an
    int64 product). Computed in float64 on the CPU."""
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().to(torch.float64)
    else:
        m = torch.as_tensor(m, dtype=torch.float64, device="cpu")
    if not (torch.isfinite(m).all() and (m >= 2.0 ** -32).all() and (m < 2.0 ** 30).all()):
        raise ValueError(f"multipliers must lie in [2**-32, 2**30), got {m.min().item()}..{m.max().item()}")
    mantissa, exponent = torch.frexp(m)                       # m = mantissa * 2**exponent, in [0.5, 1)
    m0 = torch.round(mantissa * 2.0 ** 31).to(torch.int64)   # in [2**30, 2**31]
    carry = m0 == 2 ** 31                                     # mantissa rounded up to 1.0
    m0 = torch.where(carry, m0 // 2, m0)
    shift = 31 - exponent.to(torch.int64) - carry.to(torch.int64)
    return m0, shift


def requantize(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc * M0 * 2**-shift), ties away from zero, computed in integers: one int64 product
    (|acc| < 2**31 and M0 < 2**31, so it is below 2**62) and a rounding right shift.
    acc: ``int32`` (B, C); m0, shift: ``int64`` (C,). Returns ``int64`` (B, C)."""
    p = acc.to(torch.int64) * m0
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    return torch.sign(p) * torch.bitwise_right_shift(p.abs() + half, shift)


def calibrate(model: nn.Module, loader, n_batches: int = 10) -> dict[str, float]:
    """Max |input| of every ``nn.Linear`` of ``model`` (by module name, e.g. ``"net.1"``) over the
    first ``n_batches`` batches (x, y) of ``loader``, in eval mode, via forward hooks."""
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    absmax: dict[str, float] = {}

    def hook(name):
        def record(module, inputs):
            absmax[name] = max(absmax.get(name, 0.0), inputs[0].detach().abs().max().item())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    if not handles:
        raise ValueError("the model has no nn.Linear layer to calibrate")
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
                seen += 1
                if seen == n_batches:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("the loader gave no batch to calibrate on")
    return absmax


def _mlp_linears(mlp) -> list[tuple[str, nn.Linear]]:
    """The (name, Linear) layers of an ``MLP`` (Flatten, then Linear-ReLU pairs, then a Linear)."""
    if not isinstance(mlp, MLP):
        raise TypeError(f"integer inference is implemented for efficientml.models.MLP, "
                        f"got {type(mlp).__name__}")
    layers = list(mlp.net)
    kinds = [type(m) for m in layers[1:]]
    n = len(layers) // 2
    if (not isinstance(layers[0], nn.Flatten) or len(layers) % 2 != 0
            or kinds != [nn.Linear, nn.ReLU] * (n - 1) + [nn.Linear]):
        raise ValueError(f"expected Flatten, (Linear, ReLU)*, Linear; got {[k.__name__ for k in kinds]}")
    return [(f"net.{i}", layers[i]) for i in range(1, len(layers), 2)]


def _activation_scale(act_absmax: dict, name: str) -> float:
    if name not in act_absmax:
        raise ValueError(f"no calibration entry for layer {name!r} (have {sorted(act_absmax)}): "
                         "run calibrate")
    a = float(act_absmax[name])
    if not (a > 0 and a < float("inf")):
        raise ValueError(f"calibrated max |input| of {name!r} must be positive and finite, got {a}")
    return a / INT8_MAX


def _layer_codes(linear: nn.Linear, input_scale: float):
    """int8 weight codes (out, in), float64 weight scales (out,) and int32 bias codes (out,)."""
    q = quantize(linear.weight.detach().cpu(), 8, axis=0, symmetric=True)
    w_q = (q.codes.to(torch.int16) - 128).to(torch.int8)
    s_w = q.scale.to(torch.float64)
    b = linear.bias.detach().cpu().to(torch.float64) if linear.bias is not None else torch.zeros_like(s_w)
    b_q = round_half_away(b / (s_w * input_scale))
    if b_q.abs().max() > INT32_MAX:
        raise ValueError("a bias does not fit in int32 at scale s_w * s_x")
    return w_q, s_w, b_q.to(torch.int32)


def _check_on_cpu(layer: nn.Module) -> None:
    device = layer.weight.device
    if device.type != "cpu":
        raise ValueError(f"integer-only inference runs on the CPU (PyTorch has no int32 matrix product "
                         f"on CUDA, and MPS has no float64), but this layer is on {device}: keep the "
                         f"integer model on the CPU (it takes inputs from any device)")


class IntegerLinear(nn.Module):
    """One integer layer: int8 codes in, int32 accumulator ``x_q @ w_q.T + b_q``, then either the
    next layer's int8 codes (requantized by M0 * 2**-shift, ReLU as max(., 0), saturated to
    [-127, 127]) or, for the last layer (``m0`` None), float32 logits ``s_w * s_x * acc``.
    It runs on the CPU only (its buffers must stay there; ValueError otherwise).

    Buffers: weight ``int8`` (out, in), bias ``int32`` (out,), weight_scale ``float64`` (out,), and
    m0, shift ``int64`` (out,) for hidden layers. ``accumulator_bound``: the largest |acc| any int8
    input can produce, sum_k |w_q| * 127 + |b_q|, checked to fit in int32 at construction."""

    def __init__(self, weight, bias, weight_scale, input_scale: float, m0=None, shift=None,
                 relu: bool = True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("weight_scale", weight_scale)
        self.input_scale, self.relu = input_scale, relu
        if m0 is not None:
            self.register_buffer("m0", m0)
            self.register_buffer("shift", shift)
        else:
            self.m0 = self.shift = None
        bound = weight.to(torch.int64).abs().sum(1) * INT8_MAX + bias.to(torch.int64).abs()
        self.accumulator_bound = int(bound.max())
        if self.accumulator_bound > INT32_MAX:
            raise ValueError(f"accumulators could reach {self.accumulator_bound}, beyond int32")

    def accumulate(self, x_q: torch.Tensor) -> torch.Tensor:
        """int32 (B, out) accumulators of int8 codes x_q (B, in), on the CPU. The product runs as
        an int32 matrix multiplication on int8 values: exact, since every partial sum is within
        ``accumulator_bound`` < 2**31 (no wrap-around is possible)."""
        _check_on_cpu(self)
        return x_q.to(torch.int32) @ self.weight.to(torch.int32).T + self.bias

    def forward(self, x_q: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(x_q)
        if self.m0 is None:
            return (acc.to(torch.float64) * (self.weight_scale * self.input_scale)).to(torch.float32)
        y = requantize(acc, self.m0, self.shift)
        return y.clamp(0 if self.relu else -INT8_MAX, INT8_MAX).to(torch.int8)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in={inp}, out={out}, input_scale={self.input_scale:.4g}, requantize={self.m0 is not None}"


class IntegerMLP(nn.Module):
    """An ``MLP`` computing in integers: input (B, ...) float, flattened and quantized to int8 with the
    first layer's activation scale; int8 x int8 -> int32 layers (``IntegerLinear``); output float32
    logits (B, num_classes). A CPU model: ``from_float`` builds it on the CPU from a float MLP on any
    device, inputs from any device are moved to the CPU, and the logits are CPU tensors."""

    def __init__(self, layers: list[IntegerLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_float(cls, mlp: MLP, act_absmax: dict[str, float]) -> "IntegerMLP":
        """Quantize ``mlp`` with activation ranges ``act_absmax`` (from ``calibrate``)."""
        linears = _mlp_linears(mlp)
        scales = [_activation_scale(act_absmax, name) for name, _ in linears]
        layers = []
        for i, (_, lin) in enumerate(linears):
            w_q, s_w, b_q = _layer_codes(lin, scales[i])
            if i + 1 < len(linears):
                m0, shift = fixed_point_multiplier(s_w * scales[i] / scales[i + 1])
                layers.append(IntegerLinear(w_q, b_q, s_w, scales[i], m0, shift, relu=True))
            else:
                layers.append(IntegerLinear(w_q, b_q, s_w, scales[i]))
        return cls(layers)

    def _input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """int8 (B, in) codes of the float input ``x`` (B, ...), on the CPU."""
        return quantize_activation(x.detach().flatten(1).to("cpu", torch.float32), self.layers[0].input_scale)

    def trace(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(int8 input codes, int32 accumulator) of every layer for input ``x``."""
        x_q = self._input_codes(x)
        out = []
        for layer in self.layers:
            acc = layer.accumulate(x_q)
            out.append((x_q, acc))
            if layer.m0 is not None:
                x_q = layer(x_q)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._input_codes(x)
        for layer in self.layers:
            h = layer(h)
        return h


@torch.no_grad()
def fake_quant_forward(mlp: MLP, act_absmax: dict[str, float], x: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float reference of ``IntegerMLP.from_float(mlp, act_absmax)(x)``: the same weight and
    bias codes, activations fake-quantized (rounded to the same int8 codes, times their scale) at the
    same scales, but products, sums and scalings in ``dtype`` (float32, as a fake-quant training graph
    computes; float64 is exact up to rare rounding ties). Returns float32 logits (B, classes).

    It differs from the integer model only where a float rounding error or the fixed-point multiplier's
    2**-31 relative error moves a value across a rounding boundary of an activation code: then that
    code differs by one step, and the logits by about s_x * |w| per differing code."""
    linears = _mlp_linears(mlp)
    h = x.flatten(1).detach().cpu().to(torch.float32)
    for i, (name, lin) in enumerate(linears):
        s_x = _activation_scale(act_absmax, name)
        w_q, s_w, b_q = _layer_codes(lin, s_x)
        h = quantize_activation(h, s_x).to(dtype) * s_x
        w_hat = (w_q.to(torch.float64) * s_w[:, None]).to(dtype)
        b_hat = (b_q.to(torch.float64) * s_w * s_x).to(dtype)
        h = F.linear(h, w_hat, b_hat)
        if i + 1 < len(linears):
            h = F.relu(h)
    return h.to(torch.float32)
