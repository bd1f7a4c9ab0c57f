"""The application examples: their --smoke modes, and exact checks of the pieces they rely on."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mlopt
from mlopt.models.darts import (
    CIFAR_PRIMITIVES,
    OPS,
    SMALL_PRIMITIVES,
    Architecture,
    GenotypeNetwork,
    MixedOp,
    SearchNetwork,
    derive_genotype,
    random_genotype,
)
from mlopt.testing import capture_gradients

F64 = torch.float64
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    """Import ``examples/<name>.py`` as a module (examples are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def finite(*values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


# ---------------------------------------------------------------------- hyper-cleaning
def test_hyper_cleaning_smoke():
    hc = load("hyper_cleaning")
    out = hc.main(["--smoke", "--method", "all"])
    assert out["dataset"] == "digits"
    rows = {r["method"]: r for r in out["rows"]}
    assert set(hc.METHODS) <= set(rows)
    for method in hc.METHODS:
        r = rows[method]
        assert 0.0 <= r["f1"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
    # the validation loss does not depend on the weights directly: the first-order
    # hypergradient is exactly zero, so every logit stays 0 and all examples count as clean
    fo = rows["first_order"]
    assert fo["recall"] == 1.0


def _write_idx(path: Path, array) -> None:
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(header + array.tobytes())


def test_hyper_cleaning_reads_mnist_idx_files(tmp_path):
    """The MNIST path (784 features, 500/500/1000 in smoke mode) on files in the idx format."""
    hc = load("hyper_cleaning")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for stem, n in (("train", 1200), ("t10k", 1000)):
        _write_idx(
            raw / f"{stem}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g)
        )
        _write_idx(raw / f"{stem}-labels-idx1-ubyte", torch.arange(n) % 10)
    out = hc.main(["--smoke", "--data", "mnist", "--root", str(tmp_path), "--method", "trhg"])
    assert out["dataset"] == "MNIST"
    assert [r["method"] for r in out["rows"]] == ["no cleaning", "oracle (clean only)", "trhg"]


def test_f1_clean_matches_its_definition():
    hc = load("hyper_cleaning")
    logits = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0, 0.5])
    corrupted = torch.tensor([False, True, True, False, False, False])
    # predicted clean: 0, 2, 3, 5; truly clean: 0, 3, 4, 5 -> tp 3, precision 3/4, recall 3/4
    m = hc.f1_clean(logits, corrupted)
    assert m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == pytest.approx(0.75)


# ---------------------------------------------------------------------- DARTS
def test_darts_smoke():
    ds = load("darts_search")
    for order in ("1", "2"):
        out = ds.main(["--smoke", "--order", order])
        assert len(out["genotype"]["normal"]) == 2 * 3
        assert finite(out["test_acc"], out["supernet_val_acc"])
        assert out["search_updates"] == {"arch": 1, "network": 1}


def test_darts_mnist1d_is_optional(monkeypatch):
    ds = load("darts_search")
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(SystemExit, match="pip install mnist1d"):
        ds.main(["--smoke", "--data", "mnist1d"])


def test_darts_mnist1d_smoke():
    pytest.importorskip("mnist1d")
    ds = load("darts_search")
    out = ds.main(["--smoke", "--data", "mnist1d", "--order", "2"])
    assert finite(out["test_acc"], out["supernet_val_acc"])


def test_derive_genotype_picks_strongest_non_none_edges():
    prims = SMALL_PRIMITIVES  # none, max_pool_3x3, skip_connect, sep_conv_3x3, dil_conv_3x3
    normal = torch.zeros(5, len(prims))  # steps=2: node 0 has edges 0-1, node 1 edges 2-4
    normal[0, 0] = 10.0  # 'none' dominates edge 0 but is excluded; its best other op is tied
    normal[0, 3] = 1.0
    normal[1, 4] = 3.0
    normal[2, 2] = 0.5
    normal[3, 1] = 4.0
    normal[4, 3] = 2.0
    reduce = torch.zeros(5, len(prims))
    reduce[0, 2], reduce[1, 1], reduce[2, 4], reduce[3, 3], reduce[4, 2] = 1, 2, 3, 2, 1
    geno = derive_genotype(normal, reduce, 2, prims)
    # node 0: edge 1 (dil 3.0 -> strongest), edge 0 (sep; weight is small after the 'none'
    # softmax but it is the only other edge)
    assert geno.normal[:2] == [("sep_conv_3x3", 0), ("dil_conv_3x3", 1)]
    assert geno.normal[2:] == [("max_pool_3x3", 1), ("sep_conv_3x3", 2)]
    assert geno.reduce == [
        ("skip_connect", 0),
        ("max_pool_3x3", 1),
        ("dil_conv_3x3", 0),
        ("sep_conv_3x3", 1),
    ]
    assert geno.normal_concat == [2, 3]


def test_mixed_op_with_one_hot_weights_is_that_op():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    mixed = MixedOp(4, 1, CIFAR_PRIMITIVES).double().eval()
    for i in range(len(CIFAR_PRIMITIVES)):
        w = torch.zeros(len(CIFAR_PRIMITIVES), dtype=F64)
        w[i] = 1.0
        torch.testing.assert_close(mixed(x, w), mixed.ops[i](x), rtol=0, atol=1e-12)
    assert set(CIFAR_PRIMITIVES) <= set(OPS)


def test_cifar_space_shapes():
    net = SearchNetwork(4, 10, layers=3, in_channels=3)  # 8 ops, 4 nodes: the CIFAR cells
    assert net.num_edges == 14
    arch = Architecture(net.num_edges, len(CIFAR_PRIMITIVES))
    x = torch.randn(2, 3, 16, 16)
    assert net(x, arch.normal, arch.reduce).shape == (2, 10)
    geno = random_genotype(4, CIFAR_PRIMITIVES, seed=1)
    assert GenotypeNetwork(geno, 4, 10, layers=3)(x).shape == (2, 10)
    with pytest.raises(mlopt.ConfigError, match="unknown or too few primitives"):
        SearchNetwork(4, 10, 3, primitives=("none", "conv_7x7"))


# ---------------------------------------------------------------------- Meta-Weight-Net
def test_meta_weight_net_smoke():
    mwn = load("meta_weight_net")
    out = mwn.main(["--smoke"])
    row = out["rows"][0]
    assert finite(row["plain"], row["class_balanced"], row["meta_weight_net"])
    counts = row["train_counts"]
    assert counts[0] == 100 and counts[-1] == 2  # imbalance factor 50
    assert row["noise_fraction"] == 0.0 and row["classifier_updates"] == 5


@pytest.mark.parametrize("noise", ["uniform", "flip"])
def test_meta_weight_net_noisy_smoke(noise):
    mwn = load("meta_weight_net")
    out = mwn.main(["--smoke", "--imbalance", "1", "--noise", noise, "--noise-rate", "0.4"])
    row = out["rows"][0]
    assert finite(row["plain"], row["plain_with_meta"], row["meta_weight_net"])
    assert row["noise_fraction"] == pytest.approx(0.4)
    assert row["classifier_updates"] == row["weighting_updates"] == 5


def test_meta_weight_net_noise_is_as_specified():
    mwn = load("meta_weight_net")
    y = torch.arange(10).repeat_interleave(100)  # 100 examples of each class
    for seed in (0, 1):
        noisy = mwn.corrupt_labels(y, "uniform", 0.4, seed)
        assert int((noisy != y).sum()) == 400  # exactly the rate, always to another class
        assert torch.equal(noisy, mwn.corrupt_labels(y, "uniform", 0.4, seed))  # seeded
        assert len(noisy[noisy != y].unique()) == 10  # targets spread over the classes
        flipped = mwn.corrupt_labels(y, "flip", 0.2, seed)
        for c in range(10):
            wrong = flipped[(y == c) & (flipped != y)]
            assert len(wrong) == 20 and len(wrong.unique()) == 1 and int(wrong[0]) != c
    assert not torch.equal(mwn.corrupt_labels(y, "uniform", 0.4, 0), noisy)  # seed matters
    assert torch.equal(mwn.corrupt_labels(y, "none", 0.4, 0), y)
    # Only the training labels are corrupted: features, meta and test sets are the clean ones.
    args = argparse.Namespace(imbalance=1.0, meta_per_class=5, noise="uniform", noise_rate=0.6)
    train, meta, test, clean_y = mwn.make_data(3, args)
    ref_train, ref_meta, ref_test = mwn.imbalanced_digits(3, 1.0, meta_per_class=5)
    assert torch.equal(train[0], ref_train[0]) and torch.equal(clean_y, ref_train[1])
    assert float((train[1] != clean_y).float().mean()) == pytest.approx(0.6)
    for got, ref in ((meta, ref_meta), (test, ref_test)):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert len(train[1]) == 1000 and torch.bincount(meta[1]).tolist() == [5] * 10


# ---------------------------------------------------------------------- HPO
def test_hpo_weight_decay_smoke():
    wd = load("hpo_weight_decay")
    out = wd.main(["--smoke"])
    row = out["rows"][0]
    assert row["grid_cost"] <= row["hyper_cost"] < row["grid_cost"] + row["hyper_cost"]
    assert finite(row["hyper_val"], row["grid_val"])


def test_hpo_lr_schedule_smoke():
    lr = load("hpo_lr_schedule")
    out = lr.main(["--smoke"])
    row = out["rows"][0]
    assert len(row["learned_rates"]) == 4
    assert finite(row["hyper_val_loss"], row["grid_val_loss"])


def test_learned_schedule_hypergradient_matches_autograd_through_the_unroll():
    """The example's wiring (learning_rates + window_step + frozen initialize_from) gives the
    exact gradient of the validation loss after T steps with per-step rates exp(s_t)."""
    lr = load("hpo_lr_schedule")
    torch.manual_seed(0)
    T = 3
    init = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    xv, yv = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    schedule = lr.Schedule(init, T, 0.3).double()
    with torch.no_grad():
        schedule.log_lrs.copy_(torch.tensor([-1.0, -0.5, -2.0], dtype=F64))
    net = lr.copy.deepcopy(init)
    learner = lr.Learner(
        "learner",
        net,
        torch.optim.SGD(net.parameters(), lr=0.3),
        [(x, y)],
        mlopt.Config(type="reverse", unroll_steps=T, initialize_from="schedule.init"),
    )
    opt = torch.optim.SGD(
        [
            {"params": [schedule.log_lrs], "lr": 0.0},
            {"params": list(schedule.init.parameters()), "lr": 0.0},
        ]
    )
    upper = lr.ScheduleProblem("schedule", schedule, opt, [(xv, yv)])
    seen = capture_gradients(opt)
    mlopt.Engine(
        [upper, learner],
        {"u2l": {upper: [learner]}, "l2u": {learner: [upper]}},
        mlopt.EngineConfig(train_iters=T),
    ).run()
    # reference: autograd through a hand-written unroll
    s = schedule.log_lrs.detach().clone().requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in init.named_parameters()}
    w = dict(params)
    for t in range(T):
        loss = nn.functional.cross_entropy(torch.func.functional_call(init, w, (x,)), y)
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {n: p - s[t].exp() * g for (n, p), g in zip(w.items(), grads)}
    val = nn.functional.cross_entropy(torch.func.functional_call(init, w, (xv,)), yv)
    g_s, *g_init = torch.autograd.grad(val, [s, *params.values()])
    torch.testing.assert_close(seen[0][0], g_s, rtol=0, atol=1e-12)
    for got, ref in zip(seen[0][1:], g_init):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
