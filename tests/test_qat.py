import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from device_checks import implicit_device_trap, no_float64

from efficientml import MLP, TensorLoader, evaluate, fit
from efficientml.experiments.qat import integer_inference_summary, qat_finetune
from efficientml.qat import (FakeQuant, IntegerMLP, calibrate, convert_qat, fake_quant_forward, fake_quantize,
                             fixed_point_multiplier, prepare_qat, quantize_activation, requantize,
                             round_half_away)
from efficientml.quantization import dequantize, dequantized_model, quantize


def _small_convnet():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _bn_convnet():
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


# -- fake quantization and QAT -----------------------------------------------------------------------

@pytest.mark.parametrize("axis", [None, 0])
def test_fake_quantize_forward_is_the_round_trip_and_backward_the_identity(axis):
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    out = fake_quantize(w, 3, axis)
    assert torch.equal(out, dequantize(quantize(w.detach(), 3, axis)))
    assert not torch.equal(out, w)                      # it really rounds
    g = torch.randn(6, 5)
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)                       # straight through


@pytest.mark.parametrize("make", [lambda: MLP(64, (16, 8), 5), _small_convnet], ids=["mlp", "convnet"])
@pytest.mark.parametrize("bits, per_channel", [(2, False), (2, True), (4, False), (8, True)])
def test_prepared_model_computes_exactly_the_dequantized_model(make, bits, per_channel):
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat = prepare_qat(model, bits, per_channel)
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(qat(x), dequantized_model(model, bits, per_channel)(x))
    # a deep copy: the float model is neither changed nor parametrized
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for m in qat.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fq_w, fq_b = m.parametrizations.weight[0], m.parametrizations.bias[0]
            assert isinstance(fq_w, FakeQuant) and fq_w.bits == bits
            assert fq_w.axis == (0 if per_channel else None) and fq_b.axis is None   # 1-D: per tensor


@pytest.mark.parametrize("per_channel", [False, True])
def test_qat_gradients_reach_the_master_weights_straight_through(per_channel):
    torch.manual_seed(0)
    model = MLP(64, (16,), 5)
    qat, deq = prepare_qat(model, 2, per_channel), dequantized_model(model, 2, per_channel)
    x, y = torch.randn(9, 64), torch.randint(0, 5, (9,))
    F.cross_entropy(qat(x), y).backward()
    F.cross_entropy(deq(x), y).backward()
    for (name, p), (_, p_deq) in zip(sorted(qat.named_parameters()), sorted(deq.named_parameters())):
        assert name.endswith(".original") and p.grad is not None
        assert torch.equal(p.grad, p_deq.grad), name    # the gradient of the quantized model, at the masters


def test_prepare_qat_leaves_batchnorm_alone():
    torch.manual_seed(0)
    model = _bn_convnet()
    qat = prepare_qat(model, 4)
    bn, bn0 = qat[1], model[1]
    assert not parametrize.is_parametrized(bn)
    assert all(torch.equal(a, b) for a, b in zip(bn.state_dict().values(), bn0.state_dict().values()))
    assert parametrize.is_parametrized(qat[0], "weight") and qat[0].bias is None
    assert parametrize.is_parametrized(qat[4], "weight") and parametrize.is_parametrized(qat[4], "bias")


def test_convert_qat_keeps_the_trained_master_weights():
    torch.manual_seed(0)
    model = MLP(64, (16,), 5)
    qat = prepare_qat(model, 3)
    opt = torch.optim.SGD(qat.parameters(), lr=0.5)
    x, y = torch.randn(32, 64), torch.randint(0, 5, (32,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(qat(x), y).backward()
        opt.step()
    masters = {n.replace("parametrizations.", "").replace(".original", ""): p
               for n, p in qat.named_parameters()}
    out = qat(x)
    plain = convert_qat(qat)
    assert plain is qat                                                 # in place
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert plain.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(masters[k], v) for k, v in plain.state_dict().items())
    assert not torch.equal(plain.net[1].weight, model.net[1].weight)   # training moved them
    assert torch.equal(dequantized_model(plain, 3)(x), out)             # PTQ of the masters = the QAT model


def test_qat_errors():
    with pytest.raises(TypeError):
        prepare_qat("not a model", 4)
    with pytest.raises(ValueError):
        prepare_qat(nn.Sequential(nn.ReLU()), 4)
    with pytest.raises(ValueError):
        prepare_qat(MLP(4, (3,), 2), 0)
    with pytest.raises(TypeError):
        prepare_qat(MLP(4, (3,), 2), 2.0)
    with pytest.raises(ValueError):
        prepare_qat(prepare_qat(MLP(4, (3,), 2), 4), 4)
    with pytest.raises(ValueError):
        convert_qat(MLP(4, (3,), 2))
    with pytest.raises(ValueError):
        FakeQuant(1, symmetric=True)


# -- integer arithmetic --------------------------------------------------------------------------

def test_round_half_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, -0.49999997, 1.4, -1.6])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3, 0, 0, 1, -2]
    assert quantize_activation(torch.tensor([1000.0, -1000.0, 0.26]), 0.1).tolist() == [127, -127, 3]


def test_fixed_point_multiplier_approximates_m_to_2_to_the_minus_31():
    g = torch.Generator().manual_seed(0)
    m = torch.cat([torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-22, 20, generator=g)),
                   torch.tensor([2.0 ** -32, 0.5, 1.0, 1 - 2.0 ** -40, 2.0 ** 30 - 1, 0.05],
                                dtype=torch.float64)])
    m0, shift = fixed_point_multiplier(m)
    assert m0.dtype == shift.dtype == torch.int64
    assert ((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all() and ((shift >= 1) & (shift <= 62)).all()
    approx = m0.to(torch.float64) * torch.pow(2.0, -shift.to(torch.float64))   # exact in float64 (m0 < 2**53)
    assert ((approx - m).abs() <= m * 2.0 ** -31).all()
    assert m0[-4].item() == 2 ** 30 and shift[-4].item() == 30                     # 1 - 2**-40 rounds up to 1
    for bad in (0.0, -0.1, float("inf"), 2.0 ** 30, 2.0 ** -33):
        with pytest.raises(ValueError):
            fixed_point_multiplier(torch.tensor([bad]))


def test_requantize_is_exact_rounding_half_away_from_zero():
    rng = random.Random(0)
    acc = [rng.randint(-2 ** 31 + 1, 2 ** 31 - 1) for _ in range(150)]
    acc += [rng.randint(-5000, 5000) for _ in range(150)]
    acc += [6, -6, 10, -10]                          # with M = 0.25: exact ties 1.5 -> 2 and -2.5 -> -3
    m0 = [rng.randint(2 ** 30, 2 ** 31 - 1) for _ in acc[:-4]] + [2 ** 30] * 4
    shift = [rng.randint(31, 62) for _ in acc[:-4]] + [32] * 4
    got = requantize(torch.tensor(acc, dtype=torch.int32)[None], torch.tensor(m0), torch.tensor(shift))
    for a, m, s, r in zip(acc, m0, shift, got.flatten().tolist()):
        exact = Fraction(a * m, 2 ** s)
        expected = int(abs(exact) + Fraction(1, 2)) * (1 if exact >= 0 else -1)
        assert r == expected
    assert got.flatten().tolist()[-4:] == [2, -2, 3, -3]


def test_hand_computed_two_by_two_example():
    """x = (3.2, -1.1) through Linear(2, 2), ReLU, Linear(2, 2), every code worked out by hand."""
    mlp = MLP(2, (2,), 2)
    with torch.no_grad():
        mlp.net[1].weight.copy_(torch.tensor([[1.27, -0.63], [0.26, 2.54]]))   # s_w = (0.01, 0.02)
        mlp.net[1].bias.copy_(torch.tensor([0.013, -0.05]))
        mlp.net[3].weight.copy_(torch.tensor([[1.27, 0.5], [-0.3, 0.635]]))    # s_w = (0.01, 0.005)
        mlp.net[3].bias.copy_(torch.tensor([0.1, -0.02]))
    act = {"net.1": 63.5, "net.3": 12.7}                                         # s_x = 0.5, then 0.1
    im = IntegerMLP.from_float(mlp, act)
    l1, l2 = im.layers
    assert l1.weight.tolist() == [[127, -63], [13, 127]]
    assert l1.bias.tolist() == [3, -5]                                          # 0.013 / 0.005 = 2.6 -> 3
    assert l2.weight.tolist() == [[127, 50], [-60, 127]] and l2.bias.tolist() == [100, -40]
    assert l1.weight.dtype == torch.int8 and l1.bias.dtype == torch.int32
    # M = s_w * s_x / s_next = (0.05, 0.1)
    m = l1.m0.to(torch.float64) * torch.pow(2.0, -l1.shift.to(torch.float64))
    torch.testing.assert_close(m, l1.weight_scale * 0.5 / 0.1, rtol=2.0 ** -31, atol=0)
    torch.testing.assert_close(m, torch.tensor([0.05, 0.1], dtype=torch.float64))  # s_w is float32: 1e-7 off
    x = torch.tensor([[3.2, -1.1]])
    (x1, acc1), (x2, acc2) = im.trace(x)
    assert x1.tolist() == [[6, -2]]                        # round(6.4), round(-2.2)
    assert acc1.tolist() == [[891, -181]]                  # 127*6 + 63*2 + 3, 13*6 - 127*2 - 5
    assert x2.tolist() == [[45, 0]]                        # round(891 * 0.05 = 44.55), ReLU(round(-18.1))
    assert acc2.tolist() == [[5815, -2740]]                # 127*45 + 100, -60*45 - 40
    torch.testing.assert_close(im(x), torch.tensor([[5.815, -1.37]]))  # 0.01*0.1*5815, 0.005*0.1*(-2740)
    torch.testing.assert_close(fake_quant_forward(mlp, act, x), im(x))


def _random_mlp_and_calibration():
    torch.manual_seed(0)
    mlp = MLP(784, (256, 128), 10)
    x = torch.randn(1000, 1, 28, 28)
    act = calibrate(mlp, [(x[i:i + 100], None) for i in range(0, 1000, 100)], n_batches=10)
    return mlp, act, x


def _logit_tolerance(mlp, act, flips: int = 2) -> float:
    """``flips`` last-layer input codes one step off: each moves a logit by at most s_x * max|w|."""
    return flips * act["net.5"] / 127 * mlp.net[5].weight.abs().max().item()


def test_calibrate_records_the_max_abs_input_of_every_linear():
    mlp, act, x = _random_mlp_and_calibration()
    assert sorted(act) == ["net.1", "net.3", "net.5"]
    assert act["net.1"] == x.abs().max().item()
    with torch.no_grad():
        assert act["net.3"] == mlp.net[:3](x).abs().max().item()
    assert mlp.training                                    # mode restored
    batches = [(x[i:i + 100], None) for i in range(0, 1000, 100)]
    assert calibrate(mlp, batches, n_batches=1)["net.1"] == x[:100].abs().max().item()
    with pytest.raises(ValueError):
        calibrate(mlp, [], 1)
    with pytest.raises(ValueError):
        calibrate(nn.Sequential(nn.ReLU()), [(x, None)], 1)


def test_integer_mlp_agrees_with_the_fake_quant_reference_on_random_inputs():
    mlp, act, _ = _random_mlp_and_calibration()
    im = IntegerMLP.from_float(mlp, act)
    x = 1.2 * torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(1))  # some saturate
    logits = im(x)
    ref32, ref64 = fake_quant_forward(mlp, act, x), fake_quant_forward(mlp, act, x, torch.float64)
    assert logits.dtype == torch.float32 and logits.shape == (1000, 10)
    assert (logits.argmax(1) == ref32.argmax(1)).float().mean() >= 0.99
    assert (logits - ref32).abs().max() <= _logit_tolerance(mlp, act)
    # in float64 the reference is exact but for the output's float32 rounding
    assert (logits - ref64).abs().max() <= 1e-6 * ref64.abs().max()
    # and the fake-quant model is close to fp32 (8-bit weights and activations)
    with torch.no_grad():
        assert (logits.argmax(1) == mlp(x).argmax(1)).float().mean() >= 0.95


def test_integer_mlp_stays_in_int8_and_int32():
    mlp, act, _ = _random_mlp_and_calibration()
    im = IntegerMLP.from_float(mlp, act)
    first = im.layers[0]
    # the worst input for each output channel: every code +-127 with its weight's sign
    worst = 127 * torch.sign(first.weight.to(torch.float32)) * first.input_scale
    x = torch.cat([100 * torch.randn(200, 784), worst, -worst])
    for i, (x_q, acc) in enumerate(im.trace(x)):
        layer = im.layers[i]
        assert x_q.dtype == torch.int8 and x_q.min() >= -127 and x_q.max() <= 127   # -128 is never used
        if i > 0:
            assert x_q.min() >= 0                          # after ReLU
        assert acc.dtype == torch.int32
        assert layer.accumulator_bound < 2 ** 31 and acc.abs().max() <= layer.accumulator_bound
        exact = x_q.to(torch.int64) @ layer.weight.to(torch.int64).T + layer.bias.to(torch.int64)
        assert torch.equal(acc.to(torch.int64), exact)     # the int32 product did not wrap around
    # the worst input reaches channel 0's bound: 127 * sum |w_q| + b_q
    acc0 = im.trace(worst[:1])[0][1][0, 0].item()
    assert acc0 == 127 * first.weight[0].to(torch.int64).abs().sum().item() + first.bias[0].item()


def test_integer_mlp_errors():
    mlp, act, _ = _random_mlp_and_calibration()
    with pytest.raises(TypeError):
        IntegerMLP.from_float(_small_convnet(), act)
    with pytest.raises(ValueError):
        IntegerMLP.from_float(mlp, {k: v for k, v in act.items() if k != "net.3"})
    with pytest.raises(ValueError):
        IntegerMLP.from_float(mlp, act | {"net.1": 0.0})
    with pytest.raises(ValueError):
        fake_quant_forward(mlp, {}, torch.zeros(1, 784))


# -- on Fashion-MNIST --------------------------------------------------------------------------------

def test_qat_recovers_two_bit_accuracy_and_integer_inference_agrees(fashion_train, fashion_test, seeded):
    train = TensorLoader(fashion_train.subset(300, seed=0), 100, shuffle=True, device="cpu", seed=0)
    test = TensorLoader(fashion_test.subset(100, seed=0), 1000, device="cpu")
    model = MLP(784, (256, 128), 10)
    fit(model, train, epochs=10, lr=0.05, device="cpu", progress=False)  # 2-bit PTQ collapses after 10
    fp32 = evaluate(model, test)[1]
    ptq = evaluate(dequantized_model(model, 2), test)[1]
    qmodel, hist = qat_finetune(model, train, test, 2, epochs=1, lr=0.01, device="cpu", progress=False)
    qat = evaluate(qmodel, test)[1]
    assert hist.test_acc[-1] == qat                       # the returned model is the one QAT evaluated
    assert qat > ptq + 0.2 and qat > fp32 - 0.08, (fp32, ptq, qat)   # measured: 0.825, 0.346, 0.799

    summary = integer_inference_summary(model, train, test)
    assert summary["agreement"] >= 0.99
    assert abs(summary["integer_acc"] - summary["fake_quant_acc"]) <= 0.01
    assert abs(summary["integer_acc"] - summary["fp32_acc"]) <= 0.02
    assert summary["max_logit_diff"] <= _logit_tolerance(model, summary["act_absmax"])


# -- devices: QAT on the training device, integer inference on the CPU -------------------------------

@pytest.mark.parametrize("per_channel", [False, True])
def test_qat_training_path_makes_no_float64_and_no_stray_device(per_channel):
    torch.manual_seed(0)
    qat = prepare_qat(_bn_convnet(), 4, per_channel)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 4])
    with implicit_device_trap(), no_float64():  # what fit runs on a GPU or an Apple GPU
        F.cross_entropy(qat(x), y).backward()
        act = calibrate(qat, [(x, y)], 1)
    assert all(p.grad is not None for p in qat.parameters()) and sorted(act) == ["4"]


def test_integer_mlp_is_built_and_run_on_the_cpu():
    mlp, act, x = _random_mlp_and_calibration()
    ref = IntegerMLP.from_float(mlp, act)(x[:50])
    with implicit_device_trap():
        im = IntegerMLP.from_float(mlp, act)
        logits = im(x[:50])
    assert logits.device.type == "cpu" and torch.equal(logits, ref)
    assert all(b.device.type == "cpu" for b in im.buffers())
    m0, shift = fixed_point_multiplier(torch.tensor([0.3, 1e-3], dtype=torch.float32))
    assert m0.device.type == shift.device.type == "cpu" and m0.dtype == torch.int64
    exact = torch.tensor([0.3], dtype=torch.float64)
    assert torch.equal(fixed_point_multiplier([0.3])[0], fixed_point_multiplier(exact)[0])


def test_integer_mlp_off_the_cpu_says_it_runs_on_the_cpu():
    mlp, act, x = _random_mlp_and_calibration()
    im = IntegerMLP.from_float(mlp, act).to("meta")  # stands for an integer model moved to a GPU
    for f in (im, im.trace):
        with pytest.raises(ValueError, match="runs on the CPU"):
            f(x[:5])


def test_qat_over_seeds_runs_seed_after_seed_with_each_seeds_model(monkeypatch):
    from efficientml.experiments import qat as experiment
    calls = []

    def one_seed(model, s, bits_list, *args):
        calls.append((model, s["seed"]))
        return {"model": model}

    monkeypatch.setattr(experiment, "_qat_seed", one_seed)
    rows = experiment.qat_over_seeds(["m3", "m1", "m3b"], {"seeds": [3, 1, 3]}, [4])
    assert calls == [("m3", 3), ("m1", 1), ("m3b", 3)] and rows == [{"model": m} for m in ("m3", "m1", "m3b")]
    with pytest.raises(ValueError):
        experiment.qat_over_seeds(["m3"], {"seeds": [3, 1]}, [4])
