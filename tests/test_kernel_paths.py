"""scripts/kernel_paths.py: another machine's executed chapters as a path, and the report."""
import ast
import importlib.util
import json
import shutil

from efficientml import checks

SPEC = importlib.util.spec_from_file_location("kernel_paths", checks.REPO_ROOT / "scripts" / "kernel_paths.py")
kernel_paths = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(kernel_paths)


def test_imported_chapters_are_measured_against_the_stored_book(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernel_paths, "OUT", tmp_path / "paths")
    monkeypatch.setattr(kernel_paths, "RESULT", tmp_path / "kernel-paths.json")
    other = tmp_path / "other-book"
    other.mkdir()
    nb = checks.REPO_ROOT / "book" / "05_transformer.ipynb"
    shutil.copy(nb, other / nb.name)
    # the other machine's run: one trained value moved by 0.25, one claim failed
    text = (other / nb.name).read_text()
    stored = checks.read_records(nb)["transformer"]["values"]
    # (and recorded a value the book no longer records: not compared)
    moved = dict(stored, final_test_loss=stored["final_test_loss"] + 0.25, dropped_since=1.0)
    assert kernel_paths._printed_claims(nb), "the chapter prints its claims"
    statement = next(iter(kernel_paths._printed_claims(nb)))
    data = json.loads(text)
    for cell in data["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name", "")
            if name == checks.RECORD_PREFIX + "transformer":
                payload = json.loads(ast.literal_eval("".join(o["data"]["application/papermill.record/text/plain"])))
                payload["values"] = moved
                o["data"]["application/papermill.record/text/plain"] = repr(json.dumps(payload, sort_keys=True))
            if "text" in o:
                o["text"] = "".join(o["text"]).replace(f"holds: {statement}", f"DOES NOT HOLD (x): {statement}")
    (other / nb.name).write_text(json.dumps(data))
    assert kernel_paths.import_executed("elsewhere", other, "a test") == 0
    # a path that ran other chapters only: the table says so instead of printing a zero
    (tmp_path / "paths" / "partial").mkdir()
    (tmp_path / "paths" / "partial" / "run.json").write_text("{}")
    capsys.readouterr()
    assert kernel_paths.report() == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "/ transformer" in line)
    assert "0.250 (" in row and row.rstrip().endswith("not run")
    result = json.loads((tmp_path / "kernel-paths.json").read_text())
    devs = result["deviations"]["transformer"]
    assert abs(devs["final_test_loss"]["elsewhere"] - 0.25) < 1e-9
    assert all(d["elsewhere"] == 0 for k, d in devs.items() if k != "final_test_loss")
    assert "dropped_since" not in devs
    assert result["failed_claims"] == [f"elsewhere: {statement}"]


def test_a_part_of_a_path_fails_on_what_it_measured_itself(tmp_path, monkeypatch):
    """A partial run (one chapter) adds to a path's folder: an earlier part's failed record does
    not fail it, and an earlier part recorded without an exit status counts as failed."""
    monkeypatch.setattr(kernel_paths, "OUT", tmp_path)
    folder = tmp_path / "sse"
    folder.mkdir()
    (folder / "records.jsonl").write_text(json.dumps({"name": "old", "values": {}, "problems": ["moved"]}) + "\n")
    (folder / "run.json").write_text(json.dumps({"parts": [{"pytest_args": ["book"]}]}))

    def the_suite(cmd, cwd, env):  # what the chapter's record and claim write under CHECK=off
        assert env["EFFICIENTML_CHECK"] == "off" and env["ATEN_CPU_CAPABILITY"] == "default"
        assert env["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor-cache")  # one per path
        with open(f"{env['EFFICIENTML_RECORD_DIR']}/claims.jsonl", "a") as f:
            f.write(json.dumps({"name": "a claim", "holds": True}) + "\n")
        return 0
    monkeypatch.setattr(kernel_paths.subprocess, "call", the_suite)
    assert kernel_paths.run("sse", ["book/05_transformer.ipynb"]) == 0
    run = json.loads((folder / "run.json").read_text())
    assert [p.get("exit_status") for p in run["parts"]] == [None, 0] and run["exit_status"] == 1


def test_a_failed_test_run_again_and_passed_by_a_later_part_clears_its_part(tmp_path, monkeypatch):
    """A part that failed only in tests stops failing its path once a later part has run those
    tests again and they passed; a failed record or claim, or a test not run again, does not."""
    monkeypatch.setattr(kernel_paths, "OUT", tmp_path)
    folder = tmp_path / "sse"
    folder.mkdir()
    flaky, other = "tests/test_q.py::test_round_trip", "tests/test_q.py::test_other"
    (folder / "run.json").write_text(json.dumps({"parts": [
        {"pytest_args": ["tests", "book"], "exit_status": 1, "failed_tests": [flaky], "failed_checks": []}]}))
    ran = {}

    def the_suite(cmd, cwd, env):  # pytest with kernel_paths as a plugin: each test's outcome
        assert cmd[cmd.index("-p", cmd.index("no:cacheprovider")) + 1] == "kernel_paths"
        with open(env["KERNEL_PATHS_OUTCOMES"], "a") as f:
            for test, outcome in ran.items():
                f.write(json.dumps({"name": test, "outcome": outcome}) + "\n")
        return int("failed" in ran.values())
    monkeypatch.setattr(kernel_paths.subprocess, "call", the_suite)
    ran = {other: "passed"}                      # the failed test not run again: still failing
    assert kernel_paths.run("sse", ["tests/test_q.py::test_other"]) == 0
    assert json.loads((folder / "run.json").read_text())["exit_status"] == 1
    ran = {flaky: "failed"}                      # run again and failed again
    assert kernel_paths.run("sse", [flaky]) == 1
    run = json.loads((folder / "run.json").read_text())
    assert run["exit_status"] == 1 and run["parts"][-1]["failed_tests"] == [flaky]
    ran = {flaky: "passed", other: "passed"}     # run again and passed: both failed parts clear
    assert kernel_paths.run("sse", ["tests/test_q.py"]) == 0
    run = json.loads((folder / "run.json").read_text())
    assert run["parts"][0]["passed_later"] == [flaky] and run["parts"][2]["passed_later"] == [flaky]
    assert run["exit_status"] == 0
    assert kernel_paths.status([{"exit_status": 1, "failed_tests": [flaky], "passed_later": [flaky],
                                 "failed_checks": ["claim: x"]}]) == 1
    assert kernel_paths.status([{"exit_status": 1}]) == 1 and kernel_paths.status([{}]) == 1


def test_a_path_not_run_here_is_kept_from_the_committed_file(tmp_path, monkeypatch):
    """report keeps the committed file's paths that have no run here: deviations recomputed from
    the values it holds against the book as it is now, kept as they were where it holds none;
    its failed claims are kept while the book still makes them."""
    monkeypatch.setattr(kernel_paths, "OUT", tmp_path / "paths")
    monkeypatch.setattr(kernel_paths, "RESULT", tmp_path / "kernel-paths.json")
    stored = checks.read_records(checks.REPO_ROOT / "book" / "05_transformer.ipynb")["transformer"]["values"]
    statement = next(iter(kernel_paths._printed_claims(checks.REPO_ROOT / "book" / "05_transformer.ipynb")))
    (tmp_path / "kernel-paths.json").write_text(json.dumps({
        "runs": {"earlier": {"path": "earlier", "exit_status": 1}},
        "failed_claims": [f"earlier: {statement}", "earlier: a claim the book no longer makes"],
        "deviations": {"transformer": {"final_test_loss": {"earlier": 9.0}, "reversal_fraction": {"earlier": 0.125},
                                       "dropped_since": {"earlier": 1.0}}},
        "values": {"earlier": {"transformer": {"final_test_loss": stored["final_test_loss"] + 0.5}}}}))
    assert kernel_paths.report() == 0
    result = json.loads((tmp_path / "kernel-paths.json").read_text())
    devs = result["deviations"]["transformer"]
    assert abs(devs["final_test_loss"]["earlier"] - 0.5) < 1e-9   # recomputed, not the 9.0 it held
    assert devs["reversal_fraction"]["earlier"] == 0.125          # no value held: kept
    assert "dropped_since" not in devs
    assert result["runs"]["earlier"]["exit_status"] == 1
    assert result["failed_claims"] == [f"earlier: {statement}"]
    # run here in whole, a path replaces what the file held for it
    (tmp_path / "paths" / "earlier").mkdir(parents=True)
    (tmp_path / "paths" / "earlier" / "run.json").write_text(json.dumps({"path": "earlier", "exit_status": 0, "parts": [
        {"pytest_args": ["tests", "book"], "exit_status": 0}]}))
    assert kernel_paths.report() == 0
    result = json.loads((tmp_path / "kernel-paths.json").read_text())
    assert result["runs"]["earlier"]["exit_status"] == 0 and result["failed_claims"] == []
    assert "transformer" not in result["deviations"]


def test_a_path_run_here_in_parts_adds_to_the_committed_file(tmp_path, monkeypatch):
    """One chapter run here on a committed path: its parts follow the committed ones, what it
    measured replaces the file's, and the file's other experiments stay."""
    monkeypatch.setattr(kernel_paths, "OUT", tmp_path / "paths")
    monkeypatch.setattr(kernel_paths, "RESULT", tmp_path / "kernel-paths.json")
    stored = checks.read_records(checks.REPO_ROOT / "book" / "05_transformer.ipynb")["transformer"]["values"]
    lm = checks.read_records(checks.REPO_ROOT / "book" / "06_language_model.ipynb")["language-model"]["values"]
    key = next(k for k, v in lm.items() if isinstance(v, float))
    (tmp_path / "kernel-paths.json").write_text(json.dumps({
        "runs": {"p": {"path": "p", "exit_status": 0, "parts": [{"pytest_args": ["book"], "exit_status": 0}]}},
        "failed_claims": [],
        "deviations": {"transformer": {"final_test_loss": {"p": 0.125}}, "language-model": {key: {"p": 0.0625}}}}))
    folder = tmp_path / "paths" / "p"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"path": "p", "exit_status": 0, "parts": [
        {"pytest_args": ["book/05_transformer.ipynb"], "exit_status": 0}]}))
    (folder / "records.jsonl").write_text(json.dumps({"name": "transformer", "problems": [], "values": dict(
        stored, final_test_loss=stored["final_test_loss"] + 0.25)}) + "\n")
    assert kernel_paths.report() == 0
    result = json.loads((tmp_path / "kernel-paths.json").read_text())
    assert [p["pytest_args"] for p in result["runs"]["p"]["parts"]] == [["book"], ["book/05_transformer.ipynb"]]
    assert abs(result["deviations"]["transformer"]["final_test_loss"]["p"] - 0.25) < 1e-9
    assert result["deviations"]["language-model"][key]["p"] == 0.0625
    # report run again: the part already in the file is not added twice
    assert kernel_paths.report() == 0
    again = json.loads((tmp_path / "kernel-paths.json").read_text())
    assert again["runs"]["p"]["parts"] == result["runs"]["p"]["parts"]
