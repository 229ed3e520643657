"""Discrete VAEs written with the record: the encoder samples, the decoder and the prior score.

A model defines ``model(x)``, the program a record watches: each encoder layer is called on its
input (a sampled call) and each decoder layer and the prior with ``observed=`` (scored calls). The
objective f = sum of the scored log-probabilities + the encoder's analytic entropies is the ELBO
(paper Eq. 7), and every estimator of ``ESTIMATORS`` trains the same program:

    hnca, hnca_baseline                 f-HNCA (``Record.elbo_loss``), with per-call baselines
    reinforce, reinforce_baseline       REINFORCE with each call's downstream sum
    reinforce_loo, disarm               two samples per encoder layer, each with a partial pass
                                        of the program from that layer (DisARM: Bernoulli only)
    gumbel_st, reinmax                  straight-through, BIASED (``record(relax=...)``)

``BernoulliVAE`` is the paper's hierarchical VAE of 0/1 units; ``CategoricalVAE`` has one-hot
categorical latents (``variables`` x ``classes``), as in the Gumbel-softmax paper's MNIST VAE.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .. import validation
from ..baseline import CallBaselines, update_baselines
from ..layers import BernoulliLinear, CategoricalLinear
from ..objective import ObjectiveTerms, elbo_terms, finish_loss, objective
from ..record import Record, record
from ..relaxed import BIASED_ESTIMATORS

UNBIASED_ESTIMATORS = ("hnca", "hnca_baseline", "reinforce", "reinforce_baseline", "reinforce_loo", "disarm")
ESTIMATORS = UNBIASED_ESTIMATORS + BIASED_ESTIMATORS
_BRANCHED = ("reinforce_loo", "disarm")  # two samples per layer, each with a partial pass
_ON_THE_RECORD = {"hnca": ("hnca", False), "hnca_baseline": ("hnca", True),
                  "reinforce": ("reinforce", False), "reinforce_baseline": ("reinforce", True)}


def _positive_int(name, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DiscreteVAE(nn.Module):
    """A VAE whose latents are stochastic layers, trained by any estimator of ``ESTIMATORS``.

    Subclasses build ``self.encoder`` (the sampled layers, in the order ``model`` calls them),
    ``self.decoder``, ``self.prior`` and define ``model(x)`` and ``generate(n)``; this class adds
    the estimators, the bounds and the checks. One baseline per encoder layer (``self.baselines``)
    serves the ``*_baseline`` estimators.

    Ablations (paper Appendix K), for f-HNCA: ``rho_direct``, ``direct_in_baseline``, ``upstream``
    (see ``hnca_kernels.objective.elbo_loss``).
    """

    def __init__(self, data_dim: int, *, rho_direct: bool = False, direct_in_baseline: bool | None = None,
                 upstream: bool = False, baseline_decay: float = 0.99, tau: float = 1.0, backend: str | None = None):
        super().__init__()
        self.data_dim = _positive_int("data_dim", data_dim)
        self.rho_direct, self.upstream, self.backend = bool(rho_direct), bool(upstream), backend
        self.direct_in_baseline = self.rho_direct if direct_in_baseline is None else bool(direct_in_baseline)
        if not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self._baseline_decay = baseline_decay

    def _add_baselines(self, device) -> None:
        self.baselines = CallBaselines(len(self.encoder), self._baseline_decay).to(device)

    # ---- what a subclass defines --------------------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        """The program a record watches: sample the encoder, score the decoder and the prior."""
        raise NotImplementedError

    def generate(self, n: int) -> torch.Tensor:
        """Ancestral samples from the prior through the decoder: the pixel means [n, data_dim]."""
        raise NotImplementedError

    # ---- checks -------------------------------------------------------------------------------
    @property
    def _dtype(self):
        return self.prior.bias.dtype

    @property
    def num_layers(self) -> int:
        return len(self.encoder)

    def _check_x(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {tuple(x.shape)}")
        if x.dtype != self._dtype:
            raise TypeError(f"x must have the model's dtype {self._dtype}, got {x.dtype} (binarize and cast first)")
        if x.device != self.prior.bias.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.prior.bias.device}")
        validation.require(x.device, lambda: ((x == 0) | (x == 1)).all(), ValueError(
            "x must be binary (0./1. pixels): binarize the intensities first (hnca_kernels.data.binarize)"))

    def _check_layers(self) -> None:
        """Hook for a subclass: the layers it trains are of the kind its estimators assume."""

    def _check_latents(self, latents, batch, name="latents", first=0) -> list:
        count = self.num_layers - first
        if not isinstance(latents, (list, tuple)) or len(latents) != count:
            got = f"{len(latents)} items" if isinstance(latents, (list, tuple)) else type(latents).__name__
            raise ValueError(f"{name} must be a list of {count} tensors (one per layer), got {got}")
        for k, (z, layer) in enumerate(zip(latents, list(self.encoder)[first:])):
            expected = (batch, layer.out_features)
            if not isinstance(z, torch.Tensor) or tuple(z.shape) != expected or z.dtype != self._dtype:
                raise ValueError(f"{name}[{k}] must be a {self._dtype} tensor of shape {expected}")
            layer.require_values(z, f"{name}[{k}]")
        return [z.to(self.prior.bias.device) for z in latents]

    # ---- passes -------------------------------------------------------------------------------
    def _record(self, x, latents=None, relax=None) -> Record:
        # x and any latents are checked by the callers: the program's own value checks are not repeated
        with validation.checks("off"), record(replay=latents, relax=relax, tau=self.tau) as rec:
            self.model(x)
        return rec

    @torch.no_grad()
    def sample_latents(self, x: torch.Tensor) -> list:
        """One draw of the latents [Phi_1, ..., Phi_L] from the encoder q(. | x)."""
        self._check_layers()
        return [c.sample for c in self._record(x).sampled_calls]

    def forward_pass(self, x: torch.Tensor, latents=None) -> Record:
        """The forward half of a step: the program recorded with autograd on, the latents drawn from
        q(. | x) (or ``latents`` replayed). ``estimate(x, estimator, forward=rec)`` is the other half;
        the split lets a step's phases be timed apart (benchmarks/phases.py). A pass serves one estimate."""
        self._check_x(x)
        self._check_layers()
        rec = self._record(x, None if latents is None else self._check_latents(latents, x.shape[0]))
        rec._x = x  # the x it serves (estimate(x, forward=rec) checks)
        return rec

    # ---- estimators ---------------------------------------------------------------------------
    def _terms(self, x, estimator, *, latents=None, branches=None, forward=None):
        """(the record, f [B], [(call, signal)], baselines to update)."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if forward is not None and (latents is not None or getattr(forward, "_x", None) is not x):
            raise ValueError("forward= must be what forward_pass(x) returned for this x, without latents=")
        self._check_x(x)
        self._check_layers()
        if estimator in BIASED_ESTIMATORS:
            if latents is not None or branches is not None or forward is not None:
                raise ValueError(f"{estimator!r} draws its own relaxed latents: latents=, branches= and forward= "
                                 "do not apply")
            rec = self._record(x, relax=estimator)
            return rec, elbo_terms(rec, estimator)
        if branches is not None:
            if estimator not in _BRANCHED:
                raise ValueError(f"branches only apply to {_BRANCHED}, not {estimator!r}")
            branches = self._check_branches(branches, x.shape[0])
        rec = forward if forward is not None else self._record(
            x, None if latents is None else self._check_latents(latents, x.shape[0]))
        if estimator in _BRANCHED:
            rec._batch()
            return rec, ObjectiveTerms(objective(rec), self._branched_signals(x, rec, estimator, branches), [])
        kind, with_baseline = _ON_THE_RECORD[estimator]
        terms = elbo_terms(rec, kind, self.baselines if with_baseline else None, self.backend,
                           rho_direct=self.rho_direct, upstream=self.upstream,
                           direct_in_baseline=self.direct_in_baseline)
        return rec, terms

    def _check_branches(self, branches, batch):
        if not isinstance(branches, (list, tuple)) or len(branches) != self.num_layers:
            raise ValueError(f"branches must be a list of {self.num_layers} pairs of trajectories")
        return [tuple(self._check_latents(t, batch, f"branches[{k}]", k) for t in pair)
                for k, pair in enumerate(branches)]

    def _draw_pair(self, layer, logits, estimator):
        if estimator == "disarm":  # antithetic: one uniform per unit
            if not isinstance(layer, BernoulliLinear):
                raise ValueError("disarm is defined for Bernoulli latents; use reinforce_loo for categorical ones")
            u, prob = torch.rand_like(logits), torch.sigmoid(logits)
            lo, hi = layer.values
            return [(v < prob).to(logits.dtype).mul_(hi - lo).add_(lo) for v in (u, 1 - u)]
        return [layer.sample(logits), layer.sample(logits)]

    @torch.no_grad()
    def _downstream(self, x, main: list, k: int, trajectory) -> torch.Tensor:
        """The components that depend on encoder call k, on a partial pass of the program: the calls
        it does not reach are skipped, call k is set to ``trajectory[0]``, deeper ones replayed from
        the rest of it or drawn. Every call the pass computes is downstream of call k."""
        replay = list(main[:k]) + list(trajectory) + [None] * (self.num_layers - k - len(trajectory))
        rec = Record(replay=replay)
        rec.branch = k
        with validation.checks("off"), rec:
            self.model(x)
        total = torch.zeros(x.shape[0], dtype=self._dtype, device=x.device)
        for c in rec.calls[1:]:  # calls[0] is call k itself
            part = c.layer.log_prob_units(c.logits, c.sample) if c.observed else c.layer.entropy_units(c.logits)
            total = total + part.sum(-1)
        return total

    def _branched_signals(self, x, rec: Record, estimator: str, branches) -> list:
        sampled = rec.sampled_calls
        main = [c.sample for c in sampled]
        signals = []
        for k, c in enumerate(sampled):
            logits = c.logits.detach()
            if branches is None:
                with torch.no_grad():
                    pair = [[z] for z in self._draw_pair(c.layer, logits, estimator)]
            else:
                pair = branches[k]
            f_a, f_b = (self._downstream(x, main, k, t) for t in pair)
            a, b = pair[0][0], pair[1][0]
            # LOO with two samples: 1/2 sum_s score_s (f_s - f_other) = (score_a - score_b)(f_a - f_b)/2,
            # and score_a - score_b = onehot(a) - onehot(b)
            score = (c.layer.indicator(a, logits.dtype) - c.layer.indicator(b, logits.dtype)).reshape(logits.shape)
            signal = score * (0.5 * (f_a - f_b)).view(-1, *([1] * (score.dim() - 1)))
            if estimator == "disarm":  # 1/2 (f(b) - f(b~)) (-1)^b~ 1[b != b~] sigma(|l|)
                signal = signal * torch.sigmoid(logits.abs())
            signals.append((c, signal))
        return signals

    # ---- public API ---------------------------------------------------------------------------
    def surrogate(self, x: torch.Tensor, estimator: str = "hnca", *, latents=None, branches=None):
        """Per-example surrogate [B] and f_E [B]: the surrogate's gradient is the estimate of grad f_E's
        expectation for each example (decoder/prior exact, encoder by ``estimator``).

        ``latents`` ([Phi_1..Phi_L], each [B, width]) replays the main pass; ``branches`` (LOO and
        DisARM: per layer k a pair of trajectories [Phi_{k+1}, ..., Phi_L]) replays the partial passes.
        The ``*_baseline`` estimators read the baselines, then fold this batch in."""
        rec, terms = self._terms(x, estimator, latents=latents, branches=branches)
        if terms.tracked:
            update_baselines(terms.tracked)
        score = sum(((c.logits * s).reshape(s.shape[0], -1).sum(-1) for c, s in terms.signals),
                    torch.zeros_like(terms.f))
        return terms.f + score, terms.f

    def estimate(self, x: torch.Tensor, estimator: str = "hnca", **replay) -> "ELBOEstimate":
        """One step's estimate: ``.loss`` (backward writes minus the estimate of the gradient of the
        batch-mean ELBO into every ``.grad``), ``.elbo`` [B] (the ELBO samples f_E), ``.record`` and
        ``.gradient_variance()`` (the paper's metric over the encoder's parameters).
        ``x``: [B, data_dim] of 0./1.; ``replay``: ``latents``/``branches`` as in ``surrogate``, or
        ``forward``: the record ``forward_pass(x)`` returned (then only the estimator runs here)."""
        rec, terms = self._terms(x, estimator, **replay)
        return ELBOEstimate(finish_loss(rec, terms), terms.f.detach(), rec)

    def elbo_loss(self, x: torch.Tensor, estimator: str = "hnca", **replay) -> torch.Tensor:
        """A scalar equal to -mean ELBO sample whose ``backward`` writes minus the estimate of the
        gradient of the batch-mean ELBO into every ``.grad``. ``x``: [B, data_dim] of 0./1.

        ``estimator``: one of ``ESTIMATORS``; ``"hnca_baseline"`` and ``"reinforce_baseline"`` read
        and then update ``self.baselines`` (earlier batches only; under torch.distributed with the
        mean over all ranks, one all-reduce per call). With one layer there are no mediated
        components, so ``"hnca_baseline"`` equals ``"hnca"``."""
        return self.estimate(x, estimator, **replay).loss

    def forward(self, x: torch.Tensor, estimator: str = "hnca", **replay) -> torch.Tensor:
        """``elbo_loss``: so that ``DistributedDataParallel(vae)(x, estimator)`` runs through DDP's forward,
        which its gradient all-reduce needs (calling ``ddp.module.elbo_loss`` would bypass it)."""
        return self.elbo_loss(x, estimator, **replay)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Single-sample ELBO per example [B] (analytic entropies)."""
        self._check_x(x)
        return self._record(x).elbo()

    def log_weight(self, x: torch.Tensor, latents=None) -> torch.Tensor:
        """log p(x, z) - log q(z | x) per example [B] at given latents z (default: drawn from q)."""
        self._check_x(x)
        rec = self._record(x, None if latents is None else self._check_latents(latents, x.shape[0]))
        total = torch.zeros(x.shape[0], dtype=self._dtype, device=x.device)
        for c in rec.calls:
            total = total + (c.layer.log_prob_units(c.logits, c.sample).sum(-1) if c.observed
                             else -c.layer.log_prob(c.logits, c.sample))
        return total

    @torch.no_grad()
    def multisample_bound(self, x: torch.Tensor, k: int = 100, max_rows: int = 20000) -> torch.Tensor:
        """k-sample importance-weighted bound log 1/k sum_i p(x, z_i)/q(z_i | x) per example [B];
        at most ``max_rows`` (sample, example) rows are in memory at once."""
        self._check_x(x)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        batch = x.shape[0]
        chunk = max(1, min(k, max_rows // max(batch, 1)))
        acc = torch.full((batch,), -math.inf, dtype=self._dtype, device=x.device)
        done = 0
        while done < k:
            c = min(chunk, k - done)
            lw = self.log_weight(x.repeat(c, 1)).view(c, batch)
            acc = torch.logaddexp(acc, torch.logsumexp(lw, 0))
            done += c
        return acc - math.log(k)


class BernoulliVAE(DiscreteVAE):
    """Discrete hierarchical VAE with ``num_layers`` layers of Bernoulli 0/1 units, ``hidden`` wide
    (one int for every layer, or a list of ``num_layers`` widths, Phi_1 first): q(Phi_1 | x) ...
    q(Phi_L | Phi_{L-1}), a learned factorized prior p(Phi_L) and p(Phi_{l-1} | Phi_l), Phi_0 = x.

    >>> vae = BernoulliVAE(2)                                 # 784 -> 200 -> 200
    >>> opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    >>> loss = vae.elbo_loss(x, estimator="hnca_baseline")   # x: [B, 784] of 0./1.
    >>> opt.zero_grad(); loss.backward(); opt.step()          # loss == -mean ELBO sample

    ``model`` is the whole definition; every estimator trains it through the record.
    """

    def __init__(self, num_layers: int, hidden: int | Sequence[int] = 200, data_dim: int = 784, *,
                 rho_direct: bool = False, direct_in_baseline: bool | None = None, upstream: bool = False,
                 baseline_decay: float = 0.99, tau: float = 1.0, backend: str | None = None, device=None, dtype=None):
        super().__init__(data_dim, rho_direct=rho_direct, direct_in_baseline=direct_in_baseline, upstream=upstream,
                         baseline_decay=baseline_decay, tau=tau, backend=backend)
        _positive_int("num_layers", num_layers)
        widths = [hidden] * num_layers if isinstance(hidden, int) and not isinstance(hidden, bool) else hidden
        if (not isinstance(widths, (list, tuple)) or len(widths) != num_layers
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
            raise ValueError(f"hidden must be a positive int or a list of {num_layers} positive ints, got {hidden!r}")
        factory = {"device": device, "dtype": dtype}
        self.widths = list(widths)
        self.hidden = hidden if isinstance(hidden, int) else list(hidden)
        sizes = [data_dim, *self.widths]
        self.encoder = nn.ModuleList(BernoulliLinear(sizes[k], sizes[k + 1], **factory) for k in range(num_layers))
        self.decoder = nn.ModuleList(BernoulliLinear(sizes[k + 1], sizes[k], **factory) for k in range(num_layers))
        self.prior = BernoulliLinear(0, sizes[-1], **factory)
        self._add_baselines(device)
        self._register_load_state_dict_pre_hook(_rename_prior_logits)

    def model(self, x: torch.Tensor) -> None:
        """q(Phi_1 | x) ... q(Phi_L | Phi_{L-1}) sampled; p(Phi_L), p(Phi_{l-1} | Phi_l) scored."""
        h = [x]
        for layer in self.encoder:
            h.append(layer(h[-1]))
        self.prior(observed=h[-1])
        for k, layer in enumerate(self.decoder):
            layer(h[k + 1], observed=h[k])

    @property
    def prior_logits(self) -> torch.Tensor:
        """The prior's logits (its bias) [hidden of the top layer]."""
        return self.prior.bias

    def _check_layers(self) -> None:
        """The layers are the VAE's own kind: 0/1 Bernoulli units of the right widths (a layer
        swapped in by hand would otherwise train silently as something else)."""
        sizes = [self.data_dim, *self.widths]
        for name, layers, shape in (("encoder", self.encoder, lambda k: (sizes[k], sizes[k + 1])),
                                    ("decoder", self.decoder, lambda k: (sizes[k + 1], sizes[k]))):
            if len(layers) != len(self.widths):
                raise ValueError(f"BernoulliVAE.{name} must hold {len(self.widths)} layers, holds {len(layers)}")
            for k, layer in enumerate(layers):
                if type(layer) is not BernoulliLinear or layer.centered:
                    raise TypeError(f"BernoulliVAE.{name}[{k}] is {layer!r}: the VAE's estimators are derived for "
                                    "BernoulliLinear layers of 0/1 units (centered=False) only")
                if (layer.in_features, layer.out_features) != shape(k):
                    raise ValueError(f"BernoulliVAE.{name}[{k}] maps {layer.in_features} -> {layer.out_features}, "
                                     f"expected {shape(k)[0]} -> {shape(k)[1]}")

    @torch.no_grad()
    def generate(self, n: int) -> torch.Tensor:
        """Ancestral samples: the pixel means of p_0(X | Phi_1) [n, data_dim]."""
        h = self.prior.sample(self.prior.bias.expand(n, self.widths[-1]))
        for k in range(self.num_layers - 1, 0, -1):
            h = self.decoder[k].sample(self.decoder[k].logits(h))
        return torch.sigmoid(self.decoder[0].logits(h))


def _rename_prior_logits(state_dict, prefix, *args) -> None:
    """A checkpoint from before the prior was a layer holds its logits as ``prior_logits``."""
    old = prefix + "prior_logits"
    if old in state_dict:
        state_dict[prefix + "prior.bias"] = state_dict.pop(old)
        state_dict.setdefault(prefix + "prior.weight", state_dict[prefix + "prior.bias"].new_zeros(
            state_dict[prefix + "prior.bias"].shape[0], 0))


class CategoricalVAE(DiscreteVAE):
    """A VAE with ``num_layers`` layers of ``variables`` one-hot categorical latents of ``classes``
    classes each (the Gumbel-softmax paper's MNIST VAE has 20 x 10): q(z_1 | x) ... q(z_L | z_{L-1}),
    a learned factorized categorical prior p(z_L), p(z_{l-1} | z_l) categorical and p(x | z_1)
    Bernoulli, every layer linear in its input.

    >>> vae = CategoricalVAE(1, variables=20, classes=10)
    >>> loss = vae.elbo_loss(x, estimator="hnca")
    """

    def __init__(self, num_layers: int = 1, variables: int = 20, classes: int = 10, data_dim: int = 784, *,
                 baseline_decay: float = 0.99, tau: float = 1.0, backend: str | None = None, device=None,
                 dtype=None, **ablations):
        super().__init__(data_dim, baseline_decay=baseline_decay, tau=tau, backend=backend, **ablations)
        _positive_int("num_layers", num_layers)
        self.variables, self.classes = _positive_int("variables", variables), _positive_int("classes", classes)
        factory = {"device": device, "dtype": dtype}
        width = variables * classes
        self.widths = [width] * num_layers

        def latent(n_in):
            return CategoricalLinear(n_in, classes, num_variables=variables, one_hot=True, **factory)

        self.encoder = nn.ModuleList(latent(data_dim if k == 0 else width) for k in range(num_layers))
        self.decoder = nn.ModuleList([BernoulliLinear(width, data_dim, **factory)]
                                     + [latent(width) for _ in range(num_layers - 1)])
        self.prior = latent(0)
        self._add_baselines(device)

    def model(self, x: torch.Tensor) -> None:
        """q(z_1 | x) ... q(z_L | z_{L-1}) sampled; p(z_L), p(z_{l-1} | z_l) and p(x | z_1) scored."""
        h = [x]
        for layer in self.encoder:
            h.append(layer(h[-1]))
        self.prior(observed=h[-1])
        for k, layer in enumerate(self.decoder):
            layer(h[k + 1], observed=h[k])

    @torch.no_grad()
    def generate(self, n: int) -> torch.Tensor:
        """Ancestral samples: the pixel means of p(x | z_1) [n, data_dim]."""
        h = self.prior.sample(self.prior.bias.expand(n, -1).unflatten(-1, (self.variables, self.classes)))
        for k in range(self.num_layers - 1, 0, -1):
            h = self.decoder[k].sample(self.decoder[k].logits(h))
        return torch.sigmoid(self.decoder[0].logits(h))


class ELBOEstimate:
    """What ``DiscreteVAE.estimate`` returns: the step's loss, its ELBO samples, and its record
    (whose ``gradient_variance`` is the paper's metric over the encoder's parameters)."""

    def __init__(self, loss, elbo, rec: Record):
        self.loss, self.elbo, self.record = loss, elbo, rec

    def gradient_variance(self, as_tensor: bool = False):
        """Mean over the encoder's parameters of the per-parameter variance over the batch's
        examples of the per-example estimate (``Record.gradient_variance``)."""
        return self.record.gradient_variance(as_tensor)

    def gradient_square_sum(self) -> tuple:
        """``Record.gradient_square_sum``: the part of the metric that adds over a split of the batch."""
        return self.record.gradient_square_sum()
