"""MovingAverageBaseline: a running mean of earlier batches' learning signal, the same on every rank.

Under torch.distributed each rank sees its own shard of the batch; a baseline that averaged only its
own rank's rewards would drift apart between ranks (and differ from the one-process run on the
union of the shards). So whenever a default process group is initialised with more than one rank,
the mean folded in is the global one: one all-reduce of (sum, count) per call, on the signal's
device. ``update_baselines`` folds several baselines in with one all-reduce (the VAE's per-layer
baselines use it: one all-reduce per step).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import validation

__all__ = ["MovingAverageBaseline", "CallBaselines", "update_baselines"]


class MovingAverageBaseline(nn.Module):
    """Exponential moving average of the mean learning signal of earlier batches.

    Calling it returns the baseline from the batches seen so far and then folds in the
    current one, so the value subtracted never depends on the current batch and every
    estimator stays unbiased. Its state is a buffer: it follows ``.to(device)`` and is saved
    in ``state_dict``.

    Under torch.distributed (a default process group with more than one rank) the mean folded in
    is that of the signals of all ranks together: one all-reduce of (sum, count) per call, so the
    baseline stays identical on every rank and equals the one-process baseline fed the union of
    the ranks' batches (whatever their sizes). Every rank must then call it the same number of
    times, like any collective.

    Args:
        decay: weight of the past, in [0, 1).
        initial: the value before the first batch.
        sync: ``False`` keeps the mean of this rank's own signal (no communication).
        process_group: the group to average over (default: the default group). It is held by
            reference: not in ``state_dict``, shared by a deepcopy, and a baseline holding one
            cannot be pickled (save its ``state_dict``).

    >>> baseline = MovingAverageBaseline(0.99)
    >>> loss = rec.surrogate_loss(reward, baseline=baseline(reward))
    """

    sync = True    # class defaults: modules pickled before these attributes existed still load
    _group = None

    def __init__(self, decay: float = 0.99, initial: float = 0.0, *, sync: bool = True, process_group=None):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.sync = bool(sync)
        self._group = _GroupHandle(process_group) if process_group is not None else None
        self.register_buffer("value", torch.tensor(float(initial), dtype=torch.float64))

    @property
    def process_group(self):
        return None if self._group is None else self._group.group

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        current = self.value.clone()
        self.update(signal)
        return current

    def update(self, signal: torch.Tensor) -> None:
        """Fold the mean of ``signal`` (over all ranks when syncing) into the value."""
        update_baselines([(self, signal)])

    def _sync_group(self):
        """The process group to average over, or None when this baseline does not communicate."""
        if not (self.sync and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def extra_repr(self) -> str:
        return f"decay={self.decay}" + ("" if self.sync else ", sync=False")


class CallBaselines(nn.ModuleList):
    """One ``MovingAverageBaseline`` per sampled call of a model, in call order: the baselines of
    ``Record.elbo_loss`` (each call's learning signal, folded in after the step with one all-reduce
    under torch.distributed). A module: it follows ``.to``, is saved in ``state_dict`` and belongs
    with the model whose calls it serves.

    >>> baselines = hnca_kernels.CallBaselines(2)        # a VAE whose encoder samples twice
    >>> loss = rec.elbo_loss(baseline=baselines)
    """

    def __init__(self, calls: int, decay: float = 0.99):
        if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
            raise ValueError(f"calls must be a positive int, got {calls!r}")
        super().__init__(MovingAverageBaseline(decay) for _ in range(calls))


@torch.no_grad()
def update_baselines(pairs: Sequence[tuple[MovingAverageBaseline, torch.Tensor]]) -> None:
    """Fold each ``signal``'s mean into its baseline, as ``baseline.update(signal)`` for each pair,
    with one all-reduce per process group (and device) for all the baselines that sync.

    >>> update_baselines([(b0, s0), (b1, s1)])   # one all-reduce of a [2, 2] tensor
    """
    means: list = [None] * len(pairs)
    pending: dict = {}
    for i, (baseline, signal) in enumerate(pairs):
        if not isinstance(signal, torch.Tensor):
            raise TypeError(f"the learning signal must be a tensor, got {type(signal).__name__}")
        group = baseline._sync_group()
        if group is None:
            if signal.numel():  # an empty signal says nothing: the baseline keeps its value
                means[i] = signal.detach().to(baseline.value).mean()
        else:
            pending.setdefault((id(group), signal.device), (group, []))[1].append(i)
    for (_, device), (group, indices) in pending.items():
        # per baseline: (sum, count) of its signal in float64, on the signals' device (NCCL needs CUDA)
        stats = torch.stack([torch.stack([pairs[i][1].detach().sum(dtype=torch.float64),
                                          torch.full((), pairs[i][1].numel(), dtype=torch.float64, device=device)])
                             for i in indices])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        for i, (total, count) in zip(indices, stats):
            # no example on any rank: the mean of nothing leaves the value (a 0/0 here would be NaN)
            means[i] = torch.where(count > 0, total / count.clamp_min(1), pairs[i][0].value.to(total))
    # A non-finite signal has a non-finite mean: checked for all before any baseline changes.
    for mean in means:
        if mean is not None:
            validation.require(mean.device, lambda m=mean: torch.isfinite(m), ValueError(
                "the learning signal holds non-finite values (nan or inf); the baselines are left unchanged"))
    for (baseline, _), mean in zip(pairs, means):
        if mean is not None:
            baseline.value.mul_(baseline.decay).add_((1.0 - baseline.decay) * mean.to(baseline.value))


class _GroupHandle:
    """Holds a process group on a module: a deepcopy shares it; pickling says why it cannot."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("a MovingAverageBaseline with a process_group cannot be pickled (a process group is a "
                        "handle of this process): save its state_dict() instead")
