import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from msopt.models import GPT, GPTConfig
from msopt.objectives import clm_batch_loss
from msopt.pipeline import Pipeline, Report
from msopt.stages import FineTune, Pretrain, Stage, StageReport, check_fits
from msopt.stages.base import context_length, vocab_size
from msopt.tasks import LabelledTexts

V = 32


def word_tokenizer():
    "A tokenizer of V words: ids 0, 1, 2 are <|endoftext|>, <|pad|>, <|mask|>; the others are t3 ... t31."
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<|mask|>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>", "<|mask|>"])
    return tok


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
    stage = Pretrain("clm", **KW)
    report = stage.run(model(), tmp_path)
    first = stage.history.series("val_loss")[1][0]
    assert isinstance(report, StageReport) and report.best_step == 40
    assert report["val_loss"] < first - 1.0 and report["steps"] == 40
    assert report["val_ppl"] == pytest.approx(np.exp(report["val_loss"]))
    assert report["tokens"] == 40 * 8 * 16


def test_pipeline_skips_finished_stages(tmp_path):
    stages = [Pretrain("clm", **KW), Pretrain("clm", **{**KW, "steps": 20, "lr": 1e-3, "name": "pretrain-clm-again"})]
    m1 = model()
    rep = Pipeline(stages, tmp_path).run(m1)
    assert isinstance(rep, Report) and [r["skipped"] for r in rep.rows] == [False, False]
    assert "| pretrain-clm |" in rep.table()
    m2 = model(seed=5)
    rep2 = Pipeline(stages, tmp_path).run(m2)
    assert [r["skipped"] for r in rep2.rows] == [True, True]
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert rep2.histories[0].series("val_loss") == rep.histories[0].series("val_loss")


def test_pipeline_refuses_changed_stage(tmp_path):
    Pipeline([Pretrain("clm", **KW)], tmp_path).run(model())
    with pytest.raises(ValueError, match=r"stage 0 \(pretrain-clm\) .* was run with something else \(config.lr: "
                                         r"0.003 -> 0.01\)"):
        Pipeline([Pretrain("clm", **{**KW, "lr": 1e-2})], tmp_path).run(model())
    rep = Pipeline([Pretrain("clm", **{**KW, "lr": 1e-2})], tmp_path).run(model(), fresh=True)
    assert not rep.rows[0]["skipped"]


def test_other_data_of_the_same_length_is_not_reused(tmp_path):
    "The fingerprint is of the content: a stream of the same length but other tokens trains again (or is refused)."
    first = Pipeline([Pretrain("clm", **KW)], tmp_path).run(model())
    other = ids(len(TRAIN), seed=7)
    assert len(other) == len(TRAIN) and not np.array_equal(other, TRAIN)
    with pytest.raises(ValueError, match=r"stage 0 \(pretrain-clm\) .*\(data: "):
        Pipeline([Pretrain("clm", **{**KW, "train": other})], tmp_path).run(model())
    again = Pipeline([Pretrain("clm", **{**KW, "train": other})], tmp_path).run(model(), on_change="rerun")
    assert not again.rows[0]["skipped"]
    assert again.histories[0].series("train_loss") != first.histories[0].series("train_loss")


def test_a_change_upstream_reruns_the_stages_below(tmp_path):
    def two(lr):
        return [Pretrain("clm", **{**KW, "lr": lr}), Pretrain("clm", **{**KW, "steps": 10, "name": "second"})]
    Pipeline(two(3e-3), tmp_path).run(model())
    rep = Pipeline(two(1e-2), tmp_path).run(model(), on_change="rerun")
    assert [r["skipped"] for r in rep.rows] == [False, False]      # the second stage's input changed


def texts(n, seed):
    "Passages of two classes: class 0 uses words t3-t16, class 1 words t17-t31."
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).tolist()
    words = [" ".join(f"t{rng.integers(3 + 14 * y, 17 + 15 * y)}" for _ in range(12)) for y in labels]
    return LabelledTexts(words, labels, ["low", "high"])


def test_resumed_pipeline_keeps_the_classifier(tmp_path):
    "A pipeline ending in a classification fine-tune, run twice: the rerun trains nothing and evaluates the same."
    tok, train, val, test = word_tokenizer(), texts(64, 0), texts(32, 1), texts(40, 2)
    def stages():
        return [Pretrain("clm", **KW),
                FineTune("classify", train=train, val=val, tokenizer=tok, seq_len=16, batch_size=8, steps=30,
                         lr=3e-3, warmup_steps=0, eval_every=10, keep_best=True, select_by="accuracy",
                         progress=False)]
    first_stages = stages()
    rep = Pipeline(first_stages, tmp_path).run(model())
    acc = first_stages[1].evaluate(test)["accuracy"]
    assert acc > 0.8 and rep.rows[1]["accuracy"] == first_stages[1].evaluate(val)["accuracy"]
    again = stages()
    rep2 = Pipeline(again, tmp_path).run(model(seed=3))
    assert [r["skipped"] for r in rep2.rows] == [True, True]
    assert again[1].evaluate(test)["accuracy"] == acc
    assert rep2.model is again[1].model and torch.equal(rep2.model.head.weight, rep.model.head.weight)


def test_pipeline_resumes_an_interrupted_stage(tmp_path, monkeypatch):
    import msopt.stages.pretrain as st
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


def test_pipeline_interrupted_in_stage_2_resumes_at_stage_2(tmp_path, monkeypatch):
    "A crash inside the second stage: the rerun loads stage 1 and resumes stage 2 from its checkpoint, exactly."
    from msopt.train import Trainer

    def stages():
        return [Pretrain("clm", **KW), Pretrain("clm", **{**KW, "lr": 1e-3, "steps": 30, "ckpt_every": 10,
                                                            "name": "pretrain-clm-2"})]

    full = Pipeline(stages(), tmp_path / "a").run(model())
    step = Trainer._train_step

    def crash_in_stage_2(self):
        if self.name == "pretrain-clm-2" and self.step == 25:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "_train_step", crash_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(stages(), tmp_path / "b").run(model())
    monkeypatch.undo()
    assert (tmp_path / "b" / "00-pretrain-clm" / "report.json").exists()
    assert not (tmp_path / "b" / "01-pretrain-clm-2" / "report.json").exists()
    resumed = Pipeline(stages(), tmp_path / "b").run(model(seed=5))
    assert [r["skipped"] for r in resumed.rows] == [True, False]
    assert resumed.histories[1].series("train_loss") == full.histories[1].series("train_loss")
    assert resumed.rows[1]["val_loss"] == full.rows[1]["val_loss"]


def test_report_table_lists_every_number():
    reports = [StageReport("a", steps=3, val_loss=1.5, time_s=0.1),
               StageReport("b", steps=2, best_step=1, time_s=0.2, after={"accuracy": 0.75, "confusion": [[1]]},
                           before={"accuracy": 0.5}, skipped=True)]
    table = Report(reports, []).table().splitlines()
    assert table[0] == ("| stage | steps | tokens | train_loss | val_loss_before | val_loss | val_ppl | best_step | "
                        "accuracy | accuracy_before | trainable_params | time_s | skipped |")
    assert table[3] == "| b | 2 | 0 |  |  |  |  | 1 | 0.75 | 0.5 | 0 | 0.2 | True |"


def test_hf_model_through_a_stage(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    assert context_length(hf) == 16 and vocab_size(hf) == V
    report = Pretrain("clm", **KW).run(hf, tmp_path)
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
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        Pretrain("clm", train=TRAIN, batch_size=0)
    with pytest.raises(ValueError, match="4000 token ids are too few for seq_len=5000"):
        Pretrain("clm", train=TRAIN, seq_len=5000)
    with pytest.raises(ValueError, match="TrainConfig.steps must be a positive int, got 0"):
        Pretrain("clm", train=TRAIN, steps=0)
    with pytest.raises(ValueError, match="name='a/b' must be a non-empty string without '/'"):
        Pretrain("clm", train=TRAIN, name="a/b")


def test_pipeline_refuses_a_file_as_its_directory(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("not a directory")
    with pytest.raises(ValueError, match="out=.*results.txt' is a file"):
        Pipeline([Pretrain("clm", **KW)], f)
    with pytest.raises(ValueError, match="unknown on_change 'ignore'"):
        Pipeline([Pretrain("clm", **KW)], tmp_path / "p").run(model(), on_change="ignore")


def test_stage_template_calls_its_parts_in_order():
    "Stage.run: wrap, prepare, check, measure, train, measure; a subclass that fills in nothing else still trains."
    calls = []

    class Probe(Stage):
        kind = "probe"
        def data(self): return (TRAIN,)
        def wrap(self, m):
            calls.append("wrap")
            return m
        def prepare(self, net): calls.append("prepare")
        def check(self, net): calls.append("check")
        def measure(self, net):
            calls.append("measure")
            return {"n": len(calls)}
        def loss_fn(self, net): return clm_batch_loss
        def train_data(self, net):
            from msopt.data import RandomBlocks
            return RandomBlocks(TRAIN, 16, 8)

    stage = Probe(steps=3, progress=False)
    report = stage.run(model())
    assert calls == ["wrap", "prepare", "check", "measure", "measure"]
    assert report.before == {"n": 4} and report.after == {"n": 5} and report["n_before"] == 4
    assert stage.describe()["stage"] == "Probe" and stage.model is not None


# -- masked LM ---------------------------------------------------------------------------------------------------------
from msopt.models import Encoder  # noqa: E402
from msopt.objectives import MLMBatchLoss, mask_tokens, mlm_loss, word_start_table, word_starts  # noqa: E402


def test_mask_tokens_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, 50, (128, 128), generator=g)
    x[:, 0] = 0
    inp, lab = mask_tokens(x, 2, 50, generator=g, special_ids=[0])
    chosen = lab != -100
    assert not chosen[:, 0].any() and chosen.sum(1).min() >= 1
    assert abs(chosen.float().mean() - 0.15 * 127 / 128) < 0.01
    assert torch.equal(lab[chosen], x[chosen]) and torch.equal(inp[~chosen], x[~chosen])
    masked = (inp[chosen] == 2).float().mean()
    kept = (inp[chosen] == x[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.02 and 0.08 < kept < 0.13          # 10 % kept, plus random ids that hit the same id


def test_mask_tokens_whole_words_and_priority():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, 50, (64, 100), generator=g)
    starts = torch.zeros(64, 100, dtype=torch.bool)
    starts[:, ::4] = True                                            # words of exactly 4 tokens
    _, lab = mask_tokens(x, 2, 50, generator=g, word_starts=starts)
    per_word = (lab != -100).view(64, 25, 4)
    assert (per_word.all(-1) | ~per_word.any(-1)).all()             # a word is chosen whole or not at all
    key = torch.zeros(64, 100)
    key[:, :10] = 1
    _, lab = mask_tokens(x, 2, 50, generator=g, priority=1 + 4 * key)
    chosen = (lab != -100).float()
    assert chosen[:, :10].mean() > 3 * chosen[:, 10:].mean()
    assert abs(chosen.mean() - 0.15) < 0.02


def test_mask_tokens_bad_input():
    with pytest.raises(ValueError, match="outside"):
        mask_tokens(torch.zeros(2, 5, dtype=torch.long), 2, 10, prob=1.5)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mask_tokens(torch.zeros(5, dtype=torch.long), 2, 10)


def test_word_start_table():
    from msopt.data import train_tokenizer
    tok = train_tokenizer(["to be or not to be, that is the question"] * 20, vocab_size=300)
    table = word_start_table(tok)
    enc = tok.encode("to be or not\nto be")
    starts = word_starts(torch.tensor([enc.ids]), table)[0]
    words = [enc.tokens[i] for i in range(len(enc.ids)) if starts[i]]
    assert words == ["to", "Ġbe", "Ġor", "Ġnot", "Ċ", "to", "Ġbe"] and table.shape == (2, tok.get_vocab_size())


def test_pretrain_mlm_trains_an_encoder(tmp_path):
    "Runs of one repeated token: a masked token is the one its unmasked neighbours show, from either side."
    def runs(n, seed):
        return np.repeat(np.random.default_rng(seed).integers(3, V, n // 8), 8).astype(np.uint16)
    torch.manual_seed(0)
    enc = Encoder(GPTConfig.tiny(V, n_layer=1, n_embd=32, n_head=2, block_size=16))
    kw = {**KW, "train": runs(4000, 0), "val": runs(600, 1), "steps": 150, "batch_size": 16, "lr": 1e-2}
    stage = Pretrain("mlm", tokenizer=word_tokenizer(), **kw)
    report = stage.run(enc, tmp_path)
    assert report["val_loss"] < stage.history.series("val_loss")[1][0] - 0.5
    loss = MLMBatchLoss(2, V)
    enc.eval()
    batch = (torch.as_tensor(VAL[:32].astype(np.int64)).view(2, 16),)
    assert float(loss(enc, batch)) == float(loss(enc, batch))       # validation masks are deterministic


def test_pretrain_mlm_and_mtp_bad_input(tmp_path):
    with pytest.raises(ValueError, match="bidirectional"):
        Pretrain("mlm", tokenizer=word_tokenizer(), **KW).run(model(), tmp_path)
    with pytest.raises(ValueError, match="objective 'mlm' needs tokenizer="):
        Pretrain("mlm", **KW)
    with pytest.raises(ValueError, match="n_mtp=2"):
        Pretrain("clm", mtp=2, **KW).run(model(), tmp_path)
    with pytest.raises(ValueError, match="mtp=1"):
        Pretrain("mlm", mtp=1, **KW)
    with pytest.raises(ValueError, match="mask_prob"):
        Pretrain("mlm", mask_prob=0.0, tokenizer=word_tokenizer(), **KW)


def test_mlm_loss_ignores_unlabelled_positions():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 6
    expect = torch.nn.functional.cross_entropy(torch.stack([logits[0, 1], logits[1, 3]]), torch.tensor([4, 6]))
    assert torch.allclose(mlm_loss(logits, labels), expect)
