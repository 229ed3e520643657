"""Exact expectations by enumerating every configuration of a tiny model's stochastic units.

A model is any callable ``model(x)`` that calls stochastic layers; ``hnca_kernels.record(replay=...)``
fixes every call's sample, so the same code enumerates a chain, a DAG or a shared layer. A reward
is ``reward_fn(rec, out, rows) -> [len(rows)]`` from the record's samples, the model's output
and the examples' indices ``rows`` in x (a per-example reward table can be indexed by them).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from hnca_kernels import BernoulliLinear, CategoricalLinear, record


def _call_values(call) -> list[torch.Tensor]:
    """Every value one recorded call (one example) can take, each shaped like its sample [1, ...]."""
    layer, sample = call.layer, call.sample[:1]
    if isinstance(layer, BernoulliLinear):
        lo, hi = layer.values
        n = sample.shape[-1]
        return [torch.tensor(c, dtype=sample.dtype).view(1, n) for c in itertools.product((lo, hi), repeat=n)]
    assert isinstance(layer, CategoricalLinear)
    V, K = layer.num_variables, layer.num_classes
    values = []
    for classes in itertools.product(range(K), repeat=V):
        idx = torch.tensor(classes).view(1, V)
        if layer.one_hot:
            values.append(F.one_hot(idx, K).to(sample.dtype).view(1, V * K))
        else:
            values.append(idx if V > 1 else idx.view(1))
    return values


def configurations(model, x):
    """Every joint configuration of the calls model(x[:1]) makes: lists of samples [1, ...]."""
    with record() as rec:
        model(x[:1])
    per_call = [_call_values(c) for c in rec.sampled_calls]  # scored calls keep their given values
    for combo in itertools.product(*per_call):
        yield list(combo)


def replayed(model, x, samples):
    """(record, output) of model(x) with every call's sample fixed (expanded over x's batch)."""
    expanded = [s.expand(x.shape[0], *s.shape[1:]) for s in samples]
    with record(replay=expanded) as rec:
        out = model(x)
    return rec, out


def log_prob(rec) -> torch.Tensor:
    """log q of the sampled calls' samples [B]."""
    return sum(c.layer.log_prob(c.logits, c.sample) for c in rec.sampled_calls)


def exact_gradient(model, params, x, reward_fn):
    """grad of mean_n E[R_n] with respect to ``params``, by enumeration."""
    for p in params:
        p.grad = None
    expected = 0.0
    for samples in configurations(model, x):
        rec, out = replayed(model, x, samples)
        expected = expected + (log_prob(rec).exp() * reward_fn(rec, out, torch.arange(x.shape[0]))).mean()
    expected.backward()
    return [p.grad.clone() for p in params]


def estimator_moments(model, params, x, reward_fn, estimator, baseline=0.0, outputs=None, backend=None):
    """Exact mean over the batch and per-example elementwise variance of the estimate of
    grad E[R], one example at a time. ``outputs(rec)`` gives ``surrogate_loss``'s outputs=.

    Returns (mean [per parameter], variance [per parameter, shape [N, *param.shape]]).
    """
    first = [torch.zeros((x.shape[0],) + p.shape, dtype=x.dtype) for p in params]
    second = [torch.zeros_like(f) for f in first]
    for samples in configurations(model, x):
        with torch.no_grad():
            rec, _ = replayed(model, x, samples)
            prob = log_prob(rec).exp()
        for n in range(x.shape[0]):
            for p in params:
                p.grad = None
            rec, out = replayed(model, x[n:n + 1], samples)
            b = baseline[n:n + 1] if isinstance(baseline, torch.Tensor) else baseline
            kwargs = {"outputs": outputs(rec)} if outputs is not None else {}
            reward = reward_fn(rec, out, torch.tensor([n]))
            rec.surrogate_loss(reward, estimator=estimator, baseline=b, backend=backend, **kwargs).backward()
            for f, s, p in zip(first, second, params):
                g = -p.grad if p.grad is not None else torch.zeros_like(p)  # the loss's gradient is -estimate
                f[n] += prob[n] * g
                s[n] += prob[n] * g * g
    mean = [f.mean(0) for f in first]
    variance = [s - f * f for f, s in zip(first, second)]
    return mean, variance


def estimator_mean(model, params, x, reward_fn, estimator, baseline=0.0, outputs=None, backend=None):
    """Exact mean over the batch of the estimate of grad E[R]: per configuration one step on the
    whole batch, each example's learning signal scaled by its probability (the estimate is linear
    in R - b, so that weights each example's estimate by P(configuration | x_n))."""
    total = [torch.zeros_like(p) for p in params]
    rows = torch.arange(x.shape[0])
    for samples in configurations(model, x):
        with torch.no_grad():
            rec, _ = replayed(model, x, samples)
            prob = log_prob(rec).exp()
        for p in params:
            p.grad = None
        rec, out = replayed(model, x, samples)
        b = baseline if isinstance(baseline, torch.Tensor) else torch.full_like(prob, baseline)
        kwargs = {"outputs": outputs(rec)} if outputs is not None else {}
        rec.surrogate_loss(prob * reward_fn(rec, out, rows), estimator=estimator, baseline=prob * b, backend=backend,
                           **kwargs).backward()
        for t, p in zip(total, params):
            if p.grad is not None:
                t -= p.grad  # the loss's gradient is minus the estimate
    return total


# ---- the same expectations from one batched pass ---------------------------------------------------
# Every (example, configuration) pair is one row of a batch whose samples are replayed; the estimate
# is per row and linear in the learning signal, so weighting each row's signal by its probability
# (times the number of configurations, to undo the batch mean) gives the exact expectation in one
# forward and one backward. The model must treat rows independently.

def joint_configurations(model, x):
    """([per call: every joint configuration's sample stacked, [C, ...]], C)."""
    combos = list(configurations(model, x))
    return [torch.cat([combo[k] for combo in combos]) for k in range(len(combos[0]))], len(combos)


def batched_rows(model, x):
    """(x repeated per configuration [N*C, ...], a function returning fresh replay samples for those
    rows, example index of each row [N*C], C). Row n*C + c is example n in configuration c."""
    per_call, count = joint_configurations(model, x)
    n = x.shape[0]
    xs = x.repeat_interleave(count, 0)

    def samples():
        return [s.repeat(n, *([1] * (s.dim() - 1))).clone() for s in per_call]

    return xs, samples, torch.arange(n).repeat_interleave(count), count


def exact_gradient_batched(model, params, x, reward_fn):
    """``exact_gradient`` in one batched pass."""
    xs, samples, rows, _ = batched_rows(model, x)
    for p in params:
        p.grad = None
    with record(replay=samples()) as rec:
        out = model(xs)
    (log_prob(rec).exp() * reward_fn(rec, out, rows)).sum().div(x.shape[0]).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def estimator_mean_batched(model, params, x, reward_fn, estimator, baseline=0.0, outputs=None, backend=None,
                           strict=False):
    """``estimator_mean`` in one batched pass; returns (mean, the record)."""
    xs, samples, rows, count = batched_rows(model, x)
    for p in params:
        p.grad = None
    with record(replay=samples(), strict=strict) as rec:
        out = model(xs)
    weight = log_prob(rec).exp().detach() * count
    b = baseline[rows] if isinstance(baseline, torch.Tensor) else baseline
    kwargs = {"outputs": outputs(rec, out)} if outputs is not None else {}
    rec.surrogate_loss(weight * reward_fn(rec, out, rows).detach(), estimator=estimator, baseline=weight * b,
                       backend=backend, **kwargs).backward()
    return [-p.grad if p.grad is not None else torch.zeros_like(p) for p in params], rec



# ---- objectives: E_q[f] for a recorded model whose scored calls define f ---------------------------

def objective_exact_gradient(model, params, x):
    """grad of mean_n E_q[f(x_n, z)] by enumerating the sampled calls (autograd through q and f)."""
    xs, samples, _, _ = batched_rows(model, x)
    for p in params:
        p.grad = None
    with record(replay=samples()) as rec:
        model(xs)
    (log_prob(rec).exp() * rec.elbo()).sum().div(x.shape[0]).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def objective_moments(model, params, x, estimator, baselines=None, **ablations):
    """The estimator's exact mean over the batch (per parameter), the record, and per example the
    elementwise variance of the per-example estimate over each sampled layer's [weight | bias]
    (a dict layer -> [N, out, in + 1]; a layer called more than once sums its calls)."""
    from hnca_kernels.objective import elbo_terms

    xs, samples, rows, count = batched_rows(model, x)
    for p in params:
        p.grad = None
    with record(replay=samples()) as rec:
        model(xs)
    weight = log_prob(rec).exp().detach()
    terms = elbo_terms(rec, estimator, baselines, **ablations)
    surrogate = terms.f
    for c, s in terms.signals:
        surrogate = surrogate + (c.logits * s).reshape(s.shape[0], -1).sum(-1)
    (weight * surrogate).sum().div(x.shape[0]).backward()
    mean = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    per_layer = {}
    for c, s in terms.signals:  # per row: (signal + dH/dl) outer [inputs, 1]
        g = (s + c.layer.entropy_logit_grad(c.logits.detach()).reshape(s.shape)).reshape(s.shape[0], -1)
        ones = c.inputs.new_ones(c.inputs.shape[0], 1)
        row_grad = g.unsqueeze(-1) * torch.cat([c.inputs.detach(), ones], -1).unsqueeze(1)
        per_layer[c.layer] = per_layer.get(c.layer, 0) + row_grad
    variance = {}
    for layer, g in per_layer.items():
        w = weight.view(x.shape[0], count, 1, 1)
        g = g.view(x.shape[0], count, *g.shape[1:])
        first, second = (w * g).sum(1), (w * g * g).sum(1)
        variance[layer] = second - first * first
    return mean, rec, variance
