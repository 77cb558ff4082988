import io
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from efficientml import load_dataset, seed_everything
from efficientml.reproducibility import apply_threads


# CI (.ci/run sets CI=true) tries the same Hypothesis examples on every run, so that a property
# fails on the commit that broke it, not at random on a later one; other runs (a developer's,
# `make test-other-kernels`) draw new examples and keep looking.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config):
    apply_threads()  # $EFFICIENTML_THREADS if set (CI: 2), else torch's choice


@pytest.fixture
def written_on_cuda(monkeypatch):
    """``written_on_cuda(save)``: what ``save(f)`` writes, with every storage tagged as a CUDA
    one, as on a GPU: loading it without ``map_location`` on a machine without CUDA raises."""
    def write(save) -> io.BytesIO:
        buf = io.BytesIO()
        with monkeypatch.context() as m:
            m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            save(buf)
        buf.seek(0)
        return buf
    return write


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder. Unset EFFICIENTML_DATA skips; set but wrong fails (CI sets it)."""
    root = os.environ.get("EFFICIENTML_DATA")
    if not root:
        pytest.skip("EFFICIENTML_DATA is not set (make test sets it to ../shared/data)")
    return Path(root)


@pytest.fixture(scope="session")
def fashion_train(data_dir):
    return load_dataset("fashion-mnist", train=True, root=data_dir)


@pytest.fixture(scope="session")
def fashion_test(data_dir):
    return load_dataset("fashion-mnist", train=False, root=data_dir)


@pytest.fixture
def seeded():
    seed_everything(0)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _unit_tests_record_nowhere(monkeypatch):
    """make test-other-kernels collects the chapters' records and claims through
    EFFICIENTML_RECORD_DIR, with EFFICIENTML_CHECK=off so that every one is measured; the unit
    tests' own demonstration records stay out of that folder, and they check as they do by
    default (a test that wants ``off`` sets it itself)."""
    monkeypatch.delenv("EFFICIENTML_RECORD_DIR", raising=False)
    monkeypatch.delenv("EFFICIENTML_CHECK", raising=False)
