"""The reproducibility design (efficientml.checks): stored results are compared within their
tolerances, a result moved beyond its tolerance fails, and claims are assertions."""
import json
import math
import shutil
from pathlib import Path

import nbformat
import pytest

from efficientml import checks
from efficientml.checks import ClaimFailed, ResultMismatch, claim, compare, flatten, record, tolerances
from efficientml.experiments import per_seed
from efficientml.seeds import Spread, final, spread
from efficientml.train import History

BOOK = Path(__file__).resolve().parent.parent / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def test_flatten_and_tolerances_by_prefix():
    flat = flatten({"runs": {"a": 0.5, "b": 0.25}, "params": 7, "ok": True})
    assert flat == {"runs/a": 0.5, "runs/b": 0.25, "params": 7, "ok": True}
    tol = tolerances(flat, {"runs": 0.05, "runs/b": 0.1})
    assert tol == {"runs/a": 0.05, "runs/b": 0.1, "params": 0.0, "ok": 0.0}
    assert tolerances(flat, 0.02) == dict.fromkeys(flat, 0.02)
    with pytest.raises(KeyError):
        tolerances(flat, {"nope": 0.1})
    with pytest.raises(ValueError):
        tolerances(flat, -1.0)
    with pytest.raises(TypeError):
        flatten({"h": [1, 2]})


def test_compare_within_and_beyond_tolerance():
    tol = {"acc": 0.05, "params": 0.0, "ok": 0.0}
    stored = {"acc": 0.70, "params": 1000, "ok": True}
    assert compare({"acc": 0.74, "params": 1000, "ok": True}, stored, tol) == []
    assert compare({"acc": 0.66, "params": 1000, "ok": True}, stored, tol) == []
    (p,) = compare({"acc": 0.76, "params": 1000, "ok": True}, stored, tol)
    assert p.startswith("acc:") and "tolerance 0.05" in p
    (p,) = compare({"acc": 0.70, "params": 1001, "ok": True}, stored, tol)   # exact: one off fails
    assert p.startswith("params:")
    assert len(compare({"acc": 0.70, "params": 1000, "ok": False}, stored, tol)) == 1
    assert len(compare({"acc": 0.70, "params": 1000}, stored, tol)) == 1        # a value went missing
    assert len(compare(stored | {"new": 1}, stored, tol)) == 1                  # a value appeared
    assert compare({"x": math.nan}, {"x": math.nan}, {"x": 0.1}) == []
    assert len(compare({"x": math.nan}, {"x": 0.5}, {"x": 0.1})) == 1


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_a_stored_result_moved_beyond_its_tolerance_fails_the_check(notebook):
    """For every chapter: its stored record agrees with itself, and moving any one number by more
    than its tolerance (at least 10 points of accuracy, 0.1 of a loss) is reported, by name."""
    records = checks.read_records(notebook)
    assert records, f"{notebook.name} stores no record: every chapter checks its results"
    for name, rec in records.items():
        values, tol = rec["values"], rec["tolerance"]
        assert compare(values, values, tol) == []
        for key, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                moved = "changed" if not isinstance(v, bool) else not v
            else:
                moved = v + max(0.1, 1.01 * tol.get(key, 0.0)) if tol.get(key) else v + 1
            problems = compare(values | {key: moved}, values, tol)
            assert len(problems) == 1 and problems[0].startswith(f"{key}:"), (name, key, problems)


def _notebook_with_record(folder: Path, experiment: str, values: dict, tol: dict,
                          settings: dict | None = None) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("record(...)")
    payload = json.dumps({"values": values, "tolerance": tol}
                         | ({"settings": settings} if settings is not None else {}), sort_keys=True)
    cell.outputs = [nbformat.v4.new_output(
        "display_data", data={"application/papermill.record/text/plain": repr(payload)},
        metadata={"scrapbook": {"name": checks.RECORD_PREFIX + experiment}})]
    nb.cells = [cell]
    nbformat.write(nb, folder / "99_test.ipynb")


def test_record_raises_when_a_stored_value_moved_10_points(tmp_path, monkeypatch, capsys):
    """The check a chapter runs: the book stores 0.80 within 0.05; a fresh 0.70 fails it."""
    monkeypatch.setenv("EFFICIENTML_BOOK", str(tmp_path))
    monkeypatch.delenv("EFFICIENTML_CHECK", raising=False)
    _notebook_with_record(tmp_path, "demo", {"acc": 0.80, "n": 3}, {"acc": 0.05, "n": 0.0})
    record("demo", {"acc": 0.82, "n": 3}, {"acc": 0.05})
    assert "agree" in capsys.readouterr().out
    with pytest.raises(ResultMismatch, match=r"acc: 0\.7 here, 0\.8 stored"):
        record("demo", {"acc": 0.70, "n": 3}, {"acc": 0.05})
    with pytest.raises(ResultMismatch, match="n: 4 here"):
        record("demo", {"acc": 0.80, "n": 4}, {"acc": 0.05})
    monkeypatch.setenv("EFFICIENTML_CHECK", "off")    # make execute: report, do not raise
    record("demo", {"acc": 0.70, "n": 3}, {"acc": 0.05})
    assert "differ" in capsys.readouterr().out


def test_record_with_other_settings_reports_instead_of_raising(tmp_path, monkeypatch, capsys):
    """A reader who changed a chapter's settings is told that the book's numbers come from other
    settings (naming them), not given a ResultMismatch; the book's own settings still fail."""
    monkeypatch.setenv("EFFICIENTML_BOOK", str(tmp_path))
    monkeypatch.delenv("EFFICIENTML_CHECK", raising=False)
    book = {"lr": 0.1, "epochs": 5, "milestones": (3, 6)}
    _notebook_with_record(tmp_path, "demo", {"acc": 0.80}, {"acc": 0.05}, settings={
        "lr": 0.1, "epochs": 5, "milestones": [3, 6]})
    with pytest.raises(ResultMismatch):
        record("demo", {"acc": 0.50}, {"acc": 0.05}, settings=book, device="cpu")  # tuples = lists
    problems = record("demo", {"acc": 0.50}, {"acc": 0.05}, settings=book | {"lr": 0.5}, device="cpu")
    out = capsys.readouterr().out
    assert len(problems) == 1 and "other settings" in out and "lr: 0.5 here, 0.1 in the book" in out
    assert "epochs" not in out.split("Values")[0]      # only the settings that differ are named


def test_record_on_an_unmeasured_device_reports_instead_of_raising(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFICIENTML_BOOK", str(tmp_path))
    monkeypatch.delenv("EFFICIENTML_CHECK", raising=False)
    _notebook_with_record(tmp_path, "demo", {"acc": 0.80}, {"acc": 0.05})
    assert checks.MEASURED_DEVICES == ("cpu",)
    record("demo", {"acc": 0.50}, {"acc": 0.05}, device="cuda")
    out = capsys.readouterr().out
    assert "not checked" in out and "cuda" in out and "acc: 0.5 here" in out
    with pytest.raises(ResultMismatch):
        record("demo", {"acc": 0.50}, {"acc": 0.05}, device="cpu")
    claim(False, "a claim on a GPU", device="mps")       # reported
    assert "does not hold on this run (mps" in capsys.readouterr().out
    with pytest.raises(ClaimFailed):
        claim(False, "a claim on the CPU", device="cpu")


def test_record_dir_collects_what_records_and_claims_saw(tmp_path, monkeypatch):
    """EFFICIENTML_RECORD_DIR: how make test-other-kernels gathers each path's fresh values."""
    monkeypatch.setenv("EFFICIENTML_BOOK", str(tmp_path))
    monkeypatch.setenv("EFFICIENTML_RECORD_DIR", str(tmp_path / "seen"))
    monkeypatch.setenv("EFFICIENTML_CHECK", "off")
    _notebook_with_record(tmp_path, "demo", {"acc": 0.80}, {"acc": 0.05})
    record("demo", {"acc": 0.70}, {"acc": 0.05}, settings={"lr": 0.1}, device="cpu")
    claim(True, "it holds", device="cpu")
    (rec,) = [json.loads(line) for line in (tmp_path / "seen" / "records.jsonl").read_text().splitlines()]
    assert rec["name"] == "demo" and rec["values"] == {"acc": 0.70} and rec["stored"] == {"acc": 0.80}
    assert rec["settings"] == {"lr": 0.1} and len(rec["problems"]) == 1
    (cl,) = [json.loads(line) for line in (tmp_path / "seen" / "claims.jsonl").read_text().splitlines()]
    assert cl == {"name": "it holds", "holds": True}


def test_an_experiment_recorded_twice_is_an_error(tmp_path):
    _notebook_with_record(tmp_path, "demo", {"a": 1}, {})
    shutil.copy(tmp_path / "99_test.ipynb", tmp_path / "98_copy.ipynb")
    with pytest.raises(ValueError, match="several notebooks"):
        checks.stored_record("demo", tmp_path)


def test_claim():
    claim(2 > 1, "two beats one")
    with pytest.raises(ClaimFailed, match="one beats two"):
        claim(1 > 2, "one beats two")


def test_spread_by_hand():
    s = spread([0.6, 0.7, 0.8])
    assert s.mean == pytest.approx(0.7) and s.std == pytest.approx(0.1) and (s.min, s.max) == (0.6, 0.8)
    assert s.pct() == "70.0% ± 10.0" and spread([1.0]).std == 0.0
    assert spread([0.5]).pct() == "50.0% (one run)" and spread([1.9164]).fmt() == "1.916 (one run)"
    assert spread([0.81, 0.9]).above(s) and not spread([0.79, 0.9]).above(s)
    with pytest.raises(ValueError):
        spread([])
    with pytest.raises(ValueError):
        spread([0.5, math.nan])
    assert per_seed({"seeds": [0, 1, 2], "lr": 1}, lambda s: (s["seed"] * 2, s["lr"])) == [(0, 1), (2, 1), (4, 1)]
    with pytest.raises(ValueError, match="seeds"):
        per_seed({"lr": 1}, lambda s: s)
    hs = [History(test_acc=[0.1, a]) for a in (0.5, 0.7)]
    assert final(hs) == Spread((0.5, 0.7))


KERNEL_PATHS = Path(__file__).resolve().parent.parent / "results" / "kernel-paths.json"


@pytest.mark.skipif(not KERNEL_PATHS.exists(), reason="no results/kernel-paths.json: make test-other-kernels writes it")
def test_every_tolerance_covers_what_other_kernel_paths_measured():
    """results/kernel-paths.json holds how far every recorded value moved on other CPU kernel
    paths and thread counts (scripts/kernel_paths.py); no stored tolerance may be narrower than
    that (a value dropped from a record since is not checked), and no claim failed there."""
    measured = json.loads(KERNEL_PATHS.read_text())
    assert measured["failed_claims"] == []
    stored = {name: rec for nb in CHAPTERS for name, rec in checks.read_records(nb).items()}
    checked = 0
    for experiment, keys in measured["deviations"].items():
        if experiment not in stored:
            continue
        for key, by_path in keys.items():
            if key not in stored[experiment]["values"]:
                continue
            tol = stored[experiment]["tolerance"].get(key, 0.0)
            worst_path = max(by_path, key=by_path.get)
            assert by_path[worst_path] <= tol, (f"{experiment}/{key}: moved {by_path[worst_path]:.4g} on "
                                                f"{worst_path}, tolerance {tol}")
            checked += 1
    assert checked > 100
