"""Decoding speed on CPU: msopt greedy (KV cache) against transformers.generate, on the book's small GPT and on
SmolLM2-135M, with the memory bandwidth each reaches; and self-speculative decoding of SmolLM2 with multi-token heads
trained on its frozen trunk (chapter 14's recipe) against msopt greedy. Same weights, same prompts, same process; the
small model's and the speculative outputs are asserted identical to their reference.

    python benchmarks/decode.py                        # all of it, 1 and 2 threads (about 25 min the first time)
    python benchmarks/decode.py --skip smollm2,speculative --threads 2
    python benchmarks/decode.py --skip small,smollm2   # only the speculative rows (heads reused from --heads)
    python benchmarks/decode.py --profile              # torch.profiler's top operators of one msopt greedy decode
    python benchmarks/decode.py --widths               # SmolLM2: time of one cached pass over 1, 2, ... 8 positions

Every result is one JSON line: the device, torch threads, torch and transformers versions, the date, and the 1-minute
load average at the start of the script and of that measurement (quote results from a quiet machine only: load < 1).
Timed runs alternate between the contenders; medians are reported; ratio = msopt speed / peer speed (speculative:
speculative speed / greedy speed).

Greedy lines also give the bytes of weights one decoding step reads (every matrix once; of an embedding table only
the looked-up row, unless it is the tied output layer), the bandwidth that makes at msopt's speed, and its fraction of
the copy bandwidth measured here with `torch` (bytes read + written, STREAM's convention, median of 7): of a large
copy (main memory) and of a copy the size of the weights (it may fit in the CPU caches, as the small model does).

The speculative heads (chained, with a draft vocabulary) are trained once with `msopt.stages.mtp_heads.MTPHeads` on
SmolLM2's own greedy answers to `msopt.multitoken.chat_requests` (the first 32 requests are held out: 16 to test, 16
to validate; `--more-requests` adds answers to requests of other templates), learning the trunk's top-`--distill`
probabilities (self-distillation), and saved to `--heads` (by default a file named after the recipe); later runs
load them (delete the file to train again). An EAGLE draft layer
(`msopt.stages.draft_layer.EagleDraft`, `--layer-steps`; 0 leaves it out) is trained once on the same answers and
saved beside them; the answers themselves are saved under `runs/bench/` too, so that no later run generates them.
Trees of drafts from the same heads (`--trees`: their sizes; `msopt.multitoken.choose_tree` picks each on the 16
validation answers) are timed beside the chains, with SmolLM2's linear layers prepacked for passes of 4 to
`--pack-rows` positions (`msopt.multitoken.prepack_linears`; greedy decoding's one-position passes do not use them).
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
from safetensors.torch import load_model, save_model

from msopt.generate import default_stop_tokens, generate
from msopt.models import GPT, GPTConfig, from_hf, load_smollm2_hf, to_hf
from msopt.multitoken import (
    MORE_REQUESTS,
    DraftLayer,
    add_mtp_heads,
    chat_requests,
    choose_tree,
    greedy_continuations,
    prepack_linears,
    speculative_generate,
)
from msopt.stages.draft_layer import EagleDraft
from msopt.stages.mtp_heads import MTPHeads

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


def smollm2() -> tuple[GPT, object, object]:
    "SmolLM2-135M-Instruct (offline) as msopt and transformers models (the same weights), and its tokenizer."
    hf, tok = load_smollm2_hf()
    return from_hf(hf).eval(), hf, tok


def chat_ids(tok, text: str) -> list[int]:
    "The token ids of one user turn in SmolLM2's chat template, ready for the assistant's answer."
    text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text)


def distill_answers(model: GPT, tok, path: str, prompts: int, new: int, more: int = 0) -> dict:
    """SmolLM2's greedy answers to `chat_requests()[32:32 + prompts]` and the first `more` requests of other
    templates (`MORE_REQUESTS`) for training, and to `chat_requests()[16:32]` (val), with their prompt lengths:
    loaded from `path` (JSON) when it holds them, else generated and saved there."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    requests, stops = chat_requests(), default_stop_tokens(tok)
    train = requests[32:32 + prompts] + chat_requests(templates=MORE_REQUESTS)[:more]
    val = requests[16:32]
    start = time.perf_counter()
    data = greedy_continuations(model, [chat_ids(tok, r) for r in train + val], new, batch_size=64, stop_tokens=stops)
    lens = [len(chat_ids(tok, r)) for r in train + val]
    out = {"train": data[:len(train)], "val": data[len(train):], "train_lens": lens[:len(train)],
           "val_lens": lens[len(train):], "generate_s": round(time.perf_counter() - start, 1)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def speculative_heads(model: GPT, path: str, k: int, vocab: int, answers: dict, steps: int, distill: int) -> dict:
    """Give `model` chained heads with a draft vocabulary: loaded from `path` when it holds them, else trained on the
    frozen model (MTPHeads) from its greedy `answers` (`distill_answers`) and saved there."""
    add_mtp_heads(model, k, vocab, chain=True)
    if os.path.isfile(path):
        load_model(model.mtp_heads, path)
        return {"heads": path, "trained_now": False}
    start = time.perf_counter()
    stage = MTPHeads(answers["train"], answers["val"], k=k, vocab=vocab, chain=True, prompt_lens=answers["train_lens"],
                     val_prompt_lens=answers["val_lens"], distill=distill, steps=steps, lr=2e-3, warmup_steps=20,
                     eval_every=max(1, steps // 4), keep_best=True, progress=False)
    report = stage.run(model)
    model.eval()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_model(model.mtp_heads, path)
    return {"heads": path, "trained_now": True, "distill_prompts": len(answers["train"]), "head_steps": steps,
            "distill": distill, "head_val_top1": [report.after[f"head{j + 1}_top1"] for j in range(k)],
            "draft_vocab_coverage": report.after["draft_vocab_coverage"],
            "prepare_and_train_s": round(time.perf_counter() - start, 1)}


def speculative_layer(model: GPT, path: str, vocab: int, answers: dict, steps: int) -> tuple[DraftLayer, dict]:
    """An EAGLE draft layer for the frozen `model` (`EagleDraft`, unrolled 2 steps): loaded from `path` when it holds
    one, else trained on `answers` (`distill_answers`) and saved there."""
    if os.path.isfile(path):
        layer = DraftLayer(model.config, vocab)
        load_model(layer, path)
        return layer.eval(), {"layer": path, "layer_trained_now": False}
    start = time.perf_counter()
    stage = EagleDraft(answers["train"], answers["val"], vocab=vocab, unroll=2, prompt_lens=answers["train_lens"],
                       val_prompt_lens=answers["val_lens"], steps=steps, lr=1e-3, warmup_steps=20,
                       eval_every=max(1, steps // 4), keep_best=True, progress=False)
    report = stage.run(model)
    layer = stage.model.eval()
    save_model(layer, path)
    return layer, {"layer": path, "layer_trained_now": True, "layer_steps": steps,
                   "layer_val_top1": [report.after["draft1_top1"], report.after["draft2_top1"]],
                   "layer_prepare_and_train_s": round(time.perf_counter() - start, 1)}


def speculative_vs_greedy(model: GPT, tok, n: int, reps: int, n_test: int, n_timed: int, about: dict,
                          layer: DraftLayer | None = None, trees: dict | None = None) -> None:
    """Acceptance per head on `n_test` held-out requests (outputs asserted equal to greedy), then the time of
    speculative decoding with 1..k drafts from the heads (and 1-2 from a draft `layer`, and each of `trees`, {name:
    paths}) against msopt greedy on the first `n_timed`, alternating; one JSON line."""
    trees = trees or {}
    load, k = os.getloadavg()[0], model.config.n_mtp
    prompts = [torch.tensor([chat_ids(tok, r)]) for r in chat_requests()[:n_test]]
    with torch.no_grad():
        greedy = [generate(model, p, n, stop_tokens=[]) for p in prompts]             # what every drafting must write
        stats, layer_stats, tree_stats = {}, {}, {}
        runs = [(stats, j, dict(n_draft=j)) for j in range(1, k + 1)]
        runs += [(layer_stats, j, dict(n_draft=j, draft=layer)) for j in ((1, 2) if layer is not None else ())]
        runs += [(tree_stats, name, dict(tree=tree)) for name, tree in trees.items()]
        for into, key, kwargs in runs:
            for p, ref in zip(prompts, greedy):
                out, st = speculative_generate(model, p, n, **kwargs)
                assert torch.equal(out, ref), "speculative output differs from greedy"
                into[key] = st if key not in into else into[key] + st
        fns = {"greedy": lambda: [generate(model, p, n, stop_tokens=[]) for p in prompts[:n_timed]]}
        fns.update({f"tree {name}": (lambda tree=tree: [speculative_generate(model, p, n, tree=tree)
                                                        for p in prompts[:n_timed]]) for name, tree in trees.items()})
        fns.update({f"k={j}": (lambda j=j: [speculative_generate(model, p, n, n_draft=j) for p in prompts[:n_timed]])
                    for j in range(1, k + 1)})
        fns.update({f"layer k={j}": (lambda j=j: [speculative_generate(model, p, n, n_draft=j, draft=layer)
                                                  for p in prompts[:n_timed]]) for j in layer_stats})
        t = alternate(fns, reps)
    m = n_timed * n
    line(benchmark="self-speculative (chained MTP heads on the frozen trunk) vs msopt greedy",
         model="SmolLM2-135M-Instruct (llama-style, float32)", new_tokens=n, test_prompts=n_test,
         timed_prompts=n_timed, reps=reps, load_avg=round(load, 2), same_tokens=True,
         acceptance_per_head={j: [round(a, 3) for a in st.acceptance] for j, st in stats.items()},
         tokens_per_forward={j: round(st.tokens_per_forward, 2) for j, st in stats.items()},
         greedy_tok_s=round(m / t["greedy"], 1),
         speculative_tok_s={j: round(m / t[f"k={j}"], 1) for j in range(1, k + 1)},
         ratio={j: round(t["greedy"] / t[f"k={j}"], 2) for j in range(1, k + 1)},
         layer_acceptance={j: [round(a, 3) for a in st.acceptance] for j, st in layer_stats.items()},
         layer_tokens_per_forward={j: round(st.tokens_per_forward, 2) for j, st in layer_stats.items()},
         layer_ratio={j: round(t["greedy"] / t[f"layer k={j}"], 2) for j in layer_stats},
         trees={name: [list(p) for p in tree] for name, tree in trees.items()},
         tree_acceptance_per_depth={k: [round(a, 3) for a in st.acceptance] for k, st in tree_stats.items()},
         tree_tokens_per_forward={k: round(st.tokens_per_forward, 2) for k, st in tree_stats.items()},
         tree_tok_s={k: round(m / t[f"tree {k}"], 1) for k in tree_stats},
         tree_ratio={k: round(t["greedy"] / t[f"tree {k}"], 2) for k in tree_stats}, **about)


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


def verify_widths(model: GPT, tok, widths: list[int], reps: int, packed: bool = False) -> None:
    """SmolLM2: median time of one cached forward pass (trunk and main head) over `widths` new positions after a chat
    prompt, widths alternating: what verifying w - 1 drafts costs against a greedy step (w = 1); one JSON line.
    `packed`: the model's linear layers have prepacked weights (`prepack_linears`)."""
    prompt = torch.tensor([chat_ids(tok, "Write a short poem about the sea.")])
    block = torch.randint(0, model.config.vocab_size, (1, max(widths)), generator=torch.Generator().manual_seed(0))
    cache = model.kv_cache(1, prompt.size(1) + max(widths))
    load = os.getloadavg()[0]
    with torch.inference_mode():
        model.features(prompt, cache=cache)

        def one(w):
            cache.crop(prompt.size(1))
            model.lm_head(model.features(block[:, :w], cache=cache))
        t = alternate({w: (lambda w=w: one(w)) for w in widths}, reps)
    line(benchmark="one cached forward pass over w positions (verification of w - 1 drafts)",
         model="SmolLM2-135M-Instruct (llama-style, float32)", prompt_tokens=prompt.size(1), reps=reps,
         load_avg=round(load, 2), packed_weights=packed, ms={w: round(t[w] * 1e3, 1) for w in widths},
         cost_vs_one={w: round(t[w] / t[widths[0]], 2) for w in widths})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per run of the small model")
    ap.add_argument("--smollm2-tokens", type=int, default=64, help="new tokens per run of SmolLM2-135M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure, comma-separated")
    ap.add_argument("--skip", default="", help="comma-separated: small, smollm2, speculative")
    ap.add_argument("--heads", default=None, help="SmolLM2's trained heads: loaded if the file exists, else trained "
                    "and saved there (default: runs/bench/ and a name from the recipe)")
    ap.add_argument("--k", type=int, default=3, help="extra heads")
    ap.add_argument("--vocab", type=int, default=4096, help="the heads' draft vocabulary")
    ap.add_argument("--distill-prompts", type=int, default=768, help="requests whose greedy answers train the heads")
    ap.add_argument("--distill-tokens", type=int, default=128, help="new tokens of each of those answers")
    ap.add_argument("--more-requests", type=int, default=0, help="also train the heads on the greedy answers to this "
                    "many requests of other templates (msopt.multitoken.MORE_REQUESTS, up to 800)")
    ap.add_argument("--head-steps", type=int, default=800, help="training steps of the heads")
    ap.add_argument("--distill", type=int, default=8, help="the trunk's top tokens the heads learn (0: the token only)")
    ap.add_argument("--layer-steps", type=int, default=300, help="training steps of the EAGLE draft layer (0: none)")
    ap.add_argument("--trees", default="5,7", help="sizes of the trees of drafts to time (chosen with choose_tree on "
                    "the validation answers), comma-separated; empty: none")
    ap.add_argument("--pack-rows", type=int, default=8, help="prepack SmolLM2's linear layers for passes of 4 to this "
                    "many positions (prepack_linears) before the speculative rows and the second --widths table; 0: no")
    ap.add_argument("--test-prompts", type=int, default=16, help="held-out requests for acceptance (and equality)")
    ap.add_argument("--timed-prompts", type=int, default=4, help="of which timed")
    ap.add_argument("--profile", action="store_true", help="only profile one msopt greedy decode (at --threads' first)")
    ap.add_argument("--widths", action="store_true", help="only time SmolLM2's cached pass over 1-8 positions")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    threads, skip = [int(t) for t in args.threads.split(",")], set(filter(None, args.skip.split(",")))
    if args.profile:
        torch.set_num_threads(threads[0])
        return profile_greedy(args.new_tokens)
    if args.widths:
        model, _, tok = smollm2()
        for packed in (False, True) if args.pack_rows else (False,):
            if packed:
                prepack_linears(model, args.pack_rows)
            for t in threads:
                torch.set_num_threads(t)
                verify_widths(model, tok, [1, 2, 3, 4, 5, 6, 8], 2 * args.reps + 1, packed)
        return None

    small = None if "small" in skip else small_gpt()
    smol = None if {"smollm2", "speculative"} <= skip else smollm2()
    heads = layer = None
    trees = {}
    if "speculative" not in skip:
        torch.set_num_threads(max(threads))
        spec_model = from_hf(smol[1]).eval()                                         # a copy that gets the heads
        data = f"{args.distill_prompts}x{args.distill_tokens}"                          # names the answers' files
        data += f"_m{args.more_requests}" if args.more_requests else ""
        path = args.heads or (f"runs/bench/smollm2_heads_k{args.k}_v{args.vocab}_d{args.distill}_{data}"
                              f"_s{args.head_steps}.safetensors")
        answers = distill_answers(spec_model, smol[2], f"runs/bench/smollm2_answers_{data}.json",
                                  args.distill_prompts, args.distill_tokens, args.more_requests)
        heads = speculative_heads(spec_model, path, args.k, args.vocab, answers, args.head_steps, args.distill)
        if args.layer_steps:
            layer, about = speculative_layer(spec_model, f"runs/bench/smollm2_layer_v{args.vocab}_u2_{data}"
                                             f"_s{args.layer_steps}.safetensors", args.vocab, answers, args.layer_steps)
            heads.update(about)
        sizes = [int(m) for m in args.trees.split(",") if m]
        trees = {f"{m} nodes": choose_tree(spec_model, answers["val"], answers["val_lens"], m) for m in sizes}
        if args.pack_rows:
            prepack_linears(spec_model, args.pack_rows)
        heads["packed_rows"] = args.pack_rows
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    for t in threads:
        torch.set_num_threads(t)
        copy_gbps = copy_bandwidth(512 * 2**20)                                     # far beyond any CPU cache
        if small:
            greedy_vs_transformers("gpt2-style 4x256, vocab 2048", *small, ids, args.new_tokens, args.reps,
                                   copy_gbps, must_match=True)
        if smol and "smollm2" not in skip:
            model, hf, tok = smol
            prompt = torch.tensor([chat_ids(tok, "Write a short poem about the sea.")])
            greedy_vs_transformers("SmolLM2-135M-Instruct (llama-style, float32)", model, hf, prompt,
                                   args.smollm2_tokens, max(args.reps // 2, 3), copy_gbps, must_match=False)
        if heads is not None:
            speculative_vs_greedy(spec_model, smol[2], args.smollm2_tokens, max(args.reps // 2, 3), args.test_prompts,
                                  args.timed_prompts, heads, layer, trees)


if __name__ == "__main__":
    main()
