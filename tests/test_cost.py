"""Chapter 7's measuring tools: counts against hand computations, the roofline's arithmetic,
low-precision rounding, the profiler's phases, nanoGPT's reimplementation, the benchmark CLI.
Times are never compared here (noisy machines); only that they are measured and positive."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efficientml import cost
from efficientml.bench import main as bench_main
from efficientml.models import ConvNet, count_macs
from efficientml.nanogpt import NanoGPT, nanogpt_optimizer, nanogpt_step
from efficientml.transformer import LanguageModel, MatmulCounter


def test_gemm_counts_by_hand():
    assert cost.gemm_flops(2, 3, 4) == 48
    assert cost.gemm_bytes(2, 3, 4) == 4 * (8 + 12 + 6)
    assert cost.gemm_bytes(2, 3, 4, bytes_per_element=2) == 2 * 26


def test_check_gemm_intensity_accepts_the_formula_and_names_a_wrong_one(capsys):
    cost.check_gemm_intensity(lambda m, n, k, b=4: 2 * m * n * k / (b * (m * k + k * n + m * n)))
    assert "all 6 shapes" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"gemm_intensity\(1, 1, 1, 4\)"):
        cost.check_gemm_intensity(lambda m, n, k, b=4: m * n * k / (b * (m * k + k * n + m * n)))
    with pytest.raises(AssertionError, match="expected"):   # forgot the output's bytes
        cost.check_gemm_intensity(lambda m, n, k, b=4: 2 * m * n * k / (b * (m * k + k * n)))


def test_roofline_ridge_and_attainable():
    r = cost.Roofline(peak_flops=100e9, bandwidth=20e9, threads=2, device="cpu")
    assert r.ridge == 5.0
    assert r.attainable(1.0) == 20e9 and r.attainable(5.0) == 100e9 and r.attainable(50.0) == 100e9
    with pytest.raises(ValueError, match="intensity"):
        r.attainable(-1.0)


def test_work_counter_linear_conv_and_batched_products_by_hand():
    lin, x = nn.Linear(4, 3), torch.randn(2, 4)
    with cost.WorkCounter() as w:
        lin(x)
    assert (w.calls, w.flops, w.bytes) == (1, 2 * 2 * 4 * 3, 4 * (8 + 12 + 6))
    conv, img = nn.Conv2d(2, 5, 3, padding=1, bias=False), torch.randn(1, 2, 6, 6)
    with cost.WorkCounter() as w:
        conv(img)
    out = 5 * 6 * 6
    assert w.flops == 2 * out * 2 * 9 and w.bytes == 4 * (2 * 36 + 5 * 2 * 9 + out)
    a, b = torch.randn(3, 2, 5), torch.randn(3, 5, 4)
    with cost.WorkCounter() as w:
        a @ b
        torch.bmm(a, b)
    assert w.calls == 2 and w.flops == 2 * (2 * 3 * 2 * 5 * 4)
    assert w.intensity == w.flops / w.bytes


def test_work_counter_flops_are_twice_the_matmul_counters_macs():
    torch.manual_seed(0)
    lm = LanguageModel(65, 32, 2, 2, 64, max_len=16).eval()
    tokens = torch.randint(0, 65, (2, 16))
    with torch.no_grad(), MatmulCounter() as c:
        lm(tokens)
    with torch.no_grad(), cost.WorkCounter() as w:
        lm(tokens)
    assert w.flops == 2 * c.macs and w.calls == c.calls


def test_training_flops_leave_out_the_first_layers_input_gradient():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert cost.training_flops(mlp, (4,)) == 6 * (12 + 6) - 2 * 12
    conv = ConvNet(1, 10, width=0.25)
    first = next(m for m in conv.modules() if isinstance(m, nn.Conv2d))
    first_macs = 28 * 28 * first.out_channels * first.in_channels * 9   # padding 1: 28 x 28 out
    assert cost.training_flops(conv, (1, 28, 28)) == 6 * count_macs(conv, (1, 28, 28)) - 2 * first_macs


def test_running_sums_round_as_their_dtypes():
    values = torch.full((10_000,), 1e-4)
    assert cost.running_sum(values, torch.float16) == 0.25      # spacing 2^-12 above 0.25
    assert cost.running_sum(values, torch.bfloat16) == 0.03125  # spacing 2^-12 above 2^-5
    assert abs(cost.running_sum(values, torch.float32) - 1.0) < 1e-3
    assert cost.running_sum(values[:3], torch.float64) == 3 * float(values[0])  # exact in float64


def test_underflow_and_overflow_of_a_cast():
    g = [torch.tensor([1e-9, 1e-3]), torch.tensor([1e4, 0.0])]   # the zero is not counted
    assert cost.underflow(g, torch.float16) == {"underflow": pytest.approx(1 / 3), "overflow": 0.0}
    scaled = cost.underflow(g, torch.float16, scale=2.0 ** 16)  # 1e-9 lifted, 1e4 past 65504
    assert scaled == {"underflow": 0.0, "overflow": pytest.approx(1 / 3)}
    assert cost.underflow(g, torch.bfloat16) == {"underflow": 0.0, "overflow": 0.0}
    with pytest.raises(ValueError, match="nonzero"):
        cost.underflow([torch.zeros(3)])


def test_measure_and_single_timings_report_positive_times():
    a = torch.randn(64, 64)
    m = cost.measure(lambda: a @ a, min_run_time=0.05, threads=1)
    assert m.median > 0 and m.number_per_run >= 1
    t = cost.single_timings(lambda: a @ a, n=3)
    assert len(t) == 3 and all(x > 0 for x in t)


def test_workload_counts_then_times():
    lin, x = nn.Linear(8, 8), torch.randn(4, 8)
    w = cost.workload("linear", lambda: lin(x), min_run_time=0.05)
    assert w.flops == 2 * 4 * 8 * 8 and w.seconds > 0 and w.flops_per_s == w.flops / w.seconds


def test_profile_step_labels_the_phases_of_a_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    before = model[0].weight.detach().clone()
    p = cost.profile_step(cost.train_step(model, opt, x, y, clip=1.0), steps=2, top=3)
    assert set(p["phases"]) == {"forward", "backward", "optimizer"}
    assert len(p["top"]) == 3 and all(name.startswith("aten::") for name, *_ in p["top"])
    assert sum(share for *_, share, _ in p["top"]) <= 1.0
    assert "aten::addmm" in p["ops"]
    assert not torch.equal(before, model[0].weight)   # the steps trained


def test_training_speed_utilization():
    s = cost.TrainingSpeed("x", items=100, flops_per_item=10, seconds=0.5, unit="images")
    assert s.items_per_s == 200 and s.flops_per_s == 2000 and s.utilization(4000) == 0.5


def test_nanogpt_parameters_tying_and_causality():
    torch.manual_seed(0)
    v, d, h, n, t = 65, 32, 4, 2, 16
    model = NanoGPT(v, d, h, n, block_size=t)
    assert model.wte.weight is model.head.weight
    per_layer = 2 * d + 3 * d * d + d * d + 4 * d * d + 4 * d * d
    assert sum(p.numel() for p in model.parameters()) == v * d + t * d + n * per_layer + d
    x = torch.randint(0, v, (2, t))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % v                      # change only the future
    assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])
    decayed, not_decayed = nanogpt_optimizer(model).param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in not_decayed["params"]) and not_decayed["weight_decay"] == 0.0


def test_nanogpt_step_learns_a_repeated_batch():
    torch.manual_seed(0)
    model = NanoGPT(65, 32, 4, 2, block_size=16)
    opt = nanogpt_optimizer(model, lr=1e-2)
    x, y = torch.randint(0, 65, (4, 16)), torch.randint(0, 65, (4, 16))
    losses = [nanogpt_step(model, opt, x, y) for _ in range(30)]
    assert losses[0] > math.log(65) - 0.5 and losses[-1] < losses[0] / 2


def test_against_nanogpt_reports_both_steps():
    r = cost.against_nanogpt(rounds=1, steps=1)
    assert set(r["median_ms"]) == {"book", "book, AdamW per tensor", "nanoGPT"} and r["ratio"] > 0
    assert r["ratio"] == r["median_ms"]["book"] / r["median_ms"]["nanoGPT"]
    assert r["parameters"]["book"] == sum(p.numel() for p in LanguageModel(65, 128, 4, 4, 512).parameters())


def test_compile_speedup_times_both_and_compares_outputs():
    f = lambda: torch.ones(3) * 2                      # noqa: E731
    g = lambda: torch.ones(3) * 2 + 1e-3               # noqa: E731
    r = cost.compile_speedup(f, g, min_run_time=0.02)
    assert r["first_call_s"] > 0 and r["eager_s"] > 0 and r["compiled_s"] > 0
    assert r["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_bench_cli_roofline_and_train_print_their_figures(capsys, monkeypatch):
    monkeypatch.setattr(cost, "measure_roofline",
                        lambda threads=None, device=None, n=2048: cost.Roofline(1e11, 2e10, threads or 1, "cpu"))
    monkeypatch.setattr(cost, "training_speeds", lambda device=None: [
        cost.TrainingSpeed("ConvNet (Chapter 1)", 128, 10 ** 6, 0.5, "images")])
    assert bench_main(["train"]) == 0
    out = capsys.readouterr().out
    assert "peak     100.0 GFLOP/s" in out and "ridge    5.0 FLOP/byte" in out
    assert "256 images/s" in out and "utilization   0.3% of the measured peak" in out


def test_language_model_step_fuses_adamw_unless_asked_for_the_loop():
    """The book's step (Chapter 7's timing) uses make_optimizer's fused AdamW, as fit does; the
    per-tensor variant is PyTorch's for-loop AdamW; both train the same model from the same start."""
    step, model, _ = cost.language_model_step()
    loop, model_loop, _ = cost.language_model_step(adamw_loop=True)
    for a, b in zip(model.parameters(), model_loop.parameters()):
        assert torch.equal(a, b)
    la, lb = step(), loop()
    assert la == lb  # the same first forward pass
    step(), loop()
    # Adam divides by the root of the squared gradients, so where a gradient is near zero the
    # two roundings can move a weight differently (seen: one of 16,384 by 1.6e-5 with AVX2
    # kernels): nearly every weight agrees to 1e-5, and none by more than two steps of lr 1e-3.
    for a, b in zip(model.parameters(), model_loop.parameters()):
        diff = (a - b).abs()
        assert (diff > 1e-5).double().mean() < 0.01 and diff.max() < 4e-3
