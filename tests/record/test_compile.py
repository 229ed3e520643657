"""torch.compile(fullgraph=True) of whole training steps: the record's reward path, and the VAEs'
objective (forward, elbo_loss, and for the model the checks), gradients equal to eager on the
same draws. Slow (each compiles for tens of seconds): ``-m slow``."""

import pytest
import torch

from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, backends, record
from hnca_kernels.models import BernoulliVAE, CategoricalVAE
from test_record import SkipNet

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _same_random_draws_as_eager():
    pytest.importorskip("torch._inductor")
    if not backends.is_available("cpp", "cpu"):
        pytest.skip("cpp backend unavailable")
    import torch._inductor.config as config

    torch._dynamo.reset()
    previous, config.fallback_random = config.fallback_random, True
    yield
    config.fallback_random = previous
    torch._dynamo.reset()


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


@pytest.mark.parametrize("make, estimator", [
    (lambda: BernoulliVAE(2, hidden=16, data_dim=30), "hnca_baseline"),
    (lambda: BernoulliVAE(2, hidden=16, data_dim=30), "reinforce_baseline"),
    (lambda: CategoricalVAE(1, variables=3, classes=4, data_dim=30), "hnca"),
], ids=["bernoulli-hnca_baseline", "bernoulli-reinforce_baseline", "categorical-hnca"])
def test_a_vae_step_compiles_whole_and_equals_eager(make, estimator):
    torch.manual_seed(0)
    vae = make()
    x = (torch.rand(8, 30) < 0.4).float()
    compiled = torch.compile(lambda x: vae.elbo_loss(x, estimator), fullgraph=True)
    torch.manual_seed(3)
    compiled(x).backward()
    fast, fast_baselines = _grads(vae), [b.value.clone() for b in vae.baselines]
    vae.zero_grad()
    for b in vae.baselines:
        b.value.zero_()
    torch.manual_seed(3)
    vae.elbo_loss(x, estimator).backward()
    for f, e in zip(fast, _grads(vae)):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
    for f, b in zip(fast_baselines, vae.baselines):
        torch.testing.assert_close(f, b.value, rtol=1e-6, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in fast)


def test_a_record_of_a_users_program_compiles():
    """The record API itself inside the compiled function (record, model, elbo_loss)."""
    torch.manual_seed(0)
    vae = BernoulliVAE(2, hidden=8, data_dim=12)
    x = (torch.rand(5, 12) < 0.5).float()

    def step(x):
        with record() as rec:
            vae.model(x)
        return rec.elbo_loss("hnca", baseline=vae.baselines)

    torch.manual_seed(1)
    torch.compile(step, fullgraph=True)(x).backward()
    fast = _grads(vae)
    vae.zero_grad()
    for b in vae.baselines:
        b.value.zero_()
    torch.manual_seed(1)
    step(x).backward()
    for f, e in zip(fast, _grads(vae)):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


def _train_step(model, x, label):
    with record() as rec:
        action = model(x)
    reward = (action == label).float()
    return rec.surrogate_loss(reward, baseline=0.25)


def test_compiled_step_equals_eager_on_the_same_samples():
    """torch.compile(fullgraph=True) of a whole step (record, reward, surrogate), chain and DAG."""
    chain = StochasticSequential(BernoulliLinear(6, 8, centered=True), BernoulliLinear(8, 5), CategoricalLinear(5, 3))
    for model in (chain, SkipNet()):
        x, label = torch.randn(9, 6), torch.randint(0, 3, (9,))
        compiled = torch.compile(_train_step, fullgraph=True)
        torch.manual_seed(3)
        compiled(model, x, label).backward()
        fast = _grads(model)
        model.zero_grad()
        torch.manual_seed(3)
        _train_step(model, x, label).backward()
        for f, e in zip(fast, _grads(model)):
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in fast)
