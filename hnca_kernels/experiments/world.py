"""The processes of one ``hnca vae`` / ``hnca bandit`` run: one, or several under ``torchrun``.

Under torchrun (``WORLD_SIZE`` > 1) every rank joins one process group (NCCL on ``cuda:LOCAL_RANK``,
gloo on the CPU) and:

- draws the same epoch order and binarization (the data generator has the run's seed on every
  rank) and trains on its own contiguous share of every update's batch; ``--batch-size`` is the
  batch of one update over all ranks, so a run makes the same updates whatever the world size;
- draws the network's samples from its own stream (``hnca_kernels.distributed.seed``: rank 0's is
  the one-process stream);
- gets the gradient of the mean over the whole batch (DDP averages the ranks' gradients, each
  rank's loss weighted by its share when the shares differ) and the same synced baselines.

Rank 0 alone opens the run directory (lock, config.json, metrics.jsonl, checkpoint.pt), prints and
shows progress; the others follow what it broadcasts. A failure that one rank meets alone (the
run directory, the data, a write) is agreed on: every rank stops with a one-line error instead of
waiting forever in the next collective. With one process nothing here communicates and the
commands run exactly as before.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .. import distributed as hnca_distributed
from . import common
from .rundir import CommandError, RunDir, UsageError, one_line

# A collective that waits this long means another rank died or hangs (torchrun then stops the
# others anyway); loaded machines and the first NCCL calls are slow, so it is generous.
_TIMEOUT = datetime.timedelta(minutes=30)

class World:
    """This process's place among the run's processes; ``World()`` is a run of one process."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device if device is not None else torch.device("cpu")
        self._owns_group = False

    # -- starting -------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def start(cls, device_name: str) -> Iterator["World"]:
        """The world torchrun describes in the environment (one process without it), with its
        device resolved from ``--device``; the process group is created here and destroyed after."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            yield cls(device=common.resolve_device(device_name))
            return
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        world = cls(rank, size, local_rank, _rank_device(device_name, local_rank))
        if world.device.type == "cuda":
            torch.cuda.set_device(world.device)
        if not dist.is_initialized():
            backend = "nccl" if world.device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend, timeout=_TIMEOUT,
                                        device_id=world.device if world.device.type == "cuda" else None)
            except (RuntimeError, ValueError) as exc:
                raise CommandError(f"cannot join the {size} processes of torchrun ({one_line(exc)})") from None
            world._owns_group = True
        elif dist.get_world_size() != size or dist.get_rank() != rank:
            raise CommandError("the process group does not match torchrun's RANK and WORLD_SIZE")
        try:
            yield world
        finally:
            if world._owns_group:
                dist.destroy_process_group()

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def graph_warmup(self) -> int:
        """Eager steps before a CUDA graph capture: DDP needs 11 (PyTorch's CUDA graph notes)."""
        return 11 if self.distributed else 3

    def check_options(self, args) -> None:
        """The options a run of several processes cannot take (a UsageError)."""
        if not self.distributed:
            return
        if args.batch_size < self.size:
            raise UsageError(f"--batch-size {args.batch_size} is the batch of one update over all processes: it needs "
                             f"at least one example for each of the {self.size}")
        if args.seed < 0:
            raise UsageError(f"--seed {args.seed}: under torchrun the seed must be >= 0 (each process's stream is "
                             "derived from it)")

    def check_examples(self, n: int) -> None:
        if n < self.size:
            raise CommandError(f"{n} training example(s) cannot be shared among {self.size} processes")

    def wrap(self, module: torch.nn.Module, graphs: bool = False) -> torch.nn.Module:
        """``module`` in DistributedDataParallel, which broadcasts rank 0's parameters and buffers.

        Buffers are not broadcast again at every forward: the only ones (the baselines) are synced
        by their own all-reduce. For CUDA graphs DDP is built on a side stream (PyTorch's notes on
        capturing DDP's backward)."""
        from torch.nn.parallel import DistributedDataParallel

        # torch >= 2.12 renamed the option (the old name warns); both sync the buffers at init only
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel.__init__).parameters else "broadcast_buffers"
        kwargs = {sync: False}
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        if graphs and self.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                wrapped = DistributedDataParallel(module, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            return wrapped
        return DistributedDataParallel(module, **kwargs)

    def seed(self, seed: int) -> None:
        """Seed torch, numpy and random: with ``seed`` for one process (as always); under torchrun
        each rank its own stream, rank 0's the one-process one (``hnca_kernels.distributed.seed``)."""
        if not self.distributed:
            common.seed_everything(seed)
        else:
            hnca_distributed.seed(seed, self.rank)

    def stream_keys(self) -> tuple[int, ...]:
        """What to add to ``common.derived_seed``'s keys for a stream of this rank's own: nothing
        on rank 0 (a one-process run keeps its streams), the rank on the others."""
        return (self.rank,) if self.rank else ()

    # -- sharing a batch --------------------------------------------------------------------
    def shard(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of ``count`` examples (shares differ by
        at most one, the larger ones first, as ``torch.tensor_split``)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def loss_weight(self, count: int) -> float:
        """The factor of this rank's mean loss over its share of a batch of ``count`` examples so
        that DDP's average of the ranks' gradients is the gradient of the mean over all ``count``:
        size x share / count (1 when the shares are equal)."""
        start, stop = self.shard(count)
        return self.size * (stop - start) / count

    def batches(self, n: int, batch_size: int) -> list[tuple[int, int, int]]:
        """The updates of an epoch of ``n`` examples: (batch start, this rank's start, stop) in the
        epoch's order. A last batch smaller than the world (a rank would get no example) is dropped."""
        out = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            if count < self.size:
                break
            lo, hi = self.shard(count)
            out.append((start, start + lo, start + hi))
        return out

    # -- collectives (nothing to do for one process) -----------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def first(self, index: int | None) -> int | None:
        """The smallest of the ranks' ``index`` (None: none on that rank)."""
        if not self.distributed:
            return index
        t = torch.tensor([float("inf") if index is None else float(index)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return None if t.item() == float("inf") else int(t.item())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        if not self.distributed:
            return [value]
        out = [None] * self.size if self.main else None
        dist.gather_object(value, out, dst=0)
        return out

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run the block on every rank, then agree: if it failed on any rank, every rank stops (the
        failing rank with its own error, the others with a one-line CommandError naming it)."""
        if not self.distributed:
            yield
            return
        failure = None
        try:
            yield
        except KeyboardInterrupt:
            raise
        except CommandError as exc:
            failure = (one_line(exc), exc.status, exc)
        except Exception as exc:  # a bug: the others stop, this rank keeps its traceback
            failure = (f"{type(exc).__name__}: {one_line(exc)}", 1, exc)
        outcomes = [None] * self.size
        dist.all_gather_object(outcomes, None if failure is None else failure[:2])
        if failure is not None:
            raise failure[2]
        for rank, outcome in enumerate(outcomes):
            if outcome is not None:
                raise CommandError(f"stopped: rank {rank} failed ({outcome[0]})", outcome[1])


def _rank_device(name: str, local_rank: int) -> torch.device:
    """Under torchrun: ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (CPU without CUDA for ``auto``)."""
    if name in ("auto", "cuda"):
        device = common.resolve_device(name)
        if device.type == "cpu":
            return device
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: local rank {local_rank} has no GPU (this machine has "
                             f"{torch.cuda.device_count()}); start at most that many processes per node")
        return torch.device("cuda", local_rank)
    device = common.resolve_device(name)
    if device.type == "cuda":
        raise UsageError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                         "(or auto)")
    return device


class SharedRun:
    """The run directory as every rank sees it: rank 0 holds the ``RunDir`` (lock, files); its
    epoch and checkpoint are broadcast to the others, and every write is agreed on."""

    def __init__(self, world: World, run: RunDir | None, epoch: int, checkpoint: dict | None):
        self.world, self.run, self.epoch, self.checkpoint = world, run, epoch, checkpoint

    @classmethod
    @contextlib.contextmanager
    def start(cls, world: World, *args, **kwargs) -> Iterator["SharedRun"]:
        """``RunDir.start(*args, **kwargs)`` on rank 0; on every rank the checkpoint to resume from,
        which must come from a run of as many processes."""
        run = None
        try:
            with world.agreement():
                if world.main:
                    run = RunDir.start(*args, **kwargs)
                    saved = run.checkpoint.get("world_size", 1) if run.checkpoint is not None else world.size
                    if saved != world.size:
                        raise CommandError(
                            f"--resume: the checkpoint in {run.path} was written by {saved} process(es) and this run "
                            f"has {world.size}; resume it with as many (torchrun --nproc-per-node ...): each "
                            "process's random stream is in the checkpoint")
            epoch, checkpoint = world.broadcast((run.epoch, run.checkpoint) if world.main else None)
            shared = cls(world, run, epoch, checkpoint)
            yield shared
        except BaseException:
            if run is not None:
                run.close(failed=True)
            raise
        if run is not None:
            run.close()

    @property
    def path(self):
        return self.run.path if self.run is not None else None

    @property
    def metrics(self) -> list[dict]:
        return self.run.metrics if self.run is not None else []

    def rng_state(self) -> dict:
        """This rank's saved random streams (torch, numpy, random)."""
        if self.world.distributed:
            return self.checkpoint["rank_rng"][self.world.rank]
        return self.checkpoint["rng"]

    def write_config(self, config: dict) -> None:
        with self.world.agreement():
            if self.run is not None:
                self.run.write_config(config)

    def finish_epoch(self, record: dict, state: dict) -> None:
        """``RunDir.finish_epoch`` on rank 0 with ``state``, its ``rng`` this rank's streams; under
        torchrun the checkpoint also holds every rank's (``rank_rng``) and ``world_size``."""
        streams = self.world.gather(common.rng_state())
        with self.world.agreement():
            if self.run is not None:
                if self.world.distributed:
                    state = dict(state, rank_rng=streams, world_size=self.world.size)
                self.run.finish_epoch(record, dict(state, rng=streams[0]))
        self.epoch = record["epoch"]
