"""Chapter 5's experiment: an encoder-decoder Transformer trained on a toy sequence task, and the
chapter's measurements (forward-pass timings, matmul counts of generation, decoded examples)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..bench import latency
from ..data import SequenceTask
from ..models import count_parameters
from ..train import LN2, History, fit, select_device
from ..transformer import MatmulCounter, Transformer, transformer_macs_per_token, transformer_parameters
from .core import _checkpoint, register, seed_for


# Sources of min_length..length symbols (uniform), padded to length.
TRANSFORMER_QUICK = dict(task="reverse", n_symbols=10, min_length=4, length=8, batch_size=64,
                         steps_per_epoch=100, epochs=4, d_model=64, n_heads=4, n_layers=2, d_ff=128,
                         dropout=0.0, lr=3e-3, warmup=50, test_size=500, seed=0)
TRANSFORMER_FULL = TRANSFORMER_QUICK | dict(min_length=8, length=16, steps_per_epoch=250, epochs=20,
                                            d_model=128, n_layers=3, d_ff=512, dropout=0.1, lr=1e-3,
                                            warmup=400, test_size=2000)


def sequence_tasks(s: dict, device=None) -> tuple[SequenceTask, SequenceTask]:
    """The training task (``steps_per_epoch`` batches an epoch) and the test task (one batch of
    ``test_size`` sequences, drawn with seed + 1) of settings ``s``."""
    kw = dict(min_length=s["min_length"], device=device if device is not None else "cpu")
    task = SequenceTask(s["task"], s["n_symbols"], s["length"], s["batch_size"], s["steps_per_epoch"],
                        s["seed"], **kw)
    test = SequenceTask(s["task"], s["n_symbols"], s["length"], s["test_size"], 1, s["seed"] + 1, **kw)
    return task, test


@torch.no_grad()
def token_metrics(model: Transformer, task: SequenceTask) -> tuple[float, float]:
    """(cross-entropy in bits per target token, token accuracy) over ``task``'s batches, counting
    only the target positions that are not ``task.IGNORE`` (the answer and its EOS)."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for (src, tgt_in), tgt_out in task:
        keep = tgt_out != task.IGNORE
        logits, target = model(src, tgt_in)[keep], tgt_out[keep]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        n += int(keep.sum())
    return loss / n / LN2, correct / n


def train_sequence_transformer(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """Train an encoder-decoder ``Transformer`` on the ``s["task"]`` (copy/reverse) task with Adam
    and a warm-up + cosine schedule; returns (model, History, test ``SequenceTask``).

    Sources have ``min_length..length`` symbols, padded with PAD; padded target positions are -100,
    which the training loss (``F.cross_entropy``) ignores. The History's per-epoch ``test_loss``
    and ``test_acc`` are ``token_metrics`` over the real target positions only; its
    ``train_loss`` is the mean of the batches' losses and its ``train_acc`` counts padded
    positions as wrong (``fit`` counts every position), so it is not used here.
    """
    seed_for(s["seed"], device)
    device = select_device(device)
    task, test = sequence_tasks(s, device)
    model = Transformer(task.vocab_size, task.vocab_size, s["d_model"], s["n_heads"], s["n_layers"],
                        s["d_ff"], s["dropout"], max_len=s["length"] + 2, pad=task.PAD)

    def evaluate_real_tokens(epoch: int, model: nn.Module, history: History) -> None:
        history.test_loss[-1], history.test_acc[-1] = token_metrics(model, test)

    hist = fit(model, task, None, epochs=s["epochs"], lr=s["lr"], optimizer="adam", weight_decay=0.0,
               scheduler="warmup-cosine", warmup=s["warmup"], callback=evaluate_real_tokens, device=device,
               checkpoint=_checkpoint(out_dir, "transformer", s), progress=progress, desc=s["task"])
    return model, hist, test


@torch.no_grad()
def greedy_answers(model: Transformer, task: SequenceTask, src: torch.Tensor) -> torch.Tensor:
    """Greedy outputs (B, length + 1) for sources (B, length): the symbols, EOS, then PAD."""
    out = model.greedy_decode(src, task.length + 1, bos=task.BOS, eos=task.EOS)[:, 1:]
    return F.pad(out, (0, task.length + 1 - out.shape[1]), value=task.PAD)  # all may end early


def sequence_accuracy(model: Transformer, test: SequenceTask) -> float:
    """Fraction of test sources whose greedily decoded output is exactly right (every symbol and
    EOS, nothing after it)."""
    (src, _), tgt_out = next(iter(test))
    expected = tgt_out.masked_fill(tgt_out == test.IGNORE, test.PAD)
    return float((greedy_answers(model, test, src) == expected).all(1).float().mean())


def symbols(ids: torch.Tensor, task: SequenceTask) -> str:
    """Tokens as the symbols 0..n_symbols-1 they stand for, space-separated; PAD, BOS and EOS
    are left out."""
    return " ".join(str(int(i) - 3) for i in ids if 3 <= int(i) < task.vocab_size)


def decoded_examples(model: Transformer, test: SequenceTask, n: int = 5) -> list[list]:
    """Rows [source, greedy output, correct] for the first ``n`` test sources."""
    (src, _), tgt_out = next(iter(test))
    out = greedy_answers(model, test, src[:n])
    expected = tgt_out[:n].masked_fill(tgt_out[:n] == test.IGNORE, test.PAD)
    return [[symbols(a, test), symbols(o, test), bool(torch.equal(o, e))]
            for a, o, e in zip(src[:n], out, expected)]


@torch.no_grad()
def cross_attention(model: Transformer, task: SequenceTask, src: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's cross-attention weights (B, h, length + 1, length) for sources
    (B, length), the decoder fed the correct answers (teacher forcing)."""
    model.eval()
    bos = torch.full((len(src), 1), task.BOS, device=src.device)
    model(src, torch.cat([bos, task.answer(src)], 1))
    return model.decoder[-1].cross_attn.weights


def reversal_fraction(weights: torch.Tensor, lengths: torch.Tensor) -> float:
    """Fraction of the output steps t < L (L: each source's length, (B,)) at which the weights
    (B, h, T, S), averaged over heads, are largest at source position L - 1 - t."""
    peak = weights.mean(1).argmax(-1)                                          # (B, T)
    t = torch.arange(peak.shape[1], device=peak.device)
    answer_steps = t < lengths[:, None]
    return float((peak == lengths[:, None] - 1 - t)[answer_steps].float().mean())


def cost_rows(configs: dict[str, tuple], n: int) -> tuple[list[list], dict[str, int]]:
    """Rows of the cost table for configurations {name: (N, h, d_model, d_ff, source vocabulary,
    target vocabulary)} with source and target of ``n`` tokens: parameters from the formula and
    from the model built, FLOPs per token (2 x MACs) from the formula and counted; and the
    built models' parameter counts by name. The inputs are made on the models' device."""
    rows, built = [], {}
    for name, (n_layers, h, d, d_ff, vs, vt) in configs.items():
        model = Transformer(vs, vt, d, h, n_layers, d_ff, max_len=n + 2).eval()
        device = model.out.weight.device
        with MatmulCounter() as count:
            model(torch.randint(1, vs, (1, n), device=device), torch.randint(1, vt, (1, n), device=device))
        built[name] = count_parameters(model)
        formula_flops = 2 * transformer_macs_per_token(d, n_layers, d_ff, vt, n)
        rows.append([name, n_layers, h, d, d_ff, f"{vs:,}",
                     f"{transformer_parameters(vs, vt, d, n_layers, d_ff):,}", f"{built[name]:,}",
                     f"{formula_flops / 1e6:.2f} M", f"{2 * count.macs / n / 1e6:.2f} M"])
    return rows, built


COST_HEADERS = ["configuration", "N", "h", "d_model", "d_ff", "vocabulary", "parameters (formula)",
                "parameters (built)", "FLOPs/token (formula)", "FLOPs/token (counted)"]


def generation_counts(model: Transformer, src: torch.Tensor, n_tokens: int) -> dict:
    """Greedy decoding of ``n_tokens`` tokens (no EOS) without and with the KV cache:
    {False: MatmulCounter, True: MatmulCounter, "same_tokens": bool}."""
    out, tokens = {}, {}
    for cache in (False, True):
        with MatmulCounter() as count:
            tokens[cache] = model.greedy_decode(src, n_tokens, bos=1, use_cache=cache)
        out[cache] = count
    return out | {"same_tokens": bool(torch.equal(tokens[False], tokens[True]))}


class _SourceTarget(nn.Module):
    """``model(src, tgt)`` as a module of one tensor, x (B, S + T) -> logits, for ``bench.latency``."""

    def __init__(self, model: Transformer, src_len: int):
        super().__init__()
        self.model, self.src_len = model, src_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :self.src_len], x[:, self.src_len:])


def head_timings(n_heads=(1, 4, 8, 16), d_model: int = 256, n_layers: int = 2, batch: int = 8,
                 seq_len: int = 32, repeat: int = 20, seed: int = 0) -> list[dict]:
    """Median wall time (ms) of one forward pass (source and target of ``seq_len`` tokens, vocabulary
    100, d_ff = 4 d_model) per number of heads h, with ``per_head=True`` (every head's projections
    and products separate calls) and with the heads fused: the same weights, the same input.
    Rows {"h", "per_head_ms", "fused_ms", "per_head_calls", "fused_calls"}. The models are
    built where torch builds modules (the CPU unless a default device is set), the input beside them."""
    rows = []
    for h in n_heads:
        torch.manual_seed(seed)
        fused = Transformer(100, 100, d_model, h, n_layers, 4 * d_model, dropout=0.0, max_len=seq_len)
        per_head = Transformer(100, 100, d_model, h, n_layers, 4 * d_model, dropout=0.0, max_len=seq_len,
                               per_head=True)
        per_head.load_state_dict(fused.state_dict())
        x = torch.randint(1, 100, (batch, 2 * seq_len), device=fused.out.weight.device)
        row = {"h": h}
        for name, model in (("per_head", per_head), ("fused", fused)):
            wrapped = _SourceTarget(model, seq_len).eval()
            with torch.no_grad(), MatmulCounter() as count:
                wrapped(x)
            row[f"{name}_ms"] = 1e3 * latency(wrapped, x, repeat=repeat, warmup=3)
            row[f"{name}_calls"] = count.calls
        rows.append(row)
    return rows


@register("transformer", "Chapter 5: an encoder-decoder Transformer trained to reverse sequences.",
          quick=TRANSFORMER_QUICK, full=TRANSFORMER_FULL)
def run_transformer(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, test = train_sequence_transformer(s, device, progress, out_dir)
    return {"parameters": count_parameters(model), "history": hist,
            "sequence_accuracy": sequence_accuracy(model, test)}
