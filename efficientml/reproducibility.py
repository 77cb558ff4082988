"""One call that makes a run repeatable: seeds, thread count, deterministic kernels."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

DEFAULT_THREADS = 2  # the CI machine and the quick profile's target: 2 CPU cores


def seed_everything(seed: int = 0, threads: int | None = DEFAULT_THREADS,
                    deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA), fix the thread count, choose deterministic kernels.

    seed: the seed for every generator.
    threads: intra-op threads for torch on the CPU (``None`` leaves torch's choice). Fixing it
        matters for repeatability: a different thread count can change the order of float sums.
    deterministic: ``torch.use_deterministic_algorithms(True)``; on CUDA this also sets
        ``CUBLAS_WORKSPACE_CONFIG`` as cuBLAS requires and turns off cuDNN's autotuner.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
