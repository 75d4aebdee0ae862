"""Tests of msopt.augment: EDA operations, token noise, pseudo-labels and FGM, and the AugmentedFineTune stage."""
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from msopt.augment import (
    FGM,
    METHODS,
    STOPWORDS,
    augment,
    augment_dataset,
    find_embedding,
    load_synonyms,
    pseudo_label,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
    synonyms_from_wordnet,
    token_noise,
    with_token_noise,
)
from msopt.data import train_tokenizer
from msopt.models import GPT, GPTConfig
from msopt.stages import AugmentedFineTune, FineTune
from msopt.tasks import LabelledTexts

ASSET = Path(__file__).resolve().parents[1] / "msopt/assets/synonyms.json.xz"
WORDS = st.lists(st.sampled_from(["love", "king", "sword", "the", "night", "Fair,", "death.", "and", "O", "zzz"]),
                 min_size=1, max_size=40)
SEPS = st.sampled_from([" ", "\n", "  "])


@st.composite
def texts(draw):
    words = draw(WORDS)
    return "".join(w + draw(SEPS) for w in words[:-1]) + words[-1]


@dataclass
class Labelled:
    texts: list
    labels: list
    names: list


def test_asset_is_small_and_has_provenance():
    assert ASSET.stat().st_size < 1_000_000
    meta = json.loads(lzma.decompress(ASSET.read_bytes()))
    assert "WordNet" in meta["source"] and "Princeton" in meta["license"] and meta["provenance"]
    table = load_synonyms()
    assert "sword" in table and all(isinstance(v, list) and v for v in table.values())
    assert not any(w in STOPWORDS for w in table)


@given(texts(), st.sampled_from(METHODS), st.integers(0, 1000))
@settings(max_examples=150, deadline=None)
def test_rate_zero_is_identity_and_outputs_are_never_empty(text, method, seed):
    assert augment(text, method, p=0.0, seed=seed) == text
    out = augment(text, method, p=0.5, seed=seed)
    assert out.strip()
    assert out == augment(text, method, p=0.5, seed=seed)                     # seeded: same call, same text


@given(texts(), st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_swap_keeps_the_words(text, seed):
    assert sorted(random_swap(text, 0.3, seed).split()) == sorted(text.split())


@given(texts(), st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_replacement_and_insertion_counts(text, seed):
    n = len(text.split())
    assert len(synonym_replacement(text, 0.3, seed).split()) == n
    assert n <= len(random_insertion(text, 0.3, seed).split()) <= n + max(1, round(0.3 * n))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_deletion_rate_is_respected_on_long_texts(p):
    text = " ".join(f"w{i}" + ("\n" if i % 7 == 0 else "") for i in range(5000))
    removed = 1 - len(random_deletion(text, p, seed=1).split()) / 5000
    assert abs(removed - p) < 4 * (p * (1 - p) / 5000) ** 0.5
    assert random_deletion(text, 1.0, seed=0).split() and len(random_deletion(text, 1.0, seed=0).split()) == 1


def test_deletion_keeps_line_breaks():
    out = random_deletion("a b c\nd e f\ng h i\n", 0.5, seed=3)
    assert out.count("\n") == 3


def test_synonym_replacement_keeps_case_and_punctuation():
    table = {"sword": ["blade"], "night": ["dark"]}
    out = synonym_replacement("Sword, and the night.", p=1.0, seed=0, synonyms=table)
    assert out == "Blade, and the dark."
    assert synonym_replacement("the and of", p=1.0, seed=0, synonyms=table) == "the and of"   # stop words stay
    assert random_insertion("zzz yyy", p=1.0, seed=0, synonyms=table) == "zzz yyy"        # nothing to insert


@given(st.lists(st.tuples(texts(), st.integers(0, 2)), min_size=1, max_size=8), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_augment_dataset_keeps_labels(pairs, n_aug):
    data = Labelled([t for t, _ in pairs], [y for _, y in pairs], ["a", "b", "c"])
    out = augment_dataset(data, n_aug=n_aug, p=0.2, seed=0)
    assert isinstance(out, Labelled) and out.names == data.names
    assert len(out.texts) == len(out.labels) == len(pairs) * (1 + n_aug)
    assert out.texts[:len(pairs)] == data.texts and out.labels[:len(pairs)] == data.labels
    assert out.labels[len(pairs):] == [y for y in data.labels for _ in range(n_aug)]
    assert all(t.strip() for t in out.texts)
    assert augment_dataset(data, n_aug=n_aug, p=0.2, seed=0).texts == out.texts


@pytest.mark.parametrize("call, match", [
    (lambda: augment("a b", "delete", p=1.5), r"p=1\.5 is not a rate"),
    (lambda: augment("a b", "swap", p=-0.1), r"p=-0\.1 is not a rate"),
    (lambda: augment("", "delete"), "cannot augment an empty text"),
    (lambda: augment("   \n", "synonym"), "cannot augment an empty text"),
    (lambda: augment("a b", "shuffle"), "unknown augmentation method 'shuffle'"),
    (lambda: augment_dataset(Labelled(["a"], [0], ["x"]), methods=("nope",)), "unknown augmentation method"),
    (lambda: augment_dataset(Labelled(["a"], [0], ["x"]), methods=()), "methods is empty"),
    (lambda: augment_dataset(Labelled(["a"], [0], ["x"]), n_aug=-1), "n_aug=-1"),
    (lambda: token_noise(torch.zeros(1, 2, dtype=torch.long), 2.0, 10), r"p=2\.0 is not a rate"),
    (lambda: FGM(lambda m, b: 0, eps=-1), "eps=-1"),
    (lambda: synonyms_from_wordnet("/nonexistent"), "is not a WordNet dict directory"),
])
def test_bad_input_gives_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def _fake_wordnet(tmp_path):
    "Two synsets in WordNet's file formats: {sword, blade, brand, steel} and {night, nighttime, dark, ice_cream}."
    lines = ["  1 license header", "00000000 05 n 04 sword 0 blade 0 brand 0 steel 0 000 | a weapon",
             "00000000 05 n 04 night 0 nighttime 0 dark 0 ice_cream 0 000 | the time after sunset"]
    offs = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    index = ["  1 license", f"sword n 1 0 1 0 {offs[1]:08d}", f"blade n 1 0 1 0 {offs[1]:08d}",
             f"night n 1 0 1 0 {offs[2]:08d}", f"ice_cream n 1 0 1 0 {offs[2]:08d}"]
    (tmp_path / "index.noun").write_text("\n".join(index) + "\n")
    for pos in ("verb", "adj", "adv"):
        (tmp_path / f"index.{pos}").write_text("  1 license\n")
        (tmp_path / f"data.{pos}").write_text("  1 license\n")


def test_synonyms_from_wordnet_reads_the_dict_format(tmp_path):
    _fake_wordnet(tmp_path)
    table = synonyms_from_wordnet(tmp_path)
    assert table["sword"] == ["blade", "brand", "steel"]
    assert table["night"] == ["nighttime", "dark"]                              # multi-word lemmas dropped
    assert "ice_cream" not in table
    assert synonyms_from_wordnet(tmp_path, words=["Sword", "zzz"], max_synonyms=2) == {"sword": ["blade", "brand"]}


@pytest.mark.skipif(not Path("/usr/share/wordnet/index.noun").is_file(), reason="WordNet is not installed")
def test_synonyms_from_full_wordnet_match_the_asset():
    table = load_synonyms()
    some = sorted(table)[:200:10]
    assert synonyms_from_wordnet("/usr/share/wordnet", words=some, senses=2, max_synonyms=6) == \
        {w: table[w] for w in some}


def test_token_noise_rate_and_masks():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (64, 256))
    mask = torch.ones_like(ids)
    mask[:, 200:] = 0
    out = token_noise(ids, 0.2, 1000, mask, special_ids=(0, 1, 2), generator=g)
    changed = (out != ids)
    assert not changed[:, 200:].any()                                          # padding untouched
    assert abs(changed[:, :200].float().mean().item() - 0.2) < 0.01
    assert not torch.isin(out, torch.tensor([0, 1, 2])).any()
    assert torch.equal(token_noise(ids, 0.0, 1000), ids)


def test_with_token_noise_only_in_training():
    seen = []
    loss = with_token_noise(lambda m, b: seen.append(b[0].clone()) or torch.tensor(0.0), 1.0, 10 ** 6)
    model, ids = nn.Linear(1, 1), torch.arange(10).view(1, 10)
    loss(model.train(), (ids, torch.ones_like(ids), torch.zeros(1)))
    loss(model.eval(), (ids, torch.ones_like(ids), torch.zeros(1)))
    assert not torch.equal(seen[0], ids) and torch.equal(seen[1], ids)


class MeanClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[-1.0, 0.0, 1.0]]))

    def forward(self, ids, mask):
        return ids.float().mean(1, keepdim=True) * self.w


def test_pseudo_label_threshold():
    ids = torch.tensor([[0, 0], [1, 1], [5, 5], [-5, -5], [3, 3]])
    keep, labels, conf = pseudo_label(MeanClassifier(), ids, torch.ones_like(ids), threshold=0.9, batch_size=2)
    probs = (ids.float().mean(1, keepdim=True) * torch.tensor([[-1.0, 0.0, 1.0]])).softmax(-1)
    expect = (probs.max(-1).values >= 0.9).nonzero().squeeze(1)
    assert torch.equal(keep, expect) and torch.equal(labels, probs.argmax(-1)[expect])
    assert (conf >= 0.9).all()
    assert len(pseudo_label(MeanClassifier(), ids, torch.ones_like(ids), threshold=0.0)[0]) == 5
    with pytest.raises(ValueError, match="threshold=1.5"):
        pseudo_label(MeanClassifier(), ids, torch.ones_like(ids), threshold=1.5)


class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt = GPT(GPTConfig.tiny(vocab_size=40, n_layer=1, n_embd=16, n_head=2))
        self.head = nn.Linear(16, 3)

    def forward(self, ids, mask=None):
        return self.head(self.gpt.features(ids, mask)[:, -1])


def ce(model, batch):
    ids, mask, y = batch
    return F.cross_entropy(model(ids, mask), y)


def test_fgm_gradient_and_perturbation():
    torch.manual_seed(0)
    clf = Clf()
    batch = (torch.randint(0, 40, (4, 9)), torch.ones(4, 9, dtype=torch.long), torch.randint(0, 3, (4,)))
    assert find_embedding(clf) is clf.gpt.transformer.wte
    total = FGM(ce, eps=0.3)(clf, batch)
    clean = ce(clf, batch)
    assert total.item() > 2 * clean.item()                                     # adversarial loss above clean loss
    total.backward()
    got = [p.grad.clone() for p in clf.parameters()]
    clf.zero_grad()
    outs = []
    h = clf.gpt.transformer.wte.register_forward_hook(lambda m, i, o: outs.append(o) or o)
    loss = ce(clf, batch)
    h.remove()
    g, = torch.autograd.grad(loss, outs[0], retain_graph=True)
    r = 0.3 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((4,), 0.3))
    h = clf.gpt.transformer.wte.register_forward_hook(lambda m, i, o: o + r)
    (loss + ce(clf, batch)).backward()
    h.remove()
    for a, p in zip(got, clf.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_fgm_eval_and_frozen_embedding():
    clf = Clf()
    batch = (torch.randint(0, 40, (2, 5)), torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1]))
    with torch.no_grad():
        assert torch.allclose(FGM(ce, 1.0)(clf, batch), ce(clf, batch))
    assert torch.allclose(FGM(ce, 1.0)(clf.eval(), batch), ce(clf, batch))
    clf.train()
    clf.gpt.transformer.wte.weight.requires_grad_(False)
    loss = FGM(ce, 1.0)(clf, batch)
    loss.backward()
    assert clf.head.weight.grad is not None
    with pytest.raises(ValueError, match="has no nn.Embedding"):
        find_embedding(nn.Linear(2, 2))


LINES = ["O Romeo, Romeo, wherefore art thou Romeo", "The king is dead, long live the king", "Love is a smoke",
         "My kingdom for a horse", "Sweet love, renew thy force", "Cry havoc and let slip the dogs of war",
         "If music be the food of love, play on", "Once more unto the breach, dear friends"]


def _genre_data():
    "Two classes (love, war) of short lines, a tokenizer, and fresh GPT backbones of its vocabulary."
    tok = train_tokenizer(LINES * 20, vocab_size=300)
    labels = [0, 1, 0, 1, 0, 1, 0, 1]
    train = LabelledTexts(LINES[:6], labels[:6], ["love", "war"])
    unlabelled = LabelledTexts(LINES[6:] * 2, labels[6:] * 2, ["love", "war"])

    def gpt(seed=0):
        torch.manual_seed(seed)
        return GPT(GPTConfig.tiny(vocab_size=tok.get_vocab_size(), n_layer=1, n_embd=16, n_head=2, block_size=32))
    return tok, train, unlabelled, gpt


def test_augmented_finetune_with_a_teacher():
    """EDA copies, token noise, FGM and pseudo-labels from a separate teacher: the student starts from the model it
    is handed, trains on the labelled passages, their copies and every pseudo-labelled one; the teacher is unchanged."""
    tok, train, unlabelled, gpt = _genre_data()
    args = dict(seq_len=16, batch_size=4, steps=3, lr=1e-3, eval_every=3, progress=False)
    first = FineTune("classify", train, train, tok, **args)
    first.run(gpt())
    teacher = first.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stage = AugmentedFineTune(train, train, tok, n_aug=1, token_noise=0.1, fgm_eps=0.1, unlabelled=unlabelled,
                              threshold=0.0, teacher=teacher, **args)
    report = stage.run(gpt(1))
    assert stage.model is not teacher and all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert len(stage.train) == 2 * len(train) + len(unlabelled)                # copies, then every pseudo-label
    ids, mask, _ = unlabelled.encode(tok, 16)
    _, labels, _ = pseudo_label(teacher, ids, mask, 0.0)
    right = float((labels == torch.tensor(unlabelled.labels)).float().mean())
    assert report["pseudo_labelled"] == len(unlabelled) and report["pseudo_accuracy"] == pytest.approx(right)
    assert stage.train.labels[-len(unlabelled):] == labels.tolist()             # trained on the teacher's labels
    other = AugmentedFineTune(train, train, tok, unlabelled=unlabelled, teacher=FineTune("classify", train, train, tok,
                                                                                          **args).wrap(gpt(2)), **args)
    assert other.describe()["data"] != stage.describe()["data"]                # the teacher's weights are part of it


def test_augmented_finetune_errors():
    tok, train, unlabelled, gpt = _genre_data()
    with pytest.raises(ValueError, match="teacher= labels the unlabelled= passages"):
        AugmentedFineTune(train, train, tok, teacher=torch.nn.Linear(2, 2))
    stage = AugmentedFineTune(train, train, tok, unlabelled=unlabelled, seq_len=16, steps=1, progress=False)
    with pytest.raises(ValueError, match="pseudo-labels need a trained classifier"):
        stage.run(gpt())
    with pytest.raises(ValueError, match="fgm_eps=-1"):
        AugmentedFineTune(train, train, tok, fgm_eps=-1)
