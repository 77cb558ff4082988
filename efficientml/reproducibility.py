"""One call that makes a run repeatable (seeds, deterministic kernels), and the reader's cores.

Threads: by default the package leaves torch's thread count as it is (torch uses the machine's
cores). ``$EFFICIENTML_THREADS`` chooses a count for a whole run (CI sets 2, the book's quick
profile was measured at 1, 2 and 4); ``seed_everything(threads=n)`` sets one explicitly. A
different count sums floats in another order, so trained numbers move in their last bits and,
through training, beyond: the chapters' tolerances were measured to cover that.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

THREADS_ENV = "EFFICIENTML_THREADS"


def separate_compile_cache() -> str | None:
    """Give ``torch.compile``'s kernel cache a folder of its own per forced CPU kernel path.

    Inductor caches compiled kernels under a key that does not include ``ATEN_CPU_CAPABILITY``:
    a run with AVX2 forced on an AVX-512 machine loads the AVX-512 kernels an earlier run
    compiled, and computes NaN. When ``ATEN_CPU_CAPABILITY`` is set and
    ``TORCHINDUCTOR_CACHE_DIR`` is not, this sets the latter to the default folder with the
    capability appended, and returns it (None when it changed nothing). Called on import."""
    import getpass
    import tempfile
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    default = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    # torch writes its default into the environment once something asks for the folder
    if not capability or os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) != default:
        return None
    folder = f"{default}-{capability}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


separate_compile_cache()


def threads_from_env() -> int | None:
    """``$EFFICIENTML_THREADS`` as an int >= 1, or None when it is unset or empty."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV} must be a whole number >= 1, got {text!r}")
    return n


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count to ``threads``, else to ``$EFFICIENTML_THREADS`` if set,
    else leave it; returns the count now in use."""
    n = threads if threads is not None else threads_from_env()
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"threads must be an int >= 1, got {n!r}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_kernels() -> str:
    """The vector instructions ATen's CPU kernels use here: ``AVX512``, ``AVX2``, ``DEFAULT``
    (SSE) ... (``$ATEN_CPU_CAPABILITY`` can lower it)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else ``platform.processor()``)."""
    import platform
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: str | torch.device | None = None) -> str:
    """One line saying where numbers are computed, e.g. ``'cpu, 2 threads, AVX512 kernels'``
    (default device: ``train.select_device()``, where the package trains)."""
    if device is None:
        from .train import select_device
        device = select_device()
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    n = torch.get_num_threads()
    return f"{device.type}, {n} thread{'s' * (n != 1)}, {cpu_kernels()} kernels"


def seed_everything(seed: int = 0, threads: int | None = None, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU), choose deterministic kernels.

    seed: the seed for every generator.
    threads: torch's intra-op threads on the CPU; None: ``$EFFICIENTML_THREADS`` if set, else
        the count is left as it is (see the module's docstring).
    deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)``: deterministic
        kernels where they exist, a warning (not an error) for an operation that has none on
        this device (on CUDA, e.g. the backward pass of adaptive average pooling); on CUDA it
        also sets ``CUBLAS_WORKSPACE_CONFIG`` as cuBLAS requires and turns off cuDNN's
        autotuner. False restores torch's defaults (fast, not repeatable, on a GPU).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA and MPS device
    apply_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
