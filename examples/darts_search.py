"""Differentiable architecture search (DARTS, Liu et al. 2019), first and second order.

Upper problem: the architecture logits ``α`` (normal and reduction cells), trained on the
validation half of the search data. Lower problem: the weights ``w`` of the over-parameterized
network, trained on the other half.

- ``--order 1``: first-order DARTS, ``Config(type="first_order")``: ``α`` and ``w`` alternate.
- ``--order 2``: second-order DARTS, ``Config(type="darts")`` (the finite-difference
  approximation of eq. 7-8) with ``EngineConfig(roll_back=True)``: the architecture step uses the
  look-ahead weights ``w' = w - ξ∇L_train(w, α)``, then the weights return to ``w`` and take their
  real step with the new ``α`` (Algorithm 1).

After the search, the genotype (two strongest inputs per node, ``none`` excluded) is trained
from scratch and tested; a random genotype of the same space gets the same training as a
baseline.

Spaces (``--space``):

- ``small``: 5 operations, 3 nodes per cell, 3 cells, on scikit-learn's 8x8 digits (real
  handwritten images, offline): searches and evaluates in minutes on a CPU; ``--data mnist1d``
  uses MNIST-1D instead (much harder for small networks; needs the optional ``mnist1d``
  package, which generates it offline).
- ``cifar``: the standard CIFAR-10 space (8 operations, 4 nodes, 8 cells, C=16, batch 64) on
  CIFAR-10 through torchvision (``--root``), meant for a GPU; ``--data random`` feeds random
  32x32 images to check the plumbing without the data set.

Run::

    python examples/darts_search.py --smoke
    python examples/darts_search.py --order 2 --seed 0                   # digits, CPU, minutes
    python examples/darts_search.py --space cifar --root ~/data --epochs 50 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import mlopt
from mlopt.models.darts import (
    CIFAR_PRIMITIVES,
    SMALL_PRIMITIVES,
    Architecture,
    GenotypeNetwork,
    SearchNetwork,
    derive_genotype,
    random_genotype,
)

try:
    from seed_summary import save_json
except ImportError:
    from examples.seed_summary import save_json


class Batches:
    """Shuffled mini-batches of in-memory tensors (a new permutation per pass)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.y))
        for i in range(0, len(perm) - self.batch_size + 1, self.batch_size):
            idx = perm[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return len(self.y) // self.batch_size


class Weights(mlopt.Problem):
    """Lower: network weights on the training half, with the architecture's current α."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self(x, self.arch.module.normal, self.arch.module.reduce), y)


class Arch(mlopt.Problem):
    """Upper: the architecture logits, on the validation half."""

    def training_step(self, batch):
        x, y = batch
        logits = self.network(x, self.module.normal, self.module.reduce)
        return F.cross_entropy(logits, y)


# ---------------------------------------------------------------------- data
def load_digits_images(seed: int):
    """Digits as 1x8x8 images: search-train 600, search-val 600, test 597 (stratified-free)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - 0.3) / 0.35
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:600], perm[600:1200], perm[1200:]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), 10


def load_mnist1d(seed: int):
    """MNIST-1D (Greydanus 2020), generated offline by the optional ``mnist1d`` package.

    The standard data set (``get_dataset_args()``: 5000 signals of length 40, its own seed 42):
    its 4000 training signals are split by ``seed`` into search-train / search-val (2000 each),
    its 1000 test signals are the test set. Signals become 1x1x40 "images", so the 3x3
    operations of the small space act as width-3 1D convolutions (the padding rows are zeros).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # not a dependency of mlopt: only this option needs it
        raise SystemExit(
            f"--data mnist1d needs the mnist1d package and its dependencies ({err}); "
            "`pip install mnist1d` (it generates the data offline, no download)"
        ) from err
    data = make_dataset(get_dataset_args())

    def prep(x, y):
        x = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), 1, 1, -1)
        return x, torch.as_tensor(y, dtype=torch.long)

    x, y = prep(data["x"], data["y"])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    tr, va = perm[:half], perm[half:]
    return (x[tr], y[tr]), (x[va], y[va]), prep(data["x_test"], data["y_test"]), 10


def load_cifar(root: str, data: str, smoke: bool):
    if data == "random":
        g = torch.Generator().manual_seed(0)
        n = 32 if smoke else 2048

        def fake(k):
            return torch.randn(k, 3, 32, 32, generator=g), torch.randint(0, 10, (k,), generator=g)

        return fake(n), fake(n), fake(n), 10
    try:
        import torchvision
        import torchvision.transforms as T
    except Exception as err:
        raise SystemExit(
            f"--space cifar needs torchvision for CIFAR-10 ({err}); use --data random to test"
        ) from err
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    train = torchvision.datasets.CIFAR10(root, train=True, download=True, transform=tf)
    test = torchvision.datasets.CIFAR10(root, train=False, download=True, transform=tf)

    def stack(ds):
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return torch.stack(xs), torch.tensor(ys)

    x, y = stack(train)
    half = len(y) // 2  # DARTS: half of the training set for w, half for α
    return (x[:half], y[:half]), (x[half:], y[half:]), stack(test), 10


# ---------------------------------------------------------------------- search and evaluation
def accuracy(model, x, y, batch: int = 256, **kw) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i : i + batch], **kw).argmax(-1) == y[i : i + batch]).sum())
    model.train()
    return correct / len(y)


def search(args, train, val, num_classes, in_channels, device) -> dict:
    space = SPACES[args.space]
    net = SearchNetwork(
        args.channels,
        num_classes,
        args.layers,
        in_channels,
        steps=space["steps"],
        multiplier=space["steps"],
        primitives=space["primitives"],
        reductions=space["reductions"],
    )
    arch = Architecture(net.num_edges, len(space["primitives"]))
    loader = Batches(*train, args.batch_size)
    iters = args.epochs * len(loader)
    w_opt = torch.optim.SGD(net.parameters(), lr=args.w_lr, momentum=0.9, weight_decay=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, iters, eta_min=args.w_lr / 25)
    method = "first_order" if args.order == 1 else "darts"
    weights = Weights(
        "network",
        net,
        w_opt,
        loader,
        mlopt.Config(type=method, gradient_clipping=5.0),
        scheduler=sched,
    )
    a_opt = torch.optim.Adam(
        arch.parameters(), lr=args.arch_lr, betas=(0.5, 0.999), weight_decay=1e-3
    )
    upper = Arch("arch", arch, a_opt, Batches(*val, args.batch_size))
    engine = mlopt.Engine(
        [upper, weights],
        {"u2l": {upper: [weights]}, "l2u": {weights: [upper]}},
        mlopt.EngineConfig(
            train_iters=iters, roll_back=args.order == 2, seed=args.seed, device=device
        ),
    )
    start = time.perf_counter()
    stats = engine.run()
    seconds = time.perf_counter() - start
    genotype = derive_genotype(
        arch.normal, arch.reduce, space["steps"], space["primitives"], space["steps"]
    )
    x_val, y_val = (t.to(device) for t in val)
    a_n, a_r = arch.normal.detach(), arch.reduce.detach()
    supernet_acc = accuracy(net, x_val, y_val, alphas_normal=a_n, alphas_reduce=a_r)
    return {
        "genotype": genotype._asdict(),
        "search_seconds": seconds,
        "search_iterations": iters,
        "search_updates": stats["updates"],
        "supernet_val_acc": supernet_acc,
        "alphas_normal": F.softmax(a_n, -1).cpu().tolist(),
        "alphas_reduce": F.softmax(a_r, -1).cpu().tolist(),
    }


def train_genotype(genotype, args, data, num_classes, in_channels, device, seed) -> float:
    """Train the discrete network from scratch on search-train + search-val; test accuracy."""
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = data
    torch.manual_seed(seed)
    space = SPACES[args.space]
    net = GenotypeNetwork(
        genotype,
        args.eval_channels,
        num_classes,
        args.layers,
        in_channels,
        reductions=space["reductions"],
    ).to(device)
    x, y = torch.cat([x_tr, x_va]).to(device), torch.cat([y_tr, y_va]).to(device)
    loader = Batches(x, y, args.batch_size)
    steps = args.eval_epochs * len(loader)
    opt = torch.optim.SGD(net.parameters(), lr=args.w_lr, momentum=0.9, weight_decay=3e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for _ in range(args.eval_epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
    return accuracy(net, x_te.to(device), y_te.to(device))


SPACES = {
    "small": {"primitives": SMALL_PRIMITIVES, "steps": 3, "reductions": (1,)},
    "cifar": {"primitives": CIFAR_PRIMITIVES, "steps": 4, "reductions": None},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, for tests")
    parser.add_argument("--space", default="small", choices=list(SPACES))
    parser.add_argument(
        "--data", default=None, help="digits | mnist1d (small space) | cifar10 | random (cifar)"
    )
    parser.add_argument("--root", default="~/data", help="torchvision data folder (cifar)")
    parser.add_argument("--order", type=int, default=2, choices=[1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="search epochs")
    parser.add_argument("--eval-epochs", type=int, default=None)
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--eval-channels", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--w-lr", type=float, default=0.05)
    parser.add_argument("--arch-lr", type=float, default=None)
    parser.add_argument("--random-baselines", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    small = args.space == "small"
    defaults = {
        "epochs": 30 if small else 50,
        "eval_epochs": 60 if small else 600,
        "channels": 8 if small else 16,
        "eval_channels": 8 if small else 36,
        "layers": 3 if small else 8,
        "arch_lr": 3e-3 if small else 3e-4,
        "data": "digits" if small else "cifar10",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.epochs, args.eval_epochs, args.random_baselines = 1, 1, 1
        args.channels = args.eval_channels = 4
        if not small:
            args.layers, args.batch_size, args.data = 2, 16, "random"
    torch.set_num_threads(1) if args.device == "cpu" else None
    torch.manual_seed(args.seed)
    if args.data in ("digits", "mnist1d"):
        load = load_digits_images if args.data == "digits" else load_mnist1d
        train, val, test, num_classes = load(args.seed)
        if args.smoke:
            train, val = (tuple(t[:64] for t in train), tuple(t[:64] for t in val))
    else:
        train, val, test, num_classes = load_cifar(args.root, args.data, args.smoke)
    in_channels = train[0].shape[1]
    result = {"args": vars(args)}
    result.update(search(args, train, val, num_classes, in_channels, args.device))
    geno = result["genotype"]
    print("genotype:", geno)
    from mlopt.models.darts import Genotype

    start = time.perf_counter()
    data = (train, val, test)
    result["test_acc"] = train_genotype(
        Genotype(**geno), args, data, num_classes, in_channels, args.device, args.seed
    )
    result["eval_seconds"] = time.perf_counter() - start
    space = SPACES[args.space]
    result["random"] = []
    for r in range(args.random_baselines):
        rg = random_genotype(space["steps"], space["primitives"], seed=1000 + r)
        acc = train_genotype(rg, args, data, num_classes, in_channels, args.device, args.seed)
        result["random"].append({"genotype": rg._asdict(), "test_acc": acc})
    print(
        f"order {args.order}: search {result['search_seconds']:.0f}s, supernet val acc "
        f"{result['supernet_val_acc']:.4f}, genotype test acc {result['test_acc']:.4f}; random "
        f"genotypes {[round(r['test_acc'], 4) for r in result['random']]}"
    )
    save_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
