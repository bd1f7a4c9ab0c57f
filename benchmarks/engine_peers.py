"""The peers' versions of the Engine-overhead workloads (benchmarks/engine_overhead.py).

Same models, data, initial values and hyperparameters as the plain-PyTorch versions there, so
that the first hypergradients agree (checked by engine_overhead.py before timing):

* ``rhg-T`` and ``rhg-wd-T`` (one log weight decay instead of the per-example weights) with
  TorchOpt (``torchopt.MetaSGD`` on the module, graph kept through the unroll)
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


def rhg_torchopt(T: int, d: int = 784, hidden: int = 256, hyper: str = "weights") -> Unit:
    """TorchOpt: ``MetaSGD`` steps the module in place, keeping the graph."""
    import torchopt

    E = _shared()
    net, start, xt, yt, xv, yv = E._rhg_setup(d, hidden, hyper)
    value = start.clone().requires_grad_()
    opt = torchopt.MetaSGD(net, lr=0.1)

    def unit() -> torch.Tensor:
        for _ in range(T):
            losses = F.cross_entropy(net(xt), yt, reduction="none")
            opt.step(E.rhg_loss(hyper, losses, value, net.parameters()))
        val = F.cross_entropy(net(xv), yv)
        (hyper_grad,) = torch.autograd.grad(val, value)
        with torch.no_grad():
            value.sub_(1.0 * hyper_grad)
        torchopt.stop_gradient(net)
        torchopt.stop_gradient(opt)
        return hyper_grad.reshape(-1)

    return unit


def rhg_higher(T: int, d: int = 784, hidden: int = 256, hyper: str = "weights") -> Unit:
    """higher: a functional copy of the module and a differentiable SGD per unit."""
    import higher

    E = _shared()
    net, start, xt, yt, xv, yv = E._rhg_setup(d, hidden, hyper)
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    value = start.clone().requires_grad_()

    def unit() -> torch.Tensor:
        with higher.innerloop_ctx(net, inner, copy_initial_weights=True) as (fnet, diffopt):
            for _ in range(T):
                losses = F.cross_entropy(fnet(xt), yt, reduction="none")
                diffopt.step(E.rhg_loss(hyper, losses, value, fnet.parameters()))
            val = F.cross_entropy(fnet(xv), yv)
            (hyper_grad,) = torch.autograd.grad(val, value)
            with torch.no_grad():
                for p, q in zip(net.parameters(), fnet.parameters()):
                    p.copy_(q)
                value.sub_(1.0 * hyper_grad)
        return hyper_grad.reshape(-1)

    return unit


def _rhg_peers(T: int, hyper: str = "weights", **size: int) -> dict[str, Callable[[], Unit]]:
    return {
        "torchopt": lambda: rhg_torchopt(T, hyper=hyper, **size),
        "higher": lambda: rhg_higher(T, hyper=hyper, **size),
    }


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
    **{f"rhg-{T}": _rhg_peers(T) for T in (10, 50, 200)},
    **{f"rhg-wd-{T}": _rhg_peers(T, "decay") for T in (10, 50, 200)},
    "hpo-cg": {"torchopt": hpo_torchopt},
}
SMOKE_PEERS: dict[str, dict[str, Callable[[], Unit]]] = {
    "rhg-2": _rhg_peers(2, d=20, hidden=8),
    "rhg-wd-2": _rhg_peers(2, "decay", d=20, hidden=8),
    "hpo-cg": {"torchopt": lambda: hpo_torchopt(5, d=20)},
}
