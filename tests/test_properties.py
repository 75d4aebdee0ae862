"""Property tests (hypothesis) of the invariants the book relies on, on random inputs.

Elsewhere: the tokenizer round trip (test_data.test_train_tokenizer_round_trips_any_text) and packing keeping every
token once and in order (test_data.test_pack_covers_every_token_once)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msopt.data import RandomBlocks
from msopt.generate import beam_search, generate, top_p_filter
from msopt.models import GPT, GPTConfig
from msopt.objectives import clm_batch_loss, mask_tokens
from msopt.train import TrainConfig, Trainer

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(seed=st.integers(0, 2**31 - 1), prob=st.floats(0.05, 0.5), T=st.integers(64, 256),
       whole=st.booleans())
def test_masking_rate_and_80_10_10(seed, prob, T, whole):
    "The chosen fraction is near `prob`; chosen tokens are masked about 80 % of the time; labels only where chosen."
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 1000, (64, T), generator=g)
    starts = torch.rand(64, T, generator=g) < 0.5 if whole else None
    inp, lab = mask_tokens(x, 2, 1000, prob, generator=g, word_starts=starts)
    chosen = lab != -100
    n = chosen.numel()
    assert abs(chosen.float().mean().item() - prob) < 4 * (prob * (1 - prob) / (n / (2 if whole else 1))) ** 0.5 + 1 / T
    assert torch.equal(lab[chosen], x[chosen]) and torch.equal(inp[~chosen], x[~chosen])
    masked = (inp[chosen] == 2).float().mean().item()
    assert abs(masked - 0.8) < 4 * (0.16 / chosen.sum().item()) ** 0.5


@FAST
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 200), p=st.floats(0.01, 0.99), scale=st.floats(0.1, 5.0))
def test_top_p_keeps_the_smallest_set_with_mass_p(seed, V, p, scale):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    kept = torch.isfinite(top_p_filter(logits, p))
    probs = logits.softmax(-1)
    for b in range(3):
        k = int(kept[b].sum())
        order = probs[b].argsort(descending=True)
        assert kept[b, order[:k]].all()                                     # the kept tokens are the most likely ones
        assert probs[b, order[:k]].sum() >= p - 1e-9                        # they reach p ...
        assert k == 1 or probs[b, order[: k - 1]].sum() < p + 1e-9          # ... and one fewer would not


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(50, n_layer=2, n_head=2, n_embd=32, block_size=48)).eval()


@FAST
@given(seed=st.integers(0, 10_000), T=st.integers(1, 12), n=st.integers(1, 12))
def test_beam_width_1_is_greedy(tiny_gpt, seed, T, n):
    ids = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(seed))
    greedy = generate(tiny_gpt, ids, n)
    beam = beam_search(tiny_gpt, ids, None, n, num_beams=1)
    assert torch.equal(beam, greedy)


IDS = (np.cumsum(np.random.default_rng(0).integers(1, 3, 3000)) % 40).astype(np.uint16)


def _trainer(out_dir=None):
    torch.manual_seed(7)
    model = GPT(GPTConfig.tiny(40, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.1))
    config = TrainConfig(steps=12, lr=3e-3, warmup_steps=2, ckpt_every=1, keep_ckpts=2, progress=False)
    return Trainer(model, clm_batch_loss, RandomBlocks(IDS, 8, 4, seed=3), config, out_dir=out_dir)


@pytest.fixture(scope="module")
def uninterrupted():
    return _trainer().fit().series("train_loss")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 11))
def test_resume_after_any_step_is_exact(tmp_path_factory, uninterrupted, k):
    out = tmp_path_factory.mktemp("resume")
    _trainer(out).fit(stop_at=k)
    assert _trainer(out).fit().series("train_loss") == uninterrupted
