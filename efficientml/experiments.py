"""Experiments the CLI can run without a notebook: ``python -m efficientml run NAME``.

Each experiment has settings for the ``quick`` and ``full`` profiles and a function that runs
it and returns its results; ``run_experiment`` adds provenance and writes the JSON result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data import TensorLoader, load_dataset
from .models import MLP, count_parameters
from .profiles import get_profile
from .reproducibility import seed_everything
from .results import provenance, result_path, write_json
from .train import fit, select_device


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    settings: dict[str, dict]          # profile -> settings
    run: Callable[..., dict]           # run(settings, out_dir, device, progress) -> results


EXPERIMENTS: dict[str, Experiment] = {}


def register(name: str, description: str, quick: dict, full: dict):
    def wrap(fn):
        EXPERIMENTS[name] = Experiment(name, description, {"quick": quick, "full": full}, fn)
        return fn
    return wrap


def train_loaders(s: dict, device) -> tuple[TensorLoader, TensorLoader, object]:
    """Train/test loaders for settings with ``dataset``, ``n_per_class`` (None: all), ``batch_size``,
    ``augment`` and ``seed``."""
    train = load_dataset(s["dataset"], train=True)
    if s.get("n_per_class"):
        train = train.subset(s["n_per_class"], seed=s["seed"])
    test = load_dataset(s["dataset"], train=False)
    if s.get("test_per_class"):
        test = test.subset(s["test_per_class"], seed=s["seed"])
    return (TensorLoader(train, s["batch_size"], shuffle=True, augment=s.get("augment", False),
                         device=device, seed=s["seed"]),
            TensorLoader(test, 1000, device=device), train)


@register("mlp", "An MLP classifier on Fashion-MNIST (MNIST where available); Chapter 2 quantizes it.",
          quick=dict(dataset="fashion-mnist", n_per_class=1000, test_per_class=None, hidden=[256, 128],
                     epochs=3, batch_size=128, lr=0.05, seed=0),
          full=dict(dataset="fashion-mnist", n_per_class=None, test_per_class=None, hidden=[256, 128],
                    epochs=20, batch_size=128, lr=0.05, seed=0))
def run_mlp(s: dict, out_dir: Path, device, progress) -> dict:
    train_loader, test_loader, train = train_loaders(s, device)
    c, h, w = train.shape
    model = MLP(c * h * w, tuple(s["hidden"]), train.num_classes)
    stem = out_dir / f"mlp-{s['profile']}"
    hist = fit(model, train_loader, test_loader, epochs=s["epochs"], lr=s["lr"], device=device,
               checkpoint=stem.with_suffix(".ckpt.pt"), progress=progress, desc="mlp")
    torch.save(model.state_dict(), stem.with_suffix(".weights.pt"))
    return {"parameters": count_parameters(model), "final_test_acc": hist.test_acc[-1] if hist.epochs else None,
            "history": hist.to_dict()}


def run_experiment(name: str, profile: str | None = None, out_dir: str | Path = "results",
                   overrides: dict | None = None, device=None, progress: bool | None = None) -> Path:
    """Run experiment ``name`` under ``profile`` and write ``OUT_DIR/NAME-PROFILE.json``.

    overrides: settings to change (keys must exist). An interrupted run resumes from its per-epoch
    checkpoint in ``out_dir`` when started again with the same arguments.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(sorted(EXPERIMENTS))}")
    exp, profile = EXPERIMENTS[name], get_profile(profile)
    settings = dict(exp.settings[profile])
    for k, v in (overrides or {}).items():
        if k not in settings:
            raise ValueError(f"{name} has no setting {k!r}; its settings are {', '.join(settings)}")
        settings[k] = v
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(device)
    seed_everything(settings["seed"], threads=None if device.type == "cuda" else 2,
                    deterministic=device.type != "cuda")
    t0 = time.perf_counter()
    results = exp.run(settings | {"profile": profile}, out_dir, device, progress)
    payload = {"experiment": name, "profile": profile, "settings": settings, "results": results,
               "wall_time_s": time.perf_counter() - t0, "provenance": provenance(device)}
    return write_json(result_path(out_dir, name, profile), payload)
