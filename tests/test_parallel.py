"""Chapter 8's engine (efficientml.parallel): memory formulas against measured bytes,
checkpointing and accumulation against plain training, processes launched and always ended."""
import copy

import pytest
import torch
import torch.nn.functional as F

from efficientml import parallel
from efficientml.lora import optimizer_state_bytes, saved_activation_bytes
from efficientml.train import param_groups
from efficientml.transformer import LanguageModel

SIZES = [(3, 8, 16, 2, 32, 1), (3, 8, 16, 2, 32, 3), (5, 33, 24, 3, 40, 2)]


@pytest.mark.parametrize("b,t,d,h,f,n", SIZES)
def test_activation_formula_equals_measured_bytes(b, t, d, h, f, n):
    torch.manual_seed(0)
    model = LanguageModel(65, d, h, n, f, 0.0, max_len=t)
    x = torch.randint(0, 65, (b, t))
    assert saved_activation_bytes(model, x) == parallel.activation_bytes(b, t, d, h, f, n)


def test_saved_tensors_of_one_block_add_up_to_the_layer_formula():
    torch.manual_seed(0)
    model = LanguageModel(65, 16, 2, 3, 32, 0.0, max_len=8)
    x = torch.randint(0, 65, (3, 8))
    every = parallel.saved_tensors(model, x)
    assert sum(b for *_, b in every) == saved_activation_bytes(model, x)
    block = parallel.saved_tensors(model, x, within=model.layers[1])
    assert sum(b for *_, b in block) == parallel.layer_activation_bytes(3, 8, 16, 2, 32)
    assert ((8, 8), torch.bool, 64) in block and ((3, 2, 8, 8), torch.float32, 4 * 3 * 2 * 64) in block
    assert not model.layers[1]._forward_hooks      # the hooks are removed


def test_parameter_and_state_formulas():
    model = LanguageModel(65, 16, 2, 3, 32, 0.0, max_len=8)
    n = sum(p.numel() for p in model.parameters())
    assert parallel.language_model_parameters(65, 16, 3, 32) == n
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    x = torch.randint(0, 65, (2, 8))
    F.cross_entropy(model(x).reshape(-1, 65), x.reshape(-1)).backward()
    opt.step()
    state = parallel.model_state_bytes(n)
    assert optimizer_state_bytes(opt) == state["optimizer"] == 8 * n
    assert state["parameters"] == state["gradients"] == 4 * n
    z = parallel.model_state_bytes(n, "mixed", shards=4, zero_stage=2)
    assert z == {"parameters": 2 * n, "gradients": 2 * n / 4, "optimizer": 12 * n / 4}
    with pytest.raises(ValueError):
        parallel.model_state_bytes(n, zero_stage=4)
    with pytest.raises(ValueError):
        parallel.model_state_bytes(n, recipe="float64")
    with pytest.raises(ValueError):
        parallel.model_state_bytes(n, shards=0)


def test_checkpointed_gradients_identical_and_less_memory():
    torch.manual_seed(0)
    model = LanguageModel(65, 32, 2, 3, 64, 0.0, max_len=16)
    ckpt = parallel.checkpoint_blocks(copy.deepcopy(model))
    x, y = torch.randint(0, 65, (4, 16)), torch.randint(0, 65, (4, 16))
    for m in (model, ckpt):
        F.cross_entropy(m(x).reshape(-1, 65), y.reshape(-1)).backward()
    for a, b in zip(model.parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert parallel.forward_held_bytes(ckpt, x, y) < parallel.forward_held_bytes(model, x, y) / 2
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ckpt.eval()(x))
    with pytest.raises(TypeError):
        parallel.checkpoint_blocks(torch.nn.Linear(2, 2))


def test_step_memory_counts():
    torch.manual_seed(0)
    model = LanguageModel(65, 16, 2, 2, 32, 0.0, max_len=8)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 65, (3, 8)), torch.randint(0, 65, (3, 8))
    m = parallel.step_memory(model, opt, x, y)
    assert (m.parameters, m.gradients, m.optimizer_state) == (4 * n, 4 * n, 8 * n)
    assert m.activations == parallel.activation_bytes(3, 8, 16, 2, 32, 2)
    assert m.held_after_forward >= m.activations and m.peak >= m.activations


def test_accumulation_equals_one_large_batch():
    torch.manual_seed(0)
    model = LanguageModel(65, 16, 2, 2, 32, 0.0, max_len=8)
    x, y = torch.randint(0, 65, (12, 8)), torch.randint(0, 65, (12, 8))
    full = parallel.accumulate_gradients(model, x, y, 1)
    ref = [p.grad.clone() for p in model.parameters()]
    for k in (2, 3, 4, 12):
        loss = parallel.accumulate_gradients(model, x, y, k)
        assert loss == pytest.approx(full, abs=1e-6)
        for p, g in zip(model.parameters(), ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        parallel.accumulate_gradients(model, x, y, 5)
    with pytest.raises(ValueError):
        parallel.accumulate_gradients(model, x, y, 0)


TINY = dict(text="tinyshakespeare", val_fraction=0.1, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0,
            block_size=8, batch_size=4, lr=1e-3, weight_decay=0.1, clip_grad_norm=1.0, seed=0)


def test_data_parallel_matches_one_process():
    steps = 5
    single = parallel.train_data_parallel(0, 1, TINY, "single", steps)
    runs = parallel.launch(parallel.data_parallel_runs, 2,
                           (TINY, {"allreduce": steps, "ddp": steps, "zero": steps, "fsdp": steps}), timeout=240)
    for mode in ("allreduce", "ddp", "zero", "fsdp"):
        r0, r1 = runs[0][mode], runs[1][mode]
        assert torch.equal(r0["params"], r1["params"])          # every process holds the same model
        assert r0["losses"] == pytest.approx(single["losses"], abs=1e-4)
        # AdamW divides by sqrt(v): a rounding difference in a tiny gradient moves a weight by up to
        # about lr per step (measured: 1.8e-4 after 5 steps); the bound is 5 times that
        torch.testing.assert_close(r0["params"], single["params"], rtol=0, atol=1e-3)
    assert runs[0]["allreduce"]["losses"] == runs[0]["ddp"]["losses"]  # the same sums, exactly
    full = single["optimizer_state"]
    for mode in ("zero", "fsdp"):   # each process keeps the AdamW state of its share only
        shards = [runs[r][mode]["optimizer_state"] for r in (0, 1)]
        assert sum(shards) == full and max(shards) < 0.75 * full, mode


def test_bad_runs_rejected():
    with pytest.raises(ValueError):
        parallel.train_data_parallel(0, 1, TINY, "ddp", 2)
    with pytest.raises(ValueError):
        parallel.train_data_parallel(0, 3, TINY, "allreduce", 2)   # 3 does not divide the batch of 4
    with pytest.raises(ValueError):
        parallel.train_data_parallel(0, 1, TINY, "fsdp", 2)
    with pytest.raises(ValueError):
        parallel.launch(parallel.allreduce_times, 0)
    with pytest.raises(ValueError):
        parallel.launch(parallel.allreduce_times, 2, backend="mpi")


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return rank


def _sleep(rank, world_size):
    import time
    time.sleep(600)


def _ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(t)
    return (rank, world_size, t.item())


def test_launch_returns_every_rank_and_handles_ports(monkeypatch):
    import socket
    assert parallel.launch(_ranks, 2, timeout=120) == [(0, 2, 3.0), (1, 2, 3.0)]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match="in use"):
            parallel.launch(_ranks, 2, port=port)


def test_launch_failure_and_timeout_leave_no_process():
    import multiprocessing
    with pytest.raises(parallel.LaunchError, match="on purpose"):
        parallel.launch(_raise_on_rank_1, 2, timeout=120)
    with pytest.raises(TimeoutError):
        parallel.launch(_sleep, 2, timeout=8)
    assert not multiprocessing.active_children()


def test_allreduce_times_shapes():
    out = parallel.launch(parallel.allreduce_times, 2, ([16, 1024], [(3, 4), (5,)], 3), timeout=120)[0]
    assert out["sizes"] == [16, 1024] and len(out["seconds"]) == 2 and out["tensors"] == 2
    assert out["elements"] == 17 and min(out["seconds"]) > 0
    assert all(0 < a <= b for a, b in zip(out["fastest"], out["seconds"]))


def test_exercise_check_accepts_the_formula_and_rejects_a_wrong_one(capsys):
    parallel.check_layer_activation_bytes(parallel.layer_activation_bytes)
    assert "equals the measured bytes" in capsys.readouterr().out
    no_mask = lambda b, t, d, h, f: parallel.layer_activation_bytes(b, t, d, h, f) - t * t  # noqa: E731
    with pytest.raises(AssertionError, match="missing"):
        parallel.check_layer_activation_bytes(no_mask)
    with pytest.raises(AssertionError, match="not a number"):
        parallel.check_layer_activation_bytes(lambda *a: None)
