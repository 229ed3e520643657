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
        variance = estimate.gradient_variance(as_tensor=True)
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


# ---- the experiments' device loop, run on the CPU without graphs: the same as the eager loop ----
def _args(**kw):
    import argparse
    base = dict(batch_size=10, estimator="hnca", baseline=True, on_nonfinite="stop", cuda_graphs=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_bandit_device_epoch_equals_the_eager_epoch():
    from hnca_kernels.experiments import bandit, common

    x, y = torch.rand(40, 30), torch.randint(0, 10, (40,))
    results = []
    for on_device in (False, True):
        torch.manual_seed(0)
        model = bandit.build_model(2, 12, 10, in_features=30)
        opt, base = torch.optim.Adam(model.parameters(), lr=1e-2), MovingAverageBaseline(0.9)
        rng = torch.Generator().manual_seed(5)
        args = _args()
        if on_device:
            steps = common.DeviceEpoch(bandit._step(model, opt, base, args), graphs=False)
            acc, var, bad = bandit.device_epoch(steps, rng, x, y, args, torch.device("cpu"))
            assert bad is None
        else:
            acc, var = bandit.train_epoch(model, opt, base, rng, x, y, args, torch.device("cpu"),
                                          common.Divergence("stop"))
        results.append((acc, var, [p.detach().clone() for p in model.parameters()], base.value.clone()))
    (a1, v1, p1, b1), (a2, v2, p2, b2) = results
    assert a1 == a2 and v1 == pytest.approx(v2, rel=1e-12) and torch.equal(b1, b2)
    for u, w in zip(p1, p2):
        torch.testing.assert_close(u, w, rtol=0, atol=0)


def test_vae_device_epoch_equals_the_eager_epoch():
    from tqdm import tqdm

    from hnca_kernels.experiments import common
    from hnca_kernels.experiments import vae as vae_cli

    x_epoch = (torch.rand(40, 30) < 0.4).float()
    results = []
    for on_device in (False, True):
        torch.manual_seed(0)
        vae = BernoulliVAE(2, hidden=12, data_dim=30)
        opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
        args = _args(estimator="hnca_baseline")
        with tqdm(disable=True) as bar:
            if on_device:
                steps = common.DeviceEpoch(vae_cli._step(vae, opt, args.estimator), graphs=False)
                elbo, var, count, bad = steps.run(((x_epoch[k:k + 10],) for k in range(0, 40, 10)), bar)
                assert bad is None and count == 4
                var *= count
            else:
                elbo, _, var, count = vae_cli._eager_epoch(args, vae, opt, common.Divergence("stop"), x_epoch, bar,
                                                           1, 0)
        results.append((elbo, var, [p.detach().clone() for p in vae.parameters()]))
    (e1, v1, p1), (e2, v2, p2) = results
    assert e1 == pytest.approx(e2, rel=1e-6) and v1 == pytest.approx(v2, rel=1e-9)
    for u, w in zip(p1, p2):
        torch.testing.assert_close(u, w, rtol=0, atol=0)


def test_device_epoch_reports_the_first_nonfinite_batch():
    from hnca_kernels.experiments import common

    def step(v):
        return v.sum(), v.sum(), torch.isfinite(v).all()

    batches = [(torch.ones(2),), (torch.ones(2),), (torch.tensor([1.0, float("nan")]),), (torch.full((2,), float("inf")),)]
    total, variance, count, bad = common.DeviceEpoch(step, graphs=False).run(batches)
    assert count == 4 and bad == 3
    assert common.DeviceEpoch(step, graphs=False).run(batches[:2]) == (4.0, 2.0, 2, None)
