"""Helpers for training on several processes (torchrun, DistributedDataParallel).

The estimators need nothing else: the record works inside DDP's forward, and
``MovingAverageBaseline`` averages over all ranks by itself. What each rank must still choose is
its random stream: the same ``torch.manual_seed`` on every rank draws the same samples on every
rank (the ranks would then average identical estimates, no better than one). ``seed`` gives each
rank its own stream from one seed.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

if dist.is_available():
    # torch.distributed.nn.functional binds `group=group.WORLD` as its collectives' default
    # argument when it is first imported. DDP's first construction imports it (through
    # torch._dynamo); after init_process_group that default keeps the gloo group alive past
    # destroy_process_group, and its threads then abort the process as the interpreter exits
    # ("terminate called without an active exception"). Imported here, before a process group
    # exists, the default is None and destroy_process_group releases the group.
    import torch.distributed.nn.functional  # noqa: F401

__all__ = ["seed", "rank_seed", "current_rank"]


def current_rank() -> int:
    """This process's global rank: the default process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s stream: ``seed`` itself for rank 0, and for the others a 64-bit seed
    mixed from (seed, rank) by ``numpy.random.SeedSequence`` (distinct and well spread, not
    ``seed + rank``, which would make rank 1 of seed 0 replay rank 0 of seed 1)."""
    for name, value in (("seed", seed), ("rank", rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if rank == 0:
        return seed
    words = np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32


def seed(seed: int, rank: int | None = None) -> int:
    """Seed torch (CPU and every CUDA device), numpy and ``random`` with this rank's own stream,
    derived from (seed, rank) by ``rank_seed``; return the rank.

    Rank 0, and so a run of one process, is seeded exactly like ``torch.manual_seed(seed)``,
    ``numpy.random.seed(seed)`` and ``random.seed(seed)``: one-process results stay reproducible.
    Rerunning with the same seed and world gives every rank the same stream again.

    Args:
        seed: a non-negative int, the same on every rank.
        rank: default ``current_rank()``: the default process group's rank, else the ``RANK``
            torchrun sets (so it can be called before ``init_process_group``), else 0.

    What differs across ranks: every draw from the global generators (the layers' samples,
    dropout). What must stay equal: the parameters at initialisation. A model built after
    ``seed`` starts differently on each rank; ``DistributedDataParallel`` broadcasts rank 0's
    parameters and buffers when it wraps the model, so under DDP that is harmless. Without DDP,
    build the model before calling ``seed`` (after a common ``torch.manual_seed``) or broadcast
    it. Data shuffling that must agree across ranks (``DistributedSampler``) has its own seed.

    >>> rank = hnca_kernels.distributed.seed(0)    # on every rank, before drawing anything
    """
    rank = current_rank() if rank is None else rank
    value = rank_seed(seed, rank)
    torch.manual_seed(value)  # also every CUDA device
    np.random.seed(value % 2**32)
    random.seed(value)
    return rank
