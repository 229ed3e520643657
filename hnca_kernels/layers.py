"""Stochastic linear layers: Bernoulli units and softmax (categorical) units.

A layer computes logits like ``nn.Linear`` from the concatenation of its arguments and samples
from them; ``forward`` returns the sample. Inside ``hnca_kernels.record()`` each call also
registers its inputs, logits and sample, from which the estimators work. Besides ``forward`` a
layer exposes what the estimators need: ``score`` (d log pi(sample) / d logits, REINFORCE),
``credit`` (HNCA's learning signal per logit from its children's log-ratio), ``parent_message``
(the message its children send it) and ``child_terms`` (how it splits as a child).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, functional, relaxed, validation
from .record import _unwatched, active_records


def _join(layer: nn.Module, inputs: tuple, batch: int | None = None) -> torch.Tensor:
    """The layer's input: the one argument, or the concatenation of several along the features; for
    a layer without inputs (``in_features=0``, a learned prior) an empty [batch, 0] tensor."""
    name = type(layer).__name__
    if not inputs:
        if layer.in_features == 0 and batch is not None:
            return layer.weight.new_zeros(batch, 0)
        if layer.in_features == 0:
            raise TypeError(f"{name}(0, ...) takes no input: call it as a prior, layer(observed=value)")
        raise TypeError(f"{name} needs at least one input tensor")
    for k, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} expects tensors, got {type(t).__name__} as input {k}")
        if not t.is_floating_point():
            raise TypeError(f"{name} expects floating inputs, got {t.dtype} as input {k} (a class index? "
                            "use CategoricalLinear(..., one_hot=True) for a layer that feeds another)")
        if t.device != layer.weight.device:
            raise ValueError(f"input {k} is on {t.device} but {name}'s weight is on {layer.weight.device}")
        if t.dim() < 1 or t.shape[:-1] != inputs[0].shape[:-1]:
            raise ValueError(f"{name}'s inputs must share their leading dimensions, got shapes "
                             f"{[tuple(x.shape) for x in inputs]}")
    widths = [t.shape[-1] for t in inputs]
    if sum(widths) != layer.in_features:
        got = " + ".join(map(str, widths)) + f" = {sum(widths)}" if len(widths) > 1 else str(widths[0])
        raise ValueError(f"{name}({layer.in_features}, ...) expects inputs of shape [..., {layer.in_features}] "
                         f"(features of all arguments together), got {got} from shapes "
                         f"{[tuple(x.shape) for x in inputs]}")
    if len(inputs) == 1:
        return inputs[0]
    dtype = inputs[0].dtype
    for t in inputs[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.to(dtype) for t in inputs], dim=-1)


class _StochasticLinear(nn.Module):
    def __init__(self, in_features, out_features, bias, device, dtype):
        super().__init__()
        for label, value, least in (("in_features", in_features, 0), ("out_features", out_features, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise ValueError(f"{type(self).__name__}: {label} must be {kind} int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper's initialisation: Glorot-uniform weights, zero bias (a prior: zero logits).
        bound = math.sqrt(6.0 / (self.in_features + self.out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of x [..., in_features] (with autograd history)."""
        return self._logits(_join(self, (x,)))

    def logits_and_sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits (with autograd history) and a sample drawn from them; nothing is recorded."""
        return self._draw(_join(self, (x,)))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(x)
        return logits, self.sample(logits)

    def forward(self, *inputs: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the layer for the concatenation of ``inputs`` along the features; or, with
        ``observed=value``, score it: return ``value`` and, inside a record, register
        log p(value | inputs) as a component of the objective (``Record.elbo``). A layer with
        ``in_features=0`` (a learned prior, logits = bias) is called with no inputs.

        Inside ``hnca_kernels.record()`` the call is recorded (inputs [B, features] there).
        """
        records = active_records()
        if records and records[-1].branch is not None:  # a partial pass (DiscreteVAE's LOO and DisARM)
            position = records[-1]._branch_position(inputs, observed)
            if position != "downstream":
                return records[-1]._branch_call(self, inputs, observed, position)
        if observed is not None:
            return self._score_call(inputs, observed, records)
        if not records:
            return self._draw(_join(self, inputs))[1]
        with _unwatched(records):  # the layer's own operations are not paths between units
            x = _join(self, inputs)
            if x.dim() != 2:
                raise ValueError(f"inside record(), {type(self).__name__} takes inputs of shape [B, features], "
                                 f"got {tuple(x.shape)}")
            relaxed = next((r for r in reversed(records) if r.relax is not None), None)
            replaying = next((r for r in reversed(records) if r._replay is not None), None)
            if relaxed is not None:
                logits = self._logits(x)
                sample = self.straight_through(logits, relaxed.relax, relaxed.tau)
            elif replaying is None or not replaying._replays_next():
                logits, sample = self._draw(x)
            else:
                logits = self._logits(x)
                sample = replaying._replayed(self, logits)
            for rec in records:
                rec._register(self, inputs, x, logits, sample)
        return sample

    def _score_call(self, inputs, value, records) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"observed= must be a tensor, got {type(value).__name__}")
        if not records:
            return value
        with _unwatched(records):
            if value.dim() < 1:
                raise ValueError(f"observed= must be a batch of values [B, ...], got shape {tuple(value.shape)}")
            x = _join(self, inputs, batch=value.shape[0])
            if x.dim() != 2:
                raise ValueError(f"inside record(), {type(self).__name__} takes inputs of shape [B, features], "
                                 f"got {tuple(x.shape)}")
            logits = self._logits(x)
            checked = self.check_value(value, logits)
            for rec in records:
                rec._register(self, inputs, x, logits, checked, observed=value)
        return value

    def _message_weight(self, logits: torch.Tensor) -> torch.Tensor:
        # Under autocast the logits can be in a lower precision than the weight.
        return self.weight.detach().to(logits.dtype)

    def parent_message_and_entropy_delta(self, sample, weight, logits, target, child_classes=None, backend=None):
        """``(parent_message(...), parent_entropy_delta(...))`` of one sampled child: f-HNCA asks
        for both."""
        return (self.parent_message(sample, weight, logits, target, backend),
                self.parent_entropy_delta(sample, weight, logits, child_classes, backend))


class BernoulliLinear(_StochasticLinear):
    """A layer of Bernoulli units firing with probability sigmoid(x @ weight.T + bias).

    ``forward(*inputs)`` returns a float sample [..., out] with values in {0, 1}, or {-1, +1} when
    ``centered=True``. Several inputs are concatenated along the features (skip connections).
    Gradients do not flow through the sample: train it with an estimator (``hnca_kernels.record``).

    >>> layer = BernoulliLinear(784, 200, centered=True)
    >>> h = layer(x)  # [B, 200] of -1.0 / +1.0
    """

    def __init__(self, in_features, out_features, bias=True, centered=False, device=None, dtype=None):
        self.centered = bool(centered)
        super().__init__(in_features, out_features, bias, device, dtype)

    @property
    def values(self) -> tuple[float, float]:
        """(lo, hi): the unit's value when silent and when firing."""
        return (-1.0, 1.0) if self.centered else (0.0, 1.0)

    @property
    def sample_values(self) -> tuple:
        """Every value an element of a sample can hold."""
        return self.values

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        lo, hi = self.values
        if backends.draws_in_cpp(logits):
            return torch.ops.hnca.bernoulli_sample(logits.detach(), lo, hi, self.weight.dtype)
        with torch.no_grad():
            # u < p written into u's own memory as 1.0 / 0.0 (the same draws and comparisons): no
            # bool tensor and no cast, a few times faster at the paper's shape (benchmarks/RESULTS.md)
            fired = torch.rand_like(logits, dtype=torch.float32).lt_(torch.sigmoid(logits.float()))
            fired = fired.to(self.weight.dtype)
            if (lo, hi) == (0.0, 1.0):
                return fired
            # lo + (hi - lo) * fired: exact for both codings, cheaper than torch.where on scalars
            return fired.mul_(hi - lo).add_(lo)

    def check_sample(self, sample, logits, name="sample") -> torch.Tensor:
        """``sample`` as this layer's sample for ``logits``, after checking its shape and values."""
        lo, hi = self.values
        if not isinstance(sample, torch.Tensor) or sample.shape != logits.shape:
            raise ValueError(f"{name} must be a tensor of shape {tuple(logits.shape)}, got "
                             f"{getattr(sample, 'shape', type(sample).__name__)}")
        validation.require(sample.device, lambda: ((sample == lo) | (sample == hi)).all(),
                           ValueError(f"{name} must hold only {(lo, hi)}"))
        return sample.to(device=logits.device, dtype=self.weight.dtype)

    def indicator(self, sample: torch.Tensor, dtype) -> torch.Tensor:
        """[sample fired] per unit, as ``dtype``."""
        return (sample > 0).to(dtype)

    def score(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """d log pi(sample) / d logits = [sample fired] - sigmoid(logits)."""
        return self.indicator(sample, logits.dtype) - torch.sigmoid(logits)

    def credit(self, logits: torch.Tensor, d: torch.Tensor, backend=None) -> torch.Tensor:
        """HNCA's signal per logit, p(1-p)(rho1 - rho0) = sigmoid(l + d) - sigmoid(l), from the
        children's log-ratio d [B, out]; the backend's fused pass where it has one (cpp)."""
        return functional.hnca_logit_credit(logits, d.to(logits.dtype), backend=backend)

    def log_prob(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """log pi(sample | parents), summed over the units: [...]."""
        return F.logsigmoid(torch.where(sample > 0, logits, -logits)).sum(-1)

    # ---- what the objective's estimators need (hnca_kernels.objective) ----------------------------
    def log_prob_units(self, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """log pi(value | parents) per unit [B, out], differentiable in the logits and in the value
        (a straight-through sample carries a gradient)."""
        lo, hi = self.values
        fired = value if (lo, hi) == (0.0, 1.0) else (value - lo) / (hi - lo)
        return F.binary_cross_entropy_with_logits(logits, fired.to(logits.dtype), reduction="none").neg()

    def entropy_units(self, logits: torch.Tensor) -> torch.Tensor:
        """The analytic entropy of each unit [B, out] (nats)."""
        return functional.bernoulli_entropy(logits)

    def entropy_logit_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """d H / d logits per unit: -l p (1 - p)."""
        return -logits * torch.sigmoid(logits) * torch.sigmoid(-logits)

    def own_values(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi(unit = hi), log pi(unit = lo)) per unit [B, out]: a scored call's own components
        at both values of its value-parent's units. Both share log(1 + e^-|l|), one softplus; each
        keeps its relative accuracy (log sigmoid(l) - l would lose it where l << 0)."""
        shared = F.softplus(-logits.abs())
        return logits.clamp(max=0) - shared, logits.clamp(min=0).neg() - shared

    def check_value(self, value, logits) -> torch.Tensor:
        """An observed value's shape and dtype (its values: ``require_values``), in the layer's dtype."""
        if value.shape != logits.shape:
            raise ValueError(f"observed= must have shape {tuple(logits.shape)} (one value per unit), got "
                             f"{tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype == torch.bool):
            raise TypeError(f"observed= of a BernoulliLinear must be a floating tensor of {self.values}, got {value.dtype}")
        if value.device != logits.device:
            raise ValueError(f"observed= is on {value.device} but the layer's weight is on {logits.device}")
        return value if value.dtype == self.weight.dtype else value.to(self.weight.dtype)

    def require_values(self, value, name="observed=") -> None:
        lo, hi = self.values
        validation.require(value.device, lambda: ((value == lo) | (value == hi)).all(),
                           ValueError(f"{name} must hold only {(lo, hi)} (binarize the data first)"))

    @staticmethod
    def _sums(groups):
        """(sum of the messages [B, out], of the own components at hi and at lo from the draw)."""
        fed = own_hi = own_lo = None
        for change, at_draw, g in groups:
            if g.own:
                o_hi, o_lo = change
                own_hi = o_hi - at_draw if own_hi is None else own_hi + (o_hi - at_draw)
                own_lo = o_lo - at_draw if own_lo is None else own_lo + (o_lo - at_draw)
            else:
                fed = change if fed is None else fed + change
        return fed, own_hi, own_lo

    def objective_credit(self, logits, sample, d, weighted, orange, green) -> torch.Tensor:
        """f-HNCA's learning signal per logit for an objective (hnca_kernels.objective):
        p(1-p) [rho1 (C + up) - rho0 (C + down)] + p(1-p) (G(hi) - G(lo)), with the children's
        log-ratio ``d`` (None: no sampled children), C = ``weighted`` [B] (the components through
        the children, minus the baseline), up/down the orange components' change at hi/lo. Written
        with bounded products: credit(l, d) C + sigmoid(-l) sigmoid(l + d) up - sigmoid(l) sigmoid(-l - d) down."""
        p, q = torch.sigmoid(logits), torch.sigmoid(-logits)
        signal = torch.zeros_like(logits)
        if green:
            fed, own_hi, own_lo = self._sums(green)
            change = fed if own_hi is None else (own_hi - own_lo if fed is None else fed + (own_hi - own_lo))
            signal = signal + p * q * change
        if d is not None:
            signal = signal + functional.hnca_logit_credit(logits, d) * weighted.unsqueeze(-1)
            if orange:
                fed, up, down = self._sums(orange)
                if fed is not None:  # a message moves the value the unit does not have
                    fired = (sample == self.values[1]).to(logits.dtype)
                    up = fed - fed * fired if up is None else up + (fed - fed * fired)
                    down = -fed * fired if down is None else down - fed * fired
                signal = signal + q * torch.sigmoid(logits + d) * up - p * torch.sigmoid(-logits - d) * down
        return signal

    def straight_through(self, logits, estimator, tau) -> torch.Tensor:
        """An exact sample whose gradient is a straight-through estimator's (``hnca_kernels.relaxed``)."""
        lo, hi = self.values
        fired = relaxed.straight_through_bernoulli(logits, estimator, tau)
        return fired if (lo, hi) == (0.0, 1.0) else fired * (hi - lo) + lo

    def child_view(self, weight, logits, target):
        """As a child: (its weight columns [out, n], logits [B, out], Bernoulli target [B, out], None)."""
        return weight, logits, target, None

    def parent_message(self, sample, weight, logits, target, backend=None) -> torch.Tensor:
        """The log-ratio [B, out] that children with ``weight`` [*, out] (this layer's columns),
        ``logits`` and ``target`` (Bernoulli samples or values, or a softmax child's classes
        [B] / [B, V] with logits [B, K] / [B, V, K]) send this layer."""
        x = sample.to(logits.dtype)
        if target.is_floating_point():
            return functional.counterfactual_log_ratio(x, weight, logits, target, parent_values=self.values,
                                                       backend=backend)
        return functional.categorical_counterfactual_log_ratio(x, weight, logits, target, parent_values=self.values,
                                                               backend=backend)

    def parent_entropy_delta(self, sample, weight, logits, child_classes=None, backend=None) -> torch.Tensor:
        """The change [B, out] of a sampled child's entropy when each unit of this layer is set to hi,
        not lo (Bernoulli children, or softmax ones of ``child_classes`` classes)."""
        x = sample.to(logits.dtype)
        if child_classes is None:
            return functional.counterfactual_entropy_delta(x, weight, logits, parent_values=self.values,
                                                           backend=backend)
        return functional.categorical_entropy_delta(x, weight, logits, parent_values=self.values, backend=backend)

    def parent_message_and_entropy_delta(self, sample, weight, logits, target, child_classes=None, backend=None):
        if child_classes is not None:
            return super().parent_message_and_entropy_delta(sample, weight, logits, target, child_classes, backend)
        # Bernoulli children: one call, which a backend may fuse (the entropy's products give the log-ratio)
        return functional.counterfactual_log_ratio_and_entropy_delta(sample.to(logits.dtype), weight, logits, target,
                                                                     parent_values=self.values, backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, centered={self.centered}")


class CategoricalLinear(_StochasticLinear):
    """``num_variables`` independent softmax units over ``num_classes`` choices each, with logits
    x @ weight.T + bias (weight [num_variables * num_classes, in]; rows v*K..v*K+K-1 are variable v).

    ``forward(*inputs)`` returns the sampled classes, a LongTensor [...] (or [..., num_variables]);
    with ``one_hot=True`` it returns them one-hot, floats [..., num_variables * num_classes], which
    later layers can take as input (categorical hidden units). Logits are [..., num_classes], or
    [..., num_variables, num_classes] when num_variables > 1.

    >>> z = CategoricalLinear(784, 10, num_variables=20, one_hot=True)(x)   # [B, 200] one-hot
    """

    def __init__(self, in_features, num_classes, num_variables=1, one_hot=False, bias=True, device=None,
                 dtype=None):
        for label, value in (("num_classes", num_classes), ("num_variables", num_variables)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CategoricalLinear: {label} must be a positive int, got {value!r}")
        self.num_classes, self.num_variables, self.one_hot = num_classes, num_variables, bool(one_hot)
        super().__init__(in_features, num_variables * num_classes, bias, device, dtype)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        flat = super()._logits(x)
        if self.num_variables == 1:
            return flat
        return flat.unflatten(-1, (self.num_variables, self.num_classes))

    @property
    def sample_values(self) -> tuple:
        """Every value an element of a sample can hold (one-hot entries, or class indices)."""
        return (0.0, 1.0) if self.one_hot else tuple(float(k) for k in range(self.num_classes))

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        # [B, (V,) K] -> [B, V, K]
        return t.reshape(t.shape[0], self.num_variables, self.num_classes)

    def classes(self, sample: torch.Tensor) -> torch.Tensor:
        """The class of each variable [..., V] (from indices, or from a one-hot sample)."""
        if not self.one_hot:
            return sample if self.num_variables > 1 else sample.unsqueeze(-1)
        return sample.unflatten(-1, (self.num_variables, self.num_classes)).argmax(-1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        if backends.draws_in_cpp(logits):
            idx = torch.ops.hnca.categorical_sample(logits.detach())
            return self._coded(idx)
        with torch.no_grad():
            # Inverse CDF: the class is the number of cumulative probabilities below u, a uniform
            # in (0, total]: rand's 0 taken as 1, scaled by the last cumulative sum (which rounding
            # can leave below 1). A class of probability 0 spans an empty interval (c_{k-1}, c_k] and
            # is never drawn, whatever the uniform. Not torch.multinomial: its CUDA checks
            # synchronise the host (no graph capture).
            cdf = torch.softmax(logits.float(), dim=-1).cumsum_(-1)
            u = torch.rand_like(cdf[..., :1])
            u = u.masked_fill_(u == 0, 1.0).mul_(cdf[..., -1:])
            idx = (cdf < u).sum(-1)
            return self._coded(idx)

    def _coded(self, idx: torch.Tensor) -> torch.Tensor:
        """Drawn classes [..., V] as this layer's sample: the indices, or their one-hot vectors."""
        if not self.one_hot:
            return idx
        return F.one_hot(idx, self.num_classes).to(self.weight.dtype).flatten(-2 if self.num_variables > 1 else -1)

    def check_sample(self, sample, logits, name="sample", shape=True, values=True) -> torch.Tensor:
        """``sample`` as this layer's sample for ``logits``, after checking its shape and values."""
        if not isinstance(sample, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(sample).__name__}")
        if self.one_hot:
            if shape:
                expected = (logits.shape[0], self.out_features) if self.num_variables > 1 else tuple(logits.shape)
                if tuple(sample.shape) != tuple(expected):
                    raise ValueError(f"{name} must be one-hot rows of {self.num_classes} classes, shape {expected}, "
                                     f"got {tuple(sample.shape)}")
                if not sample.is_floating_point():
                    raise TypeError(f"{name} must be a floating one-hot tensor, got {sample.dtype}")
            if values:
                groups = sample.reshape(-1, self.num_classes)
                validation.require(sample.device, lambda: (((groups == 0) | (groups == 1)).all()
                                                           & (groups.sum(-1) == 1).all()),
                                   ValueError(f"{name} must be one-hot rows of {self.num_classes} classes"))
            return sample if logits is None else sample.to(device=logits.device, dtype=self.weight.dtype)
        if shape and (sample.shape != logits.shape[:-1] or sample.dtype != torch.int64):
            raise ValueError(f"{name} must be an int64 tensor of shape {tuple(logits.shape[:-1])}, got "
                             f"{sample.dtype} {tuple(sample.shape)}")
        if values and sample.numel():
            validation.require(sample.device, lambda: ((sample >= 0) & (sample < self.num_classes)).all(),
                               ValueError(f"{name} must hold class indices in [0, {self.num_classes})"))
        return sample if logits is None else sample.to(logits.device)

    def _one_hot(self, sample, dtype) -> torch.Tensor:
        if self.one_hot:
            return sample.to(dtype)
        return F.one_hot(sample, self.num_classes).to(dtype)

    def indicator(self, sample: torch.Tensor, dtype) -> torch.Tensor:
        """onehot(sample) [B, V * K] (or [B, K]), as ``dtype``."""
        return self._one_hot(sample, dtype).reshape(sample.shape[0], -1)

    def score(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """d log pi(sample) / d logits = onehot(sample) - softmax(logits)."""
        return self._one_hot(sample, logits.dtype).view(logits.shape) - torch.softmax(logits, dim=-1)

    def credit(self, logits: torch.Tensor, d: torch.Tensor, backend=None) -> torch.Tensor:
        """HNCA's signal per logit, softmax(l + D) - softmax(l) (posterior minus prior of each class),
        from the children's log-ratio D [B, V, K]."""
        grouped = self._grouped(logits)
        return (torch.softmax(grouped + d.to(logits.dtype), -1) - torch.softmax(grouped, -1)).view(logits.shape)

    def log_prob(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """log pi(sample | parents), summed over the variables: [...]."""
        logp = F.log_softmax(logits, dim=-1)
        if self.num_variables == 1:
            return logp.gather(-1, self.classes(sample)).squeeze(-1)
        return logp.gather(-1, self.classes(sample).unsqueeze(-1)).squeeze(-1).sum(-1)

    # ---- what the objective's estimators need (hnca_kernels.objective) ----------------------------
    def log_prob_units(self, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """log pi(value | parents) per variable [B, V]; a one-hot value is read as a weighted sum, so
        a straight-through sample's gradient flows."""
        logp = F.log_softmax(self._grouped(logits), dim=-1)
        if self.one_hot:
            return (self._grouped(value).to(logp.dtype) * logp).sum(-1)
        return logp.gather(-1, self.classes(value).unsqueeze(-1)).squeeze(-1)

    def entropy_units(self, logits: torch.Tensor) -> torch.Tensor:
        """The analytic entropy of each variable [B, V] (nats)."""
        logp = F.log_softmax(self._grouped(logits), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def entropy_logit_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """d H / d logits per class [B, V, K]: -pi_k (log pi_k + H)."""
        logp = F.log_softmax(self._grouped(logits), dim=-1)
        p = logp.exp()
        return -p * (logp - (p * logp).sum(-1, keepdim=True))

    def own_values(self, logits: torch.Tensor) -> torch.Tensor:
        """log pi(variable = k) [B, V, K]: a scored call's own components at every class of its
        value-parent's variables."""
        return F.log_softmax(self._grouped(logits), dim=-1)

    def check_value(self, value, logits) -> torch.Tensor:
        """An observed value's shape and dtype (its values: ``require_values``)."""
        return self.check_sample(value, logits, "observed=", values=False)

    def require_values(self, value, name="observed=") -> None:
        self.check_sample(value, None, name, shape=False)

    def _changes(self, sample, groups):
        """Per variable and class, the groups' change from the draw [B, V, K]."""
        total = None
        for change, at_draw, g in groups:
            delta = change - at_draw.unsqueeze(-1) if g.own else change
            total = delta if total is None else total + delta
        return total

    def objective_credit(self, logits, sample, d, weighted, orange, green) -> torch.Tensor:
        """f-HNCA's learning signal per logit for an objective (hnca_kernels.objective): with
        pi = softmax(l), post = softmax(l + D) (``d`` = D [B, V, K], None: no sampled children),
        X(k) = C + O(k) (C = ``weighted`` [B], O the orange components' change at class k) and G the
        green components' change,
            signal_m = post_m X(m) - pi_m sum_k post_k X(k) + pi_m (G(m) - sum_k pi_k G(k))."""
        grouped = self._grouped(logits)
        pi = torch.softmax(grouped, -1)
        signal = None
        if green:
            g = self._changes(sample, green)
            signal = pi * (g - (pi * g).sum(-1, keepdim=True))
        if d is not None:
            post = torch.softmax(grouped + d.to(logits.dtype), -1)
            rho = (post - pi) * weighted.view(-1, 1, 1)
            if orange:
                o = self._changes(sample, orange)
                rho = rho + post * o - pi * (post * o).sum(-1, keepdim=True)
            signal = rho if signal is None else signal + rho
        return (signal if signal is not None else torch.zeros_like(pi)).reshape(logits.shape)

    def straight_through(self, logits, estimator, tau) -> torch.Tensor:
        """An exact one-hot sample whose gradient is a straight-through estimator's."""
        if not self.one_hot:
            raise ValueError("a straight-through sample is one-hot: use CategoricalLinear(..., one_hot=True)")
        y = relaxed.straight_through(self._grouped(logits), estimator, tau)
        return y.reshape(logits.shape[0], self.out_features)

    def child_view(self, weight, logits, target):
        """As a child: (weight columns [V*K, n], logits [B, K] or [B, V, K], classes [B] or [B, V], K)."""
        classes = self.classes(target)
        if self.num_variables == 1:
            return weight, logits.reshape(logits.shape[0], self.num_classes), classes.reshape(-1), self.num_classes
        return weight, self._grouped(logits), classes, self.num_classes

    def parent_message(self, sample, weight, logits, target, backend=None) -> torch.Tensor:
        """The log-ratio D [B, V, K] that children with ``weight`` [*, V*K] (this layer's columns),
        ``logits`` and ``target`` send this layer's one-hot sample."""
        if not self.one_hot:
            raise RuntimeError("a CategoricalLinear feeds other layers only with one_hot=True")
        return functional.categorical_parent_log_ratio(self.classes(sample), weight, logits, target, backend=backend)

    def parent_entropy_delta(self, sample, weight, logits, child_classes=None, backend=None) -> torch.Tensor:
        """The change D [B, V, K] of a sampled child's entropy when variable v is switched to class k."""
        return functional.categorical_parent_entropy_delta(self.classes(sample), weight, logits,
                                                           child_classes=child_classes, backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"num_variables={self.num_variables}, one_hot={self.one_hot}, bias={self.bias is not None}")
