import pytest
import torch
from torch import nn

from efficientml import MLP, bench
from efficientml.quantization import dynamic_int8


def test_latency_moves_the_input_to_the_models_device():
    model = nn.Linear(4, 2, device="meta")  # stands for a model on a GPU; the input is on the CPU
    assert bench.model_device(model).type == "meta"
    assert bench.latency(model, torch.randn(3, 4), repeat=3, warmup=1) >= 0


def test_latency_of_a_model_without_parameters_runs_on_the_cpu():
    int8 = dynamic_int8(MLP(20, (8,), 3))
    assert bench.model_device(int8) == torch.device("cpu")
    assert bench.latency(int8, torch.randn(5, 20), repeat=3, warmup=0) > 0


def test_latency_waits_for_the_device_around_every_timing(monkeypatch):
    model = nn.Linear(4, 2)
    events = []
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append(("sync", torch.device(device))))
    model.register_forward_hook(lambda *args: events.append(("forward",)))
    bench.latency(model, torch.randn(3, 4), repeat=2, warmup=1)
    sync = ("sync", torch.device("cpu"))
    assert events == [("forward",)] + [sync, ("forward",), sync] * 2
    with pytest.raises(ValueError):
        bench.latency(model, torch.randn(3, 4), repeat=0)


@pytest.mark.parametrize("device, called", [("cuda", "cuda"), ("cuda:0", "cuda"), ("mps", "mps"), ("cpu", None)])
def test_synchronize_waits_for_cuda_and_mps(monkeypatch, device, called):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: seen.append("mps"))
    bench.synchronize(device)
    assert seen == ([called] if called else [])


class _Clock:
    def __init__(self, events):
        self.events, self.t = events, 0.0

    def perf_counter(self):
        self.events.append("clock")
        self.t += 1.0
        return self.t


def test_bench_generation_synchronizes_before_reading_the_clock(monkeypatch):
    from efficientml.transformer import LanguageModel
    torch.manual_seed(0)
    model = LanguageModel(11, 8, 2, 1, 16, max_len=8)
    events = []
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(bench, "time", _Clock(events))
    r = bench.bench_generation(model, n_tokens=3, repeat=2)
    assert events == ["sync", "clock"] * 2 * 2 * 2  # (start, stop) x repeat x (without, with cache)
    assert r["same_tokens"] and r["n_tokens"] == 3
