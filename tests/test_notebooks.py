"""Execute every chapter in the tiny profile, as CI does: a failure names the chapter; wall times are listed last."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from execute_nb import execute  # noqa: E402

NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
BUDGET_S = 90  # each chapter's budget in the tiny profile on a 2-core CPU (the summary lists every chapter's time)
LIMIT_S = 2 * BUDGET_S  # fail only far over it: the guard is against a chapter doing much more than tiny work


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_tiny_profile(path, tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("MSOPT_RUNS", str(tmp_path / "runs"))
    _, seconds = execute(path, profile="tiny", timeout=600)
    record_property("chapter_wall_s", seconds)
    if seconds > LIMIT_S:
        pytest.fail(f"{path.stem} took {seconds:.0f} s in the tiny profile, far over its {BUDGET_S} s budget")
