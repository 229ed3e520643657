"""StochasticSequential: ``nn.Sequential`` for chains of stochastic layers.

It is an ordinary module: record its forward like any other and train it from the record,

    with hnca_kernels.record() as rec:
        action = net(x)
    rec.surrogate_loss(reward, baseline=b).backward()

``net.surrogate_loss(reward)`` (the API before ``record``) still works and is deprecated: it uses
the samples of the net's last forward, kept outside the module, and raises when the net ran more
than once since (it could not tell which forward a reward belongs to).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn

from .layers import BernoulliLinear, CategoricalLinear
from .record import Record, active_records

_STOCHASTIC = (BernoulliLinear, CategoricalLinear)

# Deprecated surrogate_loss: per net, [forwards since its last surrogate_loss, that forward's
# record or why there is none]. Outside the module, so deepcopy and pickling never see a batch.
_LAST_FORWARD: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class StochasticSequential(nn.Sequential):
    """Like ``nn.Sequential``; its stochastic layers (``BernoulliLinear``, ``CategoricalLinear``) may
    follow ordinary modules (a trunk trained by backprop through the logits) and each other.

    Checked whenever the sequence changes: it holds a stochastic layer, each stochastic layer that
    follows another takes that one's width, and only a one-hot ``CategoricalLinear`` feeds a
    following stochastic layer.

    >>> net = StochasticSequential(BernoulliLinear(784, 200, centered=True), CategoricalLinear(200, 10))
    >>> with hnca_kernels.record() as rec:
    ...     action = net(x)
    >>> rec.surrogate_loss((action == label).float()).backward()
    """

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self._validate()

    def _validate(self) -> None:
        modules = list(self)
        if not any(isinstance(m, _STOCHASTIC) for m in modules):
            raise ValueError("StochasticSequential needs at least one BernoulliLinear or CategoricalLinear")
        for position, (parent, child) in enumerate(zip(modules, modules[1:]), start=1):
            if not (isinstance(parent, _STOCHASTIC) and isinstance(child, _STOCHASTIC)):
                continue
            if isinstance(parent, CategoricalLinear) and not parent.one_hot:
                raise ValueError(f"module {position - 1} is a CategoricalLinear that returns class indices, so module "
                                 f"{position} cannot take its sample: use CategoricalLinear(..., one_hot=True)")
            if child.in_features != parent.out_features:
                raise ValueError(f"module {position} expects {child.in_features} inputs but module {position - 1} "
                                 f"has {parent.out_features} units")

    def _changed(self, undo) -> None:
        try:
            self._validate()
        except ValueError:
            undo()
            raise

    # every way of changing the sequence is checked (and undone when it breaks the chain)
    def append(self, module):
        before = list(self)
        super().append(module)
        self._changed(lambda: self._restore(before))
        return self

    def insert(self, index, module):
        before = list(self)
        super().insert(index, module)
        self._changed(lambda: self._restore(before))
        return self

    def extend(self, modules):
        before = list(self)
        super().extend(modules)
        self._changed(lambda: self._restore(before))
        return self

    def __setitem__(self, idx, module):
        before = list(self)
        super().__setitem__(idx, module)
        self._changed(lambda: self._restore(before))

    def __delitem__(self, idx):
        before = list(self)
        super().__delitem__(idx)
        self._changed(lambda: self._restore(before))

    def pop(self, key):
        before = list(self)
        module = super().pop(key)
        self._changed(lambda: self._restore(before))
        return module

    def __iadd__(self, other):
        return self.extend(list(other))

    def _restore(self, modules) -> None:
        for key in list(self._modules):
            del self._modules[key]
        for i, m in enumerate(modules):
            self._modules[str(i)] = m

    @property
    def stochastic_layers(self) -> list[nn.Module]:
        return [m for m in self if isinstance(m, _STOCHASTIC)]

    def forward(self, x: torch.Tensor, samples: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run the chain (sampling every stochastic layer) and return the last module's output.

        ``samples``, one tensor per stochastic layer, replaces the draws (to replay a run, or to
        enumerate configurations in tests).
        """
        if samples is not None and len(samples) != len(self.stochastic_layers):
            raise ValueError(f"samples must hold one tensor per stochastic layer ({len(self.stochastic_layers)}), "
                             f"got {len(samples)}")
        outer = active_records()
        if torch.compiler.is_compiling():
            if samples is None:
                return self._chain(x)
            with Record(replay=samples):
                return self._chain(x)
        if outer or not torch.is_grad_enabled():
            # recorded by the caller (or not trainable): the deprecated surrogate_loss has nothing
            reason = "it ran inside the caller's own record(): use that record's surrogate_loss" if outer else \
                "it ran with gradients disabled (torch.no_grad); run it with grad enabled"
            self._remember(reason)
            if samples is None:
                return self._chain(x)
            with Record(replay=samples):
                return self._chain(x)
        with Record(replay=samples) as rec:
            out = self._chain(x)
        self._remember(rec)
        return out

    def _chain(self, x):
        for module in self:
            x = module(x)
        return x

    def _remember(self, rec_or_reason) -> None:
        state = _LAST_FORWARD.setdefault(self, [0, None])
        state[0] += 1
        state[1] = rec_or_reason

    def surrogate_loss(self, reward: torch.Tensor, estimator: str = "hnca", baseline=0.0, backend: str | None = None):
        """Deprecated: ``Record.surrogate_loss`` of the net's last forward (see ``hnca_kernels.record``).

        Raises if the net ran more than once since its last ``surrogate_loss``: the reward could
        belong to either forward (record each forward with ``hnca_kernels.record()`` instead).
        """
        warnings.warn("StochasticSequential.surrogate_loss is deprecated: record the forward with "
                      "`with hnca_kernels.record() as rec: action = net(x)` and call rec.surrogate_loss(...)",
                      DeprecationWarning, stacklevel=2)
        count, last = _LAST_FORWARD.get(self, (0, None))
        if count == 0:
            raise RuntimeError("surrogate_loss needs the samples of a forward pass: call the model on a batch first")
        if count > 1:
            raise RuntimeError(f"the net ran {count} times since its last surrogate_loss, so the reward could belong "
                               "to any of those forwards: record each one with `with hnca_kernels.record() as rec:` "
                               "and call rec.surrogate_loss(reward) on its own record")
        if not isinstance(last, Record):
            raise RuntimeError(f"surrogate_loss cannot use the last forward: {last}")
        _LAST_FORWARD[self] = [0, last]
        return last.surrogate_loss(reward, estimator=estimator, baseline=baseline, backend=backend)

    def gradient_variance(self) -> float:
        """Deprecated: ``Record.gradient_variance`` of the last ``surrogate_loss``."""
        warnings.warn("StochasticSequential.gradient_variance is deprecated: use Record.gradient_variance()",
                      DeprecationWarning, stacklevel=2)
        last = _LAST_FORWARD.get(self, (0, None))[1]
        if not isinstance(last, Record):
            raise RuntimeError("gradient_variance needs a surrogate_loss call first")
        return last.gradient_variance()
