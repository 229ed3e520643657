"""The record-based BernoulliVAE against the hand-written chain it replaced (tests/_reference_vae.py):
on the same parameters, baselines, data and replayed latents (and, for LOO and DisARM, the same
partial-pass trajectories), every estimator and ablation gives the same loss, the same gradient of
every parameter, the same baselines after the step and the same gradient-variance statistic, to
1e-12 in float64."""

import pytest
import torch

from _reference_vae import BernoulliVAE as ChainVAE
from hnca_kernels.models import BernoulliVAE

DT = torch.float64
WIDTHS = [5, 4, 3]
DATA = 11
SCORE_ESTIMATORS = ("hnca", "hnca_baseline", "reinforce", "reinforce_baseline", "reinforce_loo", "disarm")
ABLATIONS = [{}, {"rho_direct": True}, {"rho_direct": True, "direct_in_baseline": False}, {"upstream": True},
             {"upstream": True, "rho_direct": True}]


def _pair(layers, options, seed=0):
    torch.manual_seed(seed)
    chain = ChainVAE(layers, WIDTHS[:layers], DATA, dtype=DT, **options)
    record = BernoulliVAE(layers, WIDTHS[:layers], DATA, dtype=DT, **options)
    with torch.no_grad():
        for p in chain.parameters():
            p.normal_(0, 0.8)  # away from the zero init: every unit's probability differs
        for k, b in enumerate(chain.baselines):
            b.value.fill_(0.3 * k - 2.0)  # a baseline state that is not the start
    record.load_state_dict(chain.state_dict())
    return chain, record


def _replay(chain, x, seed=1):
    """Latents of the main pass and, per encoder layer k, two trajectories [Phi_{k+1}, ..., Phi_L]."""
    g = torch.Generator().manual_seed(seed)
    latents = [(torch.rand(x.shape[0], w, generator=g, dtype=DT) < 0.5).to(DT) for w in chain.widths]
    branches = [tuple([(torch.rand(x.shape[0], w, generator=g, dtype=DT) < 0.5).to(DT) for w in chain.widths[k:]]
                      for _ in range(2)) for k in range(chain.num_layers)]
    return latents, branches


def _step(model, x, estimator, latents, branches):
    model.zero_grad(set_to_none=True)
    replay = {"latents": latents}
    if estimator in ("reinforce_loo", "disarm"):
        replay["branches"] = branches
    estimate = model.estimate(x, estimator, **replay)
    estimate.loss.backward()
    # the record-based prior is a layer without inputs: its bias is the chain's prior_logits
    grads = {{"prior.bias": "prior_logits"}.get(name, name): p.grad.clone() for name, p in model.named_parameters()
             if p.numel()}
    variance = estimate.gradient_variance()
    if isinstance(variance, tuple):  # the chain's (sum over the encoder's parameters, their count)
        variance = variance[0] / variance[1]
    return estimate.loss.detach(), grads, [b.value.clone() for b in model.baselines], variance


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("estimator", SCORE_ESTIMATORS)
def test_record_based_vae_equals_the_chain(layers, estimator):
    x = (torch.rand(6, DATA, generator=torch.Generator().manual_seed(2), dtype=DT) < 0.4).to(DT)
    for options in ABLATIONS if estimator.startswith("hnca") else [{}]:
        chain, record = _pair(layers, options)
        latents, branches = _replay(chain, x)
        old, new = _step(chain, x, estimator, latents, branches), _step(record, x, estimator, latents, branches)
        where = f"{estimator}, {layers} layers, {options}"
        torch.testing.assert_close(new[0], old[0], rtol=0, atol=1e-12, msg=f"loss: {where}")
        assert new[1].keys() == old[1].keys()
        assert max(g.abs().max() for g in old[1].values() if g.numel()) > 1e-2  # the comparison can see a difference
        for name in old[1]:
            torch.testing.assert_close(new[1][name], old[1][name], rtol=0, atol=1e-12, msg=f"{name}: {where}")
        for b_new, b_old in zip(new[2], old[2]):
            torch.testing.assert_close(b_new, b_old, rtol=0, atol=1e-12, msg=f"baselines: {where}")
        assert new[3] == pytest.approx(old[3], rel=1e-10, abs=1e-14), f"gradient variance: {where}"


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("estimator", ["gumbel_st", "reinmax"])
def test_straight_through_steps_equal_the_chain_on_the_same_draws(layers, estimator):
    # they draw their own relaxed latents (no replay): the same generator state gives the same draws
    if estimator == "reinmax":
        pytest.importorskip("reinmax")
    x = (torch.rand(6, DATA, generator=torch.Generator().manual_seed(2), dtype=DT) < 0.4).to(DT)
    chain, record = _pair(layers, {})
    out = []
    for model in (chain, record):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        model.estimate(x, estimator).loss.backward()
        out.append({{"prior.bias": "prior_logits"}.get(n, n): p.grad.clone() for n, p in model.named_parameters()
                    if p.numel()})
    assert out[0].keys() == out[1].keys()
    for name in out[0]:
        torch.testing.assert_close(out[1][name], out[0][name], rtol=0, atol=1e-12, msg=f"{name}: {estimator}")
