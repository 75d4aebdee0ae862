"""Time to a validation loss of 1.47 on character-level Shakespeare: nanoGPT's recipe and msopt's, with the Trainer.

    python benchmarks/shakespeare_char.py                                  # a GPU: both recipes, up to 5000 steps
    python benchmarks/shakespeare_char.py --device cpu --max-steps 3 --batch-size 4 --block-size 64 --eval-iters 2
                                                                           # a smoke test of the script on a CPU

The reference is nanoGPT's `config/train_shakespeare_char.py`: 6 layers, 6 heads, width 384, context 256, batch 64,
dropout 0.2, AdamW at 1e-3 with beta2 0.99, 100 warmup steps, cosine decay to 1e-4 over 5000 steps, weight decay 0.1,
clipping at 1.0, bf16 and torch.compile on a GPU. The text is the book's bundled corpus (the complete works, about
five times nanoGPT's 1 MB "tiny Shakespeare"), character level, the first 90 % for training and the rest for
validation, as nanoGPT splits it. The clock stops at the first evaluation at or below the target; evaluation time is
included, as it is in nanoGPT's logs. Prints one JSON line per recipe and one with the ratio of their times.
"""
import argparse
import datetime
import json
import platform
import time

import numpy as np
import torch

from msopt.core import get_device
from msopt.data import RandomBlocks, load_corpus
from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig
from msopt.train import TrainConfig, Trainer

RECIPES = {
    # nanoGPT's shakespeare_char, as close as the msopt Trainer and GPT express it (biases on, as in GPT-2)
    "nanogpt": dict(model=dict(style="gpt2", dropout=0.2), optimizer="adamw", lr=1e-3, betas=(0.9, 0.99),
                    weight_decay=0.1, warmup_steps=100, min_lr_ratio=0.1, schedule="cosine"),
    # msopt's candidate: Llama-style blocks (RoPE, RMSNorm, SwiGLU), Muon on the hidden matrices, less dropout, WSD
    "msopt": dict(model=dict(style="llama", dropout=0.1), optimizer="muon", lr=0.02, betas=(0.9, 0.99),
                  weight_decay=0.0, warmup_steps=50, min_lr_ratio=0.0, schedule="wsd"),
}


class Reached(Exception):
    "The validation loss reached the target."


def char_data(val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, int]:
    "Character ids of the bundled corpus: (train, val, vocabulary size)."
    text = "\n\n".join(d.text for d in load_corpus("shakespeare"))
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)].astype(np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:], len(chars)


def run(name: str, args, train_ids, val_ids, vocab: int, device: torch.device) -> dict:
    "Train recipe `name` until the validation loss reaches the target or `max_steps`; return its result."
    r = RECIPES[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=args.block_size, n_layer=6, n_head=6, n_embd=384,
                          **r["model"]))
    val = [RandomBlocks(val_ids, args.block_size, args.batch_size, seed=1).batch(i) for i in range(args.eval_iters)]
    cfg = TrainConfig(steps=args.max_steps, lr=r["lr"], betas=r["betas"], weight_decay=r["weight_decay"],
                      optimizer=r["optimizer"], schedule=r["schedule"],
                      warmup_steps=min(r["warmup_steps"], args.max_steps // 2),
                      min_lr_ratio=r["min_lr_ratio"], eval_every=args.eval_every, clip_norm=1.0,
                      precision="bf16" if device.type == "cuda" else "fp32", progress=args.progress,
                      device=str(device), distributed="none")

    def stop_at_target(trainer):
        if trainer.history.val_loss is not None and trainer.history.val_loss <= args.target:
            raise Reached

    trainer = Trainer(model, lambda m, b: clm_loss(m(b[0]), b[1]),
                      RandomBlocks(train_ids, args.block_size, args.batch_size, seed=0), cfg, val_data=val,
                      name=name, callbacks=[stop_at_target])
    if args.compile and device.type == "cuda":
        trainer.net = torch.compile(trainer.net)
    start = time.perf_counter()
    reached = False
    try:
        trainer.fit()
    except Reached:
        reached = True
    seconds = time.perf_counter() - start
    return {"benchmark": "shakespeare_char", "recipe": name, "reached": reached,
            "seconds": round(seconds, 1), "steps": trainer.step, "val_loss": trainer.history.val_loss,
            "target": args.target}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--max-steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=200)
    ap.add_argument("--target", type=float, default=1.47)
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile on a GPU")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    device = get_device(args.device)
    train_ids, val_ids, vocab = char_data()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    stamp = {"device": f"{device.type} ({name})", "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    results = {}
    for recipe in args.recipes:
        results[recipe] = run(recipe, args, train_ids, val_ids, vocab, device)
        print(json.dumps({**results[recipe], **stamp}), flush=True)
    if len(results) == 2 and all(r["reached"] for r in results.values()):
        print(json.dumps({"benchmark": "shakespeare_char", "ratio": round(
            results["nanogpt"]["seconds"] / results["msopt"]["seconds"], 3), **stamp}))


if __name__ == "__main__":
    main()
