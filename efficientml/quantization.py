"""Quantization: store floats as b-bit unsigned integer codes, and get them back.

Asymmetric (affine) min/max quantization with b bits maps a real x to the code

    q = clamp(round(x / scale) + zero_point, 0, 2**b - 1),   dequantized as   x_hat = (q - zero_point) * scale,

with scale = (hi - lo) / (2**b - 1) and zero_point = round(-lo / scale), where [lo, hi] is the
range of the data widened to contain 0 (as PyTorch's observers do): then 0 is represented
exactly (padding, ReLU outputs and pruned weights stay exactly 0) and the zero point is itself
a valid code. Inside the range, |x - x_hat| <= scale / 2: half a quantization step.

**Symmetric** quantization (``symmetric=True``, bits >= 2) fixes the zero point at the middle code
2**(b-1) and uses the restricted range of codes 1..2**b - 1, i.e. the signed integers
-(2**(b-1) - 1)..2**(b-1) - 1 after subtracting the zero point, with scale = max|x| / (2**(b-1) - 1):
0 is exact too, and integer kernels need no zero-point correction terms, but one-sided data
(ReLU outputs, all-positive weights) use only half of the codes.

Per-tensor quantization uses one (scale, zero_point) for the whole array; per-channel
quantization (``axis=k``) one pair per index along axis k, e.g. per output row of a weight
matrix, which helps when channels have very different ranges.
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class QuantizedArray:
    """Codes plus what dequantization needs.

    codes: ``uint8``, the shape of the original array (one code per value; for bits < 8 the
        upper bits are unused: ``pack_codes`` packs them densely for storage).
    scale: ``float32``, shape () per tensor or (C,) per channel: the real value of one step.
    zero_point: ``uint8``, the shape of ``scale``: the code that stands for real 0.
    bits: 1..8. axis: None (per tensor) or the channel axis.
    Arrays are NumPy arrays or torch tensors, as the input to ``quantize`` was.
    """
    codes: np.ndarray | torch.Tensor
    scale: np.ndarray | torch.Tensor
    zero_point: np.ndarray | torch.Tensor
    bits: int
    axis: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the data buffers: codes, scales and zero points (no object headers)."""
        return sum(_nbytes(a) for a in (self.codes, self.scale, self.zero_point))

    def dequantize(self):
        return dequantize(self)


def _nbytes(a) -> int:
    return a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8 (codes are stored as uint8), got {bits}")
    return int(bits)


def _channel_shape(ndim: int, axis: int | None, channels: int) -> tuple[int, ...]:
    """Shape that broadcasts per-channel parameters against the array."""
    return () if axis is None else tuple(channels if d == axis else 1 for d in range(ndim))


def quantize(x, bits: int = 8, axis: int | None = None, symmetric: bool = False) -> QuantizedArray:
    """Quantize the float array ``x`` (NumPy or torch, any shape, at least 1-D) to ``bits`` bits.

    axis: None for one scale per tensor, or the axis that indexes channels (e.g. 0 for the
        output rows of a Linear weight) for one scale per channel.
    symmetric: False for affine min/max quantization; True for symmetric quantization (zero point
        2**(bits-1), codes 1..2**bits - 1, scale max|x| / (2**(bits-1) - 1); needs bits >= 2).
    Raises TypeError for non-float input, ValueError for empty arrays, NaN or inf, values or a
    range (max - min) beyond float32's, scalars, bits outside 1..8 (2..8 symmetric) or an axis
    the array does not have.
    """
    bits = _check_bits(bits)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs at least 2 bits (1 bit has no code for 0 "
                         "besides one for +-max)")
    is_numpy = isinstance(x, np.ndarray)
    if not is_numpy and not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize takes a NumPy array or a torch tensor, got {type(x).__name__}")
    t = torch.from_numpy(x) if is_numpy else x.detach()
    if not t.is_floating_point():
        raise TypeError(f"quantize needs a floating-point array, got {t.dtype}")
    if t.ndim == 0:
        raise ValueError("quantize needs an array with at least one dimension, got a scalar")
    if t.numel() == 0:
        raise ValueError("cannot quantize an empty array")
    if not torch.isfinite(t).all():
        raise ValueError("cannot quantize an array that contains NaN or inf")
    if axis is not None:
        if not -t.ndim <= axis < t.ndim:
            raise ValueError(f"axis {axis} is out of range for an array with {t.ndim} dimensions")
        axis %= t.ndim
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError("cannot quantize values beyond float32's range (magnitudes above about 3.4e38)")
    qmax = 2 ** bits - 1
    if axis is None:
        lo, hi = t.min(), t.max()
    else:
        flat = t.movedim(axis, 0).reshape(t.shape[axis], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
    view = _channel_shape(t.ndim, axis, t.shape[axis] if axis is not None else 0)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.maximum(lo.abs(), hi.abs()) / (half - 1)
        scale = torch.where(scale > 0, scale, 1.0).to(torch.float32)  # an all-zero channel: any scale
        zero_point = torch.full_like(scale, half)
        codes = torch.clamp(torch.round(t / scale.reshape(view)) + half, 1, qmax).to(torch.uint8)
        return _result(codes, scale, zero_point.to(torch.uint8), bits, axis, is_numpy)
    const, value = lo == hi, hi                                  # constant channels, and their value
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range contains 0
    scale = (hi - lo) / qmax
    if not torch.isfinite(scale).all():
        raise ValueError("cannot quantize: the range max - min of the data overflows float32 "
                         "(e.g. values near both -3.4e38 and +3.4e38)")
    zero_point = torch.round(-lo / torch.where(scale > 0, scale, 1.0))
    # A constant channel c round-trips exactly (the general formula could be 1 ulp off):
    # c > 0: scale c, zero point 0, code 1; c < 0: scale -c, zero point 1, code 0; c = 0: scale 1, code 0.
    scale = torch.where(const, torch.where(value == 0, 1.0, value.abs()), scale)
    zero_point = torch.where(const, (value < 0).to(torch.float32), zero_point)
    codes = torch.clamp(torch.round(t / scale.reshape(view)) + zero_point.reshape(view), 0, qmax).to(torch.uint8)
    return _result(codes, scale.to(torch.float32), zero_point.to(torch.uint8), bits, axis, is_numpy)


def _result(codes, scale, zero_point, bits, axis, is_numpy) -> QuantizedArray:
    if is_numpy:  # arrays that own their data (not views of torch storage), as NumPy users expect
        return QuantizedArray(codes.numpy().copy(), scale.numpy().copy(), zero_point.numpy().copy(), bits, axis)
    return QuantizedArray(codes, scale, zero_point, bits, axis)


def dequantize(q: QuantizedArray):
    """The float32 array ``(codes - zero_point) * scale`` (NumPy or torch, as ``q`` holds)."""
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize takes a QuantizedArray, got {type(q).__name__}")
    is_numpy = isinstance(q.codes, np.ndarray)
    codes = torch.from_numpy(q.codes) if is_numpy else q.codes
    scale = torch.as_tensor(q.scale)
    zp = torch.as_tensor(q.zero_point)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    view = _channel_shape(codes.ndim, q.axis, codes.shape[q.axis] if q.axis is not None else 0)
    x = (codes.to(torch.float32) - zp.to(torch.float32).reshape(view)) * scale.reshape(view)
    return x.numpy().copy() if is_numpy else x


# -- whole models ------------------------------------------------------------------------------

def zero_code_fraction(q: QuantizedArray) -> float:
    """Fraction of ``q``'s values whose code is the zero point, i.e. that dequantize to exactly 0."""
    zp = q.zero_point
    if q.axis is not None:
        shape = [1] * q.codes.ndim
        shape[q.axis] = -1
        zp = zp.reshape(shape)
    hits = q.codes == zp
    return float(hits.float().mean()) if isinstance(hits, torch.Tensor) else float(hits.mean())


def pack_codes(codes, bits: int) -> np.ndarray:
    """Pack b-bit codes densely: ``bits`` bits per code instead of a whole byte, so two 4-bit
    codes share a byte and four 2-bit codes do (codes are laid out in order, most significant
    bit first, the last byte padded with zero bits). Returns a 1-D ``uint8`` array of
    ceil(n * bits / 8) bytes for n codes; ``unpack_codes`` inverts it.
    codes: integer NumPy array or tensor (any shape, flattened in C order) with values in
    0..2**bits - 1; a code that needs more bits raises ``ValueError``."""
    bits = _check_bits(bits)
    a = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {a.dtype}")
    a = a.reshape(-1)
    if a.size and (a.min() < 0 or a.max() > 2 ** bits - 1):
        raise ValueError(f"codes must lie in 0..{2 ** bits - 1} to be packed in {bits} bits, "
                         f"got {a.min()}..{a.max()}")
    bitplanes = np.unpackbits(a.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]  # (n, bits), MSB first
    return np.packbits(bitplanes.reshape(-1))


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` ``bits``-bit codes in ``packed`` (see ``pack_codes``), as ``uint8``."""
    bits = _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if count < 0 or count * bits > 8 * packed.size:
        raise ValueError(f"{packed.size} bytes hold at most {8 * packed.size // bits} codes of {bits} bits, "
                         f"asked for {count}")
    bitplanes = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    return np.packbits(np.pad(bitplanes, ((0, 0), (8 - bits, 0))), axis=1).reshape(-1)


def quantize_state_dict(model: nn.Module, bits: int = 8, per_channel: bool = False) -> dict[str, QuantizedArray]:
    """Every floating-point parameter and buffer of ``model``, quantized to ``bits`` bits.

    per_channel: one scale per output channel (axis 0) for tensors with 2 or more dimensions
    (weights); 1-D tensors (biases, BatchNorm) always get one scale per tensor.
    Integer buffers (e.g. BatchNorm's num_batches_tracked) are left out: they stay as they are.
    """
    return {name: quantize(t, bits, axis=0 if per_channel and t.ndim >= 2 else None)
            for name, t in model.state_dict().items() if t.is_floating_point()}


def dequantized_model(model: nn.Module, bits: int = 8, per_channel: bool = False) -> nn.Module:
    """A copy of ``model`` whose every float parameter is replaced by its quantize-dequantize
    round trip: it computes in float32, with exactly the values b-bit storage can hold."""
    qsd = quantize_state_dict(model, bits, per_channel)
    new = copy.deepcopy(model)
    state = new.state_dict()
    state.update({name: dequantize(q).to(state[name].dtype) for name, q in qsd.items()})
    new.load_state_dict(state)
    return new


def save_quantized(model: nn.Module, f, bits: int = 8, per_channel: bool = False) -> None:
    """Store ``model``'s parameters for real as uint8 codes + float32 scales + uint8 zero points
    (``torch.save`` of a dict of tensors; ``f`` is a path or a file object)."""
    qsd = quantize_state_dict(model, bits, per_channel)
    torch.save({"bits": bits, "per_channel": per_channel,
                "tensors": {n: {"codes": q.codes, "scale": q.scale, "zero_point": q.zero_point, "axis": q.axis}
                            for n, q in qsd.items()}}, f)


def load_quantized(model: nn.Module, f) -> nn.Module:
    """Load what ``save_quantized`` stored into ``model`` (dequantizing to float32); returns it."""
    saved = torch.load(f, weights_only=True)
    state = model.state_dict()
    for name, d in saved["tensors"].items():
        q = QuantizedArray(d["codes"], d["scale"], d["zero_point"], saved["bits"], d["axis"])
        state[name] = dequantize(q).to(state[name].dtype)
    model.load_state_dict(state)
    return model


def serialized_size(obj) -> int:
    """Bytes ``torch.save`` writes for ``obj`` (a state dict, or a model's state dict)."""
    buf = io.BytesIO()
    torch.save(obj.state_dict() if isinstance(obj, nn.Module) else obj, buf)
    return buf.getbuffer().nbytes


def dynamic_int8(model: nn.Module) -> nn.Module:
    """PyTorch's own dynamic int8 quantization of the Linear layers (int8 weights, activations
    quantized on the fly, int8 matrix products). ``torch.ao.quantization`` is deprecated in favour
    of the torchao package; its warnings are silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
