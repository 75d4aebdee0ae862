"""Decoding speed on CPU: msopt greedy (KV cache) against transformers.generate, and self-speculative decoding (MTP
heads) against msopt greedy. Same weights, same prompts, same process; outputs asserted identical.

    python benchmarks/decode.py                  # book's small size (4 layers, width 256), 128 new tokens
    python benchmarks/decode.py --steps 300      # train the MTP model longer (higher acceptance)

The greedy comparison uses a GPT-2-style model converted with `to_hf`. The speculative one trains a model with
extra heads on Shakespeare for `--steps` steps first (acceptance needs a trained model). Timed runs alternate between
the two contenders; medians are reported. Prints one JSON line per comparison (ratio = msopt / peer speed).
"""
import argparse
import datetime
import json
import statistics
import time
import warnings

import torch
import transformers

from msopt.data import encode_documents, load_corpus, split_documents, train_tokenizer
from msopt.generate import generate
from msopt.losses import mtp_loss
from msopt.data import RandomBlocks
from msopt.models import GPT, GPTConfig, to_hf
from msopt.multitoken import speculative_generate


def alternate(fns: dict, reps: int) -> dict:
    "Median seconds of each function, the calls alternating so that load changes hit all alike."
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                                                        # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter(); fn(); times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def line(**kw) -> None:
    kw.update(device=f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
              date=datetime.date.today().isoformat())
    print(json.dumps(kw))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="training steps of the MTP model")
    ap.add_argument("--k", type=int, default=3, help="extra heads of the MTP model")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    n = args.new_tokens

    # 1. greedy with KV cache: msopt vs transformers.generate, same GPT-2-style weights
    model = GPT(GPTConfig.small(2048, n_layer=4, n_head=4, n_embd=256)).eval()
    hf = to_hf(model).eval()
    ids = torch.randint(0, 2048, (1, 16))
    ours = lambda: generate(model, ids, n, stop_tokens=[])
    theirs = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours(), theirs())
        t = alternate({"msopt": ours, "transformers": theirs}, args.reps)
    line(benchmark="greedy decode, KV cache", model="gpt2-style 4x256, vocab 2048", new_tokens=n,
         msopt_tok_s=round(n / t["msopt"], 1), transformers_tok_s=round(n / t["transformers"], 1),
         ratio=round(t["transformers"] / t["msopt"], 2))

    # 2. self-speculative decoding vs greedy, on a model with k heads trained on Shakespeare
    docs = load_corpus("shakespeare")
    train_docs, val_docs = split_documents(docs, val_fraction=0.1, seed=0)
    tok = train_tokenizer([d.text for d in train_docs], vocab_size=1024)
    data = RandomBlocks(encode_documents(tok, train_docs), 128, 16, seed=0)
    mtp = GPT(GPTConfig.small(1024, n_layer=4, n_head=4, n_embd=256, n_mtp=args.k))
    opt = torch.optim.AdamW(mtp.parameters(), lr=2e-3)
    for step in range(args.steps):
        x, y = data.batch(step)
        loss = mtp_loss(mtp(x, mtp=True), y)
        opt.zero_grad(); loss.backward(); opt.step()
    mtp.eval()
    prompts = [torch.tensor([tok.encode(d.text[1000:1200]).ids[:32]]) for d in val_docs[:4]]
    runs = [speculative_generate(mtp, p, n)[1] for p in prompts]
    acc = [round(sum(r.accepted[j] for r in runs) / sum(r.proposed[j] for r in runs), 3) for j in range(args.k)]
    tpf = sum(r.new_tokens for r in runs) / sum(r.forwards for r in runs)
    with torch.no_grad():
        for p in prompts:
            assert torch.equal(speculative_generate(mtp, p, n)[0], generate(mtp, p, n, stop_tokens=[]))
        t = alternate({"greedy": lambda: [generate(mtp, p, n, stop_tokens=[]) for p in prompts],
                       "speculative": lambda: [speculative_generate(mtp, p, n) for p in prompts]}, args.reps)
    line(benchmark="self-speculative vs greedy", model=f"gpt2-style 4x256, vocab 1024, {args.k} MTP heads, "
         f"{args.steps} steps", new_tokens=n, acceptance_per_head=acc, tokens_per_forward=round(tpf, 2),
         greedy_tok_s=round(4 * n / t["greedy"], 1), speculative_tok_s=round(4 * n / t["speculative"], 1),
         ratio=round(t["greedy"] / t["speculative"], 2))


if __name__ == "__main__":
    main()
