"""What the training commands share besides their run directory (``rundir.py``): option checks,
the device, the random streams, and the divergence policy."""

from __future__ import annotations

import argparse
import contextlib
import math
import random
from typing import Any, Iterator

import numpy as np
import torch

from .rundir import CommandError, UsageError

ON_NONFINITE = ("stop", "skip")


# ----------------------------------------------------------------------------- options

def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default where its help does not say it already."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if ("default" not in help and default is not None and default is not False and default != argparse.SUPPRESS
                and action.option_strings and action.nargs != 0):
            help += f" (default {action.default})" if help else f"default {action.default}"
        return help


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options every training command has, with the same meaning."""
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads in this process (default: torch's choice; under torchrun one each)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--on-nonfinite", choices=ON_NONFINITE, default="stop",
                   help="a non-finite loss or gradient: stop (keeping the last checkpoint, exit 1; default) or "
                        "skip the batch (counted in the metrics as skipped_batches)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, capture each training step in a CUDA graph and replay it (default on; "
                        "--on-nonfinite skip runs eagerly)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def set_threads(args) -> None:
    """``--threads``: torch's CPU threads in this process."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; else a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ----------------------------------------------------------------------------- random streams

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(*keys: int) -> int:
    """A seed for the stream named by ``keys`` (e.g. (seed, epoch, purpose)), unrelated to the
    streams of other keys: what an evaluation draws never depends on, nor moves, the training stream."""
    entropy = [k % 2**64 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the global torch RNG (and ``device``'s, if CUDA) seeded with ``seed``; after: as before."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- divergence

class NonFinite(Exception):
    """A non-finite loss, gradient or parameter (the message says which)."""


def _sum_is_finite(tensors) -> bool:
    # One reduction over every tensor and one sync: 0.1 ms for the 2-layer VAE (its step ~6 ms),
    # where a per-tensor isfinite().all() takes 1.3 ms. A finite tensor whose sum overflows also
    # fails; the slow search below then says so.
    return math.isfinite(float(torch.stack([t.sum().double() for t in tensors]).sum()))


def _nonfinite_names(named) -> list[str]:
    return [name for name, t in named if not bool(torch.isfinite(t).all())]


class Divergence:
    """The ``--on-nonfinite`` policy of a training loop.

    ``step_ok(model, loss)`` after ``backward`` (batch ``self.batch`` of the epoch): True if the loss and every gradient are finite;
    otherwise ``stop`` raises NonFinite and ``skip`` counts the batch and returns False (the caller
    skips ``optimizer.step``). ``after_step(model)`` raises NonFinite if an update left a parameter
    non-finite (then no skip can help), ``check_state`` does the same for a whole state dict.

    ``world`` (``world.World``, several processes): each step's verdict is agreed on (one all-reduce
    of a flag), so that every rank stops, or skips the batch, together. The gradients and parameters
    are the same on every rank (DDP averages the gradients); a loss is each rank's own.
    """

    def __init__(self, policy: str, world=None):
        if policy not in ON_NONFINITE:
            raise ValueError(f"policy must be one of {ON_NONFINITE}, got {policy!r}")
        self.policy = policy
        self.world = world if world is not None and world.distributed else None
        self.start_epoch()

    def start_epoch(self) -> None:
        """Reset the counts: ``batch`` (steps checked) and ``skipped`` (steps skipped) this epoch."""
        self.batch, self.skipped = 0, 0

    def step_ok(self, model: torch.nn.Module, loss: float | None = None) -> bool:
        self.batch += 1
        problem = None
        if loss is not None and not math.isfinite(loss):
            problem = f"loss ({loss})"
        else:
            named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
            if named and not _sum_is_finite([g for _, g in named]):
                bad = _nonfinite_names(named)
                problem = f"gradient of {', '.join(bad)}" if bad else "gradient (too large to sum)"
        if self.world is not None and self.world.any(problem is not None) and problem is None:
            problem = "loss on another process"
        if problem is None:
            return True
        if self.policy == "stop":
            raise NonFinite(problem)
        self.skipped += 1
        return False

    def after_step(self, model: torch.nn.Module) -> None:
        params = [p for p in model.parameters()]
        if params and not _sum_is_finite([p.detach() for p in params]):
            self.check_state(model.state_dict())

    @staticmethod
    def check_state(state: dict[str, Any]) -> None:
        named = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        bad = _nonfinite_names(named)
        if bad:
            raise NonFinite(f"parameters ({', '.join(bad)})")

    def stopped(self, problem: NonFinite, where: str, saved: int) -> CommandError:
        """The one-line error of a run stopped ``where`` (e.g. "epoch 3, batch 7") with ``saved`` epochs checkpointed."""
        kept = f"the checkpoint of epoch {saved} is kept" if saved else "no epoch was saved"
        hint = "lower --lr, or pass --on-nonfinite skip to skip such batches" if self.policy == "stop" else "lower --lr"
        return CommandError(f"non-finite {problem} at {where}: stopped, {kept} ({hint})")


# ----------------------------------------------------------------------------- data

def add_data_options(p: argparse.ArgumentParser) -> None:
    from ..data import DATASETS

    p.add_argument("--dataset", choices=DATASETS, default="mnist",
                   help="mnist (the package's reader, default), or through torchvision (pip install torchvision): "
                        "fashion-mnist, kmnist, emnist-letters, mnist-torchvision")
    p.add_argument("--data-dir", default=None,
                   help="the data's directory: mnist's IDX files, or a torchvision root for the others "
                        "(default $HNCA_DATA_DIR, else a cache directory, downloaded into if needed)")
    p.add_argument("--limit-train", type=positive_int, default=None, metavar="N", help="use the first N training examples")
    p.add_argument("--limit-test", type=positive_int, default=None, metavar="N", help="use the first N test examples")


def load_split(dataset: str, split: str, root, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Intensities [N, 784], labels [N] of the first ``limit`` examples, and the data set's number
    of classes; or a one-line error."""
    from ..data import DATASET_NAMES, DatasetError, load_dataset

    try:
        x, y, classes = load_dataset(dataset, split, root=root)
    except DatasetError as exc:
        raise CommandError(f"cannot load {DATASET_NAMES[dataset]}: {exc}") from None
    return x[:limit], y[:limit], classes


def load_splits(args, world):
    """``args.dataset``'s training and test splits (``--limit-train``, ``--limit-test``):
    x_train, y_train, x_test, y_test, classes. Under torchrun every rank loads them or all stop."""
    with world.agreement():
        x_train, y_train, classes = load_split(args.dataset, "train", args.data_dir, args.limit_train)
        x_test, y_test, _ = load_split(args.dataset, "test", args.data_dir, args.limit_test)
        world.check_examples(x_train.shape[0])
    return x_train, y_train, x_test, y_test, classes


def already_trained(run, epochs: int, out, world) -> bool:
    """Whether the run in ``out`` holds ``epochs`` epochs already (rank 0 says so)."""
    if run.epoch < epochs:
        return False
    if world.main:
        print(f"{out}: already trained for {run.epoch} epochs (--epochs {epochs})")
    return True


# ----------------------------------------------------------------------------- GPU steps

def device_loop(args, device: torch.device) -> bool:
    """Whether training runs the device loop (``DeviceEpoch``): on a GPU, unless a skipped batch
    needs a decision on the host (``--on-nonfinite skip`` keeps the eager loop)."""
    return device.type == "cuda" and args.on_nonfinite == "stop"


def make_optimizer(params, lr: float, device: torch.device, graphs: bool) -> torch.optim.Optimizer:
    """Adam; on a GPU fused (one kernel for all parameters) and capturable when steps are graphed."""
    if device.type != "cuda":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=graphs)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore ``state`` into ``optimizer``, keeping how this optimizer runs (fused, capturable,
    foreach): a run checkpointed on the CPU resumes on a GPU and back."""
    how = [{k: g.get(k) for k in ("fused", "capturable", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, how):
        group.update(kept)
    for group in optimizer.param_groups:  # a capturable or fused Adam keeps its step count on the device
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                on_device = group.get("capturable") or group.get("fused")
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)


def variance_share(square_sum: torch.Tensor, count: int, share: int, weight, size: int, grads) -> torch.Tensor:
    """This rank's term of the gradient-variance metric of a batch shared among ``size`` ranks; the
    terms of all ranks sum to what one process computes on the whole batch (up to rounding):

        (1/P) [ (1/m) sum_b |g_b|^2 - |mean_b g_b|^2 ],  b over the m examples of all shares,

    g_b being example b's estimate over the metric's P = ``count`` parameters. This rank holds
    ``square_sum`` = sum of |g_b|^2 over its ``share`` examples; 1/m = ``weight`` / (size x share)
    (``World.loss_weight``); the mean estimate is minus the DDP-averaged gradient ``grads``, the same
    on every rank, so each rank subtracts 1/size of its square. A float64 device tensor, no host sync.
    """
    mean_square = torch.stack([g.detach().double().square().sum() for g in grads]).sum()
    return (square_sum * weight / (size * share) - mean_square / size) / count


def finite_flag(loss: torch.Tensor, params) -> torch.Tensor:
    """A device bool: the loss and every gradient are finite (no host synchronisation)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads)).sum() if grads else loss.new_zeros(())
    return torch.isfinite(loss) & torch.isfinite(norms)


class DeviceEpoch:
    """Runs a step ``step(*batch) -> (value, variance, finite)`` of device tensors over an epoch's
    batches without waiting for the GPU: sums stay on the device and the first non-finite batch is
    found after the epoch (the policy "stop": the previous checkpoint is kept). The step runs in a
    CUDA graph (``hnca_kernels.CapturedStep``, after ``warmup`` eager calls) unless ``graphs`` is
    False; its last, smaller batch (if any) runs eagerly."""

    def __init__(self, step, graphs: bool, warmup: int = 3):
        from .. import CapturedStep

        self.step = CapturedStep(step, warmup=warmup, enabled=graphs)

    def run(self, batches, progress=None, eager_from: int | None = None) -> tuple[float, float, int, int | None]:
        """(sum of the values, mean variance, batches, 1-based index of the first non-finite batch or None).

        ``eager_from``: batches from this 0-based index on run eagerly whatever their shape. Under
        torchrun a graph that holds a collective must be replayed by every rank or by none, and a
        rank's share of a smaller last batch may have the shape of the others."""
        total = variance = first_bad = None
        count = 0
        for batch in batches:
            eager = eager_from is not None and count >= eager_from
            value, var, finite = (self.step.step if eager else self.step)(*batch)
            count += 1
            if total is None:
                total, variance = value.double().clone(), var.double().clone()
                first_bad = torch.where(finite, 0, count)
            else:
                total += value
                variance += var
                first_bad = torch.where((first_bad == 0) & ~finite, count, first_bad)
            if progress is not None:
                progress.update(1)
        if total is None:
            return 0.0, math.nan, 0, None
        bad = int(first_bad)
        return float(total), float(variance) / count, count, (bad or None)
