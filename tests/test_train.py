import json
import math
import sys

import pytest
import torch
from torch import nn

from msopt.core import lm_logits, to_model_device
from msopt.train import (
    Callback,
    CheckpointError,
    History,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

V, T, B = 16, 12, 8


class Bigram(nn.Module):
    "A small language model with dropout (so resume must restore the RNG) and a 1-D parameter (a norm)."
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.norm = nn.LayerNorm(32)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(32, V)

    def forward(self, x):
        return self.head(self.drop(self.norm(self.emb(x))))


def batch(i):
    "A deterministic batch: next token = (token + 1) mod V, so the loss can fall to ~0."
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, V, (B, T), generator=g)
    return x, (x + 1) % V


VAL = [batch(-k) for k in range(1, 3)]


def loss_fn(model, b):
    x, y = to_model_device(model, b)
    return nn.functional.cross_entropy(lm_logits(model(x)).flatten(0, 1), y.flatten())


def make(tmp=None, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(**{"steps": 30, "lr": 1e-2, "warmup_steps": 3, "eval_every": 10, "progress": False, **kw})
    return Trainer(Bigram(), loss_fn, batch, cfg, val_data=VAL, out_dir=tmp)


def test_loss_falls():
    h = make().fit()
    assert h.val_loss < 0.5 * h.series("val_loss")[1][0]
    assert h.series("val_loss")[0] == [0, 10, 20, 30]


def test_optimizer_and_schedule_by_name():
    t = make(optimizer="sgd", schedule="constant", warmup_steps=0, steps=5)
    assert isinstance(t.optimizer, torch.optim.SGD)
    t.fit()
    assert [r["lr"] for r in t.history.rows if "lr" in r] == [1e-2] * 5
    t = make(optimizer="muon", steps=5)
    assert type(t.optimizer).__name__ == "Muon"
    assert t.fit().val_loss < t.history.series("val_loss")[1][0]
    h = make(schedule="cosine", warmup_steps=3, steps=30).fit()
    lrs = h.series("lr")[1]
    assert lrs[0] == pytest.approx(1e-2 / 3) and lrs[2] == pytest.approx(1e-2) and lrs[-1] < 2e-3


def test_resume_is_exact(tmp_path):
    full = make().fit()
    make(tmp_path, ckpt_every=5).fit(stop_at=17)       # "crashes" after step 17
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000017"
    resumed = make(tmp_path, ckpt_every=5).fit()        # a fresh process would build the same objects
    assert resumed.series("train_loss") == full.series("train_loss")
    assert len(full.series("train_loss")[1]) == 30
    assert resumed.series("val_loss") == full.series("val_loss")


def test_grad_accum_equals_big_batch():
    def big(i):
        a, b = batch(2 * i), batch(2 * i + 1)
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    torch.manual_seed(0)
    m1, m2 = Bigram(), Bigram()
    m2.load_state_dict(m1.state_dict())
    for m in (m1, m2):
        m.drop.p = 0.0
    cfg = dict(steps=3, lr=1e-2, warmup_steps=0, progress=False)
    Trainer(m1, loss_fn, batch, TrainConfig(grad_accum=2, **cfg)).fit()
    Trainer(m2, loss_fn, big, TrainConfig(**cfg)).fit()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_nonfinite_loss_raises_with_step_and_stage():
    def bad(model, b):
        return loss_fn(model, b) * (float("nan") if trainer.step == 4 else 1.0)
    trainer = Trainer(Bigram(), bad, batch, TrainConfig(steps=10, progress=False), name="pretrain-clm")
    with pytest.raises(NonFiniteLossError, match="at step 4 of stage 'pretrain-clm'"):
        trainer.fit()


def test_nonfinite_loss_skip():
    def bad(model, b):
        return loss_fn(model, b) * (float("inf") if trainer.step in (2, 3) else 1.0)
    trainer = Trainer(Bigram(), bad, batch, TrainConfig(steps=8, progress=False, on_nonfinite="skip"))
    h = trainer.fit()
    assert trainer.skipped == 2 and math.isfinite(h.rows[-1]["train_loss"])


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    t = make()
    t.fit(stop_at=3)
    path = save_checkpoint(tmp_path / "step-1", t.model, t.optimizer, {"k": 1})
    m = Bigram()
    assert load_checkpoint(path, m) == {"k": 1}
    for a, b in zip(m.state_dict().values(), t.model.state_dict().values()):
        assert torch.equal(a, b.cpu())
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        load_checkpoint(path, m)
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_checkpoint(tmp_path / "nowhere", m)


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    t = make()
    save_checkpoint(tmp_path / "step-00000001", t.model, t.optimizer, {"step": 1})
    (tmp_path / ".tmp-step-00000002").mkdir()              # a write that died before its rename
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), Bigram())["step"] == 1


def test_checkpoint_files_are_not_pickle(tmp_path):
    t = make(tmp_path)
    t.fit(stop_at=2)
    ck = latest_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                                     "state.json"]
    json.loads((ck / "state.json").read_text())


def test_hf_model_trains():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=1, n_head=2))
    h = Trainer(hf, loss_fn, batch, TrainConfig(steps=25, lr=3e-3, warmup_steps=2, eval_every=25, progress=False),
                val_data=VAL).fit()
    assert h.val_loss < h.series("val_loss")[1][0] - 0.5


def test_history_plot_and_series():
    h = History()
    h.log(step=0, val_loss=3.0)
    h.log(step=1, train_loss=2.5)
    h.log(step=1, val_loss=2.0)
    assert h.series("val_loss") == ([0, 1], [3.0, 2.0]) and len(h.rows) == 2
    import matplotlib
    matplotlib.use("Agg")
    assert h.plot().get_xlabel() == "step"


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "TrainConfig.steps must be a positive int"),
    (dict(lr=-1.0), "TrainConfig.lr must be a positive number"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(on_nonfinite="ignore"), "unknown on_nonfinite 'ignore'"),
    (dict(optimizer="adagrad"), "unknown optimizer 'adagrad'"),
    (dict(schedule="exp"), "unknown schedule 'exp'"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_bad_train_data_and_fp16_on_cpu():
    with pytest.raises(TypeError, match="train_data must be callable"):
        Trainer(Bigram(), loss_fn, [1, 2, 3])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
            Trainer(Bigram(), loss_fn, batch, TrainConfig(precision="fp16", device="cpu"))


def test_bf16_autocast_on_cpu_trains():
    h = make(precision="bf16", steps=10, eval_every=5).fit()
    first, last = h.series("val_loss")[1][0], h.val_loss
    assert math.isfinite(last) and last < first - 0.1, (first, last)


def test_evaluate_weights_batches_by_size():
    t = make()
    x, y = batch(0)
    short = (x[:2], y[:2])
    t.val_data = [(x, y), short]
    t.model.eval()
    with torch.no_grad():
        expected = (loss_fn(t.model, (x, y)) * x.numel() + loss_fn(t.model, short) * short[0].numel()) / (
            x.numel() + short[0].numel())
    assert t.evaluate() == pytest.approx(expected.item(), rel=1e-6)
    t.val_data = []
    with pytest.raises(ValueError, match="val_data yielded no batches"):
        t.evaluate()


def test_callbacks_run_before_every_step_and_after_resume(tmp_path):
    "A step-driven callback (freeze the embedding until step 10) makes the same calls in a resumed run."
    def freeze_until_10(trainer):
        trainer.model.emb.weight.requires_grad_(trainer.step >= 10)

    def run(tmp=None, stop_at=None):
        torch.manual_seed(0)
        model = Bigram()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        seen = []
        t = Trainer(model, loss_fn, batch, TrainConfig(steps=20, warmup_steps=0, progress=False, ckpt_every=5),
                    out_dir=tmp, optimizer=opt, callbacks=[freeze_until_10, lambda tr: seen.append(tr.step)])
        w0 = model.emb.weight.detach().clone()
        t.fit(stop_at=stop_at)
        return t, seen, w0

    t, seen, w0 = run()
    assert seen == list(range(20))
    full = t.history.series("train_loss")
    t2, _, _ = run(tmp_path, stop_at=7)
    assert torch.equal(t2.model.emb.weight, w0)                  # frozen before step 10
    t3, seen3, _ = run(tmp_path)
    assert seen3 == list(range(7, 20))
    assert t3.history.series("train_loss") == full


def test_to_model_device_follows_the_parameters():
    class NoParams(nn.Module):
        def forward(self, x):
            return x
    x, y = batch(0)
    assert to_model_device(NoParams(), (x, y)) == (x, y) and to_model_device(lambda x: x, (x, y)) == (x, y)
    moved = to_model_device(Bigram().to(torch.float64), {"x": x, "pair": [y]})
    assert moved["x"].device == x.device and torch.equal(moved["pair"][0], y)
    if torch.cuda.is_available():
        gx, gy = to_model_device(Bigram().cuda(), (x, y))
        assert gx.is_cuda and gy.is_cuda


# -- model selection ------------------------------------------------------------------------------------------------
def overfit_batch(i):
    "Training data that disagrees with the validation data: the longer the run, the worse the validation loss."
    x, _ = batch(i % 2)
    return x, (x + 2) % V


VAL_RISES = [(batch(-1)[0], (batch(-1)[0] + 1) % V)]


def _mixed(i):
    "First the validation rule (the model improves on VAL), then a contradicting rule (it gets worse)."
    return batch(i) if i < 15 else overfit_batch(i)


def selection_run(tmp=None, stop_at=None, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(**{"steps": 40, "lr": 2e-2, "warmup_steps": 0, "eval_every": 5, "progress": False,
                         "schedule": "constant", "ckpt_every": 5, **kw})
    t = Trainer(Bigram(), loss_fn, _mixed, cfg, val_data=VAL_RISES, out_dir=tmp)
    t.fit(stop_at=stop_at)
    return t


def test_keep_best_restores_the_weights_of_the_best_evaluation(tmp_path):
    last = selection_run()                                        # no selection: ends on the last step's weights
    steps, vals = last.history.series("val_loss")
    best_step = steps[vals.index(min(vals))]
    assert 0 < best_step < 40 and vals[-1] > min(vals) + 0.5, (steps, vals)   # the run does over-fit
    for tmp in (None, tmp_path):                                  # best kept in memory, and on disk
        kept = selection_run(tmp, keep_best=True)
        assert kept.best == {"step": best_step, "value": min(vals)}
        assert kept.evaluate() == pytest.approx(min(vals), rel=1e-6)
    reference = selection_run(stop_at=best_step)                 # the weights of the best step, trained directly
    for a, b in zip(kept.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_stops_and_resumes_exactly(tmp_path):
    full = selection_run(keep_best=True, patience=2)
    assert full.stopped and full.step < 40
    assert full.step == full.best["step"] + 2 * 5                  # two evaluations without improvement
    selection_run(tmp_path, keep_best=True, patience=2, stop_at=full.best["step"] + 5)
    resumed = selection_run(tmp_path, keep_best=True, patience=2)
    assert resumed.stopped and resumed.step == full.step and resumed.best == full.best
    assert resumed.history.rows == full.history.rows or (
        [r["train_loss"] for r in resumed.history.rows if "train_loss" in r]
        == [r["train_loss"] for r in full.history.rows if "train_loss" in r])
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    again = selection_run(tmp_path, keep_best=True, patience=2)   # a finished, stopped run: nothing more to do
    assert again.step == full.step


def test_select_by_a_metric_and_its_errors():
    calls = []
    def metrics(model):
        calls.append(model.training)
        return {"agreement": -float(loss_fn(model, VAL_RISES[0]))}
    torch.manual_seed(0)
    cfg = TrainConfig(steps=40, lr=2e-2, warmup_steps=0, eval_every=5, progress=False, schedule="constant",
                      keep_best=True, select_by="agreement")
    t = Trainer(Bigram(), loss_fn, _mixed, cfg, val_data=VAL_RISES, metrics=metrics)
    t.fit()
    assert not any(calls), "metrics run in eval mode"
    ref = selection_run(keep_best=True)
    assert t.best["step"] == ref.best["step"] and t.best["value"] == pytest.approx(-ref.best["value"], rel=1e-5)
    with pytest.raises(ValueError, match="select_by='accuracy' needs metrics="):
        Trainer(Bigram(), loss_fn, batch, TrainConfig(keep_best=True, select_by="accuracy"), val_data=VAL)
    with pytest.raises(ValueError, match="keep_best and patience select by val_loss: give val_data="):
        Trainer(Bigram(), loss_fn, batch, TrainConfig(patience=3))
    with pytest.raises(ValueError, match="TrainConfig.patience must be a positive int, got 0"):
        TrainConfig(patience=0)


def test_one_host_sync_per_step_plus_evaluations(monkeypatch):
    "fit() reads values from the device once per optimizer step (loss and norm together) and once per evaluation."
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        def counted(self, *a, _original=original, **kw):
            caller = sys._getframe(1).f_code.co_filename          # msopt's code and this test's loss, not torch's
            counts["n"] += "msopt" in caller or "tests" in caller  # (AdamW reads its CPU step counters itself)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    t = make(steps=12, eval_every=4, grad_accum=2)
    t.fit()
    evaluations = len(t.history.series("val_loss")[0])           # steps 0, 4, 8, 12
    assert counts["n"] <= 12 + evaluations, counts


def test_callback_events_and_training_mode_after_an_error():
    events = []
    class Recorder(Callback):
        def on_fit_begin(self, trainer): events.append("begin")
        def on_step_end(self, trainer, row): events.append(("step", row["step"], "val_loss" in row))
        def on_evaluate(self, trainer, row): events.append(("eval", row["step"]))
        def on_fit_end(self, trainer): events.append("end")
    t = make(steps=4, eval_every=2)
    t.callbacks = [Recorder()]
    t.fit()
    assert events == ["begin", ("eval", 0), ("step", 1, False), ("eval", 2), ("step", 2, True), ("step", 3, False),
                      ("eval", 4), ("step", 4, True), "end"]
    def failing(model, b):
        raise RuntimeError("boom")
    t = make(steps=4)
    t.model.train()
    t.loss_fn = failing
    with pytest.raises(RuntimeError, match="boom"):
        t.evaluate()
    assert t.model.training, "evaluate puts the model back in train mode after an error"
