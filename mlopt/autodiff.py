"""Gradients, Hessian-vector products and mixed second-derivative products on tuples of tensors.

Thin, careful wrappers around :func:`torch.autograd.grad`: ``None`` gradients (a tensor the loss
does not use) become zeros, tensors that do not require grad are handled, and graphs are retained
so that a Hessian-vector product can be evaluated many times (one per solver iteration).

Notation: ``f(θ, φ)`` a lower loss, ``g = ∇_θ f`` computed with ``create_graph=True``;
``hvp(g, θ, v) = (∂²f/∂θ²) v`` and ``mixed_vjp(g, φ, w) = (∂²f/∂φ∂θ) w = ∇_φ <∇_θ f, w>``.

Example:
    >>> import torch
    >>> theta = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> phi = torch.tensor(3.0, requires_grad=True)
    >>> (g,) = grad(phi * (theta**2).sum(), (theta,), create_graph=True)
    >>> hvp((g,), (theta,), (torch.tensor([1.0, 0.0]),))
    (tensor([6., 0.]),)
    >>> mixed_vjp((g,), (phi,), (torch.tensor([1.0, 1.0]),))
    (tensor(6.),)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mlopt.errors import HypergradientError
from mlopt.linalg.vec import Vec, as_vec, check_same_shapes, norm

__all__ = ["grad", "vjp", "hvp", "mixed_vjp", "finite_difference_mixed_vjp"]


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Vec) -> Vec:
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=False))


def grad(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    allow_unused: bool = True,
    retain_graph: bool | None = None,
) -> Vec:
    """Gradient of a scalar ``loss`` with respect to each tensor of ``params``.

    Args:
        loss: a scalar (one-element) tensor.
        params: the tensors to differentiate with respect to (leaves or not).
        create_graph: keep the gradient differentiable (needed for Hessian products).
        allow_unused: give zeros for tensors the loss does not depend on (and for tensors that
            do not require grad); when False such a tensor is an error.
        retain_graph: keep the loss's graph; defaults to ``create_graph``.

    Returns:
        One gradient per tensor of ``params``, zeros where the loss does not depend on it.

    Raises:
        HypergradientError: ``loss`` is not a scalar, or a tensor is unused and
            ``allow_unused=False``.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> y = torch.tensor(5.0, requires_grad=True)
        >>> grad((x**2).sum(), (x, y))
        (tensor([2., 4.]), tensor(0.))
    """
    params = as_vec(params, "params")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise HypergradientError(
            f"grad: the loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean())"
        )
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    out: list[torch.Tensor | None] = [None] * len(params)
    if wanted and loss.requires_grad:
        grads = torch.autograd.grad(
            loss.reshape(()),
            [params[i] for i in wanted],
            create_graph=create_graph,
            retain_graph=create_graph if retain_graph is None else retain_graph,
            allow_unused=True,
        )
        for i, g in zip(wanted, grads, strict=False):
            out[i] = g
    if not allow_unused and any(g is None for g in out):
        unused = [i for i, g in enumerate(out) if g is None]
        raise HypergradientError(
            f"grad: the loss does not depend on params {unused}; pass allow_unused=True to get "
            "zeros for those"
        )
    return _zeros_for_none(out, params)


def vjp(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
) -> Vec:
    """``sum_i <cotangents_i, ∂outputs_i/∂inputs>`` for each input, keeping the graph.

    Outputs that do not require grad (constants) contribute nothing; inputs the outputs do not
    depend on get zeros. The graph of ``outputs`` is always retained, so the product can be
    evaluated again with another cotangent.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> vjp((x**2,), (x,), (torch.ones(2),))
        (tensor([2., 4.]),)
    """
    outputs, inputs = as_vec(outputs, "outputs"), as_vec(inputs, "inputs")
    cotangents = as_vec(cotangents, "cotangents")
    check_same_shapes(outputs, cotangents, "vjp: cotangent vs output")
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=False) if o.requires_grad]
    wanted = [i for i, x in enumerate(inputs) if x.requires_grad]
    out: list[torch.Tensor | None] = [None] * len(inputs)
    if pairs and wanted:
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[i] for i in wanted],
            grad_outputs=[c for _, c in pairs],
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        for i, g in zip(wanted, grads, strict=False):
            out[i] = g
    return _zeros_for_none(out, inputs)


def hvp(grads: Vec, params: Vec, v: Vec, *, create_graph: bool = False) -> Vec:
    """Hessian-vector product ``(∂²f/∂θ²) v`` from ``grads = ∇_θ f`` (made with create_graph).

    Args:
        grads: ``∇_θ f`` computed with ``create_graph=True``.
        params: the tensors ``θ`` the gradient was taken with respect to.
        v: one tensor per parameter tensor.
        create_graph: make the product differentiable again (third-order derivatives).

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> g = grad((x**3).sum(), (x,), create_graph=True)
        >>> hvp(g, (x,), (torch.ones(2),))  # diag(6 x) @ 1
        (tensor([ 6., 12.]),)
    """
    v = as_vec(v, "v")
    check_same_shapes(as_vec(params, "params"), v, "hvp: v vs params")
    return vjp(grads, params, v, create_graph=create_graph)


def mixed_vjp(grads: Vec, uppers: Vec, w: Vec, *, create_graph: bool = False) -> Vec:
    """Mixed product ``(∂²f/∂φ∂θ) w = ∇_φ <∇_θ f, w>``, zeros for uppers ``f`` does not use.

    Args:
        grads: ``∇_θ f(θ, φ)`` computed with ``create_graph=True``.
        uppers: the tensors ``φ``.
        w: one tensor per gradient tensor.
        create_graph: make the product differentiable again.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> a = torch.tensor(2.0, requires_grad=True)
        >>> g = grad(a * (x**2).sum(), (x,), create_graph=True)  # g = 2 a x
        >>> mixed_vjp(g, (a,), (torch.ones(2),))  # d/da <2 a x, 1>
        (tensor(6.),)
    """
    return vjp(grads, uppers, w, create_graph=create_graph)


def finite_difference_mixed_vjp(
    loss_fn: Callable[[Vec], torch.Tensor],
    params: Vec,
    uppers: Vec,
    v: Vec,
    epsilon: float,
) -> Vec:
    """Central-difference estimate of ``(∂²f/∂φ∂θ) v`` using first derivatives only.

    ``(∇_φ f(θ + ε v, φ) - ∇_φ f(θ - ε v, φ)) / (2 ε)`` with ``ε = epsilon / ||v||``, so the
    perturbation has norm ``epsilon`` whatever the scale of ``v`` (Liu et al. 2019, DARTS, eq. 8).
    Exact (up to rounding) when ``∇_φ f`` is affine in ``θ``; the error is ``O(ε²)`` otherwise.
    A zero ``v`` gives zeros (no division by zero).

    Args:
        loss_fn: ``loss_fn(θ) -> scalar``: ``f(θ, φ)`` with the upper tensors ``φ`` captured.
        params: ``θ``, where the product is taken (not modified).
        uppers: ``φ``, the tensors to differentiate with respect to.
        v: the direction, one tensor per parameter tensor.
        epsilon: norm of the perturbation, > 0.

    Example:
        >>> a = torch.tensor(2.0, requires_grad=True)
        >>> fn = lambda th: a * (th[0] ** 2).sum()
        >>> finite_difference_mixed_vjp(fn, (torch.tensor([1.0, 2.0]),), (a,),
        ...                             (torch.ones(2),), 0.01)
        (tensor(6.0000),)
    """
    params, uppers, v = as_vec(params, "params"), as_vec(uppers, "uppers"), as_vec(v, "v")
    check_same_shapes(params, v, "finite_difference_mixed_vjp: v vs params")
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise HypergradientError(
            f"finite_difference_mixed_vjp: epsilon must be a number > 0, got {epsilon!r}"
        )
    with torch.no_grad():
        v = tuple(t.detach() for t in v)
        v_norm = float(norm(v))
    if v_norm == 0.0:
        return tuple(torch.zeros_like(u) for u in uppers)
    if v_norm != v_norm or v_norm == float("inf"):
        raise HypergradientError(
            "finite_difference_mixed_vjp: the direction v is not finite (NaN/Inf); check the "
            "upper loss's gradient"
        )
    eps = epsilon / v_norm
    with torch.no_grad():
        plus = tuple(p.detach() + eps * t for p, t in zip(params, v, strict=False))
        minus = tuple(p.detach() - eps * t for p, t in zip(params, v, strict=False))
    with torch.enable_grad():
        g_plus = grad(loss_fn(plus), uppers)
        g_minus = grad(loss_fn(minus), uppers)
    return tuple((a - b) / (2.0 * eps) for a, b in zip(g_plus, g_minus, strict=False))
