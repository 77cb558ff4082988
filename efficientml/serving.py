"""Serving a language model cheaply (the serving chapter's engine; the chapter is not written yet).

- **Tiled attention**: ``tiled_attention``, the forward pass of FlashAttention (Dao et al., 2022)
  in plain PyTorch: keys and values visited a tile at a time with an *online softmax*, so that
  no (T_q x T_k) matrix of scores is ever held; equal to ``transformer.attention`` to float32
  rounding.
- **The KV cache's memory**: ``kv_cache_bytes`` (the formula) and ``cache_bytes`` (measured on
  the caches ``LanguageModel`` fills).
- **Speculative decoding** (Leviathan et al., 2023; Chen et al., 2023): ``speculative_generate``,
  a small draft model proposes ``k`` tokens, the target model checks them in one call and keeps
  a prefix; the output follows the target model's own distribution exactly (greedy: the same
  tokens as ``target.generate``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .transformer import LanguageModel, _check_tokens, _model_device, sample_tokens


# -- Tiled attention with an online softmax ----------------------------------------------------

def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    tile: int = 64) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_k)) v, computed ``tile`` keys at a time (and ``tile`` queries at a
    time), never holding more than a (tile x tile) block of scores.

    q (..., T_q, d_k), k (..., T_k, d_k), v (..., T_k, d_v) -> (..., T_q, d_v). ``causal``: query
    i sees keys 0 .. i + T_k - T_q (the last T_q positions of a sequence of T_k, as in generation
    with a cache). For each query the running maximum ``m`` of its scores, the running sum ``l``
    of exp(score - m) and the running weighted sum ``acc`` of values are updated tile by tile;
    when a tile raises the maximum, what was summed so far is rescaled by exp(m_old - m_new).
    The output is acc / l. A row with no visible key (impossible when T_q <= T_k) is 0.
    """
    if not (q.dim() >= 2 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"q, k, v need the same leading shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"q and k need the same d_k, k and v the same length; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be an int >= 1, got {tile!r}")
    t_q, t_k = q.shape[-2], k.shape[-2]
    if causal and t_q > t_k:
        raise ValueError(f"causal attention needs T_q <= T_k, got {t_q} > {t_k}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    offset = t_k - t_q                                  # query i is position offset + i
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for i0 in range(0, t_q, tile):
        qi = q[..., i0:i0 + tile, :] * scale                                   # (..., tq, d)
        rows = torch.arange(i0, i0 + qi.shape[-2], device=q.device)[:, None] + offset
        m = torch.full(qi.shape[:-1] + (1,), float("-inf"), dtype=q.dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*qi.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        last = t_k if not causal else min(t_k, offset + i0 + qi.shape[-2])     # keys any row sees
        for j0 in range(0, last, tile):
            s = qi @ k[..., j0:j0 + tile, :].transpose(-2, -1)                 # (..., tq, tk)
            if causal:
                cols = torch.arange(j0, j0 + s.shape[-1], device=q.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)   # rows with nothing yet
            p = torch.exp(s - safe)
            rescale = torch.exp(m - safe)
            l = l * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ v[..., j0:j0 + tile, :]
            m = m_new
        out[..., i0:i0 + qi.shape[-2], :] = torch.where(l > 0, acc / l.clamp_min(1e-30), torch.zeros_like(acc))
    return out


# -- The KV cache ------------------------------------------------------------------------------

def kv_cache_bytes(n_layers: int, d_model: int, tokens: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Bytes of the keys and values a decoder keeps for ``tokens`` positions of ``batch``
    sequences: per layer one key and one value vector of d_model entries per position,
    2 N B T d values."""
    for name, x in (("n_layers", n_layers), ("d_model", d_model), ("tokens", tokens), ("batch", batch),
                    ("bytes_per_value", bytes_per_value)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    return 2 * n_layers * batch * tokens * d_model * bytes_per_value


def cache_bytes(caches: list[dict]) -> int:
    """Bytes held in the key and value tensors of ``LanguageModel`` caches (one dict per layer)."""
    return sum(t.numel() * t.element_size() for c in caches for t in c.values() if torch.is_tensor(t))


def _cache_length(caches: list[dict]) -> int:
    return caches[0]["k"].shape[2] if caches and "k" in caches[0] else 0


def _truncate(caches: list[dict], length: int) -> None:
    """Keep the first ``length`` positions of every layer's keys and values (rejected tokens out)."""
    for c in caches:
        if "k" in c:
            c["k"], c["v"] = c["k"][:, :, :length], c["v"][:, :, :length]


# -- Speculative decoding ----------------------------------------------------------------------

class NGramDraft(nn.Module):
    """A draft model for ``speculative_generate`` without a network: an n-gram model's
    next-token log-probabilities (how often each token followed each context of n - 1 tokens in
    a text, add-``alpha`` smoothed), looked up in a table of V^(n-1) x V entries. It keeps no
    cache (each call looks the whole sequence up: a gather, microseconds).

    forward(tokens (B, T), start=0, caches=None) -> log-probabilities (B, T, V): position t's
    context is tokens t - n + 2 .. t, padded on the left with token 0 before the text starts.
    ``from_tokens(tokens, vocab_size, n, alpha)`` counts them in a 1-D tensor of token ids."""

    def __init__(self, log_probs: torch.Tensor, n: int):
        super().__init__()
        self.n, self.vocab_size = n, log_probs.shape[1]
        self.log_probs = nn.Parameter(log_probs, requires_grad=False)   # a parameter: it names the device
        self.layers = nn.ModuleList()                                   # no KV cache
        self.max_len = 2 ** 62                                          # no context limit

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, vocab_size: int, n: int = 3, alpha: float = 0.01) -> "NGramDraft":
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be a 1-D int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 (unseen contexts need a distribution), got {alpha}")
        if len(tokens) < n or tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"need at least n = {n} tokens, all in 0..{vocab_size - 1}")
        idx = cls._context_index(tokens[None].cpu(), n, vocab_size)[0, :-1] * vocab_size + tokens[1:].cpu()
        counts = torch.bincount(idx, minlength=vocab_size ** n).reshape(vocab_size ** (n - 1), vocab_size).double()
        probs = (counts + alpha) / (counts.sum(1, keepdim=True) + alpha * vocab_size)
        return cls(probs.log().float(), n)

    @staticmethod
    def _context_index(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
        """(B, T): the row of the table for each position's context of n - 1 tokens."""
        padded = torch.nn.functional.pad(tokens, (n - 2, 0)) if n > 2 else tokens
        idx = torch.zeros_like(tokens)
        for j in range(n - 1):
            idx = idx * vocab_size + padded[:, j:j + tokens.shape[1]]
        return idx

    def forward(self, tokens: torch.Tensor, start: int = 0, caches: list | None = None) -> torch.Tensor:
        return self.log_probs[self._context_index(tokens, self.n, self.vocab_size)]


def _vocab(model: nn.Module) -> int:
    return model.vocab_size if isinstance(model, NGramDraft) else model.out.out_features


@dataclass
class SpeculativeStats:
    """What a ``speculative_generate`` call did: ``rounds`` (target calls after the prompt),
    ``proposed`` and ``accepted`` draft tokens; ``acceptance`` = accepted / proposed, and
    ``tokens_per_round``: tokens gained per target call (accepted + 1 each round, at most k + 1)."""
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def _extend(model: LanguageModel, caches: list[dict], tokens: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on the tokens of ``tokens`` (1, T) that its cache does not hold yet; return
    the logits (1, n, V) of those n positions (n >= 1 required)."""
    done = _cache_length(caches)
    return model(tokens[:, done:], start=done, caches=caches)


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits / temperature).softmax(-1)


@torch.no_grad()
def speculative_generate(target: LanguageModel, draft: LanguageModel, prompt: torch.Tensor, n_tokens: int,
                         k: int = 4, temperature: float = 0.0,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Extend ``prompt`` (1, T0) by ``n_tokens`` tokens of ``target``, ``k`` guessed at a time by
    ``draft`` (a smaller ``LanguageModel``, or an ``NGramDraft``); returns (tokens (1, T0 +
    n_tokens), ``SpeculativeStats``).

    Each round the draft proposes up to k tokens one by one (from its own cache); the target
    scores all of them in one call (k + 1 positions: its next-token distribution after each
    prefix). Proposal x_j, drawn from the draft's q_j, is kept with probability
    min(1, p_j(x_j) / q_j(x_j)), where p_j is the target's; at the first rejection a token is
    drawn from the normalised max(0, p_j - q_j) instead and the round ends; if all k are kept, one
    more is drawn from p_{k+1}. Every token then follows the target's distribution exactly
    (Leviathan et al., 2023, Theorem 1). ``temperature`` 0 is greedy: a proposal is kept when it
    is the target's argmax, and the output equals ``target.generate(prompt, n, temperature=0)``.
    Rejected positions are cut from both models' KV caches. The whole text must fit the models'
    context (T0 + n_tokens + k <= max_len of both): no sliding window here.
    """
    device = _model_device(target)
    _check_tokens(prompt, device, "prompt")
    if _model_device(draft) != device:
        raise ValueError(f"the draft model is on {_model_device(draft)}, the target on {device}")
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence: prompt must be (1, T), got {tuple(prompt.shape)}")
    v_t, v_d = _vocab(target), _vocab(draft)
    if v_t != v_d:
        raise ValueError(f"the draft's vocabulary ({v_d} tokens) differs from the target's ({v_t})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    need = prompt.shape[1] + n_tokens + k
    if need > min(target.max_len, draft.max_len):
        raise ValueError(f"prompt + n_tokens + k = {need} positions exceed the models' context "
                         f"({min(target.max_len, draft.max_len)})")
    modes = target.training, draft.training
    target.eval(), draft.eval()
    stats = SpeculativeStats()
    out = prompt
    t_cache, d_cache = [{} for _ in target.layers], [{} for _ in draft.layers]
    if prompt.shape[1] > 1:                         # both caches hold all but the last token
        _extend(target, t_cache, prompt[:, :-1]), _extend(draft, d_cache, prompt[:, :-1])
    while out.shape[1] - prompt.shape[1] < n_tokens:
        kk = min(k, n_tokens - (out.shape[1] - prompt.shape[1]) - 1)
        proposals, q = [], []
        seq = out
        for _ in range(kk):                          # the draft guesses, one token at a time
            logits = _extend(draft, d_cache, seq)[:, -1]
            if temperature == 0:
                x = logits.argmax(-1, keepdim=True)
            else:
                q.append(_probs(logits, temperature))
                x = sample_tokens(q[-1], generator)
            proposals.append(x)
            seq = torch.cat([seq, x], dim=1)
        logits = _extend(target, t_cache, seq)[:, -(kk + 1):]        # one call: kk + 1 positions
        stats.rounds += 1
        stats.proposed += kk
        kept = 0
        for j, x in enumerate(proposals):
            if temperature == 0:
                ok = bool(x.item() == logits[0, j].argmax().item())
            else:
                p = _probs(logits[:, j], temperature)
                ratio = p[0, x.item()] / q[j][0, x.item()]
                u = torch.rand((), generator=generator, device="cpu" if generator is None
                               else generator.device).item()
                ok = u < min(1.0, ratio.item())
            if not ok:
                break
            kept += 1
        if temperature == 0:
            extra = logits[:, kept].argmax(-1, keepdim=True)
        else:
            p = _probs(logits[:, kept], temperature)
            if kept < kk:                             # the residual distribution max(0, p - q)
                residual = (p - q[kept]).clamp_min(0)
                p = residual / residual.sum() if residual.sum() > 0 else p
            extra = sample_tokens(p, generator)
        stats.accepted += kept
        out = torch.cat([out] + proposals[:kept] + [extra], dim=1)
        _truncate(t_cache, out.shape[1] - 1), _truncate(d_cache, out.shape[1] - 1)
    target.train(modes[0]), draft.train(modes[1])
    return out, stats


# -- Weight-only quantization, group-wise ------------------------------------------------------

def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int):
    """Quantize a Linear weight (out, in) in groups of ``group_size`` consecutive input columns
    of each row, one scale and zero point per group (affine min/max, ``quantization.quantize`` on
    the rows of w reshaped to (out * in / group_size, group_size)). Returns the
    ``QuantizedArray`` of that reshaped weight; ``dequantize_groupwise`` undoes it."""
    from .quantization import quantize
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"quantize_groupwise takes a 2-D weight (out, in), got {getattr(w, 'shape', type(w))}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if w.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the row of {w.shape[1]} inputs")
    return quantize(w.detach().reshape(-1, group_size), bits, axis=0)


def dequantize_groupwise(q, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight of ``shape`` (out, in) that ``quantize_groupwise`` codes stand for."""
    from .quantization import dequantize
    return dequantize(q).reshape(shape)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest weight-only quantization: ``w`` quantized group-wise and dequantized."""
    return dequantize_groupwise(quantize_groupwise(w, bits, group_size), tuple(w.shape)).to(w.device)


GROUPWISE_FORMAT = "efficientml-groupwise-1"


def _linear_weights(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def save_groupwise(model: nn.Module, f, bits: int, group_size: int) -> None:
    """Store ``model`` with every ``nn.Linear`` weight in ``bits`` bits, group-wise
    (``quantize_groupwise``): the codes packed densely (``quantization.pack_codes``: two 4-bit
    codes a byte, ...), a float32 scale and a uint8 zero point per group. Every other floating
    tensor of the state dict (embedding, biases, LayerNorms) is stored in float32. ``torch.save``
    of a dict (``f`` a path or file object), everything on the CPU; ``load_groupwise`` reads it."""
    from .quantization import array_entry
    weights, tensors, floats = _linear_weights(model), {}, {}
    for name, t in model.state_dict().items():
        if name in weights:
            tensors[name] = array_entry(quantize_groupwise(t.detach().float().cpu(), bits, group_size))
        elif t.is_floating_point():
            floats[name] = t.detach().float().cpu()
    torch.save({"format": GROUPWISE_FORMAT, "bits": bits, "group_size": group_size, "tensors": tensors,
                "float32": floats}, f)


def load_groupwise(model: nn.Module, f) -> nn.Module:
    """Load what ``save_groupwise`` stored into ``model`` (its Linear weights dequantized to
    float32: the values ``rtn`` gives), on the model's device; returns it. Raises ValueError for
    a file of another kind or for a model the file does not fit."""
    from .quantization import array_from_entry
    saved = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != GROUPWISE_FORMAT:
        raise ValueError(f"not a file written by save_groupwise (format {GROUPWISE_FORMAT})")
    state = model.state_dict()
    unknown = [n for n in list(saved["tensors"]) + list(saved["float32"]) if n not in state]
    if unknown:
        raise ValueError(f"the file holds tensors the model does not have: {unknown}")
    for name, entry in saved["tensors"].items():
        w = dequantize_groupwise(array_from_entry(entry, saved["bits"]), tuple(state[name].shape))
        state[name] = w.to(state[name].device, state[name].dtype)
    for name, t in saved["float32"].items():
        state[name] = t.to(state[name].device, state[name].dtype)
    model.load_state_dict(state)
    return model


def linear_inputs(model: nn.Module, batches, max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """The inputs each ``nn.Linear`` of ``model`` receives on the calibration ``batches`` (token
    tensors (B, T)), flattened to (rows, in_features) and cut to ``max_rows`` rows:
    ``{module name: tensor}``. The model runs in eval mode without gradients."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(
                    args[0].detach().reshape(-1, args[0].shape[-1]))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = _model_device(model)
            for tokens in batches:
                model(tokens.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(xs)[:max_rows] for name, xs in seen.items()}


AWQ_GRID = tuple(i / 20 for i in range(21))   # the exponents alpha searched: 0, 0.05, ..., 1


def awq_scales(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int,
               grid: tuple[float, ...] = AWQ_GRID) -> tuple[torch.Tensor, float, float]:
    """Activation-aware weight quantization's per-input-channel scales for one Linear (Lin et
    al., 2024): input channels whose activations are large matter more, so each column j of
    ``w`` (out, in) is multiplied by s_j = mean|x_j|^alpha before round-to-nearest and the input
    divided by it after (``(Q(w s) / s) x``: the same product, other rounding). alpha is searched
    on ``grid`` for the least mean squared error of the layer's output on the calibration inputs
    ``x`` (rows, in). alpha = 0 is plain round-to-nearest, so the result is never worse than it on
    ``x``. Returns (s, the chosen alpha, its error)."""
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"calibration inputs must be (rows, {w.shape[1]}), got {tuple(x.shape)}")
    w, x = w.detach(), x.detach().to(w.dtype)
    reference = x @ w.T
    magnitude = x.abs().mean(0).clamp_min(1e-8)
    best = None
    for alpha in grid:
        s = magnitude ** alpha
        s = s / (s.max() * s.min()).sqrt()                      # centred around 1
        wq = rtn(w * s, bits, group_size) / s
        err = ((x @ wq.T - reference) ** 2).mean().item()
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best


GPTQ_DAMP = 0.01   # of the mean diagonal of H, added to it: keeps the inverse stable


def _calibration_hessian(w: torch.Tensor, x: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H = 2 X^T X / rows + damp * mean(diag H) * I in float64, the weight in float64 with the
    columns of inputs that were always 0 set to 0: they never reach the output)."""
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"calibration inputs must be (rows, {w.shape[1]}), got {tuple(x.shape)}")
    x = x.detach().double()
    h = 2 * x.T @ x / x.shape[0]
    w = w.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, w


def _group_grid(w_group: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per row of a (out, group) block, as ``quantization.quantize`` sets them."""
    from .quantization import quantize
    q = quantize(w_group.float(), bits, axis=0)
    return q.scale.double().to(w_group.device), q.zero_point.double().to(w_group.device)


def _round_to_grid(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.clamp(torch.round(col / scale) + zero, 0, 2 ** bits - 1) - zero) * scale


def gptq(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """GPTQ (Frantar et al., 2023): quantize a Linear weight ``w`` (out, in) one input column at
    a time, and after each column spread its rounding error over the columns not yet quantized,
    so that the layer's output on the calibration inputs ``x`` (rows, in) moves as little as it
    can (the Optimal Brain Surgeon update, with H = 2 X^T X / rows). The inverse of H enters
    through its upper Cholesky factor U: column i's error (w_i - q_i) / U_ii is subtracted,
    times row i of U, from the later columns. Group-wise: each group's scale and zero point
    (``quantization.quantize``'s min/max) are set from the group's weights as they are when the
    group is reached. Returns the dequantized weight (out, in), float32, on ``w``'s device."""
    quantize_groupwise(w, bits, group_size)                      # the same checks as round to nearest
    h, work = _calibration_hessian(w.detach().cpu(), x.detach().cpu(), damp)   # float64: on the CPU
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(work)
    for i in range(work.shape[1]):
        if i % group_size == 0:
            scale, zero = _group_grid(work[:, i:i + group_size], bits)
        q = _round_to_grid(work[:, i], scale, zero, bits)
        out[:, i] = q
        err = (work[:, i] - q) / u[i, i]
        work[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return out.float().to(w.device)


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int, group_size: int, method: str = "rtn",
                     calibration: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Replace, in place, the weight of every ``nn.Linear`` of ``model`` by its group-wise
    ``bits``-bit version, dequantized to float32 (weight-only quantization simulated: the
    arithmetic stays float32, the values are those a packed file would hold). ``method``:
    "rtn" (round to nearest), "awq" (``awq_scales``, with ``calibration``, the layers' inputs
    from ``linear_inputs``; the scales are folded into the stored weight, as dividing the input
    by s and multiplying back gives the same product) or "gptq" (``gptq``, with ``calibration``).
    A layer without calibration inputs is rounded to nearest. Returns, per layer, the alpha chosen
    (AWQ) and the output error on the calibration inputs where there are some."""
    if method not in ("rtn", "awq", "gptq"):
        raise ValueError(f"method must be 'rtn', 'awq' or 'gptq', got {method!r}")
    if method != "rtn" and not calibration:
        raise ValueError(f"method {method!r} needs calibration inputs: calibration=linear_inputs(model, batches)")
    report = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        x = (calibration or {}).get(name)
        if method == "awq" and x is not None:
            s, alpha, err = awq_scales(m.weight, x, bits, group_size)
            m.weight.copy_(rtn(m.weight * s, bits, group_size) / s)
            report[name] = {"alpha": alpha, "error": err}
        elif method == "gptq" and x is not None:
            old = m.weight.clone()
            m.weight.copy_(gptq(m.weight, x, bits, group_size))
            report[name] = {"alpha": 0.0, "error": ((x @ (m.weight - old).T) ** 2).mean().item()}
        else:
            old = m.weight.clone()
            m.weight.copy_(rtn(m.weight, bits, group_size))
            report[name] = {"alpha": 0.0, "error": None if x is None else
                            ((x @ (m.weight - old).T) ** 2).mean().item()}
    return report


# -- Weight-only kernels PyTorch ships (CPU) ---------------------------------------------------

class Int8WeightLinear(nn.Module):
    """A Linear whose weight is stored in int8, one symmetric scale per output row, and
    multiplied by PyTorch's weight-only int8 kernel (``torch.ops.aten._weight_int8pack_mm``,
    which converts the weights on the fly inside the product: activations stay float32).
    ``from_linear(linear)``. forward(x (..., in)) -> (..., out); CPU."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightLinear":
        w = linear.weight.detach().float()
        scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).float(), self.weight_int8, self.scales)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


INT4_GROUPS = (32, 64, 128, 256)   # the group sizes PyTorch's CPU int4 kernel takes


def int4_kernel_fits(linear: nn.Linear, group_size: int) -> bool:
    """Whether ``Int4WeightLinear`` can take ``linear``: out_features a multiple of 16 (the
    kernel's packing), in_features a multiple of ``group_size``, one of ``INT4_GROUPS``."""
    return (group_size in INT4_GROUPS and linear.out_features % 16 == 0
            and linear.in_features % group_size == 0)


class Int4WeightLinear(nn.Module):
    """A Linear whose weight is stored in 4 bits, two to a byte, in groups of ``group_size``
    inputs (affine: a scale and an offset per group), multiplied by PyTorch's CPU weight-only
    int4 kernel (``torch.ops.aten._weight_int4pack_mm_for_cpu``, weights unpacked inside the
    product). The kernel's convention is w = (q - 8) s + z per group; ``from_linear`` converts
    the book's (q - zero point) s into it. forward(x (..., in)) -> (..., out); CPU."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, out_features: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.group_size, self.out_features = group_size, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4WeightLinear":
        if not int4_kernel_fits(linear, group_size):
            raise ValueError(f"the int4 kernel needs out_features a multiple of 16 and in_features a multiple "
                             f"of group_size in {INT4_GROUPS}; got {linear.out_features} x {linear.in_features}, "
                             f"group_size {group_size}")
        w = linear.weight.detach().float()
        q = quantize_groupwise(w, 4, group_size)                 # codes 0..15, (out * in/g, g)
        out, n_in = w.shape
        codes = q.codes.reshape(out, n_in).to(torch.int32)
        scale = q.scale.reshape(out, n_in // group_size)
        zero = (8 - q.zero_point.reshape(out, n_in // group_size).float()) * scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()   # (in/g, out, 2)
        return cls(packed, sz, group_size, linear.bias, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).float(), self.packed,
                                                        self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def weight_only_model(model: nn.Module, bits: int, group_size: int = 32) -> nn.Module:
    """A copy of ``model`` (on the CPU) with every ``nn.Linear`` replaced by ``Int8WeightLinear``
    (bits 8: per output row; ``group_size`` unused) or ``Int4WeightLinear`` (bits 4, groups of
    ``group_size``). At 4 bits a layer the kernel cannot take (``int4_kernel_fits``: e.g. a
    language model's output layer over 65 characters) stays a float32 ``nn.Linear``."""
    import copy
    if bits not in (4, 8):
        raise ValueError(f"PyTorch's weight-only kernels take 8 or 4 bits, got {bits!r}")
    if _model_device(model).type != "cpu":
        raise ValueError("the weight-only kernels used here are PyTorch's CPU ones: move the model to the CPU")
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        for child_name, child in list(m.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if bits == 8:
                setattr(m, child_name, Int8WeightLinear.from_linear(child))
            elif int4_kernel_fits(child, group_size):
                setattr(m, child_name, Int4WeightLinear.from_linear(child, group_size))
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward pass reads: parameters and buffers (codes, scales), and the
    int8 weights and float32 biases that PyTorch's dynamically quantized Linear layers keep
    packed outside them (``quantization.dynamic_int8``; 16 bytes of scale and zero point each)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + 16 + (0 if b is None else b.numel() * b.element_size())
    return total


# -- The chapter's exercise --------------------------------------------------------------------

def check_tiled_attention(fn) -> None:
    """The serving chapter's exercise: check a reader's ``fn(q, k, v, causal=False, tile=64)``,
    attention computed a tile of keys at a time with an online softmax. In float64 it must equal
    ``transformer.attention`` (to 1e-10) on shapes whose lengths are not multiples of the tile,
    with and without the causal mask (query i sees keys up to T_k - T_q + i), with scores large
    enough to overflow a softmax that does not subtract a maximum; and over 1024 keys and
    queries it must never hold a whole 1024 x 1024 matrix of float32 scores (peak memory from the
    profiler). Raises AssertionError naming what failed; prints what passed."""
    from .lora import cpu_memory_levels
    from .transformer import attention
    cases = [(5, 5, 2, False), (13, 13, 4, True), (37, 37, 16, False), (37, 37, 16, True), (3, 20, 7, True),
             (65, 65, 64, True), (1, 9, 4, False)]
    g = torch.Generator().manual_seed(0)
    for t_q, t_k, tile, causal in cases:
        q, k, v = (torch.randn(2, 3, t, 8, generator=g, dtype=torch.float64) * 10 for t in (t_q, t_k, t_k))
        mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q) if causal else None
        want = attention(q, k, v, mask)[0]
        call = f"fn(q, k, v, causal={causal}, tile={tile}) with T_q={t_q}, T_k={t_k}"
        got = fn(q, k, v, causal=causal, tile=tile)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise AssertionError(f"{call} returned {getattr(got, 'shape', type(got))}, want shape {tuple(want.shape)}")
        diff = (got - want).abs().max().item()
        if not diff <= 1e-10:
            raise AssertionError(f"{call} differs from naive attention by {diff:.3g} (float64; want <= 1e-10)")
    t = 1024
    q, k, v = (torch.randn(1, 1, t, 16, generator=g) for _ in range(3))
    peak, _ = cpu_memory_levels(lambda: fn(q, k, v, causal=True, tile=64))
    scores = 4 * t * t
    if peak >= scores:
        raise AssertionError(f"over {t} positions fn allocated {peak:,} bytes at once: a whole {t} x {t} "
                             f"matrix of scores is {scores:,}")
    print(f"equal to naive attention on {len(cases)} shapes (float64, causal and not); over {t} positions "
          f"it held at most {peak / 1e6:.2f} MB, less than one {t} x {t} matrix ({scores / 1e6:.2f} MB)")
