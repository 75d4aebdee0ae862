import json

import numpy as np
import pytest
import torch

from msopt.book import chunk_spans, spread_chunks
from msopt.data import Blocks, Document, RandomBlocks, as_tokenizer, train_tokenizer
from msopt.losses import clm_loss
from msopt.models import GPT, Encoder, GPTConfig
from msopt.objectives import MLMBatchLoss, PriorityMLMBatchLoss, weighted_clm_batch_loss
from msopt.pipeline import Pipeline
from msopt.stages import DomainAdapt
from msopt.terms import (
    character_names,
    key_terms,
    proper_nouns,
    spoken_text,
    term_losses,
    term_token_mask,
    term_token_pieces,
)


def token_bytes(tok):
    return as_tokenizer(tok).token_bytes()

GENERAL = ["the cat sat on the mat and the dog sat on the log. " * 20,
           "a cat and a dog ran to the mat; the dog ran. " * 20,
           "the bird sang and the cat slept on the warm mat. " * 20]
DOMAIN = ["the king of england rode to france with his lords; the king spoke. " * 20,
          "the lords of france met the king; england and france made war, the king said. " * 20]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(GENERAL + DOMAIN, vocab_size=300)


def test_key_terms_log_odds_and_tfidf():
    for method in ("log-odds", "tfidf"):
        terms = key_terms(DOMAIN, GENERAL, k=4, method=method)
        assert len(terms) == 4 and set(terms) <= {"king", "lords", "france", "england", "of", "war", "made", "met",
                                                  "rode", "spoke", "said", "with", "his"}
        assert "king" in terms and "cat" not in terms
    assert key_terms(DOMAIN, GENERAL, k=3) == key_terms(DOMAIN, GENERAL, k=3)            # deterministic


def test_key_terms_log_odds_formula():
    "The z-score ranking equals a direct evaluation of Monroe et al.'s formula."
    dom, gen = ["a a a b b c d d d d"] * 2, ["a b b b c c c c d"] * 2
    counts_d, counts_g = {"a": 6, "b": 4, "c": 2, "d": 8}, {"a": 2, "b": 6, "c": 8, "d": 2}
    nd, ng = 20, 18
    z = {}
    for w in "abcd":
        alpha = (nd + ng) * (counts_d[w] + counts_g[w]) / (nd + ng)
        delta = (np.log((counts_d[w] + alpha) / (nd + nd + ng - counts_d[w] - alpha))
                 - np.log((counts_g[w] + alpha) / (ng + nd + ng - counts_g[w] - alpha)))
        z[w] = delta / np.sqrt(1 / (counts_d[w] + alpha) + 1 / (counts_g[w] + alpha))
    assert key_terms(dom, gen, k=4, min_count=1) == sorted(z, key=lambda w: -z[w])


def test_key_terms_bad_input():
    with pytest.raises(ValueError, match="unknown method 'bm25'"):
        key_terms(DOMAIN, GENERAL, method="bm25")
    with pytest.raises(ValueError, match="k must be a positive int"):
        key_terms(DOMAIN, GENERAL, k=0)
    with pytest.raises(ValueError, match="needs domain and general documents"):
        key_terms([], GENERAL)
    with pytest.raises(ValueError, match="lower min_count"):
        key_terms(DOMAIN, GENERAL, min_count=10**6)
    with pytest.raises(TypeError, match="Documents or strings"):
        key_terms([1, 2], GENERAL)
    with pytest.raises(ValueError, match="outside exclude"):
        key_terms(DOMAIN, GENERAL, exclude={w for d in DOMAIN for w in d.replace(";", " ").replace(",", " ").split()})


def test_key_terms_exclude():
    terms = key_terms(DOMAIN, GENERAL, k=4)
    without = key_terms(DOMAIN, GENERAL, k=4, exclude={"KING", terms[1]})           # any case
    assert "king" in terms and "king" not in without and terms[1] not in without and len(without) == 4
    assert [w for w in key_terms(DOMAIN, GENERAL, k=20) if w not in {"king", terms[1]}][:4] == without


PLAY = ("THE TRAGEDY\n\nDramatis Personae\n\nKING RICHARD, a king\n\n"
        "KING RICHARD.\nBolingbroke, thou art come to the king of Rome,\nAnd Bolingbroke shall see it.\n\n"
        "[Enter a servant]\n\nBOL.\nMy lord, the first servant of Rome is here.\nSweet Rome, my lord.\n\n"
        "FIRST SERVANT.\nThe king and the first servant, and Bolingbroke of Rome.\n\n"
        "Exeunt.")


def test_spoken_text_keeps_only_the_speeches():
    said = spoken_text(PLAY)
    assert said.split("\n") == ["Bolingbroke, thou art come to the king of Rome,", "And Bolingbroke shall see it.",
                                 "My lord, the first servant of Rome is here.", "Sweet Rome, my lord.",
                                 "The king and the first servant, and Bolingbroke of Rome."]
    assert spoken_text(PLAY) == spoken_text(Document("p", "Play", "tragedy", PLAY))


def test_character_names_and_proper_nouns():
    # speaker words: king, richard, bol, first, servant; 'king', 'first' and 'servant' are lower case in the speeches
    assert character_names([PLAY]) == {"richard", "bol"}
    # within a sentence: Rome 4 times, Bolingbroke twice (never at a line start), all capitalized; 'I', 'O' too short
    assert proper_nouns([spoken_text(PLAY)], min_count=2) == {"rome", "bolingbroke"}
    assert proper_nouns([spoken_text(PLAY)], min_count=3) == {"rome"}
    assert proper_nouns(["The Duke, the Duke and the duke; the Duke and the Duke."], share=0.75) == {"duke"}
    assert proper_nouns(["The Duke, the Duke and the duke; the Duke and the Duke."], share=0.9) == set()
    with pytest.raises(ValueError, match="share=1.5 must be in"):
        proper_nouns([PLAY], share=1.5)


def test_token_bytes_round_trip(tok):
    table = token_bytes(tok)
    assert len(table) == tok.get_vocab_size() and table[0] == b"\x00"               # a special token
    text = "Bolingbroke, ça va? The king's men."
    ids = tok.encode(text).ids
    assert b"".join(table[i] for i in ids).decode("utf-8") == text


def test_token_bytes_hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    assert token_bytes(hf)[3:] == token_bytes(tok)[3:]
    ids = np.array(tok.encode("the king of england").ids)
    assert np.array_equal(term_token_mask(ids, hf, ["king"]), term_token_mask(ids, tok, ["king"]))


def test_term_token_mask_words_and_pieces(tok):
    text = "KING. Bolingbroke the king's kingdom; England!"
    enc = tok.encode(text)
    mask = term_token_mask(enc.ids, tok, ["king", "bolingbroke", "england"])
    assert mask.dtype == bool and mask.shape == (len(enc.ids),)
    covered = "".join(text[s:e] for (s, e), m in zip(enc.offsets, mask) if m)
    for word in ("KING", "Bolingbroke", "king", "England"):
        assert word in covered
    assert "dom" not in covered and "the" not in covered and "!" not in covered
    case = term_token_mask(enc.ids, tok, ["king"], case_sensitive=True)
    assert "KING" not in "".join(text[s:e] for (s, e), m in zip(enc.offsets, case) if m)
    enc = tok.encode("the king of england")
    two_words = term_token_mask(enc.ids, tok, ["king of england"])
    assert "".join(enc.tokens[i] for i in np.flatnonzero(two_words)) == "ĠkingĠofĠengland"
    assert not any(two_words[: enc.tokens.index("Ġking")])
    assert term_token_mask(torch.tensor(enc.ids), tok, ["king"]).tolist() == \
        term_token_mask(np.array(enc.ids, dtype=np.uint16), tok, ["king"]).tolist()


def test_term_token_pieces_first_and_continuation(tok):
    text = "Bolingbroke and the king; Bolingbroke's kingdom."
    enc = tok.encode(text)
    pieces = term_token_pieces(enc.ids, tok, ["bolingbroke", "king"])
    expected = np.zeros(len(enc.ids), np.int8)
    for begin, word in ((0, "Bolingbroke"), (text.index("king"), "king"), (text.index("Bolingbroke'"), "Bolingbroke")):
        hit = [i for i, (s, e) in enumerate(enc.offsets) if s < begin + len(word) and e > begin]
        expected[hit[0]], expected[hit[1:]] = 1, 2                                # the first piece, then the rest
    assert pieces.dtype == np.int8 and np.array_equal(pieces, expected)
    assert (pieces == 1).sum() == 3 and (pieces == 2).sum() > 0                   # Bolingbroke is several tokens
    for part, code in (("first", 1), ("rest", 2)):
        assert np.array_equal(term_token_mask(enc.ids, tok, ["bolingbroke", "king"], part=part), pieces == code)
    assert np.array_equal(term_token_mask(enc.ids, tok, ["bolingbroke", "king"]), pieces > 0)
    with pytest.raises(ValueError, match="unknown part 'middle'"):
        term_token_mask(enc.ids, tok, ["king"], part="middle")
    assert not term_token_pieces(tok.encode("no terms here").ids, tok, ["king"]).any()


def test_term_token_mask_bad_input(tok):
    with pytest.raises(ValueError, match="terms is empty"):
        term_token_mask([5, 6], tok, [])
    with pytest.raises(ValueError, match="not a non-empty string"):
        term_token_mask([5, 6], tok, ["king", " "])
    with pytest.raises(ValueError, match="encode with the same tokenizer"):
        term_token_mask([5, 10**5], tok, ["king"])
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a Hugging Face tokenizer"):
        term_token_mask([5, 6], object(), ["king"])


def test_weighted_blocks_match_random_blocks():
    ids = np.arange(500, dtype=np.uint16) % 97
    weights = (np.arange(500) % 5 == 0) * 2.0 + 1.0
    data = RandomBlocks(ids, seq_len=8, batch_size=3, seed=4, weights=weights)
    x, y, w = data.batch(11)
    rx, ry = RandomBlocks(ids, 8, 3, seed=4).batch(11)
    assert torch.equal(x, rx) and torch.equal(y, ry) and w.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(data(11), data.batch(11)))          # a pure function of i
    positions = RandomBlocks(np.arange(500), 8, 3, seed=4).batch(11)                  # the same windows, of positions
    assert torch.equal(w, torch.from_numpy(weights.astype(np.float32))[positions[1]])
    with pytest.raises(ValueError, match="one weight per token"):
        RandomBlocks(ids, 8, 3, weights=weights[:-1])
    assert torch.equal(RandomBlocks(ids, 8, 3, seed=4, weights=weights, weights_at="inputs").batch(11)[2],
                       torch.from_numpy(weights.astype(np.float32))[positions[0]])
    with pytest.raises(ValueError, match="unknown weights_at 'outputs'"):
        RandomBlocks(ids, 8, 3, weights=weights, weights_at="outputs")


def test_priority_mlm_batch_loss_masks_key_terms_more_often():
    torch.manual_seed(0)
    x = torch.randint(3, 50, (64, 32))
    priority = torch.ones(64, 32)
    priority[:, ::4] = 9.0                                                            # a quarter of the tokens
    model = Encoder(GPTConfig.tiny(50, n_layer=1, n_embd=16, n_head=2, block_size=32))
    loss = PriorityMLMBatchLoss(mask_id=2, vocab_size=50)
    seen = []
    real_forward = model.forward
    model.forward = lambda idx, *a: seen.append(idx) or real_forward(idx, *a)
    assert torch.isfinite(loss(model.train(), (x, x, priority)))
    masked = seen[-1] == 2
    share = masked[:, ::4].sum() / masked.sum()
    assert share > 0.6                                                                # 9 * 1/4 / (9/4 + 3/4) = 0.75
    model.eval()
    assert loss(model, (x, x, priority)) == MLMBatchLoss(2, 50)(model, (x, x))       # evaluation: uniform masks


def test_weighted_clm_batch_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    w = torch.rand(2, 5) + 0.5
    def model(x):
        return logits
    assert torch.isclose(weighted_clm_batch_loss(model, (y, y, w)), clm_loss(logits, y, weights=w))
    assert torch.isclose(weighted_clm_batch_loss(model, (y, y)), clm_loss(logits, y))


def test_term_losses_split_all_and_terms():
    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 32, 400).astype(np.uint16)
    mask = np.random.default_rng(1).random(400) < 0.3
    model = GPT(GPTConfig.tiny(32, n_layer=1, n_embd=16, n_head=2, block_size=16))
    r = term_losses(model, ids, mask, seq_len=16, batch_size=4)
    both = term_losses(model, ids, np.ones(400, bool), seq_len=16, batch_size=4)
    assert r["tokens"] == (399 // 16) * 16 and 0 < r["term_tokens"] < r["tokens"]
    assert both["term_loss"] == pytest.approx(both["loss"]) and r["loss"] == pytest.approx(both["loss"])
    assert r["ppl"] == pytest.approx(np.exp(r["loss"])) and r["term_ppl"] == pytest.approx(np.exp(r["term_loss"]))
    assert term_losses(model, ids, np.zeros(400, bool), 16)["term_loss"] is None
    with pytest.raises(ValueError, match="must have the shape of ids"):
        term_losses(model, ids, mask[:10], 16)


def test_term_losses_split_first_and_continuation_pieces():
    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 32, 400).astype(np.uint16)
    codes = np.random.default_rng(1).choice([0, 1, 2], 400, p=[0.6, 0.25, 0.15]).astype(np.int8)
    model = GPT(GPTConfig.tiny(32, n_layer=1, n_embd=16, n_head=2, block_size=16))
    split = term_losses(model, ids, codes, seq_len=16, batch_size=4)
    plain = term_losses(model, ids, codes > 0, seq_len=16, batch_size=4)
    assert "first_loss" not in plain and split["term_loss"] == pytest.approx(plain["term_loss"])
    assert split["first_tokens"] + split["rest_tokens"] == split["term_tokens"] == plain["term_tokens"]
    mixed = (split["first_loss"] * split["first_tokens"] + split["rest_loss"] * split["rest_tokens"]) \
        / split["term_tokens"]
    assert mixed == pytest.approx(split["term_loss"])
    first = term_losses(model, ids, codes == 1, seq_len=16, batch_size=4)
    assert first["term_loss"] == pytest.approx(split["first_loss"])
    assert term_losses(model, ids, np.where(codes == 2, 1, codes), 16)["rest_loss"] is None
    with pytest.raises(ValueError, match="values other than 0, 1 and 2"):
        term_losses(model, ids, codes * 2, 16)


def _data(tok):
    text = " ".join(DOMAIN * 3)
    ids = np.array(tok.encode(text).ids, dtype=np.uint16)
    return ids[: len(ids) * 4 // 5], ids[len(ids) * 4 // 5:]


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(tok.get_vocab_size(), n_layer=1, n_embd=32, n_head=2, block_size=16))


KW = dict(seq_len=16, batch_size=8, steps=30, lr=3e-3, warmup_steps=3, eval_every=15, eval_batches=4, progress=False)


def test_domain_adapt_reports_before_and_after(tok, tmp_path):
    train, val = _data(tok)
    stage = DomainAdapt(train, val, keywords=["king", "france"], tokenizer=tok, term_weight=3.0, **KW)
    assert stage.name == "domain-adapt" and stage.train_mask.any() and (stage.val_pieces > 0).any()
    json.dumps(stage.describe())
    report = stage.run(_model(tok), tmp_path)
    assert report["val_loss"] < report["val_loss_before"] - 0.5
    assert report["term_loss"] < report["term_loss_before"]
    assert report["term_ppl"] == pytest.approx(np.exp(report["term_loss"]))
    assert report["steps"] == 30 and report["val_term_tokens"] > 0
    assert report["term_first_loss"] is not None and report["term_first_loss_before"] is not None
    json.dumps(report.to_dict())


def test_domain_adapt_weights_change_training(tok, tmp_path):
    train, val = _data(tok)
    m1, m3 = _model(tok), _model(tok)
    for weight, m, out in ((1.0, m1, "a"), (5.0, m3, "b")):
        DomainAdapt(train, val, keywords=["king"], tokenizer=tok, term_weight=weight, **{**KW, "steps": 5}).run(
            m, tmp_path / out)
    m0 = _model(tok)
    DomainAdapt(train, val, **{**KW, "steps": 5}).run(m0, tmp_path / "c")            # keywords=None: plain
    assert all(torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_domain_adapt_resumes_exactly_and_keeps_before(tok, tmp_path):
    train, val = _data(tok)
    full = DomainAdapt(train, val, keywords=["king"], tokenizer=tok, **KW)
    ref = full.run(_model(tok), tmp_path / "ref")
    stage = DomainAdapt(train, val, keywords=["king"], tokenizer=tok, **{**KW, "ckpt_every": 10})
    from msopt.train import Trainer
    real_fit = Trainer.fit
    Trainer.fit = lambda self, resume=True, stop_at=None: real_fit(self, resume, stop_at=12)
    try:
        stage.run(_model(tok), tmp_path / "cut")
    finally:
        Trainer.fit = real_fit
    report = stage.run(_model(tok, seed=9), tmp_path / "cut")
    for key in ("val_loss", "term_loss", "term_loss_before", "val_loss_before"):
        assert report[key] == pytest.approx(ref[key], rel=1e-5), key


def test_domain_adapt_mlm(tok, tmp_path):
    train, val = _data(tok)
    torch.manual_seed(0)
    encoder = Encoder(GPTConfig.tiny(tok.get_vocab_size(), n_layer=1, n_embd=32, n_head=2, block_size=16))
    stage = DomainAdapt(train, val, keywords=["king"], tokenizer=tok, objective="mlm", **KW)
    assert stage.name == "domain-adapt-mlm" and stage.describe()["settings"]["mask_prob"] == 0.15
    report = stage.run(encoder, tmp_path)
    assert report["val_loss"] < report["val_loss_before"] and report["term_loss"] < report["term_loss_before"]
    mlm = MLMBatchLoss(as_tokenizer(tok).mask_id, tok.get_vocab_size())
    half = np.arange(len(val)) % 2 == 0
    r = term_losses(encoder, val, half, 16, 8, max_batches=1, mlm=mlm)                 # the masks of the evaluation
    first = next(iter(Blocks(val, 16, 8, max_batches=1)))              # windows spread over the text
    with torch.no_grad():
        assert r["loss"] == pytest.approx(mlm(encoder.eval(), first).item(), rel=1e-5)
    assert 0 < r["term_tokens"] < r["tokens"] < 16 * 8
    with pytest.raises(ValueError, match="needs a bidirectional model"):
        stage.run(_model(tok), None)


def test_domain_adapt_in_a_pipeline(tok, tmp_path):
    train, val = _data(tok)
    rep = Pipeline([DomainAdapt(train, val, keywords=["king"], tokenizer=tok, **KW)], tmp_path).run(_model(tok))
    assert rep.rows[0]["stage"] == "domain-adapt" and "term_ppl" in rep.rows[0]


def test_domain_adapt_bad_input(tok):
    train, val = _data(tok)
    with pytest.raises(ValueError, match=r"keywords is empty but term_weight=3\.0") as e:
        DomainAdapt(train, val, keywords=[], tokenizer=tok)
    assert "\n" not in str(e.value)
    DomainAdapt(train, val, keywords=[], tokenizer=tok, term_weight=1.0)              # empty + weight 1: plain
    with pytest.raises(ValueError, match="unknown objective 'seq2seq'"):
        DomainAdapt(train, val, objective="seq2seq")
    for w in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a positive number"):
            DomainAdapt(train, val, keywords=["king"], tokenizer=tok, term_weight=w)
    with pytest.raises(ValueError, match="need the tokenizer"):
        DomainAdapt(train, val, keywords=["king"])
    with pytest.raises(ValueError, match="mask_prob=0 is outside"):
        DomainAdapt(train, val, objective="mlm", mask_prob=0)
    with pytest.raises(ValueError, match="needs train= token ids"):
        DomainAdapt(np.array([], dtype=np.uint16), val)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        DomainAdapt(train, val, **{**KW, "seq_len": 32}).run(_model(tok), None)


def test_chunk_spans_spread_and_sized():
    spans = chunk_spans(10_000, 1_000, 100)
    sizes = spans[:, 1] - spans[:, 0]
    assert spans.shape == (10, 2) and sizes.sum() == 1_000 and sizes.max() - sizes.min() <= 1
    assert spans[0, 0] == 0 and spans[-1, 1] == 10_000 and np.all(spans[1:, 0] >= spans[:-1, 1])
    gaps = np.diff(spans[:, 0])
    assert gaps.max() - gaps.min() <= 1                                               # evenly spread
    odd = chunk_spans(9_999, 1_234, 100)                                              # 12 chunks of 102 or 103
    assert (odd[:, 1] - odd[:, 0]).sum() == 1_234 and len(odd) == 12 and np.all(odd[1:, 0] >= odd[:-1, 1])
    ids = np.arange(10_000, dtype=np.uint16)
    assert np.array_equal(spread_chunks(ids, 1_000, 100), np.concatenate([ids[s:e] for s, e in spans]))
    assert spread_chunks(ids, 10_000, 100) is ids and len(spread_chunks(ids, 50, 100)) == 50
    with pytest.raises(ValueError, match="must be in"):
        chunk_spans(100, 0, 10)


def test_domain_adaptation_is_the_same_stage_in_every_chapter():
    from msopt.book import Book, adaptation_recipe, book, domain_adaptation, domain_tokens
    b = book("tiny")
    stage = domain_adaptation(b, 8_000, seed=1)
    assert stage.describe() == domain_adaptation(b, 8_000, seed=1).describe()
    assert stage.describe() == domain_adaptation(Book("tiny"), 8_000, seed=1).describe()    # another process's book
    assert len(stage.train) == 8_000 and np.array_equal(stage.train, domain_tokens(b, 8_000))
    recipe = adaptation_recipe(b, 8_000)
    assert stage.config.keep_best and stage.config.patience and stage.config.steps == recipe["steps"]
    names = {domain_adaptation(b, K, seed, w, ["thou"] if w != 1 else None).name
             for K in (8_000, 16_000, None) for seed in (0, 1) for w in (1.0, 3.0)}
    assert len(names) == 12 and domain_adaptation(b).name == "domain-adapt-all-s0"
    assert len(domain_adaptation(b).train) == len(b.ids(b.plays["train"]))
    weighted = domain_adaptation(b, 8_000, 1, 3.0, ["thou", "thee"])
    assert weighted.describe()["settings"]["keywords"] == ["thou", "thee"] and weighted.train_mask.any()
