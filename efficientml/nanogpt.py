"""A reimplementation of nanoGPT's model and training step, the yardstick of Chapter 7's speed.

nanoGPT (Karpathy, github.com/karpathy/nanoGPT, MIT licence) is the usual small GPT to train on
Tiny Shakespeare; its README's CPU configuration is the book's quick language model's size
(4 layers, 4 heads, width 128, context 64, batch 12, dropout 0). What is kept here, as in its
``model.py`` and ``train.py``: learned token and position embeddings, the output layer's weight
tied to the token embedding, pre-norm blocks whose LayerNorms and Linears have no bias, one
fused Q, K, V projection, ``F.scaled_dot_product_attention`` with ``is_causal=True``, a GELU MLP
of width 4d, N(0, 0.02) initialisation (the residual projections 0.02 / sqrt(2 n_layer)),
AdamW with betas (0.9, 0.99) and weight decay 0.1 on the 2-D parameters only, gradients
clipped to norm 1. It is written for the benchmark, not copied: nanoGPT's file is not vendored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)); (B, T, d) -> (B, T, d)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=2))          # (B, h, T, d_k) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    """forward(tokens (B, T)) -> logits (B, T, V), T <= ``block_size``."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_heads: int = 4, n_layers: int = 4,
                 block_size: int = 64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.wte.weight = self.head.weight                                 # weight tying
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def nanogpt_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """nanoGPT's ``configure_optimizers``: decay on parameters of 2 or more dimensions only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def nanogpt_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """nanoGPT's training iteration: loss, backward, clip to norm 1, step, zero the gradients.
    Returns the loss (nats per token) as a float, as its logging reads it."""
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
