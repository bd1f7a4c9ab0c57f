"""No host synchronisation in the hot loop: programs run on the ``meta`` device, where any
``.item()``, ``float(tensor)`` or Python branch on a tensor value raises.

The documented synchronisations are patched out or expected: the non-finite guard (one per
update, ``mlopt.linalg.vec.all_finite``), the stopping tests of monitored solvers (``CG(tol=...)``,
``Neumann``, ``FixedPoint``) and the finite-difference step size (one per hypergradient).
"""

import contextlib
import sys
from unittest import mock

import pytest
import torch

import mlopt
from mlopt.hypergrad import CG, Forward, Reverse

META = torch.device("meta")


class Low(mlopt.Problem):
    def training_step(self, batch):
        return ((self.module(batch) - self.up.module.weight.sum()) ** 2).mean()


class Up(mlopt.Problem):
    def training_step(self, batch):
        return (self.low.module(batch) ** 2).mean()


@contextlib.contextmanager
def on_meta():
    """Run Engines on the meta device, with the documented non-finite guard patched out."""
    with contextlib.ExitStack() as stack:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("mlopt") and hasattr(mod, "all_finite"):
                stack.enter_context(mock.patch.object(mod, "all_finite", lambda t: True))
        stack.enter_context(mock.patch("mlopt.engine.choose_device", lambda run: META))
        stack.enter_context(mock.patch("mlopt.config._check_device", lambda v: None))
        yield


def run_on_meta(method, *, init=False, iters=6):
    a = torch.nn.Linear(4, 4 if init else 1, bias=not init, device=META)
    b = torch.nn.Linear(4, 4 if init else 1, bias=False, device=META)
    data = [torch.randn(8, 4, device=META) for _ in range(3)]
    cfg = mlopt.Config(type=method, unroll_steps=3, initialize_from="up" if init else None)
    low = Low("low", a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), data, cfg)
    up = Up("up", b, torch.optim.Adam(b.parameters(), lr=0.1), data)
    with on_meta():
        engine = mlopt.Engine(
            [up, low],
            {"u2l": {up: [low]}, "l2u": {low: [up]}},
            mlopt.EngineConfig(train_iters=iters),
        )
        engine.run()
    assert b.weight.device == META
    return engine


@pytest.mark.parametrize(
    "method",
    [
        "reverse",
        Reverse(truncate=1),
        Reverse(checkpoint=1),
        "first_order",
        CG(3, tol=None),
        Forward(),
    ],
    ids=["reverse", "truncated", "checkpointed", "first_order", "cg-exact-k", "forward"],
)
def test_hot_loop_has_no_host_sync(method):
    assert run_on_meta(method).update_counts == {"up": 2, "low": 6}


@pytest.mark.parametrize("method", ["reverse", "first_order"])
def test_meta_initialized_loop_has_no_host_sync(method):
    assert run_on_meta(method, init=True).update_counts == {"up": 2, "low": 6}


def test_the_check_detects_a_host_sync():
    # CG's residual monitor (tol > 0) is a documented synchronisation: the meta run must see it
    with pytest.raises(RuntimeError, match="meta"):
        run_on_meta(CG(3))
