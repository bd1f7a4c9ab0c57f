"""The peers' versions of the Engine-overhead workloads (benchmarks/engine_overhead.py).

Same models, data, initial values and hyperparameters as the plain-PyTorch versions there, so
that the first hypergradients agree (checked by engine_overhead.py before timing):

* ``rhg-T`` with TorchOpt (``torchopt.MetaSGD`` on the module, graph kept through the unroll)
  and higher (``higher.innerloop_ctx`` with a differentiable SGD);
* ``hpo-cg`` with TorchOpt's implicit differentiation (``torchopt.diff.implicit.custom_root``
  around the 100 inner SGD steps, ``torchopt.linear_solve.solve_cg`` with exactly 10
  iterations).

Betty is not here: its reverse mode crashes and its CG is wrong (docs/hypergrad_accuracy.md), so
it has no version with identical gradients. The peers run from the environment that
``benchmarks/setup_peers.sh`` builds.

Example (needs torchopt)::

    unit = PEERS["rhg-10"]["torchopt"]()
    hypergradient = unit()
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["PEERS", "SMOKE_PEERS", "rhg_torchopt", "rhg_higher", "hpo_torchopt"]

Unit = Callable[[], torch.Tensor]


def _shared():
    import overhead_workloads as E  # (the benchmark's own data and model builders)

    return E


def rhg_torchopt(T: int, d: int = 784, hidden: int = 256) -> Unit:
    """TorchOpt: ``MetaSGD`` steps the module in place, keeping the graph."""
    import torchopt

    E = _shared()
    net = E._mlp(d, hidden)
    weights = torch.zeros(128, requires_grad=True)
    (xt, yt), (xv, yv) = E._data(128, d, 10, 1), E._data(128, d, 10, 2)
    opt = torchopt.MetaSGD(net, lr=0.1)

    def unit() -> torch.Tensor:
        for _ in range(T):
            losses = F.cross_entropy(net(xt), yt, reduction="none")
            opt.step((torch.sigmoid(weights) * losses).mean())
        val = F.cross_entropy(net(xv), yv)
        (hyper,) = torch.autograd.grad(val, weights)
        with torch.no_grad():
            weights.sub_(1.0 * hyper)
        torchopt.stop_gradient(net)
        torchopt.stop_gradient(opt)
        return hyper

    return unit


def rhg_higher(T: int, d: int = 784, hidden: int = 256) -> Unit:
    """higher: a functional copy of the module and a differentiable SGD per unit."""
    import higher

    E = _shared()
    net = E._mlp(d, hidden)
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    weights = torch.zeros(128, requires_grad=True)
    (xt, yt), (xv, yv) = E._data(128, d, 10, 1), E._data(128, d, 10, 2)

    def unit() -> torch.Tensor:
        with higher.innerloop_ctx(net, inner, copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(T):
                losses = F.cross_entropy(fnet(xt), yt, reduction="none")
                diffopt.step((torch.sigmoid(weights) * losses).mean())
            val = F.cross_entropy(fnet(xv), yv)
            (hyper,) = torch.autograd.grad(val, weights)
            with torch.no_grad():
                for p, q in zip(net.parameters(), fnet.parameters()):
                    p.copy_(q)
                weights.sub_(1.0 * hyper)
        return hyper

    return unit


def hpo_torchopt(inner: int = 100, d: int = 784) -> Unit:
    """TorchOpt: the inner solve wrapped in ``custom_root``, CG with exactly 10 iterations."""
    import torchopt

    E = _shared()
    xt, yt, xv, yv = E._hpo_data(d)
    log_decay = torch.full((d,), -3.0, requires_grad=True)
    state = {"w": torch.zeros(d)}

    def lower(w_, lam):
        logits = xt @ w_
        return F.binary_cross_entropy_with_logits(logits, yt) + 0.5 * (lam.exp() * w_ * w_).sum()

    def stationary(w_, lam):  # (TorchOpt differentiates it with torch.func)
        return torch.func.grad(lower, argnums=0)(w_, lam)

    solve = torchopt.linear_solve.solve_cg(maxiter=10, rtol=0.0, atol=0.0)

    @torchopt.diff.implicit.custom_root(stationary, argnums=1, solve=solve)
    def solve_inner(w0, lam):
        w = w0.detach().requires_grad_()
        with torch.enable_grad():
            for _ in range(inner):
                (g,) = torch.autograd.grad(lower(w, lam.detach()), w)
                w = (w - 0.5 * g).detach().requires_grad_()
        return w.detach()

    def unit() -> torch.Tensor:
        w = solve_inner(state["w"], log_decay)
        (hyper,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(xv @ w, yv), log_decay)
        with torch.no_grad():
            log_decay.sub_(0.1 * hyper)
        state["w"] = w.detach()
        return hyper

    return unit


PEERS: dict[str, dict[str, Callable[[], Unit]]] = {
    "rhg-10": {"torchopt": lambda: rhg_torchopt(10), "higher": lambda: rhg_higher(10)},
    "rhg-50": {"torchopt": lambda: rhg_torchopt(50), "higher": lambda: rhg_higher(50)},
    "hpo-cg": {"torchopt": hpo_torchopt},
}
SMOKE_PEERS: dict[str, dict[str, Callable[[], Unit]]] = {
    "rhg-2": {
        "torchopt": lambda: rhg_torchopt(2, d=20, hidden=8),
        "higher": lambda: rhg_higher(2, d=20, hidden=8),
    },
    "hpo-cg": {"torchopt": lambda: hpo_torchopt(5, d=20)},
}
