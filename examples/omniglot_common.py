"""What the Omniglot meta-learning examples share: options, data, a timed Engine, scoring.

Protocol (the "minimal" setting of Lake et al.'s Omniglot challenge): meta-train on the
characters of the two small background splits (242 distinct characters, rotated by 0/90/180/270
degrees as new classes), except ``--held-out`` characters kept whole for testing; report the
N-way K-shot accuracy on the held-out characters with a 95% confidence interval over
``--test-tasks`` tasks, and, for 20-way models, the error rate on Lake's 20 official one-shot runs
(evaluation alphabets, within-alphabet; people make 4.5% errors).

Not an example by itself: the ``*_omniglot.py`` scripts import it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import mlopt
from mlopt.data import EpisodicSampler, Task, load_one_shot_runs, one_shot_error, task_generator
from mlopt.meta import adapt
from mlopt.meta.omniglot import evaluate_tasks, load_minimal_splits, split_characters

__all__ = [
    "parser",
    "setup",
    "load_data",
    "task_stream",
    "support_copies",
    "alphabets",
    "TimedEngine",
    "train_bilevel",
    "maml_predictor",
    "evaluate",
    "finish",
    "jitter",
    "JitteredSampler",
]

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def parser(description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The common options; ``defaults`` overrides their default values."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=os.environ.get("MLOPT_OMNIGLOT_DIR", str(_DEFAULT_DATA)))
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5, help="query examples per class (train)")
    p.add_argument("--test-queries", type=int, default=5, help="query examples per class (test)")
    p.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-update")
    p.add_argument("--inner-steps", type=int, default=1, help="inner steps in meta-training")
    p.add_argument("--test-steps", type=int, default=3, help="inner steps at test time")
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=64, help="Conv4 filters")
    p.add_argument("--minutes", type=float, default=8.0, help="meta-training time budget")
    p.add_argument("--iterations", type=int, default=10**6, help="max meta-updates")
    p.add_argument(
        "--held-out",
        type=int,
        default=42,
        help="characters held out for testing; 0 trains on all 242 (then only Lake's runs test)",
    )
    p.add_argument(
        "--within-alphabet",
        action="store_true",
        help="meta-training tasks draw all classes from one alphabet, as Lake's runs do",
    )
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.add_argument("--smoke", action="store_true", help="seconds-long run for the tests")
    p.set_defaults(**defaults)
    return p


def setup(args: argparse.Namespace) -> None:
    """Threads, seeds, and the smoke-mode sizes."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.smoke:
        args.hidden, args.minutes, args.iterations = 8, 1.0, 2
        args.meta_batch, args.test_tasks, args.queries, args.test_queries = 2, 3, 2, 2
        args.inner_steps, args.test_steps = 1, 1


@functools.lru_cache(maxsize=2)
def _load(root: str) -> tuple:
    ds = load_minimal_splits(root)
    try:
        runs = load_one_shot_runs(root)
    except (FileNotFoundError, mlopt.MLOptError):
        runs = None
    return ds, runs


def load_data(args: argparse.Namespace) -> tuple:
    """``(train, test, runs)``: meta-training characters, held-out characters, Lake's runs.

    With ``--held-out 0`` every character trains and ``test`` is ``None``: only Lake's runs
    (20-way, evaluation alphabets) are left to test on.
    """
    ds, runs = _load(str(Path(args.data).expanduser()))
    if args.held_out == 0:
        if args.ways != 20 or args.shots != 1 or runs is None:
            raise mlopt.ConfigError(
                "--held-out 0 leaves only Lake's 20-way one-shot runs to test on: use "
                "--ways 20 --shots 1 with the runs under --data, or hold characters out"
            )
        return ds, None, runs
    train, test = split_characters(ds, args.held_out, seed=args.seed)
    return train, test, runs


def alphabets(data: Any) -> list[str]:
    """The alphabet of each class label: ``groups=`` for within-alphabet tasks."""
    return [alphabet for alphabet, _ in data.characters]


def task_stream(args: argparse.Namespace, train: Any, ways: int | None = None) -> EpisodicSampler:
    """Meta-training tasks of ``ways`` classes (default ``--ways``): rotated classes are new
    classes (Santoro et al. 2016); with ``--jitter`` (where a script has it) the images also get
    :func:`jitter` (:class:`JitteredSampler`)."""
    groups = alphabets(train) if args.within_alphabet else None
    sampler = JitteredSampler if getattr(args, "jitter", False) else EpisodicSampler
    return sampler(
        train,
        args.ways if ways is None else ways,
        args.shots,
        args.queries,
        seed=args.seed,
        augment="rotate",
        groups=groups,
    )


def support_copies(sx, sy, copies: int, generator: torch.Generator | None = None):
    """The support set with ``copies`` :func:`jitter`-ed copies of each image appended (labels
    repeated); unchanged when ``copies`` is 0."""
    if not copies:
        return sx, sy
    extra = [jitter(sx, generator=generator) for _ in range(copies)]
    return torch.cat([sx, *extra]), sy.repeat(copies + 1)


def jitter(
    images: torch.Tensor,
    degrees: float = 10.0,
    scale: float = 0.1,
    shift: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random small affine distortion of each image (rotation, scale, translation)."""
    n = len(images)

    def uniform() -> torch.Tensor:  # in [-1, 1)
        return torch.rand(n, generator=generator) * 2 - 1

    angle = uniform() * degrees * torch.pi / 180
    s = 1 + uniform() * scale
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [
            torch.stack([cos, -sin, uniform() * shift], 1),
            torch.stack([sin, cos, uniform() * shift], 1),
        ],
        1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


class JitteredSampler(EpisodicSampler):
    """An :class:`EpisodicSampler` (rotated classes) whose images also get :func:`jitter`,
    drawn from the task's own generator: task ``i`` is the same every time it is read (a
    bilevel method that re-evaluates the lower loss sees the same images)."""

    def __getitem__(self, index: int) -> Task:
        task = super().__getitem__(index)
        gen = task_generator(self.seed, int(index), stream=2)
        return Task(
            jitter(task[0], generator=gen), task[1], jitter(task[2], generator=gen), task[3]
        )


class TimedEngine(mlopt.Engine):
    """An Engine that also stops when a wall-clock budget is spent (checked every iteration)."""

    def __init__(self, *a: Any, minutes: float, **k: Any) -> None:
        super().__init__(*a, **k)
        self.deadline = time.perf_counter() + 60.0 * minutes

    def validation(self) -> dict:
        if time.perf_counter() > self.deadline:
            self.run_state.stopped = True  # what early stopping sets (Engine.stopped reads it)
        return {}


def timed_config(iterations: int) -> mlopt.EngineConfig:
    """EngineConfig for a TimedEngine: validation (the clock) every iteration."""
    return mlopt.EngineConfig(train_iters=iterations, valid_step=1, strategy="cpu")


def train_bilevel(args: argparse.Namespace, upper: mlopt.Problem, lower: mlopt.Problem) -> dict:
    """Meta-train ``upper`` over ``lower`` within ``--minutes`` / ``--iterations`` meta-updates
    (``--meta-batch`` tasks of ``--inner-steps`` lower updates each); returns
    ``{"meta_updates", "train_seconds"}``."""
    per_update = args.meta_batch * args.inner_steps
    engine = TimedEngine(
        [upper, lower],
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
        timed_config(args.iterations * per_update),
        minutes=args.minutes,
    )
    t0 = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - t0
    return {"meta_updates": engine.iteration // per_update, "train_seconds": round(seconds, 1)}


def maml_predictor(
    model: torch.nn.Module,
    steps: int,
    lr: Any,
    *,
    forward: Any = None,
    adapted: Any = None,
    params: dict | None = None,
) -> Any:
    """``predict(support_x, support_y, query_x)``: adapt from the meta-initialization, classify."""
    params = {k: v.detach() for k, v in (params or dict(model.named_parameters())).items()}
    run = forward or (lambda p, x: torch.func.functional_call(model, p, (x,)))

    def predict(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        loss = lambda p: torch.nn.functional.cross_entropy(run(p, sx), sy)  # noqa: E731
        fast = adapt(loss, params, steps, lr(sx) if callable(lr) else lr, adapted=adapted)
        with torch.no_grad():
            return run(fast, qx).argmax(-1)

    return predict


def evaluate(
    args: argparse.Namespace, predict: Any, test: Any, runs: Any, ways: int | None = None
) -> dict:
    """Held-out N-way accuracy (95% CI) and, for 20-way, the error on Lake's one-shot runs."""
    t0 = time.perf_counter()
    ways = args.ways if ways is None else ways
    out = {}
    if test is not None:
        sampler = EpisodicSampler(test, ways, args.shots, args.test_queries, seed=10_000)
        out = evaluate_tasks(predict, sampler, args.test_tasks)
    if ways == 20 and args.shots == 1 and runs is not None:
        runs = runs[:2] if args.smoke else runs
        lake = lambda tr, te: predict(tr, torch.arange(len(tr)), te)  # noqa: E731
        out["lake_error_percent"] = one_shot_error(lake, runs)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def finish(args: argparse.Namespace, name: str, results: dict) -> dict:
    """Print the results and the command, and write them to ``--out`` as JSON."""
    results = {
        "method": name,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "process_cpu_seconds": round(time.process_time(), 1),  # whole run, shared machine
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        **results,
    }
    parts = []
    if "accuracy" in results:
        parts.append(
            f"accuracy {results['accuracy']:.4f} ± {results['ci95']:.4f} over "
            f"{results['tasks']} held-out tasks"
        )
    if "lake_error_percent" in results:
        parts.append(f"Lake's 20 one-shot runs: {results['lake_error_percent']:.2f}% errors")
    msg = f"{name} {args.ways}-way {args.shots}-shot: " + "; ".join(parts)
    print(msg)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return results
