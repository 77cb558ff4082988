"""Chapter 6's experiment: a character-level decoder-only Transformer on Tiny Shakespeare."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from ..data import CharTokenizer, TokenBatches, load_text, split_tokens
from ..lora import add_lora, freeze, lora_targets, optimizer_state_bytes, parameter_count
from ..models import count_parameters
from ..ngram import bigram_cross_entropy, bigram_entropy, unigram_cross_entropy, unigram_entropy
from ..reference import REFERENCE
from ..seeds import spread
from ..train import LN2, History, evaluate, fit, make_optimizer, select_device
from ..transformer import LanguageModel
from .core import _checkpoint, register, seed_for


FINETUNE_METHODS = ("none", "full", "lora")
LORA_ATTENTION = ("w_q", "w_k", "w_v", "w_o")  # the attention projections of every layer

# The new text: the last play of the validation split, The Tempest (from its first line to the
# end of the file), whose speakers, setting and vocabulary the model never saw in training. Its
# first ``ft_fraction`` fine-tunes, the rest measures; the model was trained on the first 90%.
FINETUNE = dict(ft_marker="\n\nMaster:\nBoatswain!", ft_fraction=0.7, ft_epochs=4, ft_steps=50, ft_batch_size=12,
                ft_warmup=20, ft_lr_full=3e-4, ft_lr_lora=1e-2, ft_alpha_per_rank=2, ft_ranks=[1, 4, 8],
                ft_eval_batches=10, ft_eval_batch_size=64, ft_seeds=[0, 1, 2])


# decay_2d_only: weight decay on the matmul weights and embeddings only, not on biases and
# LayerNorm gains (as nanoGPT; ``train.param_groups``).
LM_QUICK = dict(text="tinyshakespeare", val_fraction=0.1, d_model=128, n_heads=4, n_layers=4, d_ff=512,
                dropout=0.0, block_size=64, batch_size=12, steps_per_epoch=200, epochs=10, lr=1e-3,
                warmup=100, weight_decay=0.1, decay_2d_only=True, clip_grad_norm=1.0, val_batches=20,
                val_batch_size=64, seed=0) | FINETUNE
LM_FULL = LM_QUICK | dict(d_model=384, n_heads=6, n_layers=6, d_ff=1536, dropout=0.2, block_size=256,
                          batch_size=64, steps_per_epoch=500, epochs=10, warmup=200, val_batches=50)


def language_model_data(s: dict, device=None):
    """(tokenizer, train tokens, validation tokens, train batches, validation batches) for settings ``s``."""
    device = select_device(device)
    text = load_text(s["text"])
    tok = CharTokenizer(text)
    train, val = split_tokens(tok.encode(text), s["val_fraction"])
    return (tok, train, val,
            TokenBatches(train, s["block_size"], s["batch_size"], s["steps_per_epoch"], s["seed"], device),
            TokenBatches(val, s["block_size"], s["val_batch_size"], s["val_batches"], s["seed"] + 1, device))


def train_language_model(s: dict, device=None, progress=None, out_dir: Path | None = None,
                         precision: str = "float32", compile: bool = False):
    """Train a ``LanguageModel`` with AdamW (weight decay on the 2-D weights only if
    ``s["decay_2d_only"]``, as nanoGPT), warm-up + cosine schedule and gradient clipping; an
    "epoch" is ``steps_per_epoch`` random batches, after which the validation loss is measured
    on the same ``val_batches`` windows every time. Returns (model, History, tokenizer, train
    tokens, validation tokens); History losses are in bits per character. ``precision`` and
    ``compile`` are ``fit``'s (Chapter 7)."""
    seed_for(s["seed"], device)
    device = select_device(device)
    tok, train, val, train_batches, val_batches = language_model_data(s, device)
    model = LanguageModel(tok.vocab_size, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"], s["dropout"],
                          max_len=s["block_size"])
    hist = fit(model, train_batches, val_batches, epochs=s["epochs"], lr=s["lr"], optimizer="adamw",
               weight_decay=s["weight_decay"], decay_2d_only=s["decay_2d_only"], scheduler="warmup-cosine",
               warmup=s["warmup"], clip_grad_norm=s["clip_grad_norm"], device=device,
               checkpoint=_checkpoint(out_dir, "language-model", s), progress=progress, desc="language model",
               precision=precision, compile=compile)
    return model, hist, tok, train, val


@register("language-model", "Chapter 6: a character-level decoder-only Transformer on Tiny Shakespeare, then "
          "fine-tuned on a play it never saw (in full, with LoRA at several ranks, and not at all).",
          quick=LM_QUICK, full=LM_FULL)
def run_language_model(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, tok, train, val = train_language_model(s, device, progress, out_dir)
    steps = s["steps_per_epoch"] * hist.epochs
    prompt = tok.encode("\n")[None].to(next(model.parameters()).device)
    same = torch.equal(model.generate(prompt, 200, temperature=0, use_cache=True),
                       model.generate(prompt, 200, temperature=0, use_cache=False))
    ft = finetune_runs(model, *new_text_split(load_text(s["text"]), tok, s), s, device, progress)
    return {"parameters": count_parameters(model), "history": hist, "kv_cache_equal": same,
            "val_loss_nats": hist.test_loss[-1] * LN2,
            "train_tokens_per_s": steps * s["batch_size"] * s["block_size"] / sum(hist.train_time),
            "finetune": {"runs": ft["runs"], "cost": ft["cost"]}}


# -- Baselines from the text's statistics, and the chapter's tables ----------------------------

def baselines(train: torch.Tensor, val: torch.Tensor, vocab_size: int, alpha: float = 1.0) -> dict:
    """Chapter 6's baselines in nats per character: ``{name: {"train": loss on the training text
    of the model fitted to it (its entropy), "val": cross-entropy on the validation text of the
    same model, add-``alpha`` smoothed}}`` for a uniform, a unigram and a bigram model."""
    uniform = math.log(vocab_size)
    return {"uniform": {"train": uniform, "val": uniform},
            "unigram": {"train": unigram_entropy(train, vocab_size),
                        "val": unigram_cross_entropy(train, val, vocab_size, alpha)},
            "bigram": {"train": bigram_entropy(train, vocab_size),
                       "val": bigram_cross_entropy(train, val, vocab_size, alpha)}}


BASELINE_NAMES = {"uniform": "uniform over the vocabulary", "unigram": "unigram: character frequencies",
                  "bigram": "bigram: the previous character"}


def baseline_table(b: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of ``baselines(...)``: nats on the training and validation texts, and the
    validation loss in bits."""
    rows = [[BASELINE_NAMES.get(k, k), f"{v['train']:.3f}", f"{v['val']:.3f}", f"{v['val'] / LN2:.3f}"]
            for k, v in b.items()]
    return rows, ["model fitted to the training text", "its entropy on the training text (nats)",
                  "cross-entropy on the validation text (nats)", "validation (bits)"]


def loss_table(hist: History, steps_per_epoch: int) -> tuple[list[list], list[str]]:
    """Rows and headers of the per-epoch losses of a ``History`` in bits per character, shown in
    nats (and the validation loss in bits too), against the step at which each was measured."""
    rows = [[steps_per_epoch * (e + 1), f"{tr * LN2:.3f}", f"{va * LN2:.3f}", f"{va:.3f}"]
            for e, (tr, va) in enumerate(zip(hist.train_loss, hist.test_loss))]
    return rows, ["step", f"training loss (nats, mean of the last {steps_per_epoch} steps)",
                  "validation loss (nats)", "validation (bits per character)"]


def generation_table(benches: list[dict]) -> tuple[list[list], list[str]]:
    """Rows and headers of ``bench.bench_generation`` results: tokens per second without and
    with the KV cache, the speed-up, and whether both gave the same tokens."""
    rows = [[r["batch"], f"{r['no_cache_tokens_per_s']:,.0f}", f"{r['cache_tokens_per_s']:,.0f}",
             f"{r['cache_tokens_per_s'] / r['no_cache_tokens_per_s']:.2f}x", r["same_tokens"]]
            for r in benches]
    return rows, ["sequences at once", "tokens/s without cache", "tokens/s with KV cache", "speed-up",
                  "same tokens"]


def results_table(val_nats: float, b: dict, kv_cache_equal: bool,
                  full: dict | None = None) -> tuple[list[list], list[str]]:
    """Rows and headers of the chapter's results: the quick run's validation loss (``val_nats``),
    the full run's (``full``, a result file's payload, or None: not run yet), nanoGPT's for the
    same configurations (``reference.REFERENCE``), the validation baselines ``b`` and the KV-cache
    check."""
    ref = REFERENCE["language-model"]["val_loss_nats"]
    full_val = "not run yet" if full is None else f"{full['results']['val_loss_nats']:.3f}"
    rows = [["validation loss (nats per character)", f"{val_nats:.3f}", full_val,
             f"nanoGPT: {ref['cpu']:.2f} (CPU config.), {ref['gpu']:.2f} (GPU config.)"],
            ["validation loss (bits per character)", f"{val_nats / LN2:.3f}", "", ""]]
    rows += [[f"{name} baseline on the validation text (nats)", f"{b[key]['val']:.3f}", "", ""]
             for key, name in (("unigram", "unigram"), ("bigram", "bigram"))]
    rows += [["greedy generation, KV cache = no cache", str(kv_cache_equal), "", "equal"]]
    return rows, ["result", "quick (CPU)", "full", "reference"]


# -- Fine-tuning the trained model on text it has never seen: full, LoRA, or not at all --------

def new_text_split(text: str, tok: CharTokenizer, s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(fine-tuning tokens, evaluation tokens) of the new text: ``text`` from the first
    occurrence of ``s["ft_marker"]`` (which must lie in the validation split) to the end, cut
    (not shuffled) at its ``s["ft_fraction"]``."""
    start = text.find(s["ft_marker"])
    if start < 0:
        raise ValueError(f"the text does not contain the fine-tuning marker {s['ft_marker']!r}")
    if start < int(len(text) * (1 - s["val_fraction"])):
        raise ValueError("the fine-tuning text must lie in the validation split, which the model never trained on")
    if not 0 < s["ft_fraction"] < 1:
        raise ValueError(f"ft_fraction must be in (0, 1), got {s['ft_fraction']}")
    new = tok.encode(text[start:])
    cut = int(len(new) * s["ft_fraction"])
    return new[:cut], new[cut:]


def finetune_model(base: torch.nn.Module, method: str, r: int | None = None, alpha: float | None = None,
                   targets: tuple[str, ...] = LORA_ATTENTION) -> torch.nn.Module:
    """A copy of ``base`` made ready to fine-tune: ``"full"`` trains every parameter; ``"lora"``
    freezes every parameter and adapts each ``nn.Linear`` whose name ends in one of ``targets``
    (default: the attention projections) with a rank-``r`` LoRA update scaled by ``alpha / r``;
    ``"none"`` freezes everything (the model as trained)."""
    if method not in FINETUNE_METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}: choose one of {', '.join(FINETUNE_METHODS)}")
    model = copy.deepcopy(base)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    freeze(model, [])
    if method == "lora":
        if r is None or alpha is None:
            raise ValueError("LoRA fine-tuning needs a rank r and an alpha")
        names = [n for n in lora_targets(model, kinds=(torch.nn.Linear,)) if n.rsplit(".", 1)[-1] in targets]
        if not names:
            raise ValueError(f"no linear layer named like {targets} in the model")
        for name in names:
            add_lora(model, name, r, alpha)
    return model


def finetune_language_model(base: torch.nn.Module, ft_tokens: torch.Tensor, eval_tokens: torch.Tensor, s: dict,
                            method: str, r: int | None = None, seed: int = 0, device=None, progress=None):
    """Fine-tune a copy of ``base`` (see ``finetune_model``) on ``ft_tokens`` for ``ft_epochs`` x
    ``ft_steps`` batches of ``ft_batch_size`` random windows (``block_size``), with AdamW (no
    weight decay; learning rate ``ft_lr_full`` or ``ft_lr_lora``, warm-up + cosine, gradient
    clipping as in training), ``seed`` drawing the batches and LoRA's A. The evaluation loss is
    measured on ``ft_eval_batches`` fixed batches of windows of ``eval_tokens``. Returns (model,
    History in bits per character, cost): for ``"none"`` the History holds only the evaluation
    and cost counts the model as it is. ``cost``: ``trainable``, ``total`` parameters and
    ``optimizer_state_bytes`` (AdamW's two moments, measured after training)."""
    seed_for(seed, device)
    device = select_device(device)
    alpha = None if r is None else s["ft_alpha_per_rank"] * r
    model = finetune_model(base, method, r, alpha).to(device)
    batches = TokenBatches(ft_tokens, s["block_size"], s["ft_batch_size"], s["ft_steps"], seed, device)
    evals = TokenBatches(eval_tokens, s["block_size"], s["ft_eval_batch_size"], s["ft_eval_batches"], 12345, device)
    count = parameter_count(model)
    cost = {"trainable": count.trainable, "total": count.total, "optimizer_state_bytes": 0}
    if method == "none":
        hist = History()
        hist.test_loss.append(evaluate(model, evals, device)[0])
        return model, hist, cost
    opt = make_optimizer((p for p in model.parameters() if p.requires_grad), "adamw",
                         s["ft_lr_full"] if method == "full" else s["ft_lr_lora"], weight_decay=0.0)
    hist = fit(model, batches, evals, epochs=s["ft_epochs"], optimizer=opt, scheduler="warmup-cosine",
               warmup=s["ft_warmup"], clip_grad_norm=s["clip_grad_norm"], device=device, progress=progress,
               desc=f"fine-tune {method}" + ("" if r is None else f" r={r}"))
    cost["optimizer_state_bytes"] = optimizer_state_bytes(opt)
    return model, hist, cost


def finetune_runs(base: torch.nn.Module, ft_tokens: torch.Tensor, eval_tokens: torch.Tensor, s: dict,
                  device=None, progress=None) -> dict:
    """Every fine-tuning of Chapter 6 once per seed in ``s["ft_seeds"]``: none, full, and LoRA
    on the attention projections at each rank in ``s["ft_ranks"]``. Returns ``{"runs": {label:
    [History per seed]}, "cost": {label: cost}, "models": {label: the first seed's model}}``,
    labels ``"none"``, ``"full"``, ``"lora r=R"``."""
    configs = [("none", None), ("full", None)] + [("lora", r) for r in s["ft_ranks"]]
    runs, cost, models = {}, {}, {}
    for method, r in configs:
        label = method if r is None else f"lora r={r}"
        seeds = s["ft_seeds"][:1] if method == "none" else s["ft_seeds"]  # nothing to draw without training
        for seed in seeds:
            model, hist, c = finetune_language_model(base, ft_tokens, eval_tokens, s, method, r, seed, device, progress)
            runs.setdefault(label, []).append(hist)
            cost.setdefault(label, c)
            models.setdefault(label, model)
    return {"runs": runs, "cost": cost, "models": models}


def finetune_summary(out: dict) -> dict:
    """``{label: Spread}`` of the evaluation loss on the new text, in nats per character, after
    fine-tuning (over seeds), from ``finetune_runs(...)`` (Histories or their dicts)."""
    def last(h):
        return (h["test_loss"] if isinstance(h, dict) else h.test_loss)[-1] * LN2
    return {label: spread(last(h) for h in hs) for label, hs in out["runs"].items()}


def finetune_cost_table(cost: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of what each fine-tuning trains and keeps (exact counts and bytes)."""
    rows = [[label, f"{c['trainable']:,}", f"{c['trainable'] / c['total']:.2%}",
             f"{c['optimizer_state_bytes'] / 2**10:,.1f} KiB"] for label, c in cost.items()]
    return rows, ["fine-tuning", "trainable parameters", "of the model", "optimizer state (AdamW)"]


def finetune_loss_table(summary: dict) -> tuple[list[list], list[str]]:
    """Rows and headers of the evaluation losses (mean ± standard deviation over seeds) and how
    much of full fine-tuning's gain over no fine-tuning each method gets."""
    none, full = summary["none"].mean, summary["full"].mean
    rows = [[label, sp.fmt(), "" if label == "none" else f"{(none - sp.mean) / (none - full):.0%}"]
            for label, sp in summary.items()]
    return rows, ["fine-tuning", "loss on the new text (nats per character)", "share of full fine-tuning's gain"]


def plot_finetune(summary: dict, cost: dict, ax=None, title: str | None = None):
    """Evaluation loss on the new text (nats, mean over seeds; bars from the lowest to the
    highest seed) against the number of trainable parameters (log scale); no fine-tuning as a
    horizontal line."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(6, 3.6))[1]
    for label, sp in summary.items():
        if label == "none":
            ax.axhline(sp.mean, color="gray", ls="--", lw=1, label="no fine-tuning")
            continue
        n = cost[label]["trainable"]
        ax.errorbar([n], [sp.mean], yerr=[[sp.mean - sp.min], [sp.max - sp.mean]], fmt="o", capsize=3,
                    label=label)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="loss on the new text (nats)", title=title)
    ax.legend(fontsize=8)
    return ax
