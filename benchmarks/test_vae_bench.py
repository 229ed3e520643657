"""The discrete VAE (batch 50, 200 hidden units): every estimator's step split into phases, and the
whole step per estimator x depth.

Phases (groups "vae-L<n>: <phase>", the estimators side by side; benchmarks/phases.py):
``forward`` (``vae.forward_pass``: sampling the latents and the pass through encoder, decoder and
prior with autograd), ``backward`` (``vae.estimate(x, estimator, forward=...)`` then
``loss.backward()``), its parts ``estimate`` (the estimator's signals and the surrogate; for LOO
and DisARM this holds their partial forward passes) and ``autograd``, and ``optimizer`` (Adam,
the same for every estimator) at 1-3 layers.

``test_vae_step`` times ``elbo_loss`` + ``backward`` at 1, 2, 3, 4 and 6 layers: f-HNCA is one
forward pass plus a message pass (linear in depth); REINFORCE LOO and DisARM draw a pair of
partial forward passes from every layer (quadratic in depth). Depths 4 and 6 go beyond the paper
to make the growth visible.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_vae_bench.py --benchmark-enable \
        --benchmark-timer=time.process_time
"""

import pytest
import torch

from hnca_kernels.models import ESTIMATORS, UNBIASED_ESTIMATORS, BernoulliVAE
from phases import vae_backward, vae_estimate, vae_prepare

ROUNDS = 30


def vae_and_batch(layers):
    torch.manual_seed(0)
    vae = BernoulliVAE(layers)
    x = (torch.rand(50, 784) < 0.3).float()
    return vae, x


def phase_cases():
    """(layers, estimator, phase), one estimator's phases adjacent (the machine's speed drifts)."""
    for layers in (1, 2, 3):
        for estimator in UNBIASED_ESTIMATORS:  # the straight-through ones have no separate forward
            for phase in ("forward", "backward", "estimate", "autograd"):
                yield pytest.param(layers, estimator, phase, id=f"L{layers}-{estimator}-{phase}")


@pytest.mark.parametrize("layers, estimator, phase", list(phase_cases()))
def test_vae_phase(timed, layers, estimator, phase):
    """One phase; the forward (the same code for every estimator) is timed beside each estimator's
    backward, and every phase after it gets a fresh forward in the untimed setup."""
    vae, x = vae_and_batch(layers)
    setup = None
    if phase == "forward":
        def fn():
            vae.forward_pass(x)
    elif phase == "backward":
        def fn(p):
            vae_backward(vae, x, estimator, p)
        setup = lambda: (vae_prepare(vae, x),)  # noqa: E731
    elif phase == "estimate":
        def fn(p):
            vae_estimate(vae, x, estimator, p)
        setup = lambda: (vae_prepare(vae, x),)  # noqa: E731
    else:
        def fn(loss):
            loss.backward()
        setup = lambda: (vae_estimate(vae, x, estimator, vae_prepare(vae, x)),)  # noqa: E731
    timed(f"vae-L{layers}", phase, estimator, fn, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("layers", [1, 2, 3], ids=lambda n: f"L{n}")
def test_vae_optimizer(timed, layers):
    vae, x = vae_and_batch(layers)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4)

    def setup():
        vae_backward(vae, x, "reinforce", vae_prepare(vae, x))
        return ()

    timed(f"vae-L{layers}", "optimizer", "adam", opt.step, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 6], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_vae_step(timed, estimator, layers):
    vae, x = vae_and_batch(layers)

    def step():
        vae.zero_grad(set_to_none=True)
        vae.elbo_loss(x, estimator).backward()

    timed(f"vae-L{layers}", "step", estimator, step, rounds=20)


@pytest.mark.parametrize("how", ["one call", "two ops"])
def test_sampled_child_messages(timed, how):
    """The two messages f-HNCA takes from a sampled Bernoulli child layer (the 2-layer VAE's second
    encoder layer, 200 -> 200 at batch 50, at its initial weights): the log-ratio of its samples and
    the change of its entropy, in one call (``counterfactual_log_ratio_and_entropy_delta``) or as the
    two ops."""
    from hnca_kernels import functional as Fn

    vae, x = vae_and_batch(2)
    encoder = vae.encoder[1]
    h = (torch.rand(50, 200, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    logits = encoder.logits(h).detach()
    y = encoder.sample(logits)
    weight = encoder.weight.detach()
    if how == "one call":
        def fn():
            Fn.counterfactual_log_ratio_and_entropy_delta(h, weight, logits, y)
    else:
        def fn():
            Fn.counterfactual_log_ratio(h, weight, logits, y)
            Fn.counterfactual_entropy_delta(h, weight, logits)
    timed("vae-L2", "sampled child's messages", how, fn)
