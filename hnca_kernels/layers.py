"""Stochastic linear layers: Bernoulli units and a softmax (categorical) unit.

Each layer computes logits like ``nn.Linear`` and samples from them. Besides ``forward`` it
exposes the pieces the estimators need: ``logits``, ``sample``, ``score`` (the gradient of
log pi(sample) with respect to the logits, for REINFORCE) and ``parent_log_ratio`` (the
counterfactual message the layer sends to its binary parents, for HNCA).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional
from .backends import get_backend


def _check_input(layer: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} expects a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != layer.in_features:
        raise ValueError(
            f"{type(layer).__name__}({layer.in_features}, ...) expects input of shape [..., {layer.in_features}], "
            f"got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{type(layer).__name__} expects a floating input, got {x.dtype}")
    if x.device != layer.weight.device:
        raise ValueError(f"input is on {x.device} but {type(layer).__name__}'s weight is on {layer.weight.device}")


class _StochasticLinear(nn.Module):
    def __init__(self, in_features, out_features, bias, device, dtype):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper's initialisation: Glorot-uniform weights, zero bias.
        bound = math.sqrt(6.0 / (self.in_features + self.out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        return F.linear(x, self.weight, self.bias)

    def logits_and_sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (with autograd history) and a sample drawn from them."""
        logits = self.logits(x)
        return logits, self.sample(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_sample(x)[1]

    def _message_weight(self, logits: torch.Tensor) -> torch.Tensor:
        # Under autocast the logits can be in a lower precision than the weight.
        return self.weight.detach().to(logits.dtype)


class BernoulliLinear(_StochasticLinear):
    """A layer of Bernoulli units firing with probability sigmoid(x @ weight.T + bias).

    ``forward(x)`` returns a float sample [..., out] with values in {0, 1}, or {-1, +1} when
    ``centered=True``. Gradients do not flow through the sample: train it with an estimator
    (``StochasticSequential.surrogate_loss``).

    >>> layer = BernoulliLinear(784, 200, centered=True)
    >>> h = layer(x)  # [B, 200] of -1.0 / +1.0
    """

    def __init__(self, in_features, out_features, bias=True, centered=False, device=None, dtype=None):
        self.centered = centered
        super().__init__(in_features, out_features, bias, device, dtype)

    @property
    def values(self) -> tuple[float, float]:
        """(lo, hi): the unit's value when silent and when firing."""
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    def logits_and_sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and a sample; one fused kernel when the backend offers it (triton).

        The backend is ``use_backend``'s default, else the fastest for ``x``'s device. Under
        autocast, or for inputs whose dtype differs from the weight's, the unfused path runs.
        """
        _check_input(self, x)
        fused = getattr(get_backend(None, x.device), "bernoulli_linear", None)
        if fused is None or x.dtype != self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().logits_and_sample(x)
        logits, sample = fused(x.reshape(-1, self.in_features), self.weight, self.bias, *self.values)
        shape = (*x.shape[:-1], self.out_features)
        return logits.view(shape), sample.view(shape)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        lo, hi = self.values
        with torch.no_grad():
            # u < p written into u's own memory as 1.0 / 0.0 (the same draws and comparisons)
            # NOTE: at 50 x 200, `u < p` and the bool -> float cast took 17 + 18 us, lt_ 3 us.
            fired = torch.rand_like(logits, dtype=torch.float32).lt_(torch.sigmoid(logits.float()))
            fired = fired.to(self.weight.dtype)
            if (lo, hi) == (0.0, 1.0):
                return fired
            # lo + (hi - lo) * fired: exact for both codings, cheaper than torch.where on scalars
            return fired.mul_(hi - lo).add_(lo)

    def score(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """d log pi(sample) / d logits = [sample fired] - sigmoid(logits)."""
        return (sample > 0).to(logits.dtype) - torch.sigmoid(logits)

    def log_prob(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """log pi(sample | parents), summed over the units: [...]."""
        return F.logsigmoid(torch.where(sample > 0, logits, -logits)).sum(-1)

    def parent_log_ratio(self, x, logits, sample, parent_values, backend=None) -> torch.Tensor:
        """The message to the parents ``x`` (see ``functional.counterfactual_log_ratio``)."""
        return functional.counterfactual_log_ratio(
            x.to(logits.dtype), self._message_weight(logits), logits, sample,
            parent_values=parent_values, backend=backend,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, centered={self.centered}")


class CategoricalLinear(_StochasticLinear):
    """A softmax unit over ``num_classes`` choices with logits x @ weight.T + bias.

    ``forward(x)`` returns the sampled class indices, a LongTensor [...].
    """

    def __init__(self, in_features, num_classes, bias=True, device=None, dtype=None):
        super().__init__(in_features, num_classes, bias, device, dtype)

    @property
    def num_classes(self) -> int:
        return self.out_features

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            flat = probs.reshape(-1, self.num_classes)
            return torch.multinomial(flat, 1).view(probs.shape[:-1])

    def score(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """d log pi(sample) / d logits = onehot(sample) - softmax(logits)."""
        return F.one_hot(sample, self.num_classes).to(logits.dtype) - torch.softmax(logits, dim=-1)

    def log_prob(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1).gather(-1, sample.unsqueeze(-1)).squeeze(-1)

    def parent_log_ratio(self, x, logits, sample, parent_values, backend=None) -> torch.Tensor:
        """The message to the parents ``x`` (see ``functional.categorical_counterfactual_log_ratio``)."""
        return functional.categorical_counterfactual_log_ratio(
            x.to(logits.dtype), self._message_weight(logits), logits, sample,
            parent_values=parent_values, backend=backend,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"
