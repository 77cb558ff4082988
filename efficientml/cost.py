"""What a model costs on this machine (Chapter 7): timing that can be trusted, the roofline,
utilization, precision, compilation and the profiler.

Units: seconds, FLOP (one multiply-accumulate is 2 FLOP), bytes; rates per second. Every
timing goes through ``torch.utils.benchmark`` (warm-up, blocked autorange, median), which
waits for a GPU before reading the clock. Timings are printed by the chapter and by
``python -m efficientml.bench``, never compared by a test: machines here are noisy.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# torch.utils.benchmark imports torch's C++-extension helpers, which note on a machine without
# CUDA that none was found: true, harmless, and not for a chapter's outputs.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

from .bench import synchronize
from .train import select_device
from .transformer import _MATMULS, _matmul_macs


def measure(fn: Callable[[], object], min_run_time: float = 0.3, threads: int | None = None,
            label: str = "") -> benchmark.Measurement:
    """Time ``fn()`` with ``torch.utils.benchmark.Timer.blocked_autorange``: one untimed warm-up
    call, then blocks of calls until ``min_run_time`` seconds are spent; ``.median`` (seconds
    per call) and ``.iqr`` describe the blocks. ``threads``: torch's thread count while timing
    (default: the current one)."""
    threads = torch.get_num_threads() if threads is None else threads
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
    return timer.blocked_autorange(min_run_time=min_run_time)


def single_timings(fn: Callable[[], object], n: int = 20, device="cpu") -> list[float]:
    """``n`` separate wall-clock timings of ``fn()`` (seconds), the first call included: what a
    reader measures with one ``time.perf_counter()`` pair around a single call."""
    out = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


# -- The roofline ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Roofline:
    """A machine's two limits: ``peak_flops`` (FLOP/s, measured on a large float32 matrix
    product) and ``bandwidth`` (bytes/s, measured on a large copy). A computation doing I FLOP
    per byte it moves can run at most at ``attainable(I) = min(peak, bandwidth x I)``."""
    peak_flops: float
    bandwidth: float
    threads: int
    device: str

    @property
    def ridge(self) -> float:
        """The intensity (FLOP/byte) where the two limits meet: below it, memory bounds the speed."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        if intensity < 0:
            raise ValueError(f"an arithmetic intensity is >= 0, got {intensity}")
        return min(self.peak_flops, self.bandwidth * intensity)


def gemm_flops(m: int, n: int, k: int) -> int:
    """FLOP of an (m x k) @ (k x n) product: m n k multiply-accumulates, 2 FLOP each."""
    return 2 * m * n * k


def gemm_bytes(m: int, n: int, k: int, bytes_per_element: int = 4) -> int:
    """The least memory traffic of an (m x k) @ (k x n) product: read both inputs once, write
    the output once."""
    return bytes_per_element * (m * k + k * n + m * n)


def matmul_flops(n: int = 2048, threads: int | None = None, device=None, dtype=torch.float32,
                 min_run_time: float = 0.5) -> float:
    """FLOP/s of an n x n @ n x n product in ``dtype`` on ``device``, from the fastest block of
    calls (a roof is the best the machine does; workloads are timed by their median)."""
    device = select_device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device="cpu").to(device, dtype) for _ in range(2))
    return gemm_flops(n, n, n) / min(measure(lambda: a @ b, min_run_time, threads).times)


def copy_bandwidth(n_bytes: int = 2 ** 28, threads: int | None = None, device=None,
                   min_run_time: float = 0.5) -> float:
    """Bytes/s of copying a float32 buffer of ``n_bytes`` into another (each byte read once and
    written once: 2 x n_bytes moved per copy): the memory roof. The default, 256 MiB, is far
    larger than any CPU cache, so the copy runs from and to DRAM. From the fastest block of calls."""
    device = select_device(device)
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / min(measure(lambda: dst.copy_(src), min_run_time, threads).times)


def measure_roofline(threads: int | None = None, device=None, n: int = 2048,
                     min_run_time: float = 0.5) -> Roofline:
    """This machine's roofline at ``threads`` threads (default: torch's current count) on
    ``device`` (default: ``train.select_device()``; on a GPU the thread count is the CPU's)."""
    device = select_device(device)
    threads = torch.get_num_threads() if threads is None else threads
    return Roofline(matmul_flops(n, threads, device, min_run_time=min_run_time),
                    copy_bandwidth(threads=threads, device=device, min_run_time=min_run_time), threads, str(device))


VOCAB = 65  # the distinct characters of Tiny Shakespeare: Chapter 6's vocabulary


def chapter6_language_model(device=None):
    """(Chapter 6's quick language model, untrained, on ``device``; its settings ``LM_QUICK``)."""
    from .experiments.language_model import LM_QUICK as s
    from .transformer import LanguageModel
    model = LanguageModel(VOCAB, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"], s["dropout"],
                          max_len=s["block_size"])
    return model.to(select_device(device)), s


# -- Counting the work: FLOP and bytes of every matrix product ----------------------------------

class WorkCounter(torch.overrides.TorchFunctionMode):
    """FLOP and least memory traffic of the matrix products run inside ``with WorkCounter() as w``.

    Counts ``F.conv2d`` and the matrix products ``MatmulCounter`` counts (``F.linear``, ``@``,
    ``mm``, ``bmm``, ...): ``flops`` (2 per
    multiply-accumulate) and ``bytes`` (each call reads its input and weight once and writes its
    output once, in the tensors' own dtypes). Element-wise work (activations, norms, softmax) is
    left out of the FLOP, as in ``models.count_macs`` and Chapter 5's ``MatmulCounter``; its
    traffic is left out too, so ``intensity`` is an upper bound for a whole model.
    """

    def __init__(self):
        super().__init__()
        self.flops, self.bytes, self.calls = 0, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.conv2d:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._add(2 * out.numel() * w[0].numel(), (x, w, out))
        elif func in _MATMULS:
            macs = _matmul_macs(func, args, kwargs)
            if macs:
                operands = (args[0], args[1] if len(args) > 1 else kwargs["weight"]) if func is F.linear else args[-2:]
                self._add(2 * macs, (*operands, out))
        return out

    def _add(self, flops: int, tensors) -> None:
        self.calls += 1
        self.flops += flops
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)

    @property
    def intensity(self) -> float:
        """FLOP per byte of the counted calls."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass(frozen=True)
class Workload:
    """One computation placed on the roofline: its FLOP and bytes (``WorkCounter``) and its
    measured median time (seconds)."""
    name: str
    flops: int
    bytes: int
    seconds: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def workload(name: str, fn: Callable[[], object], min_run_time: float = 0.3, threads: int | None = None) -> Workload:
    """Count ``fn``'s work once (``WorkCounter``), then time it (``measure``)."""
    with torch.no_grad():
        with WorkCounter() as w:
            fn()
        t = measure(torch.no_grad()(fn), min_run_time, threads).median
    return Workload(name, w.flops, w.bytes, t)


def book_workloads(threads: int | None = None, min_run_time: float = 0.3, device=None) -> list[Workload]:
    """The book's own computations at the sizes its chapters run them, on ``device`` (default:
    ``train.select_device()``), untrained
    weights (speed does not depend on their values): the ConvNet of Chapters 1 and 3 (a training
    batch of 128 Fashion-MNIST images), the MLP of Chapter 2 (batch 128 and a single image), the
    two attention products of Chapter 6's model (a training batch, 12 windows of 64), and that
    language model reading a 64-character prompt (prefill) and producing one more character
    with its KV cache (decode, batch 1)."""
    from .models import MLP, ConvNet
    from .transformer import attention, causal_mask
    device = select_device(device)
    torch.manual_seed(0)
    conv, mlp = ConvNet(1, 10).eval().to(device), MLP(784, (256, 128), 10).eval().to(device)
    lm, s = chapter6_language_model(device)
    lm.eval()
    t, h = s["block_size"], s["n_heads"]
    images, one = torch.randn(128, 1, 28, 28, device=device), torch.randn(1, 1, 28, 28, device=device)
    q, k, v = (torch.randn(s["batch_size"], h, t, s["d_model"] // h, device=device) for _ in range(3))
    mask = causal_mask(t, device)
    prompt = torch.randint(0, VOCAB, (1, t), device=device)
    caches = [{} for _ in lm.layers]
    with torch.no_grad():
        lm(prompt[:, :-1], caches=caches)                   # the cache of the first t - 1 positions

    def step():  # the cache is copied so that every timed call sees t - 1 cached positions
        return lm(prompt[:, -1:], start=t - 1, caches=[{"k": c["k"], "v": c["v"]} for c in caches])

    return [workload("ConvNet, batch 128", lambda: conv(images), min_run_time, threads),
            workload("MLP, batch 128", lambda: mlp(images), min_run_time, threads),
            workload("MLP, batch 1", lambda: mlp(one), min_run_time, threads),
            workload("attention products, 12 x 4 heads x 64", lambda: attention(q, k, v, mask), min_run_time, threads),
            workload("language model: prefill, 64 tokens", lambda: lm(prompt), min_run_time, threads),
            workload("language model: decode, 1 token", step, min_run_time, threads)]


# -- Utilization of training -------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingSpeed:
    """A training step measured: ``items`` (images or tokens) per step, ``flops_per_item``
    (about 3 x 2 x forward MACs: the backward pass costs about twice the forward;
    ``training_flops``), ``seconds`` (median per step)."""
    name: str
    items: int
    flops_per_item: int
    seconds: float
    unit: str

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.items * self.flops_per_item / self.seconds

    def utilization(self, peak_flops: float) -> float:
        """Achieved FLOP/s over the machine's peak (model FLOP utilization, MFU)."""
        return self.flops_per_s / peak_flops


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, clip: float | None = None,
               forward: nn.Module | None = None) -> Callable[[], float]:
    """One training step as ``fit`` takes it (forward, cross-entropy, backward, optional clipping,
    optimizer step), as a function of nothing, for ``measure`` and the profiler. The phases are
    labelled ``forward``, ``backward`` and ``optimizer`` for ``torch.profiler``."""
    forward = model if forward is None else forward

    def step() -> float:
        with torch.profiler.record_function("forward"):
            logits = forward(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        with torch.profiler.record_function("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        return loss.item()
    return step


def convnet_step(device=None, batch: int = 128):
    """(step, (images per step, FLOP per image, "images")): Chapter 1's ConvNet (full width) on a
    batch of Fashion-MNIST-shaped images, SGD with momentum as Chapter 1 trains it."""
    from .models import ConvNet, count_macs
    device = select_device(device)
    torch.manual_seed(0)
    model = ConvNet(1, 10).to(device)
    x, y = torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return train_step(model, opt, x, y), (batch, training_flops(model, (1, 28, 28)), "images")


def training_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOP of one training step per example: 2 x MACs forward, 2 x MACs for the weights'
    gradients, and 2 x MACs for the gradients of every layer's input, except the first layer's
    (the images need none). ``models.count_macs`` counts the MACs."""
    from .models import count_macs
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    macs = 0

    def hook(m, inp, out):
        nonlocal macs
        macs = out[0].numel() * (m.weight[0].numel())   # per example: out elements x fan-in
    h = first.register_forward_hook(hook)
    try:
        total = count_macs(model, input_shape)
    finally:
        h.remove()
    return 6 * total - 2 * macs


def language_model_step(device=None, adamw_loop: bool = False):
    """(step, model, (tokens per step, FLOP per token, "tokens")): Chapter 6's quick language
    model on a batch of random windows of its batch size and context, AdamW with its learning
    rate, decay on 2-D weights and clipping, as it trains (``make_optimizer``: the fused AdamW
    on a CPU or CUDA GPU). ``adamw_loop``: instead PyTorch's per-tensor AdamW (``foreach=False,
    fused=False``, its default on a CPU), to see what fusing the update saves."""
    from .train import make_optimizer, param_groups
    from .transformer import MatmulCounter
    device = select_device(device)
    torch.manual_seed(0)
    model, s = chapter6_language_model(device)
    tokens = s["batch_size"] * s["block_size"]
    x, y = (torch.randint(0, VOCAB, (s["batch_size"], s["block_size"]), device=device) for _ in range(2))
    with torch.no_grad(), MatmulCounter() as c:
        model(x)
    groups = param_groups(model, s["weight_decay"])
    opt = (torch.optim.AdamW(groups, lr=s["lr"], foreach=False, fused=False) if adamw_loop
           else make_optimizer(groups, "adamw", s["lr"]))
    return train_step(model, opt, x, y, clip=s["clip_grad_norm"]), model, (tokens, 6 * c.macs // tokens, "tokens")


def training_speeds(device=None, min_run_time: float = 1.0) -> list[TrainingSpeed]:
    """Median step time of the ConvNet's and the language model's training steps."""
    conv, conv_work = convnet_step(device)
    lm, _, lm_work = language_model_step(device)
    return [TrainingSpeed("ConvNet (Chapter 1)", conv_work[0], conv_work[1], measure(conv, min_run_time).median,
                          conv_work[2]),
            TrainingSpeed("language model (Chapter 6)", lm_work[0], lm_work[1], measure(lm, min_run_time).median,
                          lm_work[2])]


def against_nanogpt(rounds: int = 7, steps: int = 10, device=None) -> dict:
    """The book's language-model step against nanoGPT's (``nanogpt``), the same size, batch and
    data, timed in alternation (``rounds`` rounds of ``steps`` steps each, so that all see the
    same machine load); also the book's step with PyTorch's per-tensor AdamW (``"book, AdamW
    per tensor"``: ``language_model_step(adamw_loop=True)``; nanoGPT, like PyTorch, fuses the
    update only on a CUDA GPU). Returns each one's per-round ms per step, medians and the
    ratio book / nanoGPT (below 1: the book's step is faster)."""
    from .nanogpt import NanoGPT, nanogpt_optimizer, nanogpt_step
    device = select_device(device)
    book, model, _ = language_model_step(device)
    book_loop, _, _ = language_model_step(device, adamw_loop=True)
    from .experiments.language_model import LM_QUICK as s
    x, y = (torch.randint(0, VOCAB, (s["batch_size"], s["block_size"]), device=device) for _ in range(2))
    torch.manual_seed(0)
    nano = NanoGPT(VOCAB, s["d_model"], s["n_heads"], s["n_layers"], s["block_size"]).to(device)
    opt = nanogpt_optimizer(nano)
    runs = {"book": book, "book, AdamW per tensor": book_loop, "nanoGPT": lambda: nanogpt_step(nano, opt, x, y)}
    ms = {k: [] for k in runs}
    for f in runs.values():
        f()  # warm-up
    for _ in range(rounds):
        for name, f in runs.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            synchronize(device)
            ms[name].append(1e3 * (time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"ms": ms, "median_ms": med, "ratio": med["book"] / med["nanoGPT"],
            "parameters": {"book": sum(p.numel() for p in model.parameters()),
                           "book, AdamW per tensor": sum(p.numel() for p in model.parameters()),
                           "nanoGPT": sum(p.numel() for p in nano.parameters())}}


# -- Where the time goes -----------------------------------------------------------------------

@contextlib.contextmanager
def _stderr_closed():
    """Send the process's standard error (file descriptor 2) to the null device: the profiler's
    C++ library writes a line there when it starts and stops, which would land in a chapter's
    outputs."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profile_step(step: Callable[[], object], steps: int = 5, top: int = 8) -> dict:
    """Run ``step`` ``steps`` times under ``torch.profiler`` (CPU activity) after one warm-up
    call. Returns ``phases`` ({forward, backward, optimizer: ms per step}, from ``train_step``'s
    labels), ``top``: the ``top`` operators by self CPU time, as (name, ms per step, share of
    the step's self time, calls per step), and ``ops``: {name: (ms per step, calls per step)}
    of every operator."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with _stderr_closed(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    phases = {e.key: e.cpu_time_total / steps / 1e3 for e in events if e.key in ("forward", "backward", "optimizer")}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return {"phases": phases, "total_ms": total / steps / 1e3,
            "ops": {e.key: (e.self_cpu_time_total / steps / 1e3, e.count // steps) for e in ops},
            "top": [(e.key, e.self_cpu_time_total / steps / 1e3, e.self_cpu_time_total / total, e.count // steps)
                    for e in ops[:top]]}


# -- Precision ---------------------------------------------------------------------------------

def running_sum(values: torch.Tensor, dtype: torch.dtype) -> float:
    """Add ``values`` one at a time into an accumulator of ``dtype`` (each partial sum rounded
    to ``dtype``), as a naive loop with a low-precision accumulator would: returns the sum."""
    acc = torch.zeros((), dtype=dtype, device=values.device)
    for v in values.to(dtype):
        acc = acc + v
    return float(acc)


def underflow(grads: list[torch.Tensor], dtype: torch.dtype = torch.float16, scale: float = 1.0) -> dict:
    """What casting gradients (float32) times ``scale`` to ``dtype`` loses: the fraction of
    nonzero values that become 0 (underflow) and that become infinite (overflow)."""
    g = torch.cat([t.detach().flatten().float().cpu() for t in grads])
    g = g[g != 0]
    if not len(g):
        raise ValueError("no nonzero gradient values to cast")
    cast = (g * scale).to(dtype)
    return {"underflow": (cast == 0).float().mean().item(), "overflow": cast.isinf().float().mean().item()}


def matmul_speeds(n: int = 512, dtypes=(torch.float32, torch.bfloat16, torch.float16), device=None,
                  min_run_time: float = 0.3) -> dict[str, float]:
    """FLOP/s of an n x n product in each dtype (on a CPU without bfloat16 or float16 arithmetic
    these are converted to float32 and back, inside the kernel or around it)."""
    return {str(d).removeprefix("torch."): matmul_flops(n, device=device, dtype=d, min_run_time=min_run_time)
            for d in dtypes}


# -- Compilation -------------------------------------------------------------------------------

def quiet_compile_logs() -> None:
    """Silence torch's note that no CUDA runtime was found, which compiling prints on a CPU-only
    machine (it is true and harmless there)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def compile_speedup(fn: Callable[[], torch.Tensor], compiled: Callable[[], torch.Tensor],
                    min_run_time: float = 0.5) -> dict:
    """Run ``compiled`` once (compilation, timed by itself), then time both with ``measure``;
    the largest absolute difference between their outputs."""
    quiet_compile_logs()
    t0 = time.perf_counter()
    out_c = compiled()
    first = time.perf_counter() - t0
    out = fn()
    return {"first_call_s": first, "eager_s": measure(fn, min_run_time).median,
            "compiled_s": measure(compiled, min_run_time).median,
            "max_abs_diff": (out_c.float() - out.float()).abs().max().item()}


def check_gemm_intensity(fn: Callable[..., float]) -> None:
    """Chapter 7's exercise: check a reader's ``fn(m, n, k, bytes_per_element=4)``, the FLOP per
    byte of an (m x k) @ (k x n) product that reads its inputs and writes its output once,
    against ``gemm_flops / gemm_bytes`` on shapes from a vector product to a large square one.
    Raises AssertionError naming the first shape where they differ; prints what passed."""
    shapes = [(1, 1, 1, 4), (1, 256, 784, 4), (128, 256, 784, 4), (2048, 2048, 2048, 4),
              (64, 128, 128, 2), (1, 4096, 4096, 1)]
    for m, n, k, b in shapes:
        want = gemm_flops(m, n, k) / gemm_bytes(m, n, k, b)
        got = fn(m, n, k, b)
        if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-9):
            raise AssertionError(f"gemm_intensity({m}, {n}, {k}, {b}) = {got!r}, expected {want:.6g} "
                                 f"= 2mnk / ({b} x (mk + kn + mn))")
    print(f"gemm_intensity agrees with 2mnk / (bytes x (mk + kn + mn)) on all {len(shapes)} shapes")
