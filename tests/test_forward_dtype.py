"""Forward mode keeps each tangent in its primal's dtype.

torch 2.13's forward-over-reverse promotes a tangent to float64 when the lower loss multiplies a
0-d upper by a Python number (``0.5 * lam.exp() * ||θ||²``); the next step then fed float64
tangents to a float32 model and failed ("expected m1 and m2 to have the same dtype").
"""

import torch
import torch.nn.functional as F
from torch import nn

import mlopt
from mlopt.hypergrad.forward import forward_step, initial_tangents
from mlopt.testing import capture_gradients


def _step(state, uppers):
    (theta,), (lam,) = state, uppers
    g = torch.func.grad(lambda t: ((t - 1.0) ** 2).sum() + 0.5 * lam.exp() * (t * t).sum())(theta)
    return (theta - 0.1 * g,)


def test_tangents_keep_the_state_dtype_and_value():
    got = {}
    for dtype in (torch.float32, torch.float64):
        theta, lam = torch.linspace(-1, 1, 5, dtype=dtype), torch.tensor(-1.0, dtype=dtype)
        z = initial_tangents((theta,), (lam,))
        for _ in range(3):
            (theta,), z = forward_step(_step, (theta,), (lam,), z)
            assert z.state[0].dtype == dtype
        got[dtype] = z.state[0]
    torch.testing.assert_close(got[torch.float32], got[torch.float64].float())


def _program(method, T=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    hyper = nn.Module()
    hyper.log_decay = nn.Parameter(torch.tensor(-2.0))
    xt, yt = torch.randn(16, 6), torch.randint(0, 3, (16,))
    xv, yv = torch.randn(16, 6), torch.randint(0, 3, (16,))

    class Fit(mlopt.Problem):
        def training_step(self, batch):
            decay = sum((p * p).sum() for p in self.parameters())
            return F.cross_entropy(self(xt), yt) + 0.5 * self.tune.module.log_decay.exp() * decay

    class Tune(mlopt.Problem):
        def training_step(self, batch):
            return F.cross_entropy(self.fit(xv), yv)

    fit = Fit(
        "fit",
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        config=mlopt.Config(type=method, unroll_steps=T),
    )
    up_opt = torch.optim.SGD(hyper.parameters(), lr=0.1)
    tune = Tune("tune", hyper, up_opt)
    seen = capture_gradients(up_opt)
    engine = mlopt.Engine(
        [tune, fit],
        {"u2l": {tune: [fit]}, "l2u": {fit: [tune]}},
        mlopt.EngineConfig(train_iters=2 * T, progress=False),
    )
    engine.run()
    return [s[0] for s in seen]


def test_float32_forward_mode_with_a_scalar_decay_equals_reverse():
    forward, reverse = _program("forward"), _program("reverse")
    assert len(forward) == len(reverse) == 2
    for a, b in zip(forward, reverse):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
