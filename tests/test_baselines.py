import math
from collections import Counter

import numpy as np
import pytest

from msopt.baselines import NGramLM

V = 12


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    return rng.integers(0, V, 400) ** 2 % V, rng.integers(0, V, 60) ** 2 % V    # a skewed train and test text


def kneser_ney_by_dicts(ids, n: int, D: float):
    "Interpolated Kneser-Ney written out with Counters, as Chen & Goodman (1998) state it: P(context, w)."
    ids = [int(i) for i in ids]
    raw = Counter(tuple(ids[i: i + n]) for i in range(len(ids) - n + 1))
    cont = {j: Counter(g[1:] for g in {tuple(ids[i: i + j + 1]) for i in range(len(ids) - j)}) for j in range(1, n)}

    def prob(h: tuple, w: int) -> float:
        counts = raw if len(h) + 1 == n else cont[len(h) + 1]
        rows = {g: c for g, c in counts.items() if g[:-1] == h}
        total, types = sum(rows.values()), sum(c > 0 for c in rows.values())
        lower = prob(h[1:], w) if h else 1 / V
        if total == 0:
            return lower
        return (max(counts[h + (w,)] - D, 0) + D * types * lower) / total

    return prob


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["kneser-ney", "add-k"])
def test_distribution_sums_to_one(toy, order, method):
    lm = NGramLM(order, method=method).fit(toy[0], V)
    for context in ([], [1], [1, 4], [3, 3, 3], [11, 11, 11], [0, 4, 9], [2, 2, 2]):  # seen and unseen contexts
        assert abs(lm.distribution(context).sum() - 1) < 1e-9
        assert (lm.distribution(context) > 0).all()


def test_kneser_ney_bigram_by_hand():
    lm = NGramLM(order=2, discount=0.5).fit(np.array([0, 1, 0, 2, 0, 1]), vocab_size=4)   # a b a c a b; d unseen
    # continuation counts N1+(.w): a follows b and c -> 2, b and c follow a -> 1 each, d -> 0; their sum 4, 3 types
    p1 = {w: (max(n - 0.5, 0) + 0.5 * 3 / 4) / 4 for w, n in enumerate([2, 1, 1, 0])}
    # after a: c(ab) = 2, c(ac) = 1, so c(a.) = 3 and N1+(a.) = 2
    assert lm.prob([0], 1) == pytest.approx((2 - 0.5 + 0.5 * 2 * p1[1]) / 3, abs=1e-12)      # 0.5729...
    assert lm.prob([0], 3) == pytest.approx(0.5 * 2 * p1[3] / 3, abs=1e-12)                  # 0.03125
    assert lm.prob([3], 1) == pytest.approx(p1[1], abs=1e-12)                                 # unseen context
    assert lm.prob([], 0) == pytest.approx(p1[0], abs=1e-12)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_matches_kneser_ney_by_dicts(toy, order):
    train, test = toy
    lm, prob = NGramLM(order, discount=0.6).fit(train, V), kneser_ney_by_dicts(train, order, 0.6)
    expected = [math.log(prob(tuple(test[max(0, i - order + 1): i]), int(test[i]))) for i in range(len(test))]
    np.testing.assert_allclose(lm.log_probs(test), expected, rtol=0, atol=1e-12)


def test_order_1_is_the_discounted_unigram(toy):
    train, D = toy[0], 0.75
    counts = np.bincount(train, minlength=V)
    expected = (np.maximum(counts - D, 0) + D * (counts > 0).sum() / V) / len(train)
    lm = NGramLM(order=1, discount=D).fit(train, V)
    np.testing.assert_allclose(lm.distribution([]), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lm.distribution([5, 6]), expected, rtol=0, atol=1e-15)  # a context changes nothing
    assert lm.nll(toy[1]) == pytest.approx(-np.log(expected[toy[1]]).mean())


def test_add_k_by_hand():
    lm = NGramLM(order=2, method="add-k", k=0.5).fit(np.array([0, 1, 0, 2, 0, 1]), vocab_size=4)
    assert lm.prob([0], 1) == pytest.approx((2 + 0.5) / (3 + 0.5 * 4))
    assert lm.prob([3], 1) == pytest.approx(1 / 4)                                # unseen context: uniform
    assert lm.prob([], 0) == pytest.approx((3 + 0.5) / (6 + 0.5 * 4))              # first token: the unigram


@pytest.mark.parametrize("method", ["kneser-ney", "add-k"])
def test_log_probs_agree_with_distribution(toy, method):
    train, test = toy
    lm = NGramLM(3, method=method).fit(train, V)
    lp = lm.log_probs(test)
    for i in (0, 1, 2, 17, 59):                     # the first tokens have a shorter context
        assert lp[i] == pytest.approx(math.log(lm.distribution(test[max(0, i - 2): i])[test[i]]), abs=1e-12)


def test_training_nll_falls_with_order():
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife. However little known the feelings or views of such a man may be on his first entering "
            "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
            "considered the rightful property of some one or other of their daughters.")
    ids = np.frombuffer(text.encode(), dtype=np.uint8)
    nlls = [NGramLM(n).fit(ids, 256).nll(ids) for n in (1, 2, 3, 4, 5)]
    assert (np.diff(nlls) < 0).all(), nlls
    assert nlls[0] < math.log(256)                                   # the unigram beats the uniform


def test_errors():
    ids = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match="order must be a positive int"):
        NGramLM(order=0)
    for d in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"discount must be in \(0, 1\)"):
            NGramLM(discount=d)
    with pytest.raises(ValueError, match="unknown method 'witten-bell'"):
        NGramLM(method="witten-bell")
    with pytest.raises(ValueError, match=r"ids holds id 5 outside \[0, 3\)"):
        NGramLM(2).fit(np.array([0, 5, 1]), vocab_size=3)
    with pytest.raises(ValueError, match=r"ids holds id -1 outside \[0, 3\)"):
        NGramLM(2).fit(np.array([0, -1, 1]), vocab_size=3)
    with pytest.raises(ValueError, match="must be a non-empty 1-D array"):
        NGramLM(2).fit(ids.reshape(2, 2), vocab_size=3)
    with pytest.raises(ValueError, match="not fitted"):
        NGramLM(2).nll(ids)
    lm = NGramLM(2).fit(ids, vocab_size=3)
    with pytest.raises(ValueError, match=r"ids holds id 3 outside \[0, 3\)"):
        lm.nll(np.array([0, 3]))
    with pytest.raises(ValueError, match=r"token 7 is outside \[0, 3\)"):
        lm.prob([0], 7)
    with pytest.raises(ValueError, match="fewer than order=4"):
        NGramLM(4).fit(np.array([0, 1]), vocab_size=3)
