import copy

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from device_checks import implicit_device_trap, no_float64

from efficientml import ConvNet, TensorLoader, count_macs, count_parameters, evaluate, fit, seed_everything
from efficientml.experiments import EXPERIMENTS
from efficientml.experiments.pruning import (METHODS, _PruneDuring, calibration_batches, gradual_targets,
                                             plot_sensitivity, plot_sparsity_sweep, sensitivity_scans,
                                             sensitivity_vs_uniform,
                                             sparsity_sweeps, sweep_spreads, sweep_table)
from efficientml.pruning import (PruningSchedule, SparseConv2d, SparseConvNet, choose_sparsities, compact,
                                 conv_as_matmul, filter_l1_pruning, n_m_mask, n_m_pruning, n_m_storage,
                                 overall_sparsity, pruner, recalibrate_batchnorm, sensitivity_scan, sparse_layers,
                                 two_four_pruning, unstructured_pruning)


def _conv(seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(8, 16, 3, padding=1)


def test_mask_shapes_and_drop_in_equality():
    conv = _conv()
    s_f, s_w = SparseConv2d.from_conv(conv, "filter"), SparseConv2d.from_conv(conv, "weight")
    assert s_f.mask.shape == (16, 1, 1, 1) and s_w.mask.shape == (16, 8, 3, 3)
    assert "mask" in dict(s_f.named_buffers()) and "mask" not in dict(s_f.named_parameters())
    x = torch.randn(2, 8, 10, 10)
    assert torch.equal(s_f(x), conv(x)) and torch.equal(s_w(x), conv(x))
    with pytest.raises(ValueError):
        SparseConv2d(3, 4, 3, granularity="channel")


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_unstructured_selects_the_weights_torch_prune_selects(p):
    conv = _conv(1)
    ours = SparseConv2d.from_conv(conv, "weight")
    unstructured_pruning(nn.Sequential(ours), p)
    tprune.l1_unstructured(conv, "weight", amount=p)
    assert torch.equal(ours.mask, conv.weight_mask)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_filter_l1_selects_the_filters_ln_structured_selects(p):
    conv = _conv(2)
    ours = SparseConv2d.from_conv(conv, "filter")
    filter_l1_pruning(nn.Sequential(ours), p)
    tprune.ln_structured(conv, "weight", amount=p, n=1, dim=0)
    assert torch.equal(ours.mask.view(-1), conv.weight_mask[:, 0, 0, 0])


def test_filter_importance_is_the_sum_of_absolute_weights():
    conv2 = SparseConv2d(2, 3, 1, bias=False)
    with torch.no_grad():  # filter 0: plain sum 0 but L1 norm 2; filter 1: L1 norm 1; filter 2: L1 norm 3
        conv2.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.5], [1.5, 1.5]]).view(3, 2, 1, 1))
    filter_l1_pruning(nn.Sequential(conv2), 1 / 3)
    assert conv2.mask.view(-1).tolist() == [1.0, 0.0, 1.0]  # a plain sum would have pruned filter 0


def test_pruned_stays_pruned_and_percent_is_cumulative():
    conv = SparseConv2d.from_conv(_conv(3), "filter")
    net = nn.Sequential(conv)
    filter_l1_pruning(net, 0.25)
    first = conv.mask.clone()
    with torch.no_grad():
        conv.weight.mul_(-100)  # make the pruned filters' raw weights the largest of all
    filter_l1_pruning(net, 0.5)
    assert conv.sparsity() == 0.5
    assert (conv.mask <= first).all()  # every filter pruned before is still pruned
    assert filter_l1_pruning(net, 0.25) == {"0": 0.5}  # a lower target prunes nothing more, revives nothing


@pytest.mark.parametrize("bad, err", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                      ("0.5", TypeError), (True, TypeError)])
def test_bad_prune_percent_rejected(bad, err):
    net = nn.Sequential(SparseConv2d(3, 4, 3), SparseConv2d(4, 4, 3, granularity="weight"))
    with pytest.raises(err):
        filter_l1_pruning(net, bad)
    with pytest.raises(err):
        unstructured_pruning(net, bad)


def test_pruning_needs_matching_layers():
    with pytest.raises(ValueError, match="no filter-granularity"):
        filter_l1_pruning(nn.Sequential(nn.Conv2d(3, 4, 3)), 0.5)
    with pytest.raises(ValueError, match="no weight-granularity"):
        unstructured_pruning(SparseConvNet(1, 10, 0.25, "filter"), 0.5)


@pytest.fixture(scope="module")
def tiny(fashion_train, fashion_test):
    return fashion_train.subset(20, seed=0), fashion_test.subset(10, seed=0)


@pytest.mark.parametrize("granularity, prune", [("filter", filter_l1_pruning), ("weight", unstructured_pruning)])
def test_masked_weights_stay_exactly_zero_through_training(tiny, granularity, prune):
    seed_everything(0)
    net = SparseConvNet(1, 10, 0.25, granularity)
    prune(net, 0.5)
    masks = {n: m.mask.clone() for n, m in sparse_layers(net).items()}
    fit(net, TensorLoader(tiny[0], 50, shuffle=True), None, epochs=2, lr=0.1, device="cpu", progress=False)
    for name, m in sparse_layers(net).items():
        assert torch.equal(m.mask, masks[name])
        eff = m.effective_weight()
        assert (eff[m.mask.expand_as(eff) == 0] == 0).all()
        assert (m.weight.grad[m.mask.expand_as(eff) == 0] == 0).all()  # the gradient is masked too
    if granularity == "filter":  # a pruned filter's channel carries exactly zero, BatchNorm included
        net.eval()
        x = next(iter(TensorLoader(tiny[1], 10)))[0]
        conv, bn, relu = net.features[0]
        out = relu(bn(conv(x)) * conv.mask.view(1, -1, 1, 1))
        assert (out[:, conv.mask.view(-1) == 0] == 0).all()


def test_unpruned_sparse_net_matches_convnet(tiny):
    train, test = tiny
    hists = []
    for cls in (ConvNet, lambda *a: SparseConvNet(*a, granularity="filter"), lambda *a: SparseConvNet(*a, granularity="weight")):
        seed_everything(0)
        net = cls(1, 10, 0.25)
        h = fit(net, TensorLoader(train, 50, shuffle=True, augment=True), TensorLoader(test, 100), epochs=2, lr=0.1,
                device="cpu", progress=False)
        hists.append((h.iter_loss, h.test_acc))
    assert hists[0] == hists[1] == hists[2]


def test_schedule_reaches_each_sparsity_at_its_epoch(tiny):
    seed_everything(0)
    net = SparseConvNet(1, 10, 0.5, "filter")
    sched = PruningSchedule("structured", start=1, every=1, stop=5, step=0.1)
    seen = {}
    def record(epoch, model, h):
        sched(epoch, model, h)
        seen[epoch] = {n: m.sparsity() for n, m in sparse_layers(model).items()}
    fit(net, TensorLoader(tiny[0], 50), None, epochs=6, lr=0.05, callback=record, device="cpu", progress=False)
    assert sched.epochs == [1, 2, 3, 4, 5] and [e for e, _ in sched.log] == [1, 2, 3, 4, 5]
    for epoch in range(1, 7):
        target = min(epoch, 5) / 10
        for name, m in sparse_layers(net).items():
            assert seen[epoch][name] == pytest.approx(round(target * m.out_channels) / m.out_channels)
    assert all(s == 0.5 for s in seen[6].values())
    assert net.classifier.weight.ne(0).all()  # the final linear layer is never pruned


def test_schedule_measures_accuracy_right_after_pruning_without_changing_training(tiny):
    train, test = tiny
    results = []
    for evaluate_on in (None, TensorLoader(test, 100)):
        seed_everything(0)
        net = SparseConvNet(1, 10, 0.25, "weight")
        sched = PruningSchedule("unstructured", start=1, every=1, stop=2, step=0.3, evaluate_on=evaluate_on)
        seen = []
        def callback(epoch, model, h):
            sched(epoch, model, h)
            if epoch in sched.epochs:  # what the schedule measured is the pruned model, before retraining
                seen.append(evaluate(model, TensorLoader(test, 100))[1])
        h = fit(net, TensorLoader(train, 50, shuffle=True, augment=True), TensorLoader(test, 100), epochs=3,
                lr=0.1, callback=callback, device="cpu", progress=False)
        results.append((h.iter_loss, h.test_acc, seen, sched.acc_after))
    assert results[0][3] == [] and len(results[1][3]) == 2
    assert results[1][3] == results[1][2]
    assert results[0][:3] == results[1][:3]  # evaluating after pruning changes nothing in training


def test_optimizer_moves_pruned_raw_weights_but_not_effective_ones():
    conv = SparseConv2d.from_conv(_conv(4), "weight")
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 8, 5, 5)
    for step in range(3):
        if step == 1:
            unstructured_pruning(nn.Sequential(conv), 0.5)
            pruned, raw = conv.mask == 0, conv.weight.detach().clone()
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    assert (conv.weight.grad[pruned] == 0).all()
    assert (conv.weight.detach() != raw)[pruned].all()  # momentum and weight decay move the raw weight
    assert (conv.effective_weight()[pruned] == 0).all()


def test_quick_profile_runs_every_seed():
    from efficientml.seeds import SEEDS
    assert EXPERIMENTS["pruning"].settings["quick"]["seeds"] == list(SEEDS)


def test_assignment_schedule_epochs():
    s = EXPERIMENTS["pruning"].settings["full"]
    sched = PruningSchedule("unstructured", s["prune_start"], s["prune_every"], s["prune_stop"], s["prune_step"])
    assert sched.epochs == [10, 20, 30, 40, 50]
    assert [sched.target(e) for e in (9, 10, 19, 20, 50, 100)] == [0.0, 0.1, 0.1, 0.2, 0.5, 0.5]
    q = EXPERIMENTS["pruning"].settings["quick"]  # the quick profile scales epochs and schedule together
    assert q["prune_start"] / q["epochs"] == s["prune_start"] / s["epochs"]
    assert q["prune_stop"] / q["epochs"] == s["prune_stop"] / s["epochs"]
    with pytest.raises(ValueError):
        PruningSchedule("random", 1, 1, 2)


def test_compacted_network_gives_the_same_outputs(tiny):
    seed_everything(0)
    net = SparseConvNet(1, 10, 0.5, "filter")
    fit(net, TensorLoader(tiny[0], 50), None, epochs=1, lr=0.05, device="cpu", progress=False)
    filter_l1_pruning(net, 0.5)
    net.eval()
    small = compact(net)
    x = next(iter(TensorLoader(tiny[1], 100)))[0]
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)
    widths = [16, 16, 32, 32, 32, 64, 64, 128, 128]  # ConvNet at width 0.5
    assert [b[0].out_channels for b in small.features] == [c - round(0.5 * c) for c in widths]
    assert count_parameters(small) < 0.3 * count_parameters(net)
    assert count_macs(small, (1, 28, 28)) < 0.3 * count_macs(net, (1, 28, 28))
    with pytest.raises(ValueError):
        compact(SparseConvNet(1, 10, 0.25, "weight"))


@pytest.mark.parametrize("layout", [None, torch.sparse_csr])
def test_conv_as_matmul_equals_the_convolution(layout):
    conv = SparseConv2d(8, 16, 3, padding=1, stride=2, bias=False, granularity="weight")
    unstructured_pruning(nn.Sequential(conv), 0.9)
    x = torch.randn(3, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv_as_matmul(conv, layout)(x), conv(x), atol=1e-5, rtol=1e-5)


# --- N:M (2:4) semi-structured sparsity ------------------------------------------------------------

def _n_m_reference(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A plain loop: in each row (output channel) of w, each group of m consecutive entries of the
    flattened row keeps its n largest |w|."""
    rows = w.reshape(w.shape[0], -1)
    keep = torch.zeros_like(rows)
    for o in range(rows.shape[0]):
        for g in range(0, rows.shape[1], m):
            group = [(abs(rows[o, g + j].item()), g + j) for j in range(m)]
            for _, j in sorted(group, reverse=True)[:n]:
                keep[o, j] = 1.0
    return keep.reshape(w.shape)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (4, 4)])
def test_n_m_mask_keeps_the_n_largest_of_every_m(n, m):
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)  # in*kh*kw = 72, a multiple of 4 and 8
    mask = n_m_mask(w.abs(), n, m)
    assert mask.shape == w.shape
    assert torch.equal(mask, _n_m_reference(w, n, m))
    assert (mask.reshape(6, -1, m).sum(-1) == n).all()


def test_two_four_pruning_of_a_net():
    torch.manual_seed(1)
    net = nn.Sequential(SparseConv2d(4, 8, 3, granularity="weight"), SparseConv2d(8, 8, 1, granularity="weight"),
                        SparseConv2d(8, 4, 3, granularity="filter"))
    raw = [m.weight.detach().clone() for m in net[:2]]
    assert two_four_pruning(net) == {"0": 0.5, "1": 0.5}  # filter-granularity layers are not N:M pruned
    assert net[2].sparsity() == 0.0
    for conv, w in zip(net[:2], raw):
        groups = conv.effective_weight().reshape(conv.out_channels, -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()  # exactly 2 of every 4 consecutive weights kept
        assert torch.equal(conv.mask, _n_m_reference(w, 2, 4))  # and they are the 2 largest of their group
        assert torch.equal(conv.weight, w)  # raw weights untouched


def test_n_m_pruning_keeps_what_was_pruned_pruned():
    torch.manual_seed(2)
    conv = SparseConv2d(4, 8, 3, granularity="weight")
    unstructured_pruning(nn.Sequential(conv), 0.3)
    before = conv.mask.clone()
    with torch.no_grad():
        conv.weight.mul_(torch.where(before == 0, 100.0, 1.0))  # pruned raw weights become the largest
    n_m_pruning(nn.Sequential(conv), 2, 4)
    assert (conv.mask <= before).all()
    assert ((conv.mask.reshape(8, -1, 4).sum(-1)) <= 2).all()


def test_n_m_pruning_rejects_bad_shapes_and_arguments():
    net = nn.Sequential(SparseConv2d(4, 8, 3, granularity="weight"), SparseConv2d(1, 4, 3, granularity="weight"))
    with pytest.raises(ValueError, match="multiple of 4"):  # 1*3*3 = 9 weights per output channel
        two_four_pruning(net)
    assert all(m.sparsity() == 0 for m in net)  # checked before anything was pruned
    assert two_four_pruning(net, skip_indivisible=True) == {"0": 0.5}
    assert net[1].sparsity() == 0
    with pytest.raises(ValueError, match="multiple of m"):
        n_m_mask(torch.randn(4, 9), 2, 4)
    with pytest.raises(ValueError):
        n_m_mask(torch.randn(8), 2, 4)
    for n, m, err in [(0, 4, ValueError), (5, 4, ValueError), (2.0, 4, TypeError), (True, 4, TypeError)]:
        with pytest.raises(err):
            n_m_pruning(net, n, m, skip_indivisible=True)
    with pytest.raises(ValueError, match="no weight-granularity"):
        two_four_pruning(nn.Sequential(SparseConv2d(4, 4, 3)))


def test_n_m_storage_by_hand():
    r = n_m_storage(1024, 2, 4, torch.float16)  # 512 kept values of 2 bytes, 512 indices of 2 bits
    assert (r["values"], r["metadata"], r["total"], r["dense"]) == (1024, 128, 1152, 2048)
    assert r["fraction"] == 0.5625
    assert n_m_storage(1024, 2, 4, torch.float32)["fraction"] == 0.53125
    assert n_m_storage(1024, 2, 4, torch.int8)["fraction"] == 0.625
    assert n_m_storage(1024, 1, 2, torch.float32)["metadata"] == 64  # 1-bit index of 512 kept values
    for bad in (0, 10, -4, 4.0):
        with pytest.raises(ValueError):
            n_m_storage(bad)
    with pytest.raises(TypeError):
        n_m_storage(1024, dtype="fp16")


# --- pruning a trained ConvNet: per-layer fractions, sensitivity --------------------------------------

def _trained_like_convnet(seed=0, width=0.25, channels=None):
    """A ConvNet with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    net = ConvNet(1, 10, width, channels)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def _synthetic_loader(seed=0, n=64, batch=32):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("granularity", ["filter", "weight"])
def test_from_convnet_computes_exactly_what_the_convnet_computes(granularity):
    x = torch.randn(8, 1, 12, 12)
    for dense in (_trained_like_convnet(), _trained_like_convnet(1, channels=[3, 4, 5, 6, 7, 8, 9, 10, 11])):
        rng = torch.get_rng_state()
        net = SparseConvNet.from_convnet(dense.eval(), granularity)
        assert torch.equal(torch.get_rng_state(), rng)  # building it moves no random state
        assert not net.training and all(m.granularity == granularity for m in sparse_layers(net).values())
        assert [m.out_channels for m in sparse_layers(net).values()] == [b[0].out_channels for b in dense.features]
        with torch.no_grad():
            assert torch.equal(net(x), dense(x))
            assert torch.equal(net.train()(x), dense.train()(x))  # batch statistics too
        assert net.features[0][0].weight.data_ptr() != dense.features[0][0].weight.data_ptr()  # a copy
    with pytest.raises(TypeError):
        SparseConvNet.from_convnet(SparseConvNet(1, 10, 0.25))
    with pytest.raises(TypeError):
        SparseConvNet.from_convnet(nn.Sequential(nn.Conv2d(1, 4, 3)))


@pytest.mark.parametrize("kind", ["structured", "unstructured"])
def test_per_layer_fractions_prune_only_the_named_layers(kind):
    granularity = "filter" if kind == "structured" else "weight"
    net = SparseConvNet.from_convnet(_trained_like_convnet(), granularity)
    alone = SparseConv2d.from_conv(net.features[2][0], granularity)
    result = pruner(kind)(net, {"features.2.0": 0.5, "features.5.0": 0.25})
    pruner(kind)(nn.Sequential(alone), 0.5)
    assert torch.equal(net.features[2][0].mask, alone.mask)  # the same entries as pruning that layer alone
    layers = sparse_layers(net)
    assert set(result) == set(layers) and result["features.2.0"] == 0.5
    assert result["features.5.0"] == pytest.approx(round(0.25 * layers["features.5.0"].mask.numel())
                                                   / layers["features.5.0"].mask.numel())
    assert all(result[n] == 0 for n in layers if n not in ("features.2.0", "features.5.0"))
    expected = sum(result[n] * m.weight.numel() for n, m in layers.items()) / sum(m.weight.numel()
                                                                                for m in layers.values())
    assert overall_sparsity(net) == pytest.approx(expected)


@pytest.mark.parametrize("bad, err", [({"features.0.0": 1.5}, ValueError), ({"features.0.0": -0.1}, ValueError),
                                      ({"features.0.0": "0.5"}, TypeError), ({"nope": 0.5}, ValueError),
                                      ({"classifier": 0.5}, ValueError)])
def test_bad_per_layer_fractions_rejected(bad, err):
    for granularity, prune in (("filter", filter_l1_pruning), ("weight", unstructured_pruning)):
        net = SparseConvNet(1, 10, 0.25, granularity)
        with pytest.raises(err):
            prune(net, bad)
        assert overall_sparsity(net) == 0
    with pytest.raises(ValueError, match="no filter-granularity SparseConv2d named"):
        filter_l1_pruning(nn.Sequential(SparseConv2d(3, 4, 3), SparseConv2d(4, 4, 3, granularity="weight")),
                          {"1": 0.5})  # a weight-granularity layer is not a filter one
    with pytest.raises(ValueError, match="kind"):
        pruner("random")


def test_recalibrate_batchnorm_averages_the_batches_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=0.3)).eval()
    loader = [(torch.randn(4, 2, 5, 5) * (i + 1) + i, torch.zeros(4)) for i in range(3)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    recalibrate_batchnorm(net, loader)
    with torch.no_grad():
        outs = [net[0](x) for x, _ in loader]  # (B, 3, 5, 5) per batch
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).reshape(3, -1).var(dim=1) for o in outs]).mean(0)  # unbiased, as BN
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    assert net[1].momentum == 0.3 and not net.training  # momentum and mode restored
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # no weight changed
    with pytest.raises(ValueError):
        recalibrate_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1)), loader)


@pytest.mark.parametrize("kind, recalibrate", [("structured", False), ("unstructured", True)])
def test_sensitivity_scan_prunes_one_layer_at_a_time(kind, recalibrate):
    model, test = _trained_like_convnet().eval(), _synthetic_loader(0)
    calib = _synthetic_loader(1) if recalibrate else None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scan = sensitivity_scan(model, test, [0.5, 0.25], kind, calib)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is not changed
    names = list(sparse_layers(SparseConvNet(1, 10, 0.25)))
    assert list(scan) == names and all(list(accs) == [0.0, 0.25, 0.5] for accs in scan.values())
    granularity = "filter" if kind == "structured" else "weight"
    for name in (names[0], names[-1]):  # the reference: a fresh copy with that layer alone pruned
        for p in (0.0, 0.5):
            net = SparseConvNet.from_convnet(model, granularity)
            pruner(kind)(net, {name: p})
            if recalibrate:
                recalibrate_batchnorm(net, calib)
            assert scan[name][p] == evaluate(net, test)[1]
    with pytest.raises(ValueError):
        sensitivity_scan(model, test, [0.5], "random")
    with pytest.raises(ValueError):
        sensitivity_scan(model, test, [1.5], kind)
    with pytest.raises(ValueError):  # a SparseConvNet of the other granularity
        sensitivity_scan(SparseConvNet(1, 10, 0.25, "weight"), test, [0.5], "structured")


def test_choose_sparsities_by_hand():
    scan = {"a": {0.0: 0.80, 0.3: 0.79, 0.5: 0.75, 0.7: 0.50},
            "b": {0.0: 0.80, 0.3: 0.70, 0.5: 0.60},
            "c": {0.0: 0.80, 0.3: 0.70, 0.5: 0.795}}  # not monotone: the highest sparsity within the drop
    assert choose_sparsities(scan, 0.02) == {"a": 0.3, "b": 0.0, "c": 0.5}
    assert choose_sparsities(scan, 0.06) == {"a": 0.5, "b": 0.0, "c": 0.5}
    assert choose_sparsities(scan, 1.0) == {"a": 0.7, "b": 0.5, "c": 0.5}
    for bad in (-0.01, float("nan"), "0.1"):
        with pytest.raises(ValueError):
            choose_sparsities(scan, bad)
    with pytest.raises(ValueError, match="unpruned"):
        choose_sparsities({"a": {0.3: 0.8}}, 0.01)


# --- pruning after training: the experiment helpers ---------------------------------------------------

def test_gradual_targets_and_pruning_during_training():
    assert gradual_targets(0.6, 3, 12) == {0: 0.2, 4: 0.4, 8: 0.6}
    assert gradual_targets(0.5, 1, 12) == {0: 0.5}
    with pytest.raises(ValueError):
        gradual_targets(0.5, 13, 12)
    seen, handed_out = [], [0]
    loader = _PruneDuring([(i, None) for i in range(4)], None, lambda net, p: seen.append((handed_out[0], p)),
                          {0: 0.1, 3: 0.2, 6: 0.3})
    assert len(loader) == 4
    for epoch in range(2):  # as fit iterates: set_epoch, then the batches
        loader.set_epoch(epoch)
        for i, (x, _) in enumerate(loader):
            assert x == i
            handed_out[0] += 1
    # each pruning happens before its iteration's batch is handed out (iterations counted over epochs)
    assert seen == [(0, 0.1), (3, 0.2), (6, 0.3)]


@pytest.fixture(scope="module")
def tiny_sweep_settings(data_dir):
    return EXPERIMENTS["pruning"].settings["quick"] | dict(n_per_class=5, val_per_class=4, test_per_class=5,
                                                          width=0.25, batch_size=25, seeds=[0, 1],
                                                          profile="quick")


def test_sparsity_sweep_on_a_tiny_setting(tiny_sweep_settings):
    s = tiny_sweep_settings
    baselines = [_trained_like_convnet(seed) for seed in s["seeds"]]
    state = {k: v.clone() for k, v in baselines[0].state_dict().items()}
    sweeps = sparsity_sweeps(baselines, s, sparsities=(0.3, 0.6), finetune_sparsities=(0.6,), epochs=2, steps=2,
                             device="cpu", progress=False)
    assert all(torch.equal(v, baselines[0].state_dict()[k]) for k, v in state.items())
    assert len(sweeps) == 2
    for w in sweeps:
        assert set(w) == {"dense", "structured", "unstructured"}
        for kind in ("structured", "unstructured"):
            assert list(w[kind]) == list(METHODS)
            assert list(w[kind]["one-shot"]) == list(w[kind]["one-shot + BN recalibration"]) == [0.3, 0.6]
            assert list(w[kind]["one-shot + fine-tune"]) == list(w[kind]["gradual + fine-tune"]) == [0.6]
            assert all(0 <= a <= 1 for accs in w[kind].values() for a in accs.values())
    from efficientml.experiments import train_loaders
    train_loader, test_loader, _ = train_loaders(s | {"seed": 1}, "cpu")
    calib = calibration_batches(train_loader, 4)
    assert len(calib) == 2 and torch.equal(calib[1][0], list(train_loader)[1][0])  # 50 images: 2 batches
    net = SparseConvNet.from_convnet(baselines[1], "weight")
    unstructured_pruning(net, 0.3)
    assert sweeps[1]["unstructured"]["one-shot"][0.3] == evaluate(net, test_loader)[1]
    recalibrate_batchnorm(net, calib)
    assert sweeps[1]["unstructured"]["one-shot + BN recalibration"][0.3] == evaluate(net, test_loader)[1]
    with pytest.raises(ValueError):
        calibration_batches(train_loader, 0)
    sp = sweep_spreads(sweeps)
    assert sp["unstructured"]["one-shot"][0.3].values == tuple(w["unstructured"]["one-shot"][0.3] for w in sweeps)
    table = sweep_table(sweeps)
    assert len(table.splitlines()) == 2 + 1 + 2 * 2 and "gradual + fine-tune" in table  # header, unpruned, 2x2
    import matplotlib
    matplotlib.use("Agg")
    ax = plot_sparsity_sweep(sweeps)
    assert len(ax.containers) == 2 * 4  # one errorbar series per kind and method
    with pytest.raises(ValueError):
        sparsity_sweeps(baselines, s, sparsities=(0.3,), finetune_sparsities=(0.6,))
    with pytest.raises(ValueError):
        sparsity_sweeps(baselines * 2, s)


def test_sensitivity_scans_measure_on_the_validation_split(tiny_sweep_settings):
    from efficientml.experiments import train_loaders, validation_split
    s = tiny_sweep_settings
    baselines = [_trained_like_convnet(seed) for seed in s["seeds"]]
    scans = sensitivity_scans(baselines, s, (0.5,), "unstructured", calibration=None, device="cpu")
    for model, seed, scan in zip(baselines, s["seeds"], scans):
        ss = s | {"seed": seed}
        val = validation_split(ss)
        train = train_loaders(ss, "cpu")[2]
        assert len(val) == 40 and not set(val.indices.tolist()) & set(train.indices.tolist())
        assert scan == sensitivity_scan(model, TensorLoader(val, 1000), (0.5,), "unstructured")


def test_validation_split_is_never_trained_on(tiny_sweep_settings):
    from efficientml.experiments import train_loaders, validation_split
    s = tiny_sweep_settings | {"seed": 0}
    val = set(validation_split(s).indices.tolist())
    assert not val & set(train_loaders(s, "cpu", n_per_class=3)[2].indices.tolist())  # a prefix: fine
    with pytest.raises(ValueError, match="overlap"):
        train_loaders(s, "cpu", n_per_class=6)
    whole = train_loaders(s | {"n_per_class": None}, "cpu")[2]  # the whole split, less the validation
    whole_val = set(validation_split(s | {"n_per_class": None}).indices.tolist())
    assert len(whole) == 60000 - 40 and not whole_val & set(whole.indices.tolist())
    with pytest.raises(ValueError, match="val_per_class"):
        validation_split(s | {"val_per_class": None})


def test_sensitivity_vs_uniform_matches_the_overall_sparsity(tiny_sweep_settings):
    s = tiny_sweep_settings
    baselines = [_trained_like_convnet(seed) for seed in s["seeds"]]
    names = list(sparse_layers(SparseConvNet(1, 10, 0.25)))
    scans = [{n: {0.0: 0.5, 0.5: 0.5 if i % 2 else 0.1, 0.9: 0.1} for i, n in enumerate(names)}] * 2
    out = sensitivity_vs_uniform(baselines, s, scans, 0.01, "unstructured")
    for r in out:
        assert r["chosen"] == {n: 0.5 if i % 2 else 0.0 for i, n in enumerate(names)}
        assert r["overall"]["uniform"] == pytest.approx(r["overall"]["sensitivity"], abs=0.01)
        assert 0 <= r["sensitivity"] <= 1 and 0 <= r["uniform"] <= 1
    import matplotlib
    matplotlib.use("Agg")
    assert len(plot_sensitivity(scans).get_lines()) == len(names)
    with pytest.raises(ValueError):
        sensitivity_vs_uniform(baselines, s, scans[:1], 0.01)


def test_fold_masks_gives_the_same_function_with_exact_zeros():
    from efficientml.pruning import fold_masks
    torch.manual_seed(0)
    net = SparseConvNet(1, 10, width=0.25, granularity="weight")
    unstructured_pruning(net, 0.6)
    with torch.no_grad():                       # nonzero raw weights under the mask must not leak
        for m in sparse_layers(net).values():
            m.weight.add_(1.0)
    net.eval()
    dense = fold_masks(net)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(dense(x), net(x), atol=1e-6)
    for name, m in sparse_layers(net).items():
        w = dense.get_submodule(name).weight
        assert torch.equal(w == 0, m.mask == 0)
    with pytest.raises(ValueError, match="compact"):
        fold_masks(SparseConvNet(1, 10, width=0.25, granularity="filter"))
    with pytest.raises(TypeError):
        fold_masks(ConvNet(1, 10, width=0.25))


def test_deep_compression_stages_measure_files_and_read_them_back(tiny):
    from efficientml.experiments.pruning import COMPRESSION_STAGES, compression_table, deep_compression
    seed_everything(0)
    dense = ConvNet(1, 10, width=0.25)
    fit(dense, TensorLoader(tiny[0], 50, shuffle=True), None, epochs=1, lr=0.1, device="cpu", progress=False)
    pruned = SparseConvNet.from_convnet(dense, "weight")
    unstructured_pruning(pruned, 0.7)
    test = TensorLoader(tiny[1], 100)
    r = deep_compression(dense, pruned, test)
    assert list(r) == [label for label, _, _ in COMPRESSION_STAGES]
    assert r["dense, fp32"]["test_acc"] == evaluate(dense.eval(), test)[1]
    assert r["pruned, fp32"]["test_acc"] == evaluate(pruned.eval(), test)[1]      # folding changes nothing
    assert abs(r["pruned, fp32"]["bytes"] - r["dense, fp32"]["bytes"]) < 2000     # zeros stored dense cost the same
    b = {label: v["bytes"] for label, v in r.items()}
    assert b["pruned, 4-bit k-means"] < b["dense, 4-bit k-means"] < b["dense, fp32"] / 4
    assert b["pruned, 2-bit k-means"] < b["pruned, 4-bit k-means"] < b["pruned, 4-bit linear"] * 1.1
    assert "smaller by" in compression_table([r, r])


# -- devices: masks ranked on a CPU copy, the training path without float64, seeds in order -------

def test_ranking_scores_are_an_exact_float64_cpu_copy():
    from efficientml.pruning import _ranking_scores
    scores = torch.tensor([[0.1, 0.3, 0.2], [1e-30, 3.4e38, 0.0]])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])  # any shape with as many entries
    r = _ranking_scores(scores, mask)
    assert r.dtype == torch.float64 and r.device.type == "cpu" and r.shape == scores.shape
    kept = mask.view(2, 3) != 0
    assert torch.equal(r[kept], scores[kept].double()) and (r[~kept] == float("-inf")).all()


@pytest.mark.parametrize("granularity, prune", [("filter", lambda net: filter_l1_pruning(net, 0.5)),
                                                ("weight", lambda net: unstructured_pruning(net, 0.7)),
                                                ("weight", lambda net: n_m_pruning(net, 2, 4, skip_indivisible=True))])
def test_pruning_makes_its_tensors_on_the_weights_device(granularity, prune):
    torch.manual_seed(0)
    net = SparseConvNet(1, 10, width=0.25, granularity=granularity)
    with torch.no_grad():  # many exact ties: the ranking must break them the same way
        for m in sparse_layers(net).values():
            m.weight.copy_(torch.randint(-3, 4, m.weight.shape) / 4)
    ref = copy.deepcopy(net)
    prune(ref)
    with implicit_device_trap():
        prune(net)
    for (name, m), r in zip(sparse_layers(net).items(), sparse_layers(ref).values()):
        assert m.mask.dtype == torch.float32 and m.mask.device == m.weight.device
        assert torch.equal(m.mask, r.mask), name


def test_sparse_training_path_makes_no_float64():
    torch.manual_seed(0)
    net = SparseConvNet(1, 10, width=0.25, granularity="weight")
    unstructured_pruning(net, 0.5)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with implicit_device_trap(), no_float64():
        nn.functional.cross_entropy(net(x), y).backward()
    assert all((m.weight.grad[m.mask == 0] == 0).all() for m in sparse_layers(net).values())


def test_per_baseline_runs_seed_after_seed():
    from efficientml.experiments.pruning import _per_baseline
    s = {"seeds": [5, 3, 9], "x": 1}
    out = _per_baseline(["a", "b"], s, lambda model, ss: (model, ss["seed"], ss["x"]))
    assert out == [("a", 5, 1), ("b", 3, 1)]  # fewer baselines than seeds: the first seeds
    with pytest.raises(ValueError):
        _per_baseline(["a", "b", "c", "d"], s, lambda model, ss: None)
    with pytest.raises(ValueError):
        _per_baseline([], s, lambda model, ss: None)


def test_train_pruning_runs_trains_seed_after_seed(monkeypatch):
    from efficientml.experiments import pruning as experiment
    calls = []

    def train_convnet(s, lr, epochs, scheduler, milestones, gamma, *, out_dir, tag, device, progress, callback,
                      make_model):
        calls.append((s["seed"], tag, callback is None))
        return f"model-{tag}", f"hist-{tag}"

    monkeypatch.setattr(experiment, "train_convnet", train_convnet)
    monkeypatch.setattr(experiment, "train_loaders", lambda s, device: (None, f"test{s['seed']}", None))
    s = EXPERIMENTS["pruning"].settings["quick"] | {"seeds": [1, 0]}
    runs = experiment.train_pruning_runs(s)
    assert calls == [(seed, f"pruning-{name}-seed{seed}", name == "baseline")
                     for seed in (1, 0) for name in ("baseline", "structured", "unstructured")]
    assert [r.model for r in runs["unstructured"]] == ["model-pruning-unstructured-seed1",
                                                       "model-pruning-unstructured-seed0"]
    assert runs["baseline"][0].schedule is None and runs["structured"][1].schedule.evaluate_on == "test0"


def test_pruning_a_channels_last_network_prunes_the_same_weights():
    """The chapters train in channels-last memory format (NHWC); a mask is written in the
    weights' logical order, so pruning picks the same weights as on the default layout."""
    torch.manual_seed(0)
    a = SparseConvNet(1, 10, 0.25, granularity="weight")
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    assert not b.features[1][0].mask.is_contiguous()  # (conv, bn, relu) blocks
    for net in (a, b):
        unstructured_pruning(net, 0.6)
    for (ca, _, _), (cb, _, _) in zip(a.features, b.features):
        assert torch.equal(ca.mask, cb.mask) and 0.55 < 1 - ca.mask.mean().item() < 0.65
    s = SparseConvNet(1, 10, 0.25, granularity="filter").to(memory_format=torch.channels_last)
    filter_l1_pruning(s, 0.5)
    assert compact(s.eval())(torch.randn(2, 1, 28, 28)).shape == (2, 10)
