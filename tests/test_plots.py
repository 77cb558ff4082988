import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from matplotlib.lines import STEP_LOOKUP_MAP

from efficientml.plots import moving_average, plot_accuracy, plot_history, plot_loss, plot_lr
from efficientml.train import History


def test_moving_average_by_hand():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4, 5], 2), [1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([1, 2, 3, 4, 5], 3), [2, 3, 4])
    np.testing.assert_allclose(moving_average([4, 8], 1), [4, 8])
    np.testing.assert_allclose(moving_average([1, 2, 3], 10), [2])  # window shrinks to the data


def test_moving_average_agrees_with_convolution():
    x = np.random.default_rng(0).normal(size=1000)
    np.testing.assert_allclose(moving_average(x, 37), np.convolve(x, np.ones(37) / 37, mode="valid"))


@pytest.mark.parametrize("x, w", [([], 3), ([1, 2], 0), ([1, np.nan], 1), ([[1, 2]], 1), ([1, 2], 1.5)])
def test_moving_average_rejects_bad_input(x, w):
    with pytest.raises(ValueError):
        moving_average(x, w)


def test_standard_figures_draw_every_run():
    h = History(iter_loss=[3.0, 2.0, 1.5, 1.0], iter_epoch=[0.5, 1.0, 1.5, 2.0], train_loss=[2.5, 1.2],
                train_acc=[0.5, 0.7], test_loss=[2.0, 1.4], test_acc=[0.55, 0.72], lr=[0.1, 0.1],
                epoch_time=[1.0, 1.0])
    d = History(iter_loss=[3.0], iter_epoch=[0.5], diverged_at=0.75)
    ax = plot_loss({"a": h, "diverged": d}, window=2)
    xs, ys = ax.lines[0].get_data()
    np.testing.assert_allclose(xs, [1.0, 1.5, 2.0])
    np.testing.assert_allclose(ys, [2.5, 1.75, 1.25])
    assert ax.lines[1].get_xdata()[0] == 0.5 and ax.lines[-1].get_xdata()[0] == 0.75  # divergence marked
    ax = plot_accuracy({"a": h, "b": h}, "test")
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [55.0, 72.0])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 2])
    fig = plot_history(h, window=2, title="t")
    assert len(fig.axes) == 2
    with pytest.raises(ValueError):
        plot_accuracy(h, "validation")


def test_lr_panel_changes_rate_at_the_epoch_boundaries():
    """Epoch e (1-based) trains at lr[e - 1] from x = e - 1 to x = e: a MultiStep drop before
    epoch 3 must be drawn at x = 2, the start of epoch 3, not half an epoch off."""
    h = History(lr=[0.1, 0.1, 0.01, 0.001])
    line = plot_lr({"multistep": h, "same": h}).lines[0]
    x, y = STEP_LOOKUP_MAP[line.get_drawstyle()](line.get_xdata(), line.get_ydata())  # as drawn
    jumps = [(x[i], y[i], y[i + 1]) for i in range(len(x) - 1) if y[i] != y[i + 1]]
    assert jumps == [(2.0, 0.1, 0.01), (3.0, 0.01, 0.001)]
    assert (x.min(), x.max()) == (0.0, 4.0)  # the run spans epochs 0..4
    for e, lr in enumerate(h.lr, start=1):  # every epoch's middle shows the rate it trained with
        mid = e - 0.5
        assert y[np.searchsorted(x, mid) - 1] == lr


def test_chapter8_figures_draw_what_they_are_given():
    import matplotlib.pyplot as plt
    from efficientml.plots import plot_allreduce, plot_data_parallel, plot_memory_curves
    single = [3.0, 2.5, 2.0, 1.8]
    left, right = plot_data_parallel(single, {"ddp": [3.0, 2.6, 2.1, 1.8], "short": [3.1, 2.5]}, window=2)
    assert len(left.lines) == 3 and len(right.lines) == 2 + 1           # + the zero line
    np.testing.assert_allclose(right.lines[0].get_ydata(), [0, 0.1, 0.1, 0], atol=1e-12)
    assert len(right.lines[1].get_ydata()) == 2                          # a shorter run: its own steps
    ax = plot_allreduce([16, 1024, 65536], [1e-3, 2e-3, 8e-3], [5e-4, 1e-3, 4e-3])
    assert len(ax.lines) == 3 and ax.get_xscale() == "log"
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [64, 4096, 262144])   # bytes of float32
    model = ax.lines[2].get_ydata()                 # from the fastest calls' end points, in ms
    assert model[0] == pytest.approx(0.5 + 64 / (262144 / 4.0)) and model[-1] == pytest.approx(0.5 + 4.0)
    ax = plot_memory_curves([1, 2], {"a": [1e9, 2e9], "b": [3e9, 3e9]}, "length")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1, 2])         # in GB
    plt.close("all")


def test_serving_plots_draw_one_line_per_method_and_variant():
    import matplotlib.pyplot as plt
    from efficientml.plots import plot_decode_speeds, plot_speculative, plot_weight_quantization
    rows = [{"method": "rtn", "group": g, "bits": b, "seed": None, "val": 2.0 - 0.1 * b} for g in (32, 128)
            for b in (8, 4, 2)]
    rows += [{"method": "gptq", "group": 32, "bits": 2, "seed": i, "val": 1.9 + 0.01 * i} for i in range(3)]
    ax = plot_weight_quantization(rows, 1.0, "val")
    assert len(ax.containers) == 3                       # rtn x 2 groups, gptq x 1: one errorbar each
    gptq = ax.containers[1]                              # ordered by group, then rtn, awq, gptq
    assert gptq.lines[0].get_ydata()[0] == pytest.approx(1.91)   # the mean of the 3 calibration sets
    assert ax.xaxis_inverted()
    speeds = {"float32": {"weight_bytes": 4e8, "decode_s": 0.02}, "int8": {"weight_bytes": 1e8, "decode_s": 0.006}}
    ax = plot_decode_speeds(speeds, bandwidth=4e10)
    assert len(ax.lines) == 3 and ax.lines[0].get_ydata()[0] == pytest.approx(20.0)
    roof = ax.lines[2]        # reading 400 MB at 40 GB/s: 10 ms
    assert np.interp(400, roof.get_xdata(), roof.get_ydata()) == pytest.approx(10.0, rel=1e-2)
    sweep = {"k": {1: {"tokens_per_round": 1.5, "speedup": 1.1}, 2: {"tokens_per_round": 1.9, "speedup": 1.2}}}
    axes = plot_speculative({"greedy": sweep})
    assert list(axes[0].lines[0].get_ydata()) == [1.5, 1.9] and list(axes[1].lines[0].get_ydata()) == [1.1, 1.2]
    plt.close("all")
