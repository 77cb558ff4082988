"""Chapter 9's experiment: Chapter 6's quick language model served cheaply.

Its weights quantized group-wise (round to nearest, and activation-aware scaling calibrated on
training batches) and scored on the validation text and on the held-out part of Chapter 6's new
play; decoding timed against prefill on a wider model whose weights do not fit in a cache;
speculative decoding with a 1-layer draft model. The engine is ``efficientml.serving``.
"""
from __future__ import annotations

import copy
import io
import time

import torch
from torch import nn

from .. import serving
from ..cost import measure
from ..data import TokenBatches, load_text
from ..train import LN2, evaluate
from ..transformer import LanguageModel
from .core import settings
from .language_model import new_text_split, train_language_model

# bits and group sizes of the sweep; calibration: batches of the training text (AWQ), drawn with
# each of ``calibration_seeds``; evaluation: fixed windows of the validation text and of the new
# play's held-out part (Chapter 6's ``new_text_split``).
SERVING = dict(bits=[8, 6, 4, 3, 2], groups=[32, 128], calibrated_bits=[3, 2], calibration_batches=2,
               calibration_batch_size=16, calibration_seeds=[0, 1, 2], eval_batches=8, eval_batch_size=32,
               draft_layers=1, draft_steps_per_epoch=100,
               speed_model=dict(d_model=1024, n_heads=16, n_layers=6, d_ff=4096), prompt_len=16,
               decode_tokens=16, int4_group=32,
               attention_lengths=[256, 512, 1024, 2048, 4096], attention_heads=4, attention_d_head=32,
               attention_tile=128,
               spec_ks=[1, 2, 3, 4, 6], spec_prompts=12, spec_prompt_len=8, spec_tokens=48, ngram_n=3,
               ngram_alpha=0.01)


def serving_settings() -> dict:
    """Chapter 6's quick language-model settings with this chapter's (``SERVING``) added."""
    return settings("language-model", "quick") | SERVING


def train_draft(s: dict, device=None, progress=None):
    """The draft model of speculative decoding: Chapter 6's recipe with ``draft_layers`` blocks
    and ``draft_steps_per_epoch`` steps per epoch (the target's ``steps_per_epoch``: 200)."""
    d = s | dict(n_layers=s["draft_layers"], steps_per_epoch=s["draft_steps_per_epoch"])
    model, hist, *_ = train_language_model(d, device, progress)
    return model, hist


def eval_windows(tokens: torch.Tensor, s: dict, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``eval_batches`` fixed batches of ``eval_batch_size`` random windows of ``tokens``."""
    return list(TokenBatches(tokens, s["block_size"], s["eval_batch_size"], s["eval_batches"], seed))


def splits(s: dict, tok, val: torch.Tensor) -> dict[str, list]:
    """The two texts the quantized models are scored on: ``validation`` (the validation split)
    and ``new play`` (the held-out part of the play Chapter 6 fine-tunes on)."""
    _, held_out = new_text_split(load_text(s["text"]), tok, s)
    return {"validation": eval_windows(val, s, s["seed"] + 1), "new play": eval_windows(held_out, s, s["seed"] + 2)}


def loss_nats(model: nn.Module, windows) -> float:
    """Mean cross-entropy of next-character prediction over ``windows``, in nats."""
    return evaluate(model, windows)[0] * LN2


def calibration_inputs(model: nn.Module, train: torch.Tensor, s: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every Linear layer's inputs on ``calibration_batches`` batches of the training text."""
    batches = TokenBatches(train, s["block_size"], s["calibration_batch_size"], s["calibration_batches"],
                           1000 + seed)
    return serving.linear_inputs(model, [x for x, _ in batches])


CALIBRATED = ("awq", "gptq")


def quantization_sweep(model: nn.Module, windows: dict[str, list], calibrations: list[dict], s: dict,
                       progress=None) -> list[dict]:
    """Losses (nats, on each split of ``windows``) of ``model``'s weights quantized at every
    (bits, group) of ``s`` by round to nearest (one row), and at ``calibrated_bits`` by AWQ and
    GPTQ (one row per calibration set in ``calibrations``). Rows: ``{"method", "bits", "group",
    "seed" (the calibration set; None for RTN), split: loss, ..., "alpha": mean AWQ exponent}``."""
    rows = []
    cells = [(g, b) for g in s["groups"] for b in s["bits"]]
    for g, b in (progress(cells, desc="bits x group") if progress else cells):
        runs = [("rtn", None)]
        if b in s["calibrated_bits"]:
            runs += [(m, i) for m in CALIBRATED for i in range(len(calibrations))]
        for method, seed in runs:
            q = copy.deepcopy(model)
            report = serving.quantize_weights(q, b, g, method, None if seed is None else calibrations[seed])
            alphas = [r["alpha"] for r in report.values()]
            rows.append({"method": method, "bits": b, "group": g, "seed": seed,
                         "alpha": sum(alphas) / len(alphas)}
                        | {name: loss_nats(q, w) for name, w in windows.items()})
    return rows


def packed_sizes(model: nn.Module, bits: list[int], group: int) -> dict[int, dict]:
    """Per bit width: the bytes of ``serving.save_groupwise``'s file (written to memory and read
    back), whether the model read back gives exactly the round-to-nearest weights, and what the
    file holds: the bytes of packed codes, scales and zero points (``codes_and_scales``) and of
    the float32 tensors (``float32``); the rest is ``torch.save``'s container."""
    out = {}
    for b in bits:
        buf = io.BytesIO()
        serving.save_groupwise(model, buf, b, group)
        size = buf.getbuffer().nbytes
        buf.seek(0)
        back = serving.load_groupwise(copy.deepcopy(model), buf)
        want = copy.deepcopy(model)
        serving.quantize_weights(want, b, group, "rtn")
        same = all(torch.equal(x, y) for x, y in zip(back.state_dict().values(), want.state_dict().values()))
        buf.seek(0)
        saved = torch.load(buf, map_location="cpu", weights_only=True)
        payload = sum(t.numel() * t.element_size() for entry in saved["tensors"].values()
                      for t in entry.values() if torch.is_tensor(t))
        floats = sum(t.numel() * t.element_size() for t in saved["float32"].values())
        out[b] = {"bytes": size, "round_trip": same, "codes_and_scales": payload, "float32": floats}
    return out


# -- Decoding against prefill ------------------------------------------------------------------

def speed_model(s: dict, vocab_size: int) -> LanguageModel:
    """A model of Chapter 6's architecture, ``speed_model`` wide (untrained: speed does not depend
    on the values), in eval mode on the CPU: its float32 weights are far larger than any cache."""
    torch.manual_seed(0)
    m = s["speed_model"]
    return LanguageModel(vocab_size, m["d_model"], m["n_heads"], m["n_layers"], m["d_ff"], 0.0,
                         max_len=s["prompt_len"] + s["decode_tokens"] + 1).eval()


@torch.no_grad()
def decode_timing(model: nn.Module, prompt: torch.Tensor, n_tokens: int, min_run_time: float = 0.3) -> dict:
    """Median seconds of the prefill (the prompt (1, T) in one call, the caches filled) and of one
    decoding step (one token, with the caches), the latter from ``n_tokens`` steps after a stored
    prefill: ``{"prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"}``."""
    t = prompt.shape[1]
    if t + n_tokens > model.max_len:
        raise ValueError(f"prompt ({t}) + n_tokens ({n_tokens}) exceed the model's context ({model.max_len})")

    def prefill():
        caches = [{} for _ in model.layers]
        model(prompt, caches=caches)
        return caches

    filled = prefill()

    def decode():
        caches = [dict(c) for c in filled]          # the cache grows by new tensors: the stored one stays
        x = prompt[:, -1:]
        for i in range(n_tokens):
            x = model(x, start=t + i, caches=caches)[:, -1].argmax(-1, keepdim=True)

    pre = measure(prefill, min_run_time).median
    step = measure(decode, min_run_time).median / n_tokens
    return {"prefill_s": pre, "decode_s": step, "prefill_tokens_per_s": t / pre, "decode_tokens_per_s": 1 / step}


SPEED_VARIANTS = ("float32", "bfloat16", "int8 weight-only", "int8 dynamic", "int4 weight-only")


def speed_variants(model: nn.Module, int4_group: int) -> dict[str, nn.Module]:
    """``model`` with its Linear weights stored five ways (``SPEED_VARIANTS``): float32; bfloat16
    (the whole model cast); int8 with PyTorch's weight-only kernel (``serving.Int8WeightLinear``);
    int8 with PyTorch's dynamic quantization (fbgemm/oneDNN int8 products, the activations
    quantized on the fly: ``quantization.dynamic_int8``); 4 bits with the weight-only kernel
    (``serving.Int4WeightLinear``, groups of ``int4_group``)."""
    from ..quantization import dynamic_int8
    return {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
            "int8 weight-only": serving.weight_only_model(model, 8),
            "int8 dynamic": dynamic_int8(model),
            "int4 weight-only": serving.weight_only_model(model, 4, int4_group)}


def decode_speeds(model: nn.Module, prompt: torch.Tensor, s: dict, progress=None) -> dict[str, dict]:
    """``decode_timing`` of every ``speed_variants`` of ``model``, with its weights' bytes."""
    variants = speed_variants(model, s["int4_group"])
    names = progress(list(variants), desc="weights") if progress else list(variants)
    return {name: decode_timing(variants[name], prompt, s["decode_tokens"])
            | {"weight_bytes": serving.weight_bytes(variants[name])} for name in names}


# -- Tiled attention's memory and time ---------------------------------------------------------

def attention_inputs(length: int, s: dict) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(length)
    return tuple(torch.randn(1, s["attention_heads"], length, s["attention_d_head"], generator=g)
                 for _ in range(3))


def attention_memory(s: dict) -> list[dict]:
    """Peak bytes allocated (above the inputs) by causal attention over each of
    ``attention_lengths``: naive (the whole score matrix), tiled (``serving.tiled_attention``)
    and ``scaled_dot_product_attention``; and the largest difference of tiled from naive."""
    from ..lora import cpu_memory_levels
    from ..transformer import attention
    rows = []
    for length in s["attention_lengths"]:
        q, k, v = attention_inputs(length, s)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        naive = lambda: attention(q, k, v, mask)[0]                                   # noqa: E731
        tiled = lambda: serving.tiled_attention(q, k, v, causal=True, tile=s["attention_tile"])  # noqa: E731
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        row = {"length": length}
        for name, fn in (("naive", naive), ("tiled", tiled), ("sdpa", sdpa)):
            row[name] = cpu_memory_levels(fn)[0]
        row["max_diff"] = (tiled() - naive()).abs().max().item()
        rows.append(row)
    return rows


def attention_times(s: dict, lengths: list[int], min_run_time: float = 0.3) -> list[dict]:
    """Median seconds of causal attention over each length: naive, tiled, scaled_dot_product_attention."""
    from ..transformer import attention
    rows = []
    for length in lengths:
        q, k, v = attention_inputs(length, s)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        fns = {"naive": lambda: attention(q, k, v, mask),
               "tiled": lambda: serving.tiled_attention(q, k, v, causal=True, tile=s["attention_tile"]),
               "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
        rows.append({"length": length} | {name: measure(fn, min_run_time).median for name, fn in fns.items()})
    return rows


# -- Speculative decoding ----------------------------------------------------------------------

def spec_prompts(tokens: torch.Tensor, s: dict) -> list[torch.Tensor]:
    """``spec_prompts`` prompts (1, ``spec_prompt_len``) cut from ``tokens`` at evenly spaced places."""
    n, t = s["spec_prompts"], s["spec_prompt_len"]
    step = (len(tokens) - t) // n
    return [tokens[i * step:i * step + t][None] for i in range(n)]


@torch.no_grad()
def speculative_sweep(target: LanguageModel, draft: LanguageModel, prompts: list[torch.Tensor], s: dict,
                      temperature: float = 0.0, seed: int = 0) -> dict:
    """For each k in ``spec_ks``: speculative decoding of ``spec_tokens`` tokens after every
    prompt; acceptance rate, tokens per target call, wall seconds over all prompts, and (greedy)
    whether every output equals ``target.generate``'s. ``baseline_s``: the target alone, with
    its KV cache; ``draft_s``: the draft alone (an ``NGramDraft``: greedy lookups)."""
    n = s["spec_tokens"]
    device = next(target.parameters()).device
    prompts = [p.to(device) for p in prompts]

    def plain(model):
        t0 = time.perf_counter()
        if isinstance(model, serving.NGramDraft):                    # no generate: one lookup per token
            outs = []
            for p in prompts:
                for _ in range(n):
                    p = torch.cat([p, model(p)[:, -1].argmax(-1, keepdim=True)], dim=1)
                outs.append(p)
        else:
            outs = [model.generate(p, n, temperature=temperature, generator=torch.Generator().manual_seed(seed))
                    for p in prompts]
        return outs, time.perf_counter() - t0

    plain(target)                                                   # warm-up
    reference, baseline = plain(target)
    _, draft_s = plain(draft)
    out = {"baseline_s": baseline, "draft_s": draft_s, "k": {}}
    for k in s["spec_ks"]:
        stats, same = serving.SpeculativeStats(), True
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for p, want in zip(prompts, reference):
            got, st = serving.speculative_generate(target, draft, p, n, k=k, temperature=temperature, generator=g)
            stats.rounds, stats.proposed, stats.accepted = (stats.rounds + st.rounds, stats.proposed + st.proposed,
                                                            stats.accepted + st.accepted)
            same = same and torch.equal(got, want)
        seconds = time.perf_counter() - t0
        out["k"][k] = {"acceptance": stats.acceptance, "tokens_per_round": stats.tokens_per_round,
                       "seconds": seconds, "speedup": baseline / seconds,
                       "same_as_target": same if temperature == 0 else None}
    return out
