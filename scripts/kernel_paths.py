"""The whole test suite on other CPU kernel paths and thread counts, and what moved there.

``make test-other-kernels`` runs ``python scripts/kernel_paths.py run PATH`` for every path of
``PATHS``, then ``report``. Each run is ``make test``'s pytest command with the path's
environment, and ``EFFICIENTML_RECORD_DIR`` set so that every chapter's ``record`` and ``claim``
writes what it saw (``efficientml.checks``) under ``_build/kernel-paths/PATH/``. ``report``
compares each recorded value with the book's stored one and prints, per chapter and path, the
largest deviation beside its tolerance, and writes ``results/kernel-paths.json``: for every
recorded value, the value and the deviation measured on every path. ``tests/test_checks.py``
checks every tolerance against that file, so a tolerance cannot shrink below what another
machine produced.

    python scripts/kernel_paths.py run avx2      # one path (returns pytest's exit status)
    python scripts/kernel_paths.py report         # the table and results/kernel-paths.json
    python scripts/kernel_paths.py import avx512 ../other/book --note "..."   # another machine's run

Deviations are taken from the book's stored values as they are when ``report`` runs. A path
run here in whole replaces that path in ``results/kernel-paths.json``, one run in parts (some
chapters) replaces the experiments it measured; what was not run here (in an earlier session, or
on another machine) is kept from the committed file, its deviations recomputed from the values
it holds (kept as they were where it holds none). ``avx512`` is
the native kernels of a CPU that has AVX-512 (what ``make test`` runs there); on a CPU without
it the path is skipped, and a run from one that has it enters by ``import`` or from the file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "_build" / "kernel-paths"
RESULT = ROOT / "results" / "kernel-paths.json"

# Each path: the environment that forces it. The book's stored numbers come from the native
# kernels at the machine's thread count (2 on the project's machines). A path whose kernels
# this CPU does not have (``REQUIRES``) is skipped.
REQUIRES = {"avx512": "AVX512"}
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
SSE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "SSE4_2"}
PATHS = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},  # the native kernels where the CPU has them
    "avx2": AVX2,
    "sse": SSE,
    "threads1": {"EFFICIENTML_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "threads4": {"EFFICIENTML_THREADS": "4", "OMP_NUM_THREADS": "4"},
}
PYTEST = ["-m", "pytest", "--durations=40", "--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", "-p", "no:cacheprovider"]


def status(parts: list[dict]) -> int:
    """A path's exit status from its parts: 0 if every part passed, or failed only in tests that a
    later part ran again and passed (``passed_later``: e.g. a test fixed after the run); a part
    with no exit status, or whose failures are not known test by test, counts as failed."""
    def cleared(p: dict) -> bool:
        return (p.get("exit_status", 1) == 0 or bool(p.get("failed_tests")) and not p.get("failed_checks")
                and set(p["failed_tests"]) <= set(p.get("passed_later", [])))
    return int(not all(map(cleared, parts)))


def pytest_runtest_logreport(report) -> None:
    """pytest hook (``run`` loads this module with ``-p kernel_paths``): each test's outcome,
    appended to ``$KERNEL_PATHS_OUTCOMES`` as ``{"name": node id, "outcome": "passed" | "failed"}``."""
    if report.failed or (report.when == "call" and report.passed):
        with open(os.environ["KERNEL_PATHS_OUTCOMES"], "a") as f:
            f.write(json.dumps({"name": report.nodeid, "outcome": "failed" if report.failed else "passed"}) + "\n")


def run(path: str, extra: list[str]) -> int:
    """Run the suite on ``path``; its records and claims go to ``_build/kernel-paths/PATH/``."""
    env = os.environ | PATHS[path]
    kernels = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             env=env, capture_output=True, text=True).stdout.strip()
    if path in REQUIRES and kernels != REQUIRES[path]:
        print(f"{path}: skipped, this CPU runs {kernels or 'unknown'} kernels, not {REQUIRES[path]}")
        return 0
    folder = OUT / path
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.jsonl"):
        if not extra:  # a whole run starts afresh; a part of one adds to (and overrides) what is there
            f.unlink()
    # EFFICIENTML_CHECK=off: a record or claim that fails is reported, not raised, so that every
    # record and every claim of a chapter is measured; the path fails if any did (below)
    env = env | {"EFFICIENTML_RECORD_DIR": str(folder), "EFFICIENTML_CHECK": "off"}
    # Inductor (torch.compile, Chapter 7) caches compiled kernels under a key that does not
    # include ATEN_CPU_CAPABILITY: a cache shared between paths loaded AVX-512 kernels into an
    # AVX2 run (NaN outputs) and AVX2 kernels into a native one (heap corruption). One cache each.
    env = env | {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor-cache")}
    start = {kind: _lines(folder, kind) for kind in ("records", "claims")}  # a part's own entries follow
    outcomes = folder / "outcomes.jsonl"  # this part's test outcomes (pytest_runtest_logreport)
    outcomes.unlink(missing_ok=True)
    env = env | {"KERNEL_PATHS_OUTCOMES": str(outcomes),
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"), env.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, *PYTEST, "-p", "kernel_paths", *(extra or ["tests", "book"])],
                         cwd=ROOT, env=env)
    failed = [f"record {r['name']}: {p}" for r in _read(folder, "records", start["records"]) for p in r["problems"]]
    failed += [f"claim: {c['name']}" for c in _read(folder, "claims", start["claims"]) if not c["holds"]]
    for line in failed:
        print("FAILED", line)
    rc = rc or int(bool(failed))
    tests = {t["name"]: t["outcome"] for t in _read(folder, "outcomes")}  # a test's last report
    part = {"pytest_args": extra or ["tests", "book"], "exit_status": rc, "wall_time_s": round(time.perf_counter() - t0),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": _cpu_name(), "kernels": kernels,
            "failed_tests": sorted(t for t, outcome in tests.items() if outcome == "failed"),
            "failed_checks": failed}
    before = json.loads((folder / "run.json").read_text()) if extra and (folder / "run.json").exists() else {}
    for earlier in before.get("parts", []):  # an earlier part's failed tests that passed here
        again = sorted(t for t in earlier.get("failed_tests", []) if tests.get(t) == "passed")
        if again:
            earlier["passed_later"] = sorted(set(earlier.get("passed_later", [])) | set(again))
    parts = before.get("parts", []) + [part]
    (folder / "run.json").write_text(json.dumps({
        "path": path, "environment": PATHS[path], "exit_status": status(parts), "parts": parts}, indent=1))
    print(f"{path}: exit status {rc} in {time.perf_counter() - t0:.0f} s")
    return rc


def _cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _printed_claims(notebook: Path) -> dict[str, bool]:
    """``{statement: holds}`` of every claim an executed notebook's outputs print."""
    out = {}
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        for o in cell.get("outputs", []):
            for line in "".join(o.get("text", "")).splitlines():
                if line.startswith("holds: "):
                    out[line[len("holds: "):]] = True
                elif line.startswith("DOES NOT HOLD"):
                    out[line.split(": ", 1)[1]] = False
    return out


def import_executed(name: str, book: Path, note: str) -> int:
    """Add the chapters as executed elsewhere (a copy of another machine's ``book/``, e.g. one
    with AVX-512 kernels, which this machine cannot force) as path ``name``: their stored
    records, and their claims as their outputs printed them."""
    sys.path.insert(0, str(ROOT))
    from efficientml import checks
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    records, claims = [], []
    for nb in sorted(book.glob("*.ipynb")):
        for exp, rec in checks.read_records(nb).items():
            records.append({"name": exp, "values": rec["values"], "tolerance": rec["tolerance"], "problems": []})
        claims += [{"name": c, "holds": holds} for c, holds in _printed_claims(nb).items()]
    for kind, entries in (("records", records), ("claims", claims)):
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    (folder / "run.json").write_text(json.dumps({"path": name, "environment": {}, "imported_from": str(book),
                                                 "note": note, "exit_status": 0}, indent=1))
    print(f"{name}: {len(records)} records and {len(claims)} claims imported from {book}")
    return 0


def _local_run(path: str) -> dict:
    """``_build/kernel-paths/PATH/run.json``: the runs of ``path`` made here."""
    return json.loads((OUT / path / "run.json").read_text())


def _read(folder: Path, kind: str, start: int = 0) -> list[dict]:
    """What the records (or claims) of a path wrote (from line ``start`` on), the latest entry
    of each name only."""
    f = folder / f"{kind}.jsonl"
    entries = [json.loads(line) for line in f.read_text().splitlines()[start:]] if f.exists() else []
    return list({e["name"]: e for e in entries}.values())


def _lines(folder: Path, kind: str) -> int:
    f = folder / f"{kind}.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _deviation(a, b) -> float | None:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if not numbers:
        return None if a == b else math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def chapter_of(experiment: str) -> str:
    """The notebook that records ``experiment``."""
    sys.path.insert(0, str(ROOT))
    from efficientml import checks
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        if experiment in checks.read_records(nb):
            return nb.stem
    return "?"


def report() -> int:
    """Print the largest deviation per chapter and path beside its tolerance; write RESULT.

    A path run here in whole (``tests`` and ``book``) replaces what the committed RESULT holds for
    it; a path run here in parts (some chapters) adds to it: its parts follow the committed ones,
    and the experiments and claims it measured replace theirs. The committed file's other paths
    and experiments are kept, their deviations recomputed from the values the file holds against
    the book as it is now (kept as they were where it holds none)."""
    local = sorted(p.name for p in OUT.glob("*") if (p / "run.json").exists())
    earlier = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    kept = sorted(p for p in earlier.get("runs", {}) if p not in local)
    partial = sorted(p for p in local if p in earlier.get("runs", {}) and not any(
        part.get("pytest_args") == ["tests", "book"] for part in _local_run(p).get("parts", [])))
    if not local and not kept:
        print("no runs under _build/kernel-paths: run `make test-other-kernels` first")
        return 1
    deviations: dict[str, dict[str, dict[str, float]]] = {}   # experiment -> key -> path -> deviation
    values: dict[str, dict[str, dict]] = {}                    # path -> experiment -> key -> value
    failed_claims, runs = [], {}
    sys.path.insert(0, str(ROOT))
    from efficientml import checks
    # deviations from the book's stored values as they are now (a path run before the chapters
    # were re-executed is compared with their new outputs)
    book = {exp: rec for nb in sorted((ROOT / "book").glob("*.ipynb")) for exp, rec in checks.read_records(nb).items()}
    stored = {exp: rec["values"] for exp, rec in book.items()}
    tolerance = {exp: rec["tolerance"] for exp, rec in book.items()}
    book_claims = {c for nb in sorted((ROOT / "book").glob("*.ipynb")) for c in _printed_claims(nb)}

    def measured(path: str, exp: str, key: str, value, reference) -> None:
        values.setdefault(path, {}).setdefault(exp, {})[key] = value
        d = _deviation(value, reference)
        if d is not None:
            deviations.setdefault(exp, {}).setdefault(key, {})[path] = d

    measured_here: dict[str, set] = {}  # path -> the experiments and claims its local runs measured
    for path in local:
        folder = OUT / path
        runs[path] = _local_run(path)
        measured_here[path] = {r["name"] for r in _read(folder, "records")} | {c["name"] for c in _read(folder, "claims")}
        for rec in _read(folder, "records"):
            reference = stored.get(rec["name"], rec.get("stored", {}))
            for key, value in rec["values"].items():
                if key in reference:  # else a value the book no longer records
                    measured(path, rec["name"], key, value, reference[key])
        # a claim the book no longer makes (its statement printed by no stored chapter) is left out
        failed_claims += [f"{path}: {c['name']}" for c in _read(folder, "claims")
                          if not c["holds"] and c["name"] in book_claims]
    for path in kept + partial:  # from the committed file: recomputed from its values, else as it was
        here = measured_here.get(path, set())
        if path in partial:
            before = earlier["runs"][path]
            # a part already in the committed file (``report`` run twice) is not added again; the
            # local copy wins (a later part here may have marked its failed tests passed_later)
            parts = list({(str(p.get("pytest_args")), p.get("date")): p
                          for p in before.get("parts", []) + runs[path].get("parts", [])}.values())
            runs[path] = before | runs[path] | {"parts": parts, "exit_status": status(parts) if parts
                                                else before.get("exit_status", 1)}
        else:
            runs[path] = earlier["runs"][path]
        held = earlier.get("values", {}).get(path, {})
        for exp, keys in earlier.get("deviations", {}).items():
            for key, by_path in keys.items():
                if path not in by_path or key not in stored.get(exp, {}) or exp in here:
                    continue
                if key in held.get(exp, {}):
                    measured(path, exp, key, held[exp][key], stored[exp][key])
                else:
                    deviations.setdefault(exp, {}).setdefault(key, {})[path] = by_path[path]
        failed_claims += [c for c in earlier.get("failed_claims", []) if c.startswith(f"{path}: ")
                          and c.split(": ", 1)[1] in book_claims and c.split(": ", 1)[1] not in here]
    paths = sorted(runs)
    print(f"{'chapter / experiment':40s} " + " ".join(f"{p:>22s}" for p in paths))
    for exp in sorted(deviations, key=chapter_of):
        cells = []
        for path in paths:
            if not any(path in d for d in deviations[exp].values()):
                cells.append("not run")
                continue
            worst = max(((d.get(path, 0.0), k) for k, d in deviations[exp].items()), default=(0.0, ""))
            tol = tolerance.get(exp, {})
            ratio = max((d.get(path, 0.0) / tol[k] for k, d in deviations[exp].items() if tol.get(k)),
                        default=0.0)
            cells.append(f"{worst[0]:.3f} ({ratio:.0%} of tol)")
        print(f"{chapter_of(exp) + ' / ' + exp:40s} " + " ".join(f"{c:>22s}" for c in cells))
    for line in failed_claims:
        print("claim failed:", line)
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps({
        "about": "Deviation of every recorded value from the book's stored one on other CPU kernel paths and "
                 "thread counts, and the values measured there (scripts/kernel_paths.py); tests/test_checks.py "
                 "checks tolerances against it.",
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "runs": runs, "failed_claims": failed_claims, "deviations": deviations, "values": values},
        indent=1, sort_keys=True) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT) if RESULT.is_relative_to(ROOT) else RESULT}")
    return 0


def suggest(margin: float = 1.5) -> int:
    """Every recorded value whose tolerance is narrower than ``margin`` times the largest
    deviation measured on the other paths (from RESULT), with that deviation: what to widen."""
    measured = json.loads(RESULT.read_text())["deviations"]
    sys.path.insert(0, str(ROOT))
    from efficientml import checks
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        for exp, rec in checks.read_records(nb).items():
            for key, dev in sorted(measured.get(exp, {}).items()):
                worst = max(dev.values())
                tol = rec["tolerance"].get(key, 0.0)
                if worst > 0 and tol < margin * worst:
                    path = max(dev, key=dev.get)
                    print(f"{nb.stem} {exp} {key}: tolerance {tol:g}, moved {worst:.4g} on {path} "
                          f"(stored {rec['values'][key]!r})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the suite on one path")
    r.add_argument("path", choices=sorted(PATHS))
    r.add_argument("pytest_args", nargs="*", help="what to test instead of tests/ and book/ (pytest arguments), "
                   "e.g. book/03_pruning.ipynb")
    sub.add_parser("report", help="deviations per chapter and path; writes results/kernel-paths.json")
    sub.add_parser("suggest", help="the tolerances narrower than 1.5 times what moved on another path")
    i = sub.add_parser("import", help="the chapters as executed on another machine, as one more path")
    i.add_argument("path", help="a name for it, e.g. avx512")
    i.add_argument("book", type=Path, help="a folder of that machine's executed chapters (its book/)")
    i.add_argument("--note", default="", help="where and how they were executed")
    a = p.parse_args(argv)
    if a.command == "run":
        return run(a.path, a.pytest_args)
    if a.command == "import":
        return import_executed(a.path, a.book, a.note)
    return report() if a.command == "report" else suggest()


if __name__ == "__main__":
    sys.exit(main())
