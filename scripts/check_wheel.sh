#!/usr/bin/env bash
# Build the wheel of the distribution msopt-lm, install it with its runtime dependencies only into a fresh venv, and
# use it there with the network blocked: import the package (no nbdev, no Jupyter, no hub), then run the `msopt`
# command it installs on a shipped tiny config. Usage: scripts/check_wheel.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/msopt_lm-*.whl)
# ask zipfile itself: `zipfile -l | grep -q` fails under pipefail when grep exits before the listing is written
$PY -c 'import sys, zipfile; sys.exit("msopt/assets/shakespeare.json.xz" not in zipfile.ZipFile(sys.argv[1]).namelist())' \
    "$wheel" || { echo "the wheel lacks the corpus"; exit 1; }
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q -c constraints.txt "$wheel"
cd "$work"
mkdir "$work/offline"
cat > "$work/offline/sitecustomize.py" <<'PY'
import socket

def no_network(*args, **kwargs):
    raise OSError("msopt tried to use the network")

socket.socket.connect = no_network
PY
export PYTHONPATH="$work/offline"
"$work/venv/bin/python" - <<'PY'
import importlib.util
import socket
import sys
assert socket.socket.connect.__name__ == "no_network", "the network is not blocked"
for banned in ("nbdev", "jupyter_core", "ipykernel", "jupyter_book"):
    assert importlib.util.find_spec(banned) is None, f"{banned} is installed with the runtime dependencies"
import msopt, msopt.core, msopt.data, msopt.models, msopt.train, msopt.stages, msopt.pipeline, msopt.generate
import msopt.metrics, msopt.adapters, msopt.cli, msopt.config, msopt.loggers
assert "site-packages" in msopt.__file__, msopt.__file__
assert "matplotlib" not in sys.modules, "importing msopt imported matplotlib"
docs = msopt.data.load_corpus("shakespeare")
assert len(docs) == 42, len(docs)
print(f"msopt {msopt.__version__}: wheel installs and imports offline without nbdev or Jupyter; {len(docs)} works")
PY
"$work/venv/bin/msopt" --help > /dev/null
"$work/venv/bin/msopt" run "$repo/configs/pretrain_tiny.toml" --out "$work/run" --set stages.0.steps=4 \
    --set stages.0.eval_every=2 --set train.progress=false > "$work/run.log" 2>&1 || { cat "$work/run.log"; exit 1; }
for f in report.md metrics.jsonl model.safetensors model.json tokenizer.json config.resolved.toml; do
    test -f "$work/run/$f" || { echo "msopt run wrote no $f"; cat "$work/run.log"; exit 1; }
done
echo "msopt command: --help and a tiny run of configs/pretrain_tiny.toml work offline in the fresh venv"
