"""N-gram models of a token sequence: the baselines a language model must beat (Chapter 6).

A unigram model predicts every token from the tokens' frequencies alone; a bigram model from the
previous token only. Fitted to a text and measured on the same text, their loss per token is an
entropy (``unigram_entropy`` H(X), ``bigram_entropy`` H(X_t+1 | X_t)); measured on another text,
a cross-entropy, with add-alpha smoothing so that an unseen token or pair costs a finite amount.
All in nats per token; tokens are 1-D integer tensors of ids 0..V-1, on any device: the counts
are made on the CPU in float64 (exact to many digits; Apple's MPS has no float64).
"""
from __future__ import annotations

import math

import torch


def _check_tokens(tokens: torch.Tensor, vocab_size: int | None, name: str, min_len: int) -> torch.Tensor:
    """``tokens`` as int64 on the CPU after checking: 1-D integer ids, at least ``min_len`` of
    them, all in 0..vocab_size-1 (only >= 0 where ``vocab_size`` is None)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype.is_floating_point:
        raise TypeError(f"{name} must be a 1-D integer tensor of token ids")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if len(tokens) < min_len:
        raise ValueError(f"{name} needs at least {min_len} tokens, got {len(tokens)}")
    top = vocab_size if vocab_size is not None else math.inf
    if len(tokens) and not (0 <= int(tokens.min()) and int(tokens.max()) < top):
        raise ValueError(f"{name} holds ids outside 0..{top - 1}")
    return tokens.detach().to("cpu", torch.int64)


def unigram_cross_entropy(fit_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int,
                          alpha: float = 1.0) -> float:
    """Cross-entropy in nats per token, on ``eval_tokens`` (N,), of the unigram model fitted to
    ``fit_tokens``: p(c) = (n(c) + alpha) / (n + alpha V), with n(c) the count of token c among
    the n fitting tokens and V = ``vocab_size``. ``alpha`` > 0 smooths (1: add-one, Laplace), so a
    token never seen in fitting costs a finite amount."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    fit = _check_tokens(fit_tokens, vocab_size, "fit_tokens", 1)
    ev = _check_tokens(eval_tokens, vocab_size, "eval_tokens", 1)
    counts = torch.bincount(fit, minlength=vocab_size).double() + alpha
    return float(-(counts / counts.sum()).log()[ev].mean())


def bigram_cross_entropy(fit_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int,
                         alpha: float = 1.0) -> float:
    """Cross-entropy in nats per token, over the N - 1 consecutive pairs (a, b) of ``eval_tokens``
    (N,), of the bigram model fitted to ``fit_tokens``: p(b | a) = (n(a, b) + alpha) / (n(a) +
    alpha V), with n(a, b) the count of the pair among the fitting pairs, n(a) = sum_b n(a, b) and
    V = ``vocab_size``. ``alpha`` > 0 smooths (1: add-one, Laplace); as alpha -> 0 with
    ``eval_tokens = fit_tokens`` it tends to the conditional entropy ``bigram_entropy``."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    fit = _check_tokens(fit_tokens, vocab_size, "fit_tokens", 2)
    ev = _check_tokens(eval_tokens, vocab_size, "eval_tokens", 2)
    v = vocab_size
    counts = torch.bincount(fit[:-1] * v + fit[1:], minlength=v * v).double().view(v, v) + alpha
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return float(-log_p[ev[:-1], ev[1:]].mean())


def unigram_entropy(tokens: torch.Tensor, vocab_size: int | None = None) -> float:
    """H(X) in nats: the loss per token of the best model that ignores context (frequencies only),
    fitted to ``tokens`` (N,) and measured on them."""
    tokens = _check_tokens(tokens, vocab_size, "tokens", 1)
    counts = torch.bincount(tokens, minlength=vocab_size or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def bigram_entropy(tokens: torch.Tensor, vocab_size: int | None = None) -> float:
    """H(X_t+1 | X_t) in nats: the loss per token of the best model that sees only the previous
    token, fitted to the N - 1 consecutive pairs of ``tokens`` (N,) and measured on them."""
    tokens = _check_tokens(tokens, vocab_size, "tokens", 2)
    v = vocab_size or int(tokens.max()) + 1
    counts = torch.bincount(tokens[:-1] * v + tokens[1:], minlength=v * v).double().view(v, v)
    joint = counts / counts.sum()
    cond = counts / counts.sum(1, keepdim=True).clamp_min(1)
    nz = counts > 0
    return float(-(joint[nz] * cond[nz].log()).sum())
