"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017), from scratch.

No ``nn.Transformer`` and no ``nn.MultiheadAttention``: embeddings, sinusoidal positional
encoding, scaled dot-product attention, multi-head attention, the position-wise feed-forward
layer, encoder and decoder layers (residual, dropout, layer norm), the encoder-decoder
``Transformer`` with greedy decoding, and ``LanguageModel``, a decoder-only model built from the
same layers (Chapter 6).

Shapes: B batch, S source length, T target length, d_model model width, h heads,
d_k = d_model / h per head, V vocabulary. Tokens are int64 (B, S) or (B, T); masks are bool,
True where attention is allowed, broadcastable to (B, h, T_query, T_key).

``per_head=True`` computes every head's Q, K and V projections and its two attention products as
separate matrix multiplications, as the matmul count of Chapter 5 assumes (5h + 1 per attention
layer); the default computes all heads at once (3 projections, 2 batched products, 1 output
projection), with the same weights and the same result.

Devices: tokens go on the model's device (``generate`` and ``greedy_decode`` check it); the
sinusoidal tables are computed in float64 on the CPU and used as float32 (MPS has no float64);
sampling with a CPU generator draws on the CPU (``sample_tokens``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WordEmbedding(nn.Module):
    """Token ids (B, T) -> vectors (B, T, d_model), multiplied by sqrt(d_model) as in the paper.

    The table is initialised with standard deviation 1/sqrt(d_model) (the scale of the paper's
    shared output projection), so the scaled embeddings have entries of size about 1, like the
    positional encoding's; with ``nn.Embedding``'s default N(0, 1) they would be sqrt(d_model)
    times larger and drown the positions."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        self.d_model = d_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        return self.embed(tokens) * math.sqrt(self.d_model)


def sinusoidal_encoding(max_len: int, d_model: int) -> torch.Tensor:
    """PE (max_len, d_model): PE[pos, 2i] = sin(pos * omega_i), PE[pos, 2i+1] = cos(pos * omega_i),
    with frequencies omega_i = 10000^(-2i/d_model), i = 0..d_model/2 - 1.

    Computed in float64 on the CPU (exact to float32's last digit on every machine; Apple's MPS
    has no float64) and returned as a float32 CPU tensor, for the caller to move."""
    if d_model % 2:
        raise ValueError(f"d_model must be even for sine/cosine pairs, got {d_model}")
    f64 = dict(dtype=torch.float64, device="cpu")
    pos = torch.arange(max_len, **f64).unsqueeze(1)                            # (max_len, 1)
    i2 = torch.arange(0, d_model, 2, **f64)                                    # 2i
    omega = torch.exp(-math.log(10000.0) * i2 / d_model)                       # (d_model / 2,)
    pe = torch.zeros(max_len, d_model, **f64)
    pe[:, 0::2] = torch.sin(pos * omega)
    pe[:, 1::2] = torch.cos(pos * omega)
    return pe.float()


def positional_shift_matrix(k: int, d_model: int) -> torch.Tensor:
    """M_k (d_model, d_model) with M_k @ PE[p] = PE[p + k] for every position p (k may be negative).

    Block-diagonal: the (sin, cos) pair of frequency omega_i, dimensions (2i, 2i+1), is rotated by
    the angle omega_i * k with [[cos, sin], [-sin, cos]]. The matrix depends on the offset k only,
    not on p: a shift of position is a linear map of the encoding. Computed in float64 on the
    CPU, returned as float32 on the CPU, like ``sinusoidal_encoding``.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"the offset k must be an int, got {type(k).__name__}")
    if d_model % 2:
        raise ValueError(f"d_model must be even for sine/cosine pairs, got {d_model}")
    i2 = torch.arange(0, d_model, 2, dtype=torch.float64, device="cpu")
    angle = k * torch.exp(-math.log(10000.0) * i2 / d_model)                  # omega_i * k
    cos, sin = angle.cos(), angle.sin()
    blocks = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (d/2, 2, 2)
    return torch.block_diag(*blocks).float()


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding of positions start..start+T-1 to (B, T, d_model), then dropout.

    The table ``pe`` (max_len, d_model) is a float32 buffer made where the parameters of a module
    built alongside would be (the default device) and moved with the module by ``.to``."""

    def __init__(self, d_model: int, max_len: int = 1024, dropout: float = 0.0):
        super().__init__()
        pe = sinusoidal_encoding(max_len, d_model).to(torch.get_default_device())
        self.register_buffer("pe", pe, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if start + x.shape[1] > len(self.pe):
            raise ValueError(f"positions up to {start + x.shape[1]} exceed max_len={len(self.pe)}")
        return self.dropout(x + self.pe[start:start + x.shape[1]])


def causal_mask(t: int, device=None) -> torch.Tensor:
    """(t, t) bool, True on and below the diagonal: position i may attend to positions 0..i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def _cached_causal_mask(t: int, cache: dict | None, device=None) -> torch.Tensor:
    """(t, past + t): t new positions see every cached (past) position and the new ones up to themselves."""
    mask = causal_mask(t, device)
    if cache:
        past = cache["k"].shape[2]
        mask = torch.cat([torch.ones(t, past, dtype=torch.bool, device=device), mask], dim=1)
    return mask


def padding_mask(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, 1, 1, T) bool, False at padding tokens: no query attends to a padding key."""
    return (tokens != pad)[:, None, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention: softmax(q k^T / sqrt(d_k)) v. Two matrix multiplications.

    q (..., T_q, d_k), k (..., T_k, d_k), v (..., T_k, d_v); mask broadcastable to (..., T_q, T_k),
    True where allowed. Returns (output (..., T_q, d_v), weights (..., T_q, T_k)); each row of
    weights sums to 1.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])               # (..., T_q, T_k)
    if mask is not None:  # the most negative float, not -inf: a fully masked row stays finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """h heads of attention over d_k = d_model / h dimensions each, concatenated and projected.

    Weights: ``w_q``, ``w_k``, ``w_v``, ``w_o``, each (d_model x d_model) with bias; head i uses rows
    i*d_k..(i+1)*d_k of ``w_q``, ``w_k``, ``w_v``. forward(x (B, T_q, d), context (B, T_k, d) or None
    for self-attention, mask) -> (B, T_q, d); the last weights are kept, detached, in
    ``self.weights`` (B, h, T_q, T_k).

    cache: a dict carried across generation steps. In self-attention the new positions' keys
    and values are appended to it; in cross-attention (context given) the context's keys and
    values are computed on the first call and reused afterwards.
    """

    def __init__(self, d_model: int, n_heads: int, per_head: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_k, self.per_head = d_model, n_heads, d_model // n_heads, per_head
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.weights: torch.Tensor | None = None

    def _project(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, h, T, d_k): one matmul for all heads, or one per head."""
        b, t, _ = x.shape
        if self.per_head:
            w, bias = linear.weight.view(self.n_heads, self.d_k, -1), linear.bias.view(self.n_heads, self.d_k)
            return torch.stack([F.linear(x, w[i], bias[i]) for i in range(self.n_heads)], dim=1)
        return linear(x).view(b, t, self.n_heads, self.d_k).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._project(self.w_q, x)                                    # (B, h, T_q, d_k)
        if context is not None and cache is not None and "k" in cache:   # cross-attention, cached
            k, v = cache["k"], cache["v"]
        else:
            source = x if context is None else context
            k, v = self._project(self.w_k, source), self._project(self.w_v, source)
            if cache is not None:
                if context is None and "k" in cache:                      # self-attention: append
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        if self.per_head:                                # one attention call per head
            heads = [attention(q[:, i], k[:, i], v[:, i], _head_mask(mask, i))
                     for i in range(self.n_heads)]
            out = torch.stack([o for o, _ in heads], dim=1)
            weights = torch.stack([w for _, w in heads], dim=1)
        else:                                            # all heads in one batched call
            out, weights = attention(q, k, v, mask)                       # (B, h, T_q, d_k)
        self.weights = weights.detach()                                   # for plots; holds no graph
        return self.w_o(out.transpose(1, 2).reshape(b, t, self.d_model))


def _head_mask(mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """The part of a mask broadcastable to (B, h, T_q, T_k) that applies to head i: (B or 1, T_q, T_k)."""
    if mask is None or mask.dim() < 4:
        return mask
    return mask[:, i] if mask.shape[1] > 1 else mask[:, 0]


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear(d_model, d_ff), ReLU, dropout, Linear(d_ff, d_model).
    Two matmuls."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class Residual(nn.Module):
    """A sublayer wrapped as in the paper, x -> LayerNorm(x + dropout(sublayer(x))) (post-norm), or
    as in GPT-2, x -> x + dropout(sublayer(LayerNorm(x))) (``norm_first``, steadier to train deep)."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm, self.dropout, self.norm_first = nn.LayerNorm(d_model), nn.Dropout(dropout), norm_first

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each as a ``Residual``: (B, S, d) -> (B, S, d). 5h + 3 matmuls
    per head-wise forward pass. With a causal mask it is also the block of a decoder-only model."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, per_head: bool = False,
                 norm_first: bool = False):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, per_head)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.res1, self.res2 = (Residual(d_model, dropout, norm_first) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: dict | None = None) -> torch.Tensor:
        x = self.res1(x, lambda y: self.self_attn(y, mask=mask, cache=cache))
        return self.res2(x, self.ff)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder's output, feed-forward:
    (B, T, d) -> (B, T, d). 10h + 4 matmuls per head-wise forward pass."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, per_head: bool = False,
                 norm_first: bool = False):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, per_head)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, per_head)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.res1, self.res2, self.res3 = (Residual(d_model, dropout, norm_first) for _ in range(3))

    def forward(self, x, memory, tgt_mask=None, src_mask=None, cache: dict | None = None) -> torch.Tensor:
        self_cache = None if cache is None else cache.setdefault("self", {})
        cross_cache = None if cache is None else cache.setdefault("cross", {})
        x = self.res1(x, lambda y: self.self_attn(y, mask=tgt_mask, cache=self_cache))
        x = self.res2(x, lambda y: self.cross_attn(y, memory, mask=src_mask, cache=cross_cache))
        return self.res3(x, self.ff)


def _model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (all on one)."""
    return next(model.parameters()).device


def _check_tokens(tokens, device: torch.device, name: str) -> None:
    """Raise unless ``tokens`` is an integer (B, T) tensor with T >= 1 on ``device``."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor of token ids, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, T) with T >= 1, got {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"{name} is on {tokens.device} but the model is on {device}: "
                         f"pass {name}.to({str(device)!r})")


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row, (B, 1) int64 on ``probs``' device, drawn from ``probs`` (B, V).

    ``generator`` None: the device's global random generator. A generator on ``probs``' device
    draws there. A CPU generator with ``probs`` on an accelerator draws on the CPU from
    ``probs.cpu()`` and moves the ids: a seed then gives the same ids on every device for the
    same probabilities (and CUDA's ``torch.multinomial`` does not accept a CPU generator). A
    generator on another accelerator raises ``ValueError``."""
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)
    if generator.device.type != "cpu":
        raise ValueError(f"the generator is on {generator.device} but the probabilities on "
                         f"{probs.device}: use a CPU generator or one on {probs.device}")
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)


class Transformer(nn.Module):
    """The encoder-decoder Transformer: N encoder and N decoder layers and a final linear layer.

    forward(src (B, S), tgt (B, T)) -> logits (B, T, tgt_vocab): the decoder sees ``tgt`` (which
    starts with the start token) under a causal mask and predicts the next token at every
    position. Tokens equal to ``pad`` are masked as keys. N(15h + 7) + 1 matmuls per forward pass
    with ``per_head=True``; the paper's base model is N=6, h=8, d_model=512, d_ff=2048.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, n_heads: int = 8,
                 n_layers: int = 6, d_ff: int = 2048, dropout: float = 0.1, max_len: int = 512, pad: int = 0,
                 per_head: bool = False):
        super().__init__()
        self.pad, self.n_layers = pad, n_layers
        self.src_embed, self.tgt_embed = WordEmbedding(src_vocab, d_model), WordEmbedding(tgt_vocab, d_model)
        self.pos = PositionalEncoding(d_model, max_len, dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout, per_head)
                                     for _ in range(n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, n_heads, d_ff, dropout, per_head)
                                     for _ in range(n_layers))
        self.out = nn.Linear(d_model, tgt_vocab)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """(B, S) -> memory (B, S, d_model)."""
        x, mask = self.pos(self.src_embed(src)), padding_mask(src, self.pad)
        for layer in self.encoder:
            x = layer(x, mask)
        return x

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src: torch.Tensor, start: int = 0,
               caches: list[dict] | None = None) -> torch.Tensor:
        """tgt (B, T) at positions start..start+T-1 -> logits (B, T, tgt_vocab). With ``caches``
        (one dict per decoder layer), earlier positions come from the caches."""
        t = tgt.shape[1]
        if caches is None:
            mask = padding_mask(tgt, self.pad) & causal_mask(t, tgt.device)
        else:
            mask = _cached_causal_mask(t, caches[0].get("self"), tgt.device)
        x = self.pos(self.tgt_embed(tgt), start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, mask, padding_mask(src, self.pad), None if caches is None else caches[i])
        return self.out(x)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt, self.encode(src), src)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int, bos: int, eos: int | None = None,
                      use_cache: bool = True) -> torch.Tensor:
        """Generate up to ``max_len`` tokens after ``bos`` for each source (B, S), always taking the
        most likely token other than ``pad``; returns (B, 1 + generated) starting with ``bos``. After
        ``eos`` a sequence is padded. Without the cache the decoder re-reads the whole prefix at
        every step; with it, only the newest token (the same tokens either way). ``src`` must be on
        the model's device."""
        _check_tokens(src, _model_device(self), "src")
        was_training = self.training
        self.eval()
        memory = self.encode(src)
        out = torch.full((len(src), 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
        caches = [{} for _ in self.decoder] if use_cache else None
        for step in range(max_len):
            if use_cache:
                logits = self.decode(out[:, -1:], memory, src, start=step, caches=caches)
            else:
                logits = self.decode(out, memory, src)
            step_logits = logits[:, -1]
            step_logits[:, self.pad] = float("-inf")  # padding is never generated
            nxt = step_logits.argmax(-1).masked_fill(done, self.pad)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
        self.train(was_training)
        return out


class LanguageModel(nn.Module):
    """A decoder-only (GPT-style) language model made of this module's parts.

    Word embedding, sinusoidal positions, N ``EncoderLayer``s used under a causal mask (a decoder
    layer without cross-attention) in the pre-norm arrangement, a final LayerNorm and a linear
    layer to vocabulary logits. forward(tokens (B, T)) -> logits (B, T, V): position t predicts
    token t + 1 from tokens 0..t.
    """

    def __init__(self, vocab_size: int, d_model: int = 128, n_heads: int = 4, n_layers: int = 4,
                 d_ff: int = 512, dropout: float = 0.0, max_len: int = 256):
        super().__init__()
        self.max_len = max_len
        self.embed = WordEmbedding(vocab_size, d_model)
        self.pos = PositionalEncoding(d_model, max_len, dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout, norm_first=True)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor, start: int = 0, caches: list[dict] | None = None) -> torch.Tensor:
        mask = _cached_causal_mask(tokens.shape[1], None if caches is None else caches[0], tokens.device)
        x = self.pos(self.embed(tokens), start)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if caches is None else caches[i])
        return self.out(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``prompt`` (B, T0) by ``n_tokens`` tokens; returns (B, T0 + n_tokens).

        temperature 0 means greedy (argmax); otherwise logits are divided by it and, with
        ``top_k``, only the k most likely tokens are kept before sampling.
        The context is the tokens from a start index on, at most ``max_len`` of them; when it
        is full it is cut to its last ``max_len // 2`` tokens, which then take positions
        0, 1, ... again. With ``use_cache`` the keys and values of the context are kept, so each
        step computes only the newest token; the cache is rebuilt only when the context is cut
        (absolute positions cannot slide). Without it every step recomputes the whole context;
        both see the same context, so greedy decoding gives the same tokens.

        ``prompt`` must be on the model's device; so is the result. ``generator`` (for sampling):
        None, a generator on the model's device, or a CPU ``torch.Generator``, with which each
        token is drawn on the CPU from the probabilities (see ``sample_tokens``), so that a
        seed gives the same text on every device where the model gives the same probabilities.
        """
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need temperature >= 0 and top_k >= 1, got {temperature}, {top_k}")
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
        _check_tokens(prompt, _model_device(self), "prompt")
        was_training = self.training
        self.eval()
        out, caches = prompt, None
        start = max(0, prompt.shape[1] - self.max_len)          # where the context begins in ``out``
        for _ in range(n_tokens):
            if out.shape[1] - start > self.max_len:               # full: keep the last half
                start, caches = out.shape[1] - self.max_len // 2, None
            if use_cache and caches is not None:
                logits = self(out[:, -1:], start=out.shape[1] - 1 - start, caches=caches)
            else:
                caches = [{} for _ in self.layers] if use_cache else None
                logits = self(out[:, start:], caches=caches)
            logits = logits[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = sample_tokens(logits.softmax(-1), generator)
            out = torch.cat([out, nxt], dim=1)
        self.train(was_training)
        return out


# -- Counting matrix multiplications (Chapter 5.2) ---------------------------------------------

def matmuls_per_inference(n_layers: int, n_heads: int) -> int:
    """N(15h + 7) + 1: N encoder layers of 5h + 3, N decoder layers of 10h + 4, one output layer."""
    return n_layers * (15 * n_heads + 7) + 1


def transformer_parameters(src_vocab: int, tgt_vocab: int, d_model: int, n_layers: int, d_ff: int) -> int:
    """Parameters of ``Transformer`` from its configuration (weights and biases; h does not matter:
    the heads split d_model, they do not add to it)."""
    d = d_model
    attn, ff, norm = 4 * (d * d + d), 2 * d * d_ff + d_ff + d, 2 * d
    encoder, decoder = attn + ff + 2 * norm, 2 * attn + ff + 3 * norm
    return (src_vocab + tgt_vocab) * d + n_layers * (encoder + decoder) + d * tgt_vocab + tgt_vocab


def generation_attention_macs(n_layers: int, d_model: int, src_len: int, n_tokens: int,
                              use_cache: bool) -> int:
    """Multiply-accumulates of the attention products (Q K^T and weights @ V, all heads) when
    ``Transformer.greedy_decode`` generates ``n_tokens`` = T tokens for a source of S = ``src_len``.

    Per layer: the encoder's self-attention once, 2 S^2 d; then at each decoder step t = 1..T
    (t tokens in the prefix), without a cache 2 t^2 d (self-attention of t queries over t keys)
    + 2 t S d (cross-attention), with a cache 2 t d + 2 S d (one query). Step t costs O(t^2)
    without the cache and O(t) with it, so T steps cost O(T^3) and O(T^2) in all.
    """
    d, s, steps = d_model, src_len, range(1, n_tokens + 1)
    if use_cache:
        decoder = sum(2 * t * d + 2 * s * d for t in steps)
    else:
        decoder = sum(2 * t * t * d + 2 * t * s * d for t in steps)
    return n_layers * (2 * s * s * d + decoder)


def transformer_macs_per_token(d_model: int, n_layers: int, d_ff: int, tgt_vocab: int, seq_len: int) -> int:
    """Matmul multiply-accumulates of one forward pass per target token, for source and target of
    ``seq_len`` tokens each: N(12 d^2 + 6 n d + 4 d d_ff) + d V. Per layer, the encoder does 4d^2
    (projections), 2nd (two attention products) and 2 d d_ff (feed-forward) per token; the decoder
    twice the attention (self and cross) and the same feed-forward; the final layer d V."""
    d, n = d_model, seq_len
    return n_layers * (12 * d * d + 6 * n * d + 4 * d * d_ff) + d * tgt_vocab


_MATMUL_NAMES = ("linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum")
_MATMULS = {getattr(ns, name) for ns in (torch, torch.Tensor, torch._C.TensorBase, F)
            for name in _MATMUL_NAMES if hasattr(ns, name)}


def _matmul_macs(func, args, kwargs) -> int:
    """Multiply-accumulates of one matmul-type call (linear, matmul, mm, bmm; 0 if unknown)."""
    if func is F.linear:
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        return x.numel() * w.shape[0]
    if len(args) >= 2 and all(torch.is_tensor(a) for a in args[-2:]):
        a, b = args[-2], args[-1]   # addmm/baddbmm take (bias, a, b)
        if a.dim() >= 2 and b.dim() >= 2:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            return math.prod(batch) * a.shape[-2] * a.shape[-1] * b.shape[-1]
    return 0


class MatmulCounter(torch.overrides.TorchFunctionMode):
    """Counts the matrix multiplications run inside ``with MatmulCounter() as c:``.

    Every call of a matmul-type function (``F.linear``, ``@``/``torch.matmul``, ``mm``, ``bmm``,
    ``addmm``, ``baddbmm``, ``einsum``) counts once, however many examples it processes: this is
    the count of Chapter 5.2. ``calls`` is the count, ``macs`` the multiply-accumulates they did,
    ``by_op`` the count and ``macs_by_op`` the multiply-accumulates per function name (attention's
    ``@`` counts as ``matmul``, the projections as ``linear``). Calls made inside a counted call
    are not counted again.
    """

    def __init__(self):
        super().__init__()
        self.calls, self.macs, self.by_op, self.macs_by_op = 0, 0, {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            macs = _matmul_macs(func, args, kwargs)
            name = getattr(func, "__name__", str(func))
            self.calls, self.macs = self.calls + 1, self.macs + macs
            self.by_op[name] = self.by_op.get(name, 0) + 1
            self.macs_by_op[name] = self.macs_by_op.get(name, 0) + macs
        return func(*args, **kwargs)
