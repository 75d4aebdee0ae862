"""Tests for msopt.multitoken (self-speculative decoding) and the multi-token heads of msopt.models."""
import pytest
import torch

from msopt.generate import generate
from msopt.losses import clm_loss, mtp_loss
from msopt.models import GPT, GPTConfig, to_hf
from msopt.multitoken import SpeculationStats, speculative_generate

V = 200


def mtp_model(k=3, style="gpt2", trained=True):
    "A small GPT with k heads, briefly trained on a repeating pattern so that drafts are sometimes accepted."
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(V, n_layer=2, n_embd=64, style=style, n_mtp=k))
    if trained:
        pattern = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79] * 12)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(40):
            x, y = pattern[None, :-1], pattern[None, 1:]
            loss = mtp_loss(model(x, mtp=True), y)
            opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


def test_mtp_forward_contract():
    model = mtp_model(2, trained=False)
    idx = torch.randint(0, V, (2, 10))
    out = model(idx, mtp=True)
    assert isinstance(out, list) and len(out) == 3 and all(o.shape == (2, 10, V) for o in out)
    assert torch.equal(out[0], model(idx))
    assert len(GPT(GPTConfig.tiny(V, n_layer=1)).forward(idx, mtp=True)) == 1
    assert mtp_loss(out[:1], idx).item() == pytest.approx(clm_loss(out[0], idx).item())
    with pytest.raises(ValueError, match="n_mtp must be an int >= 0"):
        GPTConfig.tiny(V, n_mtp=-1)
    hf = to_hf(model)                                                             # the heads stay behind
    assert not any("mtp" in n for n in hf.state_dict())


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_speculative_equals_greedy(style):
    model = mtp_model(3, style)
    prompts = [[3, 14, 15], [92, 65, 35, 89], [7], [100, 3, 14, 15, 92, 1, 2]]
    total = SpeculationStats(proposed=[0] * 3, accepted=[0] * 3)
    for k in (1, 2, 3):
        for p in prompts:
            ids = torch.tensor([p])
            fast, stats = speculative_generate(model, ids, 30, n_draft=k)
            assert torch.equal(fast, generate(model, ids, 30, stop_tokens=[])), (k, p)
            assert stats.new_tokens == 30 and stats.forwards <= 31
            if k == 3:
                total.accepted = [a + b for a, b in zip(total.accepted, stats.accepted)]
                total.proposed = [a + b for a, b in zip(total.proposed, stats.proposed)]
    assert total.acceptance[0] > 0.1 and total.acceptance[0] >= total.acceptance[2]


def test_speculative_stops_like_greedy():
    model = mtp_model(2)
    ids = torch.tensor([[3, 14]])
    greedy = generate(model, ids, 20, stop_tokens=[])
    stop = int(greedy[0, 6])
    fast, stats = speculative_generate(model, ids, 20, stop_tokens=[stop])
    assert torch.equal(fast, generate(model, ids, 20, stop_tokens=[stop]))
    assert stats.tokens_per_forward > 1


def test_speculative_bad_input():
    model = mtp_model(2, trained=False)
    ids = torch.tensor([[1, 2, 3]])
    for kwargs, msg in [(dict(n_draft=3), "n_draft must be in"), (dict(n_draft=0), "n_draft must be in")]:
        with pytest.raises(ValueError, match=msg):
            speculative_generate(model, ids, 5, **kwargs)
    with pytest.raises(ValueError, match="extra heads"):
        speculative_generate(GPT(GPTConfig.tiny(V, n_layer=1)), ids, 5)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        speculative_generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="exceeds the context length"):
        speculative_generate(model, ids, 200)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, ids, 0)
    with pytest.raises(ValueError, match=f"vocab_size={V}"):
        speculative_generate(model, torch.tensor([[1, V]]), 5)
