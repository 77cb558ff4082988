"""Deep Compression's storage (Han et al., 2016): pruning + quantization + sparse storage in one file.

A pruned weight tensor is mostly exact zeros. ``save_compressed`` stores each weight tensor as

    bitmap  1 bit per entry, set where the entry is nonzero (``np.packbits``), n / 8 bytes;
    codes   only the nonzero values, quantized to ``bits`` bits and packed (``pack_codes``);
    codebook / scale, zero point   what dequantization needs (k-means or linear per tensor).

The bitmap is stored only where it saves space: it costs n/8 bytes and saves bits/8 bytes per
zero, so it pays when more than a fraction 1/bits of the entries are zero (25% at 4 bits); a dense
tensor keeps all its values and no bitmap. In a sparse tensor zeros stay exactly zero; a dense one
is quantized whole (linear quantization keeps 0 exact anyway; k-means maps a stray 0 to its
nearest centroid). 1-D tensors (biases, BatchNorm's weight, bias and running statistics) are kept
in float32: they are a tiny part of a model (0.2% of the Chapter 2 MLP) and BatchNorm's running
variance is sensitive to rounding. Integer buffers (num_batches_tracked) are stored as they are.

The file is a ``torch.save`` of ``{"format": FORMAT, "bits", "method", "tensors": {name: entry}}``,
CPU tensors only. The quantized values use the one entry format of ``quantization.array_entry``,
the entry ``save_quantized`` writes (packed codes, shape, scale and zero point or codebook): a
dense tensor's entry is exactly that; a sparse one's is ``{"shape", "bitmap", "values"}``, whose
``values`` is the array entry of its nonzeros (absent if there are none); other tensors are
``{"tensor": t}``.

Han et al. store the positions as 4- or 8-bit gaps between nonzeros (CSR) and Huffman-code both
streams; a bitmap is simpler but, at 90% sparsity, costs 1 bit per entry against 0.5-0.8 bits per
entry for their 5-bit (fully connected) or 8-bit (conv) gaps, so the files here are somewhat larger.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import nn

from .quantization import (_check_bits, array_entry, array_from_entry, cpu_state_dict, dequantize,
                           kmeans_quantize, quantize)

FORMAT = "efficientml-compressed/2"
METHODS = ("kmeans", "linear")


def _check(model, bits, method) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _check_bits(bits)


def bitmap_pays(numel: int, nonzeros: int, bits: int) -> bool:
    """Whether a 1-bit-per-entry bitmap plus ``nonzeros`` packed codes take fewer bytes than
    ``numel`` packed codes (all values, no bitmap)."""
    packed = lambda n: -(-n * bits // 8)  # noqa: E731
    return -(-numel // 8) + packed(nonzeros) < packed(numel)


def _quantized(values: torch.Tensor, bits: int, method: str):
    """``values`` (float32, CPU) quantized per tensor: k-means codebook or affine (linear)."""
    return kmeans_quantize(values, bits) if method == "kmeans" else quantize(values, bits)


def _compress(t: torch.Tensor, bits: int, method: str) -> dict:
    """The entry of one float tensor with at least 2 dimensions (CPU tensors throughout).

    Dense: the tensor's ``quantization.array_entry``. Sparse (where ``bitmap_pays``):
    ``{"shape": the tensor's shape, "bitmap": uint8, 1 bit per entry set where it is nonzero
    (np.packbits, C order), "values": array_entry of the nonzeros (1-D)}``, without ``values``
    when every entry is zero."""
    t = t.detach().cpu().to(torch.float32)
    flat = t.reshape(-1)
    mask = flat != 0
    if not bitmap_pays(flat.numel(), int(mask.sum()), bits):
        return array_entry(_quantized(t, bits, method))
    entry = {"shape": tuple(t.shape), "bitmap": torch.from_numpy(np.packbits(mask.numpy()))}
    if mask.any():
        entry["values"] = array_entry(_quantized(flat[mask], bits, method))
    return entry


def _decompress(entry: dict, bits: int) -> torch.Tensor:
    """The float32 CPU tensor that ``_compress`` stored."""
    if "bitmap" not in entry:
        return dequantize(array_from_entry(entry, bits))
    n = math.prod(entry["shape"])
    mask = torch.from_numpy(np.unpackbits(entry["bitmap"].numpy(), count=n).astype(bool))
    out = torch.zeros(n, dtype=torch.float32, device=mask.device)
    if "values" in entry:
        out[mask] = dequantize(array_from_entry(entry["values"], bits))
    return out.reshape(entry["shape"])


def save_compressed(model: nn.Module, f, bits: int = 4, method: str = "kmeans") -> None:
    """Store ``model``'s state dict Deep-Compression style (see the module docstring).

    f: a path or a file object. bits: 1..8, for the values of tensors with 2 or more dimensions.
    method: ``"kmeans"`` (``kmeans_quantize``: one codebook of 2**bits float32 centroids per tensor)
    or ``"linear"`` (``quantize``: affine, one scale and zero point per tensor), fitted to the
    values stored, i.e. to the nonzeros of a sparse tensor. The file is a ``torch.save`` of a dict
    of tensors, ints, floats and tuples, so ``torch.load(f, weights_only=True)`` reads it.
    The state dict is stored as it is: fold pruning masks into the weights first (a
    ``SparseConv2d`` keeps nonzero raw weights under its mask). Each quantized tensor's entry is
    the one ``quantization.save_quantized`` writes (``quantization.array_entry``), for the whole
    tensor or, with a bitmap, for its nonzeros; other tensors are stored as ``{"tensor": t}``.
    Everything is stored on the CPU, so a file written on a GPU loads anywhere.
    """
    bits = _check(model, bits, method)
    tensors = {}
    for name, t in cpu_state_dict(model).items():
        if t.is_floating_point() and t.ndim >= 2:
            tensors[name] = _compress(t, bits, method)
        else:
            tensors[name] = {"tensor": t.clone()}  # fp32 1-D tensors, integer buffers
    torch.save({"format": FORMAT, "bits": bits, "method": method, "tensors": tensors}, f)


def load_compressed(model: nn.Module, f) -> nn.Module:
    """Load what ``save_compressed`` stored into ``model`` (float tensors dequantized to float32,
    then cast to the model's dtype, on the model's device); returns ``model``. Zeros of sparse
    tensors come back exactly 0, the other entries as their codebook (k-means) or dequantized
    (linear) values. The file is read onto the CPU, wherever it was written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    saved = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"not a file written by save_compressed (format {FORMAT!r})")
    state = model.state_dict()
    for name, entry in saved["tensors"].items():
        t = entry["tensor"] if "tensor" in entry else _decompress(entry, saved["bits"])
        state[name] = t.to(state[name].device, state[name].dtype) if name in state else t
    model.load_state_dict(state)
    return model


def compressed_size(model: nn.Module, bits: int = 4, method: str = "kmeans") -> int:
    """Bytes of the file ``save_compressed(model, f, bits, method)`` writes."""
    buf = io.BytesIO()
    save_compressed(model, buf, bits, method)
    return buf.getbuffer().nbytes
