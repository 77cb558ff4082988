"""Chapter 5's experiment: an encoder-decoder Transformer trained on a toy sequence task."""
from __future__ import annotations

from pathlib import Path

from ..data import SequenceTask
from ..models import count_parameters
from ..train import fit, select_device
from ..transformer import Transformer
from .core import _checkpoint, register, seed_for


TRANSFORMER_QUICK = dict(task="reverse", n_symbols=10, length=8, batch_size=64, steps_per_epoch=100, epochs=4,
                         d_model=64, n_heads=4, n_layers=2, d_ff=128, dropout=0.0, lr=3e-3, warmup=50,
                         test_size=500, seed=0)
TRANSFORMER_FULL = TRANSFORMER_QUICK | dict(length=16, steps_per_epoch=250, epochs=20, d_model=128, n_layers=3,
                                            d_ff=512, dropout=0.1, lr=1e-3, warmup=400, test_size=2000)


def train_sequence_transformer(s: dict, device=None, progress=None, out_dir: Path | None = None):
    """Train an encoder-decoder ``Transformer`` on the ``s["task"]`` (copy/reverse) task with Adam and a
    warm-up + cosine schedule; returns (model, History, test ``SequenceTask``), the test batches
    drawn with another seed than the training ones."""
    seed_for(s["seed"], device)
    device = select_device(device)
    task = SequenceTask(s["task"], s["n_symbols"], s["length"], s["batch_size"], s["steps_per_epoch"], s["seed"], device)
    test = SequenceTask(s["task"], s["n_symbols"], s["length"], s["test_size"], 1, s["seed"] + 1, device)
    model = Transformer(task.vocab_size, task.vocab_size, s["d_model"], s["n_heads"], s["n_layers"], s["d_ff"],
                        s["dropout"], max_len=s["length"] + 2, pad=task.PAD)
    hist = fit(model, task, test, epochs=s["epochs"], lr=s["lr"], optimizer="adam", weight_decay=0.0,
               scheduler="warmup-cosine", warmup=s["warmup"], device=device,
               checkpoint=_checkpoint(out_dir, "transformer", s), progress=progress, desc=s["task"])
    return model, hist, test


def sequence_accuracy(model: Transformer, test: SequenceTask) -> float:
    """Fraction of test sources whose greedily decoded output is exactly right (every symbol and EOS)."""
    (src, _), tgt_out = next(iter(test))
    out = model.greedy_decode(src, test.length + 1, bos=test.BOS, eos=test.EOS)
    return float((out[:, 1:] == tgt_out).all(1).float().mean())


@register("transformer", "Chapter 5: an encoder-decoder Transformer trained to reverse sequences.",
          quick=TRANSFORMER_QUICK, full=TRANSFORMER_FULL)
def run_transformer(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, test = train_sequence_transformer(s, device, progress, out_dir)
    return {"parameters": count_parameters(model), "history": hist, "sequence_accuracy": sequence_accuracy(model, test)}

