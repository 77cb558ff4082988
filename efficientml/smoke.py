"""The device smoke run: every chapter's code path, on tiny settings, on one device.

    python -m efficientml.smoke --device cuda      # make smoke-device (default: the best device)

Each check runs one chapter's experiment (``experiments.run`` with tiny settings) or the helpers
its cells call, on the device, and one check kills a training run in the middle (SIGKILL, as a
lost Colab session would) and resumes it from its checkpoint. One line per check says whether
it passed (with the error if not); the exit status is 1 if any failed. Nothing is compared with
the book's numbers: this run finds device errors, it measures nothing. ``tests/test_devices.py``
runs the same checks on every accelerator present, and on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from . import cost
from .bench import bench_generation, latency
from .compression import load_compressed, save_compressed
from .data import load_text
from .experiments import run, settings, train_convnet, train_language_model, train_loaders, train_mlp
from .experiments.language_model import finetune_language_model, new_text_split
from .experiments.pruning import (calibration_batches, deep_compression, mean_scan, sensitivity_scans,
                                  sensitivity_vs_uniform, sparsity_sweeps, two_four_over_seeds)
from .experiments.qat import integer_inference_summary, qat_over_seeds
from .experiments.quantization import plot_grid_histogram
from .experiments.transfer import backbone_model, stage_table, transfer_model
from .experiments.transformer import (cost_rows, cross_attention, decoded_examples, generation_counts,
                                      head_timings, reversal_fraction, sequence_accuracy,
                                      train_sequence_transformer)
from .lora import (LoRAConv2d, LoRALinear, freeze, gradient_bytes, merge_lora, optimizer_state_bytes,
                   parameter_count, peak_memory_bytes, saved_activation_bytes)
from .models import MLP, ConvNet, count_macs
from .pruning import (SparseConvNet, compact, filter_l1_pruning, fold_masks, recalibrate_batchnorm,
                      unstructured_pruning)
from .qat import IntegerMLP, calibrate, prepare_qat
from .quantization import (dequantize, dequantized_model, dynamic_int8, kmeans_quantize, load_quantized,
                           quantize, save_quantized, serialized_size, sqnr_db, zero_code_fraction)
from .reproducibility import machine
from .results import read_json
from .train import evaluate, make_optimizer, select_device
from .transformer import Transformer, attention, causal_mask, generation_attention_macs

# Tiny settings of every registered experiment: seconds each on a CPU.
TINY = {
    "lr-sweep": dict(lrs=[0.1], epochs=2, n_per_class=10, test_per_class=10, width=0.25, seeds=[0, 1]),
    "schedules": dict(epochs=2, milestones=[1], n_per_class=10, test_per_class=10, width=0.25, seeds=[0]),
    "mlp": dict(epochs=1, n_per_class=20, test_per_class=20),
    "quantization": dict(epochs=1, n_per_class=20, test_per_class=20, bits=[8, 2], seeds=[0, 1]),
    "pruning": dict(n_per_class=10, val_per_class=5, test_per_class=10, width=0.25, epochs=4, milestones=[3],
                    prune_start=1, prune_every=1, prune_stop=2, seeds=[0]),
    "lora": dict(pretrain_per_class=10, pretrain_epochs=1, n_per_class=4, test_per_class=5, epochs=1,
                 lora_ranks=[1], data_sizes=[2], lr_grid=[0.01], seeds=[0], runs=["pt_net", "lora_layer4"],
                 data_runs=["pt_net"]),
    "transformer": dict(steps_per_epoch=5, epochs=1, test_size=20, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                        warmup=2),
    "language-model": dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, steps_per_epoch=5, epochs=1, warmup=2,
                           val_batches=2, ft_steps=3, ft_epochs=1, ft_warmup=1, ft_ranks=[1], ft_eval_batches=2,
                           ft_seeds=[0]),
}


def _finite(x) -> bool:
    """Every number in a nested result (dicts, lists, Histories) is finite or NaN-free."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return not math.isinf(x)
    return True


def experiment_check(name: str) -> Callable[[torch.device, Path], str]:
    """A check that runs experiment ``name`` on TINY settings on the device."""
    def check(device: torch.device, tmp: Path) -> str:
        t0 = time.perf_counter()
        r = run(name, "quick", TINY[name], out_dir=tmp / name, device=device, progress=False)
        if not _finite(r["results"]):
            raise AssertionError(f"{name}: an infinite number in the results")
        return f"{time.perf_counter() - t0:.1f} s"
    return check


def kill_and_resume(device: torch.device, tmp: Path) -> str:
    """Start ``python -m efficientml run schedules`` on the device, SIGKILL it once its first
    epoch's checkpoint is written, start it again: it must resume (not restart) and finish."""
    out = tmp / "killed"
    settings = TINY["schedules"] | dict(epochs=4, milestones=[2], n_per_class=40)
    cmd = [sys.executable, "-m", "efficientml", "run", "schedules", "--out", str(out), "--device", str(device),
           "--no-progress"] + [f"--set={k}={v!r}" for k, v in settings.items()]
    ckpt = out / "schedules-multistep-seed0-quick.ckpt.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists():
            if proc.poll() is not None:
                raise AssertionError("the run ended before its first checkpoint: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint after 300 s")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stderr.close()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["history"]
    done = len(saved["train_loss"])
    if not 1 <= done < settings["epochs"]:
        raise AssertionError(f"killed after {done} epochs: nothing left to resume")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if again.returncode != 0:
        raise AssertionError(f"resuming failed: {again.stderr[-2000:]}")
    h = read_json(out / "schedules-quick.json")["results"]["runs"]["multistep"][0]
    if len(h["train_loss"]) != settings["epochs"] or h["train_loss"][:done] != saved["train_loss"]:
        raise AssertionError("the resumed run did not continue the killed one")
    return f"killed after epoch {done} of {settings['epochs']}, resumed to the end"


# -- the helpers the chapters' cells call, beyond their experiments ------------------------------

def _expect(ok, what: str) -> None:
    """Raise AssertionError(``what``) unless ``ok``."""
    if not ok:
        raise AssertionError(what)


def _on(t: torch.Tensor, device: torch.device, what: str) -> None:
    """Raise unless tensor ``t`` is on ``device`` (any index of its type)."""
    _expect(t.device.type == device.type, f"{what} is on {t.device}, not on {device}")


def _close(a: torch.Tensor, b: torch.Tensor, device: torch.device, tol: float) -> bool:
    """``a`` and ``b``, two computations of the same outputs, equal to within ``tol`` (absolute and
    relative) on the CPU; to within 1e-2 at least on an accelerator, whose float32 convolutions may
    round their inputs to TF32 (cuDNN's default on NVIDIA GPUs since Ampere)."""
    tol = tol if device.type == "cpu" else max(tol, 1e-2)
    return torch.allclose(a.cpu(), b.cpu(), rtol=tol, atol=tol)


def _tiny(name: str, **changes) -> dict:
    """Experiment ``name``'s quick settings with its TINY overrides and ``changes``: what the
    chapter's cells pass to its helpers, scaled down."""
    return settings(name, "quick") | TINY[name] | changes


def _building_on(device: torch.device):
    """Where helpers that build their own models (as torch builds modules) build them: on an
    accelerator a ``torch.device`` context; on the CPU none, so that the device trap of the
    tests still sees every tensor the package makes without naming its device."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.device(device)


def chapter2_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 2's cells on the device: quantize/dequantize (per tensor, per channel, symmetric)
    and k-means of a trained weight; PTQ models evaluated; save_quantized on the device, loaded
    into a CPU model; dynamic int8; QAT (prepare_qat = PTQ before training, qat_over_seeds);
    the integer-only MLP built from the device model; latency."""
    s = _tiny("quantization", seeds=[0])
    model, _, test_loader = train_mlp(s, device=device, progress=False)
    train_loader = train_loaders(s, device)[0]
    w = model.net[1].weight.detach()
    for axis, symmetric in ((None, False), (0, False), (None, True)):
        q = quantize(w, 3, axis=axis, symmetric=symmetric)
        for name in ("codes", "scale", "zero_point"):
            _on(getattr(q, name), device, f"quantize(axis={axis}, symmetric={symmetric}).{name}")
        err = (dequantize(q) - w).abs().max().item()
        _expect(err <= q.scale.max().item() / 2 * (1 + 1e-5), f"quantization error {err} above half a step")
        _expect(0 <= zero_code_fraction(q) <= 1, "zero_code_fraction outside [0, 1]")
    plot_grid_histogram(w, 3, ax=Figure().subplots(), channel=0)
    cb = kmeans_quantize(w, 2)
    _on(cb.codes, device, "k-means codes")
    _on(dequantize(cb), device, "k-means dequantized weight")
    _expect(math.isfinite(sqnr_db(w, dequantize(cb))), "k-means SQNR not finite")
    fp32_acc = evaluate(model, test_loader)[1]
    for per_channel, method in ((False, "linear"), (True, "linear"), (False, "kmeans")):
        dq = dequantized_model(model, 2, per_channel, method)
        _on(next(dq.parameters()), device, f"dequantized_model({method}) weights")
        _expect(0 <= evaluate(dq, test_loader)[1] <= 1, "PTQ accuracy outside [0, 1]")
    for method in ("linear", "kmeans"):
        path = tmp / f"mlp-4bit-{method}.pt"
        save_quantized(model, path, bits=4, method=method)
        cpu_model = load_quantized(MLP(784, tuple(s["hidden"]), 10), path)
        _on(next(cpu_model.parameters()), torch.device("cpu"), "the loaded model")
        expected = dequantized_model(model, 4, method=method).state_dict()
        _expect(all(torch.equal(t, expected[k].cpu()) for k, t in cpu_model.state_dict().items()),
                f"the {method} file written on {device} did not load exactly on the CPU")
    _expect(serialized_size(model) > 0, "serialized_size is 0")
    int8 = dynamic_int8(model)
    _on(next(model.parameters()), device, "the model after dynamic_int8")
    int8_acc = evaluate(int8, test_loader)[1]
    _expect(abs(int8_acc - fp32_acc) < 0.1, f"dynamic int8 accuracy {int8_acc} far from fp32 {fp32_acc}")
    x, _ = next(iter(test_loader))
    with torch.no_grad():
        _expect(_close(prepare_qat(model, 4)(x), dequantized_model(model, 4)(x), device, 1e-5),
                "prepare_qat's forward pass is not the PTQ model's")
    qat = qat_over_seeds([model], s, [2], device=device, progress=False)
    _expect(all(0 <= v <= 1 for v in qat[0]["2"].values()), "QAT accuracies outside [0, 1]")
    logits = IntegerMLP.from_float(model, calibrate(model, train_loader, 2))(x)
    _expect(logits.shape == (len(x), 10) and logits.dtype == torch.float32, "integer MLP logits malformed")
    summary = integer_inference_summary(model, train_loader, test_loader, n_batches=2)
    _expect(summary["agreement"] >= 0.9, f"integer model agrees on only {summary['agreement']:.0%}")
    x_cpu = torch.randn(8, 1, 28, 28, device="cpu")
    _expect(latency(model, x_cpu, repeat=3, warmup=1) > 0 and latency(int8, x_cpu, repeat=3, warmup=1) > 0,
            "latency not positive")
    return (f"quantize/k-means on {device}, PTQ, 4-bit files loaded on the CPU, int8, QAT, integer MLP "
            f"(agreement {summary['agreement']:.0%}), latency")


def chapter3_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 3's cells on the device: a tiny trained baseline pruned by filters and
    compacted (same outputs, fewer MACs); the sparsity sweep (one-shot, BatchNorm
    recalibration, fine-tuning, gradual), the sensitivity scan and its per-layer choice, 2:4
    pruning, Deep Compression (a file written on the device loads on the CPU)."""
    s = _tiny("pruning", seeds=[0], batch_size=50, test_per_class=5)
    baseline, _ = train_convnet(s, 0.1, 1, device=device, progress=False)
    train_loader, test_loader, _ = train_loaders(s, device)
    x = torch.randn(16, 1, 28, 28, device=device)
    pruned = SparseConvNet.from_convnet(baseline, "filter").eval()
    filter_l1_pruning(pruned, 0.5)
    small = compact(pruned)
    _on(next(small.parameters()), device, "the compacted network")
    with torch.no_grad():
        _expect(_close(small(x), pruned(x), device, 1e-5), "compact changed the outputs")
    _expect(count_macs(small, (1, 28, 28)) < count_macs(baseline, (1, 28, 28)), "compact saved no MACs")
    _expect(latency(small, x, repeat=3, warmup=1) > 0, "latency not positive")
    sweep = sparsity_sweeps([baseline], s, sparsities=(0.5,), epochs=1, steps=2, calibration=1, device=device,
                            progress=False)[0]
    _expect(all(0 <= a <= 1 for kind in ("structured", "unstructured") for m in sweep[kind].values()
                for a in m.values()), "sparsity sweep accuracies outside [0, 1]")
    scans = sensitivity_scans([baseline], s, (0.9,), "unstructured", calibration=1, device=device)
    _expect(len(mean_scan(scans)) == len(baseline.features), "the scan missed a layer")
    chosen = sensitivity_vs_uniform([baseline], s, scans, 0.01, "unstructured", calibration=1, device=device,
                                    progress=False)[0]
    _expect(abs(chosen["overall"]["sensitivity"] - chosen["overall"]["uniform"]) < 0.05,
            "uniform pruning not at the chosen overall sparsity")
    two_four = two_four_over_seeds([baseline], s, calibration=1, device=device)[0]
    _expect(two_four["groups ok"], "2:4 pruning left a group of 4 without exactly 2")
    net = SparseConvNet.from_convnet(baseline, "weight")
    unstructured_pruning(net, 0.7)
    recalibrate_batchnorm(net, calibration_batches(train_loader, 1))
    stages = deep_compression(baseline, net, test_loader)
    _expect(stages["pruned, 4-bit k-means"]["bytes"] < stages["dense, fp32"]["bytes"], "no compression")
    folded = fold_masks(net).eval()
    path = tmp / "deep-compression.pt"
    save_compressed(folded, path, bits=4)
    on_cpu = load_compressed(ConvNet(1, 10, channels=[c.out_channels for c, _, _ in net.features]), path)
    on_device = load_compressed(copy.deepcopy(folded), path).state_dict()
    _expect(all(torch.equal(t, on_device[k].cpu()) for k, t in on_cpu.state_dict().items()),
            f"the compressed file written on {device} loads otherwise on the CPU")
    with torch.no_grad():
        _expect(on_cpu.eval()(x.cpu()).shape == (len(x), 10), "the CPU copy's outputs malformed")
    return (f"filter pruning + compact ({count_macs(small, (1, 28, 28)):,} MACs), sweep, scan, 2:4, "
            f"Deep Compression ({stages['dense, fp32']['bytes'] / stages['pruned, 4-bit k-means']['bytes']:.1f}x)")


def chapter4_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 4's cells on the device: stage_table and freeze of a ResNet-18; LoRALinear and
    LoRAConv2d (start equal to their base, merge keeps the outputs); the lora_layer4 model of a
    device backbone, one SGD step (gradients and momentum only where it trains), its saved
    activations and peak memory (ValueError by design on MPS), merge_lora keeping its outputs."""
    s = _tiny("lora", seeds=[0])
    net = backbone_model(s, 3, 1).to(device)  # the chapter's design: small-image stem, narrow
    rows, _ = stage_table(net, (1, 28, 28))
    _expect(rows[-1][0] == "total", "stage_table has no total")
    _expect(0 < freeze(net, up_to="layer3").fraction < 1, "freeze up to layer3 froze all or nothing")
    torch.manual_seed(0)
    linear = LoRALinear(torch.nn.Linear(512, 5).to(device), r=4, alpha=8)
    conv = LoRAConv2d(copy.deepcopy(net.layer4[0].conv2), r=8, alpha=16)
    for layer, x in ((linear, torch.randn(16, 512, device=device)), (conv, torch.randn(2, conv.base.in_channels, 4, 4, device=device))):
        with torch.no_grad():
            _expect(_close(layer(x), layer.base(x), device, 0), f"{type(layer).__name__} does not start as its base")
            layer.lora_B.normal_()
            y = layer(x)
            layer.merge()
            _expect(_close(layer(x), y, device, 1e-4), f"merging {type(layer).__name__} changed its outputs")
    model = transfer_model("lora_layer4", net, len(s["target_classes"]), s, r=2).to(device)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", 0.1, s["momentum"])
    x = torch.randn(2, 1, 28, 28, device=device)
    y = torch.arange(2, device=device)

    def step():
        F.cross_entropy(model.train()(x), y).backward()
        opt.step()

    try:
        peak = f"peak {peak_memory_bytes(step, device=device) / 2**20:.1f} MiB"
    except ValueError as e:
        _expect(device.type == "mps" and "not measured" in str(e), f"peak_memory_bytes: {e}")
        peak = "peak memory refused on MPS"
        step()
    count = parameter_count(model)
    _expect(gradient_bytes(model) == 4 * count.trainable, "gradients where nothing trains")
    _expect(optimizer_state_bytes(opt) == 4 * count.trainable, "momentum buffers where nothing trains")
    _expect(saved_activation_bytes(model, x) > 0, "no saved activations")
    _expect(any(bool(m.lora_B.ne(0).any()) for m in model.modules() if isinstance(m, LoRAConv2d)),
            "training did not move LoRA's B")
    model.eval()
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        _expect(_close(model(x), before, device, 1e-4), "merge_lora changed the outputs")
    return f"stage_table, freeze, LoRA layers, lora_layer4 step ({count.trainable:,} trainable), {peak}, " \
           f"{merged} merged"


def chapter5_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 5's cells on the device: attention under a causal mask; a tiny Transformer trained,
    then sequence_accuracy, decoded_examples, cross_attention (no weight on padding) and
    reversal_fraction; generation_counts (same tokens with and without the KV cache, attention
    MACs as the formula); cost_rows and head_timings with their models on the device."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 5, 16, device=device) for _ in range(3))
    out, _ = attention(q, k, v, mask=causal_mask(5, device))
    _expect(_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), device, 1e-5),
            "attention under a causal mask differs from PyTorch's")
    s = _tiny("transformer")
    model, _, test = train_sequence_transformer(s, device, progress=False)
    acc = sequence_accuracy(model, test)
    _expect(0 <= acc <= 1 and len(decoded_examples(model, test, n=3)) == 3, "sequence accuracy or examples")
    (src, _), _ = next(iter(test))
    weights = cross_attention(model, test, src)
    _on(weights, device, "the cross-attention weights")
    lengths = test.lengths(src)
    padding = torch.arange(test.length, device=lengths.device) >= lengths[:, None]
    _expect(weights.transpose(1, 3)[padding].abs().max().item() == 0.0, "weight on a padding position")
    _expect(0 <= reversal_fraction(weights, lengths) <= 1, "reversal_fraction outside [0, 1]")
    n_layers, d_model, n_tokens = 1, 16, 6
    torch.manual_seed(0)
    per_head = Transformer(20, 20, d_model=d_model, n_heads=2, n_layers=n_layers, d_ff=32, per_head=True)
    src = torch.randint(3, 20, (1, 5), device=device)
    counts = generation_counts(per_head.to(device).eval(), src, n_tokens)
    _expect(counts["same_tokens"], "greedy decoding differs with and without the KV cache")
    _expect(all(counts[c].macs_by_op["matmul"] == generation_attention_macs(n_layers, d_model, 5, n_tokens, c)
                for c in (False, True)), "generation's attention MACs differ from the formula")
    with _building_on(device):
        rows, _ = cost_rows({"tiny": (1, 2, 16, 32, 13, 13)}, n=10)
        timings = head_timings(n_heads=(1, 2), d_model=16, n_layers=1, batch=2, seq_len=8, repeat=2)
    _expect(rows[0][6] == rows[0][7], "cost_rows: the parameter formula differs from the model built")
    _expect(timings[-1]["per_head_calls"] > timings[-1]["fused_calls"], "head_timings: per head not more calls")
    return f"attention, sequence accuracy {acc:.0%}, cross-attention, generation counts, cost rows, head timings"


def chapter6_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 6's cells on the device: a tiny LanguageModel trained; generate greedy with and
    without the KV cache (the same tokens, past a full context) and sampled with a CPU
    ``torch.Generator`` (the same tokens for the same seed); bench_generation; LoRA fine-tuning
    (finetune_language_model) and merge_lora giving the same logits and greedy text."""
    s = _tiny("language-model", block_size=8, batch_size=4, val_batch_size=4, ft_batch_size=4, ft_eval_batch_size=4)
    model, _, tok, _, _ = train_language_model(s, device, progress=False)
    prompt = tok.encode("\n")[None].to(device)
    greedy = {c: model.generate(prompt, 2 * s["block_size"], temperature=0, use_cache=c) for c in (False, True)}
    _on(greedy[True], device, "generated tokens")
    _expect(torch.equal(greedy[False], greedy[True]), "greedy tokens differ with and without the KV cache")
    sampled = [model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
               for _ in range(2)]
    _expect(torch.equal(*sampled), "the same CPU generator seed sampled different tokens")
    bench = bench_generation(model, n_tokens=10, batch=2, repeat=1)
    _expect(bench["same_tokens"], "bench_generation: cache and no cache differ")
    ft_tokens, eval_tokens = new_text_split(load_text(s["text"]), tok, s)
    adapted, _, cost = finetune_language_model(model, ft_tokens, eval_tokens, s, "lora", r=1, device=device,
                                               progress=False)
    x = eval_tokens[: 4 * s["block_size"]].view(4, s["block_size"]).to(device)
    adapted.eval()
    with torch.no_grad():
        logits, text = adapted(x), adapted.generate(prompt, 10, temperature=0)
        merged = merge_lora(adapted)
        _expect(_close(adapted(x), logits, device, 1e-4), "merge_lora changed the logits")
        _expect(torch.equal(adapted.generate(prompt, 10, temperature=0), text), "merge_lora changed the text")
    return (f"generate (greedy, cache = no cache; sampled, CPU generator), bench_generation, "
            f"LoRA r=1 fine-tuned ({cost['trainable']:,} trainable), {merged} merged")


def chapter7_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 7's cells on the device, briefly: a roofline (a small product and a copy), the
    book's workloads counted and timed, both training steps' speeds and utilization, the step
    against nanoGPT, a profiled step, and a tiny language model trained with bfloat16 autocast
    (``fit(precision=...)``). Times are only required to be positive."""
    roof = cost.measure_roofline(device=device, n=256, min_run_time=0.02)
    loads = cost.book_workloads(device=device, min_run_time=0.02)
    speeds = cost.training_speeds(device, min_run_time=0.02)
    vs = cost.against_nanogpt(rounds=1, steps=1, device=device)
    prof = cost.profile_step(cost.language_model_step(device)[0], steps=1, top=3)
    _expect(roof.peak_flops > 0 and roof.bandwidth > 0 and all(w.seconds > 0 and w.flops > 0 for w in loads),
            "a roof or a workload measured nothing")
    _expect(all(sp.utilization(roof.peak_flops) > 0 for sp in speeds) and vs["ratio"] > 0, "no training speed")
    _expect(set(prof["phases"]) == {"forward", "backward", "optimizer"}, f"profiled phases {set(prof['phases'])}")
    s = _tiny("language-model", block_size=8, batch_size=4, val_batch_size=4)
    _, hist, *_ = train_language_model(s, device, progress=False, precision="bfloat16")
    _expect(all(math.isfinite(x) for x in hist.train_loss + hist.test_loss), "bfloat16 training: a loss not finite")
    return (f"roofline ({roof.peak_flops / 1e9:.0f} GFLOP/s at n=256), {len(loads)} workloads, "
            f"{len(speeds)} training speeds, nanoGPT ratio, profiled step, bfloat16 autocast training")


def chapter8_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 8's cells, briefly: a tiny language model's checkpointed gradients against the
    plain ones and accumulated gradients against the whole batch's, on the device; and two
    processes (gloo on 127.0.0.1, the CPU: the chapter's data-parallel runs) trained for 2 steps
    with DDP and FSDP2 against one process."""
    from . import parallel
    from .transformer import LanguageModel
    torch.manual_seed(0)
    model = LanguageModel(13, 16, 2, 2, 32, 0.0, max_len=8).to(device)
    ckpt = parallel.checkpoint_blocks(copy.deepcopy(model))
    x = torch.randint(0, 13, (4, 8), device=device)
    y = torch.randint(0, 13, (4, 8), device=device)
    parallel.accumulate_gradients(model, x, y, 1)
    whole = [p.grad.clone() for p in model.parameters()]
    parallel.accumulate_gradients(ckpt, x, y, 1)
    _expect(all(torch.allclose(a.grad, b, atol=1e-6) for a, b in zip(ckpt.parameters(), whole)),
            "checkpointed gradients differ from the plain ones")
    parallel.accumulate_gradients(model, x, y, 4)
    _expect(all(torch.allclose(a.grad, b, atol=1e-6) for a, b in zip(model.parameters(), whole)),
            "4 micro-batches' gradients differ from the whole batch's")
    s = dict(text="tinyshakespeare", val_fraction=0.1, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0,
             block_size=8, batch_size=4, lr=1e-3, weight_decay=0.1, clip_grad_norm=1.0, seed=0)
    one = parallel.train_data_parallel(0, 1, s, "single", 2)
    two = parallel.launch(parallel.data_parallel_runs, 2, (s, {"ddp": 2, "fsdp": 2}), timeout=240)[0]
    _expect(all(abs(a - b) < 1e-4 for mode in two for a, b in zip(two[mode]["losses"], one["losses"])),
            "two processes' losses differ from one process's")
    return "checkpointed and accumulated gradients on the device, 2 processes (DDP, FSDP2) on gloo"


def chapter9_helpers(device: torch.device, tmp: Path) -> str:
    """Chapter 9's cells that run on any device, on tiny models built there: calibration inputs,
    round to nearest, AWQ and GPTQ in place; the packed group-wise file written and read back
    into a model on the device; the KV cache's bytes; tiled attention against naive attention;
    greedy speculative decoding against the target's own greedy text. (The int8 and int4
    kernels and the timings are the CPU's: the chapter runs them there.)"""
    from . import serving
    from .experiments import serving as ex
    from .transformer import LanguageModel, attention
    torch.manual_seed(0)
    with _building_on(device):
        target = LanguageModel(13, 32, 2, 2, 64, 0.0, max_len=16).to(device).eval()
        draft = LanguageModel(13, 32, 2, 1, 64, 0.0, max_len=16).to(device).eval()
    tokens = torch.randint(0, 13, (200,), device="cpu")     # text lives on the CPU, as the chapter's
    s = ex.serving_settings() | dict(block_size=16, calibration_batches=1, calibration_batch_size=4,
                                     eval_batches=1, eval_batch_size=4, spec_ks=[2], spec_prompts=2,
                                     spec_prompt_len=3, spec_tokens=8)
    calib = ex.calibration_inputs(target, tokens, s, 0)
    for method in ("rtn", "awq", "gptq"):
        q = copy.deepcopy(target)
        serving.quantize_weights(q, 3, 16, method, calib)
        _on(q.out.weight, device, f"the {method} weights")
        _expect(math.isfinite(ex.loss_nats(q, ex.eval_windows(tokens, s, 0))), f"{method}: loss not finite")
    serving.save_groupwise(target, tmp / "model.pt", 4, 16)
    back = serving.load_groupwise(copy.deepcopy(target), tmp / "model.pt")
    want = copy.deepcopy(target)
    serving.quantize_weights(want, 4, 16)
    _expect(all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), want.state_dict().values())),
            "the packed file read back differs from the RTN weights")
    caches = [{} for _ in target.layers]
    prompt = tokens[:10][None].to(device)
    with torch.no_grad():
        target(prompt, caches=caches)
    _expect(serving.cache_bytes(caches) == serving.kv_cache_bytes(2, 32, 10), "KV cache bytes differ")
    q, k, v = (torch.randn(1, 2, 37, 8, device=device) for _ in range(3))
    mask = torch.ones(37, 37, dtype=torch.bool, device=device).tril()
    _expect(_close(serving.tiled_attention(q, k, v, causal=True, tile=8), attention(q, k, v, mask)[0], device, 1e-5),
            "tiled attention differs from naive attention")
    sweep = ex.speculative_sweep(target, draft, ex.spec_prompts(tokens, s), s)
    _expect(sweep["k"][2]["same_as_target"], "greedy speculative decoding differs from the target's greedy text")
    return "RTN, AWQ, GPTQ, the packed file, KV cache bytes, tiled attention, speculative decoding"


HELPER_CHECKS: dict[str, Callable[[torch.device, Path], str]] = {
    "chapter 2 helpers": chapter2_helpers,
    "chapter 3 helpers": chapter3_helpers,
    "chapter 4 helpers": chapter4_helpers,
    "chapter 5 helpers": chapter5_helpers,
    "chapter 6 helpers": chapter6_helpers,
    "chapter 7 helpers": chapter7_helpers,
    "chapter 8 helpers": chapter8_helpers,
    "chapter 9 helpers": chapter9_helpers,
}


CHECKS: dict[str, Callable[[torch.device, Path], str]] = {
    f"experiment {name}": experiment_check(name) for name in TINY} | HELPER_CHECKS | {
    "kill and resume": kill_and_resume,
}


def smoke(device=None, only: list[str] | None = None, out=sys.stdout) -> dict[str, str | None]:
    """Run the checks (``only``: those whose name contains one of these words) on ``device``;
    ``{check: None if it passed, else the error}``, printed one line each as they run."""
    device = select_device(device)
    print(f"smoke run on {machine(device)}, torch {torch.__version__}", file=out, flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="efficientml-smoke-") as tmp:
        for name, check in CHECKS.items():
            if only and not any(word in name for word in only):
                continue
            try:
                note = check(device, Path(tmp))
                results[name] = None
                print(f"  passed  {name}: {note}", file=out, flush=True)
            except Exception as e:  # a failed check is reported; the others still run
                results[name] = "".join(traceback.format_exception_only(type(e), e)).strip()
                print(f"  FAILED  {name}: {results[name]}", file=out, flush=True)
                traceback.print_exc(file=sys.stderr)
    failed = sum(v is not None for v in results.values())
    print(f"{len(results) - failed} passed, {failed} failed", file=out, flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m efficientml.smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--only", nargs="*", help="run only the checks whose name contains one of these words")
    a = p.parse_args(argv)
    results = smoke(a.device, a.only)
    return 1 if any(v is not None for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
