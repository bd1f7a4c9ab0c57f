"""Float64 programs whose outputs are frozen bit for bit (``tests/golden/runtime_ab.pt``).

Each program runs a small multilevel program through the public API and returns what it
produced: every module's final parameters and buffers, the gradients each upper optimizer saw
at each step, the step counts, the final losses and ``print(engine)``. The runtime may be
rebuilt freely as long as these outputs do not change by a single bit.

Freeze (only when a change of behaviour is intended, and say so in the commit)::

    python tests/ab_programs.py --freeze
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlopt
from mlopt.dynamics import BDA, BDAProblem
from mlopt.hypergrad import CG, FiniteDifference, Forward, Neumann, Reverse
from mlopt.testing import capture_gradients

F64 = torch.float64
GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
# outputs frozen by the old runtime (commit ad44e9b), one file per platform that rounds differently
GOLDEN = os.path.join(GOLDEN_DIR, "runtime_ab.pt")

__all__ = ["PROGRAMS", "run_program", "platform", "golden_path", "GOLDEN"]


# ---------------------------------------------------------------------- data and modules
def regression(seed: int, n: int = 24, d: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(d, 1, generator=g, dtype=F64)
    return TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64))


def loader(seed: int, batch: int = 6) -> DataLoader:
    return DataLoader(regression(seed), batch_size=batch, shuffle=True)


def mlp(dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(3, 5), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(5, 1)).double()


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([value], dtype=F64))


# ---------------------------------------------------------------------- problems
class Fit(mlopt.Problem):
    """Lower: training MSE plus exp(log-decay from the upper) times the squared weights."""

    def training_step(self, batch):
        x, y = batch
        loss = ((self.module(x) - y) ** 2).mean()
        if "hp" in self.engine.problems_by_name:
            decay = torch.exp(self.hp.module.weight).sum()
            loss = loss + 0.5 * decay * sum((p**2).sum() for p in self.parameters())
        return {"loss": loss, "fit": loss.detach()}


class Validate(mlopt.Problem):
    """Upper: validation MSE of the lower's current model (+ a small decay on its own params)."""

    def training_step(self, batch):
        x, y = batch
        loss = ((self.fit(x) - y) ** 2).mean()
        return loss + 1e-3 * sum((p**2).sum() for p in self.parameters())


class BDAFit(BDAProblem):
    def lower_loss(self, batch):
        x, y = batch
        decay = torch.exp(self.hp.module.weight).sum()
        return ((self.module(x) - y) ** 2).mean() + 0.5 * decay * sum(
            (p**2).sum() for p in self.parameters()
        )


class ChainLevel(mlopt.Problem):
    """Level i of a chain: pulled towards a map of the level above, read by the level above."""

    def __init__(self, *a, below: str | None, above: str | None, seed: int, **kw) -> None:
        super().__init__(*a, **kw)
        g = torch.Generator().manual_seed(seed)
        self.__dict__["M"] = torch.randn(3, 3, generator=g, dtype=F64) / 2
        self.__dict__["t"] = torch.randn(3, generator=g, dtype=F64)
        self.__dict__["below"], self.__dict__["above"] = below, above

    def training_step(self, batch):
        w = self.module.weight
        loss = 0.1 * (w**2).sum()
        if self.above is not None:
            up = getattr(self, self.above).module.weight
            loss = loss + 0.5 * ((w - torch.tanh(self.M @ up)) ** 2).sum()
        if self.below is not None:
            low = getattr(self, self.below).module.weight
            loss = loss + 0.5 * ((torch.sin(low) - self.t) ** 2).sum()
        return loss


class Vector(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, generator=g, dtype=F64))


# ---------------------------------------------------------------------- builders
def hpo(
    method,
    *,
    unroll=3,
    iters=9,
    inner="sgd",
    dropout=0.0,
    low_cfg=None,
    up_cfg=None,
    engine_kw=None,
    bda=None,
):
    """HPO of a log weight decay: fit (lower) <- hp (upper), validation loss on the hp level."""
    torch.manual_seed(1)
    net = mlp(dropout)
    opt = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05),
        "plain": lambda p: torch.optim.SGD(p, lr=0.2),
    }[inner](net.parameters())
    cfg = mlopt.Config(type=method, unroll_steps=unroll, **(low_cfg or {}))
    if bda is None:
        fit = Fit("fit", net, opt, loader(0), cfg)
    else:
        fit = BDAFit("fit", net, opt, loader(0), cfg, bda=bda)

    class HP(Validate):
        pass

    hp_mod = Scalar(-2.0)
    hp_opt = torch.optim.Adam(hp_mod.parameters(), lr=0.1)
    hp = HP("hp", hp_mod, hp_opt, loader(1), mlopt.Config(**(up_cfg or {})))
    grads = {"hp": capture_gradients(hp_opt)}
    engine = mlopt.Engine(
        [hp, fit],
        {"u2l": {hp: [fit]}, "l2u": {fit: [hp]}},
        mlopt.EngineConfig(train_iters=iters, seed=0, strategy="cpu", **(engine_kw or {})),
    )
    return engine, grads


def meta(method, *, unroll=3, iters=9, low_cfg=None):
    """Meta-initialization: fit starts each window from the meta problem's parameters."""
    torch.manual_seed(2)
    net, init = mlp(), mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg = mlopt.Config(type=method, unroll_steps=unroll, initialize_from="meta", **(low_cfg or {}))
    fit = Fit("fit", net, opt, loader(2), cfg)

    class Meta(Validate):
        pass

    meta_opt = torch.optim.Adam(init.parameters(), lr=0.05)
    up = Meta("meta", init, meta_opt, loader(3))
    grads = {"meta": capture_gradients(meta_opt)}
    engine = mlopt.Engine(
        [up, fit],
        {"u2l": {up: [fit]}, "l2u": {fit: [up]}},
        mlopt.EngineConfig(train_iters=iters, seed=0, strategy="cpu"),
    )
    return engine, grads


def chain(methods: list, unrolls: list[int], iters: int):
    """A chain of len(methods)+1 levels, l0 lowest; methods[i] is level i's Config.type."""
    levels = len(methods) + 1
    names = [f"l{i}" for i in range(levels)]
    probs, grads = [], {}
    for i, name in enumerate(names):
        mod = Vector(10 + i)
        opt = torch.optim.SGD(mod.parameters(), lr=0.2 if i == 0 else 0.1)
        if i > 0:
            grads[name] = capture_gradients(opt)
        cfg = mlopt.Config(type=methods[i], unroll_steps=unrolls[i]) if i < levels - 1 else None
        probs.append(
            ChainLevel(
                name,
                mod,
                opt,
                config=cfg,
                below=names[i - 1] if i else None,
                above=names[i + 1] if i < levels - 1 else None,
                seed=20 + i,
            )
        )
    deps = {
        "u2l": {names[i + 1]: [names[i]] for i in range(levels - 1)},
        "l2u": {names[i]: [names[i + 1]] for i in range(levels - 1)},
    }
    engine = mlopt.Engine(
        probs, deps, mlopt.EngineConfig(train_iters=iters, seed=0, strategy="cpu")
    )
    return engine, grads


def resumed():
    """Run 6 iterations, checkpoint, resume a fresh program from it and run to 12."""
    with tempfile.TemporaryDirectory() as folder:
        kw = {"checkpoint_dir": folder, "checkpoint_step": 3}
        first, _ = hpo("reverse", iters=6, engine_kw=kw)
        first.run()
        engine, grads = hpo("reverse", iters=12, engine_kw={**kw, "resume": True})
        engine.run()
    return engine, grads


PROGRAMS: dict[str, Callable[[], tuple]] = {
    "reverse_momentum": lambda: hpo("reverse"),
    "reverse_truncated_adam": lambda: hpo(Reverse(truncate=2), unroll=4, iters=8, inner="adam"),
    "reverse_checkpointed_dropout": lambda: hpo(
        Reverse(checkpoint=2), unroll=5, iters=10, dropout=0.2
    ),
    "forward_momentum": lambda: hpo(Forward()),
    "cg_clip_warmup": lambda: hpo(
        CG(iterations=5), unroll=4, iters=8, low_cfg={"gradient_clipping": 0.5, "warmup_steps": 3}
    ),
    "neumann_accumulate": lambda: hpo(
        Neumann(iterations=4, alpha=0.1), iters=12, up_cfg={"gradient_accumulation": 2}
    ),
    "darts_roll_back": lambda: hpo(
        FiniteDifference(), unroll=1, iters=6, inner="plain", engine_kw={"roll_back": True}
    ),
    "darts_roll_back_unroll2": lambda: hpo(
        FiniteDifference(), unroll=2, iters=6, inner="plain", engine_kw={"roll_back": True}
    ),
    "first_order_meta": lambda: meta("first_order"),
    "reptile": lambda: meta("reptile"),
    "maml_clipped": lambda: meta("reverse", low_cfg={"gradient_clipping": 0.3}),
    "bda_reverse": lambda: hpo("reverse", inner="plain", bda=BDA(upper="hp", alpha=0.5), iters=6),
    "three_levels": lambda: chain(["reverse", "reverse"], [2, 2], 8),
    "three_levels_cg_mid": lambda: chain(["reverse", CG(iterations=4)], [2, 3], 12),
    "four_levels": lambda: chain(["reverse", "first_order", Neumann(iterations=3)], [2, 2, 1], 8),
    "fp16_scaler_upper": lambda: hpo("cg", up_cfg={"precision": "fp16"}),
    "resume": resumed,
}


def run_program(name: str) -> dict:
    """Run program ``name`` and return its outputs (tensors and strings)."""
    torch.manual_seed(0)
    engine, grads = PROGRAMS[name]()
    text = str(engine)
    if engine.iteration == 0:  # (the resumed program has already run)
        engine.run()
    out: dict = {"describe": text, "steps": engine.step_counts}
    for pname, p in engine.problems_by_name.items():
        for key, value in p._module.state_dict().items():
            out[f"{pname}.{key}"] = value.detach().clone()
    for pname, seen in grads.items():
        for k, step in enumerate(seen):
            for j, g in enumerate(step):
                out[f"grad.{pname}.{k}.{j}"] = g
    for pname, loss in engine.last_losses.items():
        out[f"loss.{pname}"] = loss.detach().clone()
    return out


def _cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles (MKL then takes other, differently rounding, kernels)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_tile" in f.read()
    except OSError:
        return False


def _cpu_vendor() -> str:
    """The CPU's vendor id (MKL picks kernels by vendor and model, not by ISA alone: an Intel
    and an AMD CPU that both report AVX512 round some float64 products differently)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def platform() -> str:
    """The torch build, CPU vendor and kernels (vector ISA, AMX) that produced the outputs."""
    amx = " amx" if _cpu_has_amx() else ""
    cap = torch.backends.cpu.get_cpu_capability()
    vendor = "" if _cpu_vendor() == "AuthenticAMD" else f" {_cpu_vendor()}"
    return f"{torch.__version__} {cap}{amx}{vendor}"


def golden_path() -> str:
    """The frozen outputs for this platform, or the reference file if none was frozen here."""
    for name in sorted(os.listdir(GOLDEN_DIR)):
        if name.startswith("runtime_ab") and name.endswith(".pt"):
            path = os.path.join(GOLDEN_DIR, name)
            if torch.load(path, weights_only=True).get("__platform__") == platform():
                return path
    return GOLDEN


def run_all() -> dict:
    return {"__platform__": platform(), **{name: run_program(name) for name in PROGRAMS}}


def freeze_path() -> str:
    """Where ``--freeze`` writes: this platform's golden file, or a new one named after it."""
    path = golden_path()
    if (
        not os.path.exists(path)
        or torch.load(path, weights_only=True).get("__platform__") == platform()
    ):
        return path
    slug = "".join(c if c.isalnum() else "_" for c in platform())
    return os.path.join(GOLDEN_DIR, f"runtime_ab_{slug}.pt")


if __name__ == "__main__":
    if "--freeze" not in sys.argv:
        sys.exit("usage: python tests/ab_programs.py --freeze  (run it with the reference runtime)")
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    outputs, path = run_all(), freeze_path()
    torch.save(outputs, path)
    print(f"froze {len(outputs) - 1} programs for {platform()!r} into {path}")
