"""``hnca bandit``: the contextual-bandit MNIST experiment of the paper (Section 1.3, Figure 1).

A network of ±1 Bernoulli layers and a softmax output guesses the class of a dynamically
binarized MNIST digit (or an image of another ``--dataset``, with as many outputs as it has
classes) and gets reward 1 when right, else 0; it is trained by HNCA or REINFORCE
(optionally with a moving-average baseline of earlier batches). Each epoch adds one line to
``metrics.jsonl`` and replaces the checkpoint (the run directory of ``rundir.py``), from which
``--resume`` continues exactly.

Training draws from checkpointed state only: a dedicated CPU ``torch.Generator`` draws the data
order and the training binarization, and the global torch RNG (saved in the checkpoint) draws the
network's samples. The test accuracy of epoch e draws from its own streams seeded by (seed, e), so
testing never moves the training streams.

Under torchrun (``world.py``) the network runs inside DistributedDataParallel, recorded as usual,
each rank on its share of every batch (--batch-size is the batch of one update over all ranks);
the accuracies and the gradient variance are over all ranks' examples, and rank 0 writes the run.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import BernoulliLinear, CategoricalLinear, MovingAverageBaseline, StochasticSequential, record, use_backend
from ..backends import BACKENDS, unavailable_reason
from ..data import binarize
from ..record import ESTIMATORS
from . import common
from .common import NonFinite, positive_float, positive_int
from .rundir import CHECKPOINT, CommandError, UsageError, one_line
from .world import SharedRun, World

# Config entries that define the run: a resumed run must match them exactly (a config.json from
# before --dataset means mnist). The others (epochs, device, backend, threads, data directory,
# on_nonfinite) may change between sessions.
RUN_KEYS = ("dataset", "layers", "width", "estimator", "baseline", "lr", "batch_size", "seed", "limit_train",
            "limit_test")
_DEFAULTS = {"dataset": "mnist"}
_TEST_BATCH = 1000
_TEST_STREAMS = (1, 2)  # derived_seed(seed, epoch, s): the test binarization, the network's test samples


def register(subparsers) -> None:
    p = subparsers.add_parser("bandit", formatter_class=common.HelpFormatter, help="contextual-bandit MNIST (paper Figure 1)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, choices=(1, 2, 3), default=1, help="hidden Bernoulli layers (default 1)")
    p.add_argument("--width", type=positive_int, default=200, help="units per hidden layer (default 200)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="hnca", help="HNCA or REINFORCE")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract a 0.99 moving average of earlier batches' rewards (default on)")
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs to train (the paper's length)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="examples per update (over all processes)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the run")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="message-pass backend (default: fastest available)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory: metrics.jsonl, config.json, checkpoint.pt (default "
                        "runs/bandit-[<dataset>-]L<layers>-<estimator>[-nobaseline]-s<seed>)")
    common.add_data_options(p)
    common.add_run_options(p)
    p.set_defaults(func=run)


def build_model(layers: int, width: int, classes: int = 10, in_features: int = 784) -> StochasticSequential:
    """``layers`` hidden layers of ``width`` ±1 Bernoulli units, then a ``classes``-way softmax unit."""
    sizes = [in_features] + [width] * layers
    hidden = [BernoulliLinear(a, b, centered=True) for a, b in zip(sizes, sizes[1:])]
    return StochasticSequential(*hidden, CategoricalLinear(width, classes))


def _start(args, run: SharedRun, classes: int, device: torch.device, world: World):
    """Model, optimizer, baseline and data generator: fresh, or restored from the run's checkpoint."""
    world.seed(args.seed)
    model = build_model(args.layers, args.width, classes).to(device)  # before the optimizer: its state follows the params
    baseline = MovingAverageBaseline(0.99).to(device)
    graphs = args.cuda_graphs and common.device_loop(args, device)
    optimizer = common.make_optimizer(model.parameters(), args.lr, device, graphs)
    data_rng = torch.Generator().manual_seed(args.seed)
    if (state := run.checkpoint) is not None:  # tensors load on the CPU and are copied to the device
        try:
            model.load_state_dict(state["model"])
            common.load_optimizer(optimizer, state["optimizer"])
            baseline.load_state_dict(state["baseline"])
            data_rng.set_state(state["data_rng"])
            common.set_rng_state(run.rng_state())
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CommandError(f"{args.out / CHECKPOINT} does not fit this run ({one_line(exc)})") from None
    return model, optimizer, baseline, data_rng


def _step(model, optimizer, baseline, args, world: World | None = None, forward=None):
    """One training step that never waits for the GPU: (sum of the rewards, the gradient variance
    metric, whether the loss and gradients were finite), all device tensors.

    Under torchrun (``forward``: the DDP-wrapped model) the step is ``step(images, labels, weight)``
    on this rank's share with its loss weight (a device scalar, ``World.loss_weight``), and the
    variance is this rank's term of the whole batch's (``common.variance_share``)."""
    if world is None or not world.distributed:
        def step(images, labels):
            with record() as rec:
                action = model(images)
            reward = (action == labels).to(images.dtype)
            b = baseline(reward) if args.baseline else 0.0
            optimizer.zero_grad(set_to_none=True)
            loss = rec.surrogate_loss(reward, estimator=args.estimator, baseline=b)
            loss.backward()
            finite = common.finite_flag(loss, model.parameters())
            optimizer.step()
            return reward.sum(), rec.gradient_variance(as_tensor=True), finite
        return step

    def shared_step(images, labels, weight):
        with record() as rec:
            action = forward(images)  # DDP's forward: the layers inside register as usual
        reward = (action == labels).to(images.dtype)
        b = baseline(reward) if args.baseline else 0.0  # synced: the mean over all ranks' rewards
        optimizer.zero_grad(set_to_none=True)
        loss = rec.surrogate_loss(reward, estimator=args.estimator, baseline=b)
        (loss * weight).backward()  # DDP averages the gradients over the ranks here
        finite = common.finite_flag(loss, model.parameters())
        variance = _variance_share(rec, model, images.shape[0], weight, world)
        optimizer.step()
        return reward.sum(), variance, finite
    return shared_step


def _variance_share(rec, model, share: int, weight, world: World) -> torch.Tensor:
    """This rank's term of the batch's gradient variance (every layer's), before the update."""
    square_sum, count = rec.gradient_square_sum()
    return common.variance_share(square_sum, count, share, weight, world.size, [p.grad for p in model.parameters()])


def _rank_rows(n: int, plan) -> torch.Tensor:
    """The positions in an epoch of ``n`` examples of this rank's shares (``World.batches``), in order."""
    return torch.cat([torch.arange(lo, hi) for _, lo, hi in plan]) if plan else torch.zeros(0, dtype=torch.long)


def device_epoch(steps: common.DeviceEpoch, data_rng, x, y, args, device, progress=None, world: World | None = None):
    """``train_epoch`` on the GPU without waiting for it (the same data order and binarization):
    (mean reward, mean gradient variance, 1-based index of the first non-finite batch or None)."""
    world = world or World()
    n = x.shape[0]
    order = torch.randperm(n, generator=data_rng)
    # the whole epoch binarized at once draws the same uniforms as batch by batch
    images, labels = binarize(x[order], generator=data_rng), y[order]
    bs = args.batch_size
    if not world.distributed:
        images, labels = images.to(device), labels.to(device)
        batches = ((images[k : k + bs], labels[k : k + bs]) for k in range(0, n, bs))
        reward_sum, variance, _, bad = steps.run(batches, progress)
        return reward_sum / n, variance, bad
    plan = world.batches(n, bs)
    rows = _rank_rows(n, plan)  # this rank's examples only go to its device
    images, labels = images[rows].to(device), labels[rows].to(device)
    offsets = [0]
    for _, lo, hi in plan:
        offsets.append(offsets[-1] + hi - lo)
    weights = {c: torch.tensor(world.loss_weight(c), device=device) for c in {min(bs, n - s) for s, _, _ in plan}}
    batches = ((images[a:b], labels[a:b], weights[min(bs, n - start)])
               for (start, _, _), a, b in zip(plan, offsets, offsets[1:]))
    full = sum(start + bs <= n for start, _, _ in plan)  # a smaller last batch runs eagerly on every rank
    reward_sum, variance, count, bad = steps.run(batches, progress, eager_from=full)
    reward_sum, variance, seen = world.sum([reward_sum, variance * count, len(rows)])
    return reward_sum / seen, variance / count, world.first(bad)


def train_epoch(model, optimizer, baseline, data_rng, x, y, args, device, guard, progress=None,
                world: World | None = None, forward=None):
    """One pass over (x, y) in a fresh order with fresh binarization: (mean reward, mean gradient
    variance over the batches trained). ``guard`` (common.Divergence) checks every step. Under
    torchrun (``forward`` as in ``_step``) each rank trains on its share of every batch."""
    world = world or World()
    n = x.shape[0]
    order = torch.randperm(n, generator=data_rng)
    reward_sum = torch.zeros((), dtype=torch.float64, device=device)
    variance_sum, batches, seen = 0.0, 0, 0
    for start, lo, hi in world.batches(n, args.batch_size):
        idx = order[start : start + args.batch_size]
        images = binarize(x[idx], generator=data_rng)  # the whole batch: the same draws at any world size
        if world.distributed:
            images, idx = images[lo - start : hi - start], idx[lo - start : hi - start]
        images = images.to(device)
        labels = y[idx].to(device)
        with record() as rec:
            action = (forward or model)(images)
        reward = (action == labels).to(images.dtype)
        b = baseline(reward) if args.baseline else 0.0
        optimizer.zero_grad(set_to_none=True)
        loss = rec.surrogate_loss(reward, estimator=args.estimator, baseline=b)
        if world.distributed:
            weight = world.loss_weight(min(args.batch_size, n - start))
            loss = loss * weight
        loss.backward()
        reward_sum += reward.sum()
        seen += images.shape[0]
        if progress is not None:
            progress.update(1)
        if not guard.step_ok(model):  # --on-nonfinite skip: no update from this batch
            continue
        if world.distributed:  # from the gradients, before the update
            variance_sum += float(_variance_share(rec, model, images.shape[0], weight, world))
        optimizer.step()
        guard.after_step(model)
        if not world.distributed:
            variance_sum += rec.gradient_variance()
        batches += 1
    if world.distributed:  # over all ranks' examples (every rank trained the same batches)
        reward, variance_sum, seen = world.sum([float(reward_sum), variance_sum, seen])
        return reward / seen, (variance_sum / batches if batches else math.nan)
    return float(reward_sum) / n, (variance_sum / batches if batches else math.nan)


@torch.no_grad()
def evaluate(model, x, y, device, seed: int, epoch: int, world: World | None = None) -> float:
    """Accuracy of sampled actions on a freshly binarized copy of (x, y), drawn from streams of
    their own (seeded by ``seed`` and ``epoch``): the training streams are neither read nor moved.
    Under torchrun each rank samples its share of the test set, from a stream of its own."""
    world = world or World()
    lo, hi = world.shard(x.shape[0])
    data_rng = torch.Generator().manual_seed(common.derived_seed(seed, epoch, _TEST_STREAMS[0]))
    correct = 0
    with common.isolated_rng(common.derived_seed(seed, epoch, _TEST_STREAMS[1], *world.stream_keys()), device):
        for start in range(0, x.shape[0], _TEST_BATCH):
            # every rank binarizes every chunk (the same pixels at any world size) and samples its part
            images = binarize(x[start : start + _TEST_BATCH], generator=data_rng)
            a, b = max(lo, start), min(hi, start + _TEST_BATCH)
            if a >= b:
                continue
            if world.distributed:
                images = images[a - start : b - start]
            images = images.to(device)
            correct += int((model(images) == y[a:b].to(device)).sum())
    if world.distributed:
        correct, count = world.sum([correct, hi - lo])
        return correct / count
    return correct / x.shape[0]


def run(args) -> int:
    with World.start(args.device) as world:
        return _run(args, world)


def _run(args, world: World) -> int:
    device = world.device
    if args.backend is not None and (reason := unavailable_reason(args.backend, device)) is not None:
        raise UsageError(f"--backend {args.backend} cannot run on {device}: {reason}")
    world.check_options(args)
    common.set_threads(args)
    data = "" if args.dataset == "mnist" else f"{args.dataset}-"
    args.out = args.out or Path("runs") / (f"bandit-{data}L{args.layers}-{args.estimator}"
                                           f"{'' if args.baseline else '-nobaseline'}-s{args.seed}")
    config = {k: getattr(args, k) for k in RUN_KEYS}
    config.update(experiment="bandit", epochs=args.epochs, device=str(device), backend=args.backend,
                  on_nonfinite=args.on_nonfinite, world_size=world.size)

    with SharedRun.start(world, args.out, "bandit", config, RUN_KEYS, args.resume, _DEFAULTS) as run_dir:
        if common.already_trained(run_dir, args.epochs, args.out, world):
            return 0
        train_x, train_y, test_x, test_y, classes = common.load_splits(args, world)
        with world.agreement():
            model, optimizer, baseline, data_rng = _start(args, run_dir, classes, device, world)
        run_dir.write_config(config)
        graphs = args.cuda_graphs and common.device_loop(args, device)
        # DDP broadcasts rank 0's parameters, the one-process ones, to every rank
        forward = world.wrap(model, graphs) if world.distributed else None
        try:
            _train(args, config, run_dir, model, optimizer, baseline, data_rng, train_x, train_y, test_x, test_y,
                   device, world, forward)
        except KeyboardInterrupt:
            raise CommandError("interrupted; resume with --resume", 130) from None
    return 0


def _train(args, config, run_dir, model, optimizer, baseline, data_rng, train_x, train_y, test_x, test_y, device,
           world: World, forward):
    done = run_dir.epoch
    guard = common.Divergence(args.on_nonfinite, world)
    on_device = common.device_loop(args, device)
    steps = None
    if on_device:
        steps = common.DeviceEpoch(_step(model, optimizer, baseline, args, world, forward), args.cuda_graphs,
                                   warmup=world.graph_warmup)
    batches = len(world.batches(train_x.shape[0], args.batch_size))
    label = f"{args.estimator}{'+baseline' if args.baseline else ''}, {args.layers} layer(s)"
    with use_backend(args.backend), tqdm(total=args.epochs * batches, initial=done * batches, desc=label,
                                         unit="batch", disable=args.no_progress or not world.main,
                                         mininterval=2.0) as progress:
        for epoch in range(done + 1, args.epochs + 1):
            started = time.perf_counter()
            guard.start_epoch()
            if on_device:
                train_acc, variance, bad = device_epoch(steps, data_rng, train_x, train_y, args, device, progress,
                                                        world)
                if bad is not None:
                    raise guard.stopped(NonFinite("loss or gradient"), f"epoch {epoch}, batch {bad}", run_dir.epoch)
            else:
                try:
                    train_acc, variance = train_epoch(model, optimizer, baseline, data_rng, train_x, train_y, args,
                                                      device, guard, progress, world, forward)
                except NonFinite as problem:
                    raise guard.stopped(problem, f"epoch {epoch}, batch {guard.batch}", run_dir.epoch) from None
            try:
                if guard.skipped == batches:
                    raise NonFinite("loss or gradient")
                common.Divergence.check_state(model.state_dict())
            except NonFinite as problem:
                where = f"every batch of epoch {epoch}" if guard.skipped == batches else f"the end of epoch {epoch}"
                raise guard.stopped(problem, where, run_dir.epoch) from None
            test_acc = evaluate(model, test_x, test_y, device, args.seed, epoch, world)
            record = {
                "epoch": epoch,
                "train_accuracy": train_acc,
                "test_accuracy": test_acc,
                "grad_variance": variance,
                "log_grad_variance": math.log(variance) if variance > 0 else None,
                "seconds": time.perf_counter() - started,
            }
            if args.on_nonfinite == "skip":
                record["skipped_batches"] = guard.skipped
            run_dir.finish_epoch(record, {
                "config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "baseline": baseline.state_dict(), "data_rng": data_rng.get_state(),
            })
            progress.set_postfix(train=f"{train_acc:.4f}", test=f"{test_acc:.4f}", logvar=f"{record['log_grad_variance'] or 0:.2f}")
