import math

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from msopt.metrics import (
    METRICS,
    BleuScore,
    RougeScore,
    accuracy,
    bits_per_byte,
    bleu,
    bootstrap_interval,
    calibration_bins,
    classification_report,
    compute,
    confusion_matrix,
    evaluate_lm,
    exact_match,
    expected_calibration_error,
    f1_score,
    lcs_length,
    normalize_answer,
    paired_bootstrap_diff,
    plot_confusion,
    precision_recall_f1,
    rouge,
    rouge_pair,
    sliding_window_nll,
    token_f1,
    tokenize_13a,
    tokenize_rouge,
)

skm = pytest.importorskip("sklearn.metrics")

labels_st = st.integers(1, 40).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 4), min_size=n, max_size=n),
                                                           st.lists(st.integers(0, 4), min_size=n, max_size=n)))

# classification ------------------------------------------------------------------------------------------------------

def test_hand_computed_case():
    y, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert accuracy(p, y) == 4 / 6
    assert confusion_matrix(p, y).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    prec, rec, f1 = precision_recall_f1(p, y, average=None)
    assert np.allclose(prec, [0.5, 2 / 3, 1]) and np.allclose(rec, [0.5, 1, 0.5]) and np.allclose(f1, [0.5, 0.8, 2 / 3])
    assert math.isclose(f1_score(p, y), (0.5 + 0.8 + 2 / 3) / 3)
    assert math.isclose(f1_score(p, y, "micro"), 4 / 6)


def test_accepts_tensors_and_arrays():
    y = torch.tensor([0, 1, 1, 0])
    assert accuracy(torch.tensor([0, 1, 0, 0]), y) == 0.75 == accuracy(np.array([0, 1, 0, 0]), y.numpy())


@settings(max_examples=80, deadline=None)
@given(labels_st)
def test_classification_matches_sklearn(pair):
    y, p = pair
    for avg in ("macro", "micro"):
        ref = skm.precision_recall_fscore_support(y, p, average=avg, zero_division=0)[:3]
        assert np.allclose(precision_recall_f1(p, y, avg), ref)
    assert math.isclose(accuracy(p, y), skm.accuracy_score(y, p))
    assert np.array_equal(confusion_matrix(p, y, 5), skm.confusion_matrix(y, p, labels=range(5)))
    assert math.isclose(f1_score(p, y, "micro"), accuracy(p, y))


def test_n_classes_fixes_the_macro_classes():
    y, p = [0, 0, 1], [0, 0, 1]
    assert f1_score(p, y) == 1.0
    assert math.isclose(f1_score(p, y, n_classes=3), 2 / 3)          # class 2 never occurs: F1 0 counted
    assert math.isclose(f1_score(p, y, n_classes=3),
                        skm.f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0))


def test_classification_report_and_plot():
    import matplotlib
    matplotlib.use("Agg")
    rep = classification_report([0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c"])
    assert rep["accuracy"] == 0.75 and set(rep["f1"]) == {"a", "b", "c"} and rep["n"] == 4
    ax = plot_confusion(confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2]), ["a", "b", "c"], normalize=True)
    assert ax.get_xlabel() == "predicted"


def test_classification_errors():
    with pytest.raises(ValueError, match="preds has 2 entries but labels has 3"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        f1_score([], [])
    with pytest.raises(ValueError, match="unknown average 'weighted'"):
        precision_recall_f1([0], [0], average="weighted")
    with pytest.raises(TypeError, match="integer class ids"):
        accuracy([0.2, 0.8], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        accuracy(np.zeros((2, 3), int), [0, 1])
    with pytest.raises(ValueError, match="n_classes=2"):
        confusion_matrix([0, 2], [0, 1], n_classes=2)
    with pytest.raises(ValueError, match="negative class id"):
        accuracy([-1, 0], [0, 0])
    with pytest.raises(ValueError, match="square"):
        plot_confusion(np.zeros((2, 3)))

# calibration ---------------------------------------------------------------------------------------------------------

def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = [0, 1, 0, 1]
    # bins of width 0.5: (0.5, 1] holds all four; conf mean (0.9+0.9+0.6+0.7)/4 = 0.775, accuracy 3/4
    assert math.isclose(expected_calibration_error(probs, labels, n_bins=2), abs(0.75 - 0.775))
    # 10 bins: 0.9 bin: conf 0.9, acc 0.5 (2 examples); 0.6: conf .6 acc 1; 0.7: conf .7 acc 1
    assert math.isclose(expected_calibration_error(probs, labels, n_bins=10), (2 * 0.4 + 0.4 + 0.3) / 4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(2, 5), st.integers(1, 20), st.integers(0, 2**16))
def test_ece_properties(n, c, bins, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(c), size=n)
    labels = rng.integers(0, c, n)
    ece = expected_calibration_error(probs, labels, bins)
    assert 0 <= ece <= 1
    b = calibration_bins(probs, labels, bins)
    assert b["count"].sum() == n
    onehot = np.eye(c)[labels]                                           # always right, fully confident: ECE 0
    assert expected_calibration_error(onehot, labels, bins) == 0


def test_ece_errors():
    with pytest.raises(ValueError, match="summing to 1"):
        expected_calibration_error(np.array([[2.0, -1.0]]), [0])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        expected_calibration_error(np.array([0.5, 0.5]), [0])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(np.array([[0.5, 0.5]]), [0], n_bins=0)

# BLEU ----------------------------------------------------------------------------------------------------------------

HYPS = ["The cat sat on the mat.", "It is raining, said the old man.", "A quick brown dog jumps over 3.5 fences -- no?",
        "&quot;Yes&quot; he said (twice) 1-2."]
REFS = [["The cat sat on the mat.", "There is a cat on the mat."],
        ["\"It's raining,\" the old man said.", "The old man said it was raining."],
        ["The quick brown fox jumps over the lazy dog.", "A fast brown fox leaps over 3.5 fences."],
        ["\"Yes,\" he said twice: 1-2.", "He said yes, twice."]]


def test_tokenize_13a_matches_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    t = Tokenizer13a()
    for s in HYPS + [r for rs in REFS for r in rs] + ["x-\ny", "a<skipped>b", "3,000.5 $ 1-2 -3", "é, ñ. ¿qué?"]:
        assert tokenize_13a(s) == t(s.rstrip()).split()


@pytest.mark.parametrize("smooth", ["exp", "none", "floor", "add-k"])
def test_bleu_matches_sacrebleu(smooth):
    ours = bleu(HYPS, REFS, smooth=smooth)
    ref = sacrebleu.corpus_bleu(HYPS, [list(r) for r in zip(*REFS)], smooth_method=smooth)
    assert isinstance(ours, BleuScore) and abs(ours.score - ref.score) < 0.01 and float(ours) == ours.score
    assert ours.sys_len == ref.sys_len and ours.ref_len == ref.ref_len and abs(ours.bp - ref.bp) < 1e-9
    assert np.allclose(ours.precisions, ref.precisions)


def test_bleu_lowercase_and_single_reference_strings():
    hyps, refs = ["THE CAT"], ["the cat"]
    reference = sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score
    assert abs(bleu(hyps, refs, lowercase=True).score - reference) < 0.01
    assert bleu(["a b c d"], ["a b c d"]).score == pytest.approx(100)
    assert bleu([""], ["a b c"]).score == 0.0


words = st.lists(st.sampled_from("the a cat dog sat on mat , . 's ran 3.5 - x".split()), max_size=14)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(words, words, words), min_size=1, max_size=5))
def test_bleu_property_matches_sacrebleu(rows):
    hyps = [" ".join(h) for h, _, _ in rows]
    r1, r2 = [" ".join(r) for _, r, _ in rows], [" ".join(r) for _, _, r in rows]
    ours = bleu(hyps, [[a, b] for a, b in zip(r1, r2)]).score
    assert abs(ours - sacrebleu.corpus_bleu(hyps, [r1, r2]).score) < 0.01
    assert 0 <= ours <= 100 + 1e-9


def test_bleu_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty reference list"):
        bleu(["a"], [[]])
    with pytest.raises(ValueError, match="no hypotheses"):
        bleu([], [])
    with pytest.raises(ValueError, match="unknown smoothing 'add-one'"):
        bleu(["a"], ["a"], smooth="add-one")
    with pytest.raises(TypeError, match="single str"):
        bleu("a b", "a b")
    with pytest.raises(TypeError, match="must be strings"):
        bleu([["a", "b"]], ["a b"])

# ROUGE ---------------------------------------------------------------------------------------------------------------

def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rougeL"])
    pairs = [("Claudius killed Hamlet's father and married the queen.",
              "Hamlet's father was murdered by his brother Claudius, who then married the queen."),
             ("the the the cat", "the cat the end"), ("", "something"), ("Ünïcode café 42", "cafe 42 unicode")]
    for hyp, ref in pairs:
        ours, theirs = rouge([hyp], [ref], ["rouge1", "rouge2", "rouge3", "rougeL"]), scorer.score(ref, hyp)
        for t in ours:
            assert isinstance(ours[t], RougeScore)
            for f in ("precision", "recall", "fmeasure"):
                assert abs(getattr(ours[t], f) - getattr(theirs[t], f)) < 1e-6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(words, words), min_size=1, max_size=4))
def test_rouge_property(rows):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    hyps, refs = [" ".join(h) for h, _ in rows], [" ".join(r) for _, r in rows]
    ours = rouge(hyps, refs)
    for t in ours:
        mean = np.mean([scorer.score(r, h)[t].fmeasure for h, r in zip(hyps, refs)])
        assert abs(ours[t].fmeasure - mean) < 1e-6


def test_rouge_multi_reference_takes_best_f():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    refs = ["a completely different text", "the cat sat on the mat"]
    ours = rouge(["the cat sat on a mat"], [refs], ["rouge1", "rougeL"])
    theirs = scorer.score_multi(refs, "the cat sat on a mat")
    for t in ours:
        assert abs(ours[t].fmeasure - theirs[t].fmeasure) < 1e-6


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_lcs_length_against_reference(a, b):
    from rouge_score.rouge_scorer import _lcs_table
    assert lcs_length(a, b) == _lcs_table(a, b)[-1][-1] == lcs_length(b, a)


def test_rouge_tokenizer_and_errors():
    assert tokenize_rouge("It's 3 o'clock, Ophelia!") == ["it", "s", "3", "o", "clock", "ophelia"]
    assert rouge_pair(["a"], ["a"], "rouge1").fmeasure == 1.0
    with pytest.raises(ValueError, match="unknown ROUGE type 'rougeX'"):
        rouge(["a"], ["a"], ["rougeX"])
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        rouge(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty reference list"):
        rouge(["a"], [[]])

# QA and the registry -------------------------------------------------------------------------------------------------

def test_qa_metrics():
    assert normalize_answer("  The Ghost, of   Hamlet!") == "ghost of hamlet"
    assert exact_match(["The Claudius.", "x"], [["Claudius"], "y"]) == 0.5
    assert math.isclose(token_f1(["ghost of hamlet"], ["the ghost"]), 2 * 1 / (3 + 1))
    assert token_f1([""], [""]) == 1.0 and token_f1(["b"], [""]) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_compute_registry():
    assert compute("accuracy", [0, 1], [0, 0]) == 0.5
    assert compute("bleu", HYPS, REFS) == bleu(HYPS, REFS).score
    assert compute("rougeL", ["a b"], ["a b"]) == 1.0
    assert set(METRICS) >= {"accuracy", "macro_f1", "micro_f1", "bleu", "rouge1", "rouge2", "rougeL",
                            "exact_match", "token_f1"}
    with pytest.raises(ValueError, match="unknown metric 'blue': use one of"):
        compute("blue", ["a"], ["a"])

# perplexity ----------------------------------------------------------------------------------------------------------

class Bigram(torch.nn.Module):
    "A model whose logits depend only on the current token: its scores cannot depend on window or stride."
    def __init__(self, V=13):
        super().__init__()
        self.table = torch.nn.Embedding(V, V)

    def forward(self, x):
        return self.table(x)


class TinyCausal(torch.nn.Module):
    "Logits from a causal running mean of embeddings: uses all context, like a real LM."
    def __init__(self, V=13, C=8):
        super().__init__()
        self.emb, self.out = torch.nn.Embedding(V, C), torch.nn.Linear(C, V)

    def forward(self, x):
        h = self.emb(x).cumsum(1) / torch.arange(1, x.shape[1] + 1)[None, :, None]    # (B, T, C)
        return self.out(h)


def reference_nll(model, ids, seq_len, stride):
    "Hugging Face perplexity-guide loop, one window at a time."
    ids = torch.as_tensor(ids)[None]
    n, prev_end, total, count = ids.shape[1], 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len + 1, n)
        trg_len = end - max(prev_end, begin + 1)
        x = ids[:, begin:end]
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="none")
        total += nll[-trg_len:].sum().item() if trg_len > 0 else 0.0
        count += max(trg_len, 0)
        prev_end = end
        if end == n:
            break
    return total, count


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(1, 12), st.data())
def test_sliding_window_matches_reference_loop(n, seq_len, data):
    torch.manual_seed(0)
    model = TinyCausal()
    ids = torch.randint(0, 13, (n,))
    stride = data.draw(st.integers(1, seq_len))
    total, count = sliding_window_nll(model, ids, seq_len, stride, batch_size=data.draw(st.integers(1, 4)))
    ref_total, ref_count = reference_nll(model, ids, seq_len, stride)
    assert count == ref_count == n - 1 and abs(total - ref_total) < 1e-3


def test_sliding_window_invariant_for_bigram_model():
    torch.manual_seed(0)
    model, ids = Bigram(), torch.randint(0, 13, (97,))
    direct = torch.nn.functional.cross_entropy(model(ids[:-1]), ids[1:], reduction="sum").item()
    for seq_len, stride in [(1, 1), (8, 8), (8, 3), (50, 7), (200, 200)]:
        assert abs(sliding_window_nll(model, ids, seq_len, stride)[0] - direct) < 1e-3


def test_evaluate_lm_and_bits_per_byte():
    torch.manual_seed(0)
    model = TinyCausal()
    model.train()
    ids = np.random.default_rng(0).integers(0, 13, 40)
    out = evaluate_lm(model, ids, 8, stride=4, n_bytes=80)
    assert model.training                                                   # mode restored
    assert math.isclose(out["ppl"], math.exp(out["loss"])) and out["tokens"] == 39
    assert math.isclose(out["bpb"], out["loss"] * 39 / (math.log(2) * 80))
    assert math.isclose(bits_per_byte(math.log(2) * 10, 10), 1.0)


def test_perplexity_errors():
    model = Bigram()
    with pytest.raises(ValueError, match="stride must be an int in"):
        sliding_window_nll(model, [1, 2, 3], 4, stride=5)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        sliding_window_nll(model, [1, 2, 3], 0)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_window_nll(model, [1], 4)
    with pytest.raises(ValueError, match="1-D sequence of integer"):
        sliding_window_nll(model, [[1, 2]], 4)
    with pytest.raises(ValueError, match="n_bytes must be a positive int"):
        bits_per_byte(1.0, 0)


# bootstrap intervals -------------------------------------------------------------------------------------------------

def clustered_scores(rng, n_groups=40, per_group=20, group_sd=0.5, item_sd=1.0):
    "Scores with true mean 0: a random effect per group plus item noise (intra-group correlation 0.2); the groups."
    v = rng.normal(0, group_sd, (n_groups, 1)) + rng.normal(0, item_sd, (n_groups, per_group))   # (G, m)
    return v.ravel(), np.repeat(np.arange(n_groups), per_group)


def test_group_bootstrap_covers_and_item_bootstrap_undercovers():
    rng, covered = np.random.default_rng(0), {"items": 0, "groups": 0}
    for i in range(200):
        v, g = clustered_scores(rng)
        for unit, groups in (("items", None), ("groups", g)):
            _, low, high = bootstrap_interval(v, groups, n_boot=1000, level=0.9, seed=i)
            covered[unit] += low <= 0 <= high
    # design effect 1 + 19 * 0.2 = 4.8: the item interval is ~2.2x too narrow (measured 57 %); groups measured 87 %
    assert 0.83 <= covered["groups"] / 200 <= 0.96 and covered["items"] / 200 < 0.7


def test_bootstrap_estimate_interval_and_determinism():
    rng = np.random.default_rng(1)
    v, g = clustered_scores(rng)
    est, low, high = bootstrap_interval(v, g)
    assert est == pytest.approx(v.mean()) and low < est < high
    assert bootstrap_interval(v, g) == (est, low, high)                                   # same seed, same interval
    _, low90, high90 = bootstrap_interval(v, g, level=0.9)
    assert low < low90 < high90 < high
    _, low_items, high_items = bootstrap_interval(v)
    assert high - low > 1.5 * (high_items - low_items)                       # resampling groups widens it
    ones = np.ones(30)
    assert bootstrap_interval(ones, np.arange(30) % 3) == (1.0, 1.0, 1.0)


def test_bootstrap_mean_path_matches_generic_stat():
    rng = np.random.default_rng(2)
    v, g = rng.normal(size=(3, 50)), rng.integers(0, 7, 50)      # 3 draws (seeds) of 50 items in 7 uneven groups
    for values, groups in ((v, g), (v, None), (v[0], g), (v[0], None)):
        fast = bootstrap_interval(values, groups, n_boot=300)
        slow = bootstrap_interval(values, groups, n_boot=300, stat=lambda x: x.mean())
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    est, low, high = bootstrap_interval(v[0], g, n_boot=300, stat=np.median)
    assert est == np.median(v[0]) and low <= est <= high


def test_bootstrap_resamples_draws():
    rng = np.random.default_rng(3)
    items = rng.normal(size=200)
    same = np.stack([items, items, items])                                           # three identical seeds
    assert bootstrap_interval(same, n_boot=500) == pytest.approx(bootstrap_interval(items, n_boot=500), abs=0.02)
    shifted = np.stack([items - 1, items, items + 1])                                # seeds that disagree by +-1
    _, low, high = bootstrap_interval(shifted, n_boot=500)
    _, low1, high1 = bootstrap_interval(items, n_boot=500)
    assert high - low > 2 * (high1 - low1)


def test_paired_bootstrap_diff():
    rng = np.random.default_rng(4)
    v, g = clustered_scores(rng)
    assert paired_bootstrap_diff(v, v, g) == (0.0, 0.0, 0.0)
    better = v + 0.1 + rng.normal(0, 0.05, v.shape)                  # a small gain on top of shared item difficulty
    diff, low, high = paired_bootstrap_diff(better, v, g)
    assert diff == pytest.approx(better.mean() - v.mean()) and 0 < low < diff < high
    _, low_a, high_a = bootstrap_interval(better, g)
    assert high - low < (high_a - low_a) / 5                         # the shared group effect cancels
    assert paired_bootstrap_diff(np.stack([better, better]), np.stack([v, v]), g)[0] == pytest.approx(diff)


def test_bootstrap_errors():
    v = np.arange(6.0)
    with pytest.raises(ValueError, match=r"groups has shape \(5,\) but values has 6 items"):
        bootstrap_interval(v, groups=[0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"a has shape \(6,\) but b has \(5,\)"):
        paired_bootstrap_diff(v, v[:5])
    for level in (0, 1, 95, -0.5):
        with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
            bootstrap_interval(v, level=level)
    with pytest.raises(ValueError, match="only 1 group: resampling needs at least 2"):
        bootstrap_interval(v, groups=["hamlet"] * 6)
    with pytest.raises(ValueError, match="only 1 item"):
        bootstrap_interval([0.5])
    with pytest.raises(ValueError, match="n_boot must be a positive int"):
        bootstrap_interval(v, n_boot=0)
    with pytest.raises(ValueError, match="values holds NaN"):
        bootstrap_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"values must be \(n_items,\) or \(n_draws, n_items\)"):
        bootstrap_interval(np.zeros((2, 2, 2)))
