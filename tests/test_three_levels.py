"""A 3-level program with reverse mode everywhere equals a hand-unrolled autograd reference."""

import torch
from helpers import F64, Vector

import mlopt
from mlopt.testing import capture_gradients


def mats(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)

    def spd():
        m = torch.randn(n, n, generator=g, dtype=F64)
        return m @ m.T / n + torch.eye(n, dtype=F64)

    return {
        "A": spd(),
        "P": torch.randn(n, n, generator=g, dtype=F64),
        "Q": spd(),
        "R": torch.randn(n, n, generator=g, dtype=F64),
        "t": torch.randn(n, generator=g, dtype=F64),
    }


def f_low(M, w, th):
    return 0.5 * w @ M["A"] @ w - w @ (M["P"] @ th)


def f_mid(M, th, w, phi):
    return 0.5 * th @ M["Q"] @ th + 0.5 * ((w - phi) ** 2).sum() - th @ (M["R"] @ phi)


def f_top(M, th, phi):
    return 0.5 * ((th - M["t"]) ** 2).sum() + 0.05 * phi @ phi


class Low(mlopt.Problem):
    def training_step(self, batch):
        return f_low(self.M, self.module.weight, self.mid.module.weight)


class Mid(mlopt.Problem):
    def training_step(self, batch):
        return f_mid(self.M, self.module.weight, self.low.module.weight, self.top.module.weight)


class Top(mlopt.Problem):
    def training_step(self, batch):
        return f_top(self.M, self.mid.module.weight, self.module.weight)


def reference(M, w0, th0, phi0, a, b, windows):
    """Replays the engine's schedule by hand: low windows of 2, mid windows of 2."""
    phi = phi0.clone().requires_grad_()
    th = th0.clone().requires_grad_()
    th_start = th
    w = w0.clone()
    for _ in range(windows):  # mid's window: `windows` mid steps
        wf = w.clone().requires_grad_()
        for _ in range(2):  # low's window
            (g,) = torch.autograd.grad(f_low(M, wf, th), wf, create_graph=True)
            wf = wf - a * g
        (G,) = torch.autograd.grad(f_mid(M, th, wf, phi), th, create_graph=True)
        th = th - b * G
        w = wf.detach()
    (hg,) = torch.autograd.grad(f_top(M, th, phi), phi)
    return hg, th_start


def test_three_level_reverse_equals_hand_unrolled():
    M = mats()
    w0, th0, phi0 = (torch.randn(3, dtype=F64) for _ in range(3))
    a, b = 0.2, 0.1
    mods = {"low": Vector(w0), "mid": Vector(th0), "top": Vector(phi0)}
    opts = {
        "low": torch.optim.SGD(mods["low"].parameters(), lr=a),
        "mid": torch.optim.SGD(mods["mid"].parameters(), lr=b),
        "top": torch.optim.SGD(mods["top"].parameters(), lr=1.0),
    }
    cfg = mlopt.Config(type="reverse", unroll_steps=2)
    low = Low("low", mods["low"], opts["low"], config=cfg)
    mid = Mid("mid", mods["mid"], opts["mid"], config=cfg)
    top = Top("top", mods["top"], opts["top"])
    for p in (low, mid, top):
        p.M = M
    seen = capture_gradients(opts["top"])
    engine = mlopt.Engine(
        [top, mid, low],
        {"u2l": {top: [mid], mid: [low]}, "l2u": {low: [mid], mid: [top]}},
        mlopt.EngineConfig(train_iters=4),
    )
    engine.run()
    assert engine.step_counts == {"low": 4, "mid": 2, "top": 1}
    expected, _ = reference(M, w0, th0, phi0, a, b, windows=2)
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=1e-10)
