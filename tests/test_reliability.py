"""Reliability: exact resume after a real crash (SIGKILL), crash-safe checkpoints, no pickle anywhere, clear errors."""
import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import msopt
from msopt.models import GPT, GPTConfig
from msopt.train import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

PACKAGE = Path(msopt.__file__).parent

# A child process trains a small GPT with dropout (so every RNG matters) and checkpoints every 5 steps. It can kill
# itself with SIGKILL before step `kill_at` (a real crash: no exception, no cleanup), or stall while writing the
# checkpoint of step `stall_at` so that the parent can kill it mid-write.
CHILD = textwrap.dedent('''
    import json, os, signal, sys, time
    import numpy as np, torch
    import msopt.train as train
    from msopt.data import RandomBlocks
    from msopt.models import GPT, GPTConfig
    from msopt.objectives import clm_batch_loss

    out, kill_at, stall_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fsync = train._fsync
    def slow_fsync(path):
        if f".tmp-step-{stall_at:08d}" in str(path):
            time.sleep(60)
        fsync(path)
    train._fsync = slow_fsync
    ids = (np.cumsum(np.random.default_rng(0).integers(1, 3, 5000)) % 64).astype(np.uint16)
    torch.manual_seed(123)                                   # the resumed process builds a model from other weights
    model = GPT(GPTConfig.tiny(64, n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.1))
    die = lambda t: os.kill(os.getpid(), signal.SIGKILL) if t.step == kill_at else None
    config = train.TrainConfig(steps=30, lr=3e-3, warmup_steps=3, ckpt_every=5, keep_ckpts=10, progress=False)
    trainer = train.Trainer(model, clm_batch_loss, RandomBlocks(ids, 16, 8, seed=1), config, out_dir=out,
                            callbacks=[die])
    history = trainer.fit()
    json.dump(history.series("train_loss"), open(os.path.join(out, "losses.json"), "w"))
''')


def child(tmp_path, out, kill_at=-1, stall_at=-1, wait=True):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(kill_at), str(stall_at)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        proc.wait(timeout=300)
    return proc


def test_sigkill_then_resume_gives_bitwise_equal_losses(tmp_path):
    ref = child(tmp_path, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr.read().decode()[-2000:]
    crashed = child(tmp_path, tmp_path / "run", kill_at=17)
    assert crashed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run" / "ckpt").name == "step-00000015"
    resumed = child(tmp_path, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr.read().decode()[-2000:]
    full = json.loads((tmp_path / "ref" / "losses.json").read_text())
    again = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert again == full and len(full[1]) == 30                     # == on floats: bitwise equal


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    proc = child(tmp_path, tmp_path / "run", stall_at=10, wait=False)
    tmp = tmp_path / "run" / "ckpt" / ".tmp-step-00000010"
    deadline = time.time() + 240
    while not (tmp / "rng.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert tmp.exists(), "the child never started writing the checkpoint of step 10"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    latest = latest_checkpoint(tmp_path / "run" / "ckpt")
    assert latest.name == "step-00000005"                           # the half-written step 10 is not taken
    model = GPT(GPTConfig.tiny(64, n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.1))
    assert load_checkpoint(latest, model)["step"] == 5


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(64, n_layer=1, n_head=2, n_embd=32, block_size=16))


def test_a_corrupted_checkpoint_gives_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "step-1", small_model(), state={"step": 1})
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum|SHA|manifest") as e:
        load_checkpoint(path, small_model())
    assert "\n" not in str(e.value)


class Payload:
    "A pickle that runs code when loaded."
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_malicious_pickle_offered_as_a_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "step-1", small_model(), state={"step": 1})
    (path / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, small_model())
    # even with a manifest that matches it, the pickle is never unpickled: safetensors cannot execute code
    meta = json.loads((path / "state.json").read_text())
    import hashlib
    meta["manifest"]["model.safetensors"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(Exception) as e:
        load_checkpoint(path, small_model())
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()
    assert "\n" not in str(e.value).strip()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_no_pickle_in_the_package():
    "Every torch.load passes weights_only=True; nothing imports pickle, dill or joblib, or lets numpy allow_pickle."
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports pickle")
        for call in _calls(tree):
            name = ast.unparse(call.func)
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                if kw.get("weights_only") != "True":
                    offenders.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
            if kw.get("allow_pickle") == "True":
                offenders.append(f"{path.name}:{call.lineno} allow_pickle=True")
    assert not offenders, offenders
