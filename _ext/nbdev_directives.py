"""Hide nbdev's `#|` directives in the rendered book.

Jupyter Book shows a code cell's source verbatim, so nbdev's directives (`#| export`, `#| hide`, ...) would appear on
every page. This extension rewrites each notebook as Sphinx reads it, before myst-nb parses (and executes) it:

- every `#|` line is removed from the cell's source;
- `#| default_exp` and `#| hide` cells are executed but removed from the page (tag `remove-cell`);
- `#| echo: false` hides the input, `#| output: false` the output;
- `#| eval: false` cells are shown but not executed (tag `skip-execution`).
"""
import json

_TAGS = {"hide": "remove-cell", "default_exp": "remove-cell", "echo: false": "remove-input",
         "output: false": "remove-output", "eval: false": "skip-execution"}


def _directives(lines):
    return [line[2:].strip() for line in lines if line.startswith("#|")]


def clean_notebook(nb: dict) -> dict:
    "Strip nbdev directives from a notebook (as a dict) and turn them into myst-nb tags."
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = cell["source"]
        lines = src.splitlines(keepends=True) if isinstance(src, str) else list(src)
        found = _directives(lines)
        if not found:
            continue
        tags = [tag for d in found for key, tag in _TAGS.items() if d == key or d.startswith(key + " ")]
        if tags:
            meta_tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            meta_tags += [t for t in dict.fromkeys(tags) if t not in meta_tags]
        kept = [line for line in lines if not line.startswith("#|")]
        if kept:
            kept[-1] = kept[-1].rstrip("\n")
        cell["source"] = "".join(kept)
    return nb


def _on_source_read(app, docname, source):
    path = app.env.doc2path(docname)
    if not str(path).endswith(".ipynb"):
        return
    source[0] = json.dumps(clean_notebook(json.loads(source[0])))


def setup(app):
    app.connect("source-read", _on_source_read)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
