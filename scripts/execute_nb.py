"""Execute chapters in a given profile and (optionally) write their outputs back.

    python scripts/execute_nb.py nbs/06_pretraining.ipynb --profile small --write

The committed outputs of the book are made this way; the tests execute every notebook the same way in the `tiny`
profile without writing anything back.
"""
import argparse
import copy
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def collapse_streams(nb):
    """Merge consecutive stream outputs of a cell and apply carriage returns as a terminal would, so a progress bar
    is stored as its final line rather than as hundreds of fragments."""
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        merged = []
        for out in cell.outputs:
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = "\n".join(line.rstrip("\r").split("\r")[-1] for line in out.text.split("\n"))
        cell.outputs = merged
    return nb


def execute(path, profile="tiny", timeout=900, write=False):
    "Execute the notebook at `path` with MSOPT_PROFILE=`profile`; return (notebook, seconds)."
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("MSOPT_PROFILE")
    os.environ["MSOPT_PROFILE"] = profile
    try:
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
    finally:
        if old is None:
            os.environ.pop("MSOPT_PROFILE", None)
        else:
            os.environ["MSOPT_PROFILE"] = old
    if write:
        nbformat.write(drop_timing(collapse_streams(copy.deepcopy(nb))), path)
    return nb, seconds


def drop_timing(nb):
    "Remove the per-cell timestamps nbclient records (`metadata.execution`): noise in a committed notebook."
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    return nb


def cell_seconds(nb):
    "[(seconds, cell id, first line)] of the executed code cells, from the timing nbclient records, slowest first."
    out = []
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        t = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in t and "shell.execute_reply" in t:
            start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            out.append(((end - start).total_seconds(), cell.get("id", "?"), cell.source.split("\n")[0][:60]))
    return sorted(out, reverse=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--profile", default="tiny", choices=["tiny", "small", "full"])
    ap.add_argument("--write", action="store_true", help="write the outputs back into the notebook")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    ap.add_argument("--slowest", type=int, default=0, metavar="N", help="also print the N slowest cells")
    args = ap.parse_args()
    for nb_path in args.notebooks:
        nb, secs = execute(nb_path, args.profile, args.timeout, args.write)
        print(f"{nb_path}: {secs:.1f} s in profile {args.profile}", file=sys.stderr)
        for cell_secs, cell_id, first in cell_seconds(nb)[:args.slowest]:
            print(f"  {cell_secs:7.1f} s  cell {cell_id}  {first}", file=sys.stderr)
