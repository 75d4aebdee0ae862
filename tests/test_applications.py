import pytest

from msopt.applications import (
    bleu_bootstrap,
    bleu_from_stats,
    bleu_stats,
    load_bible,
    sonnets,
    speaker_context,
    speaker_questions,
    speaker_turns,
    translation_pairs,
)
from msopt.data import load_corpus
from msopt.metrics import bleu
from msopt.tasks import speeches


@pytest.fixture(scope="module")
def bible():
    return load_bible()


def test_load_bible(bible):
    assert len(bible) > 30_000 and set(bible[0]) == {"ref", "book", "en", "es"}
    john = {r["ref"]: r for r in load_bible(["John"])}
    assert john["John 3:16"]["es"].startswith("Porque de tal manera amó Dios al mundo")
    assert "God so loved the world" in john["John 3:16"]["en"]
    assert all(r["en"] and r["es"] and "<" not in r["en"] + r["es"] for r in bible)
    with pytest.raises(ValueError, match="unknown book"):
        load_bible(["Hezekiah"])


def test_translation_pairs(bible):
    train, test = translation_pairs(bible, n_train=100, n_test=10, seed=1)
    assert len(train) == 100 and len(test) == 10
    ruth_phil = {(r["en"], r["es"]) for r in bible if r["book"] in ("Ruth", "Philippians")}
    assert set(test) <= ruth_phil and not set(train) & ruth_phil
    assert translation_pairs(bible, n_train=100, n_test=10, seed=1) == (train, test)
    es_en = translation_pairs(bible, n_test=3, n_train=3, src="es", tgt="en")[1]
    assert all((en, es) in ruth_phil for es, en in es_en)
    with pytest.raises(ValueError, match="test_books"):
        translation_pairs(bible, test_books=("Atlantis",))
    with pytest.raises(ValueError, match="src='fr'"):
        translation_pairs(bible, src="fr")
    with pytest.raises(ValueError, match="no verses"):
        translation_pairs([])


def test_speaker_turns():
    turns = speaker_turns("Ber.\nWho's there?\n\nFran.\nNay, answer me.\n[Exit.]\n\n"
                          "First Clown.\nIs she to be buried?\n")
    assert turns == [("Ber", "Who's there?"), ("Fran", "Nay, answer me."), ("First Clown", "Is she to be buried?")]
    hamlet = speaker_turns(load_corpus("shakespeare", works=["hamlet"])[0])
    assert len(hamlet) > 1000 and ("Ber", "Who's there?") in hamlet[:5]
    assert max(set(s for s, _ in hamlet), key=[s for s, _ in hamlet].count) == "Ham"


def test_sonnets():
    son = sonnets(load_corpus("shakespeare", works=["sonnets"])[0])
    assert len(son) > 140 and all(len(q) == 12 and len(c) == 2 for q, c in son)
    assert son[0][0][0] == "From fairest creatures we desire increase,"
    assert son[0][1][1] == "To eat the world's due, by the grave and thee."


def test_bleu_stats_give_metrics_bleu(bible):
    train, test = translation_pairs(bible, n_train=50, n_test=30, seed=0)
    refs = [es for _, es in test]
    for hyps in ([es for _, es in train[:30]], [en for en, _ in test], [es[: len(es) // 2] for es in refs],
                 ["" for _ in refs], ["Dios"] * 30):
        assert bleu_from_stats(bleu_stats(hyps, refs).sum(0)) == pytest.approx(bleu(hyps, refs).score, abs=1e-9)
    with pytest.raises(ValueError, match="one reference per hypothesis"):
        bleu_stats(["a"], ["a", "b"])


def test_bleu_bootstrap(bible):
    _, test = translation_pairs(bible, n_train=10, n_test=60, seed=0)
    refs = [es for _, es in test]
    good = [es if i % 2 else es.split(",")[0] for i, es in enumerate(refs)]
    est, lo, hi = bleu_bootstrap(good, refs, n_boot=300)
    assert est == pytest.approx(bleu(good, refs).score) and lo <= est <= hi
    assert bleu_bootstrap(good, refs, baseline=good, n_boot=100) == (0.0, 0.0, 0.0)
    diff, lo, hi = bleu_bootstrap(good, refs, baseline=[en for en, _ in test], n_boot=300)
    assert lo > 0 and diff > lo


def test_speaker_questions():
    plays = load_corpus("shakespeare", works=["hamlet", "macbeth"])
    qs = speaker_questions(plays, 5, candidates=3, cast=6, seed=0)
    assert len(qs) == 10 and {q["play"] for q in qs} == {"hamlet", "macbeth"}
    by_id = {p.id: p for p in plays}
    for q in qs:
        assert len(q["options"]) == 3 == len(set(q["options"])) and q["answer"] in q["options"]
        assert q["passage"].count("\n") == 1 and all(q["counts"][n] > 0 for n in q["options"])
        who, text = speeches(by_id[q["play"]].text)[q["at"]]                          # 'at' is the asked speech
        assert who == q["answer"] and "\n".join(text).startswith(q["passage"])
    assert speaker_questions(plays, 5, seed=0) == qs
    with pytest.raises(ValueError, match="fewer than candidates"):
        speaker_questions(plays[:1], 2, candidates=4, cast=3)


def test_speaker_context():
    play = ("A.\nOne, by A.\nand more.\n\nB.\nTwo, by B.\n\nA.\nThree, by A.\nstill A.\nA once more.\nand again.\n\n"
            "B.\nFour, by B.\n\nA.\nFive, by A.\n\nA.\nSix, by A.\n")
    q = dict(at=2, passage="Three, by A.\nstill A.", answer="A")
    assert speaker_context(play, q, "B", n=1) == "B.\nTwo, by B.\n\nB.\n"        # nearest first; ties: the earlier
    assert speaker_context(play, q, "A", n=2, lines=1) == "A.\nOne, by A.\n\nA.\nFive, by A.\n\nA.\n"
    ctx = speaker_context(play, q, "A", n=10)
    assert "Three" not in ctx and ctx.index("One") < ctx.index("Five") < ctx.index("Six")    # play order, not its own
    assert speaker_context(play, q, "C") == "C.\n"                                # a name with no other speech
    with pytest.raises(ValueError, match="is not the passage's speech"):
        speaker_context(play, dict(q, at=3), "A")
