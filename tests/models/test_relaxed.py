"""The straight-through estimators (hnca_kernels.relaxed): exact draws forward, their own gradient
backward, and how biased that gradient is on a tiny VAE against the exact one (float64)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hnca_kernels.models import BernoulliVAE
from hnca_kernels.relaxed import BIASED_ESTIMATORS, straight_through, straight_through_bernoulli

from test_vae import exact_gradient, make_vae, make_x

DT = torch.float64


@pytest.mark.parametrize("estimator", BIASED_ESTIMATORS)
def test_samples_are_exact_draws(estimator):
    """Frequencies within 5 standard errors of sigmoid(l) (Bernoulli) and softmax(l) (K = 3), every
    value exactly 0 or 1, one-hot rows."""
    n = 200_000
    logits = torch.tensor([-3.0, -0.4, 0.0, 1.3, 6.0], dtype=DT)
    z = straight_through_bernoulli(logits.expand(n, -1).clone().requires_grad_(), estimator)
    assert ((z == 0) | (z == 1)).all()
    p = torch.sigmoid(logits)
    error = (z.detach().mean(0) - p).abs() / (p * (1 - p) / n).sqrt()
    assert (error < 5).all(), error
    three = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, -4.0]], dtype=DT)
    y = straight_through(three.expand(n, -1, -1).clone().requires_grad_(), estimator).detach()
    assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all()
    pi = torch.softmax(three, -1)
    error = (y.mean(0) - pi).abs() / (pi * (1 - pi) / n).sqrt()
    assert (error < 5).all(), error


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown straight-through"):
        straight_through(torch.zeros(2, 3), "hnca")
    with pytest.raises(ValueError, match="tau"):
        straight_through(torch.zeros(2, 3), "gumbel_st", tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        BernoulliVAE(1, tau=-1.0)
    vae, x = make_vae(1), make_x()
    with pytest.raises(ValueError, match="draws its own relaxed latents"):
        vae.estimate(x, "gumbel_st", latents=vae.sample_latents(x))
    estimate = vae.estimate(x, "reinmax")
    with pytest.raises(RuntimeError, match="need loss.backward"):
        estimate.gradient_variance()


def _gumbel_elbo(vae, x, gumbels, tau):
    """f_E written out, with the relaxed latents of straight-through Gumbel-softmax from given noise
    (two per unit): an independent statement of what the estimator differentiates."""
    h, latents, enc_logits = x, [], []
    for layer, g in zip(vae.encoder, gumbels):
        logits = layer.logits(h)
        soft = torch.sigmoid((logits + g[..., 0] - g[..., 1]) / tau)
        hard = (logits + g[..., 0] > g[..., 1]).to(DT)
        h = hard + soft - soft.detach()
        latents.append(h)
        enc_logits.append(logits)
    total = sum(-F.binary_cross_entropy_with_logits(vae.decoder[k].logits(latents[k]), ([x] + latents)[k],
                                                    reduction="none").sum(-1) for k in range(vae.num_layers))
    total = total - F.binary_cross_entropy_with_logits(vae.prior.bias.expand_as(latents[-1]), latents[-1],
                                                       reduction="none").sum(-1)
    for l in enc_logits:
        p = torch.sigmoid(l)
        total = total - (p * F.logsigmoid(l) + (1 - p) * F.logsigmoid(-l)).sum(-1)
    return total


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_st_gradient_is_its_definition(layers, tau):
    vae, x = make_vae(layers, tau=tau), make_x(5)
    torch.manual_seed(3)
    vae.zero_grad()
    vae.elbo_loss(x, "gumbel_st").backward()
    got = [p.grad.clone() for p in vae.parameters()]
    torch.manual_seed(3)  # the same noise, drawn as torch's gumbel_softmax draws it
    gumbels = []
    for width in vae.widths:
        gumbels.append(-torch.empty(x.shape[0], width, 2, dtype=DT).exponential_().log())
    vae.zero_grad()
    (-_gumbel_elbo(vae, x, gumbels, tau).mean()).backward()
    for g, p in zip(got, vae.parameters()):
        if p.numel():  # (the prior's weight is [hidden, 0])
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


def _reinmax_expectation(vae, x):
    """E[ReinMax's estimate] exactly: every joint value of the latents, drawn through a patched
    torch.multinomial (what the reinmax package samples with), weighted by its probability."""
    widths, total = vae.widths, None
    for combo in itertools.product(*[list(itertools.product((0, 1), repeat=w)) for w in widths]):
        draws = iter(combo)

        def multinomial(probs, num_samples, replacement):  # class 0 is "fires" (logits (l, 0))
            value = torch.tensor(next(draws), dtype=torch.long)
            return (1 - value).repeat(x.shape[0]).view(-1, 1)

        original = torch.multinomial
        torch.multinomial = multinomial
        try:
            vae.zero_grad()
            vae.elbo_loss(x, "reinmax").backward()
        finally:
            torch.multinomial = original
        latents = [torch.tensor(c, dtype=DT).expand(x.shape[0], -1) for c in combo]
        with torch.no_grad():
            h, logq = x, torch.zeros(x.shape[0], dtype=DT)
            for layer, z in zip(vae.encoder, latents):
                logits = layer.logits(h)
                logq = logq + F.logsigmoid(torch.where(z > 0, logits, -logits)).sum(-1)
                h = z
        # the loss is the batch mean; each example's configuration has its own probability
        grads = {}
        for name, p in vae.named_parameters():
            grads[name] = p.grad.clone()
        weight = logq.exp()
        assert torch.allclose(weight, weight[0].expand_as(weight))  # one x repeated: one weight
        term = {name: g * weight[0] for name, g in grads.items()}
        total = term if total is None else {name: total[name] + term[name] for name in total}
    return {name: -g for name, g in total.items()}


def _gumbel_expectation(vae, x, rounds=16, rows=8192):
    """E[straight-through Gumbel-softmax's estimate] by Monte Carlo: (mean, standard error)."""
    xs = x.repeat(rows, 1)
    draws = []
    torch.manual_seed(11)
    for _ in range(rounds):
        vae.zero_grad()
        vae.elbo_loss(xs, "gumbel_st").backward()
        draws.append({name: -p.grad.clone() for name, p in vae.named_parameters() if name.startswith("encoder")})
    mean = {name: torch.stack([d[name] for d in draws]).mean(0) for name in draws[0]}
    se = {name: torch.stack([d[name] for d in draws]).std(0) / math.sqrt(rounds) for name in draws[0]}
    return mean, se


def straight_through_bias(layers: int) -> dict:
    """{estimator: (relative bias of the encoder's expected gradient, its cosine with the exact
    gradient, the Monte Carlo error of the bias or 0)} on a tiny VAE (one example, 4 pixels)."""
    vae, x = make_vae(layers, seed=2, scale=1.0), make_x(1, seed=3)
    truth = exact_gradient(vae, x)  # of E[f], by enumeration
    encoder = [name for name in truth if name.startswith("encoder")]
    flat = lambda d: torch.cat([d[n].flatten() for n in encoder])  # noqa: E731
    exact = flat(truth)
    out = {}
    for estimator in BIASED_ESTIMATORS:
        if estimator == "reinmax":
            mean, se = _reinmax_expectation(vae, x), None
        else:
            mean, se = _gumbel_expectation(vae, x)
        m = flat(mean)
        error = float(flat(se).norm() / exact.norm()) if se is not None else 0.0
        out[estimator] = (float((m - exact).norm() / exact.norm()), float(m @ exact / (m.norm() * exact.norm())),
                          error)
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_straight_through_gradients_are_biased_but_point_the_right_way(layers):
    """The expected encoder gradient against the exact one: biased beyond the Monte Carlo error (the
    test would see an unbiased or a broken estimator), yet a descent direction."""
    report = straight_through_bias(layers)
    print(f"\n{layers} layer(s): " + ", ".join(f"{e}: relative bias {b:.3f} (+- {s:.3f}), cosine {c:.3f}"
                                              for e, (b, c, s) in report.items()))
    for estimator, (bias, cosine, error) in report.items():
        assert bias > max(5 * error, 1e-3), (estimator, bias, error)
        assert cosine > 0.5, (estimator, cosine)
