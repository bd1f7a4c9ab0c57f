"""Names from Betty (betty-ml 0.2.1) and what mlopt calls them: so that a ported program gets an
error naming the mlopt way instead of a bare ``TypeError`` or, worse, a different program.

The tables are data; :func:`unknown_field` and :func:`betty_hook_error` turn them into messages.

Example:
    >>> import mlopt
    >>> try:
    ...     mlopt.Config(cg_iterations=5)
    ... except mlopt.ConfigError as err:
    ...     print(str(err)[:72])
    Config: cg_iterations is Betty's option; mlopt: Config(type=CG(iteration
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from mlopt.errors import ConfigError

__all__ = [
    "BETTY_CONFIG",
    "BETTY_ENGINE_CONFIG",
    "BETTY_STRATEGIES",
    "BETTY_HOOKS",
    "unknown_field",
    "betty_hook_error",
]

_NOT_NEEDED = "not needed in mlopt (the library keeps what the hypergradient needs); remove it"

#: Betty's ``Config`` fields that mlopt's ``Config`` does not have, and the mlopt way.
BETTY_CONFIG: dict[str, str] = {
    "first_order": (
        "not needed on the upper: it always receives its direct gradient plus the hypergradient; "
        "for a first-order hypergradient set Config(type='first_order') on the lower"
    ),
    "retain_graph": _NOT_NEEDED,
    "allow_unused": _NOT_NEEDED,
    "fp16": "Config(precision='fp16')",
    "initial_dynamic_scale": (
        "not configurable: fp16 uses torch.amp.GradScaler with its defaults; remove it"
    ),
    "scale_factor": "not configurable: fp16 uses torch.amp.GradScaler with its defaults; remove it",
    "log_local_step": "Config(log_step=n) counts this problem's own steps; remove it",
    "darts_alpha": (
        "Config(type=FiniteDifference(epsilon=darts_alpha)) (mlopt.hypergrad; the same meaning: "
        "the perturbation is epsilon / ||v||)"
    ),
    "darts_multitask": "not supported; remove it",
    "darts_preconditioned": "not supported; remove it",
    "sama_adam_alpha": "Config(type=SAMA(radius=sama_adam_alpha)) (mlopt.hypergrad)",
    "sama_multitask": "not supported; remove it (SAMA's single synchronisation is the upper's)",
    "neumann_iterations": "Config(type=Neumann(iterations=K, alpha=a)) (mlopt.hypergrad)",
    "neumann_alpha": "Config(type=Neumann(iterations=K, alpha=a)) (mlopt.hypergrad)",
    "cg_iterations": (
        "Config(type=CG(iterations=K)) (mlopt.hypergrad; CG(tol=..., damping=...) also)"
    ),
    "cg_alpha": (
        "Config(type=CG(iterations=K)): mlopt's CG needs no step size (Betty's cg_alpha has no "
        "counterpart); remove it"
    ),
}

#: Betty's ``EngineConfig`` fields that mlopt's ``EngineConfig`` does not have.
BETTY_ENGINE_CONFIG: dict[str, str] = {
    "backend": (
        "chosen for you under EngineConfig(strategy='ddp'): nccl on CUDA, gloo on the CPU; "
        "remove it"
    ),
    "distributed": "EngineConfig(strategy='ddp') under torchrun",
    "distributed_backend": "chosen for you: nccl on CUDA, gloo on the CPU; remove it",
    "early_stopping_tolerance": "EngineConfig(early_stopping_patience=...)",
}

#: Betty's ``strategy`` values and mlopt's.
BETTY_STRATEGIES: dict[str, str] = {
    "distributed": "strategy='ddp' (torchrun)",
    "gpu": "strategy='cuda'",
    "fsdp": (
        "strategy='fsdp' (torch's fully_shard) for lowers with type 'first_order', "
        "'finite_difference' or 'sama'; reverse, MAML (initialize_from), forward, cg, neumann "
        "and fixed_point need functional parameter substitution or double backward through "
        "the sharded module, which fully_shard does not support, and are refused: use "
        "strategy='zero' (optimizer state sharded) or 'ddp' for them"
    ),
    "accelerate": "not supported; launch with torchrun and strategy='ddp'",
}

#: Betty's Problem hooks that mlopt does not call, and the mlopt way (the ``configure_*`` hooks
#: are honoured: see :class:`mlopt.Problem`).
BETTY_HOOKS: dict[str, str] = {
    "param_callback": (
        "mlopt has no per-update parameter hook; constrain parameters with a reparametrization "
        "(torch.nn.utils.parametrize.register_parametrization, e.g. a clamp or softplus), which "
        "keeps the hypergradient right"
    ),
    "grad_callback": (
        "mlopt does not call it; clip with Config(gradient_clipping=...), read gradients with "
        "mlopt.testing.capture_gradients(optimizer), or change them in a torch.optim subclass"
    ),
    "get_batch": (
        "mlopt does not call it; pass train_data_loader= (any re-iterable of batches: several "
        "loaders can be zipped in a class whose __iter__ restarts them) and training_step(batch) "
        "receives the batch"
    ),
}


def unknown_field(
    owner: str, key: str, fields: Iterable[str], betty: dict[str, str]
) -> ConfigError:
    """The error for ``owner(key=...)`` when ``key`` is not a field: Betty's name with the mlopt
    way, else the closest field names."""
    if key in betty:
        return ConfigError(f"{owner}: {key} is Betty's option; mlopt: {betty[key]}")
    close = difflib.get_close_matches(key, list(fields), n=3)
    hint = f"; did you mean {close}?" if close else f"; fields are {sorted(fields)}"
    return ConfigError(f"{owner} got an unknown option {key!r}{hint}")


def betty_hook_error(problem: str, hook: str) -> ConfigError:
    """The error for a Problem subclass that defines one of Betty's uncalled hooks."""
    return ConfigError(
        f"problem {problem!r} defines {hook}(), Betty's hook: {BETTY_HOOKS[hook]}. Remove it (or "
        "rename it if it is your own method)"
    )
