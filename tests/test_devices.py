"""Every chapter's code on every device present.

The smoke run's checks (``efficientml.smoke``: each chapter's experiment on tiny settings, the
helpers each chapter's cells call beyond it, and a training run killed and resumed) run on each
accelerator this machine has, CUDA and Apple's MPS, and are skipped with the reason where it has
none. On the CPU they run under ``package_device_trap`` (tests/device_checks.py), which makes
every tensor the package creates without naming its device land on the ``meta`` device: the
mistake a GPU would reveal (a CPU tensor meeting the data on the GPU) fails here too.
"""
import pytest
import torch

from device_checks import package_device_trap
from efficientml.smoke import CHECKS, HELPER_CHECKS, TINY, kill_and_resume

ACCELERATORS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")),
    pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(),
                                                 reason="no Apple GPU (MPS) on this machine")),
]


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("check", list(CHECKS))
def test_smoke_check_on_each_accelerator(check, device, tmp_path, data_dir):
    CHECKS[check](torch.device(device), tmp_path)


@pytest.mark.parametrize("experiment", list(TINY))
def test_each_chapter_s_experiment_names_the_device_of_every_tensor(experiment, tmp_path, data_dir):
    with package_device_trap():
        CHECKS[f"experiment {experiment}"](torch.device("cpu"), tmp_path)


@pytest.mark.parametrize("check", list(HELPER_CHECKS))
def test_each_chapter_s_helpers_name_the_device_of_every_tensor(check, tmp_path, data_dir):
    with package_device_trap():
        HELPER_CHECKS[check](torch.device("cpu"), tmp_path)


def test_a_killed_run_resumes_on_the_cpu(tmp_path, data_dir):
    assert "resumed" in kill_and_resume(torch.device("cpu"), tmp_path)


def test_the_trap_catches_a_tensor_made_without_the_device():
    """The trap itself: package code that forgets the device fails, test code is untouched."""
    from efficientml import smoke
    x = torch.arange(3)
    with package_device_trap():
        assert torch.arange(3).device.type == "cpu"      # not the package's code
        code = compile("def f(x):\n    return x + torch.arange(3)\n", smoke.__file__, "exec")
        namespace = {"torch": torch}
        exec(code, namespace)                              # a function "in" the package
        with pytest.raises(RuntimeError, match="meta"):
            namespace["f"](x)
