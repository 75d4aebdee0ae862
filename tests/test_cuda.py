"""GPU behaviour of msopt: bf16 training, fused AdamW, torch.compile, the memory estimator against measured peaks,
decoding and checkpoints across devices. Every test here needs CUDA and is skipped without it (CI has no GPU); run
them on a GPU machine with `pytest tests/test_cuda.py`."""
import math

import pytest
import torch

from msopt.data import RandomBlocks
from msopt.generate import generate
from msopt.gpu import (
    ThroughputMeter,
    compile_model,
    estimate_memory,
    fused_adamw_available,
    memory_report,
    model_flops_per_token,
    peak_flops,
    precision_context,
)
from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig
from msopt.train import TrainConfig, Trainer, latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
V, T = 256, 64


def gpt(n_layer=2, n_embd=64, n_head=2, block_size=T, vocab=V, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.tiny(vocab, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size))


def data(n=20_000, seed=0):
    "A learnable stream: a repeating pattern with noise, so the loss must fall well below log(V)."
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 17
    noise = torch.randint(0, V, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, base)


def loss_fn(m, b):
    return clm_loss(m(b[0]), b[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_learns_on_cuda(precision, tmp_path):
    ids = data()
    cfg = TrainConfig(steps=60, lr=3e-3, warmup_steps=5, eval_every=60, progress=False, precision=precision,
                      ckpt_every=60)
    t = Trainer(gpt(), loss_fn, RandomBlocks(ids, T, 16, seed=0), cfg, val_data=[RandomBlocks(ids, T, 16, seed=1)(0)],
                out_dir=tmp_path)
    assert t.device.type == "cuda" and next(t.model.parameters()).is_cuda
    h = t.fit()
    losses = h.series("train_loss")[1]
    assert math.isfinite(h.val_loss) and losses[-1] < 0.5 * math.log(V) < losses[0]
    assert t.scaler.is_enabled() == (precision == "fp16")


def test_checkpoint_written_on_cuda_loads_on_cpu(tmp_path):
    ids = data()
    t = Trainer(gpt(), loss_fn, RandomBlocks(ids, T, 8, seed=0),
                TrainConfig(steps=5, eval_every=5, progress=False, ckpt_every=5), out_dir=tmp_path)
    t.fit()
    cpu_model = gpt(seed=1)
    load_checkpoint(latest_checkpoint(t.ckpt_dir), cpu_model)
    x = ids[:T][None]
    with torch.no_grad():
        a = cpu_model(x)
        b = t.model.eval()(x.cuda()).cpu()
    assert torch.allclose(a, b, atol=1e-4)


def test_bf16_autocast_is_close_to_fp32():
    m = gpt().cuda()
    x = data()[:4 * T].view(4, T).cuda()
    with torch.no_grad():
        ref = m(x).float()
        with precision_context("bf16", "cuda"):
            out = m(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_fused_adamw_matches_the_loop():
    assert fused_adamw_available("cuda")
    a, b = gpt().cuda(), gpt().cuda()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3, fused=True)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-3, foreach=False)
    x = data()[:4 * (T + 1)].view(4, T + 1).cuda()
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            clm_loss(m(x[:, :-1]), x[:, 1:]).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_inductor_compile_matches_eager():
    m = gpt().cuda().eval()
    x = data()[:2 * T].view(2, T).cuda()
    c = compile_model(m, (x,))
    with torch.no_grad():
        assert torch.allclose(c(x), m(x), atol=1e-4)


def test_memory_estimate_against_the_measured_peak():
    "Parameters and gradients exactly; activations within 15 % of the measured peak (6 % on an H100)."
    cfg = dict(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab=4096)
    warm = gpt().cuda()                                        # cuBLAS allocates a workspace per thread at first use:
    x = data()[:4 * (T + 1)].view(4, T + 1).cuda()             # one forward and backward allocates both threads'
    with precision_context("bf16", "cuda"):
        clm_loss(warm(x[:, :-1]), x[:, 1:]).backward()
    del warm, x
    baseline = torch.cuda.memory_allocated()                   # the workspaces, and tensors of earlier tests
    m = gpt(**cfg).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (8, 257), device="cuda")
    for _ in range(2):                                          # the second step has the optimizer state allocated
        torch.cuda.reset_peak_memory_stats()
        with precision_context("bf16", "cuda"):
            loss = clm_loss(m(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    measured = memory_report(m, opt, baseline=baseline)
    est = estimate_memory(m.config, 8, 256, "bf16", "adamw")
    assert measured["params"] == est["params"] and measured["grads"] == est["grads"]
    assert 0.85 < est["activations"] / measured["activations"] < 1.15


def test_generate_on_cuda_equals_cpu():
    m = gpt(n_embd=64, seed=3).eval()
    prompts = [[1, 2, 3, 4], [5, 6]]
    cpu = generate(m, prompts, 20)
    gpu = generate(m.cuda(), prompts, 20)
    assert cpu == gpu


def test_throughput_meter_reports_mfu_on_the_gpu():
    m = gpt(n_layer=4, n_embd=256, n_head=4, block_size=256).cuda()
    peak = peak_flops("cuda")
    assert peak is not None and peak > 1e14, torch.cuda.get_device_name()
    meter = ThroughputMeter(model_flops_per_token(m, 256), peak, warmup=1, device=torch.device("cuda"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, V, (8, 257), device="cuda")
    for _ in range(4):
        with meter.step(8 * 256):
            with precision_context("bf16", "cuda"):
                loss = clm_loss(m(x[:, :-1]), x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    s = meter.summary()
    assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1
