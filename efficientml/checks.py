"""Numbers a reader can trust: how every chapter records, checks and claims its results.

The book's reproducibility design has three rules (the introduction explains them to readers):

1. **Deterministic outputs are compared exactly.** Counts, shapes, parameter and MAC numbers,
   exact arithmetic and whatever is computed without training come out the same on every
   x86-64 machine; ``make test`` (nbval) compares those cells' printed outputs character for
   character with the outputs stored in the notebook.
2. **Trained results are compared within stated tolerances.** Training sums floats in orders
   that depend on the CPU's vector kernels (AVX-512, AVX2, SSE, oneDNN, MKL), and a small run
   amplifies last-bit differences into points of accuracy. Cells that print trained numbers are
   tagged ``nbval-ignore-output``; every number they show goes instead into ``record``, in the
   chapter's last (hidden) cell, with a tolerance in the number's own unit. ``record`` compares
   each fresh value with the value stored in the book's copy of the notebook and raises
   ``ResultMismatch`` if any is further away than its tolerance. A tolerance is chosen wider than
   the machine-to-machine and seed-to-seed spread of that number and narrower than the effects
   the text claims; the chapter's code states it.
3. **Claims are assertions.** Every statement the prose makes about a result is a ``claim`` in a
   hidden cell, evaluated on every run, so a change that breaks a claim fails the tests. Results
   whose seed-to-seed spread is comparable to an effect are means over several seeds
   (``efficientml.seeds``), and the claims compare effects with that spread.

``record`` reports differences instead of raising in three cases, and says which: the values
were made with other settings than the book's (a reader who changed a chapter's settings);
they were computed on a device whose kernels no tolerance was measured on (a GPU: the
tolerances were measured on CPU kernels, ``MEASURED_DEVICES``); or ``EFFICIENTML_CHECK=off``
(set by ``make execute``, which refreshes the stored outputs on purpose). ``EFFICIENTML_BOOK``
names the folder of the stored notebooks (default: the repository's ``book/``);
``EFFICIENTML_RECORD_DIR``, if set, is a folder where every ``record`` and ``claim`` also writes
what it saw (how ``make test-other-kernels`` collects the deviations of other kernel paths).
"""
from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORD_PREFIX = "glance:"
MEASURED_PREFIX = "measured:"   # figures of the machine that executed a chapter: never compared
MEASURED_DEVICES = ("cpu",)  # where the chapters' tolerances were measured

Scalar = bool | int | float | str | None


class ResultMismatch(AssertionError):
    """A fresh result differs from the book's stored result by more than its tolerance."""


class ClaimFailed(AssertionError):
    """A statement the chapter's text makes about its results does not hold for this run."""


def flatten(values: Mapping, prefix: str = "") -> dict[str, Scalar]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``: nested results as one flat dict of scalars."""
    out: dict[str, Scalar] = {}
    for key, v in values.items():
        name = f"{prefix}{key}"
        if isinstance(v, Mapping):
            out |= flatten(v, name + "/")
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[name] = v
        elif hasattr(v, "item") and getattr(v, "ndim", None) == 0:   # NumPy or torch scalar
            out[name] = v.item()
        else:
            raise TypeError(f"record value {name!r} must be a number, bool, str or None, "
                            f"got {type(v).__name__}")
    return out


def tolerances(values: Mapping[str, Scalar], tolerance: float | Mapping[str, float] = 0.0) -> dict[str, float]:
    """One absolute tolerance per key of ``values``: ``tolerance`` itself if it is a number; if a
    mapping, the value of the longest key that is the value's key or a ``/``-prefix of it
    (so ``{"runs": 0.05}`` covers ``runs/pt_net``), and 0 (exact) for the rest."""
    if isinstance(tolerance, Mapping):
        for k in tolerance:
            if not any(v == k or v.startswith(k + "/") for v in values):
                raise KeyError(f"tolerance given for {k!r}, which is no recorded value")
    out = {}
    for key in values:
        if isinstance(tolerance, Mapping):
            match = [k for k in tolerance if key == k or key.startswith(k + "/")]
            tol = tolerance[max(match, key=len)] if match else 0.0
        else:
            tol = tolerance
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
            raise ValueError(f"tolerance of {key!r} must be a number >= 0, got {tol!r}")
        out[key] = float(tol)
    return out


def compare(fresh: Mapping[str, Scalar], stored: Mapping[str, Scalar],
            tolerance: Mapping[str, float]) -> list[str]:
    """The differences between ``fresh`` and ``stored`` values that break the rules, one line each
    (empty: they agree). Numbers agree within their tolerance (NaN only with NaN); everything else,
    and every number with tolerance 0, must be equal; both must hold the same keys."""
    problems = [f"{k}: new value {fresh[k]!r}, not in the stored results" for k in fresh if k not in stored]
    problems += [f"{k}: stored value {stored[k]!r} is no longer recorded" for k in stored if k not in fresh]
    for k in fresh:
        if k not in stored:
            continue
        a, b, tol = fresh[k], stored[k], tolerance.get(k, 0.0)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        if numbers and tol > 0:
            if math.isnan(a) or math.isnan(b):
                ok = math.isnan(a) and math.isnan(b)
            else:
                ok = abs(a - b) <= tol
            if not ok:
                problems.append(f"{k}: {a!r} here, {b!r} stored: differs by {abs(a - b):.4g}, "
                                f"more than its tolerance {tol:g}")
        elif a != b and not (numbers and math.isnan(a) and math.isnan(b)):
            problems.append(f"{k}: {a!r} here, {b!r} stored (compared exactly)")
    return problems


def book_dir() -> Path:
    """Where the stored notebooks are: ``$EFFICIENTML_BOOK``, else the repository's ``book/``."""
    return Path(os.environ.get("EFFICIENTML_BOOK") or REPO_ROOT / "book")


def read_records(notebook: str | os.PathLike, prefix: str = RECORD_PREFIX) -> dict[str, dict]:
    """``{experiment: {"values": {...}, "tolerance": {...}}}`` of every ``record`` stored in an
    executed notebook's outputs (with ``prefix=MEASURED_PREFIX``: every ``measured``, whose
    payload holds ``values`` and ``machine``)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    out = {}
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name", "")
            text = o.get("data", {}).get("application/papermill.record/text/plain")
            if name.startswith(prefix) and text is not None:
                text = "".join(text) if isinstance(text, list) else text
                payload = json.loads(ast.literal_eval(text))  # glue stores repr(str)
                if "values" not in payload:  # a record stored before tolerances existed
                    payload = {"values": payload, "tolerance": {}}
                out[name[len(prefix):]] = payload
    return out


def stored_record(experiment: str, folder: str | os.PathLike | None = None) -> dict | None:
    """The record of ``experiment`` stored in one of the notebooks in ``folder`` (default
    ``book_dir()``), or None if no notebook holds one."""
    found = [(nb.name, rec[experiment]) for nb in sorted(Path(folder or book_dir()).glob("*.ipynb"))
             for rec in [read_records(nb)] if experiment in rec]
    if len(found) > 1:
        raise ValueError(f"{experiment!r} is recorded in several notebooks: {[n for n, _ in found]}")
    return found[0][1] if found else None


def settings_differences(fresh: Mapping | None, stored: Mapping | None) -> list[str]:
    """The settings that differ between a fresh run and the book's stored one, one line each
    (empty when either is unknown: nothing to compare)."""
    if fresh is None or stored is None:
        return []
    a, b = _plain(fresh), _plain(stored)
    return [f"{k}: {a.get(k, '(absent)')!r} here, {b.get(k, '(absent)')!r} in the book"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _plain(settings: Mapping) -> dict:
    """Settings as JSON would give them back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=repr))


def _device_type(device) -> str:
    if device is None:
        from .train import select_device
        device = select_device()
    return getattr(device, "type", str(device).split(":")[0])


def _dump(kind: str, name: str, payload: dict) -> None:
    """Append what a record or claim saw to ``$EFFICIENTML_RECORD_DIR/{kind}.jsonl``, if set."""
    folder = os.environ.get("EFFICIENTML_RECORD_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"{kind}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name} | payload, sort_keys=True, default=repr) + "\n")


def record(experiment: str, values: Mapping, tolerance: float | Mapping[str, float] = 0.0,
           settings: Mapping | None = None, device=None) -> list[str]:
    """Record a chapter's results and check them against the book's stored ones.

    experiment: a name unique in the book (the results page looks it up).
    values: the numbers the chapter shows, nested dicts allowed (flattened to ``a/b`` keys).
    tolerance: absolute, in each value's unit (a fraction for accuracies, bits or nats for
        losses): one number for all values, or ``{key or key prefix: tolerance}``; 0 is exact.
    settings: the settings that made the values (e.g. an experiment's settings dict), stored
        with them: a run with other settings than the book's is told so, not failed.
    device: where the values were computed (default: ``train.select_device()``); on a device
        not in ``MEASURED_DEVICES`` the differences are reported, not raised.

    Stores ``values``, their tolerances and ``settings`` invisibly in the notebook's outputs (a
    MyST-NB glue record), then compares the values with the record stored in the book: raises
    ``ResultMismatch`` naming every value outside its tolerance, except in the cases the
    module's docstring lists, where it prints them. Returns the differences found.
    """
    flat = flatten(values)
    tols = tolerances(flat, tolerance)
    plain_settings = _plain(settings) if settings is not None else None
    stored = stored_record(experiment)
    payload = {"values": flat, "tolerance": tols} | ({"settings": plain_settings} if settings is not None else {})
    try:
        from myst_nb import glue
        glue(RECORD_PREFIX + experiment, json.dumps(payload, sort_keys=True), display=False)
    except ImportError:  # outside the book's environment the check below still runs
        pass
    if stored is None:
        print(f"{experiment}: {len(flat)} values recorded; the book stores none to compare with")
        return []
    problems = compare(flat, stored["values"], tols)
    device_type = _device_type(device)
    _dump("records", experiment, payload | {"stored": stored["values"], "problems": problems})
    other_settings = settings_differences(settings, stored.get("settings"))
    if not problems:
        print(f"{experiment}: all {len(flat)} values agree with the book's within their tolerances")
    elif other_settings:
        print(f"{experiment}: the book's numbers were made with other settings than this run's, so "
              f"{len(problems)} values differ from them, as expected; not checked.\n  Settings: "
              + "\n  ".join(other_settings) + "\n  Values:\n  " + "\n  ".join(problems))
    elif device_type not in MEASURED_DEVICES:
        print(f"{experiment}: {len(problems)} of {len(flat)} values differ from the book's. Reported, not "
              f"checked: the tolerances were measured on CPU kernels, and this run computed on "
              f"{device_type}, whose kernels sum in other orders:\n  " + "\n  ".join(problems))
    elif os.environ.get("EFFICIENTML_CHECK", "").lower() == "off":
        print(f"{experiment}: {len(problems)} values differ from the stored ones (EFFICIENTML_CHECK=off):\n  "
              + "\n  ".join(problems))
    else:
        raise ResultMismatch(f"{experiment}: {len(problems)} of {len(flat)} values differ from the book's:\n  "
                             + "\n  ".join(problems))
    return problems


def measured(experiment: str, values: Mapping, device=None) -> None:
    """Store figures that describe the machine rather than the code (its peak FLOP/s, a step's
    speed) with the chapter, for the results page, with a line naming the machine. They are
    never compared with the book's: another machine, or the same one under another load, gives
    other figures, and a test of them could fail without anything being wrong."""
    from .reproducibility import cpu_model, machine
    where = machine(device)
    payload = {"values": flatten(values), "machine": where + (f" ({cpu_model()})" if where.startswith("cpu") else "")}
    try:
        from myst_nb import glue
        glue(MEASURED_PREFIX + experiment, json.dumps(payload, sort_keys=True), display=False)
    except ImportError:
        pass


def claim(holds: bool, statement: str, device=None) -> None:
    """Assert a statement the chapter's text makes about its results; raise ``ClaimFailed`` with
    the statement if it does not hold on this run. On a device whose kernels the book's claims
    were not checked on (not in ``MEASURED_DEVICES``; default device: ``train.select_device()``),
    or with ``EFFICIENTML_CHECK=off`` (``make execute``), a claim that does not hold is reported
    instead, so that the chapter runs on."""
    _dump("claims", statement, {"holds": bool(holds)})
    if bool(holds):
        print(f"holds: {statement}")
        return
    device_type = _device_type(device)
    if os.environ.get("EFFICIENTML_CHECK", "").lower() == "off":
        print(f"DOES NOT HOLD (EFFICIENTML_CHECK=off): {statement}")
    elif device_type in MEASURED_DEVICES:
        raise ClaimFailed(f"the text claims: {statement}; this run does not bear it out")
    else:
        print(f"does not hold on this run ({device_type}; the claims were checked on CPU kernels): {statement}")
