"""Estimators for a known objective on any recorded graph: f-HNCA (paper Sec. 2, Eq. 6-7), the
graph's REINFORCE, and the straight-through estimators; ``Record.elbo`` and ``Record.elbo_loss``.

The objective per example is f = sum over scored calls (``layer(*inputs, observed=value)``) of
log p(value | inputs) + sum over sampled calls of their analytic entropy: one component per unit
(a Bernoulli unit, or a categorical variable). For a VAE written with an encoder that samples and
a decoder and prior that score, f is the ELBO. The scored layers' parameters get autograd's exact
gradient of f at the samples; each sampled call gets a learning signal on its logits (plus
autograd's gradient of its own entropy). For unit j of sampled call c every component k is

    direct      k's call takes c's sample as an input, or k is unit j's own component in a scored
                call whose value is c's sample;
    through     k's call depends (through its inputs or value) on a descendant of c: a sampled call
                that takes c's sample, or the sample of such a call, and so on;
    neither     left out: it does not depend on c's sample given c's inputs.

f-HNCA's estimate for the unit is, with rho(phi) from c's sampled children (docs/math.md, section 2),

    sum_phi d pi_j(phi)/d theta * [ rho(phi) * (S_c - b_c + sum_{orange k} (f_k(phi) - f_k(drawn)))
                                    + sum_{green k} f_k(phi) ]

where S_c sums the components through the children at their drawn values (one scalar per example),
b_c is its moving average from earlier batches, orange components are direct and through, green
ones direct only. The counterfactual values of direct components are messages of the backends:
a scored call's log-probability at its value, a sampled call's entropy. A unit whose sample the
record could not follow to every component (``Record.fallbacks``) gets REINFORCE with its call's
downstream sum instead, as every unit does with ``estimator="reinforce"`` (Pyro's
TraceGraph_ELBO); both are unbiased. The exact enumeration tests are the judge of all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import relaxed
from .baseline import MovingAverageBaseline, update_baselines

ESTIMATORS = ("hnca", "reinforce") + relaxed.BIASED_ESTIMATORS

__all__ = ["ESTIMATORS", "objective", "elbo_loss", "elbo_terms", "finish_loss"]


def _components(rec) -> list:
    """Per call, its components [B, units] with autograd history: a scored call's log-probabilities
    of its value, a sampled call's entropies."""
    return [c.layer.log_prob_units(c.logits, c.sample) if c.observed else c.layer.entropy_units(c.logits)
            for c in rec.calls]


def objective(rec, components=None) -> torch.Tensor:
    """f per example [B]: the sum of every call's components."""
    components = _components(rec) if components is None else components
    total = components[0].sum(-1)
    for comp in components[1:]:
        total = total + comp.sum(-1)
    return total


# ---- the graph ------------------------------------------------------------------------------------
@dataclass
class _Graph:
    """Which calls each call's components depend on, from the record's edges."""

    depends: list                       # per call: the sampled calls its components depend on
    descendants: list                   # per sampled call index: the sampled calls that depend on it
    downstream: list = field(default_factory=list)  # per call index: the calls depending on it


def _graph(rec) -> _Graph:
    depends = []
    for k in rec.calls:  # calls come in order: every source is an earlier call
        sources = set(k.parents) | set(k.tainted_by)
        if k.value_source is not None:
            sources.add(k.value_source)
        deps = set()
        for s in sources:
            deps.add(s)
            deps |= depends[s.index]
        depends.append(deps)
    descendants = [set() for _ in rec.calls]
    downstream = [[] for _ in rec.calls]
    for k in rec.calls:
        for s in depends[k.index]:
            downstream[s.index].append(k)
            if not k.observed:
                descendants[s.index].add(k)
    return _Graph(depends, descendants, downstream)


@dataclass
class _Group:
    """Components of one call that depend on a unit of c directly: all of a call fed c's sample
    (``own`` False), or the unit's own component in a scored call whose value is c's sample."""

    call: object
    own: bool
    through: bool


def _direct_groups(rec, graph: _Graph, c) -> list:
    groups = []
    descendants = graph.descendants[c.index]
    for k in rec.calls:
        fed, own = c in k.parents, k.value_source is c
        if fed or own:  # (both: a fallback, see Record._register_value)
            groups.append(_Group(k, own, bool(graph.depends[k.index] & descendants)))
    return groups


# ---- estimators -----------------------------------------------------------------------------------
@dataclass
class ObjectiveTerms:
    """What an estimate of grad E[f] is made of: f [B] (with autograd), and per sampled call its
    learning signal on the logits ([B, out] or [B, V, K]) and the signal its baseline tracks."""

    f: torch.Tensor
    signals: list                       # (call, signal) for every sampled call
    tracked: list                       # (baseline, signal [B]) pairs to fold in after the step


def _check_baselines(baseline, calls: list):
    if baseline is None:
        return None
    if isinstance(baseline, MovingAverageBaseline):
        baseline = [baseline]
    try:
        baselines = list(baseline)
    except TypeError:
        raise TypeError("baseline must be None or a sequence (e.g. nn.ModuleList) of MovingAverageBaseline, "
                        f"one per sampled call, got {type(baseline).__name__}") from None
    if len(baselines) != len(calls) or not all(isinstance(b, MovingAverageBaseline) for b in baselines):
        raise ValueError(f"baseline must hold one MovingAverageBaseline per sampled call ({len(calls)} in this "
                         f"record), got {len(baselines)} items: hnca_kernels.CallBaselines({len(calls)})")
    return baselines


def elbo_terms(rec, estimator: str = "hnca", baseline=None, backend: str | None = None, *, rho_direct: bool = False,
               upstream: bool = False, direct_in_baseline: bool | None = None) -> ObjectiveTerms:
    """The estimate's parts (see ``elbo_loss``); the baselines are read, not updated."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if (estimator in relaxed.BIASED_ESTIMATORS) != (rec.relax is not None) or (rec.relax not in (None, estimator)):
        raise ValueError(f"estimator {estimator!r} needs a record made with "
                         f"{'record(relax=%r)' % estimator if estimator in relaxed.BIASED_ESTIMATORS else 'record()'}, "
                         f"this one has relax={rec.relax!r}")
    rec._batch()
    sampled = rec.sampled_calls
    if not sampled:
        raise RuntimeError("the record holds no sampled call: there is nothing to estimate")
    if not rec.scored_calls:
        raise RuntimeError("the record holds no scored call (layer(..., observed=value)): an objective needs "
                           "its log-probabilities; for a reward use surrogate_loss")
    components = _components(rec)
    f = objective(rec, components)
    if rec.relax is not None:
        return ObjectiveTerms(f, [], [])
    baselines = _check_baselines(baseline, sampled)
    direct_in_baseline = rho_direct if direct_in_baseline is None else bool(direct_in_baseline)
    graph = _graph(rec)
    with torch.no_grad():
        values = [comp.detach().sum(-1) for comp in components]  # each call's components at the draws
        total = values[0]
        for v in values[1:]:
            total = total + v
        signals, tracked = [], []
        for n, c in enumerate(sampled):
            b = baselines[n] if baselines is not None else None
            if estimator == "hnca" and not c.unmodeled:
                signal, mediated = _hnca_signal(rec, graph, c, components, values, total, b, backend,
                                                rho_direct, upstream, direct_in_baseline)
            else:
                signal, mediated = _reinforce_signal(graph, c, values, total, b, upstream)
            signals.append((c, signal))
            if b is not None and mediated is not None:
                tracked.append((b, mediated))
    return ObjectiveTerms(f, signals, tracked)


def _reinforce_signal(graph, c, values, total, baseline, upstream):
    """score x (the call's downstream sum - b): the components that depend on its sample."""
    if upstream:
        downstream = total
    else:
        downstream = torch.zeros_like(total)
        for k in graph.downstream[c.index]:
            downstream = downstream + values[k.index]
    signal = downstream if baseline is None else downstream - baseline.value.to(downstream)
    score = c.layer.score(c.logits.detach(), c.sample)
    return score * signal.view(-1, *([1] * (score.dim() - 1))), downstream


def _hnca_signal(rec, graph, c, components, values, total, baseline, backend, rho_direct, upstream,
                 direct_in_baseline):
    """f-HNCA's learning signal on c's logits, and the sum its baseline tracks (None: no baseline)."""
    from .record import _message, _message_and_entropy, _parents_of

    layer, logits = c.layer, c.logits.detach()
    descendants = graph.descendants[c.index]
    children = [k for k in c.children if not k.observed]
    groups = _direct_groups(rec, graph, c)
    # a sampled child's entropy (a direct component, below) comes with its log-ratio in one call
    entropic = {g.call.index for g in groups if not g.own and not g.call.observed}
    entropy = {}
    rho = None  # the sampled children's log-ratio
    for k in children:
        if k.index in entropic:
            m, entropy[k.index] = _message_and_entropy(c, k, _parents_of(k)[c], backend)
        else:
            m = _message(c, k, _parents_of(k)[c], backend)
        rho = m if rho is None else rho + m
    # S: the components through the children, at the draws (upstream ablation: all but the green)
    through = torch.zeros_like(total)
    for k in rec.calls:
        if graph.depends[k.index] & descendants:
            through = through + values[k.index]
    green, orange = [], []  # (group, change of the group's components [B, out] or [B, V, K], value at draw)
    for g in groups:
        k = g.call
        if g.own:
            change, at_draw = k.layer.own_values(k.logits.detach()), components[k.index].detach()
        elif k.observed:
            change, at_draw = _message(c, k, _parents_of(k)[c], backend), values[k.index]
        else:  # a sampled child's entropy, computed with its log-ratio above
            change, at_draw = entropy[k.index], values[k.index]
        (orange if g.through else green).append((change, at_draw, g))
    if rho is None:
        # no sampled children: rho = 1, nothing is through them, every direct component is green
        return _direct_only(layer, logits, c.sample, green + orange), None
    green_at_draw = torch.zeros_like(total)
    for _, at_draw, g in green:
        green_at_draw = green_at_draw + (at_draw.sum(-1) if g.own else at_draw)
    mediated = total - green_at_draw if upstream else through
    weighted = mediated
    if rho_direct:  # the green components move into the rho-weighted sum
        weighted, orange, green = mediated + green_at_draw, orange + green, []
    tracked = weighted if direct_in_baseline else mediated
    if baseline is not None:
        weighted = weighted - baseline.value.to(weighted)
    signal = layer.objective_credit(logits, c.sample, rho, weighted, orange, green)
    return signal, tracked


def _direct_only(layer, logits, sample, groups):
    """The signal of a unit without sampled children: its direct components' change alone."""
    return layer.objective_credit(logits, sample, None, None, [], groups)


# ---- the loss -------------------------------------------------------------------------------------
class _ScorePart(torch.autograd.Function):
    """Value 0; gradient -signal_k / B with respect to each sampled call's logits_k."""

    @staticmethod
    def forward(ctx, signals, *logits):
        ctx.save_for_backward(*signals)
        return logits[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        signals = ctx.saved_tensors
        factor = grad / -signals[0].shape[0]
        return (None, *(s * factor.to(s.dtype) for s in signals))


def elbo_loss(rec, estimator: str = "hnca", baseline=None, backend: str | None = None, *, rho_direct: bool = False,
              upstream: bool = False, direct_in_baseline: bool | None = None) -> torch.Tensor:
    """A scalar equal to -mean f whose ``.backward()`` writes the estimate of -grad E[f] (batch mean)
    into every ``.grad``.

    Args:
        estimator: ``"hnca"`` (f-HNCA; REINFORCE with the downstream sum for the units in
            ``rec.fallbacks``), ``"reinforce"`` (every unit), or for a ``record(relax=...)`` its
            straight-through estimator (``"gumbel_st"``, ``"reinmax"``: biased).
        baseline: None, or one ``MovingAverageBaseline`` per sampled call in call order
            (``hnca_kernels.CallBaselines(n)``): each call's learning signal subtracts its value
            from earlier batches, then folds in this batch's (f-HNCA: the components through the
            children; REINFORCE: the downstream sum); one all-reduce under torch.distributed.
        backend: backend of the messages (default: ``use_backend``'s, else automatic).
        rho_direct, upstream, direct_in_baseline: f-HNCA's ablations (paper Appendix K): rho on
            the direct components too; the upstream components in the rho-weighted sum; with
            rho_direct, whether the baseline tracks the direct components as well (default: yes).
            All unbiased, with other variances.
    """
    terms = elbo_terms(rec, estimator, baseline, backend, rho_direct=rho_direct, upstream=upstream,
                       direct_in_baseline=direct_in_baseline)
    if estimator == "hnca" and not torch.compiler.is_compiling():
        from .record import _warn_fallbacks

        _warn_fallbacks(rec)
    return finish_loss(rec, terms)


def finish_loss(rec, terms: ObjectiveTerms) -> torch.Tensor:
    """The loss of ``terms`` (see ``elbo_loss``), after folding this batch into the baselines."""
    if terms.tracked:
        update_baselines(terms.tracked)  # after every signal read them: earlier batches only
    loss = -terms.f.mean()
    if rec.relax is not None:
        catcher = _LogitGrads([c.logits for c in rec.sampled_calls])
        sampled = rec.sampled_calls  # not rec itself: the record holding a closure over it is a cycle
        rec._scores = lambda: list(zip(sampled, catcher.per_example()))
        return catcher.watch(loss)
    calls = [c for c, _ in terms.signals]
    signals = tuple(s for _, s in terms.signals)

    def per_example():  # the metric's per-example estimate in the logits: signal + dH/dl
        return [(c, s + c.layer.entropy_logit_grad(c.logits.detach()).reshape(s.shape)) for c, s in terms.signals]

    rec._scores = per_example
    return loss + _ScorePart.apply(signals, *(c.logits for c in calls))


class _LogitGrads:
    """The gradient of a step's loss in each sampled call's logits, caught as backward writes it: a
    straight-through estimate has no signal of its own, only what autograd computes. ``watch`` also
    catches the factor the loss was scaled by (a DDP rank's loss weight), so the per-example
    estimate does not depend on how the caller scales the loss."""

    def __init__(self, logits):
        self.grads: list = [None] * len(logits)
        self.scale = None
        for k, l in enumerate(logits):
            if l.requires_grad:
                l.register_hook(self._catcher(k))

    def _catcher(self, k):
        def catch(grad):
            self.grads[k] = grad

        return catch

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        return _CatchScale.apply(loss, self)

    def per_example(self) -> list:
        if self.scale is None or any(g is None for g in self.grads):
            raise RuntimeError("a straight-through estimate's gradient statistics need loss.backward() first")
        # the loss is -mean f (times scale): its logit gradient is -scale/B times each example's
        return [g * (-g.shape[0] / self.scale) for g in self.grads]


class _CatchScale(torch.autograd.Function):
    """The identity on the loss, whose backward keeps the gradient it receives."""

    @staticmethod
    def forward(ctx, loss, holder):
        ctx.holder = holder
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.holder.scale = grad
        return grad, None
