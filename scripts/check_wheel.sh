#!/usr/bin/env bash
# Build the wheel, install it with its runtime dependencies only into a fresh venv, and import the package there
# with the network blocked: no nbdev, no Jupyter, no hub. Usage: scripts/check_wheel.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/msopt-*.whl)
$PY -m zipfile -l "$wheel" | grep -q "msopt/assets/shakespeare.json.xz" || { echo "the wheel lacks the corpus"; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q -c constraints.txt "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.util, socket

def no_network(*args, **kwargs):
    raise OSError("msopt tried to use the network at import")

socket.socket.connect = no_network
import sys
for banned in ("nbdev", "jupyter_core", "ipykernel", "jupyter_book"):
    assert importlib.util.find_spec(banned) is None, f"{banned} is installed with the runtime dependencies"
import msopt, msopt.core, msopt.data, msopt.models, msopt.train, msopt.stages, msopt.pipeline, msopt.generate
import msopt.metrics, msopt.adapters
assert "site-packages" in msopt.__file__, msopt.__file__
assert "matplotlib" not in sys.modules, "importing msopt imported matplotlib"
docs = msopt.data.load_corpus("shakespeare")
assert len(docs) == 42, len(docs)
print(f"msopt {msopt.__version__}: wheel installs and imports offline without nbdev or Jupyter; {len(docs)} works")
PY
