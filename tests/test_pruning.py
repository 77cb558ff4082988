import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from efficientml import ConvNet, TensorLoader, count_macs, count_parameters, evaluate, fit, seed_everything
from efficientml.experiments import EXPERIMENTS
from efficientml.pruning import (PruningSchedule, SparseConv2d, SparseConvNet, compact, conv_as_matmul,
                                 filter_l1_pruning, sparse_layers, unstructured_pruning)


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
