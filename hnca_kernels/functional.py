"""Public functional API: the counterfactual messages and the credit of a Bernoulli unit.

Inputs are checked here, once, and the reductions go to a backend (``backend=`` argument,
else ``use_backend``'s default, else the fastest available for the tensors' device).
Messages are returned in float32 for float16/bfloat16 inputs (they are sums over many
children), otherwise in the inputs' dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import validation
from .backends import get_backend
from .ops import bad_parent_values

__all__ = [
    "counterfactual_log_ratio",
    "categorical_counterfactual_log_ratio",
    "counterfactual_entropy_delta",
    "hnca_credit",
    "hnca_logit_credit",
    "bernoulli_entropy",
    "categorical_parent_log_ratio",
]


def _check_parent_values(parent_values: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in parent_values)
    except (TypeError, ValueError):
        raise ValueError(f"parent_values must be a pair (lo, hi), got {parent_values!r}") from None
    if not lo < hi:
        raise ValueError(f"parent_values must satisfy lo < hi, got {(lo, hi)}")
    return lo, hi


def _check_linear_inputs(x, weight, logits):
    for name, t in (("x", x), ("weight", weight), ("logits", logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.dtype != logits.dtype or x.dtype != logits.dtype:
        raise TypeError(
            f"x, weight and logits must share a dtype, got {x.dtype}, {weight.dtype}, {logits.dtype}"
        )
    batch, in_features = x.shape
    out_features = weight.shape[0]
    if weight.shape[1] != in_features:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [out, {in_features}] for x of shape {tuple(x.shape)}")
    if logits.shape != (batch, out_features):
        raise ValueError(f"logits has shape {tuple(logits.shape)}, expected {(batch, out_features)}")


def _backend_for_parents(backend, x, lo, hi):
    """The backend module, after checking that x holds only lo and hi where it does not.

    A backend with ``CHECKS_PARENT_VALUES = True`` (cpp, cuda, triton) checks in its own pass over x
    (raising the same ValueError on the CPU, asserting on the device on a GPU); the check here costs
    a few tiny ops per call, a quarter of a message at B=50.
    """
    impl = get_backend(backend, x.device)
    if not getattr(impl, "CHECKS_PARENT_VALUES", False) and x.numel():
        validation.require(x.device, lambda: ((x == lo) | (x == hi)).all(), bad_parent_values(lo, hi))
    return impl


def counterfactual_log_ratio(x, weight, logits, y, *, parent_values=(0.0, 1.0), backend=None):
    """Message from a layer of Bernoulli children to its binary parents.

    Args:
        x: parent values [B, in], each lo or hi (``parent_values``).
        weight: the child layer's weight [out, in].
        logits: the child layer's logits ``x @ weight.T + bias`` [B, out].
        y: the children's samples [B, out]; child j counts as fired where y > 0.

    Returns:
        d [B, in] with d[b, i] = sum_j log pi_j(y[b, j] | x[b] with x[b, i] := hi)
        - log pi_j(y[b, j] | x[b] with x[b, i] := lo).

    >>> d = counterfactual_log_ratio(h, layer.weight, logits, y, parent_values=(-1.0, 1.0))
    """
    lo, hi = _check_parent_values(parent_values)
    _check_linear_inputs(x, weight, logits)
    if not isinstance(y, torch.Tensor) or y.shape != logits.shape:
        raise ValueError(f"y must be a tensor of shape {tuple(logits.shape)}, got {getattr(y, 'shape', type(y))}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    return _backend_for_parents(backend, x, lo, hi).bernoulli_log_ratio(x, weight, logits, y, lo, hi)


def categorical_counterfactual_log_ratio(x, weight, logits, a, *, parent_values=(0.0, 1.0), backend=None):
    """Message from a softmax child (K classes) that sampled class ``a`` [B] to its binary parents.

    ``weight`` is [K, in] and ``logits`` [B, K]. Returns d [B, in] with
    d[b, i] = log pi(a[b] | x_i := hi) - log pi(a[b] | x_i := lo).
    """
    lo, hi = _check_parent_values(parent_values)
    _check_linear_inputs(x, weight, logits)
    if not isinstance(a, torch.Tensor) or a.shape != (x.shape[0],):
        raise ValueError(f"a must be a tensor of shape {(x.shape[0],)}, got {getattr(a, 'shape', type(a))}")
    if a.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"a must hold class indices (int64), got {a.dtype}")
    if a.device != x.device:
        raise ValueError(f"a is on {a.device} but x is on {x.device}")
    impl = _backend_for_parents(backend, x, lo, hi)
    # the class range too is checked by a backend that checks the parents (two reductions here)
    if not getattr(impl, "CHECKS_PARENT_VALUES", False) and a.numel():
        validation.require(a.device, lambda: ((a >= 0) & (a < logits.shape[1])).all(),
                           ValueError(f"a must hold class indices in [0, {logits.shape[1]})"))
    return impl.categorical_log_ratio(x, weight, logits, a.long(), lo, hi)


def counterfactual_entropy_delta(x, weight, logits, *, parent_values=(0.0, 1.0), backend=None):
    """Change of a Bernoulli child layer's total entropy when each parent is set to hi, not lo.

    Returns d [B, in] with d[b, i] = sum_j H(Bernoulli(sigmoid(logit_j))) at x_i := hi minus the
    same at x_i := lo (f-HNCA's counterfactual entropy of the next encoder layer).
    """
    lo, hi = _check_parent_values(parent_values)
    _check_linear_inputs(x, weight, logits)
    return _backend_for_parents(backend, x, lo, hi).entropy_delta(x, weight, logits, lo, hi)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of Bernoulli(sigmoid(logits)), elementwise, finite for any logit."""
    from .ops.reference import bernoulli_entropy as _entropy

    return _entropy(logits)


def hnca_credit(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """rho1 - rho0 = (e^d - 1) / (p e^d + 1 - p) for a Bernoulli unit firing with probability p.

    ``d`` is the children's log-ratio (``counterfactual_log_ratio``). Computed without overflow
    (only exp of -|d|) and with expm1 for small |d|. Where p saturates the credit itself can be
    huge: the surrogate uses ``hnca_logit_credit`` instead, which stays bounded.
    """
    neg_abs = -d.abs()
    e = torch.exp(neg_abs)
    fired_more = d >= 0
    num = torch.where(fired_more, -torch.expm1(neg_abs), torch.expm1(neg_abs))
    den = torch.where(fired_more, p + (1 - p) * e, (1 - p) + p * e)
    return num / den


def hnca_logit_credit(logits: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """p(1-p)(rho1 - rho0) with p = sigmoid(logits): the HNCA learning signal per unit logit.

    It equals sigmoid(logits + d) - sigmoid(logits) (posterior minus prior firing
    probability), so |.| <= 1 for every input; computed as a product, without cancellation:
        d >= 0:  sigmoid(-l) * sigmoid(l + d) * (1 - e^-d)
        d <  0: -sigmoid(l) * sigmoid(-l - d) * (1 - e^d)
    """
    # Both cases are sign(d) * sigmoid(-sign*l) * sigmoid(sign*(l + d)) * (1 - e^-|d|): one
    # expression without torch.where (this runs once per layer and step; its ops dominate at small B).
    sign = torch.sign(d)
    magnitude = d.abs().neg_().expm1_().neg_()  # 1 - e^-|d|
    posterior = (logits + d).mul_(sign).sigmoid_()
    return posterior.mul_((logits * sign).neg_().sigmoid_()).mul_(magnitude).mul_(sign)


def categorical_parent_log_ratio(a, weight, logits, y, *, backend=None):
    """Message from children to categorical parents that feed them one-hot (categorical hidden units).

    Args:
        a: the parents' classes [B, V] (int64): V variables of K classes, fed to the children as
            one-hot columns v*K .. v*K + K - 1.
        weight: the children's weight columns of those inputs, [out, V*K].
        logits: the children's logits [B, out].
        y: Bernoulli children's samples [B, out] (floats; fired where > 0), or one softmax child's
            sampled classes [B] (int64; then ``weight`` is [K_child, V*K] and ``logits`` [B, K_child]).

    Returns:
        D [B, V, K] with D[b, v, k] = log P(children | variable v := k) - log P(children | actual);
        D[b, v, a[b, v]] = 0. The credit of class k is then softmax(l + D) - softmax(l).

    Variable v switched to class k moves the child logits by W[:, vK+k] - W[:, vK+a]: from the
    logits with variable v switched off (l - W[:, vK+a]), that is the message of K binary parents
    at 0 set to 1, so every backend's binary-parent kernel computes it (one call per variable).
    """
    for name, t in (("a", a), ("weight", weight), ("logits", logits), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2 or a.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"a must hold classes [B, V] (int64), got {a.dtype} of shape {tuple(a.shape)}")
    batch, variables = a.shape
    if weight.dim() != 2 or weight.shape[1] % variables:
        raise ValueError(f"weight must be [out, V*K] with V = {variables}, got {tuple(weight.shape)}")
    classes = weight.shape[1] // variables
    validation.require(a.device, lambda: ((a >= 0) & (a < classes)).all(),
                   ValueError(f"a must hold class indices in [0, {classes})"))
    a = a.long()
    zeros = logits.new_zeros(batch, classes)
    out = []
    for v in range(variables):
        w = weight[:, v * classes:(v + 1) * classes]
        base = logits - w.t()[a[:, v]]  # the child logits with variable v switched off
        if y.is_floating_point():
            d = counterfactual_log_ratio(zeros, w, base, y, parent_values=(0.0, 1.0), backend=backend)
        else:
            d = categorical_counterfactual_log_ratio(zeros, w, base, y, parent_values=(0.0, 1.0), backend=backend)
        out.append(d - d.gather(1, a[:, v:v + 1]))
    return torch.stack(out, 1)
