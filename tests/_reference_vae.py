"""The regression reference: BernoulliVAE as it was before it was written with the record (the
package's hand-written chain), kept to check that the record-based model gives the same estimates.

A hierarchical VAE of Bernoulli 0/1 units trained with f-HNCA or a comparison estimator.

Encoder q: X -> Phi_1 -> ... -> Phi_L, decoder p: Phi_L ~ p_L (learned prior) -> ... -> X.
The integrand (paper Eq. 7) f_E = sum_l log p_l + log p_L + sum_l H(q_l) is split into one
function component per unit. Decoder and prior get autograd's exact gradient of f_E at the
sampled latents; each encoder layer gets a per-unit learning signal on its logits (the
estimator's score-function part) plus autograd's direct gradient of its analytic entropy.

Indexing in the code: h[0] = X, h[k] = Phi_k. encoder[k] maps h[k] to the logits of h[k+1];
decoder[k] maps h[k+1] to the logits of h[k]; logp[k] [B, n_k] is log p_k(h[k] | h[k+1]) per
unit, logp[L] the prior's; ent[k] [B] = H(q_{k+1}(. | h[k])). For encoder layer k (the units
h[k+1]) the components split as in docs/math.md, section 3:
    upstream U_k = sum_{m<k} logp[m] + sum_{i<=k} ent[i]        (left out)
    green        = logp[k] + ent[k+1] (+ the prior's unit j at the top)
    mediated S_k = sum_{m>k} logp[m] + sum_{i>k+1} ent[i]      (orange + pink)
and the layer's downstream sum is D_k = f_E - U_k.

Cost: f-HNCA is one forward pass plus three counterfactual reductions per layer (linear in depth);
REINFORCE LOO and DisARM run a pair of partial forward passes from every layer (quadratic).
NOTE: with the reference backend the reductions dominate a step (batch 50, 200 units, 1 CPU
thread, median: 134 ms for the 784-pixel decoder message, 12 ms per 200x200 log-ratio, 58 ms
per 200x200 entropy delta; a whole REINFORCE step is 4-7 ms), so f-HNCA waits on a fused backend.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hnca_kernels import validation
from hnca_kernels.baseline import MovingAverageBaseline, update_baselines
from hnca_kernels.functional import bernoulli_entropy, counterfactual_entropy_delta, counterfactual_log_ratio, hnca_logit_credit
from hnca_kernels.layers import BernoulliLinear
from hnca_kernels.metrics import linear_gradient_square_sum, linear_gradient_variance
from hnca_kernels.relaxed import BIASED_ESTIMATORS, straight_through_bernoulli

UNBIASED_ESTIMATORS = ("hnca", "hnca_baseline", "reinforce", "reinforce_baseline", "reinforce_loo", "disarm")
ESTIMATORS = UNBIASED_ESTIMATORS + BIASED_ESTIMATORS
_BRANCHED = ("reinforce_loo", "disarm")  # these draw a pair of partial forward passes per layer


def _log_prob_units(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(value | sigmoid(logits)) per unit, for 0/1 values."""
    # NOTE: one fused op and backward; logsigmoid(where(value > 0, l, -l)) cost ~1.4 ms of a
    # 10.7 ms two-layer f-HNCA step (batch 50, 1 thread) in where's forward and backward
    return F.binary_cross_entropy_with_logits(logits, value, reduction="none").neg()


class _Pass:
    """Everything one forward pass computes at given latents (with autograd history)."""

    def __init__(self, h, enc_logits, dec_logits, logp, ent):
        self.h = h                    # [X, Phi_1, ..., Phi_L], detached samples
        self.enc_logits = enc_logits  # enc_logits[k]: logits of h[k+1] given h[k]
        self.dec_logits = dec_logits  # dec_logits[k]: logits of h[k] given h[k+1]
        self.logp = logp              # logp[k] [B, n_k]; logp[L]: prior
        self.ent = ent                # ent[k] [B]

    def f_e(self) -> torch.Tensor:
        return sum(lp.sum(-1) for lp in self.logp) + sum(self.ent)

    def log_q(self) -> torch.Tensor:
        return sum(_log_prob_units(l, y).sum(-1) for l, y in zip(self.enc_logits, self.h[1:]))


class BernoulliVAE(nn.Module):
    """Discrete hierarchical VAE with ``num_layers`` layers of Bernoulli 0/1 units, ``hidden`` wide
    (one int for every layer, or a list of ``num_layers`` widths, Phi_1 first).

    >>> vae = BernoulliVAE(2)                                 # 784 -> 200 -> 200
    >>> opt = torch.optim.Adam(vae.parameters(), lr=1e-4)
    >>> loss = vae.elbo_loss(x, estimator="hnca_baseline")   # x: [B, 784] of 0./1.
    >>> opt.zero_grad(); loss.backward(); opt.step()          # loss == -mean ELBO sample

    Ablations (paper Appendix K), for f-HNCA only:
        rho_direct: credit the direct (green) components through the children too (rho applied
            to them); still unbiased, more variance.
        direct_in_baseline: with rho_direct and ``hnca_baseline``, what the layer's moving average
            tracks: True (the default there, the paper's code) the whole rho-weighted sum, mediated
            plus direct components at their sampled values; False the mediated components only.
            Both unbiased, with different variance.
        upstream: add the upstream components to the rho-weighted (mediated) sum, and for
            REINFORCE to the layer's sum (then the full f_E); still unbiased. LOO and DisARM are
            unaffected (upstream components cancel between the two samples).

    ``"gumbel_st"`` and ``"reinmax"`` are the biased straight-through estimators
    (``hnca_kernels.relaxed``), at temperature ``tau``: the latents are exact draws, and the
    encoder's gradient flows through their relaxation into the decoder, the prior and the
    entropies of deeper layers.
    """

    def __init__(self, num_layers: int, hidden: int | Sequence[int] = 200, data_dim: int = 784, *,
                 rho_direct: bool = False, direct_in_baseline: bool | None = None, upstream: bool = False,
                 baseline_decay: float = 0.99, tau: float = 1.0, backend: str | None = None, device=None,
                 dtype=None):
        super().__init__()
        widths = [hidden] * num_layers if isinstance(hidden, int) and not isinstance(num_layers, bool) else hidden
        for name, value in (("num_layers", num_layers), ("data_dim", data_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (not isinstance(widths, (list, tuple)) or len(widths) != num_layers
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
            raise ValueError(f"hidden must be a positive int or a list of {num_layers} positive ints, got {hidden!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_layers, self.widths, self.data_dim = num_layers, list(widths), data_dim
        self.hidden = hidden if isinstance(hidden, int) else list(hidden)
        self.rho_direct, self.upstream, self.backend = bool(rho_direct), bool(upstream), backend
        if not (isinstance(tau, (int, float)) and 0 < tau < math.inf):
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        self.tau = float(tau)
        self.direct_in_baseline = self.rho_direct if direct_in_baseline is None else bool(direct_in_baseline)
        sizes = [data_dim, *self.widths]
        self.encoder = nn.ModuleList(BernoulliLinear(sizes[k], sizes[k + 1], **factory) for k in range(num_layers))
        self.decoder = nn.ModuleList(BernoulliLinear(sizes[k + 1], sizes[k], **factory) for k in range(num_layers))
        self.prior_logits = nn.Parameter(torch.zeros(sizes[-1], **factory))
        # one per encoder layer: of S_k (hnca_baseline) or D_k (reinforce_baseline)
        self.baselines = nn.ModuleList(MovingAverageBaseline(baseline_decay).to(device) for _ in range(num_layers))

    # ----------------------------------------------------------------- checks
    @property
    def _dtype(self):
        return self.prior_logits.dtype

    def _check_x(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [B, {self.data_dim}], got {tuple(x.shape)}")
        if x.dtype != self._dtype:
            raise TypeError(f"x must have the model's dtype {self._dtype}, got {x.dtype} (binarize and cast first)")
        if x.device != self.prior_logits.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.prior_logits.device}")
        validation.require(x.device, lambda: ((x == 0) | (x == 1)).all(), ValueError(
            "x must be binary (0./1. pixels): binarize the intensities first (hnca_kernels.data.binarize)"))

    def _check_layers(self) -> None:
        """The layers are the VAE's own kind: 0/1 Bernoulli units of the right widths (a layer
        swapped in by hand would otherwise train silently as something else)."""
        sizes = [self.data_dim, *self.widths]
        for name, layers, shape in (("encoder", self.encoder, lambda k: (sizes[k], sizes[k + 1])),
                                    ("decoder", self.decoder, lambda k: (sizes[k + 1], sizes[k]))):
            if len(layers) != self.num_layers:
                raise ValueError(f"BernoulliVAE.{name} must hold {self.num_layers} layers, holds {len(layers)}")
            for k, layer in enumerate(layers):
                if type(layer) is not BernoulliLinear or layer.centered:
                    raise TypeError(f"BernoulliVAE.{name}[{k}] is {layer!r}: the VAE's estimators are derived for "
                                    "BernoulliLinear layers of 0/1 units (centered=False) only")
                if (layer.in_features, layer.out_features) != shape(k):
                    raise ValueError(f"BernoulliVAE.{name}[{k}] maps {layer.in_features} -> {layer.out_features}, "
                                     f"expected {shape(k)[0]} -> {shape(k)[1]}")

    def _check_latents(self, latents, batch, name="latents", count=None) -> list[torch.Tensor]:
        count = self.num_layers if count is None else count
        if not isinstance(latents, (list, tuple)) or len(latents) != count:
            got = f"{len(latents)} items" if isinstance(latents, (list, tuple)) else type(latents).__name__
            raise ValueError(f"{name} must be a list of {count} tensors (one per layer), got {got}")
        widths = self.widths[self.num_layers - count:]
        for k, (z, width) in enumerate(zip(latents, widths)):
            if not isinstance(z, torch.Tensor) or z.shape != (batch, width) or z.dtype != self._dtype:
                raise ValueError(f"{name}[{k}] must be a {self._dtype} tensor of shape {(batch, width)}")
            validation.require(z.device, lambda: ((z == 0) | (z == 1)).all(),
                           ValueError(f"{name}[{k}] must hold only 0. and 1."))
        return [z.to(self.prior_logits.device) for z in latents]

    # ---------------------------------------------------------------- passes
    @staticmethod
    def _fire(logits: torch.Tensor) -> torch.Tensor:
        return (torch.rand_like(logits) < torch.sigmoid(logits)).to(logits.dtype)

    @torch.no_grad()
    def sample_latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One draw of [Phi_1, ..., Phi_L] from the encoder q(. | x)."""
        self._check_layers()
        h, latents = x, []
        for layer in self.encoder:
            h = self._fire(layer.logits(h))
            latents.append(h)
        return latents

    def _evaluate(self, x: torch.Tensor, latents: Sequence[torch.Tensor], enc_logits=None) -> _Pass:
        self._check_layers()
        h = [x, *latents]
        L = self.num_layers
        if enc_logits is None:
            enc_logits = [self.encoder[k].logits(h[k]) for k in range(L)]
        dec_logits = [self.decoder[k].logits(h[k + 1]) for k in range(L)]
        logp = [_log_prob_units(dec_logits[k], h[k]) for k in range(L)]
        logp.append(_log_prob_units(self.prior_logits.expand_as(h[L]), h[L]))
        ent = [bernoulli_entropy(l).sum(-1) for l in enc_logits]
        return _Pass(h, enc_logits, dec_logits, logp, ent)

    def _relaxed_pass(self, x: torch.Tensor, estimator: str) -> _Pass:
        """The main pass with straight-through latents (exact draws, relaxed gradients)."""
        self._check_layers()
        h, latents, enc_logits = x, [], []
        for layer in self.encoder:
            enc_logits.append(layer.logits(h))
            h = straight_through_bernoulli(enc_logits[-1], estimator, self.tau)
            latents.append(h)
        return self._evaluate(x, latents, enc_logits)

    def _downstream(self, k: int, h_k: torch.Tensor, first: torch.Tensor, deeper=None):
        """D_k on a partial forward pass: encoder layer k set to ``first`` given h_k, deeper layers
        replayed from ``deeper`` or sampled anew. Returns (D_k [B], trajectory [first, ...])."""
        L = self.num_layers
        traj = [first]
        total = _log_prob_units(self.decoder[k].logits(first), h_k).sum(-1)
        for m in range(k + 1, L):
            logits = self.encoder[m].logits(traj[-1])
            total = total + bernoulli_entropy(logits).sum(-1)
            traj.append(self._fire(logits) if deeper is None else deeper[m - k - 1])
            total = total + _log_prob_units(self.decoder[m].logits(traj[-1]), traj[-2]).sum(-1)
        total = total + _log_prob_units(self.prior_logits.expand_as(traj[-1]), traj[-1]).sum(-1)
        return total, traj

    # ------------------------------------------------------------- estimators
    def _upstream(self, p: _Pass, k: int) -> torch.Tensor:
        return sum((p.logp[m].sum(-1) for m in range(k)), torch.zeros_like(p.ent[0])) + sum(p.ent[: k + 1])

    def _hnca_signals(self, p: _Pass, use_baseline: bool):
        L, signals, tracked_signals = self.num_layers, [], []
        f_e = p.f_e()
        for k in range(L):
            l, y = p.enc_logits[k].detach(), p.h[k + 1]
            prob = torch.sigmoid(l)
            var = prob * torch.sigmoid(-l)  # p(1-p), the derivative of p in the logit
            # G(1) - G(0): the green components' counterfactual change per unit
            g = counterfactual_log_ratio(y, self.decoder[k].weight.detach(), p.dec_logits[k].detach(), p.h[k],
                                         backend=self.backend)
            if k + 1 < L:
                g = g + counterfactual_entropy_delta(y, self.encoder[k + 1].weight.detach(),
                                                     p.enc_logits[k + 1].detach(), backend=self.backend)
            else:
                # top layer: no children, rho = 1, every component is green (the prior's unit j too)
                signals.append(var * (g + self.prior_logits.detach()))
                continue
            d = counterfactual_log_ratio(y, self.encoder[k + 1].weight.detach(), p.enc_logits[k + 1].detach(),
                                         p.h[k + 2], backend=self.backend)
            mediated = sum(p.logp[m].sum(-1) for m in range(k + 1, L + 1)) + sum(p.ent[k + 2:], torch.zeros_like(f_e))
            green_actual = p.logp[k].sum(-1) + p.ent[k + 1]
            if self.upstream:
                mediated = f_e - green_actual
            weighted = mediated + green_actual if self.rho_direct else mediated  # what rho multiplies
            if use_baseline:
                tracked = weighted if self.direct_in_baseline else mediated
                weighted = weighted - self.baselines[k].value  # earlier batches only: updated after the loop
                tracked_signals.append((self.baselines[k], tracked))
            dec_l = p.dec_logits[k + 1].detach()
            o1, o0 = F.logsigmoid(dec_l), F.logsigmoid(-dec_l)  # orange: o(phi) = log p_{k+1}(unit j = phi | ...)
            common = weighted.unsqueeze(-1) - p.logp[k + 1]     # S - o(actual) (- b), per unit
            x1, x0, direct = o1, o0, var * g
            if self.rho_direct:
                x1, x0, direct = o1 + (1 - y) * g, o0 - y * g, 0.0
            # p(1-p)(r1 X1 - r0 X0) with p r1 = sigmoid(l + d), (1-p) r0 = sigmoid(-l - d): bounded terms
            rho_part = (torch.sigmoid(-l) * torch.sigmoid(l + d) * x1 - prob * torch.sigmoid(-l - d) * x0
                        + hnca_logit_credit(l, d) * common)
            signals.append(rho_part + direct)
        update_baselines(tracked_signals)  # one all-reduce for all layers under torch.distributed
        return signals

    def _reinforce_signals(self, p: _Pass, use_baseline: bool):
        f_e, signals, tracked_signals = p.f_e(), [], []
        for k in range(self.num_layers):
            l, y = p.enc_logits[k].detach(), p.h[k + 1]
            total = f_e if self.upstream else f_e - self._upstream(p, k)
            if use_baseline:
                tracked_signals.append((self.baselines[k], total))
                total = total - self.baselines[k].value  # earlier batches only: updated after the loop
            signals.append((y - torch.sigmoid(l)) * total.unsqueeze(-1))
        update_baselines(tracked_signals)  # one all-reduce for all layers under torch.distributed
        return signals

    def _draw_pair(self, logits: torch.Tensor, estimator: str):
        if estimator == "disarm":  # antithetic: one uniform per unit
            u, prob = torch.rand_like(logits), torch.sigmoid(logits)
            return (u < prob).to(logits.dtype), (1 - u < prob).to(logits.dtype)
        return self._fire(logits), self._fire(logits)

    def _branched_signals(self, p: _Pass, estimator: str, branches):
        signals = []
        for k in range(self.num_layers):
            l = p.enc_logits[k].detach()
            if branches is None:
                a, b = self._draw_pair(l, estimator)
                f_a, traj_a = self._downstream(k, p.h[k], a)
                f_b, traj_b = self._downstream(k, p.h[k], b)
            else:
                traj_a, traj_b = branches[k]
                f_a, _ = self._downstream(k, p.h[k], traj_a[0], traj_a[1:])
                f_b, _ = self._downstream(k, p.h[k], traj_b[0], traj_b[1:])
                a, b = traj_a[0], traj_b[0]
            # LOO with two samples: 1/2 sum_s score_s (f_s - f_other) = (a - b)(f_a - f_b)/2
            signal = (a - b) * (0.5 * (f_a - f_b)).unsqueeze(-1)
            if estimator == "disarm":  # 1/2 (f(b) - f(b~)) (-1)^b~ 1[b != b~] sigma(|l|)
                signal = signal * torch.sigmoid(l.abs())
            signals.append(signal)
        return signals

    def _check_branches(self, branches, batch):
        if not isinstance(branches, (list, tuple)) or len(branches) != self.num_layers:
            raise ValueError(f"branches must be a list of {self.num_layers} pairs of trajectories")
        return [tuple(self._check_latents(t, batch, f"branches[{k}]", self.num_layers - k) for t in pair)
                for k, pair in enumerate(branches)]

    # ------------------------------------------------------------ public API
    def surrogate(self, x: torch.Tensor, estimator: str = "hnca", *, latents=None, branches=None):
        """Per-example surrogate [B] and f_E [B]: the surrogate's gradient is the estimate of grad f_E's
        expectation for each example (decoder/prior exact, encoder by ``estimator``).

        ``latents`` ([Phi_1..Phi_L], each [B, width]) replays the main pass; ``branches`` (LOO and
        DisARM: per layer k a pair of trajectories [Phi_{k+1}, ..., Phi_L]) replays the partial passes.
        """
        return self._surrogate(x, estimator, latents=latents, branches=branches)[:2]

    def forward_pass(self, x: torch.Tensor, latents=None) -> _Pass:
        """The forward half of a step: draw [Phi_1..Phi_L] from q(. | x) (or replay ``latents``) and
        evaluate encoder, decoder and prior there with autograd on. ``estimate(x, estimator,
        forward=pass)`` is the other half (the estimator's signals and the surrogate); the split
        lets a step's phases be timed apart (benchmarks/phases.py). A pass serves one estimate."""
        self._check_x(x)
        latents = self.sample_latents(x) if latents is None else self._check_latents(latents, x.shape[0])
        return self._evaluate(x, latents)

    def _surrogate(self, x, estimator, *, latents=None, branches=None, forward=None):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if forward is not None and (latents is not None or not isinstance(forward, _Pass) or forward.h[0] is not x):
            raise ValueError("forward= must be what forward_pass(x) returned for this x, without latents=")
        self._check_x(x)
        batch = x.shape[0]
        if estimator in BIASED_ESTIMATORS:
            if latents is not None or branches is not None or forward is not None:
                raise ValueError(f"{estimator!r} draws its own relaxed latents: latents=, branches= and forward= "
                                 "do not apply")
            p = self._relaxed_pass(x, estimator)
            f_e = p.f_e()  # the encoder's gradient flows through the straight-through latents
            grads = _LogitGrads(p.enc_logits)
            return f_e, f_e, ([h.detach() for h in p.h[: self.num_layers]], [l.detach() for l in p.enc_logits],
                              grads)
        if branches is not None:
            if estimator not in _BRANCHED:
                raise ValueError(f"branches only apply to {_BRANCHED}, not {estimator!r}")
            branches = self._check_branches(branches, batch)
        p = forward
        if p is None:  # forward_pass(x, latents) without checking x twice
            p = self._evaluate(x, self.sample_latents(x) if latents is None else self._check_latents(latents, batch))
        with torch.no_grad():
            if estimator in ("hnca", "hnca_baseline"):
                signals = self._hnca_signals(p, estimator == "hnca_baseline")
            elif estimator in ("reinforce", "reinforce_baseline"):
                signals = self._reinforce_signals(p, estimator == "reinforce_baseline")
            else:
                signals = self._branched_signals(p, estimator, branches)
        f_e = p.f_e()
        # f_E carries the decoder's exact gradient and the encoder's direct entropy gradient
        score_part = sum((l * s).sum(-1) for l, s in zip(p.enc_logits, signals))
        return f_e + score_part, f_e, (p.h[: self.num_layers], [l.detach() for l in p.enc_logits], signals)

    def estimate(self, x: torch.Tensor, estimator: str = "hnca", **replay) -> "ELBOEstimate":
        """One step's estimate: ``.loss`` (backward writes minus the estimate of the gradient of the
        batch-mean ELBO into every ``.grad``), ``.elbo`` [B] (the ELBO samples f_E) and
        ``.gradient_variance()`` (the paper's metric over the encoder's parameters).
        ``x``: [B, data_dim] of 0./1.; ``replay``: ``latents``/``branches`` as in ``surrogate``, or
        ``forward``: the pass ``forward_pass(x)`` returned (then only the estimator runs here)."""
        surrogate, f_e, parts = self._surrogate(x, estimator, **replay)
        loss = (surrogate.detach() - surrogate).mean() - f_e.detach().mean()
        if isinstance(parts[2], _LogitGrads):
            loss = parts[2].watch(loss)
        return ELBOEstimate(loss, f_e.detach(), *parts)

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
        return self._evaluate(x, self.sample_latents(x)).f_e()

    def log_weight(self, x: torch.Tensor, latents) -> torch.Tensor:
        """log p(x, z) - log q(z | x) per example [B] at given latents z."""
        self._check_x(x)
        p = self._evaluate(x, self._check_latents(latents, x.shape[0]))
        return sum(lp.sum(-1) for lp in p.logp) - p.log_q()

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
            xs = x.repeat(c, 1)
            lw = self.log_weight(xs, self.sample_latents(xs)).view(c, batch)
            acc = torch.logaddexp(acc, torch.logsumexp(lw, 0))
            done += c
        return acc - math.log(k)

    @torch.no_grad()
    def generate(self, n: int) -> torch.Tensor:
        """Ancestral samples: the pixel means of p_0(X | Phi_1) [n, data_dim]."""
        h = self._fire(self.prior_logits.expand(n, self.widths[-1]))
        for k in range(self.num_layers - 1, 0, -1):
            h = self._fire(self.decoder[k].logits(h))
        return torch.sigmoid(self.decoder[0].logits(h))


class _LogitGrads:
    """The gradient of a step's loss in each encoder layer's logits, caught as backward writes it:
    a straight-through estimate has no signal of its own, only what autograd computes. ``watch``
    also catches the factor the loss was scaled by (a DDP rank's loss weight), so the per-example
    estimate does not depend on how the caller scales the loss."""

    def __init__(self, logits: Sequence[torch.Tensor]):
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

    def per_example(self):
        """Each layer's per-example estimate of d f_b / d logits [B, out] (after backward)."""
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


class ELBOEstimate:
    """What ``BernoulliVAE.estimate`` returns: the step's loss, its ELBO samples, and what the
    gradient-variance metric needs (held here, not on the model)."""

    def __init__(self, loss, elbo, inputs, logits, signals):
        self.loss, self.elbo = loss, elbo
        self._inputs, self._logits, self._signals = inputs, logits, signals

    def gradient_variance(self, as_tensor: bool = False) -> tuple:
        """Sum over encoder parameters of the per-parameter variance over the batch's examples of
        the per-example estimate (score part plus the direct entropy gradient), and the count.
        ``as_tensor``: the sum as a float64 tensor on the model's device (no host synchronisation)."""
        total, count = 0.0, 0
        for inputs, logit_grad in self._logit_grads():
            t, c = linear_gradient_variance(inputs, logit_grad)
            total, count = total + t, count + c
        return (total if as_tensor else float(total)), count

    def _logit_grads(self):
        """(inputs, per-example estimate in the logits) of each encoder layer."""
        if isinstance(self._signals, _LogitGrads):
            yield from zip(self._inputs, self._signals.per_example())
            return
        for inputs, logits, signal in zip(self._inputs, self._logits, self._signals):
            # dH/dl = -l p (1 - p): the direct entropy gradient per example, in the logit
            yield inputs, signal - logits * torch.sigmoid(logits) * torch.sigmoid(-logits)

    def gradient_square_sum(self) -> tuple:
        """Sum over the batch's examples of the squared norm of the per-example estimate over the
        encoder's parameters (a float64 tensor on the model's device), and the count of parameters.
        With the batch's mean estimate (minus the encoder's gradient) it gives ``gradient_variance``
        for a batch whose examples are shared among processes (``metrics.linear_gradient_square_sum``)."""
        total, count = 0.0, 0
        for inputs, logit_grad in self._logit_grads():
            t, c = linear_gradient_square_sum(inputs, logit_grad)
            total, count = total + t, count + c
        return total, count
