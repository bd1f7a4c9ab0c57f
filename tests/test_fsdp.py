"""``strategy="fsdp"``: modules sharded by torch's ``fully_shard`` (FSDP2), on 2 gloo ranks.

The worker (tests/fsdp_worker.py) runs data reweighting with an MLP lower under ``fsdp``, under
``ddp`` and as one process on all ranks' data. FSDP's gradients are rank averages, so every
method equals the single process on all ranks' data; ``first_order`` (whose ``ddp`` numbers are
those too) equals ``ddp`` bit for bit. Methods that need functional substitution or double
backward through a sharded module are refused before training, naming the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path

import fsdp_worker as F
import pytest
import torch
from helpers import torchrun_ranks

import mlopt
from mlopt.errors import ConfigError
from mlopt.fsdp import keep_whole_reason, refusal, shard_modules
from mlopt.hypergrad import CG, FirstOrder, Reverse

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun_ranks(HERE / "fsdp_worker.py", tmp_path_factory.mktemp("fsdp"), 300)


def _same(a: list, b: list, rtol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("method", list(F.METHODS))
def test_fsdp_equals_one_process_on_all_ranks_data(ranks, method):
    for r in ranks:
        # both levels' final parameters, then each gradient the upper's optimizer applied
        assert len(r[f"{method}_fsdp"]) == 2 + 4 + 4 * 2
        _same(r[f"{method}_fsdp"], r[f"{method}_cpu"])
    for a, b in zip(ranks[0][f"{method}_fsdp"], ranks[1][f"{method}_fsdp"]):
        assert torch.equal(a, b)


def test_first_order_under_fsdp_is_ddp_bit_for_bit(ranks):
    for r in ranks:
        for a, b in zip(r["first_order_fsdp"], r["first_order_ddp"]):
            assert torch.equal(a, b)
        assert r["first_order_sharding_fsdp"] == {"upper": "fsdp", "lower": "fsdp"}
        assert r["first_order_lr_fsdp"] == r["first_order_lr_ddp"] == 0.1 * 0.5**4


def test_darts_and_sama_shard_the_lower_and_keep_the_upper_whole(ranks):
    for method in ("finite_difference", "darts_roll_back", "sama"):
        for r in ranks:
            decision = r[f"{method}_sharding_fsdp"]
            assert decision["lower"] == "fsdp"
            assert decision["upper"].startswith("whole: its parameters are differentiated at")
            # under ddp each rank perturbs along its own v: another estimate, not one process's
            ddp, one = r[f"{method}_ddp"], r[f"{method}_cpu"]
            assert any(not torch.allclose(a, b, rtol=1e-6) for a, b in zip(ddp, one))


def test_each_rank_holds_a_strict_share_of_the_lower(ranks):
    for method in F.METHODS:
        whole = ranks[0][f"{method}_numel_ddp"]
        shares = [r[f"{method}_numel_fsdp"] for r in ranks]
        for k in range(2):  # parameters, optimizer state
            assert sum(s[k] for s in shares) == whole[k] > 0
            assert all(0 < s[k] < whole[k] for s in shares)


def test_fsdp_checkpoints_are_whole_and_resume_under_fsdp_and_ddp(ranks):
    for r in ranks:
        assert r["ckpt_lower_module"] == {
            "0.weight": (6, 4), "0.bias": (6,), "2.weight": (1, 6), "2.bias": (1,)
        }  # fmt: skip
        for strategy in ("fsdp", "ddp"):
            for a, b in zip(r[f"ckpt_resumed_{strategy}"], r["ckpt_uninterrupted"]):
                assert torch.equal(a, b)


@pytest.mark.parametrize(
    "case, names",
    [
        ("reverse", ["problem 'lower'", "Reverse(", "differentiable unroll"]),
        ("cg", ["problem 'lower'", "CG(", "Hessian-vector products"]),
        ("neumann", ["problem 'lower'", "Neumann(", "Hessian-vector products"]),
        ("forward", ["problem 'lower'", "Forward(", "forward mode"]),
        ("maml", ["problem 'task'", "initialize_from='meta'", "functional_call"]),
    ],
)
def test_methods_fsdp_cannot_run_are_refused_before_training(ranks, case, names):
    for r in ranks:
        message = r[f"refused_{case}"]
        for part in [*names, "strategy='fsdp'", "strategy='zero'", "'ddp'"]:
            assert part in message, message


class _Plan:
    """What mlopt.fsdp reads of a ProblemPlan."""

    def __init__(self, method, uppers=(), init=None, dopt=None, tracks=False) -> None:
        self.method, self.uppers, self.init, self.dopt, self.tracks = (
            method,
            uppers,
            init,
            dopt,
            tracks,
        )


def test_refusals_and_whole_modules_are_decided_from_the_plan():
    assert refusal("low", _Plan(FirstOrder(), ("up",))) is None
    assert refusal("up", _Plan(Reverse())) is None  # (no uppers: its method is not used)
    cg = refusal("low", _Plan(CG(), ("up",)))
    assert cg.startswith("problem 'low': Config(type=CG(") and "strategy='zero'" in cg
    unroll = refusal("low", _Plan(Reverse(), ("up",), dopt=object()))
    assert "a differentiable unroll" in unroll
    plans = {"low": _Plan(mlopt.hypergrad.FiniteDifference(), ("up",)), "up": _Plan(Reverse())}
    assert keep_whole_reason("up", plans).startswith("its parameters are differentiated at 'low'")
    assert keep_whole_reason("low", plans) is None
    assert keep_whole_reason("up", {"low": _Plan(FirstOrder(), ("up",))}) is None


def test_fsdp_fails_whole_when_nothing_can_be_sharded():
    class State:
        module, names = torch.nn.Linear(1, 1), ["weight"]
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)

    plans = {"low": _Plan(mlopt.hypergrad.SAMA(), ("up",)), "up": _Plan(Reverse())}
    states = {"up": State(), "low": type("Bare", (), {"optimizer": None})()}
    with pytest.raises(ConfigError, match=r"strategy='fsdp'\): no problem's module can be shard"):
        shard_modules(plans, states, {}, torch.device("cpu"))


def test_fsdp_without_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match=r"strategy='fsdp'.*torchrun --nproc_per_node"):
        F.program("fsdp")
