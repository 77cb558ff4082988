"""Device mistakes a CPU can catch, as context managers for tests.

On a CPU-only machine every tensor is on the CPU, so code that forgets the data's device works
here and fails on a reader's GPU. Two traps make those mistakes fail on the CPU too:

``implicit_device_trap()``: inside it, a tensor made without a ``device=`` (``torch.arange(n)``,
``torch.zeros(k)``, ``torch.tensor([...])``) lands on the ``meta`` device instead of the CPU, so
combining it with the CPU data raises "Tensor on device meta is not on the expected device cpu",
just as a CPU tensor combined with CUDA data raises on a GPU. Build the model and the data
*before* entering it (modules built inside would have meta parameters); 0-dim CPU tensors mix
with any device, here as on CUDA.

``package_device_trap()``: the same for whole helpers that build their own models: only a
factory call made *by the package's own code* (``efficientml/``) without a ``device=`` goes to
``meta``; torch's own code (module constructors, optimizers) and the test's code are untouched.
The package's rule this enforces: every tensor it makes names its device (``device=x.device``
for the data's, ``device="cpu"`` where CPU-side by design).

``no_float64()``: any operation that produces a float64 tensor raises, as Apple's MPS backend
does (it has no float64). Wrap the code paths that run on the training device in it.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import efficientml


@contextlib.contextmanager
def implicit_device_trap():
    """Tensors made without an explicit device go to ``meta`` while inside (see the module)."""
    with torch.device("meta"):
        yield


_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.rand,
              torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.normal}
_PACKAGE = str(Path(efficientml.__file__).resolve().parent)


class _PackageDeviceTrap(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(_PACKAGE):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def package_device_trap():
    """Tensors the package makes without an explicit device go to ``meta`` (see the module)."""
    with _PackageDeviceTrap():
        yield


class Float64Made(AssertionError):
    """An operation produced a float64 tensor where the code must run on MPS."""


class _NoFloat64(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise Float64Made(f"{func} made a float64 tensor: MPS has no float64")
        return out


@contextlib.contextmanager
def no_float64():
    """Raise ``Float64Made`` when any torch operation inside produces a float64 tensor."""
    with _NoFloat64():
        yield
