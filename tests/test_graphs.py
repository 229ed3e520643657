"""Training steps without host synchronisation, and their capture in a CUDA graph.

On the CPU: every step the experiments capture runs with ``checks("device")`` while any Python-level
read of a tensor's value raises (the host synchronisations a GPU step must not make), and
``CapturedStep`` runs eagerly. On a GPU (benchmarks/gpu_check.sh): the same steps under
``torch.cuda.set_sync_debug_mode("error")``, captured and replayed.
"""

import contextlib

import pytest
import torch

import hnca_kernels
from hnca_kernels import BernoulliLinear, CapturedStep, CategoricalLinear, MovingAverageBaseline, StochasticSequential
from hnca_kernels.models import ESTIMATORS, BernoulliVAE

CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def no_host_reads():
    """Make every Python-level read of a tensor's value an error (on CUDA each would be a sync)."""
    names = ("__bool__", "item", "tolist", "__int__", "__float__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return method

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with hnca_kernels.checks("device"):
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def vae_step(vae, estimator):
    def step(x):
        estimate = vae.estimate(x, estimator)
        estimate.loss.backward()
        variance, _ = estimate.gradient_variance(as_tensor=True)
        return estimate.elbo.sum(), variance
    return step


def bandit_step(net, baseline, estimator="hnca"):
    def step(x, label):
        with hnca_kernels.record() as rec:
            action = net(x)
        reward = (action == label).to(x.dtype)
        rec.surrogate_loss(reward, estimator=estimator, baseline=baseline(reward)).backward()
        return reward.sum(), rec.gradient_variance(as_tensor=True)
    return step


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_vae_step_reads_no_tensor_value(estimator):
    vae = BernoulliVAE(2, hidden=16, data_dim=30)
    x = (torch.rand(8, 30) < 0.4).float()
    with no_host_reads():
        vae_step(vae, estimator)(x)
    assert all(p.grad is not None for p in vae.encoder.parameters())


@pytest.mark.parametrize("estimator", ["hnca", "reinforce"])
def test_bandit_step_reads_no_tensor_value(estimator):
    net = StochasticSequential(BernoulliLinear(30, 16, centered=True), BernoulliLinear(16, 12, centered=True),
                               CategoricalLinear(12, 10))
    x = (torch.rand(8, 30) < 0.4).float()
    with no_host_reads():
        bandit_step(net, MovingAverageBaseline(0.99), estimator)(x, torch.randint(0, 10, (8,)))


def test_the_detector_sees_a_synchronisation():
    with pytest.raises(AssertionError, match="host synchronisation"), no_host_reads():
        bool(torch.ones(1) > 0)


def test_captured_step_runs_eagerly_on_cpu():
    calls = []

    def step(x):
        calls.append(1)
        return x * 2

    captured = CapturedStep(step, warmup=1)
    for _ in range(3):
        assert torch.equal(captured(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 3 and captured.graph is None
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(step, warmup=0)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("estimator", ["hnca_baseline", "reinforce_loo", "disarm"])
def test_captured_vae_step_matches_eager_and_draws_anew(estimator):
    torch.manual_seed(0)
    vae = BernoulliVAE(2, hidden=32, data_dim=64, device="cuda")
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, capturable=True)

    def train(x):
        estimate = vae.estimate(x, estimator)
        opt.zero_grad(set_to_none=True)
        estimate.loss.backward()
        opt.step()
        return estimate.elbo.mean()

    captured = CapturedStep(train, warmup=2)
    x = (torch.rand(16, 64, device="cuda") < 0.4).float()
    torch.cuda.set_sync_debug_mode("error")
    try:
        elbos = [captured(x).clone() for _ in range(6)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert captured.graph is not None
    assert len({round(float(e), 6) for e in elbos[3:]}) > 1  # each replay samples new latents
    # a replay of fixed latents equals the eager step's gradient
    z = vae.sample_latents(x)
    grads = {}
    for name, use_graph in (("eager", False), ("graph", True)):
        def grad_step(x):
            vae.zero_grad(set_to_none=True)
            vae.estimate(x, "hnca", latents=z).loss.backward()
            return torch.cat([p.grad.flatten() for p in vae.parameters()])
        step = CapturedStep(grad_step, warmup=1, enabled=use_graph)
        for _ in range(3):
            out = step(x)
        grads[name] = out.clone()
    torch.testing.assert_close(grads["graph"], grads["eager"])
