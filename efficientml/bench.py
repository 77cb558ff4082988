"""Benchmarks that print figures: ``python -m efficientml.bench loader [--dataset ...]``;
``quantization``, ``pruning``, ``generation``; and Chapter 7's ``roofline`` (this machine's peak
FLOP/s and bandwidth), ``train`` (the book's training steps: images or tokens per second and
their utilization of the measured peak, on any device) and ``nanogpt`` (the language model's
step against nanoGPT's).

Speed targets are checked here, by figures a person reads, not by timed tests.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from .data import DATASETS, TensorLoader, data_root, load_dataset
from .train import select_device


def synchronize(device) -> None:
    """Wait until the queued work of ``device`` (a torch.device or its name) is done: GPUs run
    asynchronously, so a clock read without this measures the launch, not the work. A no-op on
    the CPU (and any other device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer; the CPU for a model with neither (e.g.
    PyTorch's dynamically quantized int8 models, whose packed weights are CPU-only)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _images_per_second(loader, epochs: int, device) -> float:
    """Iterate ``loader`` for ``epochs`` epochs, moving each batch to ``device``; images per second."""
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            n += len(y)
        synchronize(device)
    return n / (time.perf_counter() - t0)


def bench_loader(dataset: str = "fashion-mnist", batch_size: int = 128, epochs: int = 1,
                 workers: int = 2, device=None) -> dict:
    """One training epoch's batches with augmentation: TensorLoader vs torchvision's DataLoader.

    The DataLoader runs the usual per-image pipeline: RandomCrop(padding) and
    RandomHorizontalFlip on PIL images, ToTensor, Normalize, in ``workers`` worker processes.
    """
    from torchvision import transforms

    device = select_device(device)
    ds = load_dataset(dataset, train=True)
    spec = DATASETS[ds.name]
    tfm = [transforms.RandomCrop(ds.shape[1], padding=spec.crop_padding)]
    if spec.hflip:
        tfm.append(transforms.RandomHorizontalFlip())
    tfm += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    tv = spec.tv_class(str(data_root()), train=True, transform=transforms.Compose(tfm))
    dl = torch.utils.data.DataLoader(tv, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    ours = TensorLoader(ds, batch_size, shuffle=True, augment=True, device=device)
    _images_per_second(ours, 1, device)  # warm-up (allocations, the device copy is in __init__)
    return {"dataset": ds.name, "images": len(ds), "batch_size": batch_size, "device": str(device),
            "workers": workers, "tensor_loader": _images_per_second(ours, epochs, device),
            "torchvision_dataloader": _images_per_second(dl, epochs, device)}


@torch.no_grad()
def latency(model: torch.nn.Module, x: torch.Tensor, repeat: int = 50, warmup: int = 5) -> float:
    """Median wall time (seconds) of one forward pass of ``model`` (put in eval mode) on the batch
    ``x``, over ``repeat`` timed passes after ``warmup`` untimed ones. ``x`` is moved once to the
    model's device (``model_device``); on a GPU each timing waits for the device before starting
    and before stopping the clock (``synchronize``), so it measures the work, not its launch."""
    if not isinstance(repeat, int) or not isinstance(warmup, int) or repeat < 1 or warmup < 0:
        raise ValueError(f"need an int repeat >= 1 and an int warmup >= 0, got {repeat!r}, {warmup!r}")
    model.eval()
    device = model_device(model)
    x = x.to(device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        model(x)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_quantization(batch_sizes=(1, 1000), repeat: int = 50) -> list[dict]:
    """CPU latency of the Chapter 2 MLP in fp32 and with PyTorch's dynamic int8 quantization.

    Latency does not depend on the weights' values, so an untrained MLP of the same shape serves.
    """
    from .models import MLP
    from .quantization import dynamic_int8
    torch.manual_seed(0)
    fp32 = MLP(784, (256, 128), 10).eval()
    int8 = dynamic_int8(fp32)
    return [{"batch": b, "fp32_s": latency(fp32, x, repeat), "dynamic_int8_s": latency(int8, x, repeat)}
            for b in batch_sizes for x in [torch.randn(b, 1, 28, 28, device="cpu")]]


def bench_sparse_conv(channels: int = 256, size: int = 8, batch: int = 64, sparsities=(0.0, 0.5, 0.9, 0.99),
                      repeat: int = 20) -> list[dict]:
    """CPU latency of one 3x3 convolution (``channels`` -> ``channels`` on ``size`` x ``size`` maps,
    the shape of the ConvNet's widest layers) with unstructured sparsity, three ways: the masked
    dense convolution (what training uses), and a matrix product over unfolded patches with the
    weight matrix stored dense or sparse (CSR); the last two differ only in the product."""
    from .pruning import SparseConv2d, conv_as_matmul, unstructured_pruning
    torch.manual_seed(0)
    conv = SparseConv2d(channels, channels, 3, padding=1, bias=False, granularity="weight").eval()
    x = torch.randn(batch, channels, size, size, device="cpu")
    rows = []
    for p in sparsities:
        unstructured_pruning(torch.nn.Sequential(conv), p)
        dense_mm, sparse_mm = conv_as_matmul(conv, layout=None), conv_as_matmul(conv)
        with torch.no_grad():
            err = max((f(x) - conv(x)).abs().max().item() for f in (dense_mm, sparse_mm))
        rows.append({"sparsity": p, "conv_s": latency(conv, x, repeat), "dense_matmul_s": latency(_Fn(dense_mm), x, repeat),
                     "sparse_matmul_s": latency(_Fn(sparse_mm), x, repeat), "max_abs_diff": err})
    return rows


class _Fn(torch.nn.Module):
    """A function as a module, so ``latency`` can time it."""
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def bench_generation(model=None, prompt_len: int = 1, n_tokens: int = 200, batch: int = 1, repeat: int = 3) -> dict:
    """Greedy generation of ``n_tokens`` tokens by a ``LanguageModel`` (default: Chapter 6's quick
    configuration, untrained; speed does not depend on the weights) with and without the KV
    cache: tokens per second (best of ``repeat``) and whether both produced the same tokens."""
    from .transformer import LanguageModel

    if model is None:
        torch.manual_seed(0)
        model = LanguageModel(65, 128, 4, 4, 512, max_len=64)
    model.eval()
    device = model_device(model)
    prompt = torch.zeros(batch, prompt_len, dtype=torch.long, device=device)
    out, best = {}, {}
    for cache in (False, True):
        times = []
        for _ in range(repeat):
            synchronize(device)
            t0 = time.perf_counter()
            out[cache] = model.generate(prompt, n_tokens, temperature=0, use_cache=cache)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        best[cache] = min(times)
    return {"n_tokens": n_tokens, "batch": batch, "max_len": model.max_len,
            "no_cache_tokens_per_s": batch * n_tokens / best[False], "cache_tokens_per_s": batch * n_tokens / best[True],
            "same_tokens": bool(torch.equal(out[False], out[True]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m efficientml.bench", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("loader", help="TensorLoader vs torchvision DataLoader, images per second")
    b.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--epochs", type=int, default=1)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--device", default=None)
    qb = sub.add_parser("quantization", help="MLP latency on the CPU: fp32 vs PyTorch dynamic int8")
    qb.add_argument("--repeat", type=int, default=200)
    pb = sub.add_parser("pruning", help="3x3 conv latency on the CPU: masked dense vs sparse CSR, by sparsity")
    pb.add_argument("--repeat", type=int, default=20)
    gb = sub.add_parser("generation", help="language-model generation, tokens per second, with and without a KV cache")
    gb.add_argument("--tokens", type=int, default=200)
    gb.add_argument("--batch", type=int, default=1)
    rb = sub.add_parser("roofline", help="this machine's peak FLOP/s and memory bandwidth, 1 thread and all")
    rb.add_argument("--device", default=None)
    tb = sub.add_parser("train", help="training steps of the ConvNet and the language model: throughput and "
                                      "utilization of the measured peak")
    tb.add_argument("--device", default=None)
    nb = sub.add_parser("nanogpt", help="the book's language-model step against nanoGPT's, timed in alternation")
    nb.add_argument("--rounds", type=int, default=7)
    nb.add_argument("--device", default=None)
    a = p.parse_args(argv)
    if a.what in ("roofline", "train", "nanogpt"):
        return _chapter7(a)
    if a.what == "generation":
        r = bench_generation(n_tokens=a.tokens, batch=a.batch)
        print(f"LanguageModel (Chapter 6 quick size, context {r['max_len']}), greedy, {r['n_tokens']} tokens, batch "
              f"{r['batch']}, torch threads {torch.get_num_threads()}")
        print(f"  without KV cache {r['no_cache_tokens_per_s']:10,.0f} tokens/s")
        print(f"  with KV cache    {r['cache_tokens_per_s']:10,.0f} tokens/s   "
              f"({r['cache_tokens_per_s'] / r['no_cache_tokens_per_s']:.2f}x; same tokens: {r['same_tokens']})")
        return 0
    if a.what == "pruning":
        print(f"3x3 conv 256->256 on 8x8 maps, batch 64, torch threads {torch.get_num_threads()}, median of {a.repeat}")
        for r in bench_sparse_conv(repeat=a.repeat):
            print(f"  sparsity {r['sparsity']:4.0%}: masked conv2d {r['conv_s'] * 1e3:7.2f} ms   im2col + dense "
                  f"{r['dense_matmul_s'] * 1e3:7.2f} ms   im2col + sparse CSR {r['sparse_matmul_s'] * 1e3:7.2f} ms")
        return 0
    if a.what == "quantization":
        print(f"MLP 784-256-128-10 forward pass on the CPU, torch threads {torch.get_num_threads()}, median of {a.repeat}")
        for r in bench_quantization(repeat=a.repeat):
            print(f"  batch {r['batch']:>5}: fp32 {r['fp32_s'] * 1e6:9.1f} us   dynamic int8 {r['dynamic_int8_s'] * 1e6:9.1f} us"
                  f"   ({r['fp32_s'] / r['dynamic_int8_s']:.2f}x)")
        return 0
    try:
        r = bench_loader(a.dataset, a.batch_size, a.epochs, a.workers, a.device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['dataset']}: {r['images']} training images, batch {r['batch_size']}, with augmentation, "
          f"on {r['device']}, torch threads {torch.get_num_threads()}")
    print(f"  {'TensorLoader (batches made on the device)':50s} {r['tensor_loader']:>10,.0f} images/s")
    print(f"  {'torchvision DataLoader (%d workers, PIL transforms)' % r['workers']:50s} {r['torchvision_dataloader']:>10,.0f} images/s")
    print(f"  speed-up: {r['tensor_loader'] / r['torchvision_dataloader']:.1f}x")
    return 0


def _chapter7(a) -> int:
    from . import cost
    from .reproducibility import cpu_model, machine
    device = select_device(a.device)
    where = machine(device) + (f" ({cpu_model()})" if device.type == "cpu" else "")
    if a.what == "nanogpt":
        r = cost.against_nanogpt(rounds=a.rounds, device=device)
        print(f"language-model training step, batch 12 x 64 tokens, on {where}; median of {a.rounds} rounds")
        for name, ms in r["median_ms"].items():
            print(f"  {name:22s} {ms:8.2f} ms per step   ({r['parameters'][name]:,} parameters)")
        print(f"  book / nanoGPT step time: {r['ratio']:.3f} (below 1: the book's step is faster)")
        return 0
    threads = [torch.get_num_threads()] if device.type != "cpu" else sorted({1, torch.get_num_threads()})
    roofs = [cost.measure_roofline(t, device) for t in threads]
    print(f"roofline of {where}: float32 {2048}x{2048} matrix product, 256 MiB copy (fastest block)")
    for r in roofs:
        label = f"{r.threads} thread{'s' if r.threads != 1 else ''}" if device.type == "cpu" else str(device)
        print(f"  {label:10s} peak {r.peak_flops / 1e9:9.1f} GFLOP/s   bandwidth {r.bandwidth / 1e9:7.1f} GB/s   "
              f"ridge {r.ridge:6.1f} FLOP/byte")
    if a.what == "train":
        peak = roofs[-1].peak_flops
        for sp in cost.training_speeds(device):
            print(f"  {sp.name:28s} {sp.items_per_s:12,.0f} {sp.unit}/s   {sp.flops_per_s / 1e9:8.1f} GFLOP/s   "
                  f"utilization {sp.utilization(peak):6.1%} of the measured peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
