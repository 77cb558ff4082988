"""Chapter 6's experiment: a character-level decoder-only Transformer on Tiny Shakespeare."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import CharTokenizer, TokenBatches, load_text, split_tokens
from ..models import count_parameters
from ..train import fit, select_device
from ..transformer import LanguageModel
from .core import _checkpoint, register, seed_for


LM_QUICK = dict(text="tinyshakespeare", val_fraction=0.1, d_model=128, n_heads=4, n_layers=4, d_ff=512, dropout=0.0,
                block_size=64, batch_size=12, steps_per_epoch=200, epochs=10, lr=1e-3, warmup=100, weight_decay=0.1,
                clip_grad_norm=1.0, val_batches=20, val_batch_size=64, seed=0)
LM_FULL = LM_QUICK | dict(d_model=384, n_heads=6, n_layers=6, d_ff=1536, dropout=0.2, block_size=256, batch_size=64,
                          steps_per_epoch=500, epochs=10, warmup=200, val_batches=50)


def language_model_data(s: dict, device=None):
    """(tokenizer, train tokens, validation tokens, train batches, validation batches) for settings ``s``."""
    device = select_device(device)
    text = load_text(s["text"])
    tok = CharTokenizer(text)
    train, val = split_tokens(tok.encode(text), s["val_fraction"])
    return (tok, train, val,
            TokenBatches(train, s["block_size"], s["batch_size"], s["steps_per_epoch"], s["seed"], device),
            TokenBatches(val, s["block_size"], s["val_batch_size"], s["val_batches"], s["seed"] + 1, device))


def train_language_model(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """Train a ``LanguageModel`` with AdamW, warm-up + cosine schedule and gradient clipping;
    an "epoch" is ``steps_per_epoch`` random batches, after which the validation loss is measured
    on the same ``val_batches`` windows every time. Returns (model, History, tokenizer, train
    tokens, validation tokens); History losses are in bits per character."""
    seed_for(s["seed"], device)
    device = select_device(device)
    tok, train, val, train_batches, val_batches = language_model_data(s, device)
    model = LanguageModel(tok.vocab_size, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"], s["dropout"],
                          max_len=s["block_size"])
    hist = fit(model, train_batches, val_batches, epochs=s["epochs"], lr=s["lr"], optimizer="adamw",
               weight_decay=s["weight_decay"], scheduler="warmup-cosine", warmup=s["warmup"],
               clip_grad_norm=s["clip_grad_norm"], device=device, checkpoint=_checkpoint(out_dir, "language-model", s),
               progress=progress, desc="language model")
    return model, hist, tok, train, val


@register("language-model", "Chapter 6: a character-level decoder-only Transformer on Tiny Shakespeare.",
          quick=LM_QUICK, full=LM_FULL)
def run_language_model(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, tok, train, val = train_language_model(s, device, progress, out_dir)
    steps = s["steps_per_epoch"] * hist.epochs
    prompt = tok.encode("\n")[None].to(next(model.parameters()).device)
    same = torch.equal(model.generate(prompt, 200, temperature=0, use_cache=True),
                       model.generate(prompt, 200, temperature=0, use_cache=False))
    return {"parameters": count_parameters(model), "history": hist, "kv_cache_equal": same,
            "val_loss_nats": hist.test_loss[-1] * math.log(2),
            "train_tokens_per_s": steps * s["batch_size"] * s["block_size"] / sum(hist.train_time)}
