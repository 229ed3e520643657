"""``hnca bandit``: the contextual-bandit MNIST experiment of the paper (Section 1.3, Figure 1).

A network of ±1 Bernoulli layers and a softmax output guesses the class of a dynamically
binarized MNIST digit and gets reward 1 when right, else 0; it is trained by HNCA or REINFORCE
(optionally with a moving-average baseline of earlier batches). Each epoch appends one line to
``metrics.jsonl`` and then writes an atomic checkpoint, from which ``--resume`` continues exactly.

All randomness comes from checkpointed state: a dedicated CPU ``torch.Generator`` draws the data
order and every binarization (train and test), and the global torch RNG (saved by
``save_checkpoint``) draws the network's samples.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import BernoulliLinear, CategoricalLinear, MovingAverageBaseline, StochasticSequential, record, use_backend
from ..backends import BACKENDS, unavailable_reason
from ..data import MNISTError, binarize, load_mnist
from ..record import ESTIMATORS
from . import common

NUM_CLASSES = 10
# Config entries that define the run: a resumed run must match them exactly. The others
# (epochs, device, backend, threads, data directory) may change between sessions.
RUN_KEYS = ("layers", "width", "estimator", "baseline", "lr", "batch_size", "seed", "limit_train", "limit_test")
_TEST_BATCH = 1000


def register(subparsers) -> None:
    p = subparsers.add_parser("bandit", help="contextual-bandit MNIST (paper Figure 1)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, choices=(1, 2, 3), default=1, help="hidden Bernoulli layers (default 1)")
    p.add_argument("--width", type=int, default=200, help="units per hidden layer (default 200)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="hnca")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract a 0.99 moving average of earlier batches' rewards (default on)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="message-pass backend (default: fastest available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, required=True, help="output directory (metrics.jsonl, config.json, checkpoint.pt)")
    p.add_argument("--data-dir", default=None, help="MNIST directory (default $HNCA_DATA_DIR, else download to the cache)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N", help="use the first N training examples")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="use the first N test examples")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    positive = {"--width": args.width, "--epochs": args.epochs, "--batch-size": args.batch_size}
    if args.threads is not None:
        positive["--threads"] = args.threads
    for flag in ("limit_train", "limit_test"):
        if getattr(args, flag) is not None:
            positive["--" + flag.replace("_", "-")] = getattr(args, flag)
    for flag, value in positive.items():
        if value < 1:
            raise SystemExit(f"{flag} must be a positive integer, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(f"--lr must be a positive number, got {args.lr}")


def build_model(layers: int, width: int, in_features: int = 784) -> StochasticSequential:
    """``layers`` hidden layers of ``width`` ±1 Bernoulli units, then a 10-way softmax unit."""
    sizes = [in_features] + [width] * layers
    hidden = [BernoulliLinear(a, b, centered=True) for a, b in zip(sizes, sizes[1:])]
    return StochasticSequential(*hidden, CategoricalLinear(width, NUM_CLASSES))


def _load(split: str, root, limit):
    try:
        x, y = load_mnist(split, root=root)
    except MNISTError as exc:
        raise SystemExit(f"cannot load MNIST: {exc}") from None
    return (x, y) if limit is None else (x[:limit], y[:limit])


def _start(args, config, run_dir: Path, device: torch.device):
    """Model, optimizer, baseline, data generator and first epoch: fresh, or from the checkpoint."""
    has_state = (run_dir / common.CHECKPOINT).exists() or (run_dir / common.METRICS).exists()
    if args.resume:
        saved = run_dir / common.CONFIG
        if not saved.exists():
            raise SystemExit(f"--resume: {run_dir} holds no {common.CONFIG}; nothing to resume")
        old = json.loads(saved.read_text())
        diff = [f"{k}: {old.get(k)!r} in the run, {config[k]!r} now" for k in RUN_KEYS if old.get(k) != config[k]]
        if diff:
            raise SystemExit("--resume with a different configuration:\n  " + "\n  ".join(diff))
    elif has_state:
        raise SystemExit(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")

    common.seed_everything(args.seed)
    model = build_model(args.layers, args.width).to(device)  # before the optimizer: its state follows the params
    baseline = MovingAverageBaseline(0.99).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data_rng = torch.Generator().manual_seed(args.seed)
    done = 0
    # A run that died before its first checkpoint restarts from scratch (its stale lines are dropped).
    if args.resume and (run_dir / common.CHECKPOINT).exists():
        state = common.load_checkpoint(run_dir)  # restores the global RNG too; tensors load on the CPU and are copied to the device
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        baseline.load_state_dict(state["baseline"])
        data_rng.set_state(state["data_rng"])
        done = state["epoch"]
    return model, optimizer, baseline, data_rng, done


def train_epoch(model, optimizer, baseline, data_rng, x, y, args, device, progress=None):
    """One pass over (x, y) in a fresh order with fresh binarization: (mean reward, mean gradient variance)."""
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
        optimizer.step()
        reward_sum += reward.sum()
        variance_sum += rec.gradient_variance()
        batches += 1
        if progress is not None:
            progress.update(1)
    return float(reward_sum) / n, variance_sum / batches


@torch.no_grad()
def evaluate(model, data_rng, x, y, device) -> float:
    """Accuracy of sampled actions on a freshly binarized copy of (x, y)."""
    correct = 0
    for start in range(0, x.shape[0], _TEST_BATCH):
        images = binarize(x[start : start + _TEST_BATCH], generator=data_rng).to(device)
        correct += int((model(images) == y[start : start + _TEST_BATCH].to(device)).sum())
    return correct / x.shape[0]


def run(args) -> int:
    _check_args(args)
    device = common.resolve_device(args.device)
    if args.backend is not None and (reason := unavailable_reason(args.backend, device)) is not None:
        raise SystemExit(f"--backend {args.backend} cannot run on {device}: {reason}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = {k: getattr(args, k) for k in RUN_KEYS}
    config.update(experiment="bandit", epochs=args.epochs, device=str(device), backend=args.backend)

    run_dir = args.out
    run_dir.mkdir(parents=True, exist_ok=True)
    model, optimizer, baseline, data_rng, done = _start(args, config, run_dir, device)
    if done >= args.epochs:
        print(f"{run_dir}: already trained for {done} epochs (--epochs {args.epochs})")
        return 0
    train_x, train_y = _load("train", args.data_dir, args.limit_train)
    test_x, test_y = _load("test", args.data_dir, args.limit_test)
    common.write_config(run_dir, config)

    batches = math.ceil(train_x.shape[0] / args.batch_size)
    label = f"{args.estimator}{'+baseline' if args.baseline else ''}, {args.layers} layer(s)"
    with use_backend(args.backend), tqdm(total=args.epochs * batches, initial=done * batches, desc=label,
                                         unit="batch", disable=args.no_progress, mininterval=2.0) as progress:
        for epoch in range(done + 1, args.epochs + 1):
            started = time.perf_counter()
            train_acc, variance = train_epoch(model, optimizer, baseline, data_rng, train_x, train_y, args, device, progress)
            test_acc = evaluate(model, data_rng, test_x, test_y, device)
            record = {
                "epoch": epoch,
                "train_accuracy": train_acc,
                "test_accuracy": test_acc,
                "grad_variance": variance,
                "log_grad_variance": math.log(variance) if variance > 0 else None,
                "seconds": time.perf_counter() - started,
            }
            # Metrics first, then the checkpoint: a crash in between makes --resume redo this
            # epoch and drop its stale line, never lose one.
            common.append_metrics(run_dir, record, keep_epochs_below=epoch)
            common.save_checkpoint(run_dir, {
                "epoch": epoch, "config": config, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "baseline": baseline.state_dict(),
                "data_rng": data_rng.get_state(),
            })
            progress.set_postfix(train=f"{train_acc:.4f}", test=f"{test_acc:.4f}", logvar=f"{record['log_grad_variance'] or 0:.2f}")
    return 0
