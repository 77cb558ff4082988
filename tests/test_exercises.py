"""The code in the book's exercise solutions runs: each ```python block of a solution is
extracted from its notebook and executed unchanged, on a tiny configuration (the experiment
registry's quick settings are shrunk for the test), and what it computes is checked."""
import ast
import builtins
import re
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn

import efficientml.experiments.learning_rates as learning_rates
from efficientml.experiments import EXPERIMENTS

BOOK = Path(__file__).resolve().parents[1] / "book"
CH1 = BOOK / "01_learning_rates.ipynb"

# Tiny Fashion-MNIST runs: 100 training images (one batch of 128), 100 test images, a quarter-width net.
TINY = dict(n_per_class=10, test_per_class=10, width=0.25, augment=False)


def exercise_snippets(path: Path) -> dict[int, list[str]]:
    """{exercise number: [dedented ```python blocks of its text and solution]} of the notebook's
    single "## Exercises" markdown cell (a numbered list; blocks indented under its items)."""
    cells = [c for c in nbformat.read(path, 4).cells
             if c.cell_type == "markdown" and c.source.lstrip().startswith("## Exercises")]
    assert len(cells) == 1, f"{path.name}: expected one '## Exercises' cell, found {len(cells)}"
    parts = re.split(r"^(\d+)\. ", cells[0].source, flags=re.M)[1:]  # [number, text, number, text, ...]
    items = {int(n): text for n, text in zip(parts[::2], parts[1::2])}
    assert list(items) == list(range(1, len(items) + 1)), f"exercises numbered {list(items)}"
    # a ```python block ends at the first line of exactly three backticks (an admonition closes with four)
    block = re.compile(r"^[ ]*```python[ ]*\n(.*?)^[ ]*```[ ]*$", flags=re.M | re.S)
    return {n: [textwrap.dedent(b) for b in block.findall(text)] for n, text in items.items()}


def free_names(code: str) -> set[str]:
    """Names ``code`` reads that it neither assigns nor imports, and that are not builtins."""
    tree = ast.parse(code)
    read, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return read - bound - set(dir(builtins))


def notebook_imports(path: Path, names: set[str]) -> dict:
    """A namespace holding ``names`` as the notebook's own top-level imports bind them."""
    ns = {}
    for cell in nbformat.read(path, 4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.ImportFrom):
                wanted = [a for a in node.names if (a.asname or a.name) in names]
                if wanted:
                    stmt = ast.Module([ast.ImportFrom(node.module, wanted, node.level)], [])
                    stmt = ast.fix_missing_locations(stmt)
                    exec(compile(stmt, path.name, "exec"), ns)
    missing = names - set(ns)
    assert not missing, f"{path.name} does not import {sorted(missing)}, which a solution uses"
    return ns


def shrink(monkeypatch, experiment: str, **extra) -> None:
    """Make ``experiment``'s quick settings tiny for this test, and select the quick profile."""
    monkeypatch.setenv("EFFICIENTML_PROFILE", "quick")
    quick = EXPERIMENTS[experiment].settings
    monkeypatch.setitem(quick, "quick", quick["quick"] | TINY | extra)


SNIPPETS = exercise_snippets(CH1)


def test_chapter1_solutions_have_the_expected_code():
    # the tests below execute these blocks; a change of shape here means they need a look
    assert {n: len(b) for n, b in SNIPPETS.items()} == {1: 0, 2: 0, 3: 1, 4: 1, 5: 0}
    assert free_names(SNIPPETS[3][0]) == set()          # self-contained: it imports what it uses
    assert free_names(SNIPPETS[4][0]) == {"run", "summarize"}


def test_exercise_snippets_parses_nested_fences(tmp_path):
    md = ("## Exercises\n\n1. **A.** Text.\n\n   ````{admonition} Solution\n   :class: dropdown\n"
          "   ```python\n   x = 1\n   if x:\n       y = 2\n   ```\n\n"
          "   ```python\n   z = 3\n   ```\n   ````\n\n"
          "2. **B.** No code.\n\n   ```{admonition} Solution\n   Prose.\n   ```\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(md)]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    assert exercise_snippets(tmp_path / "nb.ipynb") == {1: ["x = 1\nif x:\n    y = 2\n", "z = 3\n"], 2: []}
    assert free_names("import torch\nfrom a import b as c\nd = c(e, len)\n") == {"e"}


def test_chapter1_exercise3_recomputes_batchnorm_statistics(data_dir, monkeypatch, seeded):
    shrink(monkeypatch, "lr-sweep")
    trained = {}
    real_train = learning_rates.train_convnet

    def recording_train(*args, **kwargs):  # keeps a copy of the state the snippet starts from
        model, hist = real_train(*args, **kwargs)
        trained["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, hist

    monkeypatch.setattr(learning_rates, "train_convnet", recording_train)
    ns = {}
    exec(compile(SNIPPETS[3][0], "exercise 3", "exec"), ns)

    model, hist = ns["model"], ns["hist"]
    assert hist.lr == [1.0] * 5 and hist.epochs == 5
    for name in ("before", "after"):
        assert isinstance(ns[name], float) and 0.0 <= ns[name] <= 1.0, (name, ns[name])
    # no weight changed; every BatchNorm layer's running statistics did
    for name, p in model.named_parameters():
        assert torch.equal(p, trained["state"][name]), f"{name} changed"
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 9
    batches = list(ns["train_loader"])
    assert len(batches) == 1  # so the cumulative average below is the mean over the training set
    for name, bn in bns:
        assert bn.momentum is None
        assert int(bn.num_batches_tracked) == len(batches)
        assert not torch.allclose(bn.running_mean, trained["state"][f"{name}.running_mean"])
    # reference: the first BatchNorm sees conv1's output, whatever the other layers' statistics
    x = batches[0][0]
    with torch.no_grad():
        h = model.features[0][0](x)
    bn = model.features[0][1]
    # float32 sums in another order (BatchNorm's kernel on channels-last maps): 1e-3 relative
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-3)


def test_chapter1_exercise4_moves_the_milestones(data_dir, monkeypatch, seeded):
    shrink(monkeypatch, "schedules", seeds=[0])  # the quick profile's 12 epochs, one seed
    snippet = SNIPPETS[4][0]
    ns = notebook_imports(CH1, free_names(snippet))
    exec(compile(snippet, "exercise 4", "exec"), ns)

    later, moved = ns["later"], ns["moved"]
    assert later["settings"]["milestones"] == [6, 9, 11] and later["settings"]["epochs"] == 12
    (multistep,), (cosine,) = later["results"]["runs"]["multistep"], later["results"]["runs"]["cosine"]
    # the override reached the schedule: /10 after epochs 6, 9 and 11; cosine does not use it
    assert multistep.lr == pytest.approx([0.1] * 6 + [0.01] * 3 + [0.001] * 2 + [0.0001])
    assert cosine.lr[0] == pytest.approx(0.1) and all(a > b for a, b in zip(cosine.lr, cosine.lr[1:]))
    assert {"train loss", "train acc", "test acc", "best test acc"} <= set(moved)
    assert moved["test acc"].values == (multistep.test_acc[-1],)
    assert 0.0 <= moved["test acc"].mean <= 1.0


CH7 = BOOK / "07_cost.ipynb"


def test_chapter7_exercise1_solution_passes_the_check_and_finds_the_crossing(capsys):
    from efficientml import cost
    (snippet,) = exercise_snippets(CH7)[1]
    assert {"cost", "roof"} <= free_names(snippet)  # (and the function's own arguments)
    ns = {"cost": cost, "roof": cost.Roofline(peak_flops=200e9, bandwidth=40e9, threads=2, device="cpu")}
    exec(snippet, ns)
    out = capsys.readouterr().out
    assert "agrees with 2mnk" in out
    m = ns["crossing"]   # the first batch whose first-layer product exceeds a ridge of 5 FLOP/byte
    assert ns["gemm_intensity"](m, 256, 784) > 5 >= ns["gemm_intensity"](m - 1, 256, 784)


CH8 = BOOK / "08_scale.ipynb"


def test_chapter8_exercise1_solution_passes_the_check(capsys):
    from efficientml import parallel
    (snippet,) = exercise_snippets(CH8)[1]
    assert free_names(snippet) <= {"parallel", "layer_activation_bytes", "batch", "seq", "d_model", "n_heads", "d_ff"}
    ns = {"parallel": parallel}
    exec(snippet, ns)
    assert "equals the measured bytes" in capsys.readouterr().out
    f = ns["layer_activation_bytes"]
    assert f(5, 33, 24, 3, 40) == parallel.layer_activation_bytes(5, 33, 24, 3, 40)
    t = ns["crossover"]   # the attention weights (4 h T^2 bytes, h = 4) pass half of the block
    assert 32 * t * t > f(1, t, 128, 4, 512) and 32 * (t - 1) ** 2 <= f(1, t - 1, 128, 4, 512)


CH9 = BOOK / "09_serving.ipynb"


def test_chapter9_exercise1_solution_passes_the_check(capsys):
    from efficientml import serving
    snippet = exercise_snippets(CH9)[1][0]
    assert free_names(snippet) <= {"torch", "serving", "my_tiled_attention", "q", "k", "v", "causal", "tile"}
    ns = {"torch": torch, "serving": serving}
    exec(snippet, ns)
    assert "equal to naive attention" in capsys.readouterr().out
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    torch.testing.assert_close(ns["my_tiled_attention"](q, k, v, causal=True, tile=3),
                               serving.tiled_attention(q, k, v, causal=True, tile=3))
