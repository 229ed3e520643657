"""Brute-force oracles: flip each parent, recompute each child from scratch."""

import torch
import torch.nn.functional as F


def _flip_all(x, weight, bias, lo, hi):
    """Child logits [B, in, out] with parent i set to hi and to lo, recomputed from scratch."""
    B, n = x.shape
    x_hi = x.unsqueeze(1).repeat(1, n, 1)
    x_lo = x_hi.clone()
    idx = torch.arange(n)
    x_hi[:, idx, idx] = hi
    x_lo[:, idx, idx] = lo
    return x_hi @ weight.t() + bias, x_lo @ weight.t() + bias


def bernoulli_log_ratio(x, weight, bias, y, lo, hi):
    l_hi, l_lo = _flip_all(x, weight, bias, lo, hi)
    s = torch.where(y > 0, 1.0, -1.0).to(x.dtype).unsqueeze(1)
    return (F.logsigmoid(s * l_hi) - F.logsigmoid(s * l_lo)).sum(-1)


def categorical_log_ratio(x, weight, bias, a, lo, hi):
    l_hi, l_lo = _flip_all(x, weight, bias, lo, hi)
    idx = a.view(-1, 1, 1).expand(-1, x.shape[1], 1)
    return (F.log_softmax(l_hi, -1).gather(-1, idx) - F.log_softmax(l_lo, -1).gather(-1, idx)).squeeze(-1)


def entropy_delta(x, weight, bias, lo, hi):
    l_hi, l_lo = _flip_all(x, weight, bias, lo, hi)

    def entropy(l):
        p = torch.sigmoid(l)
        return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))

    return (entropy(l_hi) - entropy(l_lo)).sum(-1)
