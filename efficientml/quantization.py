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

**K-means (codebook) quantization** (Deep Compression, Han et al., 2016) replaces the uniform grid
by 2**b centroids fitted to the data with 1-D k-means: each value stores the b-bit index of its
nearest centroid, and the array stores the codebook of 2**b float32 centroids. Centroids crowd
where the values are dense, so on bell-shaped weights it has a lower error than the uniform grid.

The **signal-to-quantization-noise ratio** ``sqnr_db`` measures the error of any of them in
decibels; files with truly b-bit codes (``pack_codes``) are written by ``save_quantized``.
"""
from __future__ import annotations

import copy
import io
import math
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


def _float32_input(x, who: str) -> tuple[torch.Tensor, bool]:
    """``x`` (NumPy array or tensor) as a float32 tensor sharing no autograd history, and whether
    it was NumPy. Raises TypeError for other types or non-float dtypes, ValueError for scalars,
    empty arrays, NaN, inf, or values beyond float32's range."""
    is_numpy = isinstance(x, np.ndarray)
    if not is_numpy and not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} takes a NumPy array or a torch tensor, got {type(x).__name__}")
    t = torch.from_numpy(x) if is_numpy else x.detach()
    if not t.is_floating_point():
        raise TypeError(f"{who} needs a floating-point array, got {t.dtype}")
    if t.ndim == 0:
        raise ValueError(f"{who} needs an array with at least one dimension, got a scalar")
    if t.numel() == 0:
        raise ValueError("cannot quantize an empty array")
    if not torch.isfinite(t).all():
        raise ValueError("cannot quantize an array that contains NaN or inf")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError("cannot quantize values beyond float32's range (magnitudes above about 3.4e38)")
    return t, is_numpy


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
    t, is_numpy = _float32_input(x, "quantize")
    if axis is not None:
        if not -t.ndim <= axis < t.ndim:
            raise ValueError(f"axis {axis} is out of range for an array with {t.ndim} dimensions")
        axis %= t.ndim
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
    scale, zero_point = affine_grid(lo, hi, bits)
    if not torch.isfinite(scale).all():
        raise ValueError("cannot quantize: the range max - min of the data overflows float32 "
                         "(e.g. values near both -3.4e38 and +3.4e38)")
    codes = affine_codes(t, scale.reshape(view), zero_point.reshape(view), bits)
    return _result(codes, scale.to(torch.float32), zero_point.to(torch.uint8), bits, axis, is_numpy)


def affine_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine grid of 2**bits codes over [min(lo, 0), max(hi, 0)]: scale s = (h - l) / (2**bits - 1)
    and zero point z = round(-l / s), float32, shaped like ``lo`` and ``hi`` (the minimum and
    maximum of the tensor, or of each channel)."""
    qmax = 2 ** bits - 1
    const, value = lo == hi, hi                                  # constant channels, and their value
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range contains 0
    scale = (hi - lo) / qmax
    zero_point = torch.round(-lo / torch.where(scale > 0, scale, 1.0))
    # A constant channel c round-trips exactly (the general formula could be 1 ulp off):
    # c > 0: scale c, zero point 0, code 1; c < 0: scale -c, zero point 1, code 0; c = 0: scale 1, code 0.
    scale = torch.where(const, torch.where(value == 0, 1.0, value.abs()), scale)
    zero_point = torch.where(const, (value < 0).to(torch.float32), zero_point)
    return scale, zero_point


def affine_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes q = clamp(round(x / s) + z, 0, 2**bits - 1) as uint8; ``scale`` and ``zero_point``
    broadcast against ``x`` (one value, or one per channel shaped to its axis)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1).to(torch.uint8)


def _result(codes, scale, zero_point, bits, axis, is_numpy) -> QuantizedArray:
    if is_numpy:  # arrays that own their data (not views of torch storage), as NumPy users expect
        return QuantizedArray(codes.numpy().copy(), scale.numpy().copy(), zero_point.numpy().copy(), bits, axis)
    return QuantizedArray(codes, scale, zero_point, bits, axis)


def dequantize(q: QuantizedArray | CodebookArray):
    """The float32 array ``(codes - zero_point) * scale`` (NumPy or torch, as ``q`` holds); for a
    ``CodebookArray``, ``codebook[codes]``."""
    if isinstance(q, CodebookArray):
        return q.dequantize()
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize takes a QuantizedArray or a CodebookArray, got {type(q).__name__}")
    is_numpy = isinstance(q.codes, np.ndarray)
    codes = torch.from_numpy(q.codes) if is_numpy else q.codes
    scale = torch.as_tensor(q.scale, device=codes.device)
    zp = torch.as_tensor(q.zero_point, device=codes.device)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    view = _channel_shape(codes.ndim, q.axis, codes.shape[q.axis] if q.axis is not None else 0)
    x = (codes.to(torch.float32) - zp.to(torch.float32).reshape(view)) * scale.reshape(view)
    return x.numpy().copy() if is_numpy else x


# -- measuring the error -----------------------------------------------------------------------

def sqnr_db(x, x_hat) -> float:
    """Signal-to-quantization-noise ratio of ``x_hat`` as an approximation of ``x``, in decibels:

        SQNR = 10 * log10( sum x**2 / sum (x - x_hat)**2 ).

    x, x_hat: NumPy arrays or torch tensors (either, any numeric dtype) of the same shape, not
    empty, finite; computed in float64. Returns inf when x_hat == x exactly (and -inf when x is
    all zero but x_hat is not). Every extra bit halves the step, so the noise power falls 4x:
    +10 * log10(4) = 6.02 dB per bit. The rule of thumb for uniform quantization of a full-scale
    signal is SQNR = 6.02 * b dB for a uniformly distributed signal (6.02 * b + 1.76 dB for a
    sine wave); data with outliers or Gaussian tails, whose range is much wider than its typical
    size, fall below it (the step is set by the range, the signal power by the typical size).
    Raises TypeError for other types, ValueError for a shape mismatch, empty arrays, NaN or inf.
    """
    a, b = _float64_numpy(x, "x"), _float64_numpy(x_hat, "x_hat")
    if a.shape != b.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("sqnr_db needs non-empty arrays")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("sqnr_db needs finite values (no NaN or inf)")
    signal, noise = float(np.sum(a * a)), float(np.sum((a - b) ** 2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10 * float(np.log10(signal / noise))


def _float64_numpy(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    if isinstance(a, np.ndarray) and (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        return a.astype(np.float64)
    raise TypeError(f"{name} must be a numeric NumPy array or torch tensor, got {type(a).__name__}")


# -- k-means (codebook) quantization, as in Deep Compression -----------------------------------

@dataclass(frozen=True)
class CodebookArray:
    """Codes that index a codebook of centroids (k-means quantization).

    codes: ``uint8``, the shape of the original array, values in 0..2**bits - 1.
    codebook: ``float32``, shape (2**bits,): the centroids, sorted ascending (unused or duplicate
        centroids are allowed). bits: 1..8.
    Arrays are NumPy arrays or torch tensors, as the input to ``kmeans_quantize`` was.
    """
    codes: np.ndarray | torch.Tensor
    codebook: np.ndarray | torch.Tensor
    bits: int

    @property
    def nbytes(self) -> int:
        """Bytes of real storage: the codes PACKED at ``bits`` bits each (ceil(n * bits / 8), as
        ``pack_codes`` stores them; unlike ``QuantizedArray.nbytes``, which counts the uint8 codes
        held in memory) plus the float32 codebook's 4 * 2**bits bytes."""
        n = self.codes.size if isinstance(self.codes, np.ndarray) else self.codes.numel()
        return -(-n * self.bits // 8) + 4 * 2 ** self.bits

    def dequantize(self):
        """The float32 array ``codebook[codes]`` (NumPy or torch, as the codes are; on the codes'
        device)."""
        if isinstance(self.codes, np.ndarray):
            return self.codebook[self.codes.astype(np.intp)]
        return torch.as_tensor(self.codebook, device=self.codes.device)[self.codes.long()]


def kmeans_quantize(x, bits: int = 8, iters: int = 30) -> CodebookArray:
    """Quantize ``x`` (NumPy or torch, float, any shape, at least 1-D) to ``bits``-bit indices into
    a codebook of 2**bits centroids fitted by 1-D k-means (Lloyd's algorithm) over all its values.

    Initialisation: centroids spaced linearly over [min, max], c_j = min + (max - min) * j / (2**b - 1)
    (Han et al. found linear initialisation best: it keeps centroids at the rare large weights,
    and it is deterministic). Each of at most ``iters`` iterations moves every centroid to the mean
    of the values assigned to it (a centroid with no values stays where it is) and reassigns each
    value to its nearest centroid (ties to the lower index); it stops early once no assignment
    changes. Means are taken in float64 on a CPU copy (exact sums; MPS has no float64); the codes
    (uint8) and the float32 codebook are returned on ``x``'s device.
    Same validation as ``quantize``, plus ``iters`` must be an int >= 0.
    """
    bits = _check_bits(bits)
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    t, is_numpy = _float32_input(x, "kmeans_quantize")
    codes, centroids = _lloyd(t.reshape(-1).cpu().to(torch.float64), 2 ** bits, int(iters))
    codes, codebook = codes.to(torch.uint8).reshape(t.shape), centroids.to(torch.float32)
    if is_numpy:
        return CodebookArray(codes.numpy().copy(), codebook.numpy().copy(), bits)
    return CodebookArray(codes.to(t.device), codebook.to(t.device), bits)


def _lloyd(v: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of the float64 values ``v`` (n,) with ``k`` centroids.
    Returns (codes int64 (n,), centroids float64 (k,), sorted), on ``v``'s device."""
    lo, hi = v.min(), v.max()
    centroids = lo + (hi - lo) * torch.arange(k, dtype=torch.float64, device=v.device) / max(k - 1, 1)
    codes = _nearest(v, centroids)
    for _ in range(iters):
        counts = torch.bincount(codes, minlength=k)
        sums = torch.bincount(codes, weights=v, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids = centroids.sort().values  # in 1-D, means stay in order; this guards rounding
        new_codes = _nearest(v, centroids)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    return codes, centroids


def _nearest(v: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value in ``v``: in 1-D the cells are
    split at the midpoints between neighbours, so this is a binary search, O(n log k), not O(n k).
    ``bucketize`` counts the midpoints strictly below a value, so a value ON a midpoint goes to the
    lower centroid."""
    return torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2)


# -- dense storage of b-bit codes --------------------------------------------------------------

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


METHODS = ("linear", "symmetric", "kmeans")


def _check_method(method: str, per_channel: bool = False) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if per_channel and method == "kmeans":
        raise ValueError("k-means quantization here is per tensor (one codebook each): per_channel=True "
                         "needs method 'linear' or 'symmetric'")
    return method


def quantize_state_dict(model: nn.Module, bits: int = 8, per_channel: bool = False,
                        method: str = "linear") -> dict[str, QuantizedArray | CodebookArray]:
    """Every floating-point parameter and buffer of ``model``, quantized to ``bits`` bits.

    method: ``"linear"`` (affine min/max, ``quantize``), ``"symmetric"`` (``quantize(...,
    symmetric=True)``, bits >= 2) or ``"kmeans"`` (``kmeans_quantize``, one codebook per tensor).
    per_channel: one scale per output channel (axis 0) for tensors with 2 or more dimensions
    (weights); 1-D tensors (biases, BatchNorm) always get one scale per tensor. Not with kmeans.
    Integer buffers (e.g. BatchNorm's num_batches_tracked) are left out: they stay as they are.
    """
    _check_method(method, per_channel)
    return {name: _quantize_tensor(t, bits, per_channel, method)
            for name, t in model.state_dict().items() if t.is_floating_point()}


def _quantize_tensor(t: torch.Tensor, bits: int, per_channel: bool, method: str):
    if method == "kmeans":
        return kmeans_quantize(t, bits)
    return quantize(t, bits, axis=0 if per_channel and t.ndim >= 2 else None, symmetric=method == "symmetric")


def dequantized_model(model: nn.Module, bits: int = 8, per_channel: bool = False,
                      method: str = "linear") -> nn.Module:
    """A copy of ``model`` whose every float parameter is replaced by its quantize-dequantize
    round trip: it computes in float32, with exactly the values b-bit storage can hold."""
    qsd = quantize_state_dict(model, bits, per_channel, method)
    new = copy.deepcopy(model)
    state = new.state_dict()
    state.update({name: dequantize(q).to(state[name].dtype) for name, q in qsd.items()})
    new.load_state_dict(state)
    return new


# -- files -------------------------------------------------------------------------------------
#
# One format for quantized arrays in files, shared by ``save_quantized`` and
# ``compression.save_compressed``: the ENTRY of an array, a dict of CPU tensors and plain values
# that ``torch.load(..., weights_only=True)`` reads on any machine.

FILE_FORMAT = 2  # save_quantized's files: {"format", "bits", "per_channel", "method", "tensors"}


def array_entry(q: QuantizedArray | CodebookArray) -> dict:
    """``q`` as a file entry of CPU tensors:

    ``packed``: ``uint8`` (ceil(n * bits / 8),), the n codes packed by ``pack_codes``;
    ``shape``: tuple, the array's shape (n = its product);
    a ``QuantizedArray`` adds ``scale`` (``float32``), ``zero_point`` (``uint8``), both of shape ()
    per tensor or (C,) per channel, and ``axis`` (None or the channel axis);
    a ``CodebookArray`` adds ``codebook`` (``float32`` (2**bits,)).
    The bit width is not in the entry: the file stores it once. ``array_from_entry`` inverts it."""
    if not isinstance(q, (QuantizedArray, CodebookArray)):
        raise TypeError(f"array_entry takes a QuantizedArray or a CodebookArray, got {type(q).__name__}")
    entry = {"packed": torch.from_numpy(pack_codes(q.codes, q.bits)), "shape": tuple(q.codes.shape)}
    if isinstance(q, CodebookArray):
        return entry | {"codebook": _cpu_tensor(q.codebook)}
    return entry | {"scale": _cpu_tensor(q.scale), "zero_point": _cpu_tensor(q.zero_point), "axis": q.axis}


def _cpu_tensor(a) -> torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def array_from_entry(entry: dict, bits: int) -> QuantizedArray | CodebookArray:
    """The array that ``array_entry`` stored, with ``bits``-bit codes, as CPU tensors.
    Raises ValueError for an entry without packed codes and a shape."""
    if not isinstance(entry, dict) or not {"packed", "shape"} <= entry.keys():
        raise ValueError("not a quantized-array entry: it needs 'packed' codes and a 'shape'")
    shape = tuple(entry["shape"])
    codes = unpack_codes(entry["packed"].numpy(), bits, math.prod(shape))
    codes = torch.from_numpy(codes).reshape(shape)
    if "codebook" in entry:
        return CodebookArray(codes, entry["codebook"], bits)
    return QuantizedArray(codes, entry["scale"], entry["zero_point"], bits, entry["axis"])


def save_quantized(model: nn.Module, f, bits: int = 8, per_channel: bool = False,
                   method: str = "linear") -> None:
    """Store ``model``'s float parameters and buffers for real, in ``bits`` bits per value.

    ``torch.save`` of a dict (``f`` is a path or a file object): ``format`` (``FILE_FORMAT``),
    ``bits``, ``per_channel``, ``method`` and ``tensors``, {name: ``array_entry``}: the codes packed
    (two 4-bit codes per byte, four 2-bit codes...) with the shape needed to unpack them, plus
    float32 scales and uint8 zero points (linear, symmetric) or the float32 codebook (kmeans).
    Everything is stored on the CPU, so a file written on a GPU loads anywhere (with
    ``weights_only=True``). Integer buffers are not stored: ``load_quantized`` leaves them as the
    model has them.
    """
    qsd = quantize_state_dict(model, bits, per_channel, method)
    torch.save({"format": FILE_FORMAT, "bits": bits, "per_channel": per_channel, "method": method,
                "tensors": {name: array_entry(q) for name, q in qsd.items()}}, f)


def load_quantized(model: nn.Module, f) -> nn.Module:
    """Load what ``save_quantized`` stored into ``model`` (dequantized to float32, then cast to
    the model's dtype, on the model's device); returns it. The file is read onto the CPU, wherever
    it was written. Raises ValueError for a file of another kind."""
    saved = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FILE_FORMAT:
        raise ValueError(f"not a file written by save_quantized (format {FILE_FORMAT})")
    bits, state = saved["bits"], model.state_dict()
    unknown = [name for name in saved["tensors"] if name not in state]
    if unknown:
        raise ValueError(f"the file holds tensors the model does not have: {unknown}")
    for name, entry in saved["tensors"].items():
        state[name] = dequantize(array_from_entry(entry, bits)).to(state[name].device, state[name].dtype)
    model.load_state_dict(state)
    return model


def cpu_state_dict(obj) -> dict:
    """A shallow copy of ``obj`` (a state dict, or a model's state dict) with every tensor on the
    CPU and detached, keys, order and the state dict's ``_metadata`` kept: what to ``torch.save``
    so that the file loads on any machine."""
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    out = copy.copy(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
    return out


def serialized_size(obj) -> int:
    """Bytes ``torch.save`` writes for ``obj`` (a state dict, or a model's state dict), its tensors
    on the CPU (``cpu_state_dict``: the size does not depend on the device)."""
    buf = io.BytesIO()
    torch.save(cpu_state_dict(obj), buf)
    return buf.getbuffer().nbytes


def dynamic_int8(model: nn.Module) -> nn.Module:
    """PyTorch's own dynamic int8 quantization of the Linear layers (int8 weights, activations
    quantized on the fly, int8 matrix products), of a copy of ``model`` in eval mode.

    Its quantized kernels run on the CPU only, so the copy is moved to the CPU, wherever ``model``
    is: the result is a CPU model (feed it CPU inputs; ``train.evaluate`` and ``bench.latency``
    do), and ``model`` itself is not changed or moved. ``torch.ao.quantization`` is deprecated in
    favour of the torchao package; its warnings are silenced here."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynamic_int8 takes an nn.Module, got {type(model).__name__}")
    cpu_copy = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(cpu_copy, {nn.Linear}, dtype=torch.qint8)
