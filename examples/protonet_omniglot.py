"""Prototypical Networks on Omniglot's minimal splits: the metric-learning baseline.

Snell, Swersky and Zemel (2017), "Prototypical Networks for Few-shot Learning": a Conv4 embeds
the images; a query is classified by the nearest class mean (prototype) of the support
embeddings in squared Euclidean distance. Training uses more ways than testing (60 here, as in
the paper). One level only: the Engine runs a single problem.

Run::

    # Lake's 20 one-shot runs after training on all 242 characters with within-alphabet
    # 20-way episodes (the best configuration measured here, docs/meta_learning.md)
    python examples/protonet_omniglot.py --ways 20 --held-out 0 --train-ways 20 \
        --within-alphabet --jitter --minutes 16
    python examples/protonet_omniglot.py --train-ways 60 --minutes 16 --ways 20 \
        --out results/protonet.json      # 20-way held-out accuracy and Lake's one-shot runs
    python examples/protonet_omniglot.py --smoke
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import mlopt
from mlopt.data import EpisodicSampler
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:  # imported as examples.protonet_omniglot
    from examples import omniglot_common as common


def prototype_logits(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, ways: int):
    """``-||q - c_k||²`` with ``c_k`` the mean support embedding of class ``k``."""
    onehot = F.one_hot(labels, ways).to(support.dtype)
    protos = onehot.T @ support / onehot.sum(0, keepdim=True).T
    return -torch.cdist(query, protos).pow(2)


class ProtoNet(mlopt.Problem):
    def __init__(self, *a, augment: bool = False, **k):
        super().__init__(*a, **k)
        self.augment = augment

    def training_step(self, task):
        sx, sy, qx, qy = task
        images = torch.cat([sx, qx])
        emb = self.module(common.jitter(images) if self.augment else images)
        logits = prototype_logits(emb[: len(sx)], sy, emb[len(sx) :], int(sy.max()) + 1)
        acc = (logits.argmax(-1) == qy).float().mean()
        return {"loss": F.cross_entropy(logits, qy), "accuracy": acc}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.split("\n")[0], outer_lr=1e-3, queries=5)
    p.add_argument("--train-ways", type=int, default=60)
    p.add_argument("--jitter", action="store_true", help="random affine distortions in training")
    p.add_argument("--save", default=None, help="write the trained Conv4's state_dict here")
    args = p.parse_args(argv)
    common.setup(args)
    if args.smoke:
        args.train_ways = 5
    train, test, runs = common.load_data(args)
    net = Conv4(1, None, hidden=args.hidden, batch_norm="running")
    sampler = EpisodicSampler(
        train,
        args.train_ways,
        args.shots,
        args.queries,
        seed=args.seed,
        augment="rotate",
        groups=common.alphabets(train) if args.within_alphabet else None,
    )
    opt = torch.optim.Adam(net.parameters(), lr=args.outer_lr)
    proto = ProtoNet("protonet", net, opt, train_data_loader=sampler, augment=args.jitter)
    engine = common.TimedEngine(
        [proto], {}, common.timed_config(args.iterations), minutes=args.minutes
    )
    t0 = time.perf_counter()
    engine.run()
    train_seconds = time.perf_counter() - t0
    net.eval()
    if args.save:
        torch.save(net.state_dict(), args.save)

    @torch.no_grad()
    def predict(sx, sy, qx):
        ways = int(sy.max()) + 1
        return prototype_logits(net(sx), sy, net(qx), ways).argmax(-1)

    results = common.evaluate(args, predict, test, runs)  # --ways (20: with Lake's runs)
    for ways in (5, 20):
        if ways != args.ways and test is not None:
            other = common.evaluate(args, predict, test, runs, ways=ways)
            results[f"{ways}way"] = {k: v for k, v in other.items() if k != "lake_error_percent"}
    results.update(
        iterations=engine.iteration,
        meta_updates=engine.iteration,  # one episode per update
        train_seconds=round(train_seconds, 1),
    )
    return common.finish(args, "protonet", results)


if __name__ == "__main__":
    main()
