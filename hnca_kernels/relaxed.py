"""Straight-through estimators: the biased ones most users of discrete latents reach for.

A straight-through sample is an exact draw from the categorical distribution softmax(logits) whose
gradient is a relaxed one, so an objective computed from it backpropagates into the logits like a
deterministic network. Two are offered, each from the library that defines it:

    "gumbel_st"  straight-through Gumbel-softmax (Jang et al. 2017): ``torch.nn.functional.gumbel_softmax``
                 with ``hard=True``; the gradient is that of softmax((logits + g) / tau).
    "reinmax"    ReinMax (Liu et al. 2023), the authors' ``reinmax`` package (``pip install
                 "hnca-kernels[compare]"``): a second-order correction of straight-through.

Both are biased: the expected gradient differs from the true one (the tests report by how much on
a small VAE). Bernoulli units are two-class variables with logits (l, 0): softmax gives the firing
probability sigmoid(l), and the relaxation is that of a two-class Gumbel-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BIASED_ESTIMATORS = ("gumbel_st", "reinmax")

__all__ = ["BIASED_ESTIMATORS", "straight_through", "straight_through_bernoulli", "reinmax_available"]

_REINMAX_MISSING = ("the 'reinmax' estimator needs the reinmax package (the authors' implementation): "
                    "pip install \"hnca-kernels[compare]\"")


def reinmax_available() -> bool:
    try:
        import reinmax  # noqa: F401
    except ImportError:
        return False
    return True


def _reinmax():
    try:
        from reinmax import reinmax
    except ImportError:
        raise ModuleNotFoundError(_REINMAX_MISSING) from None
    return reinmax


def _check(estimator: str, tau: float) -> None:
    if estimator not in BIASED_ESTIMATORS:
        raise ValueError(f"unknown straight-through estimator {estimator!r}; choose one of "
                         f"{', '.join(BIASED_ESTIMATORS)}")
    if not (isinstance(tau, (int, float)) and tau > 0 and tau != float("inf")):
        raise ValueError(f"tau (the temperature) must be a positive finite number, got {tau!r}")


def straight_through(logits: torch.Tensor, estimator: str, tau: float = 1.0) -> torch.Tensor:
    """A one-hot draw [..., K] from softmax(logits) along the last dimension, exactly 0. and 1.,
    whose gradient into ``logits`` is ``estimator``'s (``"gumbel_st"`` or ``"reinmax"``).

    >>> z = straight_through(logits, "gumbel_st")      # logits [B, V, K] -> one-hot [B, V, K]
    """
    _check(estimator, tau)
    if estimator == "reinmax":
        return _reinmax()(logits, tau)[0]
    y = F.gumbel_softmax(logits, tau=tau, hard=True)
    # torch returns y_hard - y_soft.detach() + y_soft, whose ones can be off by an ulp; the hard
    # value plus the zero (y - y.detach()) is exact and keeps the gradient
    return y.detach().round() + (y - y.detach())


def straight_through_bernoulli(logits: torch.Tensor, estimator: str, tau: float = 1.0) -> torch.Tensor:
    """A 0/1 draw [...] of Bernoulli(sigmoid(logits)) with ``estimator``'s gradient: the first class
    of the two-class variable with logits (l, 0)."""
    two = torch.stack((logits, torch.zeros_like(logits)), -1)
    return straight_through(two, estimator, tau)[..., 0]
