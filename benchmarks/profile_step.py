"""Where a training step spends its time: msopt's GPT and transformers' GPT2LMHeadModel, same config, same batches.

    python benchmarks/profile_step.py                  # CPU, the small config of train_throughput.py
    python benchmarks/profile_step.py --ops 15         # and the 15 operators with the most self time (msopt)

Each step is split into forward (with the loss), backward and optimizer, each phase timed on its own (with a CUDA
synchronization on a GPU), the two models' steps alternating; prints the median milliseconds per phase of each model,
then, with --ops, `torch.profiler`'s table of msopt's operators. Prints the load average at the start, so that a
number made on a busy machine says so.
"""
import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch
from train_throughput import CONFIGS, model_pair

from msopt.core import get_device
from msopt.losses import clm_loss

CONFIG = {k: v for k, v in CONFIGS["small"].items() if k not in ("batch", "seq_len")}


def timed(fn, device) -> float:
    "Seconds `fn()` takes, the device synchronized before and after."
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ops", type=int, default=0, help="also print the top operators of msopt's step")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = get_device(args.device)
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    ours, theirs = model_pair(CONFIG, args.seq_len, device)
    x = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq_len), device=device)
    y = torch.roll(x, -1, dims=1)
    models = {"msopt": (ours, lambda m: m(x)), "transformers": (theirs, lambda m: m(x).logits)}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}
    times = {name: {"forward": [], "backward": [], "optimizer": []} for name in models}

    def step(name, record=True):
        model, forward = models[name]
        out = {}
        t_f = timed(lambda: out.setdefault("loss", clm_loss(forward(model), y)), device)
        t_b = timed(lambda: out["loss"].backward(), device)
        t_o = timed(lambda: (opts[name].step(), opts[name].zero_grad(set_to_none=True)), device)
        if record:
            for phase, t in zip(("forward", "backward", "optimizer"), (t_f, t_b, t_o)):
                times[name][phase].append(t)

    for i in range(args.warmup + args.steps):
        for name in models:
            step(name, record=i >= args.warmup)
    ms = {name: {phase: round(1000 * statistics.median(v), 2) for phase, v in phases.items()}
          for name, phases in times.items()}
    for name in ms:
        ms[name]["step"] = round(sum(ms[name].values()), 2)
    print(json.dumps({"benchmark": "profile_step", "median_ms": ms,
                      "msopt_over_transformers_time": {p: round(ms["msopt"][p] / ms["transformers"][p], 3)
                                                       for p in ms["msopt"]},
                      "config": {**CONFIG, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
                                 "threads": torch.get_num_threads()},
                      "device": f"{device.type} ({platform.machine()})", "torch": torch.__version__,
                      "load_avg_at_start": round(load, 2), "date": time.strftime("%Y-%m-%d")}))
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                step("msopt", record=False)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.ops))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    main()
