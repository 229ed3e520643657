"""Exact expectations by enumerating every configuration of a tiny network's stochastic units."""

from __future__ import annotations

import itertools

import torch

from hnca_kernels import CategoricalLinear


def unit_configurations(layer, dtype):
    """All values one stochastic layer can take, as a list of tensors [out] (or class ids)."""
    if isinstance(layer, CategoricalLinear):
        return [torch.tensor(k) for k in range(layer.num_classes)]
    lo, hi = layer.values
    return [torch.tensor(c, dtype=dtype) for c in itertools.product((lo, hi), repeat=layer.out_features)]


def configurations(net, dtype):
    """Every joint configuration: (list of per-layer values, index of the output value)."""
    per_layer = [unit_configurations(layer, dtype) for layer in net.stochastic_layers]
    for combo in itertools.product(*[range(len(v)) for v in per_layer]):
        yield [per_layer[k][i] for k, i in enumerate(combo)], combo[-1]


def config_log_prob(net, x, values):
    """log P(configuration | x) for a batch x [N, in]: [N]."""
    samples = [v.expand(x.shape[0], *v.shape) for v in values]
    net(x, samples=samples)
    return sum(layer.log_prob(step.logits, step.sample) for layer, step in zip(net.stochastic_layers, net._trace))


def exact_gradient(net, x, reward_table):
    """grad of mean_n E[R(x_n, output)] with respect to every parameter, by enumeration."""
    net.zero_grad()
    expected = 0.0
    for values, out_index in configurations(net, x.dtype):
        prob = config_log_prob(net, x, values).exp()
        expected = expected + (prob * reward_table[:, out_index]).mean()
    expected.backward()
    return [p.grad.clone() for p in net.parameters()]


def estimator_moments(net, x, reward_table, estimator, baseline=0.0):
    """Exact mean over the batch and per-example elementwise variance of the estimate.

    Returns (mean [per parameter], variance [per parameter, shape [N, *param.shape]]).
    """
    params = list(net.parameters())
    first = [torch.zeros((x.shape[0],) + p.shape, dtype=x.dtype) for p in params]
    second = [torch.zeros_like(f) for f in first]
    for values, out_index in configurations(net, x.dtype):
        with torch.no_grad():
            prob = config_log_prob(net, x, values).exp()
        for n in range(x.shape[0]):
            net.zero_grad()
            samples = [v.unsqueeze(0) for v in values]
            net(x[n : n + 1], samples=samples)
            b = baseline[n : n + 1] if isinstance(baseline, torch.Tensor) else baseline
            loss = net.surrogate_loss(reward_table[n : n + 1, out_index], estimator=estimator, baseline=b)
            loss.backward()
            for f, s, p in zip(first, second, params):
                g = -p.grad  # the loss's gradient is minus the estimate of grad E[R]
                f[n] += prob[n] * g
                s[n] += prob[n] * g * g
    mean = [f.mean(0) for f in first]
    variance = [s - f * f for f, s in zip(first, second)]
    return mean, variance
