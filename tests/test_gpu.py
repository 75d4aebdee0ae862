import warnings

import pytest
import torch
from torch import nn

from msopt.gpu import (
    PEAK_TFLOPS,
    DistInfo,
    ThroughputMeter,
    checkpoint_blocks,
    compile_model,
    data_parallel,
    dist_info,
    distribute_like,
    estimate_memory,
    flops_per_token,
    full_tensor,
    fused_adamw_available,
    grad_scaler,
    init_distributed,
    is_sharded,
    make_strategy,
    memory_report,
    model_flops_per_token,
    no_sync,
    peak_flops,
    precision_context,
    resolve_distributed,
    shard_batch,
    tf32,
)
from msopt.losses import clm_loss
from msopt.models import GPT, GPTConfig

V, T = 64, 16


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(V, n_layer=2, n_embd=32, n_head=2, block_size=T, **kw))


def xy(b=4):
    x = torch.randint(0, V, (b, T), generator=torch.Generator().manual_seed(0))
    return x, torch.roll(x, -1, 1)


def test_precision_context():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with precision_context("bf16", "cpu"):
        assert (x @ w).dtype == torch.bfloat16
    with precision_context("fp32", "cpu"):
        assert (x @ w).dtype == torch.float32
    before = torch.backends.cuda.matmul.allow_tf32
    with precision_context("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with tf32(False):
        assert not torch.backends.cuda.matmul.allow_tf32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision_context("fp8", "cpu")
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        precision_context("fp16", "cpu")


def test_grad_scaler_only_for_fp16_on_cuda():
    assert not grad_scaler("fp16", "cpu").is_enabled()
    assert not grad_scaler("bf16", "cpu").is_enabled()


def test_peak_flops_table():
    assert peak_flops(name="NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(name="NVIDIA H200") == 989e12
    assert peak_flops(name="NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops(name="NVIDIA L4") == 121e12
    assert peak_flops(name="Tesla T4") == 65e12
    assert peak_flops(name="Some GPU") is None
    assert peak_flops("cpu") is None and peak_flops() is None
    assert set(PEAK_TFLOPS) == {"H100", "H200", "A100", "L4", "T4"}


def test_flops_per_token_matches_nanogpt_estimate():
    # nanoGPT's estimate_mfu: 6N + 12 L H Q T, with N the parameters without the position embedding
    model = tiny()
    n = model.num_params() - model.transformer.wpe.weight.numel()
    assert flops_per_token(n, 2, 2, 16, T) == 6 * n + 12 * 2 * 2 * 16 * T
    assert model_flops_per_token(model, T) == flops_per_token(n, 2, 2, 16, T)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        flops_per_token(n, 2, 2, 16, 0)


def test_throughput_meter():
    meter = ThroughputMeter(flops_per_token=10.0, peak=1e6, warmup=1)
    for _ in range(3):
        with meter.step(1000):
            sum(range(10000))
    s = meter.summary()
    assert s["steps"] == 2 and s["tokens_per_s"] > 0 and s["step_s"] > 0
    assert s["mfu"] == pytest.approx(s["tokens_per_s"] * 10.0 / 1e6)
    assert ThroughputMeter(warmup=0).summary.__doc__
    with pytest.raises(ValueError, match="only 0 steps timed with warmup=1"):
        ThroughputMeter().summary()
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        ThroughputMeter(warmup=-1)
    meter = ThroughputMeter(warmup=0)
    with meter.step(10):
        pass
    assert meter.summary()["mfu"] is None


def test_compile_falls_back_to_eager():
    model = tiny()
    x, _ = xy()

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compile_model(model, (x,), backend=broken)
    assert out is model
    assert any("torch.compile failed" in str(w.message) for w in caught)
    assert all(p.grad is None for p in model.parameters())


def test_compile_with_a_working_backend():
    model = tiny()
    x, _ = xy()
    compiled = compile_model(model, (x,), backend="eager")
    assert compiled is not model
    assert torch.allclose(compiled(x), model(x))
    assert all(p.grad is None for p in model.parameters())


def test_fused_adamw_available():
    assert fused_adamw_available("cpu") in (True, False)


def test_estimate_memory_matches_real_tensors():
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = xy()
    clm_loss(model(x), y).backward()
    opt.step()
    measured = memory_report(model, opt)
    est = estimate_memory(model.config, 4, T, "bf16", "adamw")       # n_params from the config's formula
    n = model.num_params()
    assert est["params"] == measured["params"] == 4 * n
    assert est["grads"] == measured["grads"] == 4 * n
    steps = 4 * len(list(model.parameters()))                        # AdamW's step counters, not estimated
    assert measured["optimizer"] == est["optimizer"] + steps
    assert measured["peak_allocated"] is None and measured["activations"] is None
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_estimate_memory_scaling():
    cfg = GPTConfig.gpt2()
    a = estimate_memory(cfg, 8, 1024)
    b = estimate_memory(cfg, 16, 1024)
    copies = 2 * (a["params"] // 4)                                   # autocast's 2-byte weights: not per token
    assert b["params"] == a["params"] and b["activations"] - copies == pytest.approx(2 * (a["activations"] - copies))
    logits = 8 * 1024 * cfg.vocab_size * 12                           # kept with or without checkpointing
    ck = estimate_memory(cfg, 8, 1024, checkpointing=True)["activations"]
    assert logits < ck and a["activations"] - ck > 2e9               # most of GPT-2's 2.7 GB of block activations
    assert a["workspace"] == 64 * 2**20 and estimate_memory(cfg, 8, 1024, workspace=0)["total"] == a["total"] - 2**26
    assert estimate_memory(cfg, 8, 1024, fused_attention=False)["activations"] > a["activations"]
    assert estimate_memory(cfg, 8, 1024, "fp32")["activations"] > a["activations"]
    assert estimate_memory(cfg, 8, 1024, optimizer="sgd")["optimizer"] == 0
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        estimate_memory(cfg, 8, optimizer="lion")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        estimate_memory(cfg, 0)


def test_checkpoint_blocks_gives_the_same_gradients():
    x, y = xy()
    ref = tiny(dropout=0.1)
    torch.manual_seed(1)
    clm_loss(ref(x), y).backward()
    model = tiny(dropout=0.1)
    assert checkpoint_blocks(model) == 2
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(1)
    clm_loss(model(x), y).backward()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert names == [n for n, _ in ref.named_parameters()]
    checkpoint_blocks(model, enabled=False)
    assert all("forward" not in b.__dict__ for b in model.transformer.blocks)


def test_dist_info_and_resolve(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert dist_info() == DistInfo(0, 0, 1) and dist_info().main
    assert resolve_distributed("auto") == "none" and resolve_distributed("fsdp") == "none"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_info() == DistInfo(3, 1, 4) and not dist_info().main
    assert resolve_distributed("auto") == "ddp" and resolve_distributed("fsdp") == "fsdp"
    assert resolve_distributed("none") == "none"
    with pytest.raises(ValueError, match="unknown distributed mode 'zero'"):
        resolve_distributed("zero")


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == DistInfo()
    model = tiny()
    assert data_parallel(model, "none", torch.device("cpu")) is model
    with pytest.raises(ValueError, match="unknown data-parallel mode 'tp'"):
        data_parallel(model, "tp", torch.device("cpu"))
    assert not is_sharded(model)
    t = torch.ones(3)
    assert full_tensor(t) is t and distribute_like(t, torch.zeros(3)) is t
    one = make_strategy("auto")
    assert float(one.mean(torch.tensor(2.5))) == 2.5 and one.shard(t) is t and not one.shards_parameters
    with no_sync(model, True), no_sync(nn.Linear(2, 2), False):
        pass


def test_shard_batch():
    x, y = xy(8)
    parts = [shard_batch((x, y), r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    d = shard_batch({"ids": x, "n": 3}, 1, 4)
    assert torch.equal(d["ids"], x[2:4]) and d["n"] == 3
    with pytest.raises(ValueError, match="a batch of 8 rows does not split over 3 processes"):
        shard_batch(x, 0, 3)
