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
    ``draft``; returns (tokens (1, T0 + n_tokens), ``SpeculativeStats``).

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
    v_t, v_d = target.out.out_features, draft.out.out_features
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
