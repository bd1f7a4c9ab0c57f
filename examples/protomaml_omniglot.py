"""Proto-MAML on Omniglot's minimal splits: a ProtoNet's head adapted in the lower level.

Triantafillou et al. (2020), "Meta-Dataset", Proto-MAML: the upper problem is the feature
extractor (a Conv4 without head); the lower one is a linear head on its features, initialized
from the support prototypes ``c_k`` as ``w_k = 2 c_k``, ``b_k = -||c_k||²`` (so that before any
step it classifies exactly as a Prototypical Network: ``-||q - c_k||²`` up to a term shared by
all classes) and adapted by ``--inner-steps`` SGD steps on the support loss. The head is written
``W = 2C + ΔW``, ``b = -||C||² + Δb`` with ``ΔW, Δb`` the lower's parameters, reset to zero for
every task: SGD on ``Δ`` is SGD on ``W`` from the prototype start, and the prototypes stay a
differentiable function of the features. Reverse mode (the Engine's default) differentiates the
query loss through the head's steps into the features and the prototype start (second order,
head only, as in ANIL). The inner step size is meta-learned too (``Embedding.log_lr``, started at
``--inner-lr``): the lower minimises ``α·L_support`` with SGD at rate 1, so its step is
``α ∇L_support`` and reverse mode differentiates it with respect to ``α`` (Meta-SGD's idea with
one scalar).

Each task's support and query images go through the Conv4 together once per meta-update (one
batch-norm batch, as the ProtoNet example does); the lower reuses those support features at
every inner step (the features do not change within a task's unroll).

``--save FILE`` writes the trained model; ``--ensemble FILE [FILE ...]`` trains nothing and
evaluates the members' ensemble (each query's class: the argmax of the mean of the members'
softmax probabilities, with the same support copies for all members), and each member alone.

For Lake's one-shot runs: ``--held-out 0 --ways 20 --within-alphabet --train-ways 20 --jitter``
(the ProtoNet's best training protocol); ``--test-augment K`` adds ``K`` jittered copies of each
support image at test time (more support rows, for the prototypes and the head's steps; nothing
uses the structure of the query images), and ``--train-copies K`` does the same in training, so
that the head's steps have support rows other than the prototypes' own to fit (at one shot and
no copies, each class's only support row is its prototype). The results also give the error of
the prototype start alone (``test_steps_0``): what the head's adaptation adds.

Run::

    python examples/protomaml_omniglot.py --ways 20 --held-out 0 --within-alphabet \
        --train-ways 20 --jitter --lr-halve-every 2000 --minutes 45 --out results/protomaml.json
    python examples/protomaml_omniglot.py --ways 20 --held-out 0 --within-alphabet \
        --train-ways 20 --jitter --minutes 30 --seed 1 --save results/protomaml_1.pt
    python examples/protomaml_omniglot.py --ways 20 --held-out 0 \
        --ensemble results/protomaml_0.pt results/protomaml_1.pt
    python examples/protomaml_omniglot.py --smoke
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mlopt
from mlopt.meta import adapt, reset_parameters
from mlopt.models import Conv4

try:
    import omniglot_common as common
except ImportError:
    from examples import omniglot_common as common


class Embedding(torch.nn.Module):
    """Conv4 features (no head) plus the meta-learned inner step size (log scale)."""

    def __init__(self, hidden: int, lr: float) -> None:
        super().__init__()
        self.body = Conv4(1, None, hidden=hidden, batch_norm="running")
        self.feature_dim = self.body.feature_dim
        self.log_lr = torch.nn.Parameter(torch.tensor(float(lr)).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def prototypes(feats: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean support feature of each class (rows: classes)."""
    onehot = F.one_hot(labels, ways).to(feats.dtype)
    return onehot.T @ feats / onehot.sum(0).unsqueeze(1)


def proto_logits(feats, protos, d_weight, d_bias):
    """The head ``(2C + ΔW) x - ||C||² + Δb``: ProtoNet's ``-||x - c_k||²`` (+ ``||x||²``) at
    ``Δ = 0``."""
    weight = 2 * protos + d_weight
    bias = -protos.pow(2).sum(1) + d_bias
    return F.linear(feats, weight, bias)


class ProtoHead(mlopt.Problem):
    """Lower: the head's offsets ``Δ`` from the prototype start, on ``α`` times the support loss
    (SGD at rate 1: steps of size ``α``)."""

    def __init__(self, *a, decay: float = 0.0, copies: int = 0, seed: int = 0, **k):
        super().__init__(*a, **k)
        self.decay = decay
        self.copies = copies  # jittered copies of each support image, in training
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.cache = None  # (support features, labels, query features, prototypes) of the task

    def on_inner_loop_start(self):
        reset_parameters(self)  # Δ = 0: every task starts at its ProtoNet head
        self.cache = None

    def features_of(self, task):
        """Support and query features in one Conv4 batch, once per task (unroll window)."""
        if self.cache is None:
            sx, sy, qx, _ = task
            # more support rows for the prototypes and the head's steps
            sx, sy = common.support_copies(sx, sy, self.copies, self.gen)
            emb = self.features(torch.cat([sx, qx]))
            fs, fq = emb[: len(sx)], emb[len(sx) :]
            self.cache = fs, sy, fq, prototypes(fs, sy, self.module.out_features)
        return self.cache

    def training_step(self, task):
        fs, sy, _, protos = self.features_of(task)
        w, b = self.module.weight, self.module.bias
        loss = F.cross_entropy(proto_logits(fs, protos, w, b), sy)
        alpha = self.features.module.log_lr.exp()
        return alpha * (loss + 0.5 * self.decay * w.pow(2).sum())


class Features(mlopt.Problem):
    """Upper: the Conv4's query loss with the adapted head."""

    def training_step(self, batch):
        task = self.head.batch
        _, _, fq, protos = self.head.features_of(task)
        h = self.head.module
        logits = proto_logits(fq, protos, h.weight, h.bias)
        qy = task[3]
        return {
            "loss": F.cross_entropy(logits, qy),
            "accuracy": (logits.argmax(-1) == qy).float().mean(),
        }


def adapted_logits(net, steps: int, lr, decay: float):
    """``logits(sx, sy, qx)``: prototype start, ``steps`` SGD steps of the head on the support,
    then the head's logits for each query."""

    @torch.no_grad()
    def logits(sx, sy, qx):
        ways = int(sy.max()) + 1
        fs, fq = net(sx), net(qx)
        protos = prototypes(fs, sy, ways)
        zero = {"w": torch.zeros(ways, fs.shape[1]), "b": torch.zeros(ways)}

        def loss(p):
            ce = F.cross_entropy(proto_logits(fs, protos, p["w"], p["b"]), sy)
            return ce + 0.5 * decay * p["w"].pow(2).sum()

        with torch.enable_grad():
            fast = adapt(loss, zero, steps, lr)
        return proto_logits(fq, protos, fast["w"], fast["b"])

    return logits


def make_predictor(nets: list, lrs: list, steps: int, decay: float, copies: int, gen):
    """``predict(sx, sy, qx)``: ``copies`` jittered copies of each support image, then each query's
    class: the argmax of one model's logits, or of an ensemble's mean softmax probabilities (all
    members see the same support copies)."""
    members = [adapted_logits(net, steps, lr, decay) for net, lr in zip(nets, lrs)]

    @torch.no_grad()
    def predict(sx, sy, qx):
        sx, sy = common.support_copies(sx, sy, copies, gen)
        if len(members) == 1:
            return members[0](sx, sy, qx).argmax(-1)
        return torch.stack([m(sx, sy, qx).softmax(-1) for m in members]).mean(0).argmax(-1)

    return predict


def build(args, train, ways: int):
    """The Conv4, the two problems, and the task stream of ``args``."""
    net = Embedding(args.hidden, args.inner_lr)
    head = torch.nn.Linear(net.feature_dim, ways)
    stream = common.task_stream(args, train, ways)
    low = ProtoHead(
        "head",
        head,
        torch.optim.SGD(head.parameters(), lr=1.0),  # the step size is α in the loss
        train_data_loader=stream,
        config=mlopt.Config(unroll_steps=args.inner_steps, resample="window"),
        decay=args.decay,
        copies=args.train_copies,
        seed=args.seed,
    )
    opt = torch.optim.Adam(net.parameters(), lr=args.outer_lr)
    halve = args.lr_halve_every  # Snell et al.'s schedule: halve every 2000 episodes
    up = Features(
        "features",
        net,
        opt,
        config=mlopt.Config(gradient_accumulation=args.meta_batch),
        scheduler=torch.optim.lr_scheduler.StepLR(opt, halve, 0.5) if halve else None,
    )
    return net, up, low


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(
        __doc__.split("\n")[0], inner_steps=3, test_steps=3, inner_lr=0.5, meta_batch=1
    )
    p.add_argument("--train-ways", type=int, default=None, help="ways of training tasks")
    p.add_argument("--decay", type=float, default=0.0, help="L2 penalty on the head's offsets")
    p.add_argument("--jitter", action="store_true", help="random affine distortions (train)")
    p.add_argument("--test-augment", type=int, default=0, help="jittered copies per support")
    p.add_argument(
        "--train-copies", type=int, default=0, help="jittered copies per support (training)"
    )
    p.add_argument(
        "--lr-halve-every", type=int, default=0, help="halve the outer lr every N meta-updates"
    )
    p.add_argument("--save", default=None, help="write the trained model (and its counts) here")
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=None,
        help="no training: evaluate the ensemble of these --save files",
    )
    args = p.parse_args(argv)
    common.setup(args)
    train, test, runs = common.load_data(args)
    if args.ensemble:
        nets, results = load_members(args, args.ensemble)
    else:
        net, up, low = build(args, train, args.train_ways or args.ways)
        results = common.train_bilevel(args, up, low)
        net.eval()
        nets = [net]
        results["learned_inner_lr"] = round(net.log_lr.exp().item(), 5)
        if args.save:
            split = {"held_out": args.held_out, "seed": args.seed, "hidden": args.hidden}
            torch.save({"model": net.state_dict(), "results": results, "split": split}, args.save)
    lrs = [net.log_lr.exp().item() for net in nets]

    def predictor(steps: int, copies: int, scale: float = 1.0, which=None):
        gen = torch.Generator().manual_seed(args.seed + 1)
        which = range(len(nets)) if which is None else which  # members: all, or these
        chosen, rates = [nets[i] for i in which], [lrs[i] * scale for i in which]
        return make_predictor(chosen, rates, steps, args.decay, copies, gen)

    def score(steps: int, copies: int, scale: float = 1.0, which=None) -> dict:
        out = common.evaluate(args, predictor(steps, copies, scale, which), test, runs)
        return {k: v for k, v in out.items() if k != "eval_seconds"}

    out = common.evaluate(args, predictor(args.test_steps, args.test_augment), test, runs)
    # diagnostics, not the result: the prototype start alone, and other test-time settings
    out["test_steps_0"] = score(0, args.test_augment)
    other = 0 if args.test_augment else 4  # the same model with(out) test-time augmentation
    out[f"test_augment_{other}"] = score(args.test_steps, other)
    out[f"test_augment_{other}_steps_0"] = score(0, other)
    if args.ensemble:  # each member alone, with the ensemble's test-time setting
        out["members_alone"] = [
            score(args.test_steps, args.test_augment, which=[i]) for i in range(len(nets))
        ]
    else:
        out["diagnostics_test_lr_x_steps"] = {
            f"{scale}x{steps}": score(steps, args.test_augment, scale)
            for scale in (0.3, 3.0)
            for steps in (args.test_steps, 10)
        }
    out.update(results)
    return common.finish(args, "protomaml", out)


def load_members(args, paths: list[str]) -> tuple[list, dict]:
    """The ``--save`` files' models (eval mode) and their training counts, summed."""
    nets, members = [], []
    for path in paths:
        saved = torch.load(path, weights_only=True)
        split = saved["split"]
        if split["held_out"] != args.held_out or (args.held_out and split["seed"] != args.seed):
            raise mlopt.ConfigError(
                f"--ensemble: {path} was trained with --held-out {split['held_out']} --seed "
                f"{split['seed']}, so its held-out characters are not this run's (--held-out "
                f"{args.held_out} --seed {args.seed}): some test characters would be training "
                "characters of a member. Evaluate with the members' split, or train the members "
                "with --held-out 0 (Lake's runs only), where any seeds may be mixed"
            )
        args.hidden = split["hidden"]
        net = Embedding(args.hidden, args.inner_lr)
        net.load_state_dict(saved["model"])
        nets.append(net.eval())
        members.append({"file": path, **saved["results"]})
    total = {k: round(sum(m[k] for m in members), 1) for k in ("meta_updates", "train_seconds")}
    return nets, {**total, "members": members}


if __name__ == "__main__":
    main()
