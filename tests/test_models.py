"""Tests of mlopt.models: shapes, closed forms, and agreement under torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from mlopt.errors import ConfigError
from mlopt.models import MLP, Conv4, PerStepBatchNorm2d, ResNet12


def _perturbed(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for name, p in module.named_parameters()
    }


def _load(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    other = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(params[name])
    return other


# ---------------------------------------------------------------- Conv4


@pytest.mark.parametrize(
    ("in_channels", "size", "feature_dim"), [(1, 28, 64), (3, 84, 64 * 25), (3, 32, 64 * 4)]
)
def test_conv4_shapes(in_channels, size, feature_dim):
    torch.manual_seed(0)
    net = Conv4(in_channels, 5, image_size=size)
    x = torch.randn(4, in_channels, size, size)
    assert net.feature_dim == feature_dim
    assert net.features(x).shape == (4, feature_dim) and net(x).shape == (4, 5)
    assert isinstance(net.head, torch.nn.Linear) and net.head.in_features == feature_dim
    assert Conv4(in_channels, None, image_size=size)(x).shape == (4, feature_dim)
    assert Conv4(in_channels, 7, hidden=32, image_size=size).features(x).shape[1] == (
        feature_dim // 2
    )


def test_conv4_block_closed_form():
    """One block equals maxpool(relu(batchnorm_batchstats(conv(x)))) written out by hand."""
    torch.manual_seed(0)
    net = Conv4(2, 3, hidden=4, image_size=8, blocks=1).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    block = net.blocks[0]
    z = F.conv2d(x, block.conv.weight, block.conv.bias, padding=1)
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    w, b = block.norm.weight.view(1, -1, 1, 1), block.norm.bias.view(1, -1, 1, 1)
    h = F.max_pool2d(torch.clamp((z - mean) / torch.sqrt(var + 1e-5) * w + b, min=0), 2)
    expected = h.flatten(1) @ net.head.weight.T + net.head.bias
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_norm", ["transductive", "running", "none"])
def test_conv4_functional_call_matches_forward(batch_norm):
    torch.manual_seed(0)
    net = Conv4(1, 5, image_size=28, batch_norm=batch_norm).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    reference = copy.deepcopy(net)
    own = dict(net.named_parameters())
    torch.testing.assert_close(functional_call(net, own, (x,)), reference(x), rtol=0, atol=0)
    params = _perturbed(net, 1)
    out = functional_call(net, params, (x,))
    torch.testing.assert_close(out, _load(reference, params)(x), rtol=1e-12, atol=1e-12)
    # the module's own parameters are untouched
    for name, p in net.named_parameters():
        assert torch.equal(p, dict(reference.named_parameters())[name])


def test_conv4_functional_gradient_matches_autograd():
    torch.manual_seed(0)
    net = Conv4(1, 3, hidden=8, image_size=28).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    g = grad(loss)(params)
    F.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-10, atol=1e-12)


def test_conv4_transductive_vmap_over_tasks_matches_loop():
    torch.manual_seed(0)
    net = Conv4(1, 5, hidden=8, image_size=28).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(3, 10, 1, 28, 28, dtype=torch.float64)  # 3 tasks of 10 images

    def run(p, xt):
        return functional_call(net, p, (xt,))

    batched = vmap(run, in_dims=(None, 0))(params, x)
    looped = torch.stack([run(params, x[t]) for t in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


def test_conv4_batch_norm_modes():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    trans = Conv4(batch_norm="transductive").double()
    train_out = trans(x)
    trans.eval()
    torch.testing.assert_close(trans(x), train_out, rtol=0, atol=0)  # always batch statistics
    assert not list(trans.buffers())
    running = Conv4(batch_norm="running").double()
    running(x)
    assert float(running.blocks[0].norm.running_mean.abs().sum()) > 0
    with pytest.raises(ConfigError, match="batch_norm"):
        Conv4(batch_norm="group")


def test_conv4_per_step_batch_norm():
    torch.manual_seed(0)
    net = Conv4(1, 5, hidden=8, batch_norm="per-step", num_steps=3).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    norm = net.blocks[0].norm
    assert isinstance(norm, PerStepBatchNorm2d) and norm.weight.shape == (3, 8)
    net(x, step=1)
    assert float(norm.running_mean[1].abs().sum()) > 0
    assert float(norm.running_mean[0].abs().sum()) == 0 == float(norm.running_mean[2].abs().sum())
    params = _perturbed(net, 2)
    out = functional_call(net, params, (x,), {"step": 2})
    torch.testing.assert_close(out, _load(net, params)(x, step=2), rtol=1e-12, atol=1e-12)
    # in training mode steps differ only through their weights and biases
    with torch.no_grad():
        for blk in net.blocks:
            blk.norm.weight[0] = blk.norm.weight[2] + 0.5
    assert not torch.allclose(net(x, step=0), net(x, step=2))
    net.eval()
    assert net(x, step=0).shape == (6, 5)
    with pytest.raises(ConfigError, match="step 3 out of range"):
        net(x, step=3)


def test_conv4_rejects_too_small_images():
    with pytest.raises(ConfigError, match="shrinks to nothing"):
        Conv4(image_size=8)


# ---------------------------------------------------------------- ResNet-12


def test_resnet12_shapes_and_parameter_count():
    torch.manual_seed(0)
    net = ResNet12(3, 5, channels=(8, 12, 16, 20))
    x = torch.randn(2, 3, 84, 84)
    assert net.features(x).shape == (2, 20) and net(x).shape == (2, 5)
    flat = ResNet12(3, 5, channels=(8, 12, 16, 20), avg_pool=False, image_size=84)
    assert flat.features(x).shape == (2, 20 * 25) and flat(x).shape == (2, 5)
    assert ResNet12(1, 5, channels=(4, 4, 4, 4))(torch.randn(2, 1, 28, 28)).shape == (2, 5)

    def expected(widths, cin, head_in, classes):
        total = 0
        for cout in widths:
            total += 9 * cin * cout + 2 * 9 * cout * cout + cin * cout  # convs, no bias
            total += 4 * 2 * cout  # four batch norms (weight, bias)
            cin = cout
        return total + head_in * classes + classes

    full = ResNet12(3, 5)
    assert full.feature_dim == 640
    n_params = sum(p.numel() for p in full.parameters())
    assert n_params == expected((64, 160, 320, 640), 3, 640, 5)
    print(f"ResNet-12 (64-160-320-640) parameters: {n_params}")


def test_resnet12_functional_call_and_vmap():
    torch.manual_seed(0)
    net = ResNet12(3, 4, channels=(4, 6, 8, 10), batch_norm="transductive").double()
    x = torch.randn(2, 5, 3, 32, 32, dtype=torch.float64)
    params = _perturbed(net, 3)
    out = functional_call(net, params, (x[0],))
    torch.testing.assert_close(out, _load(net, params)(x[0]), rtol=1e-12, atol=1e-12)
    batched = vmap(lambda xt: functional_call(net, params, (xt,)))(x)
    torch.testing.assert_close(batched[1], functional_call(net, params, (x[1],)))


def test_resnet12_bad_options():
    with pytest.raises(ConfigError, match="dropout"):
        ResNet12(dropout=1.0)
    with pytest.raises(ConfigError, match="per-step"):
        ResNet12(batch_norm="per-step")
    with pytest.raises(ConfigError, match="channels"):
        ResNet12(channels=())


# ---------------------------------------------------------------- MLP


def test_mlp_closed_form_and_flattening():
    torch.manual_seed(0)
    net = MLP([6, 4, 3], activation="tanh").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    l1, l2 = net.net[0], net.net[2]
    expected = torch.tanh(x.flatten(1) @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(net(x), expected, rtol=1e-14, atol=1e-14)
    assert MLP([784, 300, 10])(torch.randn(7, 1, 28, 28)).shape == (7, 10)
    assert MLP([3, 2], output_activation="sigmoid")(torch.zeros(1, 3)).shape == (1, 2)
    assert len(MLP([3, 5, 5, 2], activation=torch.nn.ELU).net) == 5


def test_mlp_functional_call():
    torch.manual_seed(0)
    net = MLP([10, 8, 3]).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    params = _perturbed(net, 4)
    torch.testing.assert_close(
        functional_call(net, params, (x,)), _load(net, params)(x), rtol=1e-14, atol=1e-14
    )


def test_mlp_bad_input():
    with pytest.raises(ConfigError, match="sizes"):
        MLP([10])
    with pytest.raises(ConfigError, match="unknown activation"):
        MLP([2, 2, 2], activation="swishy")
