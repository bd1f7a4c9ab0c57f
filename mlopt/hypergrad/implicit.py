"""Implicit hypergradients: the implicit function theorem and the fixed-point (AID) formulation.

At a lower solution ``θ*(φ)`` with ``∇_θ f(θ*, φ) = 0`` and an invertible Hessian
``H = ∂²f/∂θ²``, the implicit function theorem gives ``dθ*/dφ = -H^{-1} ∂²f/∂θ∂φ``, so for a
cotangent ``v = ∂F/∂θ`` (the upper loss's gradient at ``θ*``)::

    v^T dθ*/dφ = -(∂²f/∂φ∂θ) H^{-1} v

(Pedregosa 2016, "Hyperparameter optimization with approximate gradient" (HOAG); Rajeswaran et al.
2019, "Meta-Learning with Implicit Gradients" (iMAML); Lorraine et al. 2020). :func:`implicit_vjp`
computes it with an injected linear solver for ``H w = v`` (``mlopt.linalg.cg``, ``neumann``...).

When the lower is solved by a contraction ``θ ← Φ(θ, φ)`` (gradient descent, or any other update
map), the solution is a fixed point and ``v^T dθ*/dφ = J_φ^T w`` with ``w = J_θ^T w + v``
(Grazzi et al. 2020, "On the Iteration Complexity of Hypergradient Computation");
:func:`fixed_point_vjp` iterates that equation. For ``Φ(θ) = θ - lr ∇_θ f`` both give the same
result.

Both functions treat ``params`` as the point where derivatives are taken: its own autograd
history is ignored (it is detached). With ``create_graph=True`` the result is differentiable
with respect to the uppers, the cotangent, and everything those depend on.

Example:
    >>> import functools, torch
    >>> from mlopt.linalg import cg
    >>> lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    >>> a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> # f(θ, λ) = ½ λ ||θ - a||²  →  θ* = a for every λ > 0, so dθ*/dλ = 0
    >>> def grad_fn(theta):
    ...     return (lam * (theta[0] - a),)
    >>> implicit_vjp(grad_fn, (a.clone(),), (lam,), (torch.ones(2, dtype=torch.float64),),
    ...              functools.partial(cg, iterations=5))
    (tensor(-0., dtype=torch.float64),)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlopt.autodiff import vjp
from mlopt.errors import HypergradientError
from mlopt.linalg import SolverInfo, fixed_point
from mlopt.linalg.vec import Vec, all_finite, as_vec, check_same_shapes, scale

__all__ = ["implicit_vjp", "fixed_point_vjp"]

Solve = Callable[[Callable[[Vec], Vec], Vec], Vec]


def _point(params: Vec) -> Vec:
    """Fresh leaves with the values of ``params``, where second derivatives are taken."""
    return tuple(p.detach().requires_grad_(True) for p in as_vec(params, "params"))


def _check_map_output(name: str, fn_name: str, params: Vec, out: object) -> Vec:
    if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)):
        raise HypergradientError(
            f"{name}: {fn_name} must return a tuple of tensors (one per parameter tensor), got "
            f"{type(out).__name__}"
        )
    out = as_vec(out, f"{fn_name}(params)")
    check_same_shapes(params, out, f"{name}: {fn_name}(params) vs params")
    if not any(t.requires_grad for t in out):
        raise HypergradientError(
            f"{name}: {fn_name}(params) carries no autograd graph; compute the lower gradient "
            "with torch.autograd.grad(..., create_graph=True) (or mlopt.autodiff.grad(..., "
            "create_graph=True)) so that its derivatives can be taken"
        )
    return out


def _finish(name: str, result: Vec) -> Vec:
    if not all_finite(result):
        raise HypergradientError(
            f"{name}: the hypergradient is not finite (NaN/Inf); the lower Hessian may be "
            "singular or the lower loss non-finite: add damping, or check the lower problem"
        )
    return result


def implicit_vjp(
    grad_fn: Callable[[Vec], Vec],
    params: Vec,
    uppers: Vec,
    cotangent: Vec,
    solve: Solve,
    *,
    create_graph: bool = False,
) -> Vec:
    """Implicit-function-theorem hypergradient ``-(∂²f/∂φ∂θ) H^{-1} v``.

    Args:
        grad_fn: ``grad_fn(θ) -> ∇_θ f(θ, φ)``, computed with ``create_graph=True``, with the
            upper tensors ``uppers`` captured in the closure.
        params: ``θ``, the lower's (approximate) solution; detached internally.
        uppers: ``φ``, the tensors to differentiate with respect to.
        cotangent: ``v = ∂F/∂θ``, one tensor per parameter tensor.
        solve: ``solve(matvec, b) -> x`` for ``H x = b`` (e.g.
            ``functools.partial(mlopt.linalg.cg, iterations=20)``).
        create_graph: keep the result differentiable (w.r.t. ``uppers``, ``cotangent`` and what
            they depend on); the solver's iterations are then differentiated through.

    Returns:
        One tensor per upper, zeros for uppers the lower loss does not use.

    Raises:
        HypergradientError: ``grad_fn`` returns no graph or wrong shapes, the solver diverges,
            or the result is not finite.

    Example:
        >>> import functools, torch
        >>> from mlopt.linalg import cg
        >>> phi = torch.tensor([1.0, -1.0], requires_grad=True)
        >>> # f = ½||θ||² - <φ, θ>: θ* = φ, so v^T dθ*/dφ = v
        >>> grad_fn = lambda th: (th[0] - phi,)
        >>> implicit_vjp(grad_fn, (phi.detach(),), (phi,), (torch.tensor([3.0, 4.0]),),
        ...              functools.partial(cg, iterations=3))
        (tensor([3., 4.]),)
    """
    uppers = as_vec(uppers, "uppers")
    cotangent = as_vec(cotangent, "cotangent")
    with torch.enable_grad():
        theta = _point(params)
        check_same_shapes(theta, cotangent, "implicit_vjp: cotangent vs params")
        if not create_graph:
            cotangent = tuple(c.detach() for c in cotangent)
        grads = _check_map_output("implicit_vjp", "grad_fn", theta, grad_fn(theta))

        def matvec(v: Vec) -> Vec:
            return vjp(grads, theta, v, create_graph=create_graph)

        w = solve(matvec, cotangent)
        if isinstance(w, tuple) and len(w) == 2 and isinstance(w[1], SolverInfo):
            w = w[0]
        w = as_vec(w, "solve(matvec, b)")
        check_same_shapes(theta, w, "implicit_vjp: solution vs params")
        result = vjp(grads, uppers, w, create_graph=create_graph)
    return _finish("implicit_vjp", scale(result, -1.0))


def fixed_point_vjp(
    step_fn: Callable[[Vec], Vec],
    params: Vec,
    uppers: Vec,
    cotangent: Vec,
    *,
    iterations: int = 10,
    tol: float = 1e-10,
    create_graph: bool = False,
) -> Vec:
    """Fixed-point hypergradient: ``J_φ^T w`` with ``w = J_θ^T w + v`` (Grazzi et al. 2020).

    ``J_θ = ∂Φ/∂θ`` and ``J_φ = ∂Φ/∂φ`` are the Jacobians of the inner update map at ``θ``.
    ``w`` is computed by :func:`mlopt.linalg.fixed_point` (``iterations`` transposed
    Jacobian-vector products). For ``Φ(θ) = θ - lr ∇_θ f``: ``J_θ^T = I - lr H`` and the
    result equals :func:`implicit_vjp`'s ``-(∂²f/∂φ∂θ) H^{-1} v``.

    Args:
        step_fn: ``step_fn(θ) -> Φ(θ, φ)``, the update map, with ``uppers`` captured.
        params: ``θ``, the (approximate) fixed point; detached internally.
        uppers: ``φ``.
        cotangent: ``v = ∂F/∂θ``.
        iterations: maximum fixed-point iterations.
        tol: relative tolerance of :func:`mlopt.linalg.fixed_point`.
        create_graph: keep the result differentiable (w.r.t. ``uppers``, ``cotangent``...).

    Returns:
        One tensor per upper, zeros for uppers the map does not use.

    Raises:
        HypergradientError: ``Φ`` is not a contraction (the iteration diverges), its output
            has no graph or wrong shapes, or the result is not finite.

    Example:
        >>> import torch
        >>> phi = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> step = lambda th: (th[0] - 0.5 * (th[0] - phi),)  # gradient descent on ½||θ-φ||²
        >>> fixed_point_vjp(step, (phi.detach(),), (phi,), (torch.ones(2, dtype=torch.float64),),
        ...                 iterations=60, tol=0.0)
        (tensor([1., 1.], dtype=torch.float64),)
    """
    uppers = as_vec(uppers, "uppers")
    cotangent = as_vec(cotangent, "cotangent")
    with torch.enable_grad():
        theta = _point(params)
        check_same_shapes(theta, cotangent, "fixed_point_vjp: cotangent vs params")
        if not create_graph:
            cotangent = tuple(c.detach() for c in cotangent)
        out = _check_map_output("fixed_point_vjp", "step_fn", theta, step_fn(theta))

        def matvec(v: Vec) -> Vec:
            return vjp(out, theta, v, create_graph=create_graph)

        w = fixed_point(matvec, cotangent, iterations=iterations, tol=tol)
        result = vjp(out, uppers, w, create_graph=create_graph)
    return _finish("fixed_point_vjp", result)
