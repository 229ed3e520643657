"""The paper's gradient-variance metric, without per-example gradient tensors."""

from __future__ import annotations

import torch


def linear_gradient_variance(inputs, logit_grads, bias: bool = True):
    """Per-parameter variance over the batch of a linear layer's per-example gradients, summed.

    Example b's gradient is ``outer(a[b], x[b])`` for the weight and ``a[b]`` for the bias, with
    a = logit_grads [B, out] and x = inputs [B, in]. Summed over the weight's parameters, the
    population variance (divided by B, as in the paper) is

        sum_oi mean_b g^2 - sum_oi (mean_b g)^2
            = mean_b |a_b|^2 |x_b|^2 - sum_{b,b'} (a_b . a_b') (x_b . x_b') / B^2,

    so two B x B Gram matrices replace the [out, in] tensors of moments. For a layer called several
    times (shared weights) pass lists, one (inputs, logit_grads) per call: example b's gradient is
    then the sum over the calls, and the Gram matrices sum over pairs of calls.
    The Gram form is about ten times faster than the moments at the paper's shape (benchmarks/RESULTS.md).

    Returns (sum of the variances over the parameters, number of parameters).
    """
    xs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    grads = [logit_grads] if isinstance(logit_grads, torch.Tensor) else list(logit_grads)
    a = [g.detach().double().flatten(0, -2) for g in grads]
    x = [t.detach().double().flatten(0, -2) for t in xs]
    batch = a[0].shape[0]
    gram = sum((ai @ aj.t()) * (xi @ xj.t()) for ai, xi in zip(a, x) for aj, xj in zip(a, x))
    total = gram.diagonal().sum() / batch - gram.sum() / batch**2
    count = a[0].shape[1] * x[0].shape[1]
    if bias:
        total = total + sum(a).var(0, unbiased=False).sum()
        count += a[0].shape[1]
    return total.clamp_min(0), count


def linear_gradient_square_sum(inputs, logit_grads, bias: bool = True):
    """The sum over the batch's examples of the squared norm of a linear layer's per-example
    gradient, ``sum_b |g_b|^2`` (arguments and g_b as in ``linear_gradient_variance``).

    With the mean gradient it gives the variance: ``sum_b |g_b|^2 / B - |mean_b g_b|^2``. Unlike the
    variance it adds over any split of the batch, so processes that each hold a share of the batch
    sum their shares and subtract the mean gradient, which DDP's averaged gradient gives them.
    Per example it is the diagonal of ``linear_gradient_variance``'s Gram product: |a_b|^2 |x_b|^2
    for one call, no B x B matrix.

    Returns (the sum, a float64 tensor; number of parameters).
    """
    xs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    grads = [logit_grads] if isinstance(logit_grads, torch.Tensor) else list(logit_grads)
    a = [g.detach().double().flatten(0, -2) for g in grads]
    x = [t.detach().double().flatten(0, -2) for t in xs]
    per_example = sum((ai * aj).sum(-1) * (xi * xj).sum(-1) for ai, xi in zip(a, x) for aj, xj in zip(a, x))
    total = per_example.sum()
    count = a[0].shape[1] * x[0].shape[1]
    if bias:
        total = total + sum(a).square().sum()
        count += a[0].shape[1]
    return total, count
