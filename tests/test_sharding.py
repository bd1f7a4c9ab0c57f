"""``strategy="zero"``: optimizer state sharded by ZeroRedundancyOptimizer, on 2 gloo ranks.

The worker (tests/zero_worker.py) runs each program under ``ddp`` and under ``zero`` in one
torchrun launch; ZeRO must give the same numbers (it moves state, not arithmetic), hold a strict
share of the state on each rank, resume from its checkpoints under either strategy, and keep
whole the optimizers whose state a method reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zero_worker as Z
from helpers import torchrun_ranks

from mlopt.errors import ConfigError

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun_ranks(HERE / "zero_worker.py", tmp_path_factory.mktemp("zero"))


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_zero_gives_the_ddp_numbers_on_every_rank(ranks):
    for r in ranks:
        # final parameters of both levels, then every gradient the upper's optimizer saw (its
        # hook was registered before the Engine replaced the optimizer: it moved)
        assert len(r["reweight_zero"]) == 4 + 4 * 2
        _same(r["reweight_zero"], r["reweight_ddp"])
        assert r["lr_zero"] == r["lr_ddp"] == 0.1 * 0.5**4  # the rebound StepLR stepped 4 times
    for a, b in zip(ranks[0]["reweight_zero"], ranks[1]["reweight_zero"]):
        assert torch.equal(a, b)


def test_each_rank_holds_a_strict_share_of_the_optimizer_state(ranks):
    for k in range(2):  # upper, lower
        whole = ranks[0]["numel_ddp"][k]
        shares = [r["numel_zero"][k] for r in ranks]
        assert ranks[1]["numel_ddp"][k] == whole > 0
        assert sum(shares) == whole and all(0 < s < whole for s in shares)
    for r in ranks:
        assert r["sharding_zero"] == {"upper": "zero", "lower": "zero"}
        assert r["sharding_ddp"] == {}
        assert r["type_zero"] == "ShardedOptimizer" and r["type_ddp"] == "Adam"


def test_zero_checkpoints_resume_under_zero_and_under_ddp(ranks):
    for r in ranks:
        for strategy in ("zero", "ddp"):
            for a, b in zip(r[f"ckpt_resumed_{strategy}"], r["ckpt_uninterrupted"]):
                assert torch.equal(a, b)


def test_a_differentiable_unroll_keeps_its_optimizer_whole(ranks):
    for r in ranks:
        _same(r["reverse_zero"], r["reverse_ddp"])
        decision = r["reverse_sharding_zero"]
        assert decision["upper"] == "zero"
        assert decision["lower"].startswith("whole: its updates are a differentiable unroll")


@pytest.mark.parametrize("method", Z.ZERO_METHODS)
def test_optimizer_stepped_lowers_shard_both_levels(ranks, method):
    for r in ranks:
        assert len(r[f"{method}_zero"]) == 2 + 4
        _same(r[f"{method}_zero"], r[f"{method}_ddp"])
        want = "whole: SAMA's correction" if method == "sama" else "zero"
        assert r[f"{method}_sharding_zero"]["upper"] == "zero"
        assert r[f"{method}_sharding_zero"]["lower"].startswith(want)


def test_maml_meta_optimizer_sharded_gives_the_ddp_meta_gradient(ranks):
    for r in ranks:
        assert len(r["maml_zero"]) == 1
        _same(r["maml_zero"], r["maml_ddp"])


def test_roll_back_snapshots_restore_the_sharded_state(ranks):
    for r in ranks:
        _same(r["rollback_zero"], r["rollback_ddp"])


def test_zero_without_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    engine_problems = Z.reweight_program  # builds the Engine: must fail before training
    with pytest.raises(ConfigError, match=r"strategy='zero'.*torchrun --nproc_per_node"):
        engine_problems("zero")


def test_zero_program_fails_whole_when_nothing_can_be_sharded():
    from mlopt.sharding import keep_whole_reason, shard_optimizers

    class Plan:  # what shard_optimizers reads of a ProblemPlan
        dopt, keeps_gradient = object(), False

    class State:
        def __init__(self) -> None:
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
            self.scheduler = None

    assert keep_whole_reason(Plan, State().optimizer).startswith("its updates are")
    with pytest.raises(ConfigError, match=r"strategy='zero'.*no problem's optimizer.*'ddp'"):
        shard_optimizers({"inner": Plan}, {"inner": State()}, {"inner": None})
