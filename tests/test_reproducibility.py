"""Threads and kernels: what the reader controls and what each chapter prints about its machine."""
import pytest
import torch

from efficientml.reproducibility import apply_threads, cpu_kernels, machine, threads_from_env


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("text, expected", [("", None), ("  ", None), ("3", 3), (" 1 ", 1)])
def test_threads_from_env_reads_a_positive_count(monkeypatch, text, expected):
    monkeypatch.setenv("EFFICIENTML_THREADS", text)
    assert threads_from_env() == expected


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5"])
def test_threads_from_env_refuses_what_is_no_count(monkeypatch, text):
    monkeypatch.setenv("EFFICIENTML_THREADS", text)
    with pytest.raises(ValueError, match="EFFICIENTML_THREADS"):
        threads_from_env()


def test_apply_threads_sets_torch_and_validates(monkeypatch, restore_threads):
    monkeypatch.delenv("EFFICIENTML_THREADS", raising=False)
    assert apply_threads(1) == 1 == torch.get_num_threads()
    monkeypatch.setenv("EFFICIENTML_THREADS", "2")
    assert apply_threads() == 2 == torch.get_num_threads()
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError):
            apply_threads(bad)


def test_machine_names_device_threads_and_kernels(restore_threads):
    torch.set_num_threads(1)
    assert machine("cpu") == f"cpu, 1 thread, {cpu_kernels()} kernels"
    torch.set_num_threads(2)
    assert machine("cpu") == f"cpu, 2 threads, {cpu_kernels()} kernels"
    assert cpu_kernels() == torch.backends.cpu.get_cpu_capability()
    assert machine("mps") == "mps (Apple GPU)"


def test_a_forced_kernel_path_gets_its_own_compile_cache():
    import os
    import subprocess
    import sys
    code = "import os, efficientml; print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    run = lambda extra: subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout.strip()
    assert run({"ATEN_CPU_CAPABILITY": "avx2"}).endswith("-avx2")
    assert run({"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": "/x/y"}) == "/x/y"   # an explicit one wins
    assert "-" not in run({}).rsplit("torchinductor_", 1)[-1]   # no path forced: torch's own folder
