"""The paper's gradient-variance metric, without per-example gradient tensors."""

from __future__ import annotations

import torch


def linear_gradient_variance(inputs: torch.Tensor, logit_grads: torch.Tensor, bias: bool = True):
    """Per-parameter variance over the batch of a linear layer's per-example gradients.

    Example b's gradient is ``outer(logit_grads[b], inputs[b])`` for the weight and
    ``logit_grads[b]`` for the bias, so with a = logit_grads, x = inputs and B examples
    mean_b g^2 = (a^2)^T (x^2) / B and mean_b g = a^T x / B: no [B, out, in] tensor is formed.
    The variance is the population one (divided by B), as in the paper.

    Returns (sum of the variances over the parameters, number of parameters).
    """
    a = logit_grads.detach().double().flatten(0, -2)
    x = inputs.detach().double().flatten(0, -2)
    batch = a.shape[0]
    mean_sq = (a * a).t() @ (x * x) / batch
    mean = a.t() @ x / batch
    total = (mean_sq - mean * mean).clamp_min(0).sum()
    count = mean.numel()
    if bias:
        total = total + a.var(0, unbiased=False).sum()
        count += a.shape[1]
    return total, count
