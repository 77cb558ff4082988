import io
import warnings

import pytest
import torch
from torch import nn

from efficientml import MLP
from efficientml.compression import bitmap_pays, compressed_size, load_compressed, save_compressed
from efficientml.quantization import (array_entry, dequantize, kmeans_quantize, quantize, save_quantized,
                                      serialized_size)


def conv_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 6 * 6, 10))


def pruned(make, sparsity: float, seed: int = 0) -> nn.Module:
    """``make()`` with exactly round(sparsity * n) entries of every conv/linear weight set to 0."""
    torch.manual_seed(seed)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.view(-1)[torch.randperm(p.numel())[:round(sparsity * p.numel())]] = 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, to see them come back
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return model


def round_trip(model: nn.Module, make, **kw) -> tuple[dict, dict]:
    buf = io.BytesIO()
    save_compressed(model, buf, **kw)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # a plain dict of tensors, ints, floats and tuples
    buf.seek(0)
    torch.manual_seed(123)  # a fresh model with other values, so nothing is left over by chance
    return load_compressed(make(), buf).state_dict(), saved


@pytest.mark.parametrize("make", [conv_model, lambda: MLP(784, (256, 128), 10)], ids=["conv", "mlp"])
@pytest.mark.parametrize("method", ["kmeans", "linear"])
@pytest.mark.parametrize("sparsity, bits", [(0.5, 8), (0.5, 4), (0.9, 4), (0.9, 2)])
def test_round_trip_keeps_zeros_and_quantizes_the_nonzeros(make, method, sparsity, bits):
    model = pruned(make, sparsity)
    loaded, saved = round_trip(model, make, bits=bits, method=method)
    for name, t in model.state_dict().items():
        if not (t.is_floating_point() and t.ndim >= 2):  # biases, BatchNorm, num_batches_tracked: as they were
            assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype, name
            continue
        assert "bitmap" in saved["tensors"][name]  # sparse enough for the bitmap to pay at these bits
        zero = t == 0
        assert (loaded[name][zero] == 0).all()
        nonzeros = t[~zero]
        q = kmeans_quantize(nonzeros, bits) if method == "kmeans" else quantize(nonzeros, bits)
        assert torch.equal(loaded[name][~zero], dequantize(q))
        assert len(torch.unique(loaded[name][~zero])) <= 2 ** bits


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_dense_tensors_skip_the_bitmap(method):
    model = pruned(conv_model, 0.0)
    loaded, saved = round_trip(model, conv_model, bits=4, method=method)
    for name in ("0.weight", "4.weight"):
        assert "bitmap" not in saved["tensors"][name]
        w = model.state_dict()[name]
        q = kmeans_quantize(w, 4) if method == "kmeans" else quantize(w.reshape(-1), 4)
        assert torch.equal(loaded[name], dequantize(q).reshape(w.shape))


def test_an_all_zero_weight_comes_back_all_zero():
    model = pruned(conv_model, 0.5)
    with torch.no_grad():
        model[4].weight.zero_()
    loaded, saved = round_trip(model, conv_model, bits=4)
    assert "values" not in saved["tensors"]["4.weight"] and torch.equal(loaded["4.weight"], model[4].weight)


def test_bitmap_pays_by_hand():
    # 800 entries at 4 bits: dense codes 400 bytes; a bitmap 100 bytes + ceil(nnz / 2) bytes of codes
    assert not bitmap_pays(800, 600, 4)      # 100 + 300 = 400: no saving
    assert not bitmap_pays(800, 599, 4)      # 100 + 300 (599 codes round up) = 400
    assert bitmap_pays(800, 598, 4)          # 100 + 299 < 400
    assert not bitmap_pays(800, 0, 1)        # at 1 bit a bitmap is as big as the codes: never pays
    assert bitmap_pays(800, 0, 2) and not bitmap_pays(800, 800, 8)


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_file_shrinks_with_sparsity_and_bits(method):
    make = lambda: MLP(784, (256, 128), 10)  # noqa: E731
    size = {(s, b): compressed_size(pruned(make, s), b, method) for s in (0.0, 0.5, 0.9) for b in (8, 4, 2)}
    for b in (8, 4):  # at 2 bits and 50% sparsity the bitmap costs what it saves: no change there
        assert size[0.0, b] > size[0.5, b] > size[0.9, b]
    assert size[0.5, 2] > size[0.9, 2]
    for s in (0.0, 0.5, 0.9):
        assert size[s, 8] > size[s, 4] > size[s, 2]
    # dense, it is as small as a packed save_quantized file (no bitmap; the biases in fp32 cost ~1.2 kB)
    buf = io.BytesIO()
    save_quantized(pruned(make, 0.0), buf, bits=4, method=method)
    assert abs(size[0.0, 4] - buf.getbuffer().nbytes) < 3000


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_linear_heavy_model_at_90_percent_sparsity_and_4_bits(method):
    model = pruned(lambda: MLP(784, (256, 128), 10), 0.9)
    size, fp32 = compressed_size(model, 4, method), serialized_size(model)
    weights = [t for t in model.state_dict().values() if t.ndim >= 2]
    # what the file must hold: bitmaps, 4-bit codes of the nonzeros, fp32 biases (+ codebooks)
    payload = sum(-(-w.numel() // 8) + -(-int((w != 0).sum()) * 4 // 8) for w in weights)
    payload += 4 * sum(t.numel() for t in model.state_dict().values() if t.ndim == 1)
    assert payload <= size < payload + 6000  # torch.save's zip records, names and codebooks
    assert fp32 / size > 18  # measured: 20.1x (kmeans), 20.5x (linear); the bitmap alone caps it at 32x


@pytest.mark.parametrize("kw, err", [
    ({"bits": 0}, ValueError), ({"bits": 9}, ValueError), ({"bits": 4.0}, TypeError),
    ({"method": "huffman"}, ValueError), ({"method": "symmetric"}, ValueError),
])
def test_bad_input_is_rejected(kw, err):
    with pytest.raises(err):
        save_compressed(conv_model(), io.BytesIO(), **kw)
    with pytest.raises(err):
        compressed_size(conv_model(), **{"bits": 4, "method": "kmeans", **kw})


def test_not_a_model_or_not_a_compressed_file():
    with pytest.raises(TypeError):
        save_compressed({"w": torch.ones(2, 2)}, io.BytesIO())
    buf = io.BytesIO()
    save_quantized(conv_model(), buf, bits=4)
    buf.seek(0)
    with pytest.raises(ValueError, match="save_compressed"):
        load_compressed(conv_model(), buf)


# -- one format for quantized arrays, and files that load on any machine -------------------------

@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_entries_are_save_quantizeds_array_entries(method):
    model = pruned(conv_model, 0.5)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn_like(model[0].weight))  # dense: no bitmap
    _, saved = round_trip(model, conv_model, bits=4, method=method)
    buf = io.BytesIO()
    save_quantized(model, buf, bits=4, method=method)
    buf.seek(0)
    quantized_entry = torch.load(buf, weights_only=True)["tensors"]["0.weight"]
    dense, sparse = saved["tensors"]["0.weight"], saved["tensors"]["4.weight"]
    assert dense.keys() == quantized_entry.keys() and "bitmap" not in dense
    assert all(torch.equal(dense[k], v) if isinstance(v, torch.Tensor) else dense[k] == v
               for k, v in quantized_entry.items())
    nonzeros = model[4].weight[model[4].weight != 0].detach()
    q = kmeans_quantize(nonzeros, 4) if method == "kmeans" else quantize(nonzeros, 4)
    assert set(sparse) == {"shape", "bitmap", "values"} and sparse["values"].keys() == array_entry(q).keys()


def test_a_file_written_on_a_gpu_loads_on_the_cpu(written_on_cuda):
    model = pruned(conv_model, 0.5)
    ref = round_trip(model, conv_model, bits=4)[0]
    buf = written_on_cuda(lambda f: save_compressed(model, f, bits=4))
    loaded = load_compressed(conv_model(), buf).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())


def test_files_hold_cpu_tensors_and_loading_keeps_the_models_device():
    _, saved = round_trip(pruned(conv_model, 0.5), conv_model, bits=4, method="linear")

    def tensors(d):
        for v in d.values():
            if isinstance(v, dict):
                yield from tensors(v)
            elif isinstance(v, torch.Tensor):
                yield v
    assert all(t.device.type == "cpu" for t in tensors(saved["tensors"]))
    buf = io.BytesIO()
    save_compressed(pruned(conv_model, 0.5), buf, bits=4)
    buf.seek(0)
    target = conv_model().to("meta")  # stands for a model on a GPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # copying CPU values into meta parameters warns
        load_compressed(target, buf)
    assert all(t.device.type == "meta" for t in target.state_dict().values())
