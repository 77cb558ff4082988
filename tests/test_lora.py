import copy

import pytest
import torch
import torchvision
from torch import nn

from device_checks import implicit_device_trap, no_float64, package_device_trap
from efficientml import experiments
from efficientml import lora as lora_mod
from efficientml.lora import (LoRAConv2d, LoRALinear, lora_targets, merge_lora, peak_memory_bytes, ParameterCount, add_lora, freeze, gradient_bytes, optimizer_state_bytes,
                              parameter_count, saved_activation_bytes, stages)
from efficientml.models import WeightsMissingError, resnet18


def lora(seeded_in=12, out=5, r=3, alpha=6.0, bias=True):
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(seeded_in, out, bias=bias), r=r, alpha=alpha)


def test_starts_equal_to_base():
    layer = lora()
    x = torch.randn(7, 12)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (5, 3)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_output_is_the_explicit_formula():
    layer = lora(r=2, alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12, dtype=torch.float64)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    A, B = layer.lora_A.double(), layer.lora_B.double()
    expected = x @ W.T + b + (5.0 / 2) * (x @ A.T @ B.T)   # W x + b + (alpha/r) B A x, row-wise
    torch.testing.assert_close(layer.double()(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.5 * B @ A)


def test_leading_dimensions_pass_through():
    layer = lora()
    assert layer(torch.randn(2, 3, 12)).shape == (2, 3, 5)


def test_only_A_and_B_get_gradients():
    layer = lora()
    layer(torch.randn(8, 12)).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    # B = 0 at the start, so A's gradient (B^T times the output gradient) is exactly zero, but present
    assert layer.lora_A.grad is not None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_training_moves_only_the_update():
    layer = lora()
    w0 = layer.base.weight.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(32, 12), torch.randn(32, 5)
    losses = []
    for _ in range(20):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.base.weight, w0)


def test_merge_unmerge_round_trip():
    layer = lora()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 12)
    y = layer(x)
    w0 = layer.base.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight())
    layer.merge()  # no-op: the update is not added twice
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight())
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0)
    torch.testing.assert_close(layer(x), y)


def test_merged_forward_is_one_linear():
    layer = lora()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.base.weight, layer.base.bias))


def test_parameter_counts():
    layer = lora(seeded_in=512, out=10, r=4)
    count = parameter_count(layer)
    assert count == ParameterCount(trainable=4 * (512 + 10), total=4 * (512 + 10) + 512 * 10 + 10)
    assert 0 < count.fraction < 1


@pytest.mark.parametrize("r", [0, -1, 2.5, True, 6, None])
def test_invalid_rank(r):
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(12, 5), r=r)


@pytest.mark.parametrize("kwargs", [dict(alpha=0), dict(alpha=-1.0), dict(alpha=float("nan")), dict(dropout=1.0)])
def test_invalid_alpha_and_dropout(kwargs):
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(12, 5), r=2, **kwargs)


def test_only_linear_layers():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(3, 4, 3), r=1)


def test_dropout_applies_to_the_update_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 5), r=2, dropout=0.5)
    layer.eval()
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: dropout cannot change anything yet


# -- LoRA on convolutions ----------------------------------------------------------------------

def conv_lora(r=3, alpha=6.0, **conv):
    torch.manual_seed(0)
    conv = dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1) | conv
    return LoRAConv2d(nn.Conv2d(**conv), r=r, alpha=alpha)


def test_conv_lora_starts_equal_and_trains_only_a_and_b():
    layer = conv_lora()
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.lora_A.shape == (3, 4, 3, 3) and layer.lora_B.shape == (6, 3)
    layer(x).square().sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.base.weight.grad is None and layer.lora_B.grad.abs().sum() > 0
    assert parameter_count(layer).trainable == 3 * (4 * 9 + 6)


@pytest.mark.parametrize("conv", [dict(), dict(kernel_size=1, stride=1, padding=0), dict(dilation=2, padding=2),
                                  dict(bias=False)])
def test_conv_lora_equals_explicit_formula(conv):
    # conv(x, W + (alpha / r) * reshape(B @ A.flatten(1))) + b, in float64, by hand
    layer = conv_lora(r=2, alpha=5.0, **conv).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 4, 10, 10, dtype=torch.float64)
    b = layer.base
    w = b.weight + (5.0 / 2) * (layer.lora_B @ layer.lora_A.reshape(2, -1)).reshape(b.weight.shape)
    expected = nn.functional.conv2d(x, w, b.bias, b.stride, b.padding, b.dilation)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), w - b.weight, atol=1e-12)


def test_conv_lora_merge_unmerge_round_trip():
    layer = conv_lora()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 9, 9)
    y, w0 = layer(x), layer.base.weight.clone()
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y, atol=1e-5)
    assert torch.allclose(layer(x), layer.base(x))  # one plain convolution now
    layer.merge()  # a no-op
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base.weight, w0, atol=1e-6)
    assert torch.allclose(layer(x), y, atol=1e-5)


@pytest.mark.parametrize("r", [0, -2, 1.5, True, 7, None])
def test_conv_lora_rejects_bad_rank(r):
    with pytest.raises(ValueError, match="rank"):  # out = 6 < in kh kw = 36: r <= 6
        conv_lora(r=r)


def test_conv_lora_rejects_other_layers():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        LoRAConv2d(nn.Linear(4, 4), r=1)
    with pytest.raises(ValueError, match="groups"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), r=1)


def test_add_lora_to_resnet_convolutions():
    net = resnet18(10)
    names = lora_targets(net, "layer4", (nn.Conv2d,))
    assert names == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    before = net(x)
    for name in names:
        assert isinstance(add_lora(net, name, r=4, alpha=8), LoRAConv2d)
    assert torch.equal(net(x), before)  # every update starts at zero
    with pytest.raises(ValueError, match="no Conv2d"):
        lora_targets(net, "layer4", (nn.Conv2d,))  # all adapted already: their bases are not targets
    count = freeze(net, ["fc", *names])  # the adapted layers' A and B train, their bases stay frozen
    convs = [net.get_submodule(n) for n in names]
    assert count.trainable == n_params(net.fc) + sum(4 * (c.base.weight[0].numel() + c.base.out_channels) for c in convs)


# -- freezing --------------------------------------------------------------------------------

def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_resnet_stages():
    assert stages(resnet18(10)) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def test_freeze_up_to_a_stage():
    net = resnet18(10)
    count = freeze(net, up_to="layer3")
    assert count.trainable == n_params(net.layer4) + n_params(net.fc)
    assert count.total == n_params(net)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")) for n in frozen)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in net.layer3.parameters())
    assert all(p.grad is not None for p in net.layer4.parameters())


def test_freeze_by_name():
    net = resnet18(10)
    count = freeze(net, ["fc", "layer4.1.conv2"])
    assert count.trainable == n_params(net.fc) + net.layer4[1].conv2.weight.numel()
    assert freeze(net, []).trainable == 0
    assert freeze(net, up_to="fc").trainable == 0


@pytest.mark.parametrize("kwargs", [dict(trainable=["layer9"]), dict(up_to="layer9"), dict(trainable=[""]),
                                    dict(trainable=["fc"], up_to="layer3")])
def test_freeze_rejects_unknown_names(kwargs):
    with pytest.raises(ValueError):
        freeze(resnet18(10), **kwargs)


def test_freeze_keeps_lora_base_frozen():
    net = resnet18(10)
    add_lora(net, "fc", r=4, alpha=8)
    count = freeze(net, up_to="layer3")
    assert count.trainable == n_params(net.layer4) + 4 * (512 + 10)
    assert not net.fc.base.weight.requires_grad and net.fc.lora_A.requires_grad


def test_add_lora_nested_and_errors():
    net = nn.Sequential(nn.Linear(8, 6), nn.Sequential(nn.ReLU(), nn.Linear(6, 4)))
    layer = add_lora(net, "1.1", r=2)
    assert net[1][1] is layer and isinstance(layer.base, nn.Linear)
    with pytest.raises(ValueError):
        add_lora(net, "2", r=1)
    with pytest.raises(TypeError):
        add_lora(net, "1.0", r=1)


@pytest.mark.parametrize("name,per_param", [("sgd", 4), ("adam", 8)])
def test_optimizer_state_bytes(name, per_param):
    net = resnet18(10)
    trainable = freeze(net, up_to="layer4").trainable
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if name == "sgd" else torch.optim.Adam(params)
    assert optimizer_state_bytes(opt) == 0
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == per_param * trainable  # fp32 momentum, or Adam's two moments


# -- ResNet-18 and its ImageNet weights, offline ------------------------------------------------

@pytest.fixture
def imagenet_checkpoint(tmp_path, monkeypatch):
    """A ResNet-18 state dict saved where torchvision's weights API looks for IMAGENET1K_V1."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("EFFICIENTML_DOWNLOAD", "0")
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "resnet18-f37072fd.pth")
    return state


def test_imagenet_weights_load_offline_through_torchvision(imagenet_checkpoint):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert weights.url.endswith("resnet18-f37072fd.pth")
    tv = torchvision.models.resnet18(weights=weights)
    net = resnet18(weights="IMAGENET1K_V1")
    for model in (tv, net):
        for k, v in model.state_dict().items():
            assert torch.equal(v, imagenet_checkpoint[k]), k


def test_imagenet_weights_adapted_to_grey_images_and_new_classes(imagenet_checkpoint):
    rgb = resnet18(weights="IMAGENET1K_V1").eval()
    grey = resnet18(num_classes=10, in_channels=1, weights="IMAGENET1K_V1").eval()
    assert grey.fc.out_features == 10 and grey.conv1.in_channels == 1
    assert torch.equal(grey.layer4[1].conv2.weight, imagenet_checkpoint["layer4.1.conv2.weight"])
    x = torch.randn(2, 1, 32, 32)
    rgb.fc, grey.fc = nn.Identity(), nn.Identity()
    with torch.no_grad():  # a grey image is an RGB image with R = G = B
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_missing_imagenet_weights_say_where_they_go(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("EFFICIENTML_DOWNLOAD", "0")
    with pytest.raises(WeightsMissingError, match=r"hub/checkpoints/resnet18-f37072fd\.pth"):
        resnet18(weights="IMAGENET1K_V1")


def test_resnet_shapes_and_bad_arguments():
    assert resnet18(5, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError):
        resnet18(0)
    with pytest.raises(ValueError):
        resnet18(10, in_channels=2)


def test_resnet18_for_small_images_is_torchvisions_narrowed():
    """width and small_input: torchvision's blocks and names, every channel count scaled by
    width / 64, a 3x3 stride-1 stem without max pooling: stages see 28, 14, 7, 4 on 28x28."""
    tv = {k: v.shape for k, v in torchvision.models.resnet18(num_classes=3).state_dict().items()}
    for width in (16, 64):
        net = resnet18(3, in_channels=1, width=width, small_input=True)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        assert shapes.keys() == tv.keys()
        for k, v in tv.items():
            if k == "conv1.weight":
                assert tuple(shapes[k]) == (width, 1, 3, 3)
            elif len(v):  # channel dims of 64, 128, 256, 512 scale; kernels and the 3 classes stay
                assert tuple(shapes[k]) == tuple(d * width // 64 if d >= 64 else d for d in v), k
        assert isinstance(net.maxpool, nn.Identity)
        sides = []
        hooks = [getattr(net, f"layer{i}").register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
                 for i in range(1, 5)]
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 3)
        assert sides == [28, 14, 7, 4]
        for h in hooks:
            h.remove()
    narrow = resnet18(3, width=16)  # the ImageNet stem, narrowed: 7x7 stride 2 and max pooling
    assert narrow.conv1.kernel_size == (7, 7) and narrow.conv1.stride == (2, 2)
    assert isinstance(narrow.maxpool, nn.MaxPool2d) and narrow.fc.in_features == 128
    # initialised as torchvision initialises: BatchNorm gains 1, He-normal convolutions
    net = resnet18(3, width=16, small_input=True)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    w = net.layer3[0].conv1.weight  # fan_out = 64 x 9
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    for bad in (dict(width=0), dict(weights="IMAGENET1K_V1", width=16),
                dict(weights="IMAGENET1K_V1", small_input=True)):
        with pytest.raises(ValueError):
            resnet18(3, **bad)


def test_every_tap_of_the_small_design_learns_on_28x28_images():
    """With the small-image stem, layer4 sees 4x4 maps: every weight of its convolutions gets a
    gradient (torchvision's design on the same images: about 17%; see the next test)."""
    torch.manual_seed(0)
    net = resnet18(3, in_channels=1, width=8, small_input=True)
    live = lora_mod.gradient_fraction(net, torch.randn(16, 1, 28, 28), torch.arange(16) % 3)
    layer4 = [n for n in live if n.startswith("layer4.")]
    assert len(layer4) == 5 and all(live[n] == 1.0 for n in layer4)


# -- Chapter 4's models --------------------------------------------------------------------

def test_transfer_models():
    s = experiments.settings("lora", "quick")
    backbone = experiments.transfer.backbone_model(s, 5, 1)
    nets = {name: experiments.transfer_model(name, backbone, 5, s) for name in experiments.TRANSFER_RUNS}
    counts = {name: parameter_count(net) for name, net in nets.items()}
    total, w = n_params(backbone), s["width"]
    assert counts["pt_net"] == ParameterCount(total, total)
    assert counts["net_freeze"].trainable == n_params(backbone.layer4) + n_params(backbone.fc)
    assert counts["net_freeze_lora"].trainable == n_params(backbone.layer4) + s["r"] * (8 * w + 5)
    assert counts["scratch"].trainable == total  # the same design as the backbone, new weights
    assert {k: v.shape for k, v in nets["scratch"].state_dict().items()} == \
        {k: v.shape for k, v in backbone.state_dict().items()}
    # lora_layer4: every pretrained weight frozen; rank-r A and B on layer4's five convolutions
    # (r (in kh kw + out) each) and the whole new classifier train
    r = s["r_backbone"]
    convs = [(4 * w, 9, 8 * w), (8 * w, 9, 8 * w), (4 * w, 1, 8 * w), (8 * w, 9, 8 * w), (8 * w, 9, 8 * w)]
    assert counts["lora_layer4"].trainable == sum(r * (i * k + o) for i, k, o in convs) + 8 * w * 5 + 5
    assert counts["lora_layer4"].trainable < 0.1 * total
    assert parameter_count(experiments.transfer_model("lora_layer4", backbone, 5, s, r=1)).trainable == \
        sum(i * k + o for i, k, o in convs) + 8 * w * 5 + 5
    # copies: the backbone itself is untouched, and the pretrained weights are shared by value
    assert all(p.requires_grad for p in backbone.parameters())
    assert torch.equal(nets["net_freeze"].layer1[0].conv1.weight, backbone.layer1[0].conv1.weight)
    assert not torch.equal(nets["scratch"].layer1[0].conv1.weight, backbone.layer1[0].conv1.weight)
    with pytest.raises(ValueError):
        experiments.transfer_model("nope", backbone, 5, s)


def test_select_classes(fashion_test):
    half = fashion_test.select_classes([7, 2])
    assert half.classes == ["Sneaker", "Pullover"] and half.num_classes == 2
    assert half.class_counts().tolist() == [1000, 1000]
    assert torch.equal(half.images[half.labels == 0], fashion_test.images[fashion_test.labels == 7])
    assert torch.equal(fashion_test.labels[half.indices], torch.tensor([7, 2])[half.labels])
    sub = half.subset(3, seed=0)
    assert torch.equal(fashion_test.images[sub.indices], sub.images)
    for bad in ([], [1, 1], [10], [-1], [1.0]):
        with pytest.raises(ValueError):
            fashion_test.select_classes(bad)


def test_sweep_ranks_and_their_labels():
    s = experiments.settings("lora", "quick") | dict(runs=["pt_net", "lora_layer4"], r_backbone=8, lora_ranks=[32, 2, 8])
    assert experiments.sweep_ranks(s) == [2, 8, 32]
    assert [experiments.rank_label(r, s) for r in (2, 8)] == ["lora_layer4 r=2", "lora_layer4"]
    assert experiments.sweep_ranks(s | dict(runs=["pt_net"])) == []


def test_paired_gap_and_sweep_summaries():
    from efficientml.experiments.transfer import data_sweep, lr_sweep, rank_sweep, summarize
    from efficientml.seeds import paired_gap, spread
    gap = paired_gap(spread([0.6, 0.7, 0.5]), spread([0.5, 0.4, 0.45]))
    assert gap.values == pytest.approx((0.1, 0.3, 0.05))
    with pytest.raises(ValueError):
        paired_gap(spread([0.6, 0.7]), spread([0.5]))
    s = dict(r_backbone=8, n_per_class=10, lr=0.003)
    hist = {"test_acc": [0.4, 0.6]}
    # as read back from a result file: sweep keys are strings
    out = {"runs": {"pt_net": [hist, hist], "lora_layer4": [hist, hist]}, "ranks": {"2": [0.5, 0.7]},
           "data": {"pt_net": {"5": [0.3, 0.5]}}, "lrs": {"pt_net": {"0.01": [0.2, 0.4]}}}
    sm = summarize(out)
    assert sm["pt_net"]["final"].mean == pytest.approx(0.6) and sm["pt_net"]["epoch 1"].mean == pytest.approx(0.4)
    assert {r: sp.mean for r, sp in rank_sweep(sm, s).items()} == pytest.approx({2: 0.6, 8: 0.6})
    assert list(rank_sweep(sm, s)) == [2, 8]
    assert {n: sp.mean for n, sp in data_sweep(sm, s)["pt_net"].items()} == pytest.approx({5: 0.4, 10: 0.6})
    assert {lr: sp.mean for lr, sp in lr_sweep(sm, s)["pt_net"].items()} == pytest.approx({0.003: 0.6, 0.01: 0.3})
    assert set(experiments.transfer.main_runs(sm)) == {"pt_net", "lora_layer4"}
    import matplotlib
    matplotlib.use("Agg")
    from efficientml.experiments.transfer import plot_accuracy_vs_parameters, plot_data_sweep
    ax = plot_data_sweep(sm, s)
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "pt_net"]  # the main run joins the sweep
    assert list(line.get_xdata()) == [5, 10] and list(line.get_ydata()) == pytest.approx([40, 60])
    cost = {"pt_net": {"trainable": 100}, "lora_layer4": {"trainable": 10}, "lora_layer4 r=2": {"trainable": 5}}
    ax = plot_accuracy_vs_parameters(sm, cost, s)
    sweep = [ln for ln in ax.get_lines() if ln.get_label().startswith("lora_layer4, r =")]
    assert len(sweep) == 1 and list(sweep[0].get_xdata()) == [5, 10]


def test_transfer_runs_train_and_measure_their_cost(data_dir):
    s = experiments.settings("lora", "quick") | dict(pretrain_per_class=20, pretrain_epochs=1, n_per_class=4,
                                                     test_per_class=10, epochs=2, seeds=[0, 1], probe=True,
                                                     runs=["net_freeze", "net_freeze_lora", "lora_layer4"],
                                                     lora_ranks=[1], data_runs=["net_freeze"], data_sizes=[2],
                                                     lr_grid=[0.03], rank_n_per_class=3, rank_lr=0.03)
    out = experiments.train_transfer_runs(s, device="cpu", progress=False)
    # the sweeps: one final accuracy per seed for each point, in [0, 1]
    assert set(out["ranks"]) == {1} and set(out["data"]) == set(out["lrs"]) == {"net_freeze"}
    assert set(out["ranks_more_data"]) == {1, s["r_backbone"]}  # every rank, the main one included
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in out["ranks_more_data"].values())
    assert set(out["data"]["net_freeze"]) == {2} and set(out["lrs"]["net_freeze"]) == {0.03}
    for v in (out["ranks"][1], out["data"]["net_freeze"][2], out["lrs"]["net_freeze"][0.03]):
        assert len(v) == 2 and all(0 <= a <= 1 for a in v)
    assert out["cost"]["lora_layer4 r=1"]["trainable"] < out["cost"]["lora_layer4"]["trainable"]
    assert out["pretrain"].epochs == 1
    assert set(out["runs"]) == {"net_freeze", "net_freeze_lora", "lora_layer4"}
    for c in out["cost"].values():  # a step holds at least its activations, gradients and momentum at once
        assert c["peak_step_bytes"] >= c["saved_activation_bytes"] + c["gradient_bytes"]
    assert out["cost"]["lora_layer4"]["gradient_bytes"] < 0.1 * out["cost"]["net_freeze"]["gradient_bytes"]
    assert out["cost"]["lora_layer4"]["peak_step_bytes"] <= out["cost"]["net_freeze"]["peak_step_bytes"]
    conv = out["models"]["lora_layer4"].layer4[0].conv1
    assert isinstance(conv, LoRAConv2d) and conv.lora_B.abs().sum() > 0  # the update was trained
    from efficientml.experiments.transfer import (accuracy_table, data_table, lr_table, rank_table,
                                                  record_values, summarize)
    sm = summarize(out)
    rows, head = rank_table(sm, out["cost"], s)
    assert [row[0] for row in rows] == [1, s["r_backbone"]] and len(head) == len(rows[0]) == 6
    assert head[-1] == "3 images per class, lr 0.03" and rows[0][-1] == sm["ranks_more_data"][1].pct()
    assert [row[0] for row in data_table(sm, s, "net_freeze", "net_freeze")[0]] == [2, 4]
    assert [row[0] for row in lr_table(sm, s)[0]] == ["0.003 (the chapter's)", "0.03"]
    assert len(accuracy_table(sm)[0]) == 3 + 2  # the runs and the two probes
    rec = record_values(sm, out["cost"], out["pretrain"])
    assert set(rec["ranks"]) == {"1"} and set(rec["data"]["net_freeze"]) == {"2"} and "lora_layer4" in rec
    assert set(rec["ranks_more_data"]) == {"1", str(s["r_backbone"])}
    for name, hists in out["runs"].items():
        assert len(hists) == 2 and all(h.epochs == 2 and len(h.train_time) == 2 for h in hists)
        cost, model = out["cost"][name], out["models"][name]
        assert cost["trainable"] == parameter_count(model).trainable < cost["total"]
        assert cost["optimizer_state_bytes"] == cost["gradient_bytes"] == 4 * cost["trainable"]  # SGD momentum, fp32
        assert cost["saved_activation_bytes"] > 0
    # the LoRA classifier saves one more tensor than the plain one: A x (batch x r floats), for B's gradient
    extra = out["cost"]["net_freeze_lora"]["saved_activation_bytes"] - out["cost"]["net_freeze"]["saved_activation_bytes"]
    assert extra == 4 * s["batch_size"] * s["r"]
    lora_fc = out["models"]["net_freeze_lora"].fc
    assert isinstance(lora_fc, LoRALinear) and lora_fc.lora_B.abs().sum() > 0  # the update was trained
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in out["probe"].values())


# -- memory measured from the tensors -----------------------------------------------------------

def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_saved_activation_bytes_hand_count():
    net, x = tiny(), torch.randn(5, 4)
    # Linear 1 saves its input x (5 x 4 floats); ReLU saves its output (5 x 3), which Linear 2
    # saves as its input too: held once. Weights (saved for the input gradients) are not counted.
    assert saved_activation_bytes(net, x) == 4 * (5 * 4 + 5 * 3)
    net[0].requires_grad_(False)  # frozen first layer: nothing before Linear 2 records a graph
    assert saved_activation_bytes(net, x) == 4 * 5 * 3
    net.requires_grad_(False)
    assert saved_activation_bytes(net, x) == 0


def test_saved_activation_bytes_depend_on_shapes_not_values():
    net = resnet18(5, in_channels=1).train()
    counts = {}
    for up_to in ("bn1", "layer2", "layer3", "layer4"):
        freeze(net, up_to=up_to)
        counts[up_to] = [saved_activation_bytes(net, x) for x in
                         (torch.zeros(8, 1, 28, 28), torch.randn(8, 1, 28, 28), 7 * torch.rand(8, 1, 28, 28))]
    assert all(len(set(c)) == 1 for c in counts.values()), counts
    firsts = [c[0] for c in counts.values()]
    assert firsts == sorted(firsts, reverse=True) and firsts[-1] > 0  # freezing more saves less
    assert saved_activation_bytes(net, torch.zeros(16, 1, 28, 28)) == 2 * counts["layer4"][0]  # linear in batch


def test_peak_memory_bytes_counts_what_is_held_at_once():
    def together():  # three 1,000,000-byte tensors alive at the same time
        return [torch.ones(250, 1000) for _ in range(3)]

    def one_at_a_time():
        for _ in range(3):
            torch.ones(250, 1000)

    assert peak_memory_bytes(together) == 3_000_000
    assert peak_memory_bytes(one_at_a_time) == 1_000_000
    kept = []
    assert peak_memory_bytes(lambda: kept.append(torch.ones(500, 1000))) == 2_000_000  # kept after the call: counted


def test_merge_lora_merges_every_adapter():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    add_lora(net, "0", r=2, alpha=4), add_lora(net, "2", r=2, alpha=4)
    with torch.no_grad():
        net[0].lora_B.normal_(), net[2].lora_B.normal_()
    x = torch.randn(5, 2, 6, 6)
    y = net(x)
    assert merge_lora(net) == 2 and net[0].merged and net[2].merged
    assert torch.allclose(net(x), y, atol=1e-5)


def test_gradient_bytes_from_the_grad_tensors():
    net = tiny()
    assert gradient_bytes(net) == 0  # before any backward pass
    net[0].requires_grad_(False)
    net(torch.randn(5, 4)).sum().backward()
    assert gradient_bytes(net) == 4 * (3 * 2 + 2)


# -- devices: what a CPU can show of mistakes that fail on a GPU (see tests/device_checks.py) -------

def test_lora_layers_make_every_tensor_on_their_inputs_device():
    torch.manual_seed(0)
    linear, conv = LoRALinear(nn.Linear(6, 4), r=2, alpha=4), LoRAConv2d(nn.Conv2d(3, 4, 3), r=2, alpha=4)
    x, xc = torch.randn(5, 6), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        linear.lora_B.normal_(), conv.lora_B.normal_()
    y, yc = linear(x), conv(xc)
    with implicit_device_trap(), no_float64():
        torch.testing.assert_close(linear(x), y)
        torch.testing.assert_close(conv(xc), yc)
        linear.merge(), conv.merge()
        torch.testing.assert_close(linear(x), y, rtol=0, atol=1e-5)
        torch.testing.assert_close(conv(xc), yc, rtol=0, atol=1e-4)
        linear.unmerge(), conv.unmerge()


def test_freeze_and_add_lora_keep_the_models_device():
    net, x = resnet18(3, in_channels=1).eval(), torch.randn(2, 1, 28, 28)
    with implicit_device_trap(), no_float64():
        freeze(net, up_to="layer3")
        layer = add_lora(net, "layer4.0.conv1", r=2, alpha=4)
        add_lora(net, "fc", r=2, alpha=4)
        with torch.no_grad():
            net(x)
    assert layer.lora_A.device.type == "cpu" and net.fc.lora_B.device.type == "cpu"


def test_stage_table_runs_the_model_on_its_own_device():
    net = resnet18(3, in_channels=1)
    rows, _ = experiments.transfer.stage_table(net, (1, 28, 28))
    with implicit_device_trap():
        assert experiments.transfer.stage_table(net, (1, 28, 28))[0] == rows


def test_measure_cost_measures_a_cpu_copy_with_cpu_inputs():
    s = dict(lr=0.1, momentum=0.9, weight_decay=0.0)
    cost = experiments.transfer.measure_cost(tiny(), (5, 4), 2, s)
    with package_device_trap():
        again = experiments.transfer.measure_cost(tiny(), (5, 4), 2, s)
    assert {k: v for k, v in again.items() if k != "peak_step_bytes"} == \
        {k: v for k, v in cost.items() if k != "peak_step_bytes"}
    assert cost["gradient_bytes"] == cost["optimizer_state_bytes"] == 4 * (4 * 3 + 3 + 3 * 2 + 2)


def test_linear_probe_fits_on_the_cpu_in_float64():
    from efficientml.experiments.transfer import probe_accuracy
    g = torch.Generator(device="cpu").manual_seed(0)
    centres = 4 * torch.randn(3, 8, generator=g)
    ytr, yte = torch.arange(30) % 3, torch.arange(12) % 3
    ftr = centres[ytr] + torch.randn(30, 8, generator=g)
    fte = centres[yte] + torch.randn(12, 8, generator=g)
    acc = probe_accuracy(ftr, ytr, fte, yte, 3, l2=1e-3, steps=20)
    with implicit_device_trap():                     # the classifier too is made on the CPU
        assert probe_accuracy(ftr, ytr, fte, yte, 3, l2=1e-3, steps=20) == acc == 1.0
    assert probe_accuracy(ftr.float(), ytr, fte.double(), yte, 3, l2=1e-3, steps=20) == acc


@pytest.mark.parametrize("device", ["mps", "meta", "xla"])
def test_peak_memory_is_measured_on_the_cpu_and_cuda_only(device):
    with pytest.raises(ValueError, match=f"not measured on {device}"):
        peak_memory_bytes(lambda: torch.ones(10), device=device)
    assert peak_memory_bytes(lambda: torch.ones(250, 1000), device="cpu") == 1_000_000


def test_stage_macs_add_up_to_count_macs_and_the_table_shows_them():
    from efficientml.models import count_macs
    net = resnet18(3, in_channels=1)
    for shape in ((1, 28, 28), (1, 64, 64)):
        macs = experiments.transfer.stage_macs(net, shape)
        assert list(macs) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
        assert sum(macs.values()) == count_macs(net, shape) and macs["bn1"] == 0
        assert macs["fc"] == 512 * 3 and macs["conv1"] == 64 * 7 * 7 * (shape[1] // 2) ** 2
    rows, headers = experiments.transfer.stage_table(net, (1, 28, 28))
    assert headers[3] == "MACs per image" and rows[-1][3] == f"{count_macs(net, (1, 28, 28)):,}"
    assert net.training  # the mode it had


def test_gradient_fraction_finds_the_taps_that_only_see_padding():
    """A 3 x 3 convolution with padding 1 on a 1 x 1 map: only its centre tap (1 of 9) gets a
    gradient; on a 3 x 3 map every tap does. The model itself is left as it was."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    y = torch.tensor([0, 1, 1, 0])
    x = torch.randn(4, 2, 1, 1)
    with implicit_device_trap(), no_float64():  # what an Apple GPU would refuse, caught here
        small = lora_mod.gradient_fraction(net, x, y)
    assert small == {"0.weight": pytest.approx(1 / 9)}
    net2 = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(27, 2))
    assert lora_mod.gradient_fraction(net2, torch.randn(4, 2, 3, 3), y) == {"0.weight": 1.0}
    assert not net[0].weight.requires_grad and net[0].weight.grad is None and net[2].weight.grad is None
    assert lora_mod.gradient_fraction(net, torch.randn(4, 2, 1, 1), y, ["2.weight"]) == {"2.weight": 1.0}
    rows, headers = experiments.transfer.gradient_table(net, small)
    assert rows == [["0", "54", "11.1%"]] and headers[2] == "with a nonzero gradient"
    with pytest.raises(ValueError, match="no parameter"):
        lora_mod.gradient_fraction(net, torch.randn(4, 2, 1, 1), y, ["0.bias.x"])
    with pytest.raises(ValueError, match="batch size"):
        lora_mod.gradient_fraction(net, torch.randn(3, 2, 1, 1), y)


def test_gradient_fraction_of_resnet18_layer4_on_28x28_images():
    """The issue's measurement: on 28 x 28 inputs, layer4 sees 1 x 1 maps; its 3 x 3 kernels get
    a gradient at the centre tap (1/9), the first block's stride-2 conv1 at 4 taps (2 x 2 in),
    the 1 x 1 shortcut everywhere."""
    torch.manual_seed(0)
    net = resnet18(3, in_channels=1)
    f = lora_mod.gradient_fraction(net, torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2]))
    # at most the taps that see data; a channel that ReLU silences for all six images loses a few more
    assert 4 / 9 - 0.02 < f["layer4.0.conv1.weight"] <= 4 / 9
    for name in ("layer4.0.conv2.weight", "layer4.1.conv1.weight", "layer4.1.conv2.weight"):
        assert 1 / 9 - 0.01 < f[name] <= 1 / 9
    assert f["layer4.0.downsample.0.weight"] > 0.98 and f["layer1.0.conv1.weight"] == 1.0
