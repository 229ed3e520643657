"""Counterfactual terms of softmax children as matrix products (pure torch, any device).

A parent flip moves a softmax child's logits by c = Delta * W[:, i]; with pi = softmax(l) and
A = exp(c) (one table per sign of Delta, [K, in]), sums over the classes become products with pi:

    sum_k softmax(l + c)_k f_k = (sum_k pi_k A_k f_k) / S,   S = sum_k pi_k A_k = pi @ A,

so the entropy change of V softmax variables for every (example, parent) is a few batched matrix
products [V, B, K] @ [V, K, in] instead of B x in x V x K exponentials:

    H(l + c) - H(l) = log S - (pi l' @ A + pi @ (A c)) / S + sum_k pi_k l'_k,   l' = l - max_k l.

It is exact in exact arithmetic; in floating point the error is absolute (a few ulp of the larger
terms), not relative to a tiny change of a saturated child, and A must not overflow: a weight
with Delta * |W| past ``LIMIT`` of the dtype takes the reference instead.
"""

from __future__ import annotations

import torch

from . import reference

# exp(c) stays finite and its products with pi representable below these (float32 overflows at 88)
LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def categorical_entropy_delta(x, weight, logits, lo, hi):
    """``reference.categorical_entropy_delta`` by matrix products: d [B, in]."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    B, n_in = x.shape
    K = logits.shape[-1]
    V = weight.shape[0] // K
    w = hi - lo
    weight = weight.to(dt)
    if not x.numel() or w * float(weight.abs().max()) > LIMIT.get(dt, 60.0):
        return reference.categorical_entropy_delta(x, weight, logits, lo, hi)
    l = logits.to(dt).reshape(B, V, K)
    shifted = l - l.amax(-1, keepdim=True)                      # H is shift-invariant; l' <= 0
    pi = torch.softmax(shifted, -1)
    pl = (pi * shifted).transpose(0, 1)                          # [V, B, K]
    p = pi.transpose(0, 1)
    own = (pi * shifted).sum(-1).t().unsqueeze(-1)               # [V, B, 1]: sum_k pi_k l'_k
    grouped = weight.reshape(V, K, n_in)
    changes = []
    for delta in (w, -w):                                        # from lo (to hi) and from hi (to lo)
        c = delta * grouped
        a = c.exp()
        s = torch.bmm(p, a)
        changes.append((s.log() - (torch.bmm(pl, a) + torch.bmm(p, a * c)) / s + own).sum(0))  # [B, in]
    at_lo = x != hi
    # d = H at hi - H at lo: from lo the flip goes to hi (+change), from hi to lo (-change)
    return torch.where(at_lo, changes[0], -changes[1])
