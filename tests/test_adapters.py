import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from msopt.adapters import (
    GradualUnfreezing,
    LoRALinear,
    add_lora,
    discriminative_param_groups,
    drop_blocks,
    freeze,
    layer_groups,
    merge_lora,
    remove_lora,
    trainable_parameters,
    unfreeze,
    unmerge_lora,
)
from msopt.models import GPT, LSTMLM, Encoder, GPTConfig, count_params, to_hf
from msopt.train import TrainConfig, Trainer

V = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models train faster on one thread, and much faster when other jobs share the cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt(style="gpt2", n_layer=3, tie=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(V, n_layer=n_layer, n_embd=32, n_head=2, block_size=16, style=style, tie_weights=tie))


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- freeze / unfreeze -----------------------------------------------------------------------------------------------
def test_freeze_by_pattern_module_and_index():
    m = gpt()
    frozen = freeze(m, "transformer.blocks.0")                   # a module name covers its parameters
    assert frozen and all(n.startswith("transformer.blocks.0.") for n in frozen)
    assert not any(n.startswith("transformer.blocks.0.") for n in trainable_names(m))
    freeze(m, "*.attn.*")
    assert not any(".attn." in n for n in trainable_names(m))
    unfreeze(m)
    assert trainable_parameters(m)[0] == count_params(m)
    names = freeze(m, [0, -1])                                   # embeddings and the top group
    assert "transformer.wte.weight" in names and "transformer.ln_f.weight" in names
    assert unfreeze(m, -1) == ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def test_freeze_bad_input():
    m = gpt()
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(m, "transformer.nope.*")
    with pytest.raises(ValueError, match="out of range"):
        freeze(m, 99)
    with pytest.raises(TypeError, match="name patterns"):
        freeze(m, [1.5])


def test_trainable_parameters_counts_tied_once():
    m = gpt(tie=True)
    assert trainable_parameters(m) == (count_params(m), count_params(m))
    freeze(m, "transformer.wte")                                 # also freezes the tied lm_head
    t, total = trainable_parameters(m)
    assert total - t == V * 32 and not m.lm_head.weight.requires_grad


# -- layer groups --------------------------------------------------------------------------------------------------
def test_layer_groups_msopt_models():
    for model in (gpt(tie=False), gpt(style="llama"), Encoder(GPTConfig.tiny(V, n_layer=2, n_embd=32, n_head=2))):
        groups = layer_groups(model)
        L = model.config.n_layer
        assert list(groups) == ["embeddings"] + [f"block.{i}" for i in range(L)] + ["head"]
        flat = [id(p) for ps in groups.values() for p in ps]
        assert len(flat) == len(set(flat)) == len(list(model.parameters()))
        assert groups["embeddings"][0] is model.transformer.wte.weight
        assert any(p is model.transformer.blocks[L - 1].ln_1.weight for p in groups[f"block.{L - 1}"])


def test_layer_groups_hf_models():
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    groups = layer_groups(bert)
    assert list(groups) == ["embeddings", "block.0", "block.1", "head"]
    assert sum(p.numel() for ps in groups.values() for p in ps) == count_params(bert)
    assert any(p is bert.pooler.dense.weight for p in groups["head"])
    hf = to_hf(gpt(style="llama"))
    assert len(layer_groups(hf)) == 3 + 2


def test_layer_groups_needs_blocks():
    with pytest.raises(ValueError, match="no stack of blocks"):
        layer_groups(LSTMLM(V, 16, 16, 1))


# -- discriminative learning rates ---------------------------------------------------------------------------------
def test_discriminative_param_groups():
    m = gpt(tie=False)
    groups = discriminative_param_groups(m, lr=1e-3, decay=2.0, weight_decay=0.1)
    rates = {g["name"].replace(".no_decay", ""): g["lr"] for g in groups}
    assert rates["head"] == 1e-3 and rates["block.2"] == 5e-4 and rates["embeddings"] == pytest.approx(1e-3 / 16)
    assert all((g["weight_decay"] == 0.0) == g["name"].endswith(".no_decay") for g in groups)
    assert all(p.dim() >= 2 for g in groups if not g["name"].endswith(".no_decay") for p in g["params"])
    covered = [id(p) for g in groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in m.parameters())
    freeze(m)                                                     # frozen parameters are still included
    assert sum(len(g["params"]) for g in discriminative_param_groups(m, 1e-3)) == len(list(m.parameters()))
    assert {g["lr"] for g in discriminative_param_groups(m, 1e-3, decay=1.0)} == {1e-3}
    torch.optim.AdamW(groups)                                     # valid optimizer groups


def test_discriminative_param_groups_bad_input():
    with pytest.raises(ValueError, match="decay must be"):
        discriminative_param_groups(gpt(), 1e-3, decay=0.5)
    with pytest.raises(ValueError, match="lr must be"):
        discriminative_param_groups(gpt(), -1.0)


# -- gradual unfreezing --------------------------------------------------------------------------------------------
class Copy:
    "Micro-batch i: random ids; the target is the input (learnable with a tiny model)."
    def batch(self, i):
        x = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(i))
        return x, x


def copy_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def unfreezing_run(out_dir=None, stop_at=None, steps=8):
    m = gpt(tie=False)
    opt = torch.optim.AdamW(discriminative_param_groups(m, 1e-2, decay=2.0))
    cb = GradualUnfreezing(layer_groups(m), every=2)
    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, progress=False, eval_every=100)
    trainer = Trainer(m, copy_loss, Copy(), cfg, optimizer=opt, callbacks=[cb], out_dir=out_dir)
    trainer.fit(stop_at=stop_at)
    return m, trainer


def test_gradual_unfreezing_schedule_and_training():
    m0 = gpt(tie=False)
    m, _ = unfreezing_run(stop_at=2)                             # steps 0, 1: only the head group trained
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.cpu(), dict(m0.named_parameters())[n])}
    assert changed == {"transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"}
    m, trainer = unfreezing_run(steps=10)                        # from step 8 on, all 5 groups train
    assert all(not torch.equal(p.cpu(), q) for p, q in zip(m.parameters(), m0.parameters()))
    cb = trainer.callbacks[0]
    assert [cb.n_trainable(s) for s in range(0, 12, 2)] == [1, 2, 3, 4, 5, 5]


def test_gradual_unfreezing_resume_is_exact(tmp_path):
    whole, _ = unfreezing_run()
    unfreezing_run(tmp_path, stop_at=3)
    resumed, _ = unfreezing_run(tmp_path)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_gradual_unfreezing_bad_input():
    with pytest.raises(ValueError, match=r"every \(steps between unfreezing two groups\) must be a positive int"):
        GradualUnfreezing(layer_groups(gpt()), every=0)
    with pytest.raises(ValueError, match="at least one layer group"):
        GradualUnfreezing([], every=1)


# -- LoRA ----------------------------------------------------------------------------------------------------------
def test_lora_linear_starts_as_base_and_trains_only_a_b():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))
    assert lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (8, 4) and lora.scaling == 2.0
    assert lora.lora_A.abs().max() <= 1 / math.sqrt(16)        # Kaiming uniform with a = sqrt(5): bound 1/sqrt(in)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    lora(x).sum().backward()
    assert base.weight.grad is None and lora.lora_B.grad is not None


def test_lora_linear_merge_unmerge():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 8), r=2, alpha=4)
    nn.init.normal_(lora.lora_B)
    x, w0 = torch.randn(4, 16), lora.base.weight.clone()
    y = lora(x)
    lora.merge()
    lora.merge()                                   # merging twice is a no-op
    assert lora.merged and torch.allclose(lora(x), y, atol=1e-5)
    torch.testing.assert_close(lora.base.weight, w0 + lora.delta_weight())
    lora.unmerge()
    assert not lora.merged and torch.allclose(lora.base.weight, w0, atol=1e-6)


def test_lora_linear_bad_input():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="rank r must be"):
        LoRALinear(nn.Linear(4, 4), r=0)


def peft_pair(r=4, alpha=8, seed=0, targets=("q_proj", "v_proj")):
    "An msopt Llama-style GPT with LoRA and the same model in HF + peft, with the same non-zero A and B."
    from peft import LoraConfig, get_peft_model
    ours = gpt(style="llama", n_layer=2, seed=seed).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(to_hf(ours), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    theirs.eval()
    add_lora(ours, r=r, alpha=alpha, targets=targets)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for i, block in enumerate(ours.transformer.blocks):
            for proj in targets:
                layer = getattr(theirs.base_model.model.model.layers[i].self_attn, proj)
                layer.lora_B["default"].weight.normal_(0, 0.1)
                getattr(block.attn, proj).lora_A.copy_(layer.lora_A["default"].weight)
                getattr(block.attn, proj).lora_B.copy_(layer.lora_B["default"].weight)
    return ours, theirs


@pytest.mark.parametrize("r, targets", [(4, ("q_proj", "v_proj")), (2, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                        (16, ("q_proj", "k_proj", "v_proj", "o_proj"))])
def test_lora_matches_peft(r, targets):
    "The ranks and targets chapter 09 compares: the same logits and trainable counts as peft."
    ours, theirs = peft_pair(r=r, alpha=2 * r, targets=targets)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)
        with theirs.disable_adapter():
            base_logits = theirs(x).logits
    assert not torch.allclose(ours(x), base_logits, atol=1e-3)  # B != 0: the check is not trivial
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert trainable_parameters(ours)[0] == 2 * len(targets) * r * (32 + 32)


def test_merged_lora_matches_peft_merge_and_unload():
    ours, theirs = peft_pair()
    x = ids()
    with torch.no_grad():
        before = ours(x)
        merge_lora(ours)
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=1e-5)
        merged = theirs.merge_and_unload()
        w_theirs = merged.model.layers[1].self_attn.v_proj.weight
        torch.testing.assert_close(ours.transformer.blocks[1].attn.v_proj.base.weight, w_theirs, atol=1e-6, rtol=0)
        unmerge_lora(ours)
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=1e-5)


def test_add_lora_freezes_all_but_adapters_and_named_head():
    m = gpt(tie=False)
    add_lora(m, r=2, alpha=4, targets=["q_proj", "*.mlp.up_proj"], trainable=["lm_head"])
    names = trainable_names(m)
    assert names == {n for n, _ in m.named_parameters() if n.endswith(("lora_A", "lora_B"))} | {"lm_head.weight"}
    assert sum(isinstance(mod, LoRALinear) for mod in m.modules()) == 2 * 3


def test_add_lora_bad_input():
    with pytest.raises(ValueError, match="no module matches"):
        add_lora(gpt(), targets=("query",))
    m = add_lora(gpt())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(m)
    with pytest.raises(TypeError, match="must be nn.Linear"):
        add_lora(gpt(), targets=("attn",))


def test_lora_training_moves_only_adapters():
    m = gpt(style="llama")
    add_lora(m, r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), trainable=["transformer.wte"])
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(steps=30, lr=1e-2, warmup_steps=0, progress=False, eval_every=100)
    history = Trainer(m, copy_loss, Copy(), cfg).fit()
    losses = history.series("train_loss")[1]
    assert np.mean(losses[-5:]) < losses[0] - 0.5
    assert all(torch.equal(p.cpu(), frozen[n].cpu()) for n, p in m.named_parameters() if n in frozen)


def test_remove_lora():
    x = ids()
    m = gpt()
    before = m(x)
    add_lora(m)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.1)
    adapted = m(x)
    merge_lora(m)                                                # removing a merged model keeps the merge once
    remove_lora(m, merge=True)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert "transformer.blocks.0.attn.q_proj.weight" in dict(m.named_parameters())
    torch.testing.assert_close(m(x), adapted, atol=1e-5, rtol=1e-5)
    m2 = gpt()
    add_lora(m2)
    with torch.no_grad():
        m2.transformer.blocks[0].attn.q_proj.lora_B.normal_()
    merge_lora(m2)
    remove_lora(m2, merge=False)
    torch.testing.assert_close(m2(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        remove_lora(m2)


# -- dropping blocks -----------------------------------------------------------------------------------------------
def test_drop_blocks():
    m = gpt(n_layer=4)
    kept = [b for b in m.transformer.blocks[:3]]
    drop_blocks(m, 1)
    assert m.config.n_layer == m.transformer.config.n_layer == 3
    assert all(a is b for a, b in zip(m.transformer.blocks, kept))
    assert m(ids()).shape == (2, 12, V)
    assert len(layer_groups(m)) == 3 + 2
    enc = Encoder(GPTConfig.tiny(V, n_layer=2, n_embd=32, n_head=2))
    assert drop_blocks(enc, 0).config.n_layer == 2


def test_drop_blocks_bad_input():
    with pytest.raises(ValueError, match="at least one block stays"):
        drop_blocks(gpt(n_layer=2), 2)
    with pytest.raises(TypeError, match="msopt GPT or Encoder"):
        drop_blocks(LSTMLM(V, 16, 16, 1), 1)
