import math

import pytest
import torch
from torch import nn

from efficientml import ConvNet, TensorLoader, count_macs, count_parameters, fit, seed_everything
from efficientml.experiments import EXPERIMENTS
from efficientml.train import make_scheduler


@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32), (3, 64)])
def test_convnet_output_shapes(in_channels, size):
    net = ConvNet(in_channels=in_channels, num_classes=10, width=0.25)
    out = net(torch.randn(4, in_channels, size, size))
    assert out.shape == (4, 10)
    feats = net.features(torch.randn(2, in_channels, size, size))
    assert feats.shape == (2, net.classifier.in_features, math.ceil(size / 4), math.ceil(size / 4))  # two stride-2 blocks


def test_convnet_is_the_assignments_net():
    net = ConvNet(3, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 64, 128, 128, 256, 256]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2, 1, 1, 1]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in net.modules())  # stride, not pooling
    # conv weights + BN (weight, bias) + Linear(256, 10), by hand
    chans = [3, 32, 32, 64, 64, 64, 128, 128, 256, 256]
    by_hand = sum(9 * a * b + 2 * b for a, b in zip(chans[:-1], chans[1:])) + 256 * 10 + 10
    assert count_parameters(net) == by_hand == 1_212_778


def test_count_macs_by_hand():
    sizes = [32, 32, 16, 16, 16, 8, 8, 8, 8]  # output side of each block on a 32x32 image
    chans = [3, 32, 32, 64, 64, 64, 128, 128, 256, 256]
    by_hand = sum(s * s * 9 * a * b for s, a, b in zip(sizes, chans[:-1], chans[1:])) + 256 * 10
    assert count_macs(ConvNet(3, 10), (3, 32, 32)) == by_hand
    assert 100e6 < by_hand < 110e6  # "about 105M" in the syllabus
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_macs(lin, (3, 4)) == 60


def test_convnet_width_and_validation():
    assert count_parameters(ConvNet(1, 10, width=0.5)) < count_parameters(ConvNet(1, 10)) / 3
    with pytest.raises(ValueError):
        ConvNet(3, 10, width=0)


def _lrs(name, epochs, **kw):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = make_scheduler(opt, name, epochs, **kw)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_full_profile_multistep_divides_by_ten_every_25_epochs():
    s = EXPERIMENTS["schedules"].settings["full"]
    lrs = _lrs("multistep", s["epochs"], milestones=s["milestones"], gamma=s["gamma"])
    for epoch, lr in [(0, 0.1), (24, 0.1), (25, 0.01), (49, 0.01), (50, 0.001), (74, 0.001), (75, 1e-4), (99, 1e-4)]:
        assert lrs[epoch] == pytest.approx(lr), epoch


def test_quick_profile_milestones_fall_every_quarter():
    for profile in ("quick", "full"):
        s = EXPERIMENTS["schedules"].settings[profile]
        assert s["milestones"] == [s["epochs"] * k // 4 for k in (1, 2, 3)]


def test_cosine_schedule_values():
    lrs = _lrs("cosine", 100)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.05)
    assert lrs[25] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lrs[99] == pytest.approx(0.05 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_lr_01_beats_lr_00001_over_seeds(fashion_train, fashion_test):
    """Chapter 1's first claim, small: after 3 short epochs (1,000 images) lr 0.1 is ahead of
    lr 1e-4 on every one of 3 seeds. lr 1e-4 barely leaves the uniform guess's 3.32 bits on
    every kernel path and thread count (3.28-3.33 bits, 13-14% accuracy). lr 0.1's training
    loss is as steady (1.31-1.55 bits), but its test accuracy after so few steps is not:
    measured on the native, AVX2 and SSE kernels and at 1, 2 and 4 threads, one seed ranged
    from 30% to 64% (mean of the 3 seeds 50-65%). So the losses carry the per-seed margin
    (1.7 bits at least, asserted 1.0); accuracy is asserted ahead on every seed by 5 points (the
    least seen: 16) and by 20 points on the mean (the least seen: 36)."""
    test = fashion_test.subset(50, seed=0)
    acc, loss = {}, {}
    for lr in (0.0001, 0.1):
        for seed in (0, 1, 2):
            seed_everything(seed)
            net = ConvNet(1, 10, width=0.25)
            h = fit(net, TensorLoader(fashion_train.subset(100, seed=seed), 32, shuffle=True, seed=seed),
                    TensorLoader(test, 500), epochs=3, lr=lr, device="cpu", progress=False)
            acc[lr, seed], loss[lr, seed] = h.test_acc[-1], h.train_loss[-1]
    for seed in (0, 1, 2):
        assert acc[0.1, seed] > acc[0.0001, seed] + 0.05, acc
        assert loss[0.1, seed] < loss[0.0001, seed] - 1.0, loss
        assert loss[0.0001, seed] > 3.0, loss   # hardly moved from log2(10) = 3.32 bits
    assert sum(acc[0.1, s] - acc[0.0001, s] for s in (0, 1, 2)) / 3 > 0.2, acc


def test_chapter1_experiments_run_every_seed():
    from efficientml.seeds import SEEDS
    for name in ("lr-sweep", "schedules"):
        for profile in ("quick", "full"):
            s = EXPERIMENTS[name].settings[profile]
            assert s["seeds"] == list(SEEDS) and "seed" not in s, (name, profile)


def test_lr_sweep_result_file_has_what_the_chapter_reads(tmp_path, data_dir):
    from efficientml.experiments import run_experiment
    from efficientml.experiments.learning_rates import full_run, record_values
    from efficientml.results import load_result
    run_experiment("lr-sweep", "quick", tmp_path, {"lrs": [0.1], "epochs": 1, "n_per_class": 10, "seeds": [0, 1],
                                                   "test_per_class": 10, "width": 0.25}, "cpu", False)
    r = load_result("lr-sweep", "quick", tmp_path)
    assert r["results"]["parameters"] == count_parameters(ConvNet(1, 10, 0.25))
    hs = r["results"]["runs"]["0.1"]
    assert len(hs) == 2, "one History per seed"
    for h in hs:
        assert len(h["test_acc"]) == 1 and len(h["train_acc"]) == 1 and h["diverged"] is False
    assert hs[0]["iter_loss"] != hs[1]["iter_loss"], "each seed is its own run"
    for seed in (0, 1):
        assert (tmp_path / f"lr-sweep-lr0.1-seed{seed}-quick.ckpt.pt").exists()
    # the chapter's summary of a full run's file: a Spread over the seeds of each quantity
    (tmp_path / "lr-sweep-full.json").write_text((tmp_path / "lr-sweep-quick.json").read_text())
    summary = full_run("lr-sweep", tmp_path)["0.1"]
    assert summary["test acc"].values == tuple(h["test_acc"][-1] for h in hs)
    assert summary["best test acc"].n == 2
    values = record_values({"0.1": summary})
    assert values["mean"]["0.1"]["train loss"] == pytest.approx(sum(h["train_loss"][-1] for h in hs) / 2)
    assert values["std"]["0.1"]["test acc"] == summary["test acc"].std


def test_lr_sweep_same_seed_same_run(data_dir):
    """Each seeded run is repeatable: the same seed gives the same History."""
    from efficientml.experiments import run
    kw = {"lrs": [0.1], "epochs": 1, "n_per_class": 10, "test_per_class": 10, "width": 0.25, "seeds": [1]}
    a, b = (run("lr-sweep", "quick", kw, device="cpu", progress=False)["results"]["runs"]["0.1"][0]
            for _ in range(2))
    assert a.iter_loss == b.iter_loss and a.test_acc == b.test_acc
