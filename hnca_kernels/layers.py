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

from . import functional
from .backends import get_backend
from .record import _unwatched, active_records


def _join(layer: nn.Module, inputs: tuple) -> torch.Tensor:
    """The layer's input: the one argument, or the concatenation of several along the features."""
    name = type(layer).__name__
    if not inputs:
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
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {label} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper's initialisation: Glorot-uniform weights, zero bias.
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

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Sample the layer for the concatenation of ``inputs`` along the features.

        Inside ``hnca_kernels.record()`` the call is recorded (inputs [B, features] there).
        """
        records = active_records()
        if not records:
            return self._draw(_join(self, inputs))[1]
        with _unwatched(records):  # the layer's own operations are not paths between units
            x = _join(self, inputs)
            if x.dim() != 2:
                raise ValueError(f"inside record(), {type(self).__name__} takes inputs of shape [B, features], "
                                 f"got {tuple(x.shape)}")
            replaying = next((r for r in reversed(records) if r._replay is not None), None)
            if replaying is None:
                logits, sample = self._draw(x)
            else:
                logits = self._logits(x)
                sample = replaying._replayed(self, logits)
            for rec in records:
                rec._register(self, inputs, x, logits, sample)
        return sample

    def _message_weight(self, logits: torch.Tensor) -> torch.Tensor:
        # Under autocast the logits can be in a lower precision than the weight.
        return self.weight.detach().to(logits.dtype)


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

    def _draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and a sample; one fused kernel when the backend offers it (triton).

        The backend is ``use_backend``'s default, else the fastest for ``x``'s device. Under
        autocast, or for inputs whose dtype differs from the weight's, the unfused path runs.
        """
        fused = getattr(get_backend(None, x.device), "bernoulli_linear", None)
        if fused is None or x.dtype != self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super()._draw(x)
        logits, sample = fused(x.reshape(-1, self.in_features), self.weight, self.bias, *self.values)
        shape = (*x.shape[:-1], self.out_features)
        return logits.view(shape), sample.view(shape)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        lo, hi = self.values
        with torch.no_grad():
            # u < p written into u's own memory as 1.0 / 0.0 (the same draws and comparisons)
            # NOTE: at 50 x 200, `u < p` and the bool -> float cast took 17 + 18 us, lt_ 3 us.
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
        if not ((sample == lo) | (sample == hi)).all():
            raise ValueError(f"{name} must hold only {(lo, hi)}")
        return sample.to(device=logits.device, dtype=self.weight.dtype)

    def score(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """d log pi(sample) / d logits = [sample fired] - sigmoid(logits)."""
        return (sample > 0).to(logits.dtype) - torch.sigmoid(logits)

    def credit(self, logits: torch.Tensor, d: torch.Tensor, backend=None) -> torch.Tensor:
        """HNCA's signal per logit, p(1-p)(rho1 - rho0) = sigmoid(l + d) - sigmoid(l), from the
        children's log-ratio d [B, out]; the backend's fused pass where it has one (cpp)."""
        fused = getattr(get_backend(backend, logits.device), "logit_credit", functional.hnca_logit_credit)
        return fused(logits, d.to(logits.dtype))

    def log_prob(self, logits: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """log pi(sample | parents), summed over the units: [...]."""
        return F.logsigmoid(torch.where(sample > 0, logits, -logits)).sum(-1)

    def child_terms(self, weight, logits, sample):
        """As a child: one layer of Bernoulli units (weight [out, n], logits and sample [B, out])."""
        return [(weight, logits, sample)]

    def parent_message(self, sample, weight, logits, target, backend=None) -> torch.Tensor:
        """The log-ratio [B, out] that children with ``weight`` [*, out] (this layer's columns),
        ``logits`` and ``target`` (Bernoulli samples, or a softmax child's classes) send this layer."""
        x = sample.to(logits.dtype)
        if target.is_floating_point():
            return functional.counterfactual_log_ratio(x, weight, logits, target, parent_values=self.values,
                                                       backend=backend)
        return functional.categorical_counterfactual_log_ratio(x, weight, logits, target, parent_values=self.values,
                                                               backend=backend)

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
            if not self.one_hot:
                return idx
            return F.one_hot(idx, self.num_classes).to(self.weight.dtype).flatten(-2 if self.num_variables > 1 else -1)

    def check_sample(self, sample, logits, name="sample") -> torch.Tensor:
        """``sample`` as this layer's sample for ``logits``, after checking its shape and values."""
        index_shape = logits.shape[:-1]
        if self.one_hot:
            expected = (*logits.shape[:1], self.out_features) if self.num_variables > 1 else tuple(logits.shape)
            ok = isinstance(sample, torch.Tensor) and tuple(sample.shape) == tuple(expected)
            if ok:
                groups = sample.reshape(-1, self.num_classes)
                ok = bool((((groups == 0) | (groups == 1)).all() and (groups.sum(-1) == 1).all()).item())
            if not ok:
                raise ValueError(f"{name} must be one-hot rows of {self.num_classes} classes, shape {tuple(expected)}")
            return sample.to(device=logits.device, dtype=self.weight.dtype)
        if not isinstance(sample, torch.Tensor) or sample.shape != index_shape or sample.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor of shape {tuple(index_shape)}, got "
                             f"{getattr(sample, 'dtype', '')} {getattr(sample, 'shape', type(sample).__name__)}")
        if sample.numel() and (sample.min() < 0 or sample.max() >= self.num_classes):
            raise ValueError(f"{name} must hold class indices in [0, {self.num_classes})")
        return sample.to(logits.device)

    def _one_hot(self, sample, dtype) -> torch.Tensor:
        if self.one_hot:
            return sample.to(dtype)
        return F.one_hot(sample, self.num_classes).to(dtype)

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

    def child_terms(self, weight, logits, sample):
        """As a child: one softmax unit per variable (rows of ``weight``, logits [B, K], classes [B])."""
        classes = self.classes(sample)
        grouped = self._grouped(logits)
        K = self.num_classes
        return [(weight[v * K:(v + 1) * K], grouped[:, v], classes[:, v]) for v in range(self.num_variables)]

    def parent_message(self, sample, weight, logits, target, backend=None) -> torch.Tensor:
        """The log-ratio D [B, V, K] that children with ``weight`` [*, V*K] (this layer's columns),
        ``logits`` and ``target`` send this layer's one-hot sample."""
        if not self.one_hot:
            raise RuntimeError("a CategoricalLinear feeds other layers only with one_hot=True")
        return functional.categorical_parent_log_ratio(self.classes(sample), weight, logits, target, backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"num_variables={self.num_variables}, one_hot={self.one_hot}, bias={self.bias is not None}")
