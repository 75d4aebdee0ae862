"""Bad input across the package: each case raises a ValueError or TypeError whose message is ONE line that names the
offending value and says what to do (never a deep stack trace from inside torch)."""
import numpy as np
import pytest
import torch

from msopt.data import RandomBlocks, load_corpus, pack, split_documents, train_tokenizer
from msopt.generate import generate
from msopt.metrics import accuracy, bleu, compute, rouge
from msopt.models import GPT, GPTConfig
from msopt.objectives import mask_tokens
from msopt.optim import build_optimizer, build_schedule
from msopt.pipeline import Pipeline
from msopt.stages import DomainAdapt, FineTune, Pretrain
from msopt.tasks import genre_task
from msopt.train import TrainConfig, Trainer

IDS = np.arange(200, dtype=np.uint16) % 50


def gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(50, n_layer=1, n_head=2, n_embd=16, block_size=16, **kw))


CASES = {
    # data
    "unknown corpus": (lambda: load_corpus("hamlet-only"), "hamlet-only"),
    "unknown genre": (lambda: load_corpus(genres="sonnet"), "sonnet"),
    "val fraction": (lambda: split_documents(load_corpus(genres="poem"), val_fraction=1.5), "val_fraction=1.5"),
    "tiny vocabulary": (lambda: train_tokenizer(["to be"], vocab_size=10), "vocab_size=10"),
    "pack window": (lambda: pack(IDS, 0), "seq_len must be a positive int, got 0"),
    "blocks longer than data": (lambda: RandomBlocks(IDS[:10], 16, 2), "seq_len=16"),
    # models
    "heads do not divide width": (lambda: GPTConfig.tiny(50, n_embd=30, n_head=4), "n_embd=30"),
    "unknown style": (lambda: GPTConfig.tiny(50, style="gpt5"), "gpt5"),
    "token id outside vocabulary": (lambda: generate(gpt(), [[3, 60]], 2), "60"),
    "sequence longer than context": (lambda: gpt()(torch.zeros(1, 40, dtype=torch.long)), "T=40"),
    # optimizers and trainer
    "unknown optimizer": (lambda: build_optimizer(gpt(), "adamq"), "adamq"),
    "unknown schedule": (lambda: build_schedule("zigzag", 10, 1, 0.1), "zigzag"),
    "negative steps": (lambda: TrainConfig(steps=-3), "steps must be a positive int, got -3"),
    "unknown precision": (lambda: TrainConfig(precision="fp8"), "fp8"),
    "train data not batches": (lambda: Trainer(gpt(), lambda m, b: 0, [1, 2, 3]), "list"),
    "checkpoint directory is a file": (lambda: Trainer(gpt(), lambda m, b: 0, lambda i: i, out_dir=__file__),
                                       "is a file"),
    "zero batch size": (lambda: Pretrain("clm", train=IDS, batch_size=0), "batch_size must be a positive int, got 0"),
    "selection without validation": (lambda: Trainer(gpt(), lambda m, b: 0, lambda i: i, TrainConfig(keep_best=True)),
                                     "give val_data="),
    # stages and pipeline
    "unknown objective": (lambda: Pretrain("mlm-typo", train=IDS), "mlm-typo"),
    "mask rate": (lambda: mask_tokens(torch.zeros(2, 8, dtype=torch.long), 2, 50, prob=0.0), "prob=0.0"),
    "empty keyword list": (lambda: DomainAdapt(train=IDS, keywords=[], term_weight=3.0), "keywords"),
    "unknown task": (lambda: FineTune("regress", train=[1]), "regress"),
    "labels outside the head": (lambda: FineTune("classify", train=(torch.zeros(4, 8, dtype=torch.long),
                                                                   torch.ones(4, 8, dtype=torch.long),
                                                                   torch.tensor([0, 1, 2, 5])), n_classes=3),
                                "label 5 but the head has n_classes=3"),
    "one genre": (lambda: genre_task(genres=("comedy",)), "comedy"),
    "empty pipeline": (lambda: Pipeline([], out="x"), "at least one stage"),
    "pipeline out is a file": (lambda: Pipeline([Pretrain("clm", train=IDS, seq_len=8)], out=__file__), "is a file"),
    "not a stage": (lambda: Pipeline([object()], out="x"), "object"),
    # generation
    "top_p outside (0, 1]": (lambda: generate(gpt(), [[1, 2]], 3, top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    "negative top_k": (lambda: generate(gpt(), [[1, 2]], 3, top_k=-1), "top_k must be an int >= 0"),
    "zero beams": (lambda: generate(gpt(), [[1, 2]], 3, num_beams=0), "num_beams must be an int >= 1"),
    "empty prompt": (lambda: generate(gpt(), [[]], 3), "empty"),
    "prompt longer than context": (lambda: generate(gpt(), [list(range(20))], 3), "exceeds the context length 16"),
    # metrics
    "mismatched lengths": (lambda: accuracy([0, 1, 1], [0, 1]), "preds has 3 entries but labels has 2"),
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
