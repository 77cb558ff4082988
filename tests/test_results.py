import json
import subprocess
import sys
from pathlib import Path

import pytest

from efficientml.experiments import EXPERIMENTS, run_experiment
from efficientml.profiles import get_profile
from efficientml.results import load_result, read_json, write_json


def test_profile_selection(monkeypatch):
    monkeypatch.delenv("EFFICIENTML_PROFILE", raising=False)
    assert get_profile() == "quick"
    monkeypatch.setenv("EFFICIENTML_PROFILE", "full")
    assert get_profile() == "full" and get_profile("quick") == "quick"
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("medium")


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})        # cannot serialise: the old file stays whole
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_every_experiment_has_both_profiles():
    for exp in EXPERIMENTS.values():
        assert set(exp.settings) == {"quick", "full"}
        assert exp.settings["quick"].keys() == exp.settings["full"].keys()


def test_cli_writes_a_result_with_provenance(tmp_path, data_dir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "efficientml", "run", "mlp", "--profile", "quick", "--out", str(out),
                           "--set", "epochs=2", "--set", "n_per_class=100", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "mlp-quick.json").read_text())
    assert r["experiment"] == "mlp" and r["profile"] == "quick"
    assert r["settings"]["epochs"] == 2 and r["settings"]["n_per_class"] == 100
    for key in ("device", "torch", "torchvision", "python", "date", "torch_threads"):
        assert r["provenance"][key]
    assert r["wall_time_s"] > 0
    h = r["results"]["history"]
    assert len(h["test_acc"]) == 2 and r["results"]["final_test_acc"] == h["test_acc"][-1] > 0.5
    assert load_result("mlp", "quick", out) == r and load_result("mlp", "full", out) is None


def test_run_experiment_resumes_from_its_checkpoint(tmp_path, data_dir):
    first = read_json(run_experiment("mlp", "quick", tmp_path, {"epochs": 1, "n_per_class": 50}, "cpu", False))
    # run again with more epochs: the checkpoint holds epoch 1, so only epoch 2 is trained
    second = read_json(run_experiment("mlp", "quick", tmp_path, {"epochs": 2, "n_per_class": 50}, "cpu", False))
    h1, h2 = first["results"]["history"], second["results"]["history"]
    assert len(h2["test_acc"]) == 2
    assert h2["test_acc"][0] == h1["test_acc"][0] and h2["epoch_time"][0] == h1["epoch_time"][0]


def test_cli_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "efficientml", "run", "mlp", "--out", str(tmp_path),
                           "--set", "epoch=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no setting 'epoch'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_missing_data_clearly(tmp_path):
    env = {"EFFICIENTML_DATA": str(tmp_path / "empty"), "EFFICIENTML_DOWNLOAD": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "efficientml", "run", "mlp", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fashion-mnist" in proc.stderr and str(tmp_path / "empty" / "FashionMNIST") in proc.stderr


def _overrides_of(command: str) -> dict:
    """The settings a printed command line changes, parsed as the CLI parses them."""
    import shlex
    from efficientml.__main__ import _parse_override
    words = shlex.split(command.split("\n#")[0].replace("\\\n", " "))
    return dict(_parse_override(w) for i, w in enumerate(words) if i and words[i - 1] == "--set")


def test_rerun_command_sets_exactly_what_differs_from_the_page():
    from efficientml.experiments import settings
    from efficientml.results import rerun_command
    page = settings("schedules", "quick")
    page.pop("profile")
    made = page | {"n_per_class": None, "seeds": [0], "milestones": [1, 2, 3]}
    cmd = rerun_command({"experiment": "schedules", "profile": "quick", "settings": made}, page)
    assert cmd.startswith("python -m efficientml run schedules --out ceiling")
    assert _overrides_of(cmd) == {"n_per_class": None, "seeds": [0], "milestones": [1, 2, 3]}
    assert page | _overrides_of(cmd) == made
    assert cmd.endswith("writes ceiling/schedules-quick.json, committed as results/schedules-ceiling.json")
    with pytest.raises(ValueError, match="no 'settings'"):
        rerun_command({"experiment": "schedules", "profile": "quick"}, page)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "results").glob("*-ceiling.json")),
                         ids=lambda p: p.name)
def test_committed_ceilings_are_runs_of_todays_experiments(path):
    """A ceiling file in results/ holds a real CLI run: its experiment exists, it has every
    setting the experiment has today (no more), a provenance and a wall time."""
    from efficientml.experiments import settings
    r = read_json(path)
    assert path.name == f"{r['experiment']}-ceiling.json" and r["experiment"] in EXPERIMENTS
    today = settings(r["experiment"], r["profile"])
    today.pop("profile")
    assert r["settings"].keys() == today.keys()
    assert r["wall_time_s"] > 0 and r["provenance"]["git_commit"] and r["provenance"]["date"]
