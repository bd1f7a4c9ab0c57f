"""N-way K-shot episodic task sampling over any labelled dataset.

A *task* (episode) draws ``ways`` classes, then ``shots`` support and ``queries`` query examples of
each class, without overlap, and relabels the classes ``0 .. ways-1`` in a random order (Vinyals
et al. 2016, "Matching Networks for One Shot Learning"; Finn et al. 2017, MAML). Task ``i`` of a
sampler is a pure function of ``(seed, i)``: it is the same whatever order tasks are asked in,
so samplers can be indexed, iterated, resumed or split across workers.

Example:
    >>> import torch
    >>> X, y = torch.randn(100, 1, 8, 8), torch.arange(100) % 10
    >>> sampler = EpisodicSampler((X, y), ways=5, shots=1, queries=3, seed=0)
    >>> task = sampler[0]
    >>> task.support_x.shape, task.query_y.shape
    (torch.Size([5, 1, 8, 8]), torch.Size([15]))
    >>> batch = meta_batch([sampler[0], sampler[1]])
    >>> batch.support_x.shape
    torch.Size([2, 5, 1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mlopt.errors import ConfigError

__all__ = ["Task", "TaskInfo", "EpisodicSampler", "TaskLoader", "meta_batch", "task_generator"]

Augment = Callable[[Tensor, torch.Generator], Tensor]


class Task(NamedTuple):
    """One episode (or a stack of episodes with a leading task dimension).

    Labels are relabelled ``0 .. ways-1``; support and query are ordered class by class.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class TaskInfo(NamedTuple):
    """Where task ``i`` came from: original classes, rotations (degrees) and example indices.

    ``classes[c]``/``rotations[c]`` is the original class and rotation of new label ``c``;
    ``support_indices``/``query_indices`` index the underlying dataset, in the order of the task.
    """

    classes: Tensor
    rotations: Tensor
    support_indices: Tensor
    query_indices: Tensor


def task_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, index, stream)`` alone (numpy ``SeedSequence``).

    ``stream`` separates independent random streams of the same task (sampling, augmentation).

    Example:
        >>> a = torch.randint(10, (3,), generator=task_generator(0, 5))
        >>> b = torch.randint(10, (3,), generator=task_generator(0, 5))
        >>> bool((a == b).all())
        True
    """
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(
        1, dtype=np.uint64
    )[0]
    gen = torch.Generator()
    gen.manual_seed(int(state) & ((1 << 63) - 1))
    return gen


def meta_batch(tasks: Sequence[Task]) -> Task:
    """Stack tasks of equal shapes into one :class:`Task` with a leading task dimension.

    Example:
        >>> t = Task(torch.zeros(5, 2), torch.zeros(5), torch.zeros(10, 2), torch.zeros(10))
        >>> meta_batch([t, t, t]).query_x.shape
        torch.Size([3, 10, 2])
    """
    tasks = list(tasks)
    if not tasks:
        raise ConfigError("meta_batch: got no tasks; pass a non-empty list of Task")
    fields = []
    for name in Task._fields:
        values = [getattr(t, name) for t in tasks]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ConfigError(
                f"meta_batch: field {name!r} has different shapes across tasks {sorted(shapes)}; "
                "stack tasks sampled with the same ways/shots/queries"
            )
        fields.append(torch.stack(values))
    return Task(*fields)


def _to_tensor(a: Any) -> Tensor:
    return a if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a))


def _resolve_source(data: Any) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Turn the accepted inputs into ``(fetch(indices) -> images, labels)``."""
    if hasattr(data, "labels") and callable(getattr(data, "get_batch", None)):
        return data.get_batch, _to_tensor(data.labels).long()
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(a, (Tensor, np.ndarray)) for a in data)
    ):
        x, y = _to_tensor(data[0]), _to_tensor(data[1])
        if y.dim() != 1 or len(x) != len(y):
            raise ConfigError(
                f"EpisodicSampler: (X, y) needs len(X) == len(y) and a 1-D y; got X "
                f"{tuple(x.shape)} and y {tuple(y.shape)}"
            )
        return (lambda idx: x[idx]), y.long()
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ConfigError(
            "EpisodicSampler: data must be (X, y) tensors, a sequence of (image, label) pairs, "
            f"or a dataset with `labels` and `get_batch(indices)`; got {type(data).__name__}"
        )
    labels = getattr(data, "targets", None)
    if labels is None:
        labels = [int(data[i][1]) for i in range(len(data))]
    labels_t = _to_tensor(labels).long()

    def fetch(idx: Tensor) -> Tensor:
        return torch.stack([_to_tensor(data[int(i)][0]) for i in idx])

    return fetch, labels_t


class EpisodicSampler:
    """N-way K-shot task sampler; indexable and iterable, deterministic per ``(seed, index)``.

    Args:
        data: ``(X, y)`` tensors/arrays, a sequence of ``(image, label)`` pairs (a ``targets``
            attribute is used when present), or an mlopt dataset (``labels`` + ``get_batch``).
        ways: classes per task (N).
        shots: support examples per class (K).
        queries: query examples per class.
        seed: base seed; task ``i`` uses a generator seeded from ``(seed, i)`` only.
        augment: ``None``; ``"rotate"`` for class-level rotation augmentation (each class
            rotated by 0, 90, 180 or 270 degrees is a distinct class, Santoro et al. 2016 and
            Finn et al. 2017 on Omniglot; needs square images; one drawing may then appear in a
            task under two rotations, as two classes); or a callable
            ``augment(images, generator) -> images`` applied to the support and query sets.
        num_tasks: if given, the sampler has this length and iteration stops there;
            otherwise iteration is infinite and ``len()`` is undefined.
        groups: ``None``, or ``groups[c]`` the group (any hashable, e.g. the alphabet of an
            Omniglot character) of class label ``c``. Each task then draws its N classes from
            one group, at one rotation: Lake et al.'s within-alphabet tasks. A group is chosen
            with probability proportional to its number of eligible classes; groups with
            fewer than N eligible classes are never chosen.

    Example:
        >>> X, y = torch.randn(40, 1, 4, 4), torch.arange(40) % 4
        >>> s = EpisodicSampler((X, y), 2, 1, 2, seed=3, augment="rotate", num_tasks=10)
        >>> len(s), s[7].support_y.tolist()
        (10, [0, 1])
    """

    def __init__(
        self,
        data: Any,
        ways: int,
        shots: int,
        queries: int,
        *,
        seed: int = 0,
        augment: str | Augment | None = None,
        num_tasks: int | None = None,
        groups: Sequence[Hashable] | Tensor | None = None,
    ) -> None:
        for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"EpisodicSampler: {name} must be an int >= {low}, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"EpisodicSampler: seed must be a non-negative int, got {seed!r}")
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise ConfigError(f"EpisodicSampler: num_tasks must be None or >= 1, got {num_tasks!r}")
        if augment is not None and augment != "rotate" and not callable(augment):
            raise ConfigError(
                f"EpisodicSampler: augment must be None, 'rotate' or a callable, got {augment!r}"
            )
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed, self.augment, self.num_tasks = seed, augment, num_tasks
        self._fetch, self.labels = _resolve_source(data)
        classes, counts = torch.unique(self.labels, return_counts=True)
        self._class_indices = {
            int(c): torch.nonzero(self.labels == c).flatten() for c in classes.tolist()
        }
        need = shots + queries
        self.classes = classes[counts >= need]
        self._rotations = (0, 90, 180, 270) if augment == "rotate" else (0,)
        available = len(self.classes) * len(self._rotations)
        if available < ways:
            raise ConfigError(
                f"EpisodicSampler: {ways}-way tasks with {shots} shots + {queries} queries need "
                f"{ways} classes with >= {need} examples each, but only {available} qualify; "
                "lower ways/shots/queries or use a larger dataset"
            )
        self._groups = None if groups is None else self._group_members(groups)

    def _group_members(self, groups: Sequence[Hashable] | Tensor) -> list[Tensor]:
        """Positions in ``self.classes`` of each group with at least ``ways`` classes."""
        groups = groups.tolist() if isinstance(groups, Tensor) else list(groups)
        top = int(self.labels.max()) if len(self.labels) else -1
        if len(groups) <= top or int(self.labels.min()) < 0:
            raise ConfigError(
                f"EpisodicSampler: groups needs one entry per class label 0..{top}, "
                f"got {len(groups)}"
            )
        members: dict[Hashable, list[int]] = {}
        for pos, c in enumerate(self.classes.tolist()):
            members.setdefault(groups[c], []).append(pos)
        eligible = [torch.tensor(m) for m in members.values() if len(m) >= self.ways]
        if not eligible:
            largest = max((len(m) for m in members.values()), default=0)
            raise ConfigError(
                f"EpisodicSampler: {self.ways}-way tasks within a group need a group of >= "
                f"{self.ways} classes with >= {self.shots + self.queries} examples each; the "
                f"largest has {largest}: lower ways or drop groups="
            )
        return eligible

    @property
    def num_classes(self) -> int:
        """Number of distinct classes tasks draw from (rotated copies counted separately)."""
        return len(self.classes) * len(self._rotations)

    def __len__(self) -> int:
        if self.num_tasks is None:
            raise TypeError("EpisodicSampler has no length: pass num_tasks=... to bound it")
        return self.num_tasks

    def _check_index(self, index: int) -> int:
        index = int(index)
        if self.num_tasks is not None:
            if index < 0:
                index += self.num_tasks
            if not 0 <= index < self.num_tasks:
                raise IndexError(f"task index {index} out of range for {self.num_tasks} tasks")
        elif index < 0:
            raise IndexError("negative task index on an unbounded sampler")
        return index

    def task_info(self, index: int) -> TaskInfo:
        """The classes, rotations and dataset indices task ``index`` is built from."""
        gen = task_generator(self.seed, self._check_index(index))
        n_rot = len(self._rotations)
        if self._groups is None:
            picks = torch.randperm(self.num_classes, generator=gen)[: self.ways]
            classes = self.classes[picks // n_rot]
            rotations = torch.tensor(self._rotations, dtype=torch.long)[picks % n_rot]
        else:
            sizes = torch.tensor([float(len(m)) for m in self._groups])
            members = self._groups[int(torch.multinomial(sizes, 1, generator=gen))]
            classes = self.classes[members[torch.randperm(len(members), generator=gen)]]
            classes = classes[: self.ways]
            turn = int(torch.randint(n_rot, (1,), generator=gen))
            rotations = torch.full((self.ways,), self._rotations[turn], dtype=torch.long)
        support, query = [], []
        for c in classes.tolist():
            pool = self._class_indices[c]
            chosen = pool[torch.randperm(len(pool), generator=gen)[: self.shots + self.queries]]
            support.append(chosen[: self.shots])
            query.append(chosen[self.shots :])
        return TaskInfo(classes, rotations, torch.cat(support), torch.cat(query))

    def _images(self, indices: Tensor, rotations: Tensor, per_class: int) -> Tensor:
        x = self._fetch(indices)
        if self.augment != "rotate":
            return x
        if x.shape[-1] != x.shape[-2]:
            raise ConfigError(
                f"EpisodicSampler: augment='rotate' needs square images, got {tuple(x.shape)}"
            )
        rot = rotations.repeat_interleave(per_class)
        out = x.clone()
        for degrees in (90, 180, 270):
            chosen = rot == degrees
            if bool(chosen.any()):
                out[chosen] = torch.rot90(x[chosen], degrees // 90, dims=(-2, -1))
        return out

    def __getitem__(self, index: int) -> Task:
        index = self._check_index(index)
        info = self.task_info(index)
        ways = torch.arange(self.ways)
        sx = self._images(info.support_indices, info.rotations, self.shots)
        qx = self._images(info.query_indices, info.rotations, self.queries)
        if callable(self.augment):
            gen = task_generator(self.seed, index, stream=1)
            sx, qx = self.augment(sx, gen), self.augment(qx, gen)
        return Task(
            sx, ways.repeat_interleave(self.shots), qx, ways.repeat_interleave(self.queries)
        )

    def __iter__(self) -> Iterator[Task]:
        index = 0
        while self.num_tasks is None or index < self.num_tasks:
            yield self[index]
            index += 1


class TaskLoader:
    """Meta-batches of ``meta_batch_size`` stacked tasks from an :class:`EpisodicSampler`.

    Batch ``b`` holds tasks ``start + b*B .. start + (b+1)*B - 1`` of the sampler, so it is
    deterministic and independent of iteration order.

    Args:
        sampler: the task sampler.
        meta_batch_size: tasks per batch (B).
        num_batches: length; ``None`` for an infinite loader (or the sampler's length // B
            when the sampler is bounded).
        start: index of the first task (e.g. to resume, or give workers disjoint streams).
        device: move every batch to this device.
        dtype: cast floating tensors to this dtype.

    Example:
        >>> X, y = torch.randn(60, 3), torch.arange(60) % 6
        >>> loader = TaskLoader(EpisodicSampler((X, y), 3, 2, 2, seed=0), 4, num_batches=2)
        >>> [tuple(b.support_x.shape) for b in loader]
        [(4, 6, 3), (4, 6, 3)]
    """

    def __init__(
        self,
        sampler: EpisodicSampler,
        meta_batch_size: int,
        *,
        num_batches: int | None = None,
        start: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
            raise ConfigError(f"TaskLoader: meta_batch_size must be >= 1, got {meta_batch_size!r}")
        if num_batches is None and sampler.num_tasks is not None:
            num_batches = (sampler.num_tasks - start) // meta_batch_size
        if num_batches is not None and num_batches < 1:
            raise ConfigError(f"TaskLoader: num_batches must be >= 1, got {num_batches!r}")
        if (
            num_batches is not None
            and sampler.num_tasks is not None
            and start + num_batches * meta_batch_size > sampler.num_tasks
        ):
            raise ConfigError(
                f"TaskLoader: {num_batches} batches of {meta_batch_size} from task {start} exceed "
                f"the sampler's {sampler.num_tasks} tasks; raise num_tasks or lower num_batches"
            )
        self.sampler, self.meta_batch_size = sampler, meta_batch_size
        self.num_batches, self.start = num_batches, start
        self.device, self.dtype = device, dtype

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("TaskLoader is infinite: pass num_batches=... to give it a length")
        return self.num_batches

    def _convert(self, t: Tensor) -> Tensor:
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else None
        return t.to(device=self.device, dtype=dtype)

    def __getitem__(self, batch: int) -> Task:
        if batch < 0 or (self.num_batches is not None and batch >= self.num_batches):
            raise IndexError(f"batch {batch} out of range")
        first = self.start + batch * self.meta_batch_size
        stacked = meta_batch([self.sampler[first + j] for j in range(self.meta_batch_size)])
        return Task(*(self._convert(t) for t in stacked))

    def __iter__(self) -> Iterator[Task]:
        batch = 0
        while self.num_batches is None or batch < self.num_batches:
            yield self[batch]
            batch += 1
