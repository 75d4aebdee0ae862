"""The training-memory estimator of chapter 15 against measured peaks on a GPU.

    python benchmarks/memory_estimate.py            # a grid of GPT configs, batch sizes and precisions

For each configuration: two AdamW training steps (the second has the optimizer state allocated), then
`msopt.gpu.memory_report` (the peak allocated since the start of the second step, less parameters, gradients and
optimizer state, and what was allocated before the model was built) next to `msopt.gpu.estimate_memory`. A warm-up
step first lets cuBLAS allocate its workspaces (once per process and thread), so no row counts them. Prints one JSON
line per configuration with the ratio estimated / measured activations. Needs CUDA.
"""
import argparse
import datetime
import json

import torch

from msopt.gpu import estimate_memory, memory_report, precision_context
from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig

GRID = [  # (n_layer, n_embd, n_head, vocab, batch, seq_len)
    (4, 256, 4, 4096, 8, 256),
    (4, 256, 4, 32768, 8, 256),
    (8, 256, 4, 4096, 8, 256),
    (4, 512, 8, 4096, 8, 256),
    (4, 256, 4, 4096, 16, 512),
    (12, 768, 12, 50304, 8, 1024),
]


def measure(n_layer, n_embd, n_head, vocab, batch, seq_len, precision) -> dict:
    torch.manual_seed(0)
    baseline = torch.cuda.memory_allocated()
    model = GPT(GPTConfig(vocab_size=vocab, block_size=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          dropout=0.0)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with precision_context(precision, "cuda"):
            loss = clm_loss(model(x[:, :-1]), x[:, 1:])
        after_forward = torch.cuda.memory_allocated() - baseline                    # what the backward pass needs
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    measured = memory_report(model, opt, baseline=baseline)
    est = estimate_memory(model.config, batch, seq_len, precision, "adamw")
    out = dict(config=dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab=vocab, batch=batch, seq_len=seq_len,
                           precision=precision),
               measured_activations_mb=round(measured["activations"] / 2**20, 1),
               estimated_activations_mb=round(est["activations"] / 2**20, 1),
               ratio=round(est["activations"] / measured["activations"], 3),
               kept_after_forward_mb=round((after_forward - measured["params"] - measured["grads"]
                                            - measured["optimizer"]) / 2**20, 1),
               measured_peak_mb=round(measured["peak_allocated"] / 2**20, 1),
               estimated_total_mb=round(est["total"] / 2**20, 1))
    del model, opt, x, loss
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_estimate.py measures GPU memory: it needs CUDA")
    measure(2, 64, 2, 256, 2, 64, "bf16")                  # warm-up: cuBLAS's workspaces, forward and backward thread
    for cfg in GRID:
        for precision in args.precisions:
            row = measure(*cfg, precision)
            row.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       date=datetime.date.today().isoformat())
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
