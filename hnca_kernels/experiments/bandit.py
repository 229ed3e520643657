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
from .rundir import CHECKPOINT, CommandError, RunDir, UsageError, one_line

# Config entries that define the run: a resumed run must match them exactly (a config.json from
# before --dataset means mnist). The others (epochs, device, backend, threads, data directory,
# on_nonfinite) may change between sessions.
RUN_KEYS = ("dataset", "layers", "width", "estimator", "baseline", "lr", "batch_size", "seed", "limit_train",
            "limit_test")
_DEFAULTS = {"dataset": "mnist"}
_TEST_BATCH = 1000
_TEST_STREAMS = (1, 2)  # derived_seed(seed, epoch, s): the test binarization, the network's test samples


def register(subparsers) -> None:
    p = subparsers.add_parser("bandit", help="contextual-bandit MNIST (paper Figure 1)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, choices=(1, 2, 3), default=1, help="hidden Bernoulli layers (default 1)")
    p.add_argument("--width", type=positive_int, default=200, help="units per hidden layer (default 200)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="hnca")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract a 0.99 moving average of earlier batches' rewards (default on)")
    p.add_argument("--epochs", type=positive_int, default=100)
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="message-pass backend (default: fastest available)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, required=True, help="output directory (metrics.jsonl, config.json, checkpoint.pt)")
    common.add_data_options(p)
    common.add_run_options(p)
    p.set_defaults(func=run)


def build_model(layers: int, width: int, classes: int = 10, in_features: int = 784) -> StochasticSequential:
    """``layers`` hidden layers of ``width`` ±1 Bernoulli units, then a ``classes``-way softmax unit."""
    sizes = [in_features] + [width] * layers
    hidden = [BernoulliLinear(a, b, centered=True) for a, b in zip(sizes, sizes[1:])]
    return StochasticSequential(*hidden, CategoricalLinear(width, classes))


def _start(args, run: RunDir, classes: int, device: torch.device):
    """Model, optimizer, baseline and data generator: fresh, or restored from the run's checkpoint."""
    common.seed_everything(args.seed)
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
            common.set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CommandError(f"{run.path / CHECKPOINT} does not fit this run ({one_line(exc)})") from None
    return model, optimizer, baseline, data_rng


def _step(model, optimizer, baseline, args):
    """One training step that never waits for the GPU: (sum of the rewards, the gradient variance
    metric, whether the loss and gradients were finite), all device tensors."""
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


def device_epoch(steps: common.DeviceEpoch, data_rng, x, y, args, device, progress=None):
    """``train_epoch`` on the GPU without waiting for it (the same data order and binarization):
    (mean reward, mean gradient variance, 1-based index of the first non-finite batch or None)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=data_rng)
    # the whole epoch binarized at once draws the same uniforms as batch by batch
    images, labels = binarize(x[order], generator=data_rng).to(device), y[order].to(device)
    bs = args.batch_size
    batches = ((images[k : k + bs], labels[k : k + bs]) for k in range(0, n, bs))
    reward_sum, variance, _, bad = steps.run(batches, progress)
    return reward_sum / n, variance, bad


def train_epoch(model, optimizer, baseline, data_rng, x, y, args, device, guard, progress=None):
    """One pass over (x, y) in a fresh order with fresh binarization: (mean reward, mean gradient
    variance over the batches trained). ``guard`` (common.Divergence) checks every step."""
    n = x.shape[0]
    order = torch.randperm(n, generator=data_rng)
    reward_sum = torch.zeros((), dtype=torch.float64, device=device)
    variance_sum, batches = 0.0, 0
    for start in range(0, n, args.batch_size):
        idx = order[start : start + args.batch_size]
        images = binarize(x[idx], generator=data_rng).to(device)
        labels = y[idx].to(device)
        with record() as rec:
            action = model(images)
        reward = (action == labels).to(images.dtype)
        b = baseline(reward) if args.baseline else 0.0
        optimizer.zero_grad(set_to_none=True)
        rec.surrogate_loss(reward, estimator=args.estimator, baseline=b).backward()
        reward_sum += reward.sum()
        if progress is not None:
            progress.update(1)
        if not guard.step_ok(model):  # --on-nonfinite skip: no update from this batch
            continue
        optimizer.step()
        guard.after_step(model)
        variance_sum += rec.gradient_variance()
        batches += 1
    return float(reward_sum) / n, (variance_sum / batches if batches else math.nan)


@torch.no_grad()
def evaluate(model, x, y, device, seed: int, epoch: int) -> float:
    """Accuracy of sampled actions on a freshly binarized copy of (x, y), drawn from streams of
    their own (seeded by ``seed`` and ``epoch``): the training streams are neither read nor moved."""
    data_rng = torch.Generator().manual_seed(common.derived_seed(seed, epoch, _TEST_STREAMS[0]))
    correct = 0
    with common.isolated_rng(common.derived_seed(seed, epoch, _TEST_STREAMS[1]), device):
        for start in range(0, x.shape[0], _TEST_BATCH):
            images = binarize(x[start : start + _TEST_BATCH], generator=data_rng).to(device)
            correct += int((model(images) == y[start : start + _TEST_BATCH].to(device)).sum())
    return correct / x.shape[0]


def run(args) -> int:
    device = common.resolve_device(args.device)
    if args.backend is not None and (reason := unavailable_reason(args.backend, device)) is not None:
        raise UsageError(f"--backend {args.backend} cannot run on {device}: {reason}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = {k: getattr(args, k) for k in RUN_KEYS}
    config.update(experiment="bandit", epochs=args.epochs, device=str(device), backend=args.backend,
                  on_nonfinite=args.on_nonfinite)

    with RunDir.start(args.out, "bandit", config, RUN_KEYS, args.resume, _DEFAULTS) as run_dir:
        if run_dir.epoch >= args.epochs:
            print(f"{args.out}: already trained for {run_dir.epoch} epochs (--epochs {args.epochs})")
            return 0
        train_x, train_y, classes = common.load_split(args.dataset, "train", args.data_dir, args.limit_train)
        test_x, test_y, _ = common.load_split(args.dataset, "test", args.data_dir, args.limit_test)
        model, optimizer, baseline, data_rng = _start(args, run_dir, classes, device)
        run_dir.write_config(config)
        try:
            _train(args, config, run_dir, model, optimizer, baseline, data_rng, train_x, train_y, test_x, test_y, device)
        except KeyboardInterrupt:
            raise CommandError("interrupted; resume with --resume", 130) from None
    return 0


def _train(args, config, run_dir, model, optimizer, baseline, data_rng, train_x, train_y, test_x, test_y, device):
    done = run_dir.epoch
    guard = common.Divergence(args.on_nonfinite)
    on_device = common.device_loop(args, device)
    steps = common.DeviceEpoch(_step(model, optimizer, baseline, args), args.cuda_graphs) if on_device else None
    batches = math.ceil(train_x.shape[0] / args.batch_size)
    label = f"{args.estimator}{'+baseline' if args.baseline else ''}, {args.layers} layer(s)"
    with use_backend(args.backend), tqdm(total=args.epochs * batches, initial=done * batches, desc=label,
                                         unit="batch", disable=args.no_progress, mininterval=2.0) as progress:
        for epoch in range(done + 1, args.epochs + 1):
            started = time.perf_counter()
            guard.start_epoch()
            if on_device:
                train_acc, variance, bad = device_epoch(steps, data_rng, train_x, train_y, args, device, progress)
                if bad is not None:
                    raise guard.stopped(NonFinite("loss or gradient"), f"epoch {epoch}, batch {bad}", run_dir.epoch)
            else:
                try:
                    train_acc, variance = train_epoch(model, optimizer, baseline, data_rng, train_x, train_y, args,
                                                      device, guard, progress)
                except NonFinite as problem:
                    raise guard.stopped(problem, f"epoch {epoch}, batch {guard.batch}", run_dir.epoch) from None
            try:
                if guard.skipped == batches:
                    raise NonFinite("loss or gradient")
                common.Divergence.check_state(model.state_dict())
            except NonFinite as problem:
                where = f"every batch of epoch {epoch}" if guard.skipped == batches else f"the end of epoch {epoch}"
                raise guard.stopped(problem, where, run_dir.epoch) from None
            test_acc = evaluate(model, test_x, test_y, device, args.seed, epoch)
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
                "baseline": baseline.state_dict(), "data_rng": data_rng.get_state(), "rng": common.rng_state(),
            })
            progress.set_postfix(train=f"{train_acc:.4f}", test=f"{test_acc:.4f}", logvar=f"{record['log_grad_variance'] or 0:.2f}")
