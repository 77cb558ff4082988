"""Chapter 2's experiments: an MLP trained on Fashion-MNIST, its parameters quantized to 8..2 bits."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import MLP, count_parameters
from ..plots import markdown_table
from ..quantization import cpu_state_dict, dequantized_model
from ..seeds import SEEDS, Spread, spread
from ..train import evaluate, fit
from .core import _checkpoint, per_seed, register, seed_for, train_loaders


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
        torch.save(cpu_state_dict(model), out_dir / f"mlp-{s['profile']}.weights.pt")
    return {"parameters": count_parameters(model), "final_test_acc": hist.test_acc[-1] if hist.epochs else None,
            "history": hist}


# -- Chapter 2: quantization -------------------------------------------------------------------

MODES = ("per_tensor", "per_channel", "kmeans")
MODE_LABELS = {"per_tensor": "linear, per tensor", "per_channel": "linear, per output channel",
               "kmeans": "k-means codebook, per tensor"}


def quantization_sweep(model, test_loader, bits: list[int]) -> dict:
    """Test (loss in bits, accuracy) of ``model`` in fp32 and after quantizing every parameter to
    each bit width: linear (affine) per tensor and per output channel, and k-means per tensor
    (``MODES``)."""
    def measure(m):
        loss, acc = evaluate(m, test_loader)
        return {"test_loss": loss, "test_acc": acc}

    def quantized(mode, b):
        return dequantized_model(model, b, per_channel=mode == "per_channel",
                                 method="kmeans" if mode == "kmeans" else "linear")
    return {"fp32": measure(model),
            **{mode: {str(b): measure(quantized(mode, b)) for b in bits} for mode in MODES}}


def quantization_over_seeds(s: dict, out_dir: Path | None = None, device=None, progress=None):
    """Train the MLP once per seed in ``s["seeds"]`` and sweep each (``quantization_sweep``), seed
    after seed. Returns (models, Histories, sweeps), one of each per seed, and the last seed's test
    loader."""
    def train_and_sweep(ss: dict):
        model, hist, test_loader = train_mlp(ss, out_dir, device, progress,
                                             tag=f"quantization-mlp-seed{ss['seed']}")
        return model, hist, quantization_sweep(model, test_loader, ss["bits"]), test_loader

    models, hists, sweeps, test_loaders = zip(*per_seed(s, train_and_sweep))
    return list(models), list(hists), list(sweeps), test_loaders[-1]


def sweep_spread(sweeps: list[dict], key: str = "test_acc") -> dict:
    """The ``Spread`` over seeds of ``key`` at every entry of a list of ``quantization_sweep``
    results: ``{"fp32": Spread, "per_tensor": {"8": Spread, ...}, "per_channel": {...}}``."""
    return {"fp32": spread(w["fp32"][key] for w in sweeps),
            **{mode: {b: spread(w[mode][b][key] for w in sweeps) for b in sweeps[0][mode]}
               for mode in MODES if mode in sweeps[0]}}


def change_spread(sweeps: list[dict], mode: str, bits: str, key: str = "test_acc") -> Spread:
    """The ``Spread`` over seeds of each seed's change from fp32 after quantizing to ``bits``
    (paired: the same seed's model before and after)."""
    return spread(w[mode][bits][key] - w["fp32"][key] for w in sweeps)


@register("quantization", "Chapter 2.2: an MLP's parameters quantized to 8..2 bits, per tensor and per channel, "
          "over several seeds.",
          quick=MLP_QUICK | dict(bits=[8, 7, 6, 5, 4, 3, 2], seeds=list(SEEDS)),
          full=MLP_FULL | dict(bits=[8, 7, 6, 5, 4, 3, 2], seeds=list(SEEDS)))
def run_quantization(s: dict, out_dir: Path | None, device, progress) -> dict:
    models, hists, sweeps, _ = quantization_over_seeds(s, out_dir, device, progress)
    mean = {"fp32": {"test_acc": spread(w["fp32"]["test_acc"] for w in sweeps).mean},
            **{mode: {b: {"test_acc": sp.mean} for b, sp in sweep_spread(sweeps)[mode].items()}
               for mode in MODES}}
    return {"parameters": count_parameters(models[0]), "histories": hists, "sweeps": sweeps} | mean



def sweep_table(sweeps: list[dict], bits: list[str]) -> str:
    """Markdown table of fp32 and ``bits`` (per tensor) over seeds: test accuracy, its change from
    fp32 (paired by seed) and test loss, each as mean ± standard deviation."""
    acc, loss = sweep_spread(sweeps), sweep_spread(sweeps, "test_loss")
    rows = [["fp32", "32", acc["fp32"].pct(2), "", loss["fp32"].fmt(4)]]
    for b in bits:
        change = change_spread(sweeps, "per_tensor", b)
        rows.append([f"{b}-bit, per tensor", b, acc["per_tensor"][b].pct(2),
                     f"{100 * change.mean:+.2f} ± {100 * change.std:.2f}", loss["per_tensor"][b].fmt(4)])
    return markdown_table(rows, ["model", "bits per parameter", "test accuracy", "change (points)",
                                 "test loss (bits)"])


def bits_table(sweeps: list[dict]) -> str:
    """Markdown table: test accuracy (mean ± std over seeds) at every bit width, for every mode."""
    acc = sweep_spread(sweeps)
    modes = [m for m in MODES if m in acc]
    return markdown_table([[b, *(acc[m][b].pct(2) for m in modes)] for b in acc["per_tensor"]],
                          ["bits", *(MODE_LABELS[m] for m in modes)])


def plot_sweep(sweeps: list[dict], ax=None):
    """Test accuracy against bits per parameter, linear per tensor and per output channel and k-means
    per tensor: the mean over seeds as a line, the lowest..highest seed as a band, fp32's mean as a dashed line."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(6.5, 3.8))[1]
    acc = sweep_spread(sweeps)
    bits = [int(b) for b in acc["per_tensor"]]
    for mode in (m for m in MODES if m in acc):
        sp, label = [acc[mode][str(b)] for b in bits], MODE_LABELS[mode]
        line, = ax.plot(bits, [100 * x.mean for x in sp], marker="o", label=label)
        ax.fill_between(bits, [100 * x.min for x in sp], [100 * x.max for x in sp], color=line.get_color(),
                        alpha=0.2, lw=0)
    ax.axhline(100 * acc["fp32"].mean, color="gray", ls="--", lw=1, label="fp32")
    ax.set(xlabel="bits per parameter", ylabel="test accuracy (%)",
           title=f"accuracy after quantizing every parameter ({len(sweeps)} seeds)")
    ax.invert_xaxis()
    ax.legend()
    return ax


def reference_table(sweeps: list[dict], reference: dict, full: dict | None) -> str:
    """The chapter's results beside the assignment's reference and a full run's result file (or
    "not run yet"): fp32, 8-bit and 4-bit per tensor, with each change from fp32 in points."""
    acc, ref = sweep_spread(sweeps), reference["test_acc"]

    def full_acc(bits):
        if full is None:
            return "not run yet"
        r = full["results"]["fp32"] if bits is None else full["results"]["per_tensor"][bits]
        return f"{100 * r['test_acc']:.2f}%"

    rows = [["fp32", f"{100 * ref['fp32']:.2f}%", acc["fp32"].pct(2), full_acc(None)]]
    for b in ("8", "4"):
        ch = change_spread(sweeps, "per_tensor", b)
        rows.append([f"{b}-bit (change)", f"{100 * ref[f'{b}-bit']:.2f}% ({100 * (ref[f'{b}-bit'] - ref['fp32']):+.2f})",
                     f"{acc['per_tensor'][b].pct(2)} ({100 * ch.mean:+.2f})", full_acc(b)])
    return markdown_table(rows, ["MLP", f"reference ({reference['dataset']}, GPU)",
                                 f"quick (Fashion-MNIST, CPU, {len(sweeps)} seeds)", "full"])


# -- Chapter 2: what the grid looks like, and how much noise it adds ------------------------------

def plot_grid_histogram(weight: torch.Tensor, bits: int, ax=None, channel: int | None = None):
    """Histogram of ``weight``'s values (or of one output ``channel``'s row) with the
    ``bits``-bit quantization levels drawn over it: the per-tensor grid (one scale for the whole
    matrix) as grey lines and, with ``channel``, that row's own per-channel grid as coloured
    lines, zoomed in on the row. Returns the axes."""
    import matplotlib.pyplot as plt

    from ..quantization import dequantize, quantize
    ax = ax or plt.subplots(figsize=(6.5, 3.2))[1]
    w = weight.detach().cpu().float()
    values = w if channel is None else w[channel]
    ax.hist(values.flatten().numpy(), bins=120, color="C0", alpha=0.6)
    grids = [("per-tensor grid", quantize(w, bits), "gray")]
    if channel is not None:
        grids.append((f"row {channel}'s per-channel grid", quantize(w[channel:channel + 1], bits), "C3"))
    for label, q, color in grids:
        codes = torch.arange(2 ** bits, dtype=torch.uint8, device=q.codes.device)
        codes = codes.reshape(-1, *([1] * (q.codes.ndim - 1)))
        levels = dequantize(type(q)(codes, q.scale, q.zero_point, bits)).flatten().unique()
        for i, level in enumerate(levels):
            ax.axvline(float(level), color=color, lw=1, ls="-" if color != "gray" else "--",
                       label=label if i == 0 else None, zorder=3 if color == "gray" else 2)  # dashes on top
    if channel is not None:  # zoom in on the row: the per-tensor levels outside it are off the axes
        lo, hi = float(values.min()), float(values.max())
        ax.set_xlim(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
    ax.set(xlabel="weight value", ylabel="count",
           title=f"{bits}-bit levels over the weights" + ("" if channel is None else f" of row {channel}"))
    ax.legend(fontsize="small")
    return ax


def sqnr_table(tensors: dict, bits: list[int]) -> dict:
    """Measured SQNR (dB) of every tensor in ``tensors`` ({label: float tensor}) quantized per
    tensor (affine) at each bit width: {label: {bits: dB}}."""
    from ..quantization import dequantize, quantize, sqnr_db
    return {label: {b: sqnr_db(x, dequantize(quantize(x, b))) for b in bits} for label, x in tensors.items()}


def plot_sqnr(table: dict, ax=None):
    """SQNR against bits for each row of ``sqnr_table``, beside the 6.02 dB-per-bit rule drawn
    through the first row at 8 bits."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(6.5, 3.6))[1]
    for label, row in table.items():
        ax.plot(list(row), list(row.values()), marker="o", label=label)
    first = next(iter(table.values()))
    bits = sorted(first)
    ax.plot(bits, [first[8] + 6.02 * (b - 8) for b in bits] if 8 in first else [6.02 * b for b in bits],
            color="gray", ls="--", lw=1, label="6.02 dB per bit")
    ax.set(xlabel="bits", ylabel="SQNR (dB)", title="signal-to-quantization-noise ratio")
    ax.legend(fontsize="small")
    return ax
