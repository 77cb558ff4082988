"""The labs' checkers: the book's solutions pass, a stub is reported as not written, and wrong
solutions fail with a message that names the mistake. The chapters' lab cells call these
checkers on the reader's function, and their dropdowns show these solutions."""
import math
import re
from pathlib import Path

import nbformat
import pytest
import torch

from efficientml import lab_solutions as sol
from efficientml import labs

BOOK = Path(__file__).resolve().parents[1] / "book"
PAIRS = {  # checker -> the book's solution
    labs.check_sgd_step: sol.sgd_step, labs.check_cosine_lr: sol.cosine_lr,
    labs.check_affine_quantize: sol.affine_quantize, labs.check_symmetric_per_channel: sol.symmetric_per_channel,
    labs.check_magnitude_prune: sol.magnitude_prune, labs.check_filter_prune: sol.filter_prune,
    labs.check_lora_forward: sol.lora_forward, labs.check_lora_merge: sol.lora_merge,
    labs.check_attention: sol.scaled_dot_product_attention,
    labs.check_sinusoidal_encoding: sol.positional_encoding,
    labs.check_kv_cache_step: sol.kv_cache_step, labs.check_sampling_probs: sol.sampling_probs,
    labs.check_linear_flops: sol.linear_flops, labs.check_to_bfloat16: sol.to_bfloat16,
    labs.check_gradient_accumulation: sol.gradient_accumulation, labs.check_ring_allreduce: sol.ring_allreduce,
    labs.check_groupwise_rtn: sol.groupwise_rtn, labs.check_speculative_accept: sol.speculative_accept,
}


def test_every_chapter_has_two_labs_and_every_lab_a_solution():
    assert sorted(labs.LABS) == list(range(1, 10))
    assert all(len(v) >= 2 for v in labs.LABS.values())
    assert {c for v in labs.LABS.values() for c in v} == set(PAIRS)


@pytest.mark.parametrize("check", PAIRS, ids=lambda c: c.__name__)
def test_the_books_solution_passes(check, capsys):
    state = torch.random.get_rng_state()
    check(PAIRS[check])
    assert re.search(r": passed\. \S", capsys.readouterr().out)
    assert torch.equal(torch.random.get_rng_state(), state)  # the chapter's random numbers are untouched


@pytest.mark.parametrize("check", PAIRS, ids=lambda c: c.__name__)
def test_a_stub_is_reported_as_not_written(check, capsys):
    def my_function(*args, **kwargs):
        raise NotImplementedError
    check(my_function)
    assert "my_function is not written yet" in capsys.readouterr().out


def test_a_checker_wants_a_function():
    with pytest.raises(TypeError, match="takes your function"):
        labs.check_attention(3)


def fails(check, fn, message):
    with pytest.raises(AssertionError, match=message):
        check(fn)


def test_wrong_sgd_steps_are_named():
    def lr_in_buffer(w, grad, buf, lr, momentum, wd):
        g = grad + wd * w
        buf = lr * g if buf is None else momentum * buf + lr * g
        return w - (buf if momentum else lr * g), buf
    fails(labs.check_sgd_step, lr_in_buffer, "lr changed: does your buffer hold lr")

    def no_decay(w, grad, buf, lr, momentum, wd):
        return sol.sgd_step(w, grad, buf, lr, momentum, 0.0)
    fails(labs.check_sgd_step, no_decay, "weight_decay 0.0005")
    fails(labs.check_cosine_lr, lambda e, n, hi, lo: hi * (1 + math.cos(math.pi * e / n)) / 2,
          r"fn\(0, 4, 0.05, 0.001\) = 0.05; CosineAnnealingLR gives 0.05|CosineAnnealingLR gives")
    fails(labs.check_cosine_lr, lambda e, n, hi, lo: "0.1", "want a number")


def test_wrong_quantizers_are_named():
    def min_max_range(x, bits):                       # the range need not contain 0
        scale = (x.max() - x.min()) / (2 ** bits - 1)
        zero = torch.round(-x.min() / scale)
        return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1), scale, zero
    fails(labs.check_affine_quantize, min_max_range, r"the range \[min\(x.min\(\), 0\)")

    def no_zero_guard(x, bits):
        scale = (x.max().clamp(min=0) - x.min().clamp(max=0)) / (2 ** bits - 1)
        zero = torch.round(-x.min().clamp(max=0) / scale)
        return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1), scale, zero
    fails(labs.check_affine_quantize, no_zero_guard, "all-zero tensor")

    def truncating(x, bits):
        codes, scale, zero = sol.affine_quantize(x, bits)
        return torch.clamp(torch.floor(x / scale) + zero, 0, 2 ** bits - 1), scale, zero
    fails(labs.check_affine_quantize, truncating, "at most scale / 2")

    def per_tensor(w, bits):
        codes, scales = sol.symmetric_per_channel(w.flatten()[None], bits)
        return codes.reshape(w.shape), scales.expand(w.shape[0])
    fails(labs.check_symmetric_per_channel, per_tensor, "scale of row")

    def full_range(w, bits):                           # codes up to 2**(bits-1), not 2**(bits-1) - 1
        s = w.abs().amax(1).clamp(min=1e-30) / (2 ** (bits - 1) - 0.5)
        return torch.round(w / s[:, None]), s
    fails(labs.check_symmetric_per_channel, full_range, "symmetric codes stay within")


def test_wrong_pruners_are_named():
    def by_value(w, sparsity):
        mask = torch.ones_like(w, dtype=torch.bool)
        mask.view(-1)[w.flatten().argsort()[:round(sparsity * w.numel())]] = False
        return mask
    fails(labs.check_magnitude_prune, by_value, r"rank by magnitude \|w\|")
    fails(labs.check_magnitude_prune, lambda w, s: sol.magnitude_prune(w, s) * 2, "only 0 and 1")
    fails(labs.check_magnitude_prune, lambda w, s: sol.magnitude_prune(w, min(1.0, s + 0.1)), "weights pruned, want")

    def l2(w, sparsity):
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[w.flatten(1).norm(dim=1).argsort()[:round(sparsity * w.shape[0])]] = False
        return keep
    fails(labs.check_filter_prune, l2, "L2 norm")

    def signed(w, sparsity):
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[w.flatten(1).sum(1).argsort()[:round(sparsity * w.shape[0])]] = False
        return keep
    fails(labs.check_filter_prune, signed, r"summing w, not \|w\|")


def test_wrong_lora_layers_are_named():
    fails(labs.check_lora_forward, lambda x, w, b, a, bb, alpha: x @ w.T + (0 if b is None else b)
          + alpha * x @ a.T @ bb.T, "scaling by alpha, not alpha / r")
    fails(labs.check_lora_forward, lambda x, w, b, a, bb, alpha: x @ w.T + (0 if b is None else b),
          "without the LoRA update")
    fails(labs.check_lora_merge, lambda w, a, bb, alpha: w + bb @ a, "without the scaling")
    fails(labs.check_lora_merge, lambda w, a, bb, alpha: (w.T + (alpha / a.shape[0]) * a.T @ bb.T), r"shape \(12, 8\)")


def test_wrong_attention_and_encodings_are_named():
    def unscaled(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1) @ v
    fails(labs.check_attention, unscaled, r"without dividing by sqrt\(d_k\)")

    def naive_exp(q, k, v, mask=None):
        s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).exp()
        if mask is not None:
            s = s * mask
        return s / s.sum(-1, keepdim=True) @ v
    fails(labs.check_attention, naive_exp, "subtract each row's maximum")

    def swapped(n, d):
        pe = sol.positional_encoding(n, d)
        return torch.stack([pe[:, 1::2], pe[:, 0::2]], -1).reshape(n, d)
    fails(labs.check_sinusoidal_encoding, swapped, "sin and cos swapped")


def test_wrong_decoding_steps_are_named():
    def forgets(q, k, v, cache):
        cache["k"], cache["v"] = k, v
        return sol.kv_cache_step(q, k, v, {})
    fails(labs.check_kv_cache_step, forgets, r"cache\['k'\]")

    def no_cache_use(q, k, v, cache):
        sol.kv_cache_step(q, k, v, cache)
        return v
    fails(labs.check_kv_cache_step, no_cache_use, "attending only to the newest token")
    fails(labs.check_sampling_probs, lambda z, t, k=None: sol.sampling_probs(z * t * t, t, k),
          "multiplying by the temperature")

    def exp_then_normalise(z, t, k=None):          # exp(logits / 0.002) overflows float64
        e = (z / t).exp() * (sol.sampling_probs(z, t, k) > 0)
        return e / e.sum(-1, keepdim=True)
    fails(labs.check_sampling_probs, exp_then_normalise, "NaN or inf")


def test_wrong_costs_are_named():
    fails(labs.check_linear_flops, lambda s, n, g: (math.prod(s) * n, 2 * math.prod(s) * n), "multiply-add is 2")
    fails(labs.check_linear_flops, lambda s, n, g: (2 * math.prod(s) * n,) * 2, "another for the input")
    fails(labs.check_to_bfloat16, lambda x: (x.view(torch.int32) & -65536).view(torch.float32),
          "cutting the low bits without rounding")

    def no_ties(x):
        return ((x.view(torch.int32) + 0x8000) & -65536).view(torch.float32)
    fails(labs.check_to_bfloat16, no_ties, "bfloat16 gives")


def test_wrong_parallel_steps_are_named():
    def whole_batch(model, loss_fn, x, y, micro):
        model.zero_grad()
        loss_fn(model(x), y).backward()
    fails(labs.check_gradient_accumulation, whole_batch, "the model saw batches of")

    def keeps_stale(model, loss_fn, x, y, micro):
        n = x.shape[0]
        for i in range(0, n, micro):
            (loss_fn(model(x[i:i + micro]), y[i:i + micro]) * (x[i:i + micro].shape[0] / n)).backward()
    fails(labs.check_gradient_accumulation, keeps_stale, "not cleared")

    def equal_weights(model, loss_fn, x, y, micro):
        model.zero_grad()
        parts = range(0, x.shape[0], micro)
        for i in parts:
            (loss_fn(model(x[i:i + micro]), y[i:i + micro]) / len(parts)).backward()
    fails(labs.check_gradient_accumulation, equal_weights, "weighs less")

    def broadcast(vectors, send):                       # sends whole vectors around the ring
        p = len(vectors)
        out = [v.clone() for v in vectors]
        for r in range(p):
            moving = vectors[r]
            for step in range(p - 1):
                moving = send((r + step) % p, (r + step + 1) % p, moving)
                out[(r + step + 1) % p] = out[(r + step + 1) % p] + moving
        return out
    fails(labs.check_ring_allreduce, broadcast, "a ring sends at most")
    fails(labs.check_ring_allreduce, lambda vs, send: [sum(vs)] * len(vs), "must reach each rank through send")
    fails(labs.check_ring_allreduce, lambda vs, send: [send(0, 2, v) for v in vs], r"send\(0, 2")


def test_wrong_serving_rules_are_named():
    fails(labs.check_groupwise_rtn, lambda w, b, g: sol.groupwise_rtn(w, b, w.shape[1]), "one scale per row")
    fails(labs.check_speculative_accept, lambda p, q, x: ((p[x] / q[x]).item(), p), r"min\(1, p\[x\] / q\[x\]\)")

    def residual_p(p, q, x):
        return min(1.0, (p[x] / q[x]).item()), p
    fails(labs.check_speculative_accept, residual_p, "not p =")


def lab_cells(path: Path) -> list[tuple[str, str]]:
    """(checker name, function name) of each lab cell: ``labs.check_X(fn)``."""
    cells = [c for c in nbformat.read(path, 4).cells if c.cell_type == "code" and "labs.check_" in c.source]
    return [re.search(r"^labs\.(check_\w+)\((\w+)\)\s*$", c.source, re.M).groups() for c in cells]


@pytest.mark.parametrize("chapter", range(1, 10))
def test_each_chapter_has_its_labs_with_stubs_and_solutions(chapter):
    (path,) = BOOK.glob(f"{chapter:02d}_*.ipynb")
    nb = nbformat.read(path, 4)
    found = lab_cells(path)
    assert [c for c, _ in found] == [c.__name__ for c in labs.LABS[chapter]]
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for (checker, name), cell in zip(found, [c for c in nb.cells if "labs.check_" in c.source]):
        assert f"def {name}(" in cell.source and "raise NotImplementedError" in cell.source  # a stub
        assert f":pyobject: {name}" in text  # the book's solution, shown in a dropdown
        assert PAIRS[getattr(labs, checker)] is getattr(sol, name)


def test_the_students_mistakes_are_caught():  # found by a reader's test of the labs
    def int_count(w, sparsity):                           # int() where the text says round()
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[w.abs().sum((1, 2, 3)).argsort()[:int(sparsity * w.shape[0])]] = False
        return keep
    fails(labs.check_filter_prune, int_count, "filters pruned, want")

    def max_norm(w, sparsity):
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[w.abs().amax((1, 2, 3)).argsort()[:round(sparsity * w.shape[0])]] = False
        return keep
    fails(labs.check_filter_prune, max_norm, "smallest sum of")

    def sqrt_dv(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) / math.sqrt(v.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1) @ v
    fails(labs.check_attention, sqrt_dv, r"sqrt\(d_v\), not sqrt\(d_k\)")

    def reversed_mask(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(mask, torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v
    fails(labs.check_attention, reversed_mask, "mask's meaning reversed")

    def no_zero_guard(w, bits, group):
        g = w.reshape(-1, group)
        lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
        s = (hi - lo) / (2 ** bits - 1)
        z = torch.round(-lo / s)
        return ((torch.clamp(torch.round(g / s) + z, 0, 2 ** bits - 1) - z) * s).reshape(w.shape)
    fails(labs.check_groupwise_rtn, no_zero_guard, "all-zero group")
    fails(labs.check_cosine_lr, lambda e, n, hi, lo: lo + (hi - lo) * (1 + math.cos(math.pi * e / (n - 1))) / 2
          if n > 1 else hi, "T_max = epochs")
