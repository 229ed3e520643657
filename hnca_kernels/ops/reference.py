"""Pure-torch reference of the counterfactual reductions: the specification and test oracle.

It materialises the [B, in, out] tensor of counterfactual child logits, so it is simple to
read and float64-capable but slow and memory-hungry; the fused backends compute the same
numbers without that tensor.

Notation: a parent layer x [B, in] with unit values in {lo, hi} feeds a child layer with
``logits = x @ weight.T + bias`` [B, out]. Setting parent i to the value it does not have moves
every child logit by ``weight[:, i] * delta[b, i]``, delta = +(hi - lo) from lo, -(hi - lo) from
hi. Every message is "value at x_i := hi" minus "value at x_i := lo", so the term for the flip is
multiplied by ``sign = +1`` from lo and ``-1`` from hi.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unsupported_reason(device: torch.device) -> str | None:
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _flips(x: torch.Tensor, lo: float, hi: float):
    """delta [B, in, 1] moving each parent to its other value, and the sign of that move."""
    at_lo = x != hi
    delta = torch.where(at_lo, hi - x, lo - x)
    sign = at_lo.to(x.dtype) * 2 - 1
    return delta.unsqueeze(-1), sign


def _counterfactual_logits(x, weight, logits, lo, hi):
    dt = _compute_dtype(logits.dtype)
    x, weight, logits = x.to(dt), weight.to(dt), logits.to(dt)
    delta, sign = _flips(x, lo, hi)
    # [B, in, out]: child logits with parent i flipped
    cf = logits.unsqueeze(1) + delta * weight.t().unsqueeze(0)
    return cf, logits.unsqueeze(1), sign


def bernoulli_log_ratio(x, weight, logits, y, lo, hi):
    """d[b,i] = sum_j log pi_j(y[b,j] | x_i := hi) - log pi_j(y[b,j] | x_i := lo)."""
    cf, actual, sign = _counterfactual_logits(x, weight, logits, lo, hi)
    s = torch.where(y > 0, 1.0, -1.0).to(cf.dtype).unsqueeze(1)  # child sign, [B, 1, out]
    terms = F.logsigmoid(s * cf) - F.logsigmoid(s * actual)
    return sign * terms.sum(-1)


def _grouped(t: torch.Tensor, classes: int) -> torch.Tensor:
    """[..., V * K] -> [..., V, K]."""
    return t.unflatten(-1, (t.shape[-1] // classes, classes))


def categorical_log_ratio(x, weight, logits, a, lo, hi):
    """d[b,i] = log pi(a[b] | x_i := hi) - log pi(a[b] | x_i := lo) for a softmax child: ``logits``
    [B, K] and ``a`` [B], or V softmax variables (``logits`` [B, V, K], ``a`` [B, V], ``weight``
    [V*K, in]; the variables' log-ratios summed)."""
    K = logits.shape[-1]
    cf, actual, sign = _counterfactual_logits(x, weight, logits.reshape(logits.shape[0], -1), lo, hi)
    idx = a.reshape(a.shape[0], 1, -1, 1)  # [B, 1, V, 1]
    cf, actual = _grouped(cf, K), _grouped(actual, K)  # [B, in, V, K], [B, 1, V, K]
    log_cf = F.log_softmax(cf, dim=-1).gather(-1, idx.expand(-1, cf.shape[1], -1, 1)).squeeze(-1)
    log_actual = F.log_softmax(actual, dim=-1).gather(-1, idx).squeeze(-1)
    return sign * (log_cf - log_actual).sum(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) along the last dimension."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def categorical_entropy_delta(x, weight, logits, lo, hi):
    """d[b,i] = sum_v H(softmax child v | x_i := hi) - H(v | x_i := lo), for V softmax variables
    (``logits`` [B, V, K] or [B, K], ``weight`` [V*K, in])."""
    K = logits.shape[-1]
    cf, actual, sign = _counterfactual_logits(x, weight, logits.reshape(logits.shape[0], -1), lo, hi)
    return sign * (categorical_entropy(_grouped(cf, K)) - categorical_entropy(_grouped(actual, K))).sum(-1)


def logit_credit(logits: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sigmoid(logits + d) - sigmoid(logits), HNCA's learning signal per logit, as a product
    without cancellation:
        d >= 0:  sigmoid(-l) * sigmoid(l + d) * (1 - e^-d)
        d <  0: -sigmoid(l) * sigmoid(-l - d) * (1 - e^d)
    """
    # Both cases are sign(d) * sigmoid(-sign*l) * sigmoid(sign*(l + d)) * (1 - e^-|d|): one
    # expression without torch.where (it runs once per layer and step; its ops dominate at small B).
    sign = torch.sign(d)
    magnitude = d.abs().neg_().expm1_().neg_()  # 1 - e^-|d|
    posterior = (logits + d).mul_(sign).sigmoid_()
    return posterior.mul_((logits * sign).neg_().sigmoid_()).mul_(magnitude).mul_(sign)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), elementwise, stable for any finite logit: H is
    even, and with a = |l| it is softplus(-a) + a sigmoid(-a), two positive terms (one log1p)."""
    a = logits.abs()
    return F.softplus(-a) + a * torch.sigmoid(-a)


def entropy_delta(x, weight, logits, lo, hi):
    """d[b,i] = sum_j H(child j | x_i := hi) - H(child j | x_i := lo)."""
    cf, actual, sign = _counterfactual_logits(x, weight, logits, lo, hi)
    return sign * (bernoulli_entropy(cf) - bernoulli_entropy(actual)).sum(-1)


def _switched_logits(a, weight, logits):
    """The children's logits [B, V, K, out] with parent variable v switched to class k (one-hot
    parents ``a`` [B, V] of K classes; ``weight`` [out, V*K]): the actual class's column out, the
    new one in."""
    dt = _compute_dtype(logits.dtype)
    B, V = a.shape
    K = weight.shape[1] // V
    w = weight.to(dt).t().reshape(V, K, -1)                                   # [V, K, out]
    own = w[torch.arange(V, device=a.device).unsqueeze(0), a]                 # [B, V, out]
    flat = logits.to(dt).reshape(B, -1)
    return flat[:, None, None, :] + w.unsqueeze(0) - own.unsqueeze(2), flat


def categorical_parent_log_ratio(a, weight, logits, y):
    """D[b, v, k] = log P(children | parent variable v := k) - log P(children | actual), for
    categorical parents fed one-hot (``a`` [B, V] their classes, ``weight`` [out, V*K]).

    Children: a layer of Bernoulli units (``y`` [B, out] floats), or softmax variables (``y`` [B]
    or [B, Vc] class indices, ``logits`` [B, Kc] or [B, Vc, Kc], ``weight`` [Vc*Kc, V*K]).
    Switching variable v from class a to k moves every child logit by W[:, vK + k] - W[:, vK + a];
    materialises [B, V, K, out].
    """
    cf, flat = _switched_logits(a, weight, logits)
    if y.is_floating_point():
        s = torch.where(y > 0, 1.0, -1.0).to(cf.dtype)
        actual = F.logsigmoid(s * flat)
        return (F.logsigmoid(s[:, None, None, :] * cf) - actual[:, None, None, :]).sum(-1)
    Kc = logits.shape[-1]
    idx = y.reshape(y.shape[0], 1, 1, -1, 1)                                  # [B, 1, 1, Vc, 1]
    cf = _grouped(cf, Kc)                                                     # [B, V, K, Vc, Kc]
    log_cf = F.log_softmax(cf, -1).gather(-1, idx.expand(-1, *cf.shape[1:3], -1, 1)).squeeze(-1)
    log_actual = F.log_softmax(_grouped(flat, Kc), -1).gather(-1, idx[:, 0, 0]).squeeze(-1)  # [B, Vc]
    return (log_cf - log_actual[:, None, None, :]).sum(-1)


def categorical_parent_entropy_delta(a, weight, logits, child_classes=None):
    """D[b, v, k] = H(children | parent variable v := k) - H(children | actual): Bernoulli children
    (``child_classes`` None, ``logits`` [B, out]) or softmax variables of ``child_classes`` classes
    (``logits`` [B, Vc, Kc])."""
    cf, flat = _switched_logits(a, weight, logits)
    if child_classes is None:
        return (bernoulli_entropy(cf) - bernoulli_entropy(flat)[:, None, None, :]).sum(-1)
    h_cf = categorical_entropy(_grouped(cf, child_classes)).sum(-1)
    return h_cf - categorical_entropy(_grouped(flat, child_classes)).sum(-1)[:, None, None]
