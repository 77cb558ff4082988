"""Chapter 2's quantization-aware training and integer-only inference experiments.

The fp32 MLPs come from ``quantization.quantization_over_seeds`` (one per seed); each is fine-tuned
through fake quantization (``qat_finetune``) and compared with post-training quantization (PTQ) of
the same model at the same bit width. ``integer_inference_summary`` runs one MLP in int8 integers.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..qat import IntegerMLP, calibrate, convert_qat, fake_quant_forward, prepare_qat
from ..quantization import dequantized_model
from ..train import History, evaluate, fit
from .core import per_seed, seed_for, train_loaders

QAT_EPOCHS = 1
QAT_LR = 0.01      # a fifth of the fp32 training rate: fine-tune near the trained weights


def qat_finetune(model: nn.Module, train_loader, test_loader, bits: int, epochs: int = QAT_EPOCHS,
                 lr: float = QAT_LR, per_channel: bool = False, device=None, progress=None,
                 desc: str = "qat") -> tuple[nn.Module, History]:
    """Fine-tune a copy of ``model`` through ``bits``-bit fake quantization of its weights and biases
    (``prepare_qat``) with ``train.fit`` (SGD), then return (the real quantized model, History): the
    post-training quantization of the fine-tuned float master weights, ``dequantized_model(...)``,
    whose forward pass is the fake-quantized one the History's last test accuracy measured."""
    qat = prepare_qat(model, bits, per_channel)
    hist = fit(qat, train_loader, test_loader, epochs=epochs, lr=lr, device=device, progress=progress,
               desc=desc)
    return dequantized_model(convert_qat(qat), bits, per_channel), hist


def qat_over_seeds(models: list[nn.Module], s: dict, bits_list: list[int], epochs: int = QAT_EPOCHS,
                   lr: float = QAT_LR, per_channel: bool = False, device=None, progress=None) -> list[dict]:
    """PTQ and QAT test accuracy of the fp32 model of each seed in ``s["seeds"]`` (``models``, in the
    same order) at each bit width, one dict per seed: ``{"4": {"ptq", "qat", "fp32_finetuned",
    "ptq_finetuned"}, ...}``. QAT trains ``epochs`` more epochs; so that its gain is not mistaken for
    the gain of more training, the control fine-tunes the fp32 model just as long at the same ``lr``
    without fake quantization: "fp32_finetuned" is its accuracy, "ptq_finetuned" its PTQ's.
    Every fine-tuning run is seeded with its seed, so all see the same batches."""
    if len(models) != len(s["seeds"]):
        raise ValueError(f"{len(models)} models for {len(s['seeds'])} seeds")
    models_left = iter(models)  # per_seed runs the seeds in order: one model each
    return per_seed(s, lambda ss: _qat_seed(next(models_left), ss, bits_list, epochs, lr, per_channel, device,
                                            progress))


def _qat_seed(model: nn.Module, s: dict, bits_list: list[int], epochs: int, lr: float, per_channel: bool,
              device, progress) -> dict:
    """``qat_over_seeds``'s row for one seed's ``model`` and settings ``s`` (with its ``seed``)."""
    seed = s["seed"]
    train_loader, test_loader, _ = train_loaders(s, device)
    seed_for(seed, device)
    control = copy.deepcopy(model)
    fit(control, train_loader, None, epochs=epochs, lr=lr, device=device, progress=progress,
        desc=f"fp32-finetune-seed{seed}")
    control_acc = evaluate(control, test_loader)[1]
    row = {}
    for bits in bits_list:
        seed_for(seed, device)
        qmodel, _ = qat_finetune(model, train_loader, None, bits, epochs, lr, per_channel, device,
                                 progress, desc=f"qat-{bits}bit-seed{seed}")
        row[str(bits)] = {"ptq": evaluate(dequantized_model(model, bits, per_channel), test_loader)[1],
                          "qat": evaluate(qmodel, test_loader)[1], "fp32_finetuned": control_acc,
                          "ptq_finetuned": evaluate(dequantized_model(control, bits, per_channel),
                                                    test_loader)[1]}
    return row


@torch.no_grad()
def integer_inference_summary(model, train_loader, test_loader, n_batches: int = 10) -> dict:
    """Run ``model`` (an ``MLP``) in int8 integers (``IntegerMLP``, activation ranges calibrated on
    ``n_batches`` training batches) and compare it on the test set with fp32 and with the float
    fake-quant reference: test accuracies, the largest |logit difference| integer vs reference and
    the fraction of test inputs on which their predicted classes agree."""
    model = copy.deepcopy(model).cpu().eval()
    act_absmax = calibrate(model, train_loader, n_batches)
    int_model = IntegerMLP.from_float(model, act_absmax)
    correct = {"fp32": 0, "fake_quant": 0, "integer": 0}
    agree, n, max_diff = 0, 0, 0.0
    for x, y in test_loader:
        x, y = x.cpu(), y.cpu()
        logits = {"fp32": model(x), "fake_quant": fake_quant_forward(model, act_absmax, x),
                  "integer": int_model(x)}
        for k, v in logits.items():
            correct[k] += int((v.argmax(1) == y).sum())
        agree += int((logits["integer"].argmax(1) == logits["fake_quant"].argmax(1)).sum())
        max_diff = max(max_diff, (logits["integer"] - logits["fake_quant"]).abs().max().item())
        n += len(y)
    return {f"{k}_acc": c / n for k, c in correct.items()} | {
        "max_logit_diff": max_diff, "agreement": agree / n, "act_absmax": act_absmax}


def qat_spread(rows: list[dict]) -> dict:
    """{bits: {kind: Spread over seeds}} of ``qat_over_seeds``'s rows, kind in "ptq", "qat",
    "fp32_finetuned", "ptq_finetuned"."""
    from ..seeds import spread
    return {b: {k: spread(r[b][k] for r in rows) for k in rows[0][b]} for b in rows[0]}


def qat_table(rows: list[dict]) -> str:
    """Markdown table of ``qat_over_seeds``: per bit width, PTQ, QAT, and the control (fp32
    fine-tuned just as long, then PTQ), each as mean ± std over seeds in percent."""
    from ..plots import markdown_table
    sp = qat_spread(rows)
    return markdown_table(
        [[f"{b}-bit, per tensor", sp[b]["ptq"].pct(1), sp[b]["qat"].pct(1), sp[b]["ptq_finetuned"].pct(1)]
         for b in sp],
        ["bits", "PTQ of the trained model", "QAT (one more epoch through the grid)",
         "control: one more fp32 epoch, then PTQ"])


def integer_table(summary: dict) -> str:
    """Markdown table of ``integer_inference_summary``: the three models' test accuracies and how
    closely the integer model follows its float reference."""
    from ..plots import markdown_table
    return markdown_table(
        [["fp32", f"{100 * summary['fp32_acc']:.2f}%", ""],
         ["float, fake-quantized weights and activations (reference)",
          f"{100 * summary['fake_quant_acc']:.2f}%", ""],
         ["integers only (int8 x int8 -> int32, fixed-point requantization)",
          f"{100 * summary['integer_acc']:.2f}%",
          f"same class as the reference on {100 * summary['agreement']:.2f}% of test images; "
          f"largest logit difference {summary['max_logit_diff']:.3f}"]],
        ["model", "test accuracy", "agreement"])
