"""The benchmark scripts run end to end at toy sizes and print the JSON line BENCHMARKS.md is made from (no speed is
asserted: speed is measured by the scripts, never in a unit test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def json_line(stdout: str, benchmark: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    found = [d for d in lines if d.get("benchmark") == benchmark]
    assert found, f"no JSON line of {benchmark} in:\n{stdout[-2000:]}"
    return found[0]


def test_train_throughput_prints_a_ratio():
    d = json_line(run_script("train_throughput.py", "--steps", "1", "--warmup", "0", "--batch", "2",
                             "--seq-len", "16"), "train_throughput")
    assert d["msopt_tokens_per_s"] > 0 and d["transformers_tokens_per_s"] > 0
    assert d["ratio"] == pytest.approx(d["msopt_tokens_per_s"] / d["transformers_tokens_per_s"], rel=1e-2)
    assert d["config"]["batch"] == 2 and d["config"]["seq_len"] == 16


def test_profile_step_splits_the_step_into_phases():
    out = run_script("profile_step.py", "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "16",
                     "--ops", "5")
    d = json_line(out, "profile_step")
    for name in ("msopt", "transformers"):
        phases = d["median_ms"][name]
        assert set(phases) == {"forward", "backward", "optimizer", "step"}
        assert all(v > 0 for v in phases.values())
        assert phases["step"] == pytest.approx(phases["forward"] + phases["backward"] + phases["optimizer"],
                                               abs=0.05)
    assert "load_avg_at_start" in d
    assert "aten::" in out                                  # the operator table of --ops
