import numpy as np
import pytest
import torch

from msopt.models import GPT, GPTConfig
from msopt.pipeline import Pipeline, Report
from msopt.stages import Pretrain, Stage, check_fits, clm_batch_loss, context_length, vocab_size

V = 32


def ids(n, seed=0):
    "A learnable stream: mostly token t+1 after token t."
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.integers(1, 3, n)) % V
    return x.astype(np.uint16)


TRAIN, VAL = ids(4000), ids(600, seed=1)
KW = dict(train=TRAIN, val=VAL, seq_len=16, batch_size=8, steps=40, lr=3e-3, warmup_steps=4, eval_every=20,
          progress=False)


def model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(V, n_layer=1, n_embd=32, n_head=2, block_size=16))


def test_pretrain_lowers_val_loss(tmp_path):
    report, history = Pretrain("clm", **KW).run(model(), tmp_path)
    first = history.series("val_loss")[1][0]
    assert report["val_loss"] < first - 1.0 and report["steps"] == 40
    assert report["val_ppl"] == pytest.approx(np.exp(report["val_loss"]))
    assert report["tokens"] == 40 * 8 * 16


def test_pipeline_skips_finished_stages(tmp_path):
    stages = [Pretrain("clm", **KW), Pretrain("clm", **{**KW, "steps": 20, "lr": 1e-3})]
    stages[1].name = "pretrain-clm-again"
    m1 = model()
    rep = Pipeline(stages, tmp_path).run(m1)
    assert isinstance(rep, Report) and [r["skipped"] for r in rep.rows] == [False, False]
    assert "| pretrain-clm |" in rep.table()
    m2 = model(seed=5)
    rep2 = Pipeline(stages, tmp_path).run(m2)
    assert [r["skipped"] for r in rep2.rows] == [True, True]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert rep2.histories[0].series("val_loss") == rep.histories[0].series("val_loss")


def test_pipeline_refuses_changed_stage(tmp_path):
    Pipeline([Pretrain("clm", **KW)], tmp_path).run(model())
    with pytest.raises(ValueError, match="was run with another configuration"):
        Pipeline([Pretrain("clm", **{**KW, "lr": 1e-2})], tmp_path).run(model())
    rep = Pipeline([Pretrain("clm", **{**KW, "lr": 1e-2})], tmp_path).run(model(), fresh=True)
    assert not rep.rows[0]["skipped"]


def test_pipeline_resumes_an_interrupted_stage(tmp_path, monkeypatch):
    import msopt.stages as st
    full = Pipeline([Pretrain("clm", **KW)], tmp_path / "a").run(model())
    pipe = Pipeline([Pretrain("clm", **{**KW, "ckpt_every": 10})], tmp_path / "b")
    calls, original = {"n": 0}, st.clm_batch_loss

    def crashing_loss(m, batch):                  # 5 evaluation batches at step 0, then one call per step
        calls["n"] += 1
        if calls["n"] == 30:                      # dies inside step 25, after the checkpoint of step 20
            raise KeyboardInterrupt
        return original(m, batch)

    monkeypatch.setattr(st, "clm_batch_loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        pipe.run(model())
    monkeypatch.undo()
    assert not (tmp_path / "b" / "00-pretrain-clm" / "report.json").exists()
    resumed = pipe.run(model(seed=9))
    assert resumed.histories[0].series("train_loss") == full.histories[0].series("train_loss")


def test_hf_model_through_a_stage(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    assert context_length(hf) == 16 and vocab_size(hf) == V
    report, _ = Pretrain("clm", **KW).run(hf, tmp_path)
    assert report["val_loss"] < np.log(V) - 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="unknown objective 'clmm'"):
        Pretrain("clmm", train=TRAIN)
    with pytest.raises(ValueError, match="Pretrain needs train= token ids"):
        Pretrain("clm", train=np.array([], dtype=np.uint16))
    with pytest.raises(ValueError, match="block size seq_len=32 exceeds the model's context length 16"):
        check_fits(model(), TRAIN, 32)
    with pytest.raises(ValueError, match="tokenizer and model vocabularies differ"):
        check_fits(model(), np.array([0, 1, V + 3]), 8)
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([], "x")
    with pytest.raises(TypeError, match="pipeline stages must be Stages"):
        Pipeline([object()], "x")
    assert issubclass(Pretrain, Stage)
