"""Training-system features of the Engine, against hand-computed references in float64.

Validation and early stopping, gradient accumulation, clipping, warm-up, schedulers, non-finite
handling, bf16 autocast, TensorBoard logging, progress bar, DARTS roll-back, data loaders.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.errors import ConfigError, HypergradientError
from mlopt.hypergrad import CG
from mlopt.testing import QuadraticBilevel, capture_gradients

F64 = torch.float64
Q = QuadraticBilevel.random(n=3, m=3, seed=3)
_G = torch.Generator().manual_seed(11)
W0 = torch.randn(3, generator=_G, dtype=F64)
XS = [torch.randn(3, generator=_G, dtype=F64) for _ in range(8)]


class Vec(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.clone())

    def forward(self) -> torch.Tensor:
        return self.weight


class Fit(mlopt.Problem):
    """½‖w - x‖² for a data vector x; records every batch it is given."""

    def training_step(self, batch):
        self.seen.append(batch)
        return 0.5 * ((self.module.weight - batch) ** 2).sum()


class Linear(mlopt.Problem):
    """c·w: a constant gradient c (and NaN where scripted)."""

    def training_step(self, batch):
        self.calls += 1
        loss = self.c @ self.module.weight
        if self.calls in self.nan_loss_at:
            return loss * float("nan")
        if self.calls in self.nan_grad_at:  # finite loss, NaN gradient: d√u/du at u = 0
            return loss + torch.sqrt((0.0 * self.module.weight).sum())
        return loss


def single(problem_cls, *, data=None, opt=None, scheduler=None, iters=6, engine_cls=None, **cfg):
    mod = Vec(W0)
    opt = torch.optim.SGD(mod.parameters(), lr=0.1) if opt is None else opt(mod.parameters())
    sched = None if scheduler is None else scheduler(opt)
    p = problem_cls(
        "p", mod, opt, train_data_loader=data, scheduler=sched, config=mlopt.Config(**cfg)
    )
    p.__dict__.update(seen=[], calls=0, nan_loss_at=(), nan_grad_at=(), c=torch.ones(3, dtype=F64))
    engine_cls = engine_cls or mlopt.Engine
    engine = engine_cls([p], {}, mlopt.EngineConfig(train_iters=iters, strategy="cpu"))
    return engine, p, mod, opt


class QLower(mlopt.Problem):
    """f(θ, φ; x) = ½θᵀAθ - θᵀ(Bφ + c) - θᵀx (no x term without data)."""

    def training_step(self, batch):
        self.seen.append(batch)
        theta = self.module.weight
        loss = Q.lower_loss(theta, self.upper.module.weight)
        return loss if batch is None else loss - theta @ batch


class QUpper(mlopt.Problem):
    def training_step(self, batch):
        return Q.upper_loss(self.lower(), self.module.weight)


def bilevel(
    *,
    method="reverse",
    unroll=2,
    iters=4,
    lower_data=None,
    momentum=0.0,
    upper_cfg=None,
    lower_cfg=None,
    lower_scheduler=None,
    engine_cls=None,
    **engine_kw,
):
    low_mod, up_mod = Vec(W0), Vec(torch.linspace(-1, 1, 3, dtype=F64))
    low_opt = torch.optim.SGD(low_mod.parameters(), lr=0.1, momentum=momentum)
    lower = QLower(
        "lower",
        low_mod,
        low_opt,
        train_data_loader=lower_data,
        scheduler=None if lower_scheduler is None else lower_scheduler(low_opt),
        config=mlopt.Config(type=method, unroll_steps=unroll, **(lower_cfg or {})),
    )
    lower.__dict__["seen"] = []
    up_opt = torch.optim.SGD(up_mod.parameters(), lr=0.5)
    upper = QUpper("upper", up_mod, up_opt, config=mlopt.Config(**(upper_cfg or {})))
    grads = capture_gradients(up_opt)
    engine = (engine_cls or mlopt.Engine)(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=iters, strategy="cpu", **engine_kw),
    )
    return engine, upper, lower, grads


# ---------------------------------------------------------------- validation, early stopping
class Scripted(mlopt.Engine):
    """validation() returns the next value of a scripted sequence (and records the weights)."""

    script: list[float] = []

    def validation(self) -> dict:
        self.weights = getattr(self, "weights", {})
        self.weights[self.iteration] = self.problems_by_name["p"]._module.weight.detach().clone()
        self.grad_enabled = torch.is_grad_enabled()
        return {"score": torch.tensor(self.script[len(self.history)]), "other": 1.0}


def scripted(values, iters=40, **engine_kw):
    cls = type("S", (Scripted,), {"script": list(values)})
    mod = Vec(W0)
    p = Fit("p", mod, torch.optim.SGD(mod.parameters(), lr=0.1), train_data_loader=XS)
    p.__dict__["seen"] = []
    cfg = mlopt.EngineConfig(train_iters=iters, strategy="cpu", **engine_kw)
    return cls([p], {}, cfg)


def test_validation_every_valid_step_and_history():
    engine = scripted([0.5, 0.25, 0.125], iters=10, valid_step=3)
    out = engine.run()
    assert out["history"] == [
        {"iteration": 3, "score": 0.5, "other": 1.0},
        {"iteration": 6, "score": 0.25, "other": 1.0},
        {"iteration": 9, "score": 0.125, "other": 1.0},
    ]
    assert sorted(engine.weights) == [3, 6, 9]  # exactly 3 calls
    assert engine.grad_enabled is False
    assert out["iterations"] == 10 and not out["stopped_early"]


@pytest.mark.parametrize(
    ("mode", "values", "stop_after", "best"),
    [
        ("min", [5.0, 4.0, 4.0, 4.5, 6.0, 1.0, 1.0], 5, 4.0),
        ("max", [1.0, 2.0, 2.0, 1.5, 0.0, 9.0, 9.0], 5, 2.0),
        # an improvement (4.0 < 5.0) resets the count: stops after the 7th validation
        ("min", [5.0, 6.0, 7.0, 4.0, 5.0, 6.0, 7.0, 0.0], 7, 4.0),
    ],
)
def test_early_stopping_after_patience_bad_validations(mode, values, stop_after, best):
    engine = scripted(
        values,
        valid_step=2,
        early_stopping=True,
        early_stopping_metric="score",
        early_stopping_mode=mode,
        early_stopping_patience=3,
    )
    out = engine.run()
    assert out["stopped_early"] is True
    assert out["iterations"] == 2 * stop_after
    assert len(out["history"]) == stop_after
    assert out["best_metric"] == best
    assert len(engine.problems_by_name["p"].seen) == 2 * stop_after


def test_best_checkpoint_holds_the_best_validation(tmp_path):
    engine = scripted(
        [5.0, 3.0, 4.0, 3.5, 3.0, 9.0],
        valid_step=2,
        early_stopping=True,
        early_stopping_metric="score",
        early_stopping_patience=4,
        checkpoint_dir=str(tmp_path),
    )
    engine.run()
    assert engine.iteration == 12
    state = mlopt.checkpoint.safe_load(str(tmp_path / "best.pt"))
    assert state["run"]["iteration"] == 4  # 3.0 at iteration 4; the later 3.0 is not better
    assert state["run"]["best_metric"] == 3.0
    assert torch.equal(state["problems"]["p"]["module"]["weight"], engine.weights[4])
    assert "last.pt" in os.listdir(tmp_path)


def test_missing_early_stopping_metric_names_the_keys():
    engine = scripted([1.0], valid_step=1, early_stopping=True, early_stopping_metric="acc")
    with pytest.raises(ConfigError, match=r"'acc'.*\['other', 'score'\]"):
        engine.run()


class MidWindowValidation(mlopt.Engine):
    def validation(self) -> dict:
        return {"loss": -float(self.iteration)}


def test_best_checkpoint_with_validation_inside_a_window(tmp_path):
    engine, *_ = bilevel(
        unroll=2,
        iters=4,
        engine_cls=MidWindowValidation,
        valid_step=1,
        early_stopping=True,
        checkpoint_dir=str(tmp_path),
    )
    engine.run()
    assert "best.pt" in os.listdir(tmp_path)


# ---------------------------------------------------------------- accumulation, clipping, warm-up
def test_gradient_accumulation_averages_micro_steps():
    engine, p, mod, opt = single(Fit, data=XS[:6], gradient_accumulation=3)
    grads = capture_gradients(opt)
    engine.step()
    assert torch.equal(mod.weight.detach(), W0)  # no update between micro-steps
    engine.run()
    assert len(grads) == 2 and engine.update_counts["p"] == 2
    w1 = W0 - 0.1 * grads[0][0]
    torch.testing.assert_close(grads[0][0], W0 - torch.stack(XS[:3]).mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(grads[1][0], w1 - torch.stack(XS[3:6]).mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(mod.weight.detach(), w1 - 0.1 * grads[1][0], rtol=1e-15, atol=0)


def test_meta_batch_accumulation_in_the_upper_is_the_mean_hypergradient():
    # upper averages the hypergradients of 2 windows of a 2-step reverse unroll (closed form)
    engine, upper, lower, grads = bilevel(unroll=2, iters=4, upper_cfg={"gradient_accumulation": 2})
    phi0 = upper._module.weight.detach().clone()
    engine.run()
    assert len(grads) == 1
    theta2 = Q.unroll(phi0, W0, lr=0.1, steps=2)[0]
    h1 = Q.unrolled_hypergradient(phi0, W0, lr=0.1, steps=2)
    h2 = Q.unrolled_hypergradient(phi0, theta2, lr=0.1, steps=2)
    torch.testing.assert_close(grads[0][0], (h1 + h2) / 2, rtol=1e-12, atol=1e-14)


class TwoVec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(W0.clone())
        self.bias = nn.Parameter(torch.zeros(2, dtype=F64))


class TwoTensors(mlopt.Problem):
    """cw·w + cb·b: constant gradients (cw, cb), joint norm 5·scale."""

    def training_step(self, batch):
        return self.cw @ self.module.weight + self.cb @ self.module.bias


@pytest.mark.parametrize("scale", [10.0, 0.01])
def test_gradient_clipping_total_norm(scale):
    net = TwoVec()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    p = TwoTensors("p", net, opt, config=mlopt.Config(gradient_clipping=1.0))
    cw = scale * torch.tensor([1.0, -2.0, 2.0], dtype=F64)
    cb = scale * torch.tensor([4.0, 0.0], dtype=F64)
    p.__dict__.update(cw=cw, cb=cb)
    grads = capture_gradients(opt)
    mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=1, strategy="cpu")).run()
    raw = [cw, cb]
    ref = [g.clone() for g in raw]
    params = [nn.Parameter(torch.zeros_like(g)) for g in ref]
    for q, g in zip(params, ref):
        q.grad = g
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert float(norm) == pytest.approx(scale * 5.0, rel=1e-15)
    for seen, q in zip(grads[0], params):
        torch.testing.assert_close(seen, q.grad, rtol=1e-15, atol=0)
    total = float(torch.linalg.vector_norm(torch.cat(grads[0])))
    if scale * 5.0 > 1.0:  # clipped: total norm is max_norm·‖g‖/(‖g‖+1e-6)
        assert total == pytest.approx(1.0, abs=1e-6 / (scale * 5.0) + 1e-15)
        assert total <= 1.0
    else:  # unchanged, bit for bit
        for seen, g in zip(grads[0], raw):
            assert torch.equal(seen, g)


def test_warmup_ramps_the_learning_rate_linearly():
    engine, p, mod, opt = single(Linear, warmup_steps=4)
    c = p.c
    w = W0.clone()
    for t in range(6):
        engine.step()
        w = w - (0.1 * min(1.0, (t + 1) / 4)) * c
        torch.testing.assert_close(mod.weight.detach(), w, rtol=0, atol=1e-15)
        assert opt.param_groups[0]["lr"] == 0.1  # restored after each step


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_warmup_and_scheduler_in_a_differentiable_unroll():
    # lower updates inside the reverse unroll: lr_k = 0.1 · 0.5^k (StepLR) · min(1, (k+1)/2)
    engine, upper, lower, _ = bilevel(
        unroll=3,
        iters=3,
        lower_cfg={"warmup_steps": 2},
        lower_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    phi = upper._module.weight.detach().clone()
    engine.run()
    theta = W0.clone()
    for k in range(3):
        g = Q.A @ theta - Q.B @ phi - Q.c
        theta = theta - (0.1 * 0.5**k * min(1.0, (k + 1) / 2)) * g
    torch.testing.assert_close(lower._module.weight.detach(), theta, rtol=1e-14, atol=1e-15)
    assert lower.scheduler.last_epoch == 3


def test_scheduler_in_an_unroll_emits_no_torch_warning():
    engine, *_ = bilevel(
        unroll=2,
        iters=2,
        lower_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.run()


def test_scheduler_steps_once_per_optimizer_update():
    lrs = []
    engine, p, mod, opt = single(
        Linear,
        iters=8,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        gradient_accumulation=2,
        warmup_steps=2,
    )
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    engine.run()
    assert lrs == [0.1 * 0.5, 0.1, 0.05, 0.05]  # warm-up scales the scheduled rate
    assert p.scheduler.last_epoch == 4


# ---------------------------------------------------------------- non-finite values
def test_nonfinite_raise_names_problem_and_step():
    engine, p, mod, opt = single(Linear)
    p.__dict__["nan_loss_at"] = (2,)
    with pytest.raises(HypergradientError, match=r"'p', step 1: non-finite loss"):
        engine.run()


def test_nonfinite_skip_skips_the_update_with_a_warning():
    engine, p, mod, opt = single(Linear, iters=5, on_nonfinite="skip")
    p.__dict__.update(nan_loss_at=(2,), nan_grad_at=(4,))
    grads = capture_gradients(opt)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        engine.run()
    assert len(record) == 2
    assert len(grads) == 3
    torch.testing.assert_close(mod.weight.detach(), W0 - 3 * 0.1 * p.c, rtol=0, atol=1e-15)
    assert engine.step_counts["p"] == 5


class HookedInitLower(mlopt.Problem):
    """Meta-initialized lower f(θ) = ½θᵀAθ - cᵀθ, NaN on its 2nd call (a window end)."""

    def on_inner_loop_start(self) -> None:
        self.starts += 1

    def training_step(self, batch):
        self.calls += 1
        self.at_call[self.calls] = (
            self.module.weight.detach().clone(),
            self.upper.module.weight.detach().clone(),
        )
        loss = 0.5 * self.module.weight @ Q.A @ self.module.weight - Q.c @ self.module.weight
        return loss * float("nan") if self.calls == 2 else loss


class InitUpper(mlopt.Problem):
    def training_step(self, batch):
        r = Q.C @ self.lower() - Q.t
        return 0.5 * r @ r


def test_skip_at_a_window_end_opens_the_next_window():
    low_mod, up_mod = Vec(W0), Vec(W0)
    lower = HookedInitLower(
        "lower",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=0.1),
        config=mlopt.Config(type="first_order", initialize_from="upper", on_nonfinite="skip"),
    )
    lower.__dict__.update(starts=0, calls=0, at_call={})
    upper = InitUpper("upper", up_mod, torch.optim.SGD(up_mod.parameters(), lr=0.1))
    engine = mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=3, strategy="cpu"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        engine.run()
    assert lower.starts == 3  # windows start at build, then at the 2nd and 3rd updates
    for call in (1, 2, 3):  # every window starts from the upper's current parameters
        theta, phi = lower.at_call[call]
        assert torch.equal(theta, phi), call


# ---------------------------------------------------------------- precision
class Regression(mlopt.Problem):
    def training_step(self, batch):
        x, y = batch
        self.pred = self.module(x)
        return F.mse_loss(self.pred, y)


def test_bf16_autocast_loss_within_rounding_bound():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = nn.Linear(8, 2)
        p = Regression(
            "p",
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            train_data_loader=[(x, y)],
            config=mlopt.Config(precision=precision),
        )
        engine = mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=2, strategy="cpu"))
        engine.step()
        losses[precision] = float(engine.last_losses["p"])
        dtype = p.pred.dtype
        engine.step()
        assert net.weight.dtype == torch.float32 and torch.isfinite(net.weight).all()
        assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    # Error bounds (rounding analysis, no statistics). bf16 keeps 8 significant bits: unit
    # roundoff u = 2^-8; fp32: v = 2^-24. Under autocast the linear layer rounds x, W, b to bf16
    # (factor (1+u) each on a product), accumulates the 8 products and the bias in fp32
    # (factor (1+v)^9 at most) and rounds its output to bf16 (1+u):
    #   |ŷ - y| <= ((1+u)^3 (1+v)^10 - 1) · (|x||W|ᵀ + |b|) =: e,
    # mse_loss runs in fp32 (32 squares summed: (1+v)^35), so
    #   |L_bf16 - L| <= mean(e · (2|y - t| + e)) + ((1+v)^35 - 1) · (L + mean(e(2|y-t|+e))).
    # In fp32 the same holds with u replaced by v.
    torch.manual_seed(0)
    net = nn.Linear(8, 2).to(F64).requires_grad_(False)
    xd, yd = x.to(F64), y.to(F64)
    v = 2.0**-24
    scale = xd.abs() @ net.weight.abs().T + net.bias.abs()
    residual = (net(xd) - yd).abs()
    exact = float(F.mse_loss(net(xd), yd))

    def bound(u: float) -> float:
        e = ((1 + u) ** 3 * (1 + v) ** 10 - 1) * scale
        first = float((e * (2 * residual + e)).mean())
        return first + ((1 + v) ** 35 - 1) * (exact + first)

    assert abs(losses["fp32"] - exact) <= bound(v)
    assert abs(losses["bf16"] - exact) <= bound(2.0**-8)
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16


# ---------------------------------------------------------------- logging, progress bar
class Metered(Fit):
    def training_step(self, batch):
        loss = super().training_step(batch)
        self.losses.append(float(loss.detach()))
        return {"loss": loss, "half": loss.detach() / 2, "vector": torch.ones(3)}


class ValidOnce(mlopt.Engine):
    def validation(self) -> dict:
        return {"acc": self.iteration / 10}


def test_tensorboard_writes_tags_at_log_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mod = Vec(W0)
    p = Metered(
        "p",
        mod,
        torch.optim.SGD(mod.parameters(), lr=0.1),
        train_data_loader=XS,
        config=mlopt.Config(log_step=2),
    )
    p.__dict__.update(seen=[], losses=[])
    cfg = mlopt.EngineConfig(
        train_iters=6,
        valid_step=3,
        logger_type="tensorboard",
        log_dir=str(tmp_path / "tb"),
        strategy="cpu",
    )
    ValidOnce([p], {}, cfg).run()
    losses = p.losses
    files = os.listdir(tmp_path / "tb")
    assert any(f.startswith("events.out.tfevents") for f in files)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["p/half", "p/loss", "validation/acc"]
    loss_events = acc.Scalars("p/loss")
    assert [ev.step for ev in loss_events] == [2, 4, 6]
    for ev in loss_events:  # TensorBoard stores float32
        assert ev.value == float(torch.tensor(losses[ev.step - 1], dtype=torch.float32))
    assert [ev.step for ev in acc.Scalars("p/half")] == [2, 4, 6]
    assert [(ev.step, ev.value) for ev in acc.Scalars("validation/acc")] == [
        (3, pytest.approx(0.3, rel=1e-7)),
        (6, pytest.approx(0.6, rel=1e-7)),
    ]


def test_progress_bar_runs(capsys):
    mod = Vec(W0)
    p = Fit("p", mod, torch.optim.SGD(mod.parameters(), lr=0.1), train_data_loader=XS)
    p.__dict__["seen"] = []
    cfg = mlopt.EngineConfig(train_iters=5, progress=True, strategy="cpu")
    out = mlopt.Engine([p], {}, cfg).run()
    assert out["iterations"] == 5
    err = capsys.readouterr().err
    assert "mlopt" in err and "5/5" in err and "it/s" in err and "p=" in err


def test_progress_bar_shows_validation_metrics(capsys):
    class E(mlopt.Engine):
        def validation(self):
            return {"score": 0.125}

    mod = Vec(W0)
    p = Fit("p", mod, torch.optim.SGD(mod.parameters(), lr=0.1), train_data_loader=XS)
    p.__dict__["seen"] = []
    E([p], {}, mlopt.EngineConfig(train_iters=4, valid_step=2, progress=True)).run()
    err = capsys.readouterr().err
    assert "iteration 2: validation score=0.125" in err
    assert "iteration 4: validation score=0.125" in err


def test_progress_defaults_to_whether_stderr_is_a_terminal(monkeypatch):
    import sys

    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        mod = Vec(W0)
        p = Fit("p", mod, torch.optim.SGD(mod.parameters(), lr=0.1), train_data_loader=XS)
        engine = mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=1))
        assert engine.run_plan.progress is tty


# ---------------------------------------------------------------- DARTS roll-back
@pytest.mark.parametrize(("method", "unroll"), [("reverse", 2), ("darts", 1)])
def test_roll_back_redoes_the_window_with_the_new_upper(method, unroll):
    engine, upper, lower, _ = bilevel(
        method=method, unroll=unroll, iters=4, lower_data=XS, momentum=0.9, roll_back=True
    )
    # hand reference: the lower's own SGD(momentum) from the window start, on the window's
    # batches, with the upper parameters after the upper's step
    ref = nn.Parameter(W0.clone())
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for window in range(4 // unroll):
        for _ in range(unroll):
            engine.step()
        phi = upper._module.weight.detach()
        assert engine.step_counts["upper"] == window + 1
        for x in XS[window * unroll : (window + 1) * unroll]:
            ref_opt.zero_grad()
            (Q.lower_loss(ref, phi) - ref @ x).backward()
            ref_opt.step()
        assert torch.equal(lower._module.weight.detach(), ref.detach()), window
        state = lower.optimizer.state[lower._module.weight]["momentum_buffer"]
        assert torch.equal(state, ref_opt.state[ref]["momentum_buffer"])


# ---------------------------------------------------------------- data
def test_loader_restarts_when_exhausted():
    engine, p, *_ = single(Fit, data=XS[:3], iters=7)
    engine.run()
    assert [next(i for i, x in enumerate(XS) if x is b) for b in p.seen] == [0, 1, 2, 0, 1, 2, 0]
    assert engine.state("p").data.epoch == 2


def test_batch_is_none_without_a_loader():
    engine, p, *_ = single(Linear, iters=3)
    engine.run()
    assert p.batch is None and p.calls == 3


def test_empty_loader_is_a_config_error():
    engine, *_ = single(Fit, data=[], iters=1)
    with pytest.raises(ConfigError, match="'p'.*no batch"):
        engine.run()


@pytest.mark.parametrize(
    ("resample", "expected"),
    [("window", [0, 0, 0, 1, 1, 1]), ("step", [0, 1, 2, 3, 4, 5])],
)
def test_resample_window_draws_one_batch_per_window(resample, expected):
    engine, upper, lower, _ = bilevel(
        unroll=3, iters=6, lower_data=XS, lower_cfg={"resample": resample}
    )
    engine.run()
    assert [next(i for i, x in enumerate(XS) if x is b) for b in lower.seen] == expected
    assert lower.batch is XS[expected[-1]]


def _hooked_lower(hook):
    cls = type("Hooked", (QLower,), {"on_inner_loop_start": hook})
    low_mod = Vec(W0)
    lower = cls(
        "lower",
        low_mod,
        torch.optim.SGD(low_mod.parameters(), lr=0.1),
        train_data_loader=XS,
        config=mlopt.Config(unroll_steps=3, type="first_order"),
    )
    lower.__dict__["seen"] = []
    up_mod = Vec(torch.zeros(3, dtype=F64))
    upper = QUpper("upper", up_mod, torch.optim.SGD(up_mod.parameters(), lr=0.5))
    mlopt.Engine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        mlopt.EngineConfig(train_iters=6),
    ).run()
    return [next(i for i, x in enumerate(XS) if x is b) for b in lower.seen]


def test_a_lower_whose_hook_restarts_it_draws_one_batch_per_window_by_default():
    from mlopt.meta import reset_parameters

    engine, upper, lower, _ = bilevel(unroll=3, iters=6, lower_data=XS)
    assert engine.plan.problems["lower"].resample_window is False  # persistent: per update
    assert _hooked_lower(lambda self: reset_parameters(self)) == [0, 0, 0, 1, 1, 1]


def test_a_hook_that_does_not_restart_the_lower_keeps_one_batch_per_update():
    calls = []
    assert _hooked_lower(lambda self: calls.append(1)) == [0, 1, 2, 3, 4, 5]
    assert calls  # the hook ran


def test_a_task_sampler_loader_draws_one_task_per_window_by_default():
    from mlopt.data import EpisodicSampler

    X, y = torch.randn(40, 1, 4, 4), torch.arange(40) % 4
    tasks = EpisodicSampler((X, y), 2, 1, 1, seed=0, num_tasks=10)
    engine, *_ = bilevel(unroll=3, iters=1, lower_data=tasks)
    assert engine.plan.problems["lower"].resample_window
    engine, *_ = bilevel(unroll=3, iters=1, lower_data=tasks, lower_cfg={"resample": "step"})
    assert not engine.plan.problems["lower"].resample_window  # an explicit choice wins


def test_fp16_loss_scaling_skips_overflowing_steps_and_matches_unscaled_updates():
    """fp16: the GradScaler's power-of-two scale cancels exactly; an overflow skips the step."""

    class Quad(mlopt.Problem):
        def training_step(self, batch):
            return (self.module.weight**2).sum() * self.factor

    def run(precision, factor, dtype=torch.float64):
        m = nn.Linear(3, 1, bias=False).to(dtype)
        torch.nn.init.constant_(m.weight, 0.5)
        p = Quad(
            "p",
            m,
            torch.optim.SGD(m.parameters(), lr=0.1),
            config=mlopt.Config(precision=precision),
        )
        p.factor = factor
        engine = mlopt.Engine([p], {}, mlopt.EngineConfig(train_iters=3))
        engine.run()
        return m.weight.detach().clone(), engine

    w16, engine = run("fp16", 1.0)
    w32, _ = run("fp32", 1.0)
    torch.testing.assert_close(w16, w32, rtol=0, atol=0)
    scaler = engine.state("p").scaler
    assert scaler.get_scale() == 65536.0  # no overflow: the scale never dropped
    # float32: the loss (7.5e34) is finite but 65536 times it overflows: every step is skipped
    # (the scale halves each time, still too large) and the weights stay as they were
    w_inf, engine = run("fp16", 1e35, torch.float32)
    torch.testing.assert_close(w_inf, torch.full_like(w_inf, 0.5), rtol=0, atol=0)
    assert engine.state("p").scaler.get_scale() < 65536.0


def test_fp16_scaled_cotangent_overflowing_an_implicit_solver_skips_like_any_overflow():
    """An fp16 upper scales its loss by 65536; the scaled cotangent can overflow a lower's CG
    (its dot products square it) although the unscaled one would not: that is an overflow,
    handled as the GradScaler handles any (the step skipped, the scale lowered), not an error."""

    class Low(mlopt.Problem):
        def training_step(self, batch):
            theta, phi = self.module.weight, self.up.module.weight
            return 0.5 * ((theta - phi) ** 2).sum() + 0.5 * (theta**2).sum()

    class Up(mlopt.Problem):
        def training_step(self, batch):
            return 1e16 * (self.low.module.weight**2).sum()  # v ~ 1e16: v·v finite in fp32

    def run(precision):
        torch.manual_seed(0)
        lo, hi = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
        low = Low(
            "low",
            lo,
            torch.optim.SGD(lo.parameters(), lr=0.1),
            config=mlopt.Config(type=CG(iterations=3)),
        )
        opt = torch.optim.SGD(hi.parameters(), lr=1e-20)
        seen = capture_gradients(opt)
        up = Up("up", hi, opt, config=mlopt.Config(precision=precision))
        engine = mlopt.Engine(
            [up, low], {"u2l": {up: [low]}, "l2u": {low: [up]}}, mlopt.EngineConfig(train_iters=12)
        )
        engine.run()
        return engine, seen

    engine32, seen32 = run("fp32")
    assert len(seen32) == 12
    engine16, seen16 = run("fp16")  # raised HypergradientError before
    scale = engine16.state("up").scaler.get_scale()
    skipped = 12 - len(seen16)
    assert scale == 65536.0 / 2**skipped and 0 < skipped < 12
    assert all(torch.isfinite(g).all() for step in seen16 for g in step)
