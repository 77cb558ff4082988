import copy
import math

import pytest
import torch
from torch import nn

from efficientml import MLP, History, TensorLoader, evaluate, fit, seed_everything
from efficientml.train import make_optimizer, make_scheduler, param_groups, select_device, show_progress


@pytest.fixture(scope="module")
def small(fashion_train, fashion_test):
    """A small real problem: 1,000 Fashion-MNIST training images, 500 test images."""
    return fashion_train.subset(100, seed=0), fashion_test.subset(50, seed=0)


def _run(small, epochs=3, seed=0, **kw):
    seed_everything(seed)
    train, test = small
    model = MLP(784, (64,), 10)
    hist = fit(model, TensorLoader(train, 50, shuffle=True, augment=True, seed=seed), TensorLoader(test, 500),
               epochs=epochs, device="cpu", progress=False, **{"lr": 0.05} | kw)
    return model, hist


def _comparable(h: History) -> dict:
    d = h.to_dict()
    for k in ("epoch_time", "train_time", "total_time"):
        d.pop(k)
    return d


def test_fit_learns_a_real_problem(small):
    train, test = small
    seed_everything(0)
    loader = TensorLoader(test, 500)
    before = evaluate(MLP(784, (64,), 10), loader)
    model, h = _run(small, epochs=4)
    assert h.epochs == 4 and not h.diverged
    assert before[1] < 0.2 and before[0] > 3.0           # untrained: chance level, ~log2(10) bits
    assert h.test_acc[-1] > 0.65                           # 10 classes: chance is 0.1
    assert h.train_loss[-1] < 0.6 * h.train_loss[0]
    assert h.test_loss[-1] < before[0]
    assert evaluate(model, loader) == pytest.approx((h.test_loss[-1], h.test_acc[-1]))
    # per-iteration records: 20 batches of 50 per epoch, fractional epochs ending at 1, 2, ...
    assert len(h.iter_loss) == len(h.iter_epoch) == 4 * 20
    assert h.iter_epoch[19] == pytest.approx(1.0) and h.iter_epoch[0] == pytest.approx(0.05)
    # the epoch's training loss (bits) is the example-weighted mean of its iterations
    assert h.train_loss[0] == pytest.approx(sum(h.iter_loss[:20]) / 20)
    assert h.total_time == pytest.approx(sum(h.epoch_time)) and all(t > 0 for t in h.epoch_time)


def test_two_seeded_runs_give_identical_histories(small):
    _, a = _run(small, epochs=2, seed=1)
    _, b = _run(small, epochs=2, seed=1)
    _, c = _run(small, epochs=2, seed=2)
    assert _comparable(a) == _comparable(b)
    assert _comparable(a) != _comparable(c)


@pytest.mark.parametrize("name, kw, expected", [
    ("none", {}, [0.1] * 6),
    ("multistep", {"milestones": [2, 4]}, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]),
    ("cosine", {}, [0.1 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)]),
])
def test_scheduler_learning_rate_sequence(small, name, kw, expected):
    _, h = _run(small, epochs=6, lr=0.1, scheduler=name, **kw)
    assert h.lr == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_scheduler_validation():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="milestones"):
        make_scheduler(opt, "multistep", 10)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler(opt, "exponential")


def test_divergence_is_recorded_not_raised(small):
    _, h = _run(small, epochs=3, lr=1e6, momentum=0.9)
    assert h.diverged and 0 <= h.diverged_at < 1
    assert h.epochs == 0 or h.epochs < 3
    assert all(math.isfinite(v) for v in h.iter_loss)      # the NaN itself is not stored
    assert len(h.iter_loss) == round(h.diverged_at * 20)    # every finite iteration before it is


def test_callback_sees_each_epoch(small):
    seen = []
    _run(small, epochs=3, callback=lambda e, model, h: seen.append((e, h.epochs, isinstance(model, MLP))))
    assert seen == [(1, 1, True), (2, 2, True), (3, 3, True)]


def test_only_trainable_parameters_are_optimised(small):
    seed_everything(0)
    model = MLP(784, (32,), 10)
    first = model.net[1]
    first.requires_grad_(False)
    w0 = first.weight.clone()
    train, test = small
    fit(model, TensorLoader(train, 100), None, epochs=1, device="cpu", progress=False)
    assert torch.equal(first.weight, w0)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, TensorLoader(train, 100), None, epochs=1, device="cpu", progress=False)


def test_checkpoint_resumes_an_interrupted_run(small, tmp_path):
    _, whole = _run(small, epochs=4, scheduler="multistep", milestones=[2])

    class Interrupt(Exception):
        pass

    def stop_after_two(epoch, model, h):
        if epoch == 3:
            raise Interrupt  # dies during epoch 3's callback: the checkpoint holds epoch 2
    ckpt = tmp_path / "run.ckpt.pt"
    with pytest.raises(Interrupt):
        _run(small, epochs=4, scheduler="multistep", milestones=[2], checkpoint=ckpt, callback=stop_after_two)
    assert torch.load(ckpt, weights_only=False)["history"]["train_loss"].__len__() == 2
    # a new process would start with other RNG state: resuming must not depend on it
    torch.manual_seed(12345)
    train, test = small
    model = MLP(784, (64,), 10)
    resumed = fit(model, TensorLoader(train, 50, shuffle=True, augment=True, seed=0), TensorLoader(test, 500),
                  epochs=4, lr=0.05, scheduler="multistep", milestones=[2], checkpoint=ckpt, device="cpu",
                  progress=False)
    assert _comparable(resumed) == _comparable(whole)
    assert not list(tmp_path.glob("*.tmp"))


def test_history_round_trips_through_dict(small):
    _, h = _run(small, epochs=1)
    assert History.from_dict(h.to_dict()) == h


def test_device_and_progress_selection(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("EFFICIENTML_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.setenv("EFFICIENTML_PROGRESS", "0")
    assert show_progress() is False and show_progress(True) is True
    monkeypatch.setenv("EFFICIENTML_PROGRESS", "1")
    assert show_progress() is True


@pytest.mark.parametrize("kw", [{"lr": 0.0}, {"lr": float("nan")}, {"name": "rmsprop"}])
def test_optimizer_validation(kw):
    with pytest.raises(ValueError):
        make_optimizer(nn.Linear(2, 2).parameters(), **kw)


class _Tiny(nn.Module):
    """An embedding, a linear layer with bias, a LayerNorm and a frozen linear layer."""
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_only_2d_weights():
    m = _Tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m.embed.weight), id(m.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}
    # a model without 1-D parameters gives one group; a shared parameter appears once
    shared = nn.Linear(2, 2, bias=False)
    groups = param_groups(nn.Sequential(shared, shared), 0.1)
    assert len(groups) == 1 and len(groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(m, -1.0)


def test_adamw_over_param_groups_decays_only_2d_weights():
    """With zero gradients AdamW's step is pure decoupled decay: w <- w (1 - lr wd) for the
    2-D weights; biases and LayerNorm parameters must not move."""
    torch.manual_seed(0)
    m = _Tiny()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = make_optimizer(param_groups(m, 0.1), "adamw", lr=0.5, weight_decay=0.1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for n, p in m.named_parameters():
        expected = before[n] * (1 - 0.5 * 0.1) if p.dim() >= 2 and p.requires_grad else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=n)


def test_make_optimizer_groups_validation():
    m = _Tiny()
    with pytest.raises(TypeError, match="all parameters or all groups"):
        make_optimizer([{"params": [m.proj.weight]}, m.proj.bias])
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer([{"params": []}])
    opt = make_optimizer(p for p in m.parameters() if p.requires_grad)  # the default: one group
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 5e-4


def test_fit_default_decays_every_parameter_as_before(small):
    """fit's default (decay_2d_only=False) must train exactly as an SGD optimizer built over all
    trainable parameters with one weight decay, the optimizer of Chapters 1-4."""
    train, test = small

    def run(**kw):
        seed_everything(0)
        model = MLP(784, (32,), 10)
        opt = kw.pop("optimizer", None)
        hist = fit(model, TensorLoader(train, 50, shuffle=True, seed=0), TensorLoader(test, 500), epochs=2,
                   lr=0.05, device="cpu", progress=False,
                   optimizer=opt(model) if opt else "sgd", **kw)
        return model, hist

    model_a, a = run()
    model_b, b = run(optimizer=lambda m: make_optimizer(m.parameters(), "sgd", 0.05, 0.9, 5e-4))
    assert _comparable(a) == _comparable(b)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    model_c, c = run(decay_2d_only=True)  # the biases no longer decay: another run
    assert not torch.equal(model_c.net[1].bias, model_a.net[1].bias)
    with pytest.raises(ValueError, match="decay_2d_only"):
        fit(MLP(784, (8,), 10), TensorLoader(train, 100), epochs=1, device="cpu", progress=False,
            optimizer=torch.optim.SGD(MLP(784, (8,), 10).parameters(), lr=0.1), decay_2d_only=True)


def test_epochs_validated(small):
    with pytest.raises(ValueError, match="epochs"):
        fit(MLP(784, (8,), 10), [], epochs=-1)


def test_ignored_targets_count_in_neither_loss_nor_accuracy():
    """Targets of -100 (padding) are left out of evaluate's and fit's per-token loss and accuracy."""
    import torch.nn.functional as F
    from efficientml.train import IGNORE_INDEX
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 8), nn.Linear(8, 5))
    x = torch.randint(0, 5, (4, 6))
    y = torch.randint(0, 5, (4, 6))
    y_pad = y.clone()
    y_pad[:, 4:] = IGNORE_INDEX
    loss, acc = evaluate(model, [(x, y_pad)])
    with torch.no_grad():
        logits = model(x)[:, :4]
    ref_loss = F.cross_entropy(logits.reshape(-1, 5), y[:, :4].reshape(-1)).item() / math.log(2)
    ref_acc = (logits.argmax(-1) == y[:, :4]).float().mean().item()
    assert loss == pytest.approx(ref_loss, rel=1e-6) and acc == pytest.approx(ref_acc)
    hist = fit(model, [(x, y_pad)], None, epochs=1, lr=1e-9, progress=False)  # loss before the step
    assert hist.train_loss[0] == pytest.approx(ref_loss, rel=1e-5)
    assert hist.train_acc[0] == pytest.approx(ref_acc)


def _tiny_fit(small, tmp_path, name="run.ckpt.pt", **kw):
    seed_everything(0)
    train, test = small
    model = MLP(784, (16,), 10)
    args = {"epochs": 1, "lr": 0.05, "device": "cpu", "progress": False, "checkpoint": tmp_path / name} | kw
    return fit(model, TensorLoader(train, 100, shuffle=True, seed=0), TensorLoader(test, 500), **args)


def test_checkpoint_refuses_a_run_with_other_settings(small, tmp_path):
    """A checkpoint carries the settings that made it: another lr, or other caller settings (an
    experiment's data), is refused with the differences named, not continued as if the same."""
    _tiny_fit(small, tmp_path, checkpoint_settings={"n_per_class": 100})
    with pytest.raises(ValueError, match=r"(?s)other settings.*lr: 0\.05 there, 0\.5 here"):
        _tiny_fit(small, tmp_path, lr=0.5, checkpoint_settings={"n_per_class": 100})
    with pytest.raises(ValueError, match=r"extra/n_per_class: 100 there, 200 here"):
        _tiny_fit(small, tmp_path, checkpoint_settings={"n_per_class": 200})
    with pytest.raises(ValueError, match="holds 1 epochs, more than the 0"):
        _tiny_fit(small, tmp_path, epochs=0, checkpoint_settings={"n_per_class": 100})
    h = _tiny_fit(small, tmp_path, checkpoint_settings={"n_per_class": 100})  # the same: resumed, nothing to do
    assert h.epochs == 1


def test_checkpoint_extends_a_constant_schedule_but_not_a_cosine_one(small, tmp_path):
    one = _tiny_fit(small, tmp_path)
    two = _tiny_fit(small, tmp_path, epochs=2)          # constant lr: epoch 2 continues exactly
    assert two.epochs == 2 and two.train_loss[0] == one.train_loss[0]
    assert _comparable(two) == _comparable(_tiny_fit(small, tmp_path, name="whole.ckpt.pt", epochs=2))
    _tiny_fit(small, tmp_path, name="cos.ckpt.pt", epochs=2, scheduler="cosine")
    with pytest.raises(ValueError, match=r"epochs: 2 there, 4 here"):  # T_max = 2 would be kept
        _tiny_fit(small, tmp_path, name="cos.ckpt.pt", epochs=4, scheduler="cosine")


def test_checkpoint_without_settings_is_refused(small, tmp_path):
    _tiny_fit(small, tmp_path)
    state = torch.load(tmp_path / "run.ckpt.pt", weights_only=False)
    del state["settings"]
    torch.save(state, tmp_path / "run.ckpt.pt")
    with pytest.raises(ValueError, match="records no settings"):
        _tiny_fit(small, tmp_path)


def test_resume_reads_the_checkpoint_onto_the_cpu(small, tmp_path, monkeypatch):
    """Resuming on a GPU raised: the checkpoint was read onto the device, RNG state included,
    and torch.set_rng_state takes only a CPU tensor. It is read onto the CPU, whatever the device."""
    _tiny_fit(small, tmp_path)
    real_load, seen = torch.load, []

    def load(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    _tiny_fit(small, tmp_path, epochs=2)
    assert seen == ["cpu"]


def test_warmup_cosine_steps_every_iteration_whatever_the_name_s_case(small):
    """'Warmup-Cosine' used to be lower-cased when building the schedule but compared raw when
    deciding to step it, so it stepped once per epoch."""
    kw = {"epochs": 2, "lr": 0.1, "warmup": 3}
    _, a = _run(small, scheduler="warmup-cosine", **kw)
    _, b = _run(small, scheduler="Warmup-Cosine", **kw)
    assert _comparable(a) == _comparable(b)
    n = 20  # iterations per epoch (1,000 images in batches of 50)
    from efficientml.train import _warmup_cosine
    assert a.lr[1] == pytest.approx(0.1 * _warmup_cosine(n, warmup=3, total=2 * n, floor=0.1))
    with pytest.raises(TypeError, match="scheduler must be a name"):
        _run(small, scheduler=None)


@pytest.mark.parametrize("clip", [-1.0, 0.0, float("nan"), float("inf")])
def test_clip_grad_norm_must_be_positive(small, clip):
    """-1 flipped the gradients' sign (the loss rose to hundreds of bits), 0 stopped learning."""
    with pytest.raises(ValueError, match="clip_grad_norm"):
        _run(small, epochs=1, clip_grad_norm=clip)


def test_targets_outside_the_model_s_classes_are_refused():
    """On a GPU such a target stops the device with an assertion; here it is a ValueError."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    for bad in (3, -2):
        y = torch.zeros(8, dtype=torch.long)
        y[5] = bad
        with pytest.raises(ValueError, match=f"target {bad} is no class of a model with 3 outputs"):
            fit(model, [(x, y)], epochs=1, device="cpu", progress=False)
        with pytest.raises(ValueError, match=f"target {bad}"):
            evaluate(model, [(x, y)])
    with pytest.raises(TypeError, match="int64"):
        evaluate(model, [(x, torch.zeros(8, dtype=torch.int32))])


def test_bad_loaders_are_refused():
    with pytest.raises(ValueError, match="gives no batches"):
        fit(nn.Linear(4, 3), [], epochs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="no targets"):
        evaluate(nn.Linear(4, 3), [])


@pytest.mark.parametrize("kw", [{"momentum": 1.0}, {"momentum": -0.1}, {"weight_decay": -1.0},
                                {"weight_decay": float("nan")}])
def test_optimizer_settings_validated(kw):
    with pytest.raises(ValueError):
        make_optimizer(nn.Linear(2, 2).parameters(), **kw)


def test_engine_makes_every_tensor_on_the_data_s_device_and_none_in_float64(small, tmp_path):
    """What a GPU or an Apple GPU would catch, caught on the CPU (tests/device_checks.py): no tensor
    made without the device, no float64 (MPS has none), in fit, its checkpoint and evaluate."""
    from device_checks import implicit_device_trap, no_float64
    train, test = small
    seed_everything(0)
    model = MLP(784, (16,), 10)
    loaders = (TensorLoader(train, 100, shuffle=True, augment=True, seed=0), TensorLoader(test, 500))
    with implicit_device_trap(), no_float64():
        for epochs in (1, 2):  # the second call resumes from the checkpoint
            h = fit(model, *loaders, epochs=epochs, lr=0.05, scheduler="multistep", milestones=[1],
                    clip_grad_norm=1.0,
                    checkpoint=tmp_path / "c.pt", device="cpu", progress=False)
        evaluate(model, loaders[1])
    assert h.epochs == 2


# -- Chapter 7: fit(precision=..., compile=...) ---------------------------------------------

def test_bfloat16_autocast_trains_like_float32(small):
    _, h32 = _run(small, epochs=2)
    _, hbf = _run(small, epochs=2, precision="bfloat16")
    assert hbf.train_loss != h32.train_loss                     # autocast did compute in bf16
    assert abs(hbf.train_loss[-1] - h32.train_loss[-1]) < 0.05  # bits
    assert abs(hbf.test_acc[-1] - h32.test_acc[-1]) < 0.05


def test_float16_scales_the_loss_and_resumes_its_scale(small, tmp_path, monkeypatch):
    scales = []
    real_update = torch.amp.GradScaler.update

    def update(self, *a, **kw):
        real_update(self, *a, **kw)
        scales.append(self.get_scale())
    monkeypatch.setattr(torch.amp.GradScaler, "update", update)
    ckpt = tmp_path / "fp16.pt"
    _, h = _run(small, epochs=1, precision="float16", checkpoint=ckpt)
    assert len(scales) == len(h.iter_loss) and not h.diverged
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["scaler"]["scale"] == scales[-1] and saved["settings"]["precision"] == "float16"
    with pytest.raises(ValueError, match="precision"):          # a float32 run may not resume it
        _run(small, epochs=2, checkpoint=ckpt)
    _, h2 = _run(small, epochs=2, precision="float16", checkpoint=ckpt)
    assert h2.epochs == 2 and h2.train_loss[0] == h.train_loss[0]


def test_compiled_training_computes_what_eager_does(small):
    _, eager = _run(small, epochs=1)
    _, compiled = _run(small, epochs=1, compile=True)
    assert compiled.train_loss[0] == pytest.approx(eager.train_loss[0], abs=1e-4)
    assert compiled.test_loss[0] == pytest.approx(eager.test_loss[0], abs=1e-4)


def test_precision_and_compile_reject_bad_values(small):
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, float16"):
        _run(small, epochs=1, precision="fp8")
    with pytest.raises(TypeError, match="compile must be True or False"):
        _run(small, epochs=1, compile="yes")


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_is_fused_on_the_cpu_and_takes_the_same_step(name):
    """make_optimizer's Adam and AdamW use PyTorch's fused kernel on a CPU (Chapter 7 measures
    the step it saves) and update the parameters as the default implementation does, to float
    rounding; on a device where fused is not known to run (here: meta tensors) they do not."""
    from efficientml.train import _fusable
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    b, start = copy.deepcopy(a), copy.deepcopy(a)
    opt_a = make_optimizer(param_groups(a, 0.1), name, lr=0.01)
    opt_b = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(param_groups(b, 0.1), lr=0.01)
    assert opt_a.defaults["fused"] is True and not opt_b.defaults["fused"]
    x = torch.randn(8, 5)
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start.parameters()):
        assert (p - p0).abs().max() > 1e-2  # three steps of lr 0.01 moved the tensor
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert _fusable([torch.zeros(2, requires_grad=True)])
    assert not _fusable([{"params": [torch.zeros(2, device="meta")]}])
