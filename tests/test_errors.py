"""Bad input across the package: each case raises a ValueError or TypeError whose message is ONE line that names the
offending value and says what to do (never a deep stack trace from inside torch)."""
import numpy as np
import pytest
import torch

from msopt.data import RandomBlocks, load_corpus, pack, split_documents, train_tokenizer
from msopt.generate import generate
from msopt.metrics import accuracy, bleu, compute, rouge
from msopt.models import GPT, GPTConfig
from msopt.optim import build_optimizer, build_schedule
from msopt.pipeline import Pipeline
from msopt.stages import DomainAdapt, FineTune, Pretrain, genre_task, mask_tokens
from msopt.train import TrainConfig, Trainer

IDS = np.arange(200, dtype=np.uint16) % 50


def gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(50, n_layer=1, n_head=2, n_embd=16, block_size=16, **kw))


CASES = {
    # data
    "unknown corpus": (lambda: load_corpus("hamlet-only"), "hamlet-only"),
    "unknown genre": (lambda: load_corpus(genres="sonnet"), "sonnet"),
    "val fraction": (lambda: split_documents(load_corpus(genres="poem"), val_fraction=1.5), "1.5"),
    "tiny vocabulary": (lambda: train_tokenizer(["to be"], vocab_size=10), "10"),
    "pack window": (lambda: pack(IDS, 0), "seq_len"),
    "blocks longer than data": (lambda: RandomBlocks(IDS[:10], 16, 2), "16"),
    # models
    "heads do not divide width": (lambda: GPTConfig.tiny(50, n_embd=30, n_head=4), "30"),
    "unknown style": (lambda: GPTConfig.tiny(50, style="gpt5"), "gpt5"),
    "token id outside vocabulary": (lambda: gpt()(torch.tensor([[3, 60]])), "60"),
    "sequence longer than context": (lambda: gpt()(torch.zeros(1, 40, dtype=torch.long)), "40"),
    # optimizers and trainer
    "unknown optimizer": (lambda: build_optimizer(gpt(), "adamq"), "adamq"),
    "unknown schedule": (lambda: build_schedule("zigzag", 10, 1, 0.1), "zigzag"),
    "negative steps": (lambda: TrainConfig(steps=-3), "-3"),
    "unknown precision": (lambda: TrainConfig(precision="fp8"), "fp8"),
    "train data not batches": (lambda: Trainer(gpt(), lambda m, b: 0, [1, 2, 3]), "list"),
    # stages and pipeline
    "unknown objective": (lambda: Pretrain("mlm-typo", train=IDS), "mlm-typo"),
    "mask rate": (lambda: mask_tokens(torch.zeros(2, 8, dtype=torch.long), 2, 50, prob=0.0), "0.0"),
    "empty keyword list": (lambda: DomainAdapt(train=IDS, keywords=[], term_weight=3.0), "keywords"),
    "unknown task": (lambda: FineTune("regress", train=[1]), "regress"),
    "labels outside the head": (lambda: FineTune("classify", train=(torch.zeros(4, 8, dtype=torch.long),
                                                                   torch.ones(4, 8, dtype=torch.long),
                                                                   torch.tensor([0, 1, 2, 5])), n_classes=3), "5"),
    "one genre": (lambda: genre_task(genres=("comedy",)), "comedy"),
    "empty pipeline": (lambda: Pipeline([], out="x"), "stage"),
    "not a stage": (lambda: Pipeline([object()], out="x"), "object"),
    # generation
    "top_p outside (0, 1]": (lambda: generate(gpt(), [[1, 2]], 3, top_p=1.5), "1.5"),
    "negative top_k": (lambda: generate(gpt(), [[1, 2]], 3, top_k=-1), "-1"),
    "zero beams": (lambda: generate(gpt(), [[1, 2]], 3, num_beams=0), "0"),
    "empty prompt": (lambda: generate(gpt(), [[]], 3), "empty"),
    "prompt longer than context": (lambda: generate(gpt(), [list(range(20))], 3), "16"),
    # metrics
    "mismatched lengths": (lambda: accuracy([0, 1, 1], [0, 1]), "3"),
    "empty references": (lambda: bleu(["a cat"], []), "reference"),
    "unknown metric": (lambda: compute("meteor", ["a"], ["a"]), "meteor"),
    "unknown rouge type": (lambda: rouge(["a b"], ["a b"], types=("rougeX",)), "rougeX"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_a_one_line_error(case):
    fn, named = CASES[case]
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message.strip(), f"{case}: a multi-line message: {message!r}"
    assert named.lower() in message.lower(), f"{case}: the message does not name {named!r}: {message!r}"
    assert len(message) < 400
