"""Checkers for the labs: functions the reader writes in each chapter.

Each ``check_*`` takes the reader's function, runs it on random and edge-case inputs, and
compares what it returns with a reference (PyTorch's own implementation where there is one:
``torch.optim.SGD``, ``CosineAnnealingLR``, ``torch.nn.utils.prune``,
``scaled_dot_product_attention``, ``FlopCounterMode``, ``Tensor.to(torch.bfloat16)``; otherwise
the book's package). It prints one line saying what passed, or raises ``AssertionError`` naming
the case that failed and, where a common mistake explains the answer, the mistake. A function
that still raises ``NotImplementedError`` (the stub on the page) is reported as not written
yet, without an error, so that the book runs from top to bottom.

The book's solutions are in ``efficientml.lab_solutions``; ``tests/test_labs.py`` runs every
checker on its solution and on wrong versions. Three more checkers belong to exercises and live
beside what they check: ``cost.check_gemm_intensity``, ``parallel.check_layer_activation_bytes``
and ``serving.check_tiled_attention``.
"""
import functools
import math
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


# -- what the checkers share -------------------------------------------------------------------

def _lab(check: Callable) -> Callable:
    """Wrap a checker: the reader's ``fn`` must be callable; a stub that raises
    ``NotImplementedError`` is reported as not written; a pass prints the checker's summary."""
    @functools.wraps(check)
    def run(fn: Callable) -> None:
        if not callable(fn):
            raise TypeError(f"{check.__name__} takes your function, got {type(fn).__name__}")
        name = getattr(fn, "__name__", "your function")
        try:
            with torch.random.fork_rng(devices=[]):   # the chapter's random numbers stay as they were
                summary = check(fn)
        except NotImplementedError:
            print(f"{name} is not written yet (it raised NotImplementedError): write it, then run "
                  f"this cell again.")
            return
        print(f"{name}: passed. {summary}")
    return run


def _tensor(got, what: str, shape=None) -> torch.Tensor:
    """``got`` as a float64 tensor, after checking its type, shape and finiteness."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}")
    if shape is not None and tuple(got.shape) != tuple(shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, want {tuple(shape)}")
    got = got.detach().cpu().to(torch.float64)
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: contains NaN or inf")
    return got


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want.to(torch.float64)).abs().max().item() if got.numel() else 0.0


def _compare(got, want: torch.Tensor, tol: float, what: str, mistakes: dict | None = None) -> None:
    """Raise unless ``got`` is within ``tol`` of ``want`` everywhere; if it matches one of the
    ``mistakes`` ({description: tensor}) instead, say which."""
    got = _tensor(got, what, want.shape)
    diff = _max_diff(got, want)
    if diff <= tol:
        return
    for description, wrong in (mistakes or {}).items():
        if wrong.shape == got.shape and _max_diff(got, wrong) <= tol:
            raise AssertionError(f"{what}: your result is what you get {description}")
    raise AssertionError(f"{what}: differs from the reference by up to {diff:.3g} (want <= {tol:g})")


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- Chapter 1: learning rates -----------------------------------------------------------------

@_lab
def check_sgd_step(fn: Callable) -> str:
    """Lab 1.1. ``fn(w, grad, buf, lr, momentum, weight_decay) -> (w_new, buf_new)``: one step
    of SGD with momentum and L2 weight decay as ``torch.optim.SGD`` takes it (``buf`` is None
    before the first step). Checked over 5 steps with a changing learning rate against
    ``torch.optim.SGD`` in float64, with and without momentum and weight decay."""
    g = _generator(1)
    lrs = [0.1, 0.1, 0.05, 0.01, 0.2]                     # a schedule: lr changes between steps
    cases = [(0.9, 5e-4), (0.0, 0.0), (0.9, 0.0), (0.0, 1e-2), (0.5, 0.1)]
    for momentum, wd in cases:
        w0 = torch.randn(7, 3, generator=g, dtype=torch.float64)
        grads = [torch.randn(7, 3, generator=g, dtype=torch.float64) for _ in lrs]
        p = nn.Parameter(w0.clone())
        opt = torch.optim.SGD([p], lr=lrs[0], momentum=momentum, weight_decay=wd)
        w, buf = w0.clone(), None
        for i, (lr, grad) in enumerate(zip(lrs, grads)):
            for group in opt.param_groups:
                group["lr"] = lr
            p.grad = grad.clone()
            opt.step()
            out = fn(w.clone(), grad.clone(), None if buf is None else buf.clone(), lr, momentum, wd)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise AssertionError(f"fn must return (w_new, buf_new), got {type(out).__name__}")
            w, buf = out
            what = f"step {i + 1} (lr {lr}, momentum {momentum}, weight_decay {wd})"
            w = _tensor(w, what, w0.shape)
            if momentum and buf is None:
                raise AssertionError(f"{what}: buf_new is None; with momentum the buffer carries over")
            diff = _max_diff(w, p.detach())
            if diff > 1e-12:
                hint = ""
                if i > 0 and momentum and lrs[i] != lrs[i - 1]:
                    hint = " (the step where lr changed: does your buffer hold lr * gradient? PyTorch's holds the gradient)"
                elif wd and not momentum:
                    hint = " (weight decay adds weight_decay * w to the gradient)"
                raise AssertionError(f"{what}: weights differ from torch.optim.SGD's by {diff:.3g}{hint}")
    return f"{len(cases)} settings x {len(lrs)} steps equal torch.optim.SGD's (float64)."


@_lab
def check_cosine_lr(fn: Callable) -> str:
    """Lab 1.2. ``fn(epoch, epochs, lr_max, lr_min) -> lr``: the cosine schedule's learning rate
    in epoch ``epoch`` (0 to ``epochs``), compared with ``torch.optim.lr_scheduler
    .CosineAnnealingLR(T_max=epochs, eta_min=lr_min)`` stepped once per epoch."""
    cases = [(12, 0.1, 0.0), (1, 0.1, 0.0), (4, 0.05, 0.001), (30, 1.0, 0.1)]
    for epochs, lr_max, lr_min in cases:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr_max)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=lr_min)
        for epoch in range(epochs + 1):
            want = sched.get_last_lr()[0]
            got = fn(epoch, epochs, lr_max, lr_min)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                got = float(got) if isinstance(got, torch.Tensor) and got.numel() == 1 else got
            if not isinstance(got, (int, float)):
                raise AssertionError(f"fn({epoch}, {epochs}, {lr_max}, {lr_min}) returned {type(got).__name__}, want a number")
            if not abs(got - want) <= 1e-9 * lr_max:
                raise AssertionError(f"fn({epoch}, {epochs}, {lr_max}, {lr_min}) = {got:.6g}; "
                                     f"CosineAnnealingLR gives {want:.6g} in epoch {epoch} (it reaches lr_min "
                                     f"in epoch {epochs}, the last one counted: T_max = epochs)")
            opt.step()
            sched.step()
    return f"every epoch of {len(cases)} schedules equals CosineAnnealingLR's."


# -- Chapter 2: quantization -------------------------------------------------------------------

def _codes(got, what: str, shape) -> torch.Tensor:
    codes = _tensor(got, what, shape)
    if not torch.equal(codes, codes.round()):
        raise AssertionError(f"{what}: codes must be whole numbers")
    return codes


def _same_codes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Codes equal to the reference's, but for rare ties decided the other way by float rounding."""
    off = (got - want.to(torch.float64)).abs()
    if off.max() > 1 or (off > 0).float().mean() > 1e-3:
        i = int(off.flatten().argmax())
        raise AssertionError(f"{what}: code {int(got.flatten()[i])} at index {i}, want {int(want.flatten()[i])} "
                             f"({int((off > 0).sum())} of {off.numel()} codes differ)")


@_lab
def check_affine_quantize(fn: Callable) -> str:
    """Lab 2.1. ``fn(x, bits) -> (codes, scale, zero_point)``: affine min/max quantization of
    the whole tensor as Chapter 2 defines it (the range [min(x, 0), max(x, 0)] split into
    2**bits - 1 steps; codes = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)). Compared
    with ``quantization.quantize``; 0 must come back exactly; an all-zero tensor must work."""
    from .quantization import quantize
    g = _generator(2)
    normal = torch.randn(1000, generator=g)
    cases = {"randn(1000)": normal, "values in [0.5, 1.5]": torch.rand(500, generator=g) + 0.5,
             "values in [-3, -1]": -1 - 2 * torch.rand(300, generator=g),
             "a 4 x 5 matrix with zeros": torch.randn(4, 5, generator=g) * (torch.arange(20).reshape(4, 5) % 3 > 0)}
    n = 0
    for label, x in cases.items():
        for bits in (8, 4, 2, 1):
            what = f"fn(x, {bits}) with x = {label}"
            out = fn(x.clone(), bits)
            if not (isinstance(out, tuple) and len(out) == 3):
                raise AssertionError(f"{what}: must return (codes, scale, zero_point)")
            codes, scale, zero = out
            ref = quantize(x, bits)
            codes = _codes(codes, what, x.shape)
            if codes.min() < 0 or codes.max() > 2 ** bits - 1:
                raise AssertionError(f"{what}: codes from {int(codes.min())} to {int(codes.max())}, "
                                     f"outside 0..{2 ** bits - 1}")
            scale, zero = float(scale), float(zero)
            if not math.isclose(scale, float(ref.scale), rel_tol=1e-5):
                raise AssertionError(f"{what}: scale {scale:.6g}, want {float(ref.scale):.6g} "
                                     "(the range [min(x.min(), 0), max(x.max(), 0)] in 2**bits - 1 steps)")
            if abs(zero - float(ref.zero_point)) > 1:  # a zero point computed in another precision may round the other way
                raise AssertionError(f"{what}: zero point {zero:g}, want {float(ref.zero_point):g} "
                                     "(round(-lo / scale): the code that stands for 0)")
            x_hat = (codes - zero) * scale
            err = (x_hat - x.double()).abs().max().item()
            if err > scale / 2 * (1 + 1e-3):
                raise AssertionError(f"{what}: (codes - zero_point) * scale is up to {err:.3g} from x; rounding to "
                                     f"the nearest step leaves at most scale / 2 = {scale / 2:.3g}")
            if (x_hat[x == 0] != 0).any():
                raise AssertionError(f"{what}: a 0 in x does not dequantize to exactly 0")
            n += 1
    zeros = torch.zeros(6)
    codes, scale, zero = fn(zeros.clone(), 8)
    codes = torch.as_tensor(codes, dtype=torch.float64)
    x_hat = (codes - float(zero)) * float(scale)
    if not torch.equal(x_hat, torch.zeros(6, dtype=torch.float64)):
        raise AssertionError("fn(zeros(6), 8): an all-zero tensor must come back as zeros (its range is 0: "
                             "choose any positive scale, e.g. 1, instead of dividing by 0)")
    return f"{n} tensors and bit widths agree with quantization.quantize; 0 is exact; all-zero input works."


@_lab
def check_symmetric_per_channel(fn: Callable) -> str:
    """Lab 2.2. ``fn(w, bits) -> (codes, scales)``: symmetric quantization with one scale per
    row (output channel) of a 2-D weight: scale = max|row| / (2**(bits-1) - 1), signed codes
    round(w / scale) in -(2**(bits-1) - 1)..2**(bits-1) - 1. Compared with
    ``quantization.quantize(w, bits, axis=0, symmetric=True)``; an all-zero row must work."""
    from .quantization import quantize
    g = _generator(3)
    rows = 10.0 ** torch.linspace(-3, 2, 12)                    # rows of very different sizes
    w = torch.randn(12, 40, generator=g) * rows[:, None]
    w_zero_row = w.clone()
    w_zero_row[5] = 0
    n = 0
    for label, x in {"rows from 1e-3 to 1e2": w, "a row of zeros": w_zero_row}.items():
        for bits in (8, 4, 2):
            what = f"fn(w, {bits}) with {label}"
            out = fn(x.clone(), bits)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise AssertionError(f"{what}: must return (codes, scales)")
            codes, scales = out
            half = 2 ** (bits - 1)
            codes = _codes(codes, what, x.shape)
            scales = _tensor(torch.as_tensor(scales), f"{what}: scales", (x.shape[0],))
            if codes.abs().max() > half - 1:
                raise AssertionError(f"{what}: a code of {int(codes.abs().max())}; symmetric codes stay "
                                     f"within +-{half - 1}")
            ref = quantize(x, bits, axis=0, symmetric=True)
            live = x.abs().amax(1) > 0
            if (scales[~live] <= 0).any():
                raise AssertionError(f"{what}: an all-zero row needs a positive scale (any: its codes are 0)")
            ratio = scales[live] / ref.scale[live].to(torch.float64)
            if ((ratio - 1).abs() > 1e-5).any():
                i = int(((ratio - 1).abs()).argmax())
                raise AssertionError(f"{what}: scale of row {i} is {ratio[i].item():.4g} times the reference "
                                     f"(max|row| / {half - 1}, one per row)")
            _same_codes(codes, ref.codes.to(torch.int64) - half, what)
            n += 1
    return f"{n} weights and bit widths agree with quantization.quantize(..., axis=0, symmetric=True)."


# -- Chapter 3: pruning ------------------------------------------------------------------------

def _mask(got, what: str, shape) -> torch.Tensor:
    mask = _tensor(got, what, shape)
    if not ((mask == 0) | (mask == 1)).all():
        raise AssertionError(f"{what}: a mask holds only 0 and 1 (or False and True)")
    return mask.bool()


@_lab
def check_magnitude_prune(fn: Callable) -> str:
    """Lab 3.1. ``fn(w, sparsity) -> mask``: unstructured magnitude pruning; the mask (shaped
    like ``w``) is 0 at the round(sparsity * w.numel()) weights of smallest |w| and 1 elsewhere.
    Compared with ``torch.nn.utils.prune.l1_unstructured``."""
    from torch.nn.utils import prune
    g = _generator(4)
    cases = [((20, 30), 0.5), ((20, 30), 0.9), ((20, 30), 0.0), ((20, 30), 1.0), ((20, 30), 0.333),
             ((8, 4, 3, 3), 0.75), ((5,), 0.4)]
    for shape, sparsity in cases:
        w = torch.randn(*shape, generator=g) * 3
        holder = nn.Module()
        holder.weight = nn.Parameter(w.clone())
        want = prune.l1_unstructured(holder, "weight", amount=sparsity).weight_mask.bool()
        what = f"fn(w, {sparsity}) with w of shape {shape}"
        got = _mask(fn(w.clone(), sparsity), what, shape)
        if int((~got).sum()) != int((~want).sum()):
            raise AssertionError(f"{what}: {int((~got).sum())} weights pruned, want {int((~want).sum())} "
                                 f"(round(sparsity * numel))")
        if not torch.equal(got, want):
            kept_small = w.abs()[got].min().item()
            pruned_big = w.abs()[~got].max().item()
            raise AssertionError(f"{what}: pruned a weight with |w| = {pruned_big:.3g} but kept one with |w| = "
                                 f"{kept_small:.3g} (rank by magnitude |w|, not by w)")
    return f"{len(cases)} shapes and sparsities give torch.nn.utils.prune.l1_unstructured's mask."


@_lab
def check_filter_prune(fn: Callable) -> str:
    """Lab 3.2. ``fn(w, sparsity) -> keep``: filter pruning of a convolution weight (out, in,
    kh, kw) by the L1 norm of each output filter; ``keep`` (out,) is False for the
    round(sparsity * out) filters of smallest L1 norm. Compared with
    ``torch.nn.utils.prune.ln_structured(n=1, dim=0)``."""
    from torch.nn.utils import prune
    g = _generator(5)
    cases = [((16, 8, 3, 3), 0.5), ((16, 8, 3, 3), 0.3), ((16, 8, 3, 3), 0.0), ((10, 3, 5, 5), 0.25),
             ((6, 2, 1, 1), 0.45)]                       # 0.3 * 16 = 4.8: round, not int, gives 5
    for shape, sparsity in cases:
        # filters of slightly different sizes and signs: the L1, L2, max and signed rankings differ
        w = torch.randn(*shape, generator=g) + 0.3 * torch.randn(shape[0], 1, 1, 1, generator=g)
        w = w * (1 + 0.1 * torch.rand(shape[0], 1, 1, 1, generator=g))
        holder = nn.Module()
        holder.weight = nn.Parameter(w.clone())
        want = prune.ln_structured(holder, "weight", amount=sparsity, n=1, dim=0).weight_mask[:, 0, 0, 0].bool()
        what = f"fn(w, {sparsity}) with w of shape {shape}"
        got = _mask(fn(w.clone(), sparsity), what, (shape[0],))
        if int((~got).sum()) != int((~want).sum()):
            raise AssertionError(f"{what}: {int((~got).sum())} filters pruned, want {int((~want).sum())}")
        if not torch.equal(got, want):
            mistakes = {"summing w, not |w|": w.flatten(1).sum(1), "with the L2 norm": w.flatten(1).norm(dim=1)}
            for name, score in mistakes.items():
                order = score.argsort()[: int((~want).sum())]
                if torch.equal(~got, torch.zeros_like(got).index_fill(0, order, True)):
                    raise AssertionError(f"{what}: your mask is the one you get ranking filters {name}")
            raise AssertionError(f"{what}: pruned filters {(~got).nonzero().flatten().tolist()}, want "
                                 f"{(~want).nonzero().flatten().tolist()} (smallest sum of |w| over in, kh, kw)")
    return f"{len(cases)} weights and sparsities give torch.nn.utils.prune.ln_structured's filters."


# -- Chapter 4: LoRA ---------------------------------------------------------------------------

def _lora_reference(weight, bias, a, b, alpha):
    from .lora import LoRALinear
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    layer = LoRALinear(base, r=a.shape[0], alpha=alpha)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return layer


def _lora_cases():
    g = _generator(6)
    f64 = dict(generator=g, dtype=torch.float64)
    for (n_in, n_out, r, alpha, bias, lead) in [(12, 8, 4, 6.0, True, (5,)), (12, 8, 1, 1.0, False, (2, 3)),
                                                (6, 10, 3, 16.0, True, (4,))]:
        yield (torch.randn(*lead, n_in, **f64), torch.randn(n_out, n_in, **f64),
               torch.randn(n_out, **f64) if bias else None, torch.randn(r, n_in, **f64),
               torch.randn(n_out, r, **f64), alpha)


@_lab
def check_lora_forward(fn: Callable) -> str:
    """Lab 4.1. ``fn(x, weight, bias, A, B, alpha) -> y``: the output of a LoRA-adapted Linear,
    y = x W^T + b + (alpha / r) x A^T B^T with W (out, in), b (out,) or None, A (r, in),
    B (out, r) and x (..., in). Compared with ``lora.LoRALinear`` in float64 (B is random here,
    not zero as at the start of training, so the update shows)."""
    n = 0
    for x, w, b, a, bb, alpha in _lora_cases():
        r = a.shape[0]
        want = _lora_reference(w, b, a, bb, alpha)(x).detach()
        base = F.linear(x, w, b)
        update = x @ a.T @ bb.T
        what = f"fn(x, W, b, A, B, alpha={alpha}) with x {tuple(x.shape)}, r = {r}, bias {'given' if b is not None else 'None'}"
        mistakes = {"without the LoRA update": base, "scaling by alpha, not alpha / r": base + alpha * update,
                    "without scaling the update": base + update, "without the bias": want - (0 if b is None else b)}
        _compare(fn(x.clone(), w.clone(), None if b is None else b.clone(), a.clone(), bb.clone(), alpha),
                 want, 1e-10, what, {k: v for k, v in mistakes.items() if not torch.allclose(v, want)})
        n += 1
    return f"{n} shapes (with and without bias, batched inputs) equal lora.LoRALinear's output."


@_lab
def check_lora_merge(fn: Callable) -> str:
    """Lab 4.2. ``fn(weight, A, B, alpha) -> merged``: the weight (out, in) of one plain Linear
    that computes what the adapted layer computes, W + (alpha / r) B A; checked against
    ``lora.LoRALinear.merge`` and by comparing the two layers' outputs."""
    n = 0
    for x, w, b, a, bb, alpha in _lora_cases():
        layer = _lora_reference(w, b, a, bb, alpha)
        want_out = layer(x).detach()
        want = layer.merge().base.weight.detach().clone()
        what = f"fn(W, A, B, alpha={alpha}) with W {tuple(w.shape)}, r = {a.shape[0]}"
        got = fn(w.clone(), a.clone(), bb.clone(), alpha)
        _compare(got, want, 1e-10, what, {"without the scaling alpha / r": w + bb @ a,
                                          "scaling by alpha, not alpha / r": w + alpha * bb @ a})
        _compare(F.linear(x, _tensor(got, what), b), want_out, 1e-10, f"{what}: the merged layer's output")
        n += 1
    return f"{n} merged weights equal LoRALinear.merge's, and the merged layers compute the adapted outputs."


# -- Chapter 5: the Transformer ----------------------------------------------------------------

@_lab
def check_attention(fn: Callable) -> str:
    """Lab 5.1. ``fn(q, k, v, mask=None) -> out``: scaled dot-product attention,
    softmax(q k^T / sqrt(d_k)) v over the last two dimensions, ``mask`` boolean and True where a
    query may see a key. Compared with ``F.scaled_dot_product_attention``: batched and per-head
    shapes, T_q != T_k, a causal mask, and float32 scores large enough to overflow exp()."""
    g = _generator(7)
    cases = []
    for shape_q, shape_k, masked, scale, dtype in [((2, 3, 5, 8), (2, 3, 5, 8), None, 1.0, torch.float64),
                                                   ((2, 3, 6, 8), (2, 3, 6, 8), "causal", 1.0, torch.float64),
                                                   ((1, 2, 3, 4), (1, 2, 7, 4), "random", 1.0, torch.float64),
                                                   ((2, 4, 5), (2, 6, 5), None, 1.0, torch.float64),
                                                   ((4, 9, 16), (4, 9, 16), "causal", 40.0, torch.float32)]:
        q = torch.randn(*shape_q, generator=g, dtype=dtype) * scale
        k = torch.randn(*shape_k, generator=g, dtype=dtype) * scale
        d_v = 2 if shape_q[-1] == 5 else shape_k[-1]                # one case with d_v != d_k
        v = torch.randn(*shape_k[:-1], d_v, generator=g, dtype=dtype)
        t_q, t_k = shape_q[-2], shape_k[-2]
        if masked == "causal":
            mask = torch.ones(t_q, t_k, dtype=torch.bool).tril()
        elif masked == "random":
            mask = torch.rand(1, 1, t_q, t_k, generator=g) < 0.6
            mask[..., 0] = True                                    # every query sees a key
        else:
            mask = None
        cases.append((q, k, v, mask))
    for q, k, v, mask in cases:
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        what = (f"fn(q, k, v, mask) with q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype}, "
                f"mask {'None' if mask is None else tuple(mask.shape)}")
        tol = 1e-10 if q.dtype == torch.float64 else 1e-4
        mistakes = {"without dividing by sqrt(d_k)": F.scaled_dot_product_attention(
            q.double() * math.sqrt(q.shape[-1]), k.double(), v.double(), attn_mask=mask)}
        if v.shape[-1] != q.shape[-1]:
            mistakes["dividing by sqrt(d_v), not sqrt(d_k)"] = F.scaled_dot_product_attention(
                q.double() * math.sqrt(q.shape[-1] / v.shape[-1]), k.double(), v.double(), attn_mask=mask)
        if mask is not None:
            scores = (q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1]))
            reversed_ = scores.masked_fill(mask, torch.finfo(torch.float64).min).softmax(-1) @ v.double()
            mistakes["with the mask's meaning reversed (True must mean 'may attend')"] = reversed_
        got = fn(q.clone(), k.clone(), v.clone(), mask) if mask is not None else fn(q.clone(), k.clone(), v.clone())
        if isinstance(got, tuple):
            got = got[0]
        if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
            if q.dtype == torch.float32:
                raise AssertionError(f"{what}: NaN or inf: exp() of large scores overflows; subtract each row's "
                                     "maximum before exp (softmax does)")
            if mask is not None:
                raise AssertionError(f"{what}: NaN or inf, though every query here may see a key: is True in "
                                     "your mask 'may attend'? (A row of -inf scores gives NaN.)")
        _compare(got, want, tol, what, mistakes)
    return (f"{len(cases)} cases equal F.scaled_dot_product_attention (masks, T_q != T_k, d_v != d_k, "
            "large float32 scores).")


@_lab
def check_sinusoidal_encoding(fn: Callable) -> str:
    """Lab 5.2. ``fn(max_len, d_model) -> pe``: the sinusoidal positional encoding (max_len,
    d_model), PE[pos, 2i] = sin(pos / 10000^(2i/d_model)) and PE[pos, 2i+1] = cos(the same).
    Compared with ``transformer.sinusoidal_encoding`` (to 2e-4: float32 arguments up to a few
    hundred radians carry that much rounding)."""
    from .transformer import sinusoidal_encoding
    cases = [(50, 16), (512, 64), (1, 2), (7, 6)]
    for max_len, d in cases:
        want = sinusoidal_encoding(max_len, d).double()
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]
        omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        swapped = torch.stack([torch.cos(pos * omega), torch.sin(pos * omega)], -1).reshape(max_len, d)
        halves = torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)], 1)
        _compare(fn(max_len, d), want, 2e-4, f"fn({max_len}, {d})",
                 {"with sin and cos swapped (sin goes in the even columns 2i)": swapped,
                  "with all sines first, then all cosines (they alternate: column 2i sin, 2i + 1 cos)": halves})
    return f"{len(cases)} sizes equal transformer.sinusoidal_encoding."


# -- Chapter 6: a language model ---------------------------------------------------------------

@_lab
def check_kv_cache_step(fn: Callable) -> str:
    """Lab 6.1. ``fn(q, k, v, cache) -> out``: one decoding step of causal self-attention with a
    key-value cache. q, k, v (B, h, 1, d) belong to the newest token; ``cache`` is a dict, empty
    before the first token, in which ``fn`` keeps all keys and values so far as ``cache["k"]`` and
    ``cache["v"]`` (B, h, t, d). Returns the newest token's attention output (B, h, 1, d). Run
    token by token, the outputs must equal causal attention over the whole sequence."""
    g = _generator(8)
    for b, h, t, d in [(2, 3, 9, 4), (1, 1, 1, 8), (1, 4, 20, 16)]:
        q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cache = {}
        for i in range(t):
            what = f"step {i + 1} of {t} (B={b}, h={h}, d={d})"
            out = fn(q[:, :, i:i + 1].clone(), k[:, :, i:i + 1].clone(), v[:, :, i:i + 1].clone(), cache)
            for name, full in (("k", k), ("v", v)):
                if name not in cache:
                    raise AssertionError(f"{what}: cache has no {name!r} after the step")
                _compare(cache[name], full[:, :, :i + 1], 0, f"{what}: cache[{name!r}]")
            _compare(out, want[:, :, i:i + 1], 1e-10, what,
                     {"attending only to the newest token (the cache's keys unused)": v[:, :, i:i + 1]})
    return "token-by-token outputs equal causal attention over the whole sequence; the cache grows by one."


@_lab
def check_sampling_probs(fn: Callable) -> str:
    """Lab 6.2. ``fn(logits, temperature, top_k=None) -> probs``: the distribution
    ``LanguageModel.generate`` samples the next token from: logits (B, V) divided by the
    temperature, all but the ``top_k`` largest set to -inf (ties with the k-th kept), softmax.
    Rows sum to 1; tiny temperatures must not overflow."""
    g = _generator(9)
    logits = torch.randn(4, 30, generator=g, dtype=torch.float64) * 3
    cases = [(1.0, None), (0.5, 5), (2.0, 1), (0.002, 3), (0.005, None), (1.0, 30), (0.8, 100)]

    def dist(z, top_k):
        if top_k is not None:
            kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        return z.softmax(-1)

    for temperature, top_k in cases:
        want = dist(logits / temperature, top_k)
        what = f"fn(logits, temperature={temperature}, top_k={top_k}) with logits {tuple(logits.shape)}"
        mistakes = {"without the temperature": dist(logits, top_k),
                    "multiplying by the temperature, not dividing": dist(logits * temperature, top_k)}
        got = fn(logits.clone(), temperature, top_k)
        if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
            raise AssertionError(f"{what}: NaN or inf (exp of logits / temperature overflows: use softmax, "
                                 "which subtracts the maximum)")
        _compare(got, want, 1e-10, what, {k: v for k, v in mistakes.items() if not torch.allclose(v, want)})
    return f"{len(cases)} temperatures and top-k values give generate's distribution."


# -- Chapter 7: what a model costs --------------------------------------------------------------

@_lab
def check_linear_flops(fn: Callable) -> str:
    """Lab 7.1. ``fn(input_shape, out_features, input_requires_grad) -> (forward, backward)``:
    the floating-point operations of an ``nn.Linear(input_shape[-1], out_features)`` on an input
    of ``input_shape`` (any leading dimensions), forward and backward (the backward computes the
    weight's gradient, and the input's only when it requires one). A multiply-add counts 2;
    the bias is not counted. Compared with ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode
    cases = [((32, 784), 256, True), ((32, 784), 256, False), ((4, 16, 128), 512, True), ((1, 10), 1, True),
             ((2, 3, 5, 6), 7, False)]
    for shape, out_features, needs in cases:
        layer = nn.Linear(shape[-1], out_features)
        x = torch.randn(*shape, requires_grad=needs)
        with FlopCounterMode(display=False) as fwd:
            y = layer(x)
        with FlopCounterMode(display=False) as bwd:
            y.sum().backward()
        want = (fwd.get_total_flops(), bwd.get_total_flops())
        got = fn(shape, out_features, needs)
        what = f"fn({shape}, {out_features}, input_requires_grad={needs})"
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"{what}: must return (forward, backward)")
        got = tuple(int(v) for v in got)
        if got != want:
            hint = ""
            if got[0] * 2 == want[0]:
                hint = " (a multiply-add is 2 FLOPs, not 1)"
            elif got[0] == want[0] and got[1] != want[1]:
                hint = (" (the backward is a product for the weight's gradient and, when the input "
                        "requires one, another for the input's)")
            raise AssertionError(f"{what} = {got}; FlopCounterMode counts {want}{hint}")
    return f"{len(cases)} layers and inputs agree with FlopCounterMode, forward and backward."


@_lab
def check_to_bfloat16(fn: Callable) -> str:
    """Lab 7.2. ``fn(x) -> y``: float32 ``x`` rounded to bfloat16's precision and returned as
    float32, by bit manipulation: bfloat16 keeps the top 16 bits of a float32 (sign, 8 exponent
    bits, 7 mantissa bits); rounding to nearest, ties to even, means adding 0x7FFF plus the lowest
    kept bit to the 32-bit pattern before cutting the low 16 bits. Compared with
    ``x.to(torch.bfloat16)``, including ties, negative numbers, the smallest normal numbers,
    values that round up to the next power of 2 and values that overflow to inf. (Subnormal
    numbers, below 2**-126, are left out: some kernels flush them to zero.)"""
    g = _generator(10)
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x00800000, 0x00818000,
                         0xBF808000, 0x7F7F8000, 0x3FFFFFFF], dtype=torch.int64)
    special = (bits - (bits >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32).view(torch.float32)
    x = torch.cat([special, torch.randn(2000, generator=g) * 10.0 ** torch.randint(-30, 30, (2000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, float("inf"), float("-inf")])])
    want = x.to(torch.bfloat16).to(torch.float32)
    got = fn(x.clone())
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        raise AssertionError(f"fn(x) returned {getattr(got, 'shape', type(got))}, want a tensor of shape {tuple(x.shape)}")
    got = got.to(torch.float32)
    same = (got == want) | (got.isnan() & want.isnan())
    if not same.all():
        i = int((~same).nonzero()[0])
        pattern = x[i:i + 1].view(torch.int32).item() & 0xFFFFFFFF
        truncated = (x.view(torch.int32) & -65536).view(torch.float32)
        hint = " (that is cutting the low bits without rounding)" if torch.equal(got[~same], truncated[~same]) else ""
        raise AssertionError(f"fn(x)[{i}] = {got[i].item()!r} for x = {x[i].item()!r} (bits 0x{pattern:08X}); "
                             f"bfloat16 gives {want[i].item()!r}{hint}")
    return f"{x.numel()} values (ties, overflow, inf) round as x.to(torch.bfloat16) does."


# -- Chapter 8: training past one device --------------------------------------------------------

@_lab
def check_gradient_accumulation(fn: Callable) -> str:
    """Lab 8.1. ``fn(model, loss_fn, x, y, micro_batch)``: set every parameter's ``.grad`` to
    the gradient of ``loss_fn(model(x), y)`` (a mean over the batch) while passing at most
    ``micro_batch`` rows through the model at a time. Gradients left from before must not count;
    the last micro-batch may be smaller than the others (weight each by its size). Compared with
    one backward pass over the whole batch, in float64."""
    g = _generator(11)
    cases = [(12, 4), (10, 4), (7, 7), (9, 1), (5, 8)]
    for n, micro in cases:
        torch.manual_seed(n)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        want = [p.grad.clone() for p in model.parameters()]
        sizes = []
        hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        for p in model.parameters():
            p.grad = torch.full_like(p, 100.0)                # stale gradients, to be discarded
        fn(model, F.cross_entropy, x, y, micro)
        hook.remove()
        what = f"fn(model, loss_fn, x, y, micro_batch={micro}) with a batch of {n}"
        if not sizes or max(sizes) > micro or sum(sizes) != n:
            raise AssertionError(f"{what}: the model saw batches of {sizes}; want batches of at most {micro} "
                                 f"covering the {n} rows once")
        for (name, p), w in zip(model.named_parameters(), want):
            if p.grad is None:
                raise AssertionError(f"{what}: {name}.grad is None")
            got = p.grad.detach()
            if (got - w).abs().max() > 1e-10:
                hint = ""
                if (got - 100 - w).abs().max() < 1e-8:
                    hint = " (the gradients from before were not cleared)"
                elif n % micro and (got - w).abs().max() > 0:
                    hint = " (a smaller last micro-batch weighs less: scale each loss by its rows / n)"
                raise AssertionError(f"{what}: {name}.grad differs from the whole batch's by "
                                     f"{(got - w).abs().max().item():.3g}{hint}")
    return f"{len(cases)} batch and micro-batch sizes give the whole batch's gradients (float64)."


@_lab
def check_ring_allreduce(fn: Callable) -> str:
    """Lab 8.2. ``fn(vectors, send) -> results``: an all-reduce of p 1-D tensors (rank r holds
    ``vectors[r]``) along a ring, where data moves only by ``send(src, dst, tensor)``, which
    returns what ``dst`` receives and allows only dst = (src + 1) % p. Every result must be the
    sum of all vectors, and no rank may send more than a ring's reduce-scatter and all-gather do,
    2 (p - 1) chunks of ceil(n / p) elements: about 2n, whatever p is."""
    g = _generator(12)
    cases = [(1, 5), (2, 8), (4, 10), (3, 2), (5, 1000)]
    for p, n in cases:
        vectors = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(p)]
        sent = Counter()

        def send(src: int, dst: int, tensor: torch.Tensor, p=p, sent=sent) -> torch.Tensor:
            if not (isinstance(src, int) and 0 <= src < p and dst == (src + 1) % p):
                raise AssertionError(f"send({src}, {dst}, ...) with p = {p}: a ring sends only from rank r "
                                     "to rank (r + 1) % p")
            sent[src] += tensor.numel()
            return tensor.detach().clone()

        what = f"fn(vectors, send) with p = {p} vectors of {n}"
        results = fn([v.clone() for v in vectors], send)
        if not isinstance(results, (list, tuple)) or len(results) != p:
            raise AssertionError(f"{what}: must return a list of {p} tensors, one per rank")
        total = torch.stack(vectors).sum(0)
        for r, got in enumerate(results):
            _compare(got, total, 1e-12 * n, f"{what}: rank {r}'s result")
        limit = 2 * (p - 1) * math.ceil(n / p)
        worst = max(sent.values(), default=0)
        if worst > limit:
            raise AssertionError(f"{what}: a rank sent {worst} elements; a ring sends at most {limit} "
                                 "(split each vector into p chunks and pass one chunk per step)")
        if p > 1 and sum(sent.values()) < (p - 1) * n:
            raise AssertionError(f"{what}: only {sum(sent.values())} elements were sent in all: the "
                                 "results must reach each rank through send")
    return f"{len(cases)} rings give every rank the sum, sending at most 2 (p - 1) ceil(n / p) elements each."


# -- Chapter 9: serving -------------------------------------------------------------------------

@_lab
def check_groupwise_rtn(fn: Callable) -> str:
    """Lab 9.1. ``fn(w, bits, group_size) -> w_hat``: round-to-nearest group-wise quantization of
    a Linear weight (out, in), returned dequantized: each row is cut into groups of
    ``group_size`` consecutive weights and each group is quantized with its own affine scale and
    zero point (Chapter 2's formula). Compared with ``serving.rtn``."""
    from .serving import rtn
    g = _generator(13)
    w = torch.randn(8, 64, generator=g) * torch.linspace(0.1, 3, 64)   # columns of different sizes
    w[3, :16] = 0                                                       # an all-zero group
    cases = [(4, 32), (4, 8), (2, 64), (8, 16), (3, 1)]
    for bits, group in cases:
        want = rtn(w, bits, group)
        per_row = rtn(w, bits, w.shape[1])
        what = f"fn(w, {bits}, {group}) with w {tuple(w.shape)}"
        got = fn(w.clone(), bits, group)
        if isinstance(got, torch.Tensor) and not torch.isfinite(got).all():
            raise AssertionError(f"{what}: NaN or inf (row 3 starts with an all-zero group: its range is 0, so "
                                 "give it any positive scale instead of dividing by 0)")
        got = _tensor(got, what, w.shape)
        err = (got - want.double()).abs()
        far = (err > 1e-5).double().mean().item()
        if far > 1e-3:  # a rare tie may round the other way; more is a different grid
            if group < w.shape[1] and (got - per_row.double()).abs().max() <= 1e-5:
                raise AssertionError(f"{what}: your result is what you get with one scale per row, not per group")
            raise AssertionError(f"{what}: {far:.1%} of the weights differ from serving.rtn's (by up to "
                                 f"{err.max().item():.3g})")
    return f"{len(cases)} bit widths and group sizes agree with serving.rtn (an all-zero group included)."


@_lab
def check_speculative_accept(fn: Callable) -> str:
    """Lab 9.2. ``fn(p, q, x) -> (accept, residual)``: speculative decoding's rule for one
    guess. The draft proposed token ``x`` from its distribution ``q``; the target's is ``p``
    (both (V,)). ``accept`` is the probability of keeping x, min(1, p[x] / q[x]); ``residual``
    (V,) is the distribution to draw from after a rejection, max(0, p - q) normalised (when
    p = q nothing is ever rejected: return any distribution, e.g. p). Checked by the theorem:
    drawing x from q and applying the rule yields p exactly (float64, every x)."""
    g = _generator(14)
    p1, q1 = (-torch.rand(6, generator=g, dtype=torch.float64).log() for _ in range(2))  # Dirichlet(1, ..., 1)
    p1, q1 = p1 / p1.sum(), q1 / q1.sum()
    q_zero = q1.clone()
    q_zero[0] = 0
    q_zero /= q_zero.sum()
    p_zero = p1.clone()
    p_zero[2] = 0
    p_zero /= p_zero.sum()
    cases = {"random p and q": (p1, q1), "p = q": (p1, p1.clone()), "p = 0 where q is not": (p_zero, q1),
             "q = 0 where p is not": (p1, q_zero),
             "two tokens": (torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64))}
    for label, (p, q) in cases.items():
        out_dist = torch.zeros_like(p)
        for x in range(p.shape[0]):
            if q[x] == 0:
                continue                                  # the draft never proposes it
            what = f"fn(p, q, {x}) with {label}"
            out = fn(p.clone(), q.clone(), x)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise AssertionError(f"{what}: must return (accept, residual)")
            accept, residual = float(out[0]), _tensor(out[1], f"{what}: residual", p.shape)
            want = min(1.0, (p[x] / q[x]).item())
            if not abs(accept - want) <= 1e-12:
                raise AssertionError(f"{what}: accept = {accept:.6g}, want min(1, p[x] / q[x]) = {want:.6g}")
            if (residual < 0).any() or abs(residual.sum().item() - 1) > 1e-12 and (p - q).clamp(min=0).sum() > 0:
                raise AssertionError(f"{what}: the residual must be a distribution (>= 0, summing to 1)")
            out_dist[x] += q[x] * accept
            out_dist += q[x] * (1 - accept) * residual
        if not torch.allclose(out_dist, p, rtol=0, atol=1e-12):
            raise AssertionError(f"with {label}: drawing from q and applying your rule gives {out_dist.numpy().round(4)}, "
                                 f"not p = {p.numpy().round(4)} (the residual is max(0, p - q), normalised)")
    return f"{len(cases)} pairs of distributions: the rule turns the draft's samples into the target's distribution."


LABS = {  # chapter: the checkers of its labs, in the order the chapter has them
    1: (check_sgd_step, check_cosine_lr),
    2: (check_affine_quantize, check_symmetric_per_channel),
    3: (check_magnitude_prune, check_filter_prune),
    4: (check_lora_forward, check_lora_merge),
    5: (check_attention, check_sinusoidal_encoding),
    6: (check_kv_cache_step, check_sampling_probs),
    7: (check_linear_flops, check_to_bfloat16),
    8: (check_gradient_accumulation, check_ring_allreduce),
    9: (check_groupwise_rtn, check_speculative_accept),
}
