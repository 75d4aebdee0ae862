"""Decoding speed on CPU: msopt greedy (KV cache) against transformers.generate, on the book's small GPT and on
SmolLM2-135M, with the memory bandwidth each reaches; and self-speculative decoding (MTP heads) against msopt greedy.
Same weights, same prompts, same process; the small model's outputs are asserted identical.

    python benchmarks/decode.py                        # all of it at 1 and 2 threads (about 10 min on 2 quiet cores)
    python benchmarks/decode.py --skip smollm2,speculative --threads 2
    python benchmarks/decode.py --steps 300            # train the MTP model longer (higher acceptance)
    python benchmarks/decode.py --profile              # torch.profiler's top operators of one msopt greedy decode

Every result is one JSON line: the device, torch threads, torch and transformers versions, the date, and the 1-minute
load average at the start of the script and of that measurement (quote results from a quiet machine only: load < 1).
Timed runs alternate between the contenders; medians are reported; ratio = msopt speed / peer speed.

Greedy lines also give the bytes of weights one decoding step reads (every matrix once; of an embedding table only
the looked-up row, unless it is the tied output layer), the bandwidth that makes at msopt's speed, and its fraction of
the copy bandwidth measured here with `torch` (bytes read + written, STREAM's convention, median of 7): of a large
copy (main memory) and of a copy the size of the weights (it may fit in the CPU caches, as the small model does).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings

import torch
import transformers

from msopt.data import RandomBlocks, encode_documents, load_corpus, split_documents, train_tokenizer
from msopt.generate import generate
from msopt.losses import mtp_loss
from msopt.models import GPT, GPTConfig, from_hf, load_smollm2_hf, to_hf
from msopt.multitoken import speculative_generate

LOAD_AT_START = os.getloadavg()[0]


def cpu_name() -> str:
    "The CPU's model name (from /proc/cpuinfo where there is one)."
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def line(**kw) -> None:
    "Print one result as a JSON line, with the machine, versions, date and load averages."
    kw.update(device=f"cpu ({cpu_name()}, {os.cpu_count()} cores)", threads=torch.get_num_threads(),
              torch=torch.__version__, transformers=transformers.__version__,
              date=datetime.date.today().isoformat(), load_avg_start=round(LOAD_AT_START, 2))
    print(json.dumps(kw), flush=True)


def alternate(fns: dict, reps: int) -> dict:
    "Median seconds of each function, the calls alternating so that load changes hit all alike."
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                                                        # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(nbytes: int, reps: int = 7) -> float:
    "GB/s of copying a float32 tensor of `nbytes` into another (bytes read + written), median of `reps`."
    src = torch.ones(max(nbytes // 4, 1))
    dst = torch.empty_like(src)
    dst.copy_(src)                                                                  # touch every page first
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: GPT) -> int:
    "Bytes of weights one greedy decoding step reads: each parameter once, of a lookup-only embedding one row."
    t = model.transformer
    lookups = [t.wpe] + ([] if model.config.tie_weights else [t.wte])
    rows = {id(e.weight): e.weight.size(1) for e in lookups if e is not None}       # one row of a lookup table
    unused = {id(p) for p in model.mtp_heads.parameters()}                          # extra heads: not in greedy
    unique = {id(p): p for p in model.parameters() if id(p) not in unused}
    return sum(rows.get(i, p.numel()) * p.element_size() for i, p in unique.items())


def greedy_vs_transformers(name: str, model: GPT, hf, ids: torch.Tensor, n: int, reps: int, copy_gbps: float,
                           must_match: bool) -> None:
    "Time msopt's and transformers' greedy decoding of `n` tokens after `ids` (1, T) and print the JSON line."
    load = os.getloadavg()[0]

    def ours():
        return generate(model, ids, n, stop_tokens=[])

    def theirs():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        same = torch.equal(ours(), theirs())
        assert same or not must_match, f"{name}: msopt and transformers decode different tokens"
        t = alternate({"msopt": ours, "transformers": theirs}, reps)
    nbytes, tok_s = weight_bytes(model), n / t["msopt"]
    same_size = copy_bandwidth(nbytes)
    line(benchmark="greedy decode, KV cache: msopt vs transformers.generate", model=name,
         params=model.num_params(), prompt_tokens=ids.size(1), new_tokens=n, reps=reps, load_avg=round(load, 2),
         msopt_tok_s=round(tok_s, 1), transformers_tok_s=round(n / t["transformers"], 1),
         ratio=round(t["transformers"] / t["msopt"], 2), same_tokens=same,
         weight_MB_per_token=round(nbytes / 1e6, 2), msopt_weight_GBps=round(nbytes * tok_s / 1e9, 2),
         copy_GBps=round(copy_gbps, 2), fraction_of_copy=round(nbytes * tok_s / 1e9 / copy_gbps, 3),
         copy_same_size_GBps=round(same_size, 2), fraction_of_same_size_copy=round(nbytes * tok_s / 1e9 / same_size, 3))


def small_gpt() -> tuple[GPT, object]:
    "The book's small GPT-2-style model (random weights) and its `transformers` twin."
    torch.manual_seed(0)
    model = GPT(GPTConfig.small(2048, n_layer=4, n_head=4, n_embd=256)).eval()
    return model, to_hf(model).eval()


def smollm2() -> tuple[GPT, object, torch.Tensor]:
    "SmolLM2-135M-Instruct (offline) as msopt and transformers models, and a chat prompt (1, T)."
    hf, tok = load_smollm2_hf()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                     add_generation_prompt=True, tokenize=False)
    return from_hf(hf).eval(), hf, tok(prompt, return_tensors="pt").input_ids


def mtp_model(steps: int, k: int) -> tuple[GPT, list[torch.Tensor]]:
    "A small GPT with `k` extra heads trained `steps` steps on Shakespeare, and four validation prompts (1, 32)."
    docs = load_corpus("shakespeare")
    train_docs, val_docs = split_documents(docs, val_fraction=0.1, seed=0)
    tok = train_tokenizer([d.text for d in train_docs], vocab_size=1024)
    data = RandomBlocks(encode_documents(tok, train_docs), 128, 16, seed=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.small(1024, n_layer=4, n_head=4, n_embd=256, n_mtp=k))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        x, y = data.batch(step)
        loss = mtp_loss(model(x, mtp=True), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [torch.tensor([tok.encode(d.text[1000:1200]).ids[:32]]) for d in val_docs[:4]]
    return model.eval(), prompts


def speculative_vs_greedy(model: GPT, prompts: list[torch.Tensor], n: int, reps: int, steps: int) -> None:
    "Time self-speculative decoding against msopt greedy on `prompts` and print the JSON line."
    load = os.getloadavg()[0]
    k = model.config.n_mtp
    runs = [speculative_generate(model, p, n)[1] for p in prompts]
    acc = [round(sum(r.accepted[j] for r in runs) / sum(r.proposed[j] for r in runs), 3) for j in range(k)]
    tpf = sum(r.new_tokens for r in runs) / sum(r.forwards for r in runs)
    with torch.no_grad():
        for p in prompts:
            assert torch.equal(speculative_generate(model, p, n)[0], generate(model, p, n, stop_tokens=[]))
        t = alternate({"greedy": lambda: [generate(model, p, n, stop_tokens=[]) for p in prompts],
                       "speculative": lambda: [speculative_generate(model, p, n) for p in prompts]}, reps)
    m = len(prompts) * n
    line(benchmark="self-speculative vs greedy", model=f"gpt2-style 4x256, vocab 1024, {k} MTP heads, {steps} steps",
         new_tokens=n, reps=reps, load_avg=round(load, 2), acceptance_per_head=acc, tokens_per_forward=round(tpf, 2),
         greedy_tok_s=round(m / t["greedy"], 1), speculative_tok_s=round(m / t["speculative"], 1),
         ratio=round(t["greedy"] / t["speculative"], 2))


def profile_greedy(n: int) -> None:
    "torch.profiler's operators by self CPU time for one greedy decode of the small GPT, and the matmuls' share."
    from torch.profiler import ProfilerActivity, profile
    model, _ = small_gpt()
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    generate(model, ids, n, stop_tokens=[])                                        # warm-up
    start = time.perf_counter()
    generate(model, ids, n, stop_tokens=[])
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, ids, n, stop_tokens=[])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm", "aten::bmm"))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    line(benchmark="profile of msopt greedy decode", model="gpt2-style 4x256, vocab 2048", new_tokens=n,
         wall_us_per_token=round(wall / n * 1e6), profiled_self_cpu_us_per_token=round(total / n),
         matmul_share_of_self_cpu=round(matmul / total, 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per run, small model and speculative")
    ap.add_argument("--smollm2-tokens", type=int, default=64, help="new tokens per run of SmolLM2-135M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    ap.add_argument("--skip", default="", help="comma-separated: small, smollm2, speculative")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the MTP model")
    ap.add_argument("--k", type=int, default=3, help="extra heads of the MTP model")
    ap.add_argument("--profile", action="store_true", help="only profile one msopt greedy decode (at --threads' first)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    threads, skip = [int(t) for t in args.threads.split(",")], set(filter(None, args.skip.split(",")))
    if args.profile:
        torch.set_num_threads(threads[0])
        return profile_greedy(args.new_tokens)

    small = None if "small" in skip else small_gpt()
    smol = None if "smollm2" in skip else smollm2()
    mtp = None if "speculative" in skip else mtp_model(args.steps, args.k)
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    for t in threads:
        torch.set_num_threads(t)
        copy_gbps = copy_bandwidth(512 * 2**20)                                     # far beyond any CPU cache
        if small:
            greedy_vs_transformers("gpt2-style 4x256, vocab 2048", *small, ids, args.new_tokens, args.reps,
                                   copy_gbps, must_match=True)
        if smol:
            model, hf, prompt = smol
            greedy_vs_transformers("SmolLM2-135M-Instruct (llama-style, float32)", model, hf, prompt,
                                   args.smollm2_tokens, max(args.reps // 2, 3), copy_gbps, must_match=False)
        if mtp:
            speculative_vs_greedy(*mtp, args.new_tokens, args.reps, args.steps)


if __name__ == "__main__":
    main()
