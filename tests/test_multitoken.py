"""Tests for msopt.multitoken (self-speculative decoding), the MTPHeads stage and the multi-token heads of models."""
import pytest
import torch

from msopt.generate import generate
from msopt.losses import clm_loss, mtp_loss
from msopt.models import GPT, GPTConfig, KVCache, to_hf
from msopt.multitoken import (
    MORE_REQUESTS,
    REQUESTS,
    TOPICS,
    DraftLayer,
    SpeculationStats,
    add_mtp_heads,
    chat_requests,
    choose_tree,
    greedy_continuations,
    prepack_linears,
    speculative_generate,
)
from msopt.stages.draft_layer import EagleDraft
from msopt.stages.mtp_heads import MTPHeads

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
            opt.zero_grad()
            loss.backward()
            opt.step()
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
    with pytest.raises(TypeError, match="an msopt GPT"):
        speculative_generate(torch.nn.Linear(2, 2), ids, 5)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        speculative_generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="exceeds the context length"):
        speculative_generate(model, ids, 200)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, ids, 0)
    with pytest.raises(ValueError, match=f"vocab_size={V}"):
        speculative_generate(model, torch.tensor([[1, V]]), 5)


def smollm2_like(n_layer=2, vocab=512):
    "A random model of SmolLM2-135M's shape (Llama style, 9 query and 3 K/V heads, width 576) with fewer layers."
    torch.manual_seed(0)
    return GPT(GPTConfig.smollm2_135m(n_layer=n_layer, vocab_size=vocab, block_size=256)).eval()


def test_chained_heads_forward():
    model = GPT(GPTConfig.tiny(V, n_layer=1, n_embd=64, n_mtp=2, mtp_chain=True)).eval()
    idx = torch.randint(0, V, (2, 9))
    out = model(idx, mtp=True)
    assert len(out) == 3 and all(o.shape == (2, 9, V) for o in out)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    with torch.no_grad():
        a, b = model(idx, mtp=True)[1], model(changed, mtp=True)[1]
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4], b[:, 4])   # head 1 at t reads token t + 1
    with pytest.raises(ValueError, match="mtp_vocab must be"):
        GPTConfig.tiny(V, mtp_vocab=V + 1)


@pytest.mark.parametrize("chain", [False, True])
def test_mtp_heads_stage_leaves_the_trunk(chain):
    model = smollm2_like()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    trunk = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = [torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(10)]
    seqs = greedy_continuations(model, prompts, 24, batch_size=4)
    stage = MTPHeads(seqs[:8], seqs[8:], k=2, chain=chain, prompt_lens=[6] * 8, val_prompt_lens=[6] * 2, steps=6,
                     lr=1e-3, eval_every=3, keep_best=True, progress=False, batch_size=32)
    report = stage.run(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), before)                                   # the main head's logits
    assert all(torch.equal(p, trunk[n]) for n, p in model.named_parameters() if n in trunk)
    assert report.trainable_params == sum(p.numel() for p in model.mtp_heads.parameters())
    assert set(report.after) == {"head1_top1", "head2_top1"} and report.val_loss <= report.val_loss_before
    assert model.config.n_mtp == 2 and all(p.requires_grad for p in model.parameters())   # thawed after the stage


@pytest.mark.parametrize("chain", [False, True])
def test_speculative_equals_greedy_smollm2_shape(chain):
    model = smollm2_like()
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 12)]
    seqs = greedy_continuations(model, prompts * 3, 40, batch_size=3)
    MTPHeads(seqs, k=3, vocab=128, chain=chain, prompt_lens=[len(p) for p in prompts * 3], steps=10, lr=3e-3,
             progress=False, batch_size=64).run(model)
    model.eval()
    for k in (1, 2, 3):
        for p in prompts:
            ids = torch.tensor([p])
            fast, stats = speculative_generate(model, ids, 40, n_draft=k)
            assert torch.equal(fast, generate(model, ids, 40, stop_tokens=[])), (chain, k, p)
            assert stats.new_tokens == 40 and stats.forwards <= 40


def test_mtp_heads_distill_learns_the_trunks_distribution():
    model = smollm2_like()
    prompts = [torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(10)]
    seqs = greedy_continuations(model, prompts, 24, batch_size=5)
    with torch.no_grad():
        before = model(torch.tensor(seqs[:2]))
    stage = MTPHeads(seqs[:8], seqs[8:], k=2, chain=True, prompt_lens=[6] * 8, val_prompt_lens=[6] * 2, distill=4,
                     steps=8, lr=3e-3, eval_every=4, progress=False, batch_size=32)
    report = stage.run(model)
    data = stage._train
    ids, probs = data.soft                                                        # (P, 2, 4) each
    assert ids.shape == probs.shape == (*data.targets.shape, 4) and len(data.batch(0)) == 5
    ok = data.targets >= 0
    assert (ids[..., 0][ok] == data.targets[ok]).float().mean() > 0.99         # greedy text: the top token is next
    assert (probs[..., :-1] >= probs[..., 1:]).all() and (probs.sum(-1) <= 1 + 1e-5).all()
    assert report.val_loss < report.val_loss_before
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(torch.tensor(seqs[:2])), before)                # the trunk and main head untouched
    assert stage.settings()["distill"] == 4 and "distill" not in MTPHeads(seqs, k=2).settings()
    with pytest.raises(ValueError, match="distill must be"):
        MTPHeads(seqs, k=2, distill=-1)


def test_add_mtp_heads():
    model = GPT(GPTConfig.tiny(V, n_layer=1, n_embd=64))
    a = add_mtp_heads(model, 2, vocab=20, chain=True, seed=3)
    assert a is model and model.config.n_mtp == 2 and model.config.mtp_chain and len(model.mtp_heads) == 2
    other = add_mtp_heads(GPT(GPTConfig.tiny(V, n_layer=1, n_embd=64)), 2, vocab=20, chain=True, seed=3)
    assert torch.equal(model.mtp_heads[1].mlp.up_proj.weight, other.mtp_heads[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="k must be"):
        add_mtp_heads(model, 0)
    with pytest.raises(TypeError, match="msopt GPT"):
        add_mtp_heads(torch.nn.Linear(2, 2), 1)


def test_draft_layer_reads_earlier_positions_and_drafts_like_greedy():
    model = smollm2_like()
    layer = DraftLayer(model.config, vocab=0, seed=0).eval()
    h, emb = torch.randn(1, 9, 576), torch.randn(1, 9, 576)
    with torch.no_grad():
        out = layer(h, emb)
        changed = h.clone()
        changed[:, 2] += 1
        out2 = layer(changed, emb)
        assert out.shape == (1, 9, 576)
        assert torch.equal(out[:, :2], out2[:, :2])                             # causal: the past does not see t = 2
        assert not torch.allclose(out[:, 5], out2[:, 5])                           # later positions attend back to it
        cache = KVCache(layer.config, 1, 16)
        step = torch.cat([layer(h[:, :6], emb[:, :6], cache), layer(h[:, 6:], emb[:, 6:], cache)], 1)
        assert torch.allclose(step, out, atol=1e-5) and cache.pos == 9               # cached = whole sequence
    assert torch.equal(DraftLayer(model.config, seed=0).merge.weight, layer.merge.weight)   # seeded draw
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 12)]
    for k in (1, 2, 4):                            # an untrained layer drafts badly: the output is still greedy's
        for p in prompts:
            ids = torch.tensor([p])
            fast, stats = speculative_generate(model, ids, 30, n_draft=k, draft=layer, stop_tokens=[])
            assert torch.equal(fast, generate(model, ids, 30, stop_tokens=[])), (k, p)
            assert stats.new_tokens == 30 and len(stats.proposed) == k
    with pytest.raises(ValueError, match="give n_draft >= 1"):
        speculative_generate(model, torch.tensor([prompts[0]]), 5, draft=layer)
    with pytest.raises(ValueError, match="DraftLayer of the model's width"):
        speculative_generate(model, torch.tensor([prompts[0]]), 5, draft=DraftLayer(GPTConfig.tiny(V)), n_draft=2)


def test_eagle_draft_stage_learns_and_leaves_the_trunk():
    model = smollm2_like()
    prompts = [torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(12)]
    seqs = greedy_continuations(model, prompts, 30, batch_size=6)
    ids = torch.tensor(seqs[:2])
    with torch.no_grad():
        before = model(ids)
    stage = EagleDraft(seqs[:10], seqs[:3], vocab=128, prompt_lens=[6] * 10, val_prompt_lens=[6] * 3, steps=30,
                       lr=3e-3, eval_every=15, progress=False, batch_size=4)          # val: does it fit its text?
    report = stage.run(model)
    layer = stage.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), before)                                    # the trunk is untouched
    assert all(p.requires_grad for p in model.parameters())
    assert report.trainable_params == sum(p.numel() for p in layer.parameters())
    assert report.val_loss < report.val_loss_before
    assert report.after["draft1_top1"] > report.before["draft1_top1"]
    assert layer.vocab.shape == (128,) and 0 < report.after["draft_vocab_coverage"] <= 1
    total = SpeculationStats(proposed=[0] * 2, accepted=[0] * 2)
    for p in prompts[:4]:
        fast, stats = speculative_generate(model, torch.tensor([p]), 30, n_draft=2, draft=layer)
        assert torch.equal(fast, generate(model, torch.tensor([p]), 30, stop_tokens=[]))
        total = total + stats
    assert total.acceptance[0] > 0.3                              # training text: the layer has learnt its drafts
    with pytest.raises(ValueError, match="prompt lengths"):
        EagleDraft(seqs, prompt_lens=[6])
    with pytest.raises(TypeError, match="draft layer for an msopt GPT"):
        EagleDraft(seqs).run(torch.nn.Linear(2, 2))


def test_draft_layer_unroll_matches_drafting():
    """Step 2 of `unroll` at position t equals what drafting computes: the layer over the trunk's states up to t,
    then over its own prediction with the next token, through its cache."""
    torch.manual_seed(0)
    layer = DraftLayer(GPTConfig.tiny(V, n_layer=1, n_embd=64, style="llama"), seed=1).eval()
    h, emb = torch.randn(1, 7, 64), torch.randn(1, 7, 64)
    with torch.no_grad():
        one, two = layer.unroll(h, emb, 2)
        assert one.shape == (1, 7, 64) and two.shape == (1, 6, 64)
        assert torch.allclose(one, layer(h, emb), atol=1e-6)
        for t in (0, 3, 5):
            cache = KVCache(layer.config, 1, 16)
            first = layer(h[:, :t + 1], emb[:, :t + 1], cache)[:, -1:]                 # predicted h_{t+1}
            second = layer(first, emb[:, t + 1:t + 2], cache)[:, -1]                     # predicted h_{t+2}
            assert torch.allclose(second, two[:, t], atol=1e-5), t
        assert len(layer.unroll(h, emb, 3)) == 3


def test_tree_mask_reads_each_nodes_branch():
    "One cached pass over a tree of tokens gives each node the logits of a plain pass over its own branch."
    model = smollm2_like()
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    tokens = [7, 11, 13, 17, 19]                                      # root, (0,), (1,), (0, 0), (1, 0)
    nodes = [(), (0,), (1,), (0, 0), (1, 0)]
    mask = torch.ones(5, 10, dtype=torch.bool)
    mask[:, 5:] = torch.tensor([[q == p[:len(q)] for q in nodes] for p in nodes])
    with torch.no_grad():
        cache = model.kv_cache(1, 16)
        model.features(prompt, cache=cache)
        tree = model(torch.tensor([tokens]), mask[None, None], cache=cache, positions=5 + torch.tensor([0, 1, 1, 2, 2]))
        for i, p in enumerate(nodes):
            branch = [tokens[nodes.index(p[:d])] for d in range(len(p) + 1)]
            plain = model(torch.cat([prompt, torch.tensor([branch])], 1))[0, -1]
            assert torch.allclose(tree[0, i], plain, atol=1e-4), p
        cache.keep(5, [0, 2, 4])                                      # the branch root, (1,), (1, 0)
        assert cache.pos == 8
        nxt = model(torch.tensor([[23]]), cache=cache)[0, -1]
        assert torch.allclose(nxt, model(torch.cat([prompt, torch.tensor([[7, 13, 19, 23]])], 1))[0, -1], atol=1e-4)
    with pytest.raises(ValueError, match="increasing offsets"):
        cache.keep(5, [2, 1])
    with pytest.raises(ValueError, match="mask matrix must be boolean"):
        model(torch.tensor([tokens]), mask[None, None].float(), cache=model.kv_cache(1, 16))


@pytest.mark.parametrize("chain", [False, True])
def test_tree_speculative_equals_greedy(chain):
    model = smollm2_like()
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 12)]
    seqs = greedy_continuations(model, prompts * 3, 40, batch_size=3)
    lens = [len(p) for p in prompts * 3]
    MTPHeads(seqs, k=3, vocab=128, chain=chain, prompt_lens=lens, steps=10, lr=3e-3, progress=False,
             batch_size=64).run(model)
    model.eval()
    tree = choose_tree(model, seqs, lens, 6)
    assert len(tree) == 6 and tree == sorted(tree, key=lambda p: (len(p), p))
    assert all(p[:-1] in tree for p in tree if len(p) > 1)                    # every node's parent is in the tree
    chain_stats = tree_stats = SpeculationStats(proposed=[0] * 3, accepted=[0] * 3)
    for p in prompts:
        ids, greedy = torch.tensor([p]), generate(model, torch.tensor([p]), 40, stop_tokens=[])
        for shape in (tree, [(0,), (1,), (2,), (3,)], [(0,), (0, 0), (0, 0, 0)]):
            fast, stats = speculative_generate(model, ids, 40, tree=shape)
            assert torch.equal(fast, greedy), (chain, shape, p)
            assert stats.new_tokens == 40
        tree_stats = tree_stats + speculative_generate(model, ids, 40, tree=[(0,), (1,), (2,), (3,)])[1]
        chain_stats = chain_stats + speculative_generate(model, ids, 40, n_draft=1)[1]
        assert speculative_generate(model, ids, 40, tree=[(0,), (0, 0)])[1] == speculative_generate(
            model, ids, 40, n_draft=2)[1]                                       # a chain is the plain drafts
        stop = int(greedy[0, len(p) + 9])
        assert torch.equal(speculative_generate(model, ids, 40, tree=tree, stop_tokens=[stop])[0],
                           generate(model, ids, 40, stop_tokens=[stop]))
    assert tree_stats.acceptance[0] >= chain_stats.acceptance[0]             # four candidates beat one


def test_tree_bad_input():
    model = mtp_model(2, trained=False)
    ids = torch.tensor([[1, 2, 3]])
    for tree in ([(0, 0)], [(0,), (0,)], [(0,), (0, 0, 0)], [(-1,)], [()], []):
        with pytest.raises(ValueError, match="tree must"):
            speculative_generate(model, ids, 5, tree=tree)
    with pytest.raises(ValueError, match="without n_draft"):
        speculative_generate(model, ids, 5, tree=[(0,)], n_draft=1)
    with pytest.raises(ValueError, match="extra heads"):
        choose_tree(GPT(GPTConfig.tiny(V, n_layer=1)), [[1, 2, 3]], [1], 2)
    with pytest.raises(ValueError, match="one prompt length per sequence"):
        choose_tree(model, [[1, 2, 3]], [1, 2], 2)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="needs a PyTorch built with MKL")
def test_prepack_linears_same_logits_every_width():
    model = smollm2_like()
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = [model(ids[:, :w]) for w in range(1, 11)]
        assert prepack_linears(model, rows=8) is model
        packed = [model(ids[:, :w]) for w in range(1, 11)]
    for w, (a, b) in enumerate(zip(plain, packed), start=1):
        assert torch.allclose(a, b, atol=1e-4), w
        assert torch.equal(a, b) == (w < 4 or w > 8), w                    # only 4-8 rows take the packed kernel
    loss = model(ids[:, :5]).sum()                                           # with gradients: the plain kernel
    loss.backward()
    assert model.lm_head.weight.grad is not None
    prepack_linears(model, rows=0)
    assert "forward" not in model.lm_head.__dict__ and not hasattr(model.lm_head, "packed_weight")
    with pytest.raises(ValueError, match="float32 weights on the CPU"):
        prepack_linears(smollm2_like().double())


def test_chat_requests_other_templates_are_new_requests():
    "The default requests keep their order (held-out ones first); MORE_REQUESTS gives as many others, none shared."
    base, more = chat_requests(), chat_requests(templates=MORE_REQUESTS)
    assert len(base) == len(REQUESTS) * len(TOPICS) == len(set(base))
    assert len(more) == len(MORE_REQUESTS) * len(TOPICS) == len(set(more))
    assert not set(base) & set(more)
    assert base == chat_requests(seed=0) and base != chat_requests(seed=1)
    with pytest.raises(ValueError, match="one {} field"):
        chat_requests(templates=("Write about the sea.",))
