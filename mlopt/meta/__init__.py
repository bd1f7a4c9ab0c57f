"""Meta-learning: vectorized meta-batches, functional inner loops, MAML-family modules.

Every algorithm is also expressible with plain Problems and an Engine (see
``docs/meta_learning.md``); this package adds what they share:

- :func:`meta_gradients` / :func:`map_tasks`: per-task meta-gradients over a meta-batch, as one
  ``torch.func.vmap`` computation or a loop (``mode="vmap" | "loop" | "auto"``);
- :func:`adapt`, :func:`maml_task_loss`, :func:`reptile_task_gradient`, :func:`proximal_term`:
  functional inner loops (MAML, FOMAML, Meta-SGD, ANIL, Reptile, iMAML's regularizer);
- :class:`MetaSGD`, :class:`MTNet`, :class:`WarpNet`: meta-learned modules (learned rates,
  transforms and masks, warp layers) and :class:`WarpGrad`, the warp meta-objective
  (``Config(type="warpgrad")``);
- :mod:`mlopt.meta.omniglot`: the minimal-splits protocol and scoring with confidence intervals.

Example:
    >>> import torch
    >>> from mlopt.meta import meta_gradients, maml_task_loss
    >>> net = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(2, 6, 4), torch.randint(3, (2, 6))
    >>> out = meta_gradients(maml_task_loss(net, steps=1, lr=0.1), dict(net.named_parameters()),
    ...                      (x, y, x, y), has_aux=True)
    >>> sorted(out.gradients)
    ['bias', 'weight']
"""

from mlopt.meta.inner import (
    accuracy,
    adapt,
    maml_task_loss,
    proximal_term,
    reptile_task_gradient,
)
from mlopt.meta.methods import WarpGrad, reset_parameters
from mlopt.meta.modules import (
    MetaSGD,
    MTNet,
    WarpNet,
    binary_concrete,
    mtnet_forward,
    warp_forward,
)
from mlopt.meta.vectorize import (
    MODES,
    MetaGradients,
    choose_mode,
    map_tasks,
    meta_gradients,
    num_tasks,
)

__all__ = [
    "MODES",
    "MTNet",
    "MetaGradients",
    "MetaSGD",
    "WarpGrad",
    "WarpNet",
    "accuracy",
    "adapt",
    "binary_concrete",
    "choose_mode",
    "map_tasks",
    "maml_task_loss",
    "meta_gradients",
    "mtnet_forward",
    "num_tasks",
    "proximal_term",
    "reptile_task_gradient",
    "reset_parameters",
    "warp_forward",
]
