"""Training throughput: msopt's GPT against transformers' GPT2LMHeadModel, same config, same batch, same process.

    python benchmarks/train_throughput.py                      # CPU: a small config in fp32
    python benchmarks/train_throughput.py --gpu                # GPU: GPT-2 124M, context 1024, bf16, compiled

Both models train with AdamW on the same random batches; the steps alternate between the two models so that a change
in the machine's load hits both alike. Prints one JSON line: tokens/s of each, the ratio msopt / transformers, MFU
(on a GPU in PEAK_TFLOPS), the device and the date.
"""
import argparse
import datetime
import json
import platform
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from msopt.core import get_device
from msopt.gpu import (
    ThroughputMeter,
    compile_model,
    flops_per_token,
    fused_adamw_available,
    peak_flops,
    precision_context,
)
from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig

CONFIGS = {
    "small": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=256, seq_len=128, batch=8),
    "gpt2": dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch=16),
}


def model_pair(cfg: dict, seq_len: int, device) -> tuple[GPT, GPT2LMHeadModel]:
    "msopt's GPT and transformers' GPT2LMHeadModel of the shape `cfg` (vocab_size, n_layer, n_head, n_embd)."
    ours = GPT(GPTConfig(block_size=seq_len, **cfg)).to(device)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=cfg["vocab_size"], n_positions=seq_len, n_embd=cfg["n_embd"],
                                        n_layer=cfg["n_layer"], n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                        attn_implementation="sdpa")).to(device)
    return ours, theirs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="GPT-2 124M at 1024 in bf16 with compile and fused AdamW")
    ap.add_argument("--config", choices=CONFIGS, default=None, help="model size (default: small, gpt2 with --gpu)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default 6 on CPU, 30 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 10 on GPU)")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"), default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    device = get_device(args.device or ("cuda" if args.gpu else "cpu"))
    gpu = device.type == "cuda"
    cfg = dict(CONFIGS[args.config or ("gpt2" if args.gpu else "small")])
    batch, seq_len = args.batch or cfg.pop("batch"), args.seq_len or cfg.pop("seq_len")
    cfg.pop("batch", None)
    cfg.pop("seq_len", None)
    steps = args.steps or (30 if gpu else 6)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    precision = args.precision or ("bf16" if gpu else "fp32")
    compiled = args.compile if args.compile is not None else gpu
    torch.manual_seed(0)

    ours, theirs = model_pair(cfg, seq_len, device)
    x = torch.randint(0, cfg["vocab_size"], (batch, seq_len), device=device)
    y = torch.roll(x, -1, dims=1)
    n_params = sum(p.numel() for n, p in ours.named_parameters() if "wpe" not in n)
    fpt = flops_per_token(n_params, cfg["n_layer"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"], seq_len)
    fused = gpu and fused_adamw_available(device)

    runs = {}
    for name, model, forward in (("msopt", ours, lambda m: m(x)), ("transformers", theirs, lambda m: m(x).logits)):
        net = compile_model(model, (x,)) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if fused else None)
        runs[name] = (net, forward, opt, ThroughputMeter(fpt, peak_flops(device), warmup=warmup, device=device))
    for _ in range(warmup + steps):
        for net, forward, opt, meter in runs.values():
            with meter.step(batch * seq_len):
                with precision_context(precision, device):
                    loss = clm_loss(forward(net), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    res = {name: run[3].summary() for name, run in runs.items()}
    name = torch.cuda.get_device_name(device) if gpu else platform.machine()
    print(json.dumps({
        "benchmark": "train_throughput",
        "ratio": round(res["msopt"]["tokens_per_s"] / res["transformers"]["tokens_per_s"], 3),
        "msopt_tokens_per_s": round(res["msopt"]["tokens_per_s"], 1),
        "transformers_tokens_per_s": round(res["transformers"]["tokens_per_s"], 1),
        "msopt_mfu": res["msopt"]["mfu"], "transformers_mfu": res["transformers"]["mfu"],
        "config": {**cfg, "batch": batch, "seq_len": seq_len, "precision": precision, "compile": compiled,
                   "fused_adamw": fused, "steps": steps, "warmup": warmup, "threads": torch.get_num_threads()},
        "device": f"{device.type} ({name})", "torch": torch.__version__,
        "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    main()
