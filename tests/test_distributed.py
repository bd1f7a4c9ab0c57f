"""Data parallelism: two CPU ranks (gloo) under torchrun against single-process references.

The worker (tests/ddp_worker.py) runs with ``EngineConfig(strategy="ddp")`` and saves what each
rank saw; the references are the same programs run in this process on each rank's shard of the
data (batch ``k`` of a stream goes to rank ``k mod 2``).
"""

from __future__ import annotations

import os
from pathlib import Path

import ddp_worker as W
import pytest
import torch
from helpers import torchrun_ranks

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the worker on 2 ranks once; returns each rank's saved results."""
    out = tmp_path_factory.mktemp("ddp")
    results = torchrun_ranks(HERE / "ddp_worker.py", out)
    results[0]["ckpt_files"] = sorted(os.listdir(out / "ckpt"))
    return results


def _shard(data: list, rank: int) -> list:
    return data[rank::2]


def test_modules_start_identical(ranks):
    # each rank built its own modules (hpo_modules(rank)); the engine broadcasts rank 0's
    up0, low0 = W.hpo_modules(0)
    up1, _ = W.hpo_modules(1)
    assert not torch.equal(up0.weight, up1.weight)
    for key in ("reverse_init", "fo_init"):
        for r in ranks:
            assert torch.equal(r[key][0], up0.weight.detach())
            assert torch.equal(r[key][1], low0.weight.detach())


def _pair_means(data: list) -> list:
    """Batch k of one rank beside batch k of the other, averaged: both losses are linear in the
    data, so the rank-averaged gradients equal one process's gradients on these batches."""
    return [(a + b) / 2 for a, b in zip(data[0::2], data[1::2])]


def test_reverse_persistent_lower_hypergradient_equals_single_process(ranks):
    # the persistent lower is one model trained on both ranks' data: every unrolled update takes
    # the rank-averaged gradient through a differentiable all-reduce, so the upper's gradient is
    # the single-process one on the averaged data, on both ranks
    engine, _, low, up_grads, _ = W.build_program(
        "reverse",
        2,
        6,
        lower_data=_pair_means(W.LOWER_DATA),
        upper_data=_pair_means(W.UPPER_DATA),
        engine_kw={"strategy": "cpu"},
    )
    engine.run()
    for r in ranks:
        assert len(r["reverse_upper_grads"]) == len(up_grads) == 3
        for got, want in zip(r["reverse_upper_grads"], up_grads):
            torch.testing.assert_close(got, want[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["reverse_final_lower"], low.weight, rtol=1e-12, atol=1e-14)


def test_reverse_persistent_lower_identical_on_both_ranks(ranks):
    for k in range(3):
        assert torch.equal(ranks[0]["reverse_upper_grads"][k], ranks[1]["reverse_upper_grads"][k])
    assert torch.equal(ranks[0]["reverse_final_upper"], ranks[1]["reverse_final_upper"])
    assert torch.equal(ranks[0]["reverse_final_lower"], ranks[1]["reverse_final_lower"])
    # plain SGD(lr=0.2) on the averaged gradients from the broadcast start
    phi = W.hpo_modules(0)[0].weight.detach().clone()
    for g in ranks[0]["reverse_upper_grads"]:
        phi = phi - 0.2 * g
    torch.testing.assert_close(ranks[0]["reverse_final_upper"], phi, rtol=1e-12, atol=1e-14)


def test_checkpointed_reverse_replays_the_averaged_updates(ranks):
    # Reverse(checkpoint=1) recomputes each update in the backward pass, all-reduce included
    engine, up, low, up_grads, _ = W.build_program(
        "reverse",
        2,
        4,
        lower_data=_pair_means(W.LOWER_DATA),
        upper_data=_pair_means(W.UPPER_DATA),
        engine_kw={"strategy": "cpu"},
    )
    engine.run()
    for r in ranks:
        assert len(r["ckpt_reverse_upper_grads"]) == len(up_grads) == 2
        for got, want in zip(r["ckpt_reverse_upper_grads"], up_grads):
            torch.testing.assert_close(got, want[0], rtol=1e-12, atol=1e-14)
    for a, b in zip(ranks[0]["ckpt_reverse_final"], ranks[1]["ckpt_reverse_final"]):
        assert torch.equal(a, b)
    torch.testing.assert_close(ranks[0]["ckpt_reverse_final"][1], low.weight, rtol=1e-12, atol=0)


def test_maml_inner_loops_stay_local_to_each_rank(ranks):
    # a meta-initialized lower adapts to its own rank's task; the meta-gradient is the mean of
    # the two single-process meta-gradients on each rank's shard of the tasks
    refs = [
        W.maml_program(_shard(W.LOWER_DATA, r), _shard(W.UPPER_DATA, r), strategy="cpu")
        for r in (0, 1)
    ]
    assert not torch.allclose(refs[0][0], refs[1][0])
    for r in ranks:
        assert len(r["maml_meta_grads"]) == 2
        mean = (refs[0][0] + refs[1][0]) / 2  # (later steps start from the averaged update)
        torch.testing.assert_close(r["maml_meta_grads"][0], mean, rtol=1e-12, atol=1e-14)
    for a, b in zip(ranks[0]["maml_meta_grads"], ranks[1]["maml_meta_grads"]):
        assert torch.equal(a, b)


def test_task_parallel_meta_batch_equals_the_single_process_meta_gradient(ranks):
    # second-order MAML, a meta-batch of 4 tasks sharded 2 per rank (gradient_accumulation=2
    # on each rank): the one all-reduced meta-gradient equals one process's over the 4 tasks
    single = W.maml_program(accumulation=4, iters=8, strategy="cpu")
    assert len(single) == 1
    for r in ranks:
        assert len(r["maml_meta_batch"]) == 1
        torch.testing.assert_close(r["maml_meta_batch"][0], single[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(ranks[0]["maml_meta_batch"][0], ranks[1]["maml_meta_batch"][0])


def test_first_order_lower_gradient_averaged_and_ranks_identical(ranks):
    refs = []
    for r in (0, 1):
        engine, _, _, _, low_grads = W.build_program(
            "first_order",
            1,
            1,
            lower_data=_shard(W.LOWER_DATA, r),
            upper_data=_shard(W.UPPER_DATA, r),
            engine_kw={"strategy": "cpu"},
        )
        engine.run()
        refs.append(low_grads[0][0])
    mean = (refs[0] + refs[1]) / 2
    for r in ranks:
        assert len(r["fo_lower_grads"]) == 4
        torch.testing.assert_close(r["fo_lower_grads"][0], mean, rtol=1e-12, atol=1e-14)
    for a, b in zip(ranks[0]["fo_final"], ranks[1]["fo_final"]):
        assert torch.equal(a, b)
    for k in range(4):
        assert torch.equal(ranks[0]["fo_lower_grads"][k], ranks[1]["fo_lower_grads"][k])
        assert torch.equal(ranks[0]["fo_upper_grads"][k], ranks[1]["fo_upper_grads"][k])


def test_validation_metrics_averaged_over_ranks(ranks):
    expected = [{"iteration": i, "one": 1.0, "rank": 0.5} for i in (1, 2)]
    assert ranks[0]["history"] == expected
    assert ranks[1]["history"] == expected


def test_checkpoints_written_once_by_rank_zero(ranks):
    assert ranks[0]["ckpt_files"] == [
        "iter_00000002.pt",
        "iter_00000004.pt",
        "iter_00000006.pt",
        "last.pt",
    ]


def test_shuffled_loader_shards_partition_an_epoch(ranks):
    # 4 iterations x 2 ranks = 8 draws = one epoch of the 8 samples
    seen0, seen1 = ranks[0]["seen_shuffled"], ranks[1]["seen_shuffled"]
    assert len(seen0) == len(seen1) == 4
    assert sorted(seen0 + seen1) == list(range(8))


def test_roll_back_redo_is_averaged_and_ranks_stay_identical(ranks):
    a, b = ranks[0], ranks[1]
    assert len(a["darts_lower_grads"]) == 8  # 4 updates and 4 redone updates
    for ga, gb in zip(a["darts_lower_grads"], b["darts_lower_grads"]):
        assert torch.equal(ga, gb)  # every optimizer step saw the rank-averaged gradient
    for ta, tb in zip(a["darts_final"], b["darts_final"]):
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("method,adam", W.IMPLICIT)
def test_implicit_and_sama_hypergradients_equal_the_single_process(ranks, method, adam):
    # every loss is linear in the data and the Hessian and mixed term do not depend on it, so
    # the rank-averaged implicit hypergradient is the single-process one on the averaged data;
    # SAMA's Adam correction must come from the averaged gradient the optimizer applied (the
    # rank's own gradient would not match)
    engine, _, low, up_grads, _ = W.build_program(
        method,
        1,
        4,
        lower_data=_pair_means(W.LOWER_DATA),
        upper_data=_pair_means(W.UPPER_DATA),
        engine_kw={"strategy": "cpu"},
        lower_adam=adam,
    )
    engine.run()
    want = [g[0] for g in up_grads] + [low.weight.detach()]
    assert len(want) == 5
    for r in ranks:
        got = r[f"implicit_{method}"]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(ranks[0][f"implicit_{method}"], ranks[1][f"implicit_{method}"]):
        assert torch.equal(a, b)
