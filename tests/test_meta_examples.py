"""Every Omniglot meta-learning example runs end to end in --smoke mode on the real data."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from mlopt.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = [
    ("maml_omniglot", ["--path", "engine", "--extra-test-steps", "2"]),
    ("maml_omniglot", ["--path", "vmap", "--ways", "20"]),
    ("fomaml_omniglot", []),
    ("reptile_omniglot", []),
    ("reptile_omniglot", ["--protocol", "sgd"]),
    ("metasgd_omniglot", []),
    ("imaml_omniglot", []),
    ("anil_omniglot", []),
    ("mtnet_omniglot", []),
    ("warpgrad_omniglot", []),
    ("meta_feature_omniglot", []),
    ("meta_feature_omniglot", ["--method", "ridge_cg", "--jitter", "--test-augment", "2"]),
    ("meta_feature_omniglot", ["--method", "cg"]),
    ("meta_feature_omniglot", ["--method", "trhg"]),
    ("protonet_omniglot", ["--ways", "20"]),
    ("protomaml_omniglot", []),
    ("protomaml_omniglot", ["--ways", "20", "--jitter", "--test-augment", "2"]),
    ("protomaml_omniglot", ["--lr-halve-every", "1"]),
    ("protomaml_omniglot", ["--ways", "20", "--jitter", "--train-copies", "2"]),
]


@pytest.fixture(scope="module")
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    threads = torch.get_num_threads()
    yield
    sys.path.remove(str(EXAMPLES))
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("script", "extra"), CASES, ids=[" ".join([s, *e]) for s, e in CASES])
def test_example_smoke(script, extra, omniglot_root, examples_path, tmp_path):
    module = importlib.import_module(script)
    out = tmp_path / "result.json"
    result = module.main(["--smoke", "--data", str(omniglot_root), "--out", str(out), *extra])
    assert out.is_file()
    assert 0.0 <= result["accuracy"] <= 1.0 and result["tasks"] == 3
    assert math.isfinite(result["ci95"])
    if "--extra-test-steps" in extra:
        assert 0.0 <= result["test_steps_2"]["accuracy"] <= 1.0
    if "--ways" in extra and extra[extra.index("--ways") + 1] == "20":
        assert 0.0 <= result["lake_error_percent"] <= 100.0


@pytest.mark.parametrize(
    "script", ["protonet_omniglot", "maml_omniglot", "meta_feature_omniglot", "protomaml_omniglot"]
)
def test_all_characters_train_and_within_alphabet_tasks(script, omniglot_root, examples_path):
    module = importlib.import_module(script)
    args = ["--smoke", "--data", str(omniglot_root), "--ways", "20", "--held-out", "0"]
    result = module.main([*args, "--within-alphabet"])
    assert "accuracy" not in result and result["config"]["held_out"] == 0
    assert 0.0 <= result["lake_error_percent"] <= 100.0
    with pytest.raises(ConfigError, match="--held-out 0 leaves only Lake's 20-way"):
        module.main(["--smoke", "--data", str(omniglot_root), "--held-out", "0"])


def test_minimal_splits_union_and_character_hold_out(omniglot_root, examples_path):
    from mlopt.meta.omniglot import mean_confidence_interval, split_characters

    common = importlib.import_module("omniglot_common")
    ds, _ = common._load(str(omniglot_root))  # load_minimal_splits, cached for the examples
    assert ds.num_classes == 242 and len(ds) == 242 * 20  # Greek and Latin counted once
    assert len(set(ds.characters)) == 242
    train, test = split_characters(ds, 42, seed=0)
    assert train.num_classes == 200 and test.num_classes == 42
    assert not set(train.characters) & set(test.characters)  # whole characters held out
    assert not set(train.files) & set(test.files)
    mean, half = mean_confidence_interval([0.0, 1.0] * 300)
    assert mean == 0.5 and half == round(1.96 * (600 / 599 * 0.25) ** 0.5 / 600**0.5, 4)


@pytest.mark.parametrize("method", ["ridge", "ridge_cg"])
def test_ridge_head_meta_gradient_is_autograd_through_the_closed_form(method, examples_path):
    """The Engine's meta-feature gradient with a ridge head solved in the lower level (one
    Newton step, exact or CG implicit hypergradient) equals autograd through the closed-form
    ridge solution (R2-D2), float64."""
    import torch.nn.functional as F

    import mlopt
    from mlopt.hypergrad import CG

    mf = importlib.import_module("meta_feature_omniglot")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        ways, shots, queries = 3, 2, 2
        sx, qx = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
        sy, qy = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat(queries)
        embed = mf.Embedding(4, "running", 0.5)
        with torch.no_grad():
            embed.log_scale.fill_(0.3)
        start = {k: v.detach().clone() for k, v in embed.named_parameters()}

        # reference: autograd through W* = (XᵀX + λI)^{-1} Xᵀ Y
        fs, fq = embed(sx), embed(qx)
        w = mf.ridge_solution(fs, sy, embed.log_lam.exp(), ways)
        loss = F.cross_entropy(F.linear(fq, w) * embed.log_scale.exp(), qy)
        names = list(start)
        expected = torch.autograd.grad(loss, [dict(embed.named_parameters())[n] for n in names])

        head = torch.nn.Linear(embed.feature_dim, ways, bias=False)
        opt = mf.NewtonStep(head.parameters())
        hyper = mf.RidgeImplicit(opt) if method == "ridge" else CG(64, tol=1e-12)
        low = mf.RidgeHead(
            "head",
            head,
            opt,
            train_data_loader=[(sx, sy, qx, qy)] * 2,
            config=mlopt.Config(type=hyper, unroll_steps=1, resample="window"),
        )
        up = mf.Features("features", embed, torch.optim.SGD(embed.parameters(), lr=1.0))
        mlopt.Engine(
            [up, low],
            {"u2l": {up: [low]}, "l2u": {low: [up]}},
            mlopt.EngineConfig(train_iters=1),
        ).run()
        got = {k: start[k] - v.detach() for k, v in embed.named_parameters()}
        for n, e in zip(names, expected):
            assert torch.allclose(got[n], e, atol=1e-9, rtol=1e-7), n
    finally:
        torch.set_default_dtype(dtype)


@pytest.mark.parametrize("steps,copies", [(1, 0), (3, 0), (2, 2)])
def test_protomaml_meta_gradient_is_autograd_through_the_head_steps(steps, copies, examples_path):
    """Proto-MAML through the Engine (reverse mode through the head's SGD steps from the
    prototype start) equals hand-written autograd: features of support and query in one batch,
    prototypes, ``steps`` differentiable SGD steps of the learned size on ``ΔW, Δb`` from zero,
    query loss; float64. With ``copies``, the support holds that many jittered copies of each
    image (the same draws as the problem's generator) for the prototypes and the steps."""
    import torch.nn.functional as F

    import mlopt

    pm = importlib.import_module("protomaml_omniglot")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        ways, shots, queries, lr, decay = 3, 2, 2, 0.3, 0.05
        sx, qx = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
        sy, qy = torch.arange(ways).repeat_interleave(shots), torch.arange(ways).repeat(queries)
        net = pm.Embedding(4, lr)
        start = {k: v.detach().clone() for k, v in net.named_parameters()}
        names = list(start)
        common = importlib.import_module("omniglot_common")
        gen = torch.Generator().manual_seed(2)  # ProtoHead's generator: seed + 2, seed 0
        extra = [common.jitter(sx, generator=gen) for _ in range(copies)]
        task = (sx, sy, qx, qy)
        sx, sy = torch.cat([sx, *extra]), sy.repeat(copies + 1)

        # reference: the unrolled head steps written out with torch.autograd
        emb = net(torch.cat([sx, qx]))
        fs, fq = emb[: len(sx)], emb[len(sx) :]
        protos = pm.prototypes(fs, sy, ways)
        w, b = torch.zeros(ways, fs.shape[1], requires_grad=True), torch.zeros(ways)
        b.requires_grad_(True)
        for _ in range(steps):
            inner = F.cross_entropy(pm.proto_logits(fs, protos, w, b), sy)
            inner = inner + 0.5 * decay * w.pow(2).sum()
            gw, gb = torch.autograd.grad(inner, (w, b), create_graph=True)
            alpha = net.log_lr.exp()  # the meta-learned step size
            w, b = w - alpha * gw, b - alpha * gb
        outer = F.cross_entropy(pm.proto_logits(fq, protos, w, b), qy)
        params = dict(net.named_parameters())
        expected = torch.autograd.grad(outer, [params[n] for n in names])
        assert all(e.abs().sum() > 0 for e in expected)  # log_lr included

        head = torch.nn.Linear(net.feature_dim, ways)
        low = pm.ProtoHead(
            "head",
            head,
            torch.optim.SGD(head.parameters(), lr=1.0),
            train_data_loader=[task] * 2,
            config=mlopt.Config(unroll_steps=steps, resample="window"),
            decay=decay,
            copies=copies,
        )
        up = pm.Features("features", net, torch.optim.SGD(net.parameters(), lr=1.0))
        mlopt.Engine(
            [up, low],
            {"u2l": {up: [low]}, "l2u": {low: [up]}},
            mlopt.EngineConfig(train_iters=steps),
        ).run()
        got = {k: start[k] - v.detach() for k, v in net.named_parameters()}
        for n, e in zip(names, expected):
            assert torch.allclose(got[n], e, atol=1e-10, rtol=1e-8), n
    finally:
        torch.set_default_dtype(dtype)


def test_protomaml_ensemble_of_saved_models(omniglot_root, examples_path, tmp_path):
    """``--save`` then ``--ensemble``: a one-member ensemble reproduces that model's own scores
    exactly, a two-member ensemble scores each member alone as it scored itself, and members
    with another held-out split are refused before anything is evaluated."""
    pm = importlib.import_module("protomaml_omniglot")
    base = ["--smoke", "--data", str(omniglot_root), "--ways", "20"]
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    alone_a = pm.main([*base, "--save", str(a)])
    alone_b = pm.main([*base, "--save", str(b), "--outer-lr", "0.01"])
    one = pm.main([*base, "--ensemble", str(a)])
    keys = ("accuracy", "lake_error_percent", "test_steps_0", "test_augment_4")
    assert {k: one[k] for k in keys} == {k: alone_a[k] for k in keys}
    assert one["meta_updates"] == alone_a["meta_updates"] == 2
    both = pm.main([*base, "--ensemble", str(a), str(b)])
    assert both["meta_updates"] == 4 and len(both["members"]) == 2
    for member, alone in zip(both["members_alone"], (alone_a, alone_b)):
        assert member["accuracy"] == alone["accuracy"]
        assert member["lake_error_percent"] == alone["lake_error_percent"]
    with pytest.raises(ConfigError, match=r"--ensemble: .*a\.pt was trained with --held-out 42"):
        pm.main([*base, "--seed", "1", "--ensemble", str(a)])
