"""Public functional API: the counterfactual messages and the credit of a Bernoulli unit.

Inputs are checked here, once, and the reductions go to a backend (``backend=`` argument,
else ``use_backend``'s default, else the fastest available for the tensors' device).
Messages are returned in float32 for float16/bfloat16 inputs (they are sums over many
children), otherwise in the inputs' dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import validation
from .backends import get_backend
from .ops import bad_parent_values, reference

__all__ = [
    "counterfactual_log_ratio",
    "categorical_counterfactual_log_ratio",
    "counterfactual_entropy_delta",
    "counterfactual_log_ratio_and_entropy_delta",
    "hnca_credit",
    "hnca_logit_credit",
    "bernoulli_entropy",
    "categorical_parent_log_ratio",
    "categorical_entropy_delta",
    "categorical_parent_entropy_delta",
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
    _check_bernoulli_children(x, weight, logits, y)
    return _backend_for_parents(backend, x, lo, hi).bernoulli_log_ratio(x, weight, logits, y, lo, hi)


def _check_bernoulli_children(x, weight, logits, y):
    _check_linear_inputs(x, weight, logits)
    if not isinstance(y, torch.Tensor) or y.shape != logits.shape:
        raise ValueError(f"y must be a tensor of shape {tuple(logits.shape)}, got {getattr(y, 'shape', type(y))}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")


def _check_softmax_child(x, weight, logits, a=None):
    """A softmax child of binary parents: one variable (``logits`` [B, K], ``a`` [B]) or V of them
    (``logits`` [B, V, K], ``a`` [B, V], ``weight`` [V*K, in]). Returns (V, K)."""
    for name, t in (("x", x), ("weight", weight), ("logits", logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, K] or [B, V, K], got shape {tuple(logits.shape)}")
    V, K = (1, logits.shape[1]) if logits.dim() == 2 else tuple(logits.shape[1:])
    _check_linear_inputs(x, weight, logits.reshape(logits.shape[0], V * K))
    if a is not None:
        expected = (x.shape[0],) if logits.dim() == 2 else (x.shape[0], V)
        if not isinstance(a, torch.Tensor) or tuple(a.shape) != expected:
            raise ValueError(f"a must be a tensor of shape {expected}, got {getattr(a, 'shape', type(a))}")
        if a.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"a must hold class indices (int64), got {a.dtype}")
        if a.device != x.device:
            raise ValueError(f"a is on {a.device} but x is on {x.device}")
    return V, K


def categorical_counterfactual_log_ratio(x, weight, logits, a, *, parent_values=(0.0, 1.0), backend=None):
    """Message from a softmax child (K classes) that sampled class ``a`` [B] to its binary parents.

    ``weight`` is [K, in] and ``logits`` [B, K]; or V softmax variables at once: ``logits``
    [B, V, K], ``a`` [B, V], ``weight`` [V*K, in] (rows v*K .. v*K + K - 1 are variable v), their
    log-ratios summed. Returns d [B, in] with
    d[b, i] = log pi(a[b] | x_i := hi) - log pi(a[b] | x_i := lo).
    """
    lo, hi = _check_parent_values(parent_values)
    V, K = _check_softmax_child(x, weight, logits, a)
    impl = _backend_for_parents(backend, x, lo, hi)
    # the class range too is checked by a backend that checks the parents (two reductions here)
    if not getattr(impl, "CHECKS_PARENT_VALUES", False) and a.numel():
        validation.require(a.device, lambda: ((a >= 0) & (a < K)).all(),
                           ValueError(f"a must hold class indices in [0, {K})"))
    if logits.dim() == 2:
        return impl.categorical_log_ratio(x, weight, logits, a.long(), lo, hi)
    if getattr(impl, "CATEGORICAL_VARIABLES", False) or impl is reference:
        return impl.categorical_log_ratio(x, weight, logits, a.long(), lo, hi)
    total = None  # a backend whose kernel takes one variable: one call per variable
    for v in range(V):
        d = impl.categorical_log_ratio(x, weight[v * K:(v + 1) * K], logits[:, v], a[:, v].long(), lo, hi)
        total = d if total is None else total + d
    return total


def categorical_entropy_delta(x, weight, logits, *, parent_values=(0.0, 1.0), backend=None):
    """Change of the entropy of softmax children when each binary parent is set to hi, not lo.

    ``logits`` [B, K] (``weight`` [K, in]) or [B, V, K] (``weight`` [V*K, in], the variables'
    entropies summed). Returns d [B, in] with d[b, i] = sum_v H(pi_v | x_i := hi) - H(pi_v | x_i := lo)
    (f-HNCA's counterfactual entropy of a categorical layer fed binary units).
    """
    lo, hi = _check_parent_values(parent_values)
    _check_softmax_child(x, weight, logits)
    impl = _backend_for_parents(backend, x, lo, hi)
    op = getattr(impl, "categorical_entropy_delta", reference.categorical_entropy_delta)
    if op is reference.categorical_entropy_delta and getattr(impl, "CHECKS_PARENT_VALUES", False) and x.numel():
        validation.require(x.device, lambda: ((x == lo) | (x == hi)).all(), bad_parent_values(lo, hi))
    return op(x, weight, logits, lo, hi)


def counterfactual_entropy_delta(x, weight, logits, *, parent_values=(0.0, 1.0), backend=None):
    """Change of a Bernoulli child layer's total entropy when each parent is set to hi, not lo.

    Returns d [B, in] with d[b, i] = sum_j H(Bernoulli(sigmoid(logit_j))) at x_i := hi minus the
    same at x_i := lo (f-HNCA's counterfactual entropy of the next encoder layer).
    """
    lo, hi = _check_parent_values(parent_values)
    _check_linear_inputs(x, weight, logits)
    return _backend_for_parents(backend, x, lo, hi).entropy_delta(x, weight, logits, lo, hi)


def counterfactual_log_ratio_and_entropy_delta(x, weight, logits, y, *, parent_values=(0.0, 1.0), backend=None):
    """Both messages of a sampled Bernoulli child layer: ``(counterfactual_log_ratio(x, weight,
    logits, y), counterfactual_entropy_delta(x, weight, logits))`` with the same arguments.

    f-HNCA needs both from every sampled child; a backend with one kernel for the pair (cpp)
    computes them in about the entropy delta's time, the others run the two ops.
    """
    lo, hi = _check_parent_values(parent_values)
    _check_bernoulli_children(x, weight, logits, y)
    impl = _backend_for_parents(backend, x, lo, hi)
    both = getattr(impl, "bernoulli_log_ratio_and_entropy_delta", None)
    if both is not None:
        return both(x, weight, logits, y, lo, hi)
    return impl.bernoulli_log_ratio(x, weight, logits, y, lo, hi), impl.entropy_delta(x, weight, logits, lo, hi)


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


def hnca_logit_credit(logits: torch.Tensor, d: torch.Tensor, *, backend=None) -> torch.Tensor:
    """p(1-p)(rho1 - rho0) with p = sigmoid(logits): the HNCA learning signal per unit logit.

    It equals sigmoid(logits + d) - sigmoid(logits) (posterior minus prior firing
    probability), so |.| <= 1 for every input; computed as a product, without cancellation
    (``reference.logit_credit``), by the backend's fused kernel where it has one (cpp).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(d, torch.Tensor):
        raise TypeError("logits and d must be tensors")
    if logits.shape != d.shape:
        raise ValueError(f"logits and d must have one shape, got {tuple(logits.shape)} and {tuple(d.shape)}")
    impl = get_backend(backend, logits.device)
    return getattr(impl, "logit_credit", reference.logit_credit)(logits, d.to(logits.dtype))


def _check_categorical_parents(a, weight, logits, y=None):
    for name, t in (("a", a), ("weight", weight), ("logits", logits)) + ((("y", y),) if y is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2 or a.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"a must hold classes [B, V] (int64), got {a.dtype} of shape {tuple(a.shape)}")
    batch, variables = a.shape
    if weight.dim() != 2 or weight.shape[1] % variables or not weight.shape[1]:
        raise ValueError(f"weight must be [out, V*K] with V = {variables}, got {tuple(weight.shape)}")
    if logits.shape[0] != batch or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, out] or [B, V, K] with B = {batch}, got {tuple(logits.shape)}")
    if math.prod(logits.shape[1:]) != weight.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match weight {tuple(weight.shape)} ([out, V*K])")
    for name, t in (("weight", weight), ("logits", logits)) + ((("y", y),) if y is not None else ()):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
    classes = weight.shape[1] // variables
    validation.require(a.device, lambda: ((a >= 0) & (a < classes)).all(),
                       ValueError(f"a must hold class indices in [0, {classes})"))
    return variables, classes


def categorical_parent_log_ratio(a, weight, logits, y, *, backend=None):
    """Message from children to categorical parents that feed them one-hot (categorical hidden units).

    Args:
        a: the parents' classes [B, V] (int64): V variables of K classes, fed to the children as
            one-hot columns v*K .. v*K + K - 1.
        weight: the children's weight columns of those inputs, [out, V*K].
        logits: the children's logits [B, out].
        y: Bernoulli children's samples [B, out] (floats; fired where > 0), or a softmax child's
            sampled classes: [B] (then ``weight`` is [K_child, V*K] and ``logits`` [B, K_child]) or
            [B, Vc] for Vc variables (``logits`` [B, Vc, K_child], ``weight`` [Vc*K_child, V*K]).

    Returns:
        D [B, V, K] with D[b, v, k] = log P(children | variable v := k) - log P(children | actual);
        D[b, v, a[b, v]] = 0. The credit of class k is then softmax(l + D) - softmax(l).

    Variable v switched to class k moves the child logits by W[:, vK+k] - W[:, vK+a]: from the
    logits with variable v switched off (l - W[:, vK+a]), that is the message of K binary parents
    at 0 set to 1, so a backend without this op runs its binary-parent kernel once per variable.
    """
    variables, classes = _check_categorical_parents(a, weight, logits, y)
    if y.is_floating_point() and y.shape != logits.shape:
        raise ValueError(f"y must have the shape of logits {tuple(logits.shape)}, got {tuple(y.shape)}")
    if not y.is_floating_point() and tuple(y.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"y must hold the child's classes {tuple(logits.shape[:-1])}, got {tuple(y.shape)}")
    impl = get_backend(backend, a.device)
    a = a.long()
    op = getattr(impl, "categorical_parent_log_ratio", None) if y.is_floating_point() else None
    if op is not None:  # a backend's kernel for Bernoulli children, every variable at once
        return op(a, weight, logits, y)
    if impl is reference or (not y.is_floating_point() and logits.dim() == 3):
        return reference.categorical_parent_log_ratio(a, weight, logits, y)
    # the switched-off logits are differences: formed in float32 at least (half inputs would round them)
    dt = torch.promote_types(logits.dtype, torch.float32)
    weight, logits = weight.to(dt), logits.to(dt)
    y = y.to(dt) if y.is_floating_point() else y
    zeros = logits.new_zeros(a.shape[0], classes)
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


def categorical_parent_entropy_delta(a, weight, logits, *, child_classes=None, backend=None):
    """Change of the children's entropy when categorical parent variable v is switched to class k:
    D [B, V, K] = H(children | v := k) - H(children | actual) (0 at the actual class).

    Children: Bernoulli units (``logits`` [B, out], ``child_classes`` None) or softmax variables
    (``logits`` [B, Vc, K_child], ``child_classes=K_child``); ``weight`` [out, V*K] as in
    ``categorical_parent_log_ratio``.
    """
    variables, classes = _check_categorical_parents(a, weight, logits)
    impl = get_backend(backend, a.device)
    a = a.long()
    op = getattr(impl, "categorical_parent_entropy_delta", None)
    if op is not None or impl is reference or child_classes is not None:
        return (op or reference.categorical_parent_entropy_delta)(a, weight, logits, child_classes)
    dt = torch.promote_types(logits.dtype, torch.float32)  # (as in categorical_parent_log_ratio)
    weight, logits = weight.to(dt), logits.to(dt)
    zeros = logits.new_zeros(a.shape[0], classes)
    out = []
    for v in range(variables):
        w = weight[:, v * classes:(v + 1) * classes]
        d = counterfactual_entropy_delta(zeros, w, logits - w.t()[a[:, v]], parent_values=(0.0, 1.0), backend=backend)
        out.append(d - d.gather(1, a[:, v:v + 1]))
    return torch.stack(out, 1)
