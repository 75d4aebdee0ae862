"""Data-parallel training with the Trainer: 2 CPU processes (gloo) started by torchrun, against a 1-process run.

Run as a script (`python tests/test_distributed.py MODE OUT`), this file is the worker each torchrun process runs."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig
from msopt.train import TrainConfig, Trainer, full_state, latest_checkpoint, load_checkpoint, save_checkpoint

V, T, B = 64, 16, 8


def batch(i):
    "Global micro-batch i: a pure function of i."
    g = torch.Generator().manual_seed(i)
    x = torch.randint(0, V, (B, T), generator=g)
    return x, torch.roll(x, -1, 1)


VAL = [batch(-k) for k in (1, 2)]


def new_model():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(V, n_layer=2, n_embd=32, n_head=2, block_size=T))


def loss_fn(model, b):
    return clm_loss(model(b[0]), b[1])


def config(**kw):
    return TrainConfig(**{**dict(steps=4, lr=1e-2, warmup_steps=1, grad_accum=2, eval_every=2, ckpt_every=2,
                                 progress=False, device="cpu"), **kw})


def losses(history):
    return {"train": history.series("train_loss"), "val": history.series("val_loss")}


def worker(mode: str, out: Path) -> None:
    "What each torchrun process runs; rank 0 writes the results to out/MODE.json."
    result = {}
    if mode == "ddp":
        trainer = Trainer(new_model(), loss_fn, batch, config(distributed="ddp"), val_data=VAL, out_dir=out / "ddp")
        result["ddp"] = losses(trainer.fit())
        result["tokens"] = trainer.tokens
    else:
        trainer = Trainer(new_model(), loss_fn, batch, config(distributed="fsdp"), val_data=VAL,
                          out_dir=out / "from_single")            # holds the 1-process checkpoint of step 2
        result["from_single"] = losses(trainer.fit())
        Trainer(new_model(), loss_fn, batch, config(distributed="fsdp"), val_data=VAL, out_dir=out / "fsdp").fit(
            stop_at=2)
        trainer = Trainer(new_model(), loss_fn, batch, config(distributed="fsdp"), val_data=VAL, out_dir=out / "fsdp")
        result["fsdp"] = losses(trainer.fit())
    result["world_size"] = trainer.dist.world_size
    if trainer.dist.main:
        (out / f"{mode}.json").write_text(json.dumps(result))


def torchrun(mode: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, mode,
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / f"{mode}.json").read_text())


def close(a, b, rel=1e-4):
    return a[0] == b[0] and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-6) for x, y in zip(a[1], b[1]))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    "The reference: one process, the whole global batch, checkpoints at steps 2 and 4."
    out = tmp_path_factory.mktemp("single")
    model = new_model()
    history = Trainer(model, loss_fn, batch, config(distributed="none"), val_data=VAL, out_dir=out).fit()
    return {"out": out, "model": model, "losses": losses(history)}


def test_ddp_matches_single_process(single, tmp_path):
    result = torchrun("ddp", tmp_path)
    assert result["world_size"] == 2
    ref = single["losses"]
    assert close(result["ddp"]["train"], ref["train"]) and close(result["ddp"]["val"], ref["val"])
    assert result["tokens"] == 4 * 2 * B * T                     # global tokens: steps x grad_accum x batch
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "ckpt").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]            # rank 0 alone writes; no temporary left over


def test_fsdp_checkpoints_load_across_world_sizes(single, tmp_path):
    step2 = single["out"] / "ckpt" / "step-00000002"
    shutil.copytree(step2, tmp_path / "from_single" / "ckpt" / step2.name)
    result = torchrun("fsdp", tmp_path)
    ref = single["losses"]
    # 1 process -> 2 FSDP processes: resuming the 1-process checkpoint of step 2 continues the 1-process run
    assert close(result["from_single"]["train"], ref["train"]) and close(result["from_single"]["val"], ref["val"])
    # 2 FSDP processes, stopped at step 2 and resumed from their own checkpoint: the same run again
    assert close(result["fsdp"]["train"], ref["train"]) and close(result["fsdp"]["val"], ref["val"])
    # 2 FSDP processes -> 1 process: the gathered checkpoint loads into a plain model and equals the 1-process weights
    final = latest_checkpoint(tmp_path / "fsdp" / "ckpt")
    assert final.name == "step-00000004"
    model = new_model()
    load_checkpoint(final, model, restore_rng=False)
    for (name, a), b in zip(model.state_dict().items(), single["model"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name   # AdamW magnifies float rounding a little
    # ... and a 1-process Trainer resumes the FSDP checkpoint of step 2 and finishes like the 1-process run
    resumed_dir = tmp_path / "to_single"
    shutil.copytree(tmp_path / "fsdp" / "ckpt" / "step-00000002", resumed_dir / "ckpt" / "step-00000002")
    history = Trainer(new_model(), loss_fn, batch, config(distributed="none"), val_data=VAL, out_dir=resumed_dir).fit()
    assert close(history.series("train_loss"), ref["train"]) and close(history.series("val_loss"), ref["val"])


def test_full_state_writes_the_single_process_format(tmp_path):
    model = new_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn(model, batch(0)).backward()
    opt.step()
    save_checkpoint(tmp_path / "module", model, opt)
    weights, state = full_state(model, opt)
    save_checkpoint(tmp_path / "dicts", weights, state)
    a, b = load_file(tmp_path / "module" / "model.safetensors"), load_file(tmp_path / "dicts" / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" in a and "transformer.wte.weight" not in a  # tied: stored once
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(tmp_path / d / "optimizer.safetensors") for d in ("module", "dicts"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    fresh = new_model()
    load_checkpoint(tmp_path / "dicts", fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))


def test_bad_distributed_mode():
    with pytest.raises(ValueError, match="unknown distributed mode 'zero3'"):
        TrainConfig(distributed="zero3")


def test_fsdp_refuses_a_prebuilt_optimizer(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = new_model()
    with pytest.raises(ValueError, match="FSDP shards the parameters"):
        Trainer(model, loss_fn, batch, config(distributed="fsdp"), optimizer=torch.optim.SGD(model.parameters(), 0.1))


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
