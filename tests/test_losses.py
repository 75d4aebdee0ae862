import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msopt.losses import clm_loss, l2_penalty, perplexity, token_nll, unigram_baseline


def batch(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)


# clm_loss -----------------------------------------------------------------------------------------------------------

def test_clm_loss_matches_cross_entropy():
    logits, targets = batch()
    V = logits.shape[-1]
    ref = F.cross_entropy(logits.view(-1, V), targets.view(-1))
    assert torch.allclose(clm_loss(logits, targets), ref, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_clm_loss_with_ignored_positions(ignore_index):
    logits, targets = batch(seed=1)
    V = logits.shape[-1]
    targets[0, :3] = ignore_index
    targets[2, -2:] = ignore_index
    ref = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=ignore_index)
    assert torch.allclose(clm_loss(logits, targets, ignore_index=ignore_index), ref, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 9), V=st.integers(2, 20), seed=st.integers(0, 2**16),
       p_ignore=st.floats(0.0, 0.9))
def test_clm_loss_property(B, T, V, seed, p_ignore):
    logits, targets = batch(B, T, V, seed)
    drop = torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 1)) < p_ignore
    drop.view(-1)[0] = False                                  # keep at least one counted position
    targets = targets.masked_fill(drop, -100)
    ref = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)
    assert torch.allclose(clm_loss(logits, targets), ref, atol=1e-6)


def test_clm_loss_weights():
    logits, targets = batch(seed=2)
    B, T, _ = logits.shape
    assert torch.allclose(clm_loss(logits, targets, weights=torch.ones(B, T)), clm_loss(logits, targets), atol=1e-6)
    keep = (torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    keep[0, 0] = 1.0
    dropped = targets.masked_fill(keep == 0, -100)
    assert torch.allclose(clm_loss(logits, targets, weights=keep), clm_loss(logits, dropped), atol=1e-6)
    # weights on ignored positions do not count
    masked = targets.clone()
    masked[:, 0] = -100
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) + 0.1
    nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), masked.view(-1), reduction="none").view(B, T)
    counted = (masked != -100).float()
    ref = (w * counted * nll).sum() / (w * counted).sum()
    assert torch.allclose(clm_loss(logits, masked, weights=w), ref, atol=1e-6)
    # up-weighting one token moves the loss towards that token's NLL
    w2 = torch.ones(B, T)
    w2[1, 2] = 1e6
    assert math.isclose(clm_loss(logits, targets, weights=w2).item(), nll[1, 2].item(), rel_tol=1e-3)


def test_clm_loss_gradient_matches_cross_entropy():
    logits, targets = batch(seed=5)
    V = logits.shape[-1]
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    clm_loss(a, targets).backward()
    F.cross_entropy(b.view(-1, V), targets.view(-1)).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_clm_loss_half_precision_is_upcast():
    logits, targets = batch(seed=6)
    loss = clm_loss(logits.bfloat16(), targets)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.bfloat16().float().view(-1, logits.shape[-1]), targets.view(-1))
    assert torch.allclose(loss, ref, atol=1e-6)


def test_clm_loss_int32_targets():
    logits, targets = batch(seed=7)
    assert torch.allclose(clm_loss(logits, targets.int()), clm_loss(logits, targets))


def test_clm_loss_toy_bigram():
    theta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    W = torch.tensor([[0.0, 2, 0], [0, 0, 2], [2, 0, 0]], dtype=torch.float64)
    logits = torch.stack([theta, W[0], W[1]])[None]           # (1, 3, 3)
    expected = (math.log(math.e + math.e**2 + math.e**3) - 1 + 2 * (math.log(2 + math.e**2) - 2)) / 3
    assert math.isclose(clm_loss(logits, torch.tensor([[0, 1, 2]])).item(), expected, rel_tol=1e-12)


@pytest.mark.parametrize("logits_shape, targets_shape", [((2, 5, 7), (2, 4)), ((10, 7), (10,)), ((2, 5, 7), (5, 2))])
def test_clm_loss_shape_errors(logits_shape, targets_shape):
    with pytest.raises(ValueError, match=r"logits \(.*\) and targets \(.*\) do not fit"):
        clm_loss(torch.randn(*logits_shape), torch.zeros(targets_shape, dtype=torch.long))


def test_clm_loss_bad_inputs():
    logits, targets = batch()
    B, T, V = logits.shape
    with pytest.raises(ValueError, match=r"weights \(3, 6\) must have the shape of targets \(3, 7\)"):
        clm_loss(logits, targets, weights=torch.ones(B, T - 1))
    with pytest.raises(ValueError, match="every target equals ignore_index=-100"):
        clm_loss(logits, torch.full((B, T), -100))
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        clm_loss(logits, targets + V)
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        clm_loss(logits, targets - V)
    with pytest.raises(TypeError, match="integer token ids"):
        clm_loss(logits, targets.float())
    with pytest.raises(ValueError, match="weights must be >= 0"):
        clm_loss(logits, targets, weights=-torch.ones(B, T))
    with pytest.raises(ValueError, match="sum to 0"):
        clm_loss(logits, targets, weights=torch.zeros(B, T))


# token_nll ----------------------------------------------------------------------------------------------------------

def test_token_nll_matches_cross_entropy_none():
    logits, targets = batch(seed=8)
    B, T, V = logits.shape
    targets[1, :4] = -100
    nll = token_nll(logits, targets)
    ref = F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none").view(B, T)
    assert nll.shape == (B, T)
    assert torch.allclose(nll, ref, atol=1e-6)
    assert (nll[1, :4] == 0).all()
    assert torch.allclose(nll.sum() / (targets != -100).sum(), clm_loss(logits, targets), atol=1e-6)


def test_token_nll_bad_inputs():
    logits, targets = batch()
    with pytest.raises(ValueError, match="do not fit"):
        token_nll(logits, targets[:, :-1])
    with pytest.raises(ValueError, match="outside"):
        token_nll(logits, targets + 100)


# perplexity ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 3, 50_257])
def test_perplexity_of_uniform_is_vocab_size(V):
    assert math.isclose(perplexity(math.log(V)), V, rel_tol=1e-12)
    logits = torch.zeros(1, 4, V, dtype=torch.float64)
    assert math.isclose(perplexity(clm_loss(logits, torch.zeros(1, 4, dtype=torch.long))), V, rel_tol=1e-9)


def test_perplexity_types_and_overflow():
    assert isinstance(perplexity(torch.tensor(1.0)), float)
    assert math.isclose(perplexity(torch.tensor([2.0])), math.exp(2.0), rel_tol=1e-6)
    assert math.isclose(perplexity(np.float32(0.5)), math.exp(0.5), rel_tol=1e-6)
    assert perplexity(1e4) == math.inf
    assert perplexity(0.0) == 1.0
    with pytest.raises(ValueError, match=r"scalar loss, got a tensor of shape \(3,\)"):
        perplexity(torch.ones(3))


# l2_penalty ---------------------------------------------------------------------------------------------------------

def make_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.GELU(), torch.nn.Linear(12, 4))


def sgd_step(net, lam, penalty, skip_1d):
    "One SGD step; the decay is either in the loss (penalty=True) or in SGD's weight_decay."
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    decayed = [p for p in net.parameters() if p.dim() > 1 or not skip_1d]
    rest = [p for p in net.parameters() if not (p.dim() > 1 or not skip_1d)]
    groups = [{"params": decayed, "weight_decay": 0.0 if penalty else lam}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    loss = F.cross_entropy(net(x), y)
    if penalty:
        loss = loss + lam * l2_penalty(net, skip_1d=skip_1d)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("skip_1d", [True, False])
def test_l2_penalty_matches_sgd_weight_decay(skip_1d):
    net = make_net()
    a = sgd_step(copy.deepcopy(net), 0.2, penalty=True, skip_1d=skip_1d)
    b = sgd_step(copy.deepcopy(net), 0.2, penalty=False, skip_1d=skip_1d)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b))
    c = sgd_step(copy.deepcopy(net), 0.0, penalty=False, skip_1d=skip_1d)
    assert not all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, c))   # the decay did something


def test_l2_penalty_value_and_inputs():
    net = make_net()
    mats = [p for p in net.parameters() if p.dim() > 1]
    expected = 0.5 * sum((p**2).sum() for p in mats)
    assert torch.allclose(l2_penalty(net), expected)
    assert torch.allclose(l2_penalty(mats), expected)
    assert torch.allclose(l2_penalty(iter(mats)), expected)                 # any iterable, even a generator
    assert torch.allclose(l2_penalty(net, skip_1d=False), 0.5 * sum((p**2).sum() for p in net.parameters()))
    assert torch.allclose(l2_penalty(mats + mats), expected)                # a tensor listed twice counts once
    w = torch.randn(3, 4)
    assert torch.allclose(l2_penalty(w), 0.5 * (w**2).sum())                # a lone tensor is not split into rows
    assert l2_penalty([]).item() == 0.0
    assert l2_penalty([torch.ones(5)]).item() == 0.0                        # only 1-D tensors: nothing to decay
    tied = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.ModuleDict({"a": tied, "b": tied})
    assert torch.allclose(l2_penalty(model), 0.5 * (tied.weight**2).sum())


def test_l2_penalty_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module or an iterable of tensors, got int"):
        l2_penalty(3)
    with pytest.raises(TypeError, match="got an element of type float"):
        l2_penalty([torch.ones(2, 2), 1.5])


# unigram_baseline ---------------------------------------------------------------------------------------------------

def test_unigram_baseline_is_entropy_when_train_is_val():
    g = torch.Generator().manual_seed(0)
    ids = torch.multinomial(1 / torch.arange(1, 30), 4000, replacement=True, generator=g)
    freq = torch.bincount(ids, minlength=29).double() / len(ids)
    H = torch.distributions.Categorical(probs=freq).entropy().item()
    assert math.isclose(unigram_baseline(ids, ids, 29, alpha=1e-12), H, rel_tol=1e-9)
    assert math.isclose(unigram_baseline(ids.numpy(), ids.tolist(), 29, alpha=0.0), H, rel_tol=1e-12)
    assert unigram_baseline(ids, ids, 29, alpha=1.0) > H                    # smoothing costs on the training data


@pytest.mark.parametrize("V", [1, 2, 37, 1000])
def test_unigram_baseline_uniform_is_log_v(V):
    data = np.tile(np.arange(V), 3)
    assert math.isclose(unigram_baseline(data, data, V), math.log(V), abs_tol=1e-12)
    assert math.isclose(unigram_baseline(data, data, V, alpha=0.0), math.log(V), abs_tol=1e-12)


def test_unigram_baseline_smoothing():
    train, val = np.array([0, 0, 1]), np.array([2])
    assert unigram_baseline(train, val, 3, alpha=0.0) == math.inf           # unseen token under the MLE
    assert math.isclose(unigram_baseline(train, val, 3, alpha=1.0), -math.log(1 / 6), rel_tol=1e-12)
    assert math.isclose(unigram_baseline(train, val, 3, alpha=1e9), math.log(3), rel_tol=1e-6)


def test_unigram_baseline_bad_inputs():
    ok = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="train_ids is empty"):
        unigram_baseline(np.array([], dtype=np.int64), ok, 3)
    with pytest.raises(ValueError, match="val_ids is empty"):
        unigram_baseline(ok, torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"val_ids holds ids in \[0, 5\], outside \[0, 3\)"):
        unigram_baseline(ok, np.array([0, 5]), 3)
    with pytest.raises(ValueError, match=r"train_ids holds ids in \[-1, 2\]"):
        unigram_baseline(np.array([-1, 2]), ok, 3)
    with pytest.raises(TypeError, match="integer token ids"):
        unigram_baseline(ok.astype(float), ok, 3)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        unigram_baseline(ok, ok, 0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        unigram_baseline(ok, ok, 3, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        unigram_baseline(ok, ok, 3, alpha=float("nan"))


def test_mtp_loss_heads_are_shifted_clm_losses():
    from msopt.losses import mtp_loss
    torch.manual_seed(0)
    B, T, V = 2, 7, 11
    targets = torch.randint(0, V, (B, T))
    heads = [torch.randn(B, T, V) for _ in range(3)]
    assert torch.allclose(mtp_loss(heads[:1], targets), clm_loss(heads[0], targets))
    by_hand = [F.cross_entropy(h[:, : T - j].reshape(-1, V), targets[:, j:].reshape(-1)) for j, h in enumerate(heads)]
    assert torch.allclose(mtp_loss(heads, targets), sum(by_hand) / 3)
    assert torch.allclose(mtp_loss(heads, targets, weights=[1, 0, 0]), by_hand[0])


def test_mtp_loss_bad_input():
    from msopt.losses import mtp_loss
    with pytest.raises(ValueError, match="at least one head"):
        mtp_loss([], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="one weight per head"):
        mtp_loss([torch.randn(1, 4, 5)] * 2, torch.zeros(1, 4, dtype=torch.long), weights=[1.0])
