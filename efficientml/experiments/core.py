"""Experiments the CLI can run without a notebook: ``python -m efficientml run NAME``.

Each experiment has settings for the ``quick`` and ``full`` profiles and a function that runs
it and returns its results; ``run_experiment`` adds provenance and writes the JSON result.
This module holds the registry and what every chapter shares (seeding, loaders, ``run``);
each chapter's experiments live in their own module beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from ..data import TensorLoader, load_dataset
from ..profiles import get_profile
from ..reproducibility import seed_everything
from ..results import provenance, result_path, write_json
from ..train import select_device

T = TypeVar("T")


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


def seed_for(seed: int, device) -> None:
    """Seed a run: with deterministic kernels on the CPU and on Apple's MPS (repeatable, as CI
    checks); with cuDNN's fastest kernels on CUDA (full-profile runs, where speed matters more).
    The thread count is the reader's (``$EFFICIENTML_THREADS`` if set): see ``reproducibility``."""
    seed_everything(seed, deterministic=select_device(device).type != "cuda")


def per_seed(s: dict, run: Callable[[dict], T]) -> list[T]:
    """``[run(s | {"seed": seed}) for seed in s["seeds"]]``: one experiment, once per seed (each
    run's settings carry its own ``seed``, which picks its data subset, weights and batches)."""
    seeds = s.get("seeds")
    if not seeds:
        raise ValueError("settings have no seeds: per_seed needs a non-empty s['seeds']")
    return [run(s | {"seed": seed}) for seed in seeds]


def train_loaders(s: dict, device, classes: list[int] | None = None, n_per_class: int | None = None):
    """Train/test loaders for settings with ``dataset``, ``n_per_class`` (None: all),
    ``test_per_class``, ``batch_size``, ``augment`` and ``seed``; returns (train loader, test
    loader, training ImageDataset). ``classes``: only those classes, relabelled 0..k-1 (see
    ``class_split``); ``n_per_class`` overrides ``s["n_per_class"]``. ``device`` None means the
    best available. Where ``s`` has ``val_per_class``, the training set never holds an example
    of ``validation_split(s)``."""
    device = select_device(device)
    n_per_class = n_per_class or s.get("n_per_class")
    train = class_split(s, classes, True, n_per_class)
    if s.get("val_per_class"):
        if not n_per_class:
            train = train.without(validation_split(s, classes))
        elif n_per_class > (s.get("n_per_class") or 0):  # a smaller subset is a prefix: disjoint
            raise ValueError(f"{n_per_class} training examples per class would overlap the validation "
                             f"split drawn after the first {s.get('n_per_class')}")
    test = class_split(s, classes, False, s.get("test_per_class"))
    return (TensorLoader(train, s["batch_size"], shuffle=True, augment=s.get("augment", False),
                         device=device, seed=s["seed"]),
            TensorLoader(test, 1000, device=device), train)


def validation_split(s: dict, classes: list[int] | None = None):
    """``s["val_per_class"]`` examples of every class of the training split, none of which
    ``train_loaders(s)`` trains on: for choices (a sparsity, a learning rate) that must not look
    at the test set. With a training subset (``s["n_per_class"]``) they are the examples drawn
    right after it (``ImageDataset.subset``'s ``skip``); with the whole split, ``train_loaders``
    leaves them out of training."""
    if not s.get("val_per_class"):
        raise ValueError("settings have no val_per_class: no validation split is held out")
    ds = load_dataset(s["dataset"], train=True)
    if classes is not None:
        ds = ds.select_classes(classes)
    return ds.subset(s["val_per_class"], seed=s["seed"], skip=s.get("n_per_class") or 0)


def class_split(s: dict, classes: list[int] | None, train: bool, n_per_class: int | None):
    """One split of ``s["dataset"]`` restricted to ``classes`` (None: all), relabelled 0..k-1,
    then a class-balanced subset of ``n_per_class`` (None: all of it)."""
    ds = load_dataset(s["dataset"], train=train)
    if classes is not None:
        ds = ds.select_classes(classes)
    return ds.subset(n_per_class, seed=s["seed"]) if n_per_class else ds


def _checkpoint(out_dir: Path | None, stem: str, s: dict) -> Path | None:
    return None if out_dir is None else out_dir / f"{stem}-{s['profile']}.ckpt.pt"


def settings(name: str, profile: str | None = None) -> dict:
    """A copy of experiment ``name``'s settings under ``profile`` (default: ``get_profile()``)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(sorted(EXPERIMENTS))}")
    profile = get_profile(profile)
    return dict(EXPERIMENTS[name].settings[profile]) | {"profile": profile}


def run(name: str, profile: str | None = None, overrides: dict | None = None, out_dir: str | Path | None = None,
        device=None, progress: bool | None = None) -> dict:
    """Run experiment ``name`` under ``profile`` (default ``$EFFICIENTML_PROFILE`` or quick).

    Returns ``{"experiment", "profile", "settings", "results", "wall_time_s", "provenance"}``;
    results hold ``History`` objects where the experiment trained something.
    overrides: settings to change (keys must exist). out_dir: where per-epoch checkpoints go
    (None: no checkpoints); an interrupted run resumes from them when started again.
    """
    s = settings(name, profile)  # each experiment's training helpers seed before building a model
    profile = s.pop("profile")
    for k, v in (overrides or {}).items():
        if k not in s:
            raise ValueError(f"{name} has no setting {k!r}; its settings are {', '.join(s)}")
        s[k] = v
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(device)
    t0 = time.perf_counter()
    results = EXPERIMENTS[name].run(s | {"profile": profile}, out_dir, device, progress)
    return {"experiment": name, "profile": profile, "settings": s, "results": results,
            "wall_time_s": time.perf_counter() - t0, "provenance": provenance(device)}


def run_experiment(name: str, profile: str | None = None, out_dir: str | Path = "results",
                   overrides: dict | None = None, device=None, progress: bool | None = None) -> Path:
    """``run`` the experiment with checkpoints in ``out_dir`` and write ``OUT_DIR/NAME-PROFILE.json``."""
    payload = run(name, profile, overrides, out_dir, device, progress)
    return write_json(result_path(out_dir, name, payload["profile"]), payload)

