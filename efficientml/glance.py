"""Results at a glance: one page of every chapter's headline numbers, generated, never typed.

Three sources, one column each:
- **quick**: what the executed chapters computed. Each chapter's last cell calls
  ``checks.record``, which stores its numbers and their tolerances in the notebook's outputs (a
  hidden MyST-NB ``glue`` record) and checks them; ``read_records`` reads them back from the
  ``.ipynb`` files.
- **full**: the result files of real full-profile runs (``results/EXPERIMENT-full.json``),
  read with ``results.load_result``; "not run yet" where there is none.
- **reference**: the assignment's numbers (``reference.REFERENCE``).

``python -m efficientml.glance book/results.md`` writes the page; ``make book`` runs it before
building, so the page always shows what the stored notebooks and result files hold.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checks
from .experiments.serving import SERVING
from .reference import REFERENCE
from .results import load_result
from .train import LN2

REPO_ROOT = Path(__file__).resolve().parent.parent


def read_records(notebook: str | Path) -> dict[str, dict]:
    """{experiment: values} of every ``checks.record`` stored in an executed notebook."""
    return {name: rec["values"] for name, rec in checks.read_records(notebook).items()}


def read_tolerances(notebook: str | Path) -> dict[str, dict]:
    """{experiment: {key: tolerance}} of every ``checks.record`` stored in an executed notebook."""
    return {name: rec["tolerance"] for name, rec in checks.read_records(notebook).items()}


def _mean_last(run, series_key: str) -> float:
    """The last value of ``series_key`` of one run: a History dict, or a list of them (one per
    seed), whose mean is taken."""
    runs = run if isinstance(run, list) else [run]
    return sum(h[series_key][-1] for h in runs) / len(runs)


def _last(series_key: str, runs_key: str = "runs") -> Callable[[dict], dict]:
    return lambda r: {name: _mean_last(run, series_key) for name, run in r[runs_key].items()}


@dataclass(frozen=True)
class Row:
    label: str | Callable[[], str]  # a callable where the label names a setting: read, not typed;
    # with ``fill``, a template whose {fields} are values the chapter recorded (its own settings)
    experiment: str
    key: str
    fmt: str = "pct"              # pct, nats, x / x2 (a ratio), G, int, MB, ms, e (scientific), text
    reference: float | str | None = None
    same_in_every_profile: bool = False   # a property of the code or the data, not of a training run
    measured: bool = False        # a figure of the machine (checks.measured): shown, never checked
    fill: bool = False

    def text(self, records: dict | None = None) -> str:
        """The row's label as the page shows it; ``records``: {experiment: recorded values} of
        the chapter, which fill a template (``fill``)."""
        text = self.label() if callable(self.label) else self.label
        return text.format(**(records or {}).get(self.experiment, {})) if self.fill else text


def _quick(name: str) -> dict:
    from .experiments import settings
    return settings(name, "quick")


def _seeds(s: dict) -> str:
    return f"mean of {len(s['seeds'])} seeds"


def _per_class(n) -> str:
    return "all its training images" if n is None else f"{n} training images per class"


def _final_sparsity(s: dict) -> str:
    """The sparsity that Chapter 3's schedule ends at, as a percentage: prune_step at every
    prune_every-th epoch from prune_start to prune_stop."""
    events = (s["prune_stop"] - s["prune_start"]) // s["prune_every"] + 1
    return f"{100 * events * s['prune_step']:.0f}%"


def _subset_convnet(name: str) -> str:
    s = _quick(name)
    return f"Fashion-MNIST ({_per_class(s['n_per_class'])}), ConvNet at width {s['width']:g}, {_seeds(s)}"


def _mlp_data(name: str) -> str:
    s = _quick(name)
    shape = " -> ".join(str(w) for w in (784, *s["hidden"], 10))
    return f"Fashion-MNIST ({_per_class(s['n_per_class'])}), MLP {shape}, {_seeds(s)}"


def _lora_data(s: dict) -> str:
    design = f" (width {s['width']}, small-image stem)" if s.get("small_input") else ""
    return (f"Fashion-MNIST, ResNet-18{design} pretrained on {len(s['source_classes'])} classes, "
            f"{s['n_per_class']} images of each of {len(s['target_classes'])} others, {_seeds(s)}")


def _transformer_data(s: dict) -> str:
    return f"reverse task, {s['min_length']} to {s['length']} random symbols of {s['n_symbols']}"


def _ft_seeds() -> str:
    """Chapter 6's fine-tuning runs are averaged over its ``ft_seeds``."""
    return f"mean of {len(_quick('language-model')['ft_seeds'])} seeds"


def _lm_shape(s: dict) -> str:
    return f"{s['n_layers']} blocks of width {s['d_model']}, batches of {s['batch_size']} x {s['block_size']} characters"


@dataclass(frozen=True)
class Chapter:
    number: int
    title: str
    notebook: str                 # under book/
    data: Callable[[], str]       # what the quick numbers were computed on, from the quick settings
    rows: tuple[Row, ...]
    one_profile: bool = False     # the chapter runs the same in every profile: no full column to fill


# How a full run's result file gives the same keys that the chapter records.
FULL: dict[str, Callable[[dict], dict]] = {
    "lr-sweep": _last("test_acc"),
    "schedules": lambda r: _last("test_acc")(r) | {"multistep train": _mean_last(r["runs"]["multistep"], "train_acc")},
    "quantization": lambda r: {"fp32": r["fp32"]["test_acc"], "8": r["per_tensor"]["8"]["test_acc"],
                               "4": r["per_tensor"]["4"]["test_acc"], "2 per tensor": r["per_tensor"]["2"]["test_acc"],
                               "2 per channel": r["per_channel"]["2"]["test_acc"]}
                              | ({"mean/kmeans/2": r["kmeans"]["2"]["test_acc"]} if "kmeans" in r else {}),
    "pruning": _last("test_acc"),
    "lora": _last("test_acc"),
    "transformer": lambda r: {"sequence_accuracy": r["sequence_accuracy"]},
    "cost": lambda r: {},
    "cost-checked": lambda r: {},
    "scale": lambda r: {},          # Chapter 8 runs the same in every profile: no full result
    "serving": lambda r: {},        # so does Chapter 9
    "language-model": lambda r: {"val_loss_nats": r["val_loss_nats"], "kv_cache_equal": r.get("kv_cache_equal")} | {
        f"finetune/{k}": LN2 * _mean_last(v, "test_loss") for k, v in r.get("finetune", {}).get("runs", {}).items()},
}

_R = REFERENCE
# Chapter 9's settings that its rows name: the smallest group size, the fewest bits calibrated,
# the longest attention measured
_G, _LOW, _LONG = min(SERVING["groups"]), min(SERVING["calibrated_bits"]), max(SERVING["attention_lengths"])
_K, _DRAFT = min(SERVING["spec_ks"]), f"{SERVING['draft_layers']}-block"
_NGRAM = {2: "bigram", 3: "trigram"}.get(SERVING["ngram_n"], f"{SERVING['ngram_n']}-gram")
CHAPTERS: tuple[Chapter, ...] = (
    Chapter(1, "Learning rates and schedules", "01_learning_rates", lambda: _subset_convnet("lr-sweep"), (
        *(Row(lambda lr=lr: f"lr {lr}: test accuracy after {_quick('lr-sweep')['epochs']} epochs", "lr-sweep", lr,
              reference=_R["lr-sweep"]["test_acc"][lr])
          for lr in map(str, _quick("lr-sweep")["lrs"])),
        Row("MultiStepLR: final test accuracy", "schedules", "multistep", reference=_R["schedules"]["test_acc"]["multistep"]),
        Row("CosineAnnealingLR: final test accuracy", "schedules", "cosine", reference=_R["schedules"]["test_acc"]["cosine"]),
        Row("MultiStepLR: final train accuracy", "schedules", "multistep train",
            reference=_R["schedules"]["train_acc"]["multistep"]))),
    Chapter(2, "Quantization", "02_quantization", lambda: _mlp_data("quantization"), (
        Row("fp32 MLP: test accuracy", "quantization", "fp32", reference=_R["mlp-quantization"]["test_acc"]["fp32"]),
        Row("8-bit weights (per tensor): test accuracy", "quantization", "8",
            reference=_R["mlp-quantization"]["test_acc"]["8-bit"]),
        Row("4-bit weights (per tensor): test accuracy", "quantization", "4",
            reference=_R["mlp-quantization"]["test_acc"]["4-bit"]),
        Row("2-bit weights, per tensor: test accuracy", "quantization", "2 per tensor"),
        Row("2-bit weights, per output channel: test accuracy", "quantization", "2 per channel"),
        Row("2-bit weights, k-means codebook per tensor: test accuracy", "quantization", "mean/kmeans/2"),
        Row("2-bit per tensor after one epoch of quantization-aware training", "quantization", "qat/2/qat"),
        Row("int8 integer-only inference (first seed): test accuracy", "quantization",
            "seed 0/integer only"))),
    Chapter(3, "Pruning", "03_pruning", lambda: _subset_convnet("pruning"), (
        Row("baseline (unpruned): final test accuracy", "pruning", "baseline",
            reference=f"{100 * _R['schedules']['test_acc']['multistep']:.1f}% (MultiStepLR, Chapter 1)"),
        Row(lambda: f"structured, {_final_sparsity(_quick('pruning'))} of filters: final test accuracy", "pruning",
            "structured"),
        Row(lambda: f"unstructured, {_final_sparsity(_quick('pruning'))} of weights: final test accuracy", "pruning",
            "unstructured"),
        Row("pruned after training to 70%, unstructured, one-shot + 1 epoch fine-tuning", "pruning",
            "after training/unstructured/fine-tuned 70"),
        Row("... structured (70% of filters)", "pruning", "after training/structured/fine-tuned 70"),
        Row("2:4 sparsity, one-shot, BatchNorm recalibrated", "pruning", "2:4"),
        Row("Deep Compression: pruned + 4-bit k-means file, times smaller than fp32", "pruning",
            "deep compression/ratio", fmt="x"),
        Row("... its test accuracy", "pruning", "deep compression/accuracy"))),
    Chapter(4, "Transfer learning and LoRA", "04_lora",
            lambda: _lora_data(_quick("lora")), (
        Row("pt_net (all layers trained): final test accuracy", "lora", "pt_net"),
        Row(lambda: f"net_freeze (up to {_quick('lora')['freeze_up_to']} frozen)", "lora", "net_freeze"),
        Row("net_freeze_lora (frozen + LoRA classifier)", "lora", "net_freeze_lora"),
        Row(lambda: f"lora_layer4 (frozen + rank-{_quick('lora')['r_backbone']} LoRA on layer4, new classifier "
            "trained)", "lora", "lora_layer4"),
        Row("scratch (no pretraining)", "lora", "scratch"))),
    Chapter(5, "The Transformer from scratch", "05_transformer", lambda: _transformer_data(_quick("transformer")), (
        Row("matmuls per inference counted = N(15h+7)+1 for every (N, h) tried", "transformer", "matmul_formula_holds",
            fmt="text", reference="N(15h+7)+1", same_in_every_profile=True),
        Row("reverse task: sequences exactly right", "transformer", "sequence_accuracy"))),
    Chapter(6, "A small language model", "06_language_model",
            lambda: f"Tiny Shakespeare, {_lm_shape(_quick('language-model'))}", (
        Row("validation loss (nats per character)", "language-model", "val_loss_nats", fmt="nats",
            reference=f"{_R['language-model']['val_loss_nats']['cpu']} (nanoGPT, the same configuration)"),
        Row("unigram entropy of the text (nats)", "language-model", "unigram_nats", fmt="nats", reference="about 3.31",
            same_in_every_profile=True),
        Row("bigram conditional entropy (nats)", "language-model", "bigram_nats", fmt="nats", reference="about 2.45",
            same_in_every_profile=True),
        Row("greedy generation identical with and without KV cache", "language-model", "kv_cache_equal", fmt="text"),
        Row("a play it never saw (The Tempest), not fine-tuned: loss on its held-out part (nats)", "language-model",
            "finetune/none", fmt="nats"),
        Row(lambda: f"... fully fine-tuned ({_ft_seeds()})", "language-model", "finetune/full", fmt="nats"),
        *(Row(lambda r=r: f"... LoRA r={r} on the attention projections ({_ft_seeds()})", "language-model",
              f"finetune/lora r={r}", fmt="nats") for r in _quick("language-model")["ft_ranks"][1:2]))),
    Chapter(7, "What a model costs on this machine", "07_cost",
            lambda: "the CPU that executed the chapter (the threads it was given), the models of Chapters 1, 2 and 6", (
        Row("peak float32 matrix product, all threads (FLOP/s)", "cost", "peak_flops", fmt="G", measured=True),
        Row("memory bandwidth, all threads (bytes/s, a 256 MiB copy)", "cost", "bandwidth", fmt="G",
            measured=True),
        Row("ConvNet training: images per second", "cost", "convnet/items_per_s", fmt="int", measured=True),
        Row("ConvNet training: utilization of the peak (MFU)", "cost", "convnet/utilization", measured=True),
        Row("language model training: tokens per second", "cost", "language model/items_per_s", fmt="int",
            measured=True),
        Row("language model training: utilization of the peak (MFU)", "cost", "language model/utilization",
            measured=True),
        Row("language-model step time, the book's / nanoGPT's (same size and batch)", "cost", "nanogpt_ratio",
            fmt="x2", measured=True),
        Row("a running sum of {running_sum_n:,} x {running_sum_term:g} in float16 (exact: {running_sum_exact:g})",
            "cost-checked", "running_sum/float16", fill=True,
            fmt="nats", same_in_every_profile=True),
        Row("bfloat16 autocast training: final loss minus float32's (nats)", "cost-checked", "bf16_minus_fp32",
            fmt="nats")), one_profile=True),
    Chapter(8, "Training past one device", "08_scale",
            lambda: f"Chapter 6's quick language model ({_lm_shape(_quick('language-model'))}), processes on gloo", (
        Row("saved activations of one step (bytes; the formula equals the measurement)", "scale",
            "activation_bytes", fmt="int"),
        Row("held after the forward pass", "scale", "held/plain", fmt="MB"),
        Row("... every block checkpointed (gradients bitwise identical)", "scale", "held/checkpointed", fmt="MB"),
        Row("... step time, checkpointed / plain", "scale", "checkpoint_time_ratio", fmt="x2", measured=True),
        Row("{world_size} processes (DDP) against 1: largest loss difference in {ddp_steps} steps (nats)", "scale",
            "max_gap_ddp", fill=True,
            fmt="e"),
        Row("AdamW state per process: DDP (bytes)", "scale", "optimizer_state/ddp", fmt="int"),
        Row("... ZeroRedundancyOptimizer, rank 0", "scale", "optimizer_state/zero", fmt="int"),
        Row("... FSDP2, rank 0", "scale", "optimizer_state/fsdp", fmt="int"),
        Row("held between steps per process: DDP", "scale", "held_between_steps/ddp", fmt="MB"),
        Row("... ZeroRedundancyOptimizer", "scale", "held_between_steps/zero", fmt="MB"),
        Row("all-reduce latency, {world_size} processes (fastest call)", "scale", "allreduce_latency_ms", fmt="ms",
            fill=True,
            measured=True),
        Row("the model's gradients all-reduced in one bucket: times faster than one call per tensor", "scale",
            "bucket_speedup", fmt="x", measured=True)), one_profile=True),
    Chapter(9, "Serving a language model cheaply", "09_serving",
            lambda: f"Chapter 6's quick language model ({_lm_shape(_quick('language-model'))}) on Tiny "
                    "Shakespeare; timings of a wider model of the same architecture", (
        Row("float32 model: validation loss (nats)", "serving", "fp32/validation", fmt="nats"),
        *(Row(f"{b}-bit weights in groups of {_G}, round to nearest", "serving", f"loss/rtn/{_G}/{b}/validation",
              fmt="nats") for b in (4, _LOW)),
        *(Row(f"... {m.upper()} (mean of {len(SERVING['calibration_seeds'])} calibration sets)", "serving",
              f"loss/{m}/{_G}/{_LOW}/validation", fmt="nats") for m in ("awq", "gptq")),
        Row(f"4-bit packed file (groups of {_G}): times smaller than float32", "serving", "file_ratio/4", fmt="x"),
        Row("KV cache: the formula equals the measured bytes", "serving", "kv_cache_equal", fmt="text"),
        Row(f"causal attention over {_LONG:,} tokens, peak memory: naive", "serving", f"attention_mb/{_LONG}/naive",
            fmt="MB"),
        Row("... tiled, with an online softmax", "serving", f"attention_mb/{_LONG}/tiled", fmt="MB"),
        Row("float32 decoding, batch 1: prefill tokens per second over decoding's", "serving",
            "prefill_over_decode", fmt="x", measured=True),
        Row("int8 weights, PyTorch's dynamic quantization: decoding speed-up", "serving",
            "decode_speedup/int8 dynamic", fmt="x2", measured=True),
        Row("int4 weights, PyTorch's weight-only kernel: decoding speed-up", "serving",
            "decode_speedup/int4 weight-only", fmt="x2", measured=True),
        Row("speculative decoding, greedy: the target's own text", "serving", "greedy_same", fmt="text"),
        Row(f"... first guesses kept (k = {_K}): {_DRAFT} network draft", "serving", f"acceptance/network/greedy/{_K}"),
        Row(f"... {_NGRAM} table draft", "serving", f"acceptance/table/greedy/{_K}"),
        Row(f"... best measured speed-up: {_DRAFT} network draft", "serving", "best_greedy_speedup/network",
            fmt="x2", measured=True),
        Row(f"... {_NGRAM} table draft", "serving", "best_greedy_speedup/table", fmt="x2", measured=True)),
            one_profile=True),
)


def _fmt(value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    if fmt == "nats":
        return f"{value:.3f}"
    if fmt == "x":
        return f"{value:.1f}x"
    if fmt == "x2":
        return f"{value:.2f}x"
    if fmt == "G":
        return f"{value / 1e9:.1f} G"
    if fmt == "int":
        return f"{value:,.0f}"
    if fmt == "MB":
        return f"{value:.2f} MB"
    if fmt == "ms":
        return f"{value:.2f} ms"
    if fmt == "e":
        return f"{value:.1e}"
    return "yes" if value is True else "no" if value is False else str(value)


def _fmt_tolerance(tol: float, fmt: str) -> str:
    return f"± {100 * tol:.1f} points" if fmt == "pct" else f"± {tol:.3g}"


def build_page(book_dir: str | Path | None = None, results_dir: str | Path | None = None) -> str:
    """The Markdown of the results page, from the notebooks in ``book_dir`` and the result files
    in ``results_dir`` (defaults: the repository's ``book/`` and ``results/``)."""
    book_dir = Path(book_dir) if book_dir is not None else REPO_ROOT / "book"
    lines = ["# Results at a glance", "",
             "Every chapter's headline numbers on one page. This page is generated by code "
             "(`python -m efficientml.glance`, run by `make book`) from three sources, and nothing on it is "
             "typed by hand:", "",
             "- **quick**: computed by the executed chapters (the quick profile, 2 CPU cores), read from the "
             "outputs stored in their notebooks. CI re-executes every chapter and checks each number against "
             "the stored one within the tolerance shown (*checked within*; deterministic numbers exactly): "
             "wider than the spread between machines and seeds, narrower than the effects the chapters claim;",
             "- **full**: read from the result files that real full-profile runs wrote "
             "(`results/EXPERIMENT-full.json`); *not run yet* where no such run has been made;",
             "- **reference**: the assignment's numbers, measured on CIFAR-10 or MNIST on a GPU: a guide for the "
             "full profile, not a target for the quick one.", ""]
    for ch in CHAPTERS:
        quick = read_records(book_dir / f"{ch.notebook}.ipynb")
        tols = read_tolerances(book_dir / f"{ch.notebook}.ipynb")
        machine_figures = checks.read_records(book_dir / f"{ch.notebook}.ipynb", checks.MEASURED_PREFIX)
        full = {}
        for exp in {row.experiment for row in ch.rows if not ch.one_profile}:
            result = load_result(exp, "full", results_dir)
            full[exp] = None if result is None else FULL[exp](result["results"])
        lines += [f"## {ch.number}. {ch.title}", "",
                  f"Chapter: [{ch.title}]({ch.notebook}.ipynb). Quick numbers on {ch.data()}."]
        lines += [f"Figures marked *this machine's* were measured on {m['machine']}, when the chapter was last "
                  "executed: another machine gives other figures, so they are shown, never checked."
                  for m in machine_figures.values()][:1]
        lines += ["", "| result | quick | checked within | full | reference |", "|---|---|---|---|---|"]
        for row in ch.rows:
            stored = (machine_figures.get(row.experiment, {}).get("values", {}) if row.measured
                      else quick.get(row.experiment, {}))
            if row.key not in stored:
                raise KeyError(f"{ch.notebook}.ipynb records no {row.experiment!r} value {row.key!r}: "
                               f"re-execute it (make execute NB=book/{ch.notebook}.ipynb)")
            q = stored[row.key]
            if row.measured:
                lines.append(f"| {row.text(quick)} | {_fmt(q, row.fmt)} | not checked: *this machine's* | "
                             f"(a property of the machine) | {_fmt(row.reference, row.fmt) or '—'} |")
                continue
            f = full.get(row.experiment)
            if row.same_in_every_profile or ch.one_profile:
                f_text = "(the same in every profile)"
            elif f is None:
                f_text = "*not run yet*"
            else:
                f_text = _fmt(f.get(row.key), row.fmt) or "(not in the result file)"
            tol = tols[row.experiment].get(row.key, 0.0)
            within = "exactly" if not tol else _fmt_tolerance(tol, row.fmt)
            lines.append(f"| {row.text(quick)} | {_fmt(q, row.fmt)} | {within} | {f_text} | "
                         f"{_fmt(row.reference, row.fmt) or '—'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else REPO_ROOT / "book" / "results.md"
    page = build_page()
    out.write_text(page + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
