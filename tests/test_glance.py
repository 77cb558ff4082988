import json
import shutil
from pathlib import Path

import nbformat
import pytest

from efficientml import checks, glance
from efficientml.glance import CHAPTERS, FULL, build_page, read_records
from efficientml.train import History

BOOK = Path(__file__).resolve().parent.parent / "book"


def test_every_chapter_records_every_headline_number():
    for ch in CHAPTERS:
        records = read_records(BOOK / f"{ch.notebook}.ipynb")
        figures = checks.read_records(BOOK / f"{ch.notebook}.ipynb", checks.MEASURED_PREFIX)
        for row in ch.rows:
            stored = figures.get(row.experiment, {}).get("values", {}) if row.measured else records.get(row.experiment, {})
            assert row.key in stored, (ch.notebook, row.experiment, row.key)


def test_machine_figures_are_shown_as_this_machines_and_never_checked(tmp_path):
    page = build_page(results_dir=tmp_path)
    figures = checks.read_records(BOOK / "07_cost.ipynb", checks.MEASURED_PREFIX)["cost"]
    assert f"measured on {figures['machine']}" in page
    row = next(line for line in page.splitlines() if line.startswith("| peak float32 matrix product"))
    assert f"| {figures['values']['peak_flops'] / 1e9:.1f} G |" in row and "not checked: *this machine's*" in row
    checked = next(line for line in page.splitlines() if line.startswith("| bfloat16 autocast training"))
    assert "± 0.005" in checked and "(the same in every profile)" in checked


def test_page_shows_the_recorded_quick_numbers_and_no_full_runs(tmp_path):
    page = build_page(results_dir=tmp_path)   # an empty results folder: no full run made
    lora = read_records(BOOK / "04_lora.ipynb")["lora"]
    row = next(line for line in page.splitlines() if line.startswith("| pt_net"))
    assert f"| {100 * lora['pt_net']:.1f}% |" in row and "| *not run yet* |" in row
    lm = read_records(BOOK / "06_language_model.ipynb")["language-model"]
    assert f"{lm['val_loss_nats']:.3f}" in page
    table_rows = [line for line in page.splitlines() if line.startswith("| ") and "---" not in line]
    assert sum("*not run yet*" in line for line in table_rows) == sum(
        1 for ch in CHAPTERS for row in ch.rows if not (row.same_in_every_profile or ch.one_profile))
    for ch in CHAPTERS:
        assert f"## {ch.number}. {ch.title}" in page and f"]({ch.notebook}.ipynb)" in page


def test_page_reads_full_results_from_result_files(tmp_path):
    """A result file in the format run_experiment writes (here for a tiny, made-up run) fills the full column."""
    hist = History(train_acc=[0.5, 0.6], test_acc=[0.7, 0.8125])
    payload = {"experiment": "pruning", "profile": "full", "settings": {},
               "results": {"runs": {name: hist.to_dict() for name in ("baseline", "structured", "unstructured")}}}
    (tmp_path / "pruning-full.json").write_text(json.dumps(payload))
    page = build_page(results_dir=tmp_path)
    assert "| baseline (unpruned): final test accuracy |" in page
    row = next(line for line in page.splitlines() if line.startswith("| structured, 50% of filters"))
    assert row.split("|")[4].strip() == "81.2%"


def test_full_extractors_match_the_recorded_keys():
    """Every key a chapter records can also be read from a full result of that experiment."""
    for ch in CHAPTERS:
        for row in ch.rows:
            assert row.experiment in FULL


def test_missing_record_is_a_clear_error(tmp_path):
    book = tmp_path / "book"
    shutil.copytree(BOOK, book, ignore=shutil.ignore_patterns("*.md"))
    nb = nbformat.read(book / "04_lora.ipynb", 4)
    nb.cells = nb.cells[:-1]   # drop the record cell
    nbformat.write(nb, book / "04_lora.ipynb")
    with pytest.raises(KeyError, match="re-execute"):
        build_page(book_dir=book, results_dir=tmp_path)


def test_repository_url_for_launch_buttons():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_book", BOOK.parent / "scripts" / "build_book.py")
    build_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_book)
    for url in ("https://github.com/a-b/c.d", "https://github.com/a-b/c.d.git", "git@github.com:a-b/c.d.git"):
        assert build_book.repository_url(url) == "https://github.com/a-b/c.d"
    assert build_book.repository_url("https://gitlab.example.org/x/y") is None


def test_full_results_over_seeds_show_the_mean(tmp_path):
    """A result file with one History per seed (Chapters 1, 3, 4) fills the full column with the mean."""
    runs = [History(train_acc=[0.9], test_acc=[a]).to_dict() for a in (0.80, 0.82, 0.84)]
    payload = {"experiment": "lr-sweep", "profile": "full", "settings": {},
               "results": {"runs": {lr: runs for lr in ("0.0001", "0.1", "1.0")}}}
    (tmp_path / "lr-sweep-full.json").write_text(json.dumps(payload))
    row = next(line for line in build_page(results_dir=tmp_path).splitlines() if line.startswith("| lr 0.1:"))
    assert row.split("|")[4].strip() == "82.0%"


def test_full_language_model_result_fills_the_finetuning_rows(tmp_path):
    """The fine-tuning rows of Chapter 6 read the mean final loss (bits -> nats) over seeds."""
    import math
    runs = {"none": [History(test_loss=[2.0]).to_dict()],
            "full": [History(test_loss=[1.5]).to_dict(), History(test_loss=[1.7]).to_dict()],
            "lora r=4": [History(test_loss=[1.8]).to_dict()]}
    payload = {"experiment": "language-model", "profile": "full", "settings": {},
               "results": {"val_loss_nats": 1.5, "kv_cache_equal": True, "finetune": {"runs": runs, "cost": {}}}}
    (tmp_path / "language-model-full.json").write_text(json.dumps(payload))
    row = next(line for line in build_page(results_dir=tmp_path).splitlines() if "fully fine-tuned" in line)
    assert row.split("|")[4].strip() == f"{1.6 * math.log(2):.3f}"


def test_what_each_chapter_ran_on_comes_from_its_settings():
    from efficientml.experiments import settings
    data = {ch.number: ch.data() for ch in glance.CHAPTERS}
    lora, tr = settings("lora", "quick"), settings("transformer", "quick")
    assert f"{lora['n_per_class']} images of each of {len(lora['target_classes'])} others" in data[4]
    assert f"ResNet-18 (width {lora['width']}, small-image stem)" in data[4]
    assert f"{tr['min_length']} to {tr['length']} random symbols" in data[5]
    assert f"width {settings('lr-sweep', 'quick')['width']:g}" in data[1]


def test_row_labels_that_name_a_setting_read_it(monkeypatch):
    from efficientml.experiments import settings
    labels = {ch.number: [row.text(glance.read_records(glance.REPO_ROOT / "book" / f"{ch.notebook}.ipynb")) for row in ch.rows] for ch in glance.CHAPTERS}
    lr, lora = settings("lr-sweep", "quick"), settings("lora", "quick")
    assert sum(f"after {lr['epochs']} epochs" in t for t in labels[1]) == len(lr["lrs"])
    assert any(f"rank-{lora['r_backbone']} LoRA" in t for t in labels[4])
    assert any(f"up to {lora['freeze_up_to']} frozen" in t for t in labels[4])
    # Chapter 3's schedule: prune_step at every prune_every-th epoch from prune_start to prune_stop
    assert glance._final_sparsity(dict(prune_start=2, prune_every=2, prune_stop=10, prune_step=0.1)) == "50%"
    assert glance._final_sparsity(dict(prune_start=1, prune_every=1, prune_stop=3, prune_step=0.2)) == "60%"
    changed = dict(settings("lora", "quick"), r_backbone=16, freeze_up_to="layer2")
    monkeypatch.setattr(glance, "_quick", lambda name: changed if name == "lora" else settings(name, "quick"))
    texts = [row.text() for ch in glance.CHAPTERS if ch.number == 4 for row in ch.rows]
    assert any("rank-16 LoRA" in t for t in texts) and any("up to layer2 frozen" in t for t in texts)
    # a template's fields are values the chapter recorded
    row = glance.Row("{world_size} processes, {ddp_steps} steps", "scale", "max_gap_ddp", fill=True)
    assert row.text({"scale": {"world_size": 3, "ddp_steps": 50}}) == "3 processes, 50 steps"
    scale = read_records(glance.REPO_ROOT / "book" / "08_scale.ipynb")["scale"]
    assert any(f"{scale['world_size']} processes (DDP) against 1" in t and f"in {scale['ddp_steps']} steps" in t
               for t in labels[8])
