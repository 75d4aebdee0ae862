"""The Sphinx extension that hides nbdev directives in the rendered book."""
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "_ext"))
from nbdev_directives import clean_notebook  # noqa: E402


def cell(src):
    return {"cell_type": "code", "source": src, "metadata": {}, "outputs": []}


def test_directives_become_tags_and_disappear():
    nb = {"cells": [cell("#| default_exp core"), cell("#| hide\nimport os"), cell("#| export\ndef f(): pass"),
                    cell(["#| eval: false\n", "train()"]), cell("#| echo: false\nplot()"),
                    cell("#| output: false\nx = 1"), cell("print(1)"), {"cell_type": "markdown", "source": "#| no"}]}
    out = clean_notebook(json.loads(json.dumps(nb)))["cells"]
    assert out[0]["metadata"]["tags"] == ["remove-cell"]
    assert out[1]["metadata"]["tags"] == ["remove-cell"] and out[1]["source"] == "import os"
    assert out[2] == cell("def f(): pass")
    assert out[3]["metadata"]["tags"] == ["skip-execution"] and out[3]["source"] == "train()"
    assert out[4]["metadata"]["tags"] == ["remove-input"]
    assert out[5]["metadata"]["tags"] == ["remove-output"]
    assert out[6] == cell("print(1)")
    assert out[7]["source"] == "#| no"                       # markdown is left alone


def test_no_directive_survives_in_any_chapter():
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = clean_notebook(json.loads(path.read_text()))
        for c in nb["cells"]:
            if c["cell_type"] == "code":
                src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                assert not any(line.startswith("#|") for line in src.splitlines()), path.name


def test_collapse_streams_keeps_the_final_state_of_a_progress_bar():
    import nbformat
    sys.path.insert(0, str(ROOT / "scripts"))
    from execute_nb import collapse_streams
    nb = nbformat.v4.new_notebook()
    c = nbformat.v4.new_code_cell("fit()")
    c.outputs = [nbformat.v4.new_output("stream", name="stderr", text="\rbar 10%"),
                 nbformat.v4.new_output("stream", name="stderr", text="\rbar 100%"),
                 nbformat.v4.new_output("stream", name="stderr", text="\n"),
                 nbformat.v4.new_output("stream", name="stdout", text="loss 1.0\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("text"), c]
    out = collapse_streams(nb).cells[1].outputs
    assert [(o.name, o.text) for o in out] == [("stderr", "bar 100%\n"), ("stdout", "loss 1.0\n")]
    assert "outputs" not in nb.cells[0]


def test_cell_seconds_reads_nbclient_timing_and_drop_timing_removes_it():
    import nbformat
    sys.path.insert(0, str(ROOT / "scripts"))
    from execute_nb import cell_seconds, drop_timing
    nb = nbformat.v4.new_notebook()
    fast, slow, untimed = (nbformat.v4.new_code_cell(src) for src in ("x = 1", "train()\nmore()", "y = 2"))
    for c, (start, end) in ((fast, ("10:00:00.000", "10:00:00.500")), (slow, ("10:00:01.000", "10:01:31.250"))):
        c.metadata["execution"] = {"iopub.execute_input": f"2026-12-02T{start}Z", "iopub.status.busy": "x",
                                   "shell.execute_reply": f"2026-12-02T{end}Z"}
    nb.cells = [fast, nbformat.v4.new_markdown_cell("text"), slow, untimed]
    assert [(round(s, 3), src) for s, _, src in cell_seconds(nb)] == [(90.25, "train()"), (0.5, "x = 1")]
    assert all("execution" not in c.metadata for c in drop_timing(nb).cells)
    assert cell_seconds(nb) == []


def test_no_chapter_is_committed_with_execution_timestamps():
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        assert "iopub.execute_input" not in path.read_text(), f"{path.name}: strip with execute_nb.drop_timing"


def test_every_chapter_opens_with_a_colab_badge_and_a_colab_only_install_cell():
    for path in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        def src(c):
            return c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        assert f"colab.research.google.com/github/msopt/msopt/blob/main/nbs/{path.name}" in src(cells[0]), path.name
        install = [c for c in cells[:6] if c["cell_type"] == "code" and "pip install" in src(c)]
        assert install, f"{path.name}: no install cell among the first cells"
        body = src(install[0])
        assert 'if "google.colab" in sys.modules:' in body and body.lstrip().startswith("#| hide"), path.name


def _normalized(name: str) -> str:
    "A distribution name as the package index compares it (PEP 503)."
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(line: str) -> list[str]:
    "The distribution names a `pip install ...` command line asks for (extras, versions and URLs left out)."
    args = shlex.split(line.split("pip install", 1)[1].split("`")[0].split("#")[0])
    return [re.match(r"[A-Za-z0-9._-]+", a).group(0) for a in args
            if not a.startswith(("-", "@", "git+", "http")) and re.match(r"[A-Za-z0-9]", a)]


def test_every_install_line_names_the_project():
    """`msopt` on the package index is an unrelated project: every chapter's install cell, the landing page and the
    README install the project's own distribution (the cells from the repository, with the book extra)."""
    import tomllib
    project = _normalized(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])
    assert project != "msopt"
    src = lambda c: c["source"] if isinstance(c["source"], str) else "".join(c["source"])  # noqa: E731
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            for line in src(cell).splitlines():
                if "!pip install" in line:                                    # a Colab install cell
                    assert [_normalized(r) for r in _requirements(line)] == [project], (path.name, line)
                    assert "[book] @ git+https://github.com/msopt/msopt" in line, (path.name, line)
                elif path.stem == "index" and "pip install" in line:          # the landing page's instructions
                    names = [_normalized(r) for r in _requirements(line)]
                    assert names and all(n == project for n in names if n.startswith("msopt")), (path.name, line)
    readme = [ln for ln in (ROOT / "README.md").read_text().splitlines() if "pip install" in ln]
    assert readme
    for line in readme:
        names = [_normalized(r) for r in _requirements(line)]
        assert all(n == project for n in names if n.startswith("msopt")), line
