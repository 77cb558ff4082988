"""Chapter 2's experiments: an MLP trained on Fashion-MNIST, its parameters quantized to 8..2 bits."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import MLP, count_parameters
from ..quantization import dequantized_model
from ..train import evaluate, fit
from .core import _checkpoint, register, seed_for, train_loaders


MLP_QUICK = dict(dataset="fashion-mnist", n_per_class=None, test_per_class=None, hidden=[256, 128],
                 epochs=5, batch_size=128, lr=0.05, seed=0)
MLP_FULL = MLP_QUICK | dict(epochs=20)


def train_mlp(s: dict, out_dir: Path | None = None, device=None, progress=None, tag: str = "mlp"):
    """Train the MLP of settings ``s`` with SGD; returns (model, History, test loader)."""
    seed_for(s["seed"], device)
    train_loader, test_loader, train = train_loaders(s, device)
    c, h, w = train.shape
    model = MLP(c * h * w, tuple(s["hidden"]), train.num_classes)
    hist = fit(model, train_loader, test_loader, epochs=s["epochs"], lr=s["lr"], device=device,
               checkpoint=_checkpoint(out_dir, tag, s), progress=progress, desc=tag)
    return model, hist, test_loader


@register("mlp", "An MLP classifier on Fashion-MNIST (MNIST where available).", quick=MLP_QUICK, full=MLP_FULL)
def run_mlp(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, _ = train_mlp(s, out_dir, device, progress)
    if out_dir is not None:
        torch.save(model.state_dict(), out_dir / f"mlp-{s['profile']}.weights.pt")
    return {"parameters": count_parameters(model), "final_test_acc": hist.test_acc[-1] if hist.epochs else None,
            "history": hist}


# -- Chapter 2: quantization -------------------------------------------------------------------

def quantization_sweep(model, test_loader, bits: list[int]) -> dict:
    """Test (loss in bits, accuracy) of ``model`` in fp32 and after quantizing every parameter to
    each bit width, per tensor and per output channel."""
    def measure(m):
        loss, acc = evaluate(m, test_loader)
        return {"test_loss": loss, "test_acc": acc}
    return {"fp32": measure(model),
            **{mode: {str(b): measure(dequantized_model(model, b, per_channel=mode == "per_channel")) for b in bits}
               for mode in ("per_tensor", "per_channel")}}


@register("quantization", "Chapter 2.2: an MLP's parameters quantized to 8..2 bits, per tensor and per channel.",
          quick=MLP_QUICK | dict(bits=[8, 7, 6, 5, 4, 3, 2]), full=MLP_FULL | dict(bits=[8, 7, 6, 5, 4, 3, 2]))
def run_quantization(s: dict, out_dir: Path | None, device, progress) -> dict:
    model, hist, test_loader = train_mlp(s, out_dir, device, progress, tag="quantization-mlp")
    return {"parameters": count_parameters(model), "history": hist} | quantization_sweep(model, test_loader, s["bits"])

