import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from msopt.models import GPT, GPTConfig
from msopt.optim import (
    NS_COEFFICIENTS,
    OPTIMIZERS,
    SCHEDULES,
    SGD,
    Adam,
    Muon,
    adam_update,
    build_optimizer,
    build_schedule,
    gd_step,
    lr_range_test,
    muon_param_groups,
    newton_schulz,
    newton_step,
    param_groups,
    suggest_lr,
    warmup_cosine,
)

torch.manual_seed(0)
X = torch.randn(256, 10)
Y = (X @ torch.randn(10, 4)).argmax(-1)


def net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 4))


def train(make_opts, steps=15, penalty=0.0):
    "Losses and final flat weights of a fresh net trained by the optimizer(s) make_opts(model) returns."
    model = net()
    opts = make_opts(model)
    opts = opts if isinstance(opts, (list, tuple)) else [opts]
    losses = []
    for i in range(steps):
        rows = torch.arange(i * 32, (i + 1) * 32) % len(X)
        loss = F.cross_entropy(model(X[rows]), Y[rows])
        if penalty:
            loss = loss + penalty * sum(0.5 * (p ** 2).sum() for p in model.parameters() if p.dim() > 1)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_same(a, b, tol=1e-5):
    (la, wa), (lb, wb) = a, b
    assert (la - lb).abs().max() < tol and (wa - wb).abs().max() < tol


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


# -- from-scratch rules against torch.optim ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(lr=0.5), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, nesterov=True),
                                dict(lr=0.1, momentum=0.9, weight_decay=0.05), dict(lr=0.2, weight_decay=0.1)])
def test_sgd_matches_torch(kw):
    assert_same(train(lambda m: SGD(m.parameters(), **kw)), train(lambda m: torch.optim.SGD(m.parameters(), **kw)))


@pytest.mark.parametrize("kw,ref", [(dict(lr=1e-2), torch.optim.Adam),
                                    (dict(lr=1e-2, weight_decay=0.1), torch.optim.Adam),
                                    (dict(lr=1e-2, weight_decay=0.1, decoupled=True), torch.optim.AdamW),
                                    (dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.3, decoupled=True),
                                     torch.optim.AdamW)])
def test_adam_matches_torch(kw, ref):
    ref_kw = {k: v for k, v in kw.items() if k != "decoupled"}
    assert_same(train(lambda m: Adam(m.parameters(), **kw)), train(lambda m: ref(m.parameters(), **ref_kw)))


def test_adam_update_state_and_adamw_default_decay():
    p, state = torch.ones(3), {}
    adam_update(p, torch.full((3,), 2.0), state, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5,
                decoupled=True)
    assert state["step"] == 1 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
    # decoupled: p * (1 - 0.05) then minus lr * m_hat / sqrt(v_hat) = 0.1 * 1
    assert torch.allclose(p, torch.full((3,), 0.95 - 0.1), atol=1e-6)


def _split(model):
    return [p for p in model.parameters() if p.dim() == 2], [p for p in model.parameters() if p.dim() != 2]


@pytest.mark.parametrize("shape", [(16, 16), (8, 40), (40, 8)])
@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.1), (True, 0.05)])
def test_muon_matches_torch_muon_on_matrices(shape, nesterov, wd):
    "Tall matrices also check torch's default lr adjustment sqrt(max(1, rows / cols))."
    w = torch.randn(*shape)
    a, b = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    ours = Muon([a], lr=0.03, nesterov=nesterov, weight_decay=wd, ns_dtype=torch.bfloat16)
    ref = torch.optim.Muon([b], lr=0.03, nesterov=nesterov, weight_decay=wd)
    for _ in range(5):
        g = torch.randn(*shape)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.1), (True, 0.05)])
def test_muon_matches_torch_muon_and_adamw(nesterov, wd):
    def ours(m):
        mats, vecs = _split(m)
        return Muon([{"params": mats}, {"params": vecs, "use_muon": False, "lr": 1e-2}], lr=0.05, nesterov=nesterov,
                    weight_decay=wd, ns_dtype=torch.bfloat16)

    def ref(m):
        mats, vecs = _split(m)
        return [torch.optim.Muon(mats, lr=0.05, momentum=0.95, nesterov=nesterov, weight_decay=wd),
                torch.optim.AdamW(vecs, lr=1e-2, betas=(0.9, 0.95), weight_decay=wd)]
    assert_same(train(ours), train(ref))


def test_muon_float32_close_to_reference():
    def ours(m):
        mats, vecs = _split(m)
        return Muon([{"params": mats}, {"params": vecs, "use_muon": False}], lr=0.05)
    def ref(m):
        mats, vecs = _split(m)
        return [torch.optim.Muon(mats, lr=0.05, weight_decay=0.0), torch.optim.AdamW(vecs, lr=0.05, betas=(0.9, 0.95),
                                                                                    weight_decay=0.0)]
    (la, _), (lb, _) = train(ours), train(ref)
    assert (la - lb).abs().max() < 1e-2


def test_muon_rejects_non_matrix_in_muon_group():
    with pytest.raises(ValueError, match="2-D matrices only") as e:
        Muon(net().parameters())
    assert one_line(e)


def test_newton_schulz_orthogonalizes_and_matches_torch():
    torch.manual_seed(0)
    for shape in [(32, 96), (96, 32)]:
        G = torch.randn(*shape)
        orth = newton_schulz(G)
        assert orth.shape == G.shape and orth.dtype == torch.bfloat16
        sv = torch.linalg.svdvals(orth.float())
        assert sv.min() > 0.5 and sv.max() < 1.3
        from torch.optim._muon import _zeropower_via_newtonschulz
        assert torch.equal(orth, _zeropower_via_newtonschulz(G, NS_COEFFICIENTS, 5, 1e-7))
    assert newton_schulz(torch.randn(8, 8), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(3, 4, 5))


# -- gradient descent and Newton ---------------------------------------------------------------------------------------
def test_gd_step():
    out = gd_step(lambda t: (t ** 2).sum(), torch.tensor([3.0, 4.0]), 0.25)
    assert torch.allclose(out, torch.tensor([1.5, 2.0])) and not out.requires_grad
    with pytest.raises(ValueError, match="lr must be a positive number") as e:
        gd_step(lambda t: (t ** 2).sum(), torch.zeros(2), -0.1)
    assert one_line(e)


def test_newton_solves_quadratic_in_one_step():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = newton_step(lambda t: 0.5 * t @ A @ t - b @ t, torch.tensor([5.0, -7.0], dtype=torch.float64))
    assert torch.allclose(out, torch.linalg.solve(A, b))


def test_newton_logistic_regression_matches_lbfgs():
    torch.manual_seed(0)
    Xd = torch.cat([torch.randn(200, 3, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1)
    y = (torch.rand(200, dtype=torch.float64) < torch.sigmoid(Xd @ torch.randn(4, dtype=torch.float64))).double()
    def loss(w):
        return F.binary_cross_entropy_with_logits(Xd @ w, y) + 5e-4 * w.pow(2).sum()
    w = torch.zeros(4, dtype=torch.float64)
    for _ in range(8):
        w = newton_step(loss, w)
    v = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        out = loss(v)
        out.backward()
        return out
    opt.step(closure)
    assert torch.allclose(w, v.detach(), atol=1e-7)


def test_newton_errors():
    with pytest.raises(ValueError, match="1-D parameter vector") as e:
        newton_step(lambda t: (t ** 2).sum(), torch.zeros(2, 2))
    assert one_line(e)
    with pytest.raises(ValueError, match="singular") as e:
        newton_step(lambda t: t[0] ** 2, torch.ones(2))
    assert one_line(e)


# -- L2 against weight decay -------------------------------------------------------------------------------------------
def _groups(m, wd):
    return [{"params": [p for p in m.parameters() if p.dim() > 1], "weight_decay": wd},
            {"params": [p for p in m.parameters() if p.dim() <= 1], "weight_decay": 0.0}]


def test_l2_equals_weight_decay_for_sgd_not_for_adamw():
    "Weights only: the losses of the penalty runs include the penalty."
    sgd_l2 = train(lambda m: SGD(_groups(m, 0.0), lr=0.1, momentum=0.9), penalty=0.1)[1]
    assert torch.allclose(sgd_l2, train(lambda m: SGD(_groups(m, 0.1), lr=0.1, momentum=0.9))[1], atol=1e-6)
    adam_l2 = train(lambda m: Adam(_groups(m, 0.0), lr=1e-2), penalty=0.1)[1]
    assert torch.allclose(adam_l2, train(lambda m: Adam(_groups(m, 0.1), lr=1e-2))[1], atol=1e-6)
    adamw = train(lambda m: Adam(_groups(m, 0.1), lr=1e-2, decoupled=True))[1]
    assert (adam_l2 - adamw).abs().max() > 1e-3


# -- parameter groups and build_optimizer ------------------------------------------------------------------------------
def gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.tiny(50, n_layer=2, n_embd=32, n_head=2, block_size=16, **kw))


def test_param_groups_and_warmup_cosine():
    decay, no_decay = param_groups(gpt(), 0.1)
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    for fn in (param_groups, muon_param_groups):
        with pytest.raises(ValueError, match="no trainable parameters"):
            fn(frozen, 0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_param_groups_leave_embeddings_and_head_to_adamw(tied):
    model = gpt(tie_weights=tied)
    groups = muon_param_groups(model, 0.1)
    muon_ids = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    emb = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight), id(model.lm_head.weight)}
    assert not muon_ids & emb
    blocks = [p for n, p in model.named_parameters() if n.startswith("transformer.blocks") and p.dim() == 2]
    assert {id(p) for p in blocks} == muon_ids
    n_all = sum(len(g["params"]) for g in groups)
    assert n_all == len(list(model.parameters()))
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]


def test_build_optimizer_kinds_and_groups():
    assert isinstance(build_optimizer(gpt(), "sgd", lr=0.1), torch.optim.SGD)
    assert build_optimizer(gpt(), "sgd", lr=0.1).param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(gpt(), "adam"), torch.optim.Adam)
    adamw = build_optimizer(gpt(), "adamw", lr=1e-3, weight_decay=0.2)
    assert type(adamw) is torch.optim.AdamW and [g["weight_decay"] for g in adamw.param_groups] == [0.2, 0.0]
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    muon = build_optimizer(gpt(), "muon", lr=0.02)
    assert isinstance(muon, Muon) and muon.param_groups[0]["momentum"] == 0.95
    assert [g["lr"] for g in muon.param_groups] == [0.02, pytest.approx(0.002), pytest.approx(0.002)]
    muon = build_optimizer(gpt(), "muon", lr=0.02, adam_lr=3e-3, momentum=0.9)
    assert [g["lr"] for g in muon.param_groups][1:] == [3e-3, 3e-3] and muon.param_groups[0]["momentum"] == 0.9
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw", "muon"}


@pytest.mark.parametrize("kw,match", [
    (dict(name="lion"), "unknown optimizer 'lion': use one of sgd, adam, adamw, muon"),
    (dict(lr=-1e-3), "lr must be a positive number"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(weight_decay=-0.1), "weight_decay must be a number >= 0"),
    (dict(name="muon", lr=0.02, adam_lr=-1.0), "adam_lr must be"),
])
def test_build_optimizer_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        build_optimizer(gpt(), **kw)
    assert one_line(e)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False))


@pytest.mark.parametrize("cls,kw", [(SGD, dict(lr=-1.0)), (SGD, dict(lr=0.1, nesterov=True)),
                                    (Adam, dict(lr=0.0)), (Adam, dict(betas=(0.9, 1.0))),
                                    (Muon, dict(lr=-0.02)), (Muon, dict(momentum=1.0)), (Muon, dict(ns_steps=0))])
def test_optimizer_constructor_errors(cls, kw):
    with pytest.raises(ValueError) as e:
        cls([nn.Parameter(torch.zeros(2, 2))], **kw)
    assert one_line(e)


@pytest.mark.parametrize("name", ["sgd", "adamw", "muon"])
def test_trainer_resumes_exactly_with_built_optimizer(name, tmp_path):
    from msopt.losses import clm_loss
    from msopt.train import TrainConfig, Trainer

    def data(i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 50, (4, 16), generator=g)
        return x, (x + 1) % 50
    def loss_fn(m, b):
        return clm_loss(m(b[0]), b[1])
    lr = {"sgd": 0.1, "adamw": 3e-3, "muon": 0.02}[name]
    def cfg():
        return TrainConfig(steps=8, lr=lr, warmup_steps=2, progress=False, ckpt_every=2)
    def trainer(out=None):
        model = gpt()
        return Trainer(model, loss_fn, data, cfg(), out_dir=out, optimizer=build_optimizer(model, name, lr=lr))
    full = trainer().fit()
    trainer(tmp_path).fit(stop_at=5)
    resumed = trainer(tmp_path).fit()
    assert full.series("train_loss") == resumed.series("train_loss")
    assert full.series("train_loss")[1][-1] < full.series("train_loss")[1][0]


# -- schedules ------------------------------------------------------------------------------------------------------
def test_schedule_documented_values():
    approx = pytest.approx
    c = build_schedule("constant", 100, warmup_steps=10)
    assert [c(0), c(4), c(9), c(10), c(99)] == approx([0.1, 0.5, 1.0, 1.0, 1.0])
    s = build_schedule("step", 100, step_size=30, gamma=0.5)
    assert [s(0), s(29), s(30), s(60), s(99)] == approx([1, 1, 0.5, 0.25, 0.125])
    assert build_schedule("step", 90)(30) == approx(0.1)                      # default step_size = steps // 3
    m = build_schedule("multistep", 100, milestones=[40, 70], gamma=0.2)
    assert [m(39), m(40), m(69), m(70)] == approx([1, 0.2, 0.2, 0.04])
    assert build_schedule("multistep", 100)(75) == approx(0.01)               # default milestones 50 %, 75 %
    cos = build_schedule("cosine", 110, warmup_steps=10, min_lr_ratio=0.1)
    assert [cos(9), cos(10), cos(60), cos(110)] == approx([1.0, 1.0, 0.55, 0.1])
    assert all(cos(t) == warmup_cosine(t, 110, 10, 0.1) for t in range(120))
    lin = build_schedule("linear", 110, warmup_steps=10, min_lr_ratio=0.0)
    assert [lin(10), lin(35), lin(60), lin(110), lin(200)] == approx([1.0, 0.75, 0.5, 0.0, 0.0])
    st_ = build_schedule("slanted_triangular", 1000)
    assert [st_(0), st_(50), st_(100), st_(550), st_(1000)] == approx([1 / 32, (1 + 0.5 * 31) / 32, 1.0,
                                                                       (1 + 0.5 * 31) / 32, 1 / 32])
    w = build_schedule("wsd", 100, warmup_steps=5, min_lr_ratio=0.0)
    assert [w(4), w(5), w(79), w(80), w(90), w(100)] == approx([1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    w2 = build_schedule("wsd", 100, min_lr_ratio=0.1, decay_frac=0.5, decay_shape="1-sqrt")
    assert [w2(49), w2(50), w2(75), w2(100)] == approx([1.0, 1.0, 1 - 0.9 * math.sqrt(0.5), 0.1])


@pytest.mark.parametrize("name,ours,ref", [
    ("step", dict(step_size=7, gamma=0.6), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.6)),
    ("multistep", dict(milestones=[10, 25, 40], gamma=0.3),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 25, 40], gamma=0.3)),
    ("cosine", dict(min_lr_ratio=0.05),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=0.05)),
    ("linear", dict(min_lr_ratio=0.2),
     lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=50)),
])
def test_schedules_match_torch_schedulers(name, ours, ref):
    fn = build_schedule(name, 50, **ours)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = ref(opt)
    for t in range(50):
        assert fn(t) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        sched.step()


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), steps=st.integers(1, 400), warm=st.floats(0, 0.15),
       ratio=st.floats(0, 1), data=st.data())
def test_schedules_stay_in_unit_interval(name, steps, warm, ratio, data):
    warmup = 0 if name == "slanted_triangular" else int(warm * steps)
    fn = build_schedule(name, steps, warmup_steps=warmup, min_lr_ratio=ratio)
    t = data.draw(st.integers(0, 2 * steps))
    assert 0.0 <= fn(t) <= 1.0


@pytest.mark.parametrize("args,kw,match", [
    (("cosinus", 10), {}, "unknown schedule 'cosinus': use one of constant, step, multistep, cosine, linear"),
    (("cosine", 10), dict(gamma=0.5), "schedule 'cosine' takes no option 'gamma'"),
    (("cosine", 0), {}, "steps must be a positive int"),
    (("cosine", 10), dict(warmup_steps=11), "warmup_steps must be an int in"),
    (("cosine", 10), dict(min_lr_ratio=1.5), "min_lr_ratio must be in"),
    (("step", 10), dict(gamma=-0.1), "gamma must be in"),
    (("step", 10), dict(step_size=0), "step_size must be a positive int"),
    (("slanted_triangular", 10), dict(warmup_steps=2), "warms up by itself"),
    (("wsd", 10), dict(decay_shape="cubic"), "wsd needs decay_shape"),
    (("wsd", 10), dict(warmup_steps=9), "runs into the decay"),
])
def test_schedule_errors(args, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        build_schedule(*args, **kw)
    assert one_line(e)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        build_schedule("constant", 10)(-1)


# -- range test -------------------------------------------------------------------------------------------------------
def test_lr_range_test_and_suggestion():
    def batch(i):
        rows = torch.arange(i * 32, (i + 1) * 32) % len(X)
        return X[rows], Y[rows]
    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])
    lrs, losses = lr_range_test(net, loss_fn, batch, start_lr=1e-4, end_lr=1e3, steps=80)
    assert lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert len(lrs) == len(losses) < 80                                       # it stopped when the loss blew up
    assert all(math.isfinite(v) for v in losses)
    lr = suggest_lr(lrs, losses)
    assert lrs[0] / 10 <= lr <= lrs[-1]
    lrs2, _ = lr_range_test(net, loss_fn, [batch(i) for i in range(4)], 1e-4, 1e-2, steps=10, optimizer="muon")
    assert len(lrs2) == 10 and lrs2[-1] == pytest.approx(1e-2)


def test_suggest_lr_on_a_known_curve():
    lrs = [10 ** (-5 + 4 * i / 100) for i in range(101)]                       # 1e-5 .. 1e-1
    losses = [(math.log10(lr) + 2) ** 2 for lr in lrs]                          # minimum at lr = 1e-2
    assert suggest_lr(lrs, losses) == pytest.approx(1e-3, rel=0.1)
    logistic = [5 - 4 / (1 + math.exp(-3 * (math.log10(lr) + 3))) for lr in lrs]  # falls fastest at 1e-3
    assert suggest_lr(lrs, logistic, "steepest") == pytest.approx(1e-3, rel=0.1)
    with pytest.raises(ValueError, match="unknown method"):
        suggest_lr(lrs, losses, "valley")
    with pytest.raises(ValueError, match="at least 3 points"):
        suggest_lr([1e-3], [1.0])


def test_lr_range_test_errors():
    for kw, match in [(dict(start_lr=-1.0), "start_lr must be a positive number"),
                      (dict(start_lr=1e-2, end_lr=1e-3), "end_lr must be larger"),
                      (dict(steps=1), "steps must be an int >= 2"), (dict(smoothing=1.0), "smoothing must be")]:
        with pytest.raises(ValueError, match=match) as e:
            lr_range_test(net, lambda m, b: m(b).sum(), lambda i: X[:4], **kw)
        assert one_line(e)
