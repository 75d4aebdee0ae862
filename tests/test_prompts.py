"""Tests of msopt.prompts: templates, verbalizer scoring, contextual calibration, soft prompts (vs peft), prefix tuning
and the PromptTune stage."""
import numpy as np
import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from msopt.data import train_tokenizer
from msopt.metrics import accuracy
from msopt.models import GPT, GPTConfig, count_params, to_hf
from msopt.prompts import (
    CONTENT_FREE,
    PrefixCache,
    PrefixTuning,
    PromptData,
    PromptTemplate,
    SoftPrompt,
    choice_scores,
    content_free_scores,
    contextual_calibration,
    encode_choices,
    prompt_loss,
    prompt_predict,
    token_ids,
)
from msopt.stages import PromptTune
from msopt.tasks import LabelledTexts
from msopt.train import TrainConfig, Trainer

TEXTS = ["To be, or not to be, that is the question", "All the world's a stage", "Now is the winter of our discontent",
         "O Romeo, Romeo, wherefore art thou Romeo", "Once more unto the breach, dear friends"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 20 + ["comedy tragedy history Genre:"] * 20, vocab_size=300)


def gpt(style="gpt2", vocab=60, **kw):
    torch.manual_seed(0)
    extra = dict(n_kv_head=1) if style == "llama" else {}
    return GPT(GPTConfig.tiny(vocab_size=vocab, n_layer=2, n_embd=32, n_head=2, style=style, **extra, **kw)).eval()


def test_template_format_and_ids(tok):
    t = PromptTemplate("Text: {text}\nGenre:", (" comedy", " tragedy"))
    assert t.format("abc") == "Text: abc\nGenre:"
    assert t.format("abc", [("x", 1)]) == "Text: x\nGenre: tragedy\n\nText: abc\nGenre:"
    ids = t.ids(tok, TEXTS[0], [(TEXTS[1], 0)], max_text_tokens=3)
    demo = (token_ids(tok, "Text: ") + token_ids(tok, TEXTS[1])[:3] + token_ids(tok, "\nGenre:")
            + token_ids(tok, " comedy") + token_ids(tok, "\n\n"))
    assert ids == demo + token_ids(tok, "Text: ") + token_ids(tok, TEXTS[0])[:3] + token_ids(tok, "\nGenre:")
    assert PromptTemplate("{{literal}} {text}").format("a") == "{literal} a"


@pytest.mark.parametrize("kwargs, match", [
    (dict(template="Passage: {passage}"), r"unknown template field \{passage\}"),
    (dict(template="{text} and {text}"), "exactly once"),
    (dict(template="no field"), "exactly once"),
    (dict(verbalizers=(" a",)), "at least two"),
    (dict(verbalizers=(" a", "")), "non-empty"),
])
def test_template_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        PromptTemplate(**kwargs)
    assert "\n" not in str(e.value)


def test_choice_scores_match_full_forward():
    g = gpt()
    prompts, verbs = [[5, 6, 7], [8, 9], [1]], [[10, 11], [12], [10, 13, 14]]
    ids, mask, pos, tok_, valid = encode_choices(prompts, verbs)
    with torch.no_grad():
        s_sum = choice_scores(g, ids, mask, pos, tok_, valid)
        s_mean = choice_scores(g, ids, mask, pos, tok_, valid, reduce="mean")
        for n, p in enumerate(prompts):
            for k, v in enumerate(verbs):
                lp = torch.log_softmax(g(torch.tensor([p + v])), -1)[0]
                want = sum(lp[len(p) - 1 + j, t] for j, t in enumerate(v))
                assert torch.allclose(s_sum[n, k], want, atol=1e-5)
                assert torch.allclose(s_mean[n, k], want / len(v), atol=1e-5)


def test_single_token_verbalizers_share_one_row():
    ids, *_ = encode_choices([[1, 2], [3]], [[4], [5], [6]])
    assert ids.shape[0] == 2
    ids, *_ = encode_choices([[1, 2], [3]], [[4, 7], [5], [6]])
    assert ids.shape[0] == 4                                       # prompt+[4] and prompt alone, per prompt


def test_encode_choices_errors():
    with pytest.raises(ValueError, match="verbalizer encodes to no tokens"):
        encode_choices([[1]], [[2], []])
    with pytest.raises(ValueError, match="prompt encodes to no tokens"):
        encode_choices([[]], [[2], [3]])
    with pytest.raises(ValueError, match="unknown reduce 'max'"):
        choice_scores(gpt(), *encode_choices([[1]], [[2], [3]]), reduce="max")


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_soft_prompt_from_tokens_equals_reading_them(style):
    g = gpt(style)
    u, x = [3, 14, 15], torch.randint(0, 60, (2, 6))
    soft = SoftPrompt(g, 3, init_ids=u)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0                                                # right padding
    with torch.no_grad():
        want = g(torch.cat([torch.tensor(u).expand(2, -1), x], 1))[:, 3:]
        assert torch.allclose(soft(x), want, atol=1e-5)
        assert torch.allclose(soft(x, mask)[1, :4], want[1, :4], atol=1e-5)
    assert count_params(soft, trainable_only=True) == 3 * 32
    assert all(not p.requires_grad for p in g.parameters())


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_soft_prompt_matches_peft_prompt_tuning(style):
    g = gpt(style)
    soft = SoftPrompt(g, 5)
    with torch.no_grad():
        soft.prompt.normal_(0, 0.5)
        pm = get_peft_model(to_hf(g).eval(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
        pm.prompt_encoder["default"].embedding.weight.copy_(soft.prompt)
        x = torch.randint(0, 60, (3, 7))
        mask = torch.ones_like(x)
        mask[2, 5:] = 0
        theirs = pm(input_ids=x, attention_mask=mask).logits[:, 5:]
        ours = soft(x, mask)
    assert torch.allclose(ours[:2], theirs[:2], atol=1e-5)
    assert torch.allclose(ours[2, :5], theirs[2, :5], atol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_prefix_tuning_init_equals_reading_tokens(style):
    g = gpt(style)
    u, x = [7, 8, 9, 10], torch.randint(0, 60, (2, 5))
    pre = PrefixTuning(g, 4, init_ids=u)
    with torch.no_grad():
        assert torch.allclose(pre(x), g(torch.cat([torch.tensor(u).expand(2, -1), x], 1))[:, 4:], atol=1e-5)
    kv = g.config.kv_heads
    assert pre.keys.shape == (2, kv, 4, 16)
    assert count_params(pre, trainable_only=True) == 2 * 2 * kv * 4 * 16


def test_prefix_tuning_matches_peft_prefix_tuning():
    g = gpt("gpt2")
    pre = PrefixTuning(g, 3)
    with torch.no_grad():
        pre.keys.normal_()
        pre.values.normal_()
        pm = get_peft_model(to_hf(g).eval(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        L, H, P, hd = pre.keys.shape
        kv = torch.stack([pre.keys, pre.values], 1)                        # (L, 2, H, P, hd)
        pm.prompt_encoder["default"].embedding.weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(P, -1))
        x = torch.randint(0, 60, (2, 6))
        theirs = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits
        ours = pre(x, torch.ones_like(x))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_prefix_cache_records_then_prepends():
    c = PrefixCache()
    k = torch.randn(1, 2, 3, 4)
    assert c.update(0, k, k)[0] is k and c.pos == 0
    c2 = PrefixCache([k], [k])
    out, _ = c2.update(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    assert c2.pos == 3 and out.shape == (1, 2, 8, 4) and torch.equal(out[:, :, :3], k)


def test_wrappers_bad_input():
    g = gpt()
    for cls in (SoftPrompt, PrefixTuning):
        with pytest.raises(ValueError, match=r"prompt length \(number of virtual tokens\) must be a positive int") as e:
            cls(g, 0)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="init_ids has 2 ids for 3"):
            cls(g, 3, init_ids=[1, 2])
        with pytest.raises(TypeError, match="wraps an msopt GPT"):
            cls(torch.nn.Linear(2, 2), 3)


def test_prompt_tuning_learns(tok):
    """A soft prompt on a frozen random GPT learns to separate two classes of texts by their verbalizer scores."""
    torch.manual_seed(0)
    g = GPT(GPTConfig.tiny(vocab_size=tok.get_vocab_size(), n_layer=1, n_embd=32, n_head=2))
    frozen = [p.clone() for p in g.parameters()]
    t = PromptTemplate("{text}\nGenre:", (" comedy", " tragedy"))
    texts, labels = TEXTS[:4] * 4, [0, 1, 0, 1] * 4
    data = PromptData(tok, t, texts, labels, batch_size=8)
    soft = SoftPrompt(g, 4)
    with torch.no_grad():
        before = float(sum(prompt_loss(soft, b) * len(b[-1]) for b in data)) / len(data)
    Trainer(soft, prompt_loss, data, TrainConfig(steps=20, lr=1e-1, warmup_steps=0, weight_decay=0.0, progress=False,
                                                 eval_every=20)).fit()
    with torch.no_grad():
        after = float(sum(prompt_loss(soft.eval(), b) * len(b[-1]) for b in data)) / len(data)
    preds, scores = prompt_predict(soft, data)
    assert after < before and scores.shape == (16, 2)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(frozen, g.parameters()))          # the model stayed frozen
    assert data.batch(3)[-1].shape[0] == 8 and len(list(data)) == 2


def test_prompt_data_errors(tok):
    t = PromptTemplate()
    with pytest.raises(ValueError, match="as many labels as texts"):
        PromptData(tok, t, ["a"], [0, 1])
    with pytest.raises(ValueError, match="unknown reduce"):
        PromptData(tok, t, ["a"], [0], reduce="max")


def test_contextual_calibration_divides_out_the_bias():
    """Scores = evidence + a class prior that the prompt adds; content-free rows show that prior alone (at any offset):
    calibration gives back the evidence. A uniform bias changes nothing; the argmax is the paper's W p."""
    torch.manual_seed(0)
    evidence, bias = torch.randn(20, 3).log_softmax(-1), torch.tensor([0.7, 0.2, 0.1])
    scores = evidence + bias.log()
    cf = bias.log().expand(2, 3) + torch.tensor([[0.3], [-1.0]])
    assert torch.allclose(contextual_calibration(scores, cf), evidence.softmax(-1), atol=1e-6)
    assert torch.allclose(contextual_calibration(scores, torch.zeros(3, 3)), scores.softmax(-1), atol=1e-6)
    cf = torch.randn(3, 3)
    p_cf = cf.softmax(-1).mean(0).numpy()
    paper = scores.softmax(-1).numpy() @ np.linalg.inv(np.diag(p_cf)).T
    assert (contextual_calibration(scores, cf).argmax(-1).numpy() == paper.argmax(-1)).all()
    assert torch.allclose(contextual_calibration(scores, cf).sum(-1), torch.ones(20))


@pytest.mark.parametrize("scores, cf", [(torch.zeros(4, 3), torch.zeros(2, 2)), (torch.zeros(3), torch.zeros(2, 3)),
                                        (torch.zeros(4, 3), torch.zeros(0, 3))])
def test_contextual_calibration_errors(scores, cf):
    with pytest.raises(ValueError, match="must be \\(N, K\\) and \\(M, K\\)") as e:
        contextual_calibration(scores, cf)
    assert "\n" not in str(e.value)


def test_content_free_scores_are_prompt_scores(tok):
    torch.manual_seed(0)
    g = GPT(GPTConfig.tiny(vocab_size=tok.get_vocab_size(), n_layer=1, n_embd=32, n_head=2)).eval()
    t, demos = PromptTemplate("{text}\nGenre:", (" comedy", " tragedy")), [(TEXTS[0], 0), (TEXTS[1], 1)]
    cf = content_free_scores(g, tok, t, demos, max_text_tokens=4)
    want = prompt_predict(g, PromptData(tok, t, list(CONTENT_FREE), [0, 0, 0], demos, max_text_tokens=4))[1]
    assert cf.shape == (3, 2) and torch.allclose(cf, want)
    assert content_free_scores(g, tok, t, inputs=["N/A"]).shape == (1, 2)
    with pytest.raises(ValueError, match="list of content-free strings"):
        content_free_scores(g, tok, t, inputs="N/A")


@pytest.mark.parametrize("method", ["soft", "prefix"])
def test_prompt_tune_stage_predicts_and_evaluates(tok, method):
    torch.manual_seed(0)
    g = GPT(GPTConfig.tiny(vocab_size=tok.get_vocab_size(), n_layer=1, n_embd=32, n_head=2))
    frozen = [p.clone() for p in g.parameters()]
    data = LabelledTexts(TEXTS[:4] * 3, [0, 1, 0, 1] * 3, ["comedy", "tragedy"])
    stage = PromptTune(data, data, tok, PromptTemplate("{text}\nGenre:", (" comedy", " tragedy")), method=method,
                       n_virtual=3, steps=6, lr=5e-2, eval_every=2, batch_size=4, keep_best=True,
                       select_by="accuracy", progress=False)
    with pytest.raises(ValueError, match="run the stage"):
        stage.predict(data)
    report = stage.run(g)
    preds, scores = stage.predict(data), stage.evaluate(data)
    assert preds.shape == (12,) and scores["accuracy"] == accuracy(preds, data.labels) == report["accuracy"]
    assert np.array(scores["confusion"]).sum() == 12 and report["accuracy"] >= report["accuracy_before"]
    assert report.trainable_params == (3 * 32 if method == "soft" else 2 * 3 * 32)
    assert all(torch.equal(a, b) for a, b in zip(frozen, g.parameters()))           # the GPT stayed frozen
