"""What the benchmark grid times is a training step split into phases: at a tiny shape, the phases
of benchmarks/phases.py run the way the benchmarks run them (fresh forward per round, the
backward whole or as surrogate then autograd) fill the same ``.grad`` as a plain training step on
the same samples, and their step leaves the same weights."""

import copy
import importlib.util
from pathlib import Path

import pytest

from paths import ROOT  # noqa: E402
import torch
import torch.nn.functional as F

import hnca_kernels
from hnca_kernels import MovingAverageBaseline
from hnca_kernels.backends import is_available
from hnca_kernels.models import BernoulliVAE

_PATH = ROOT / "benchmarks" / "phases.py"
_spec = importlib.util.spec_from_file_location("hnca_bench_phases", _PATH)
phases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(phases)

B, WIDTHS = 6, [13, 7, 5, 6, 3]
METHODS = ["hnca-reference", "hnca-cpp", "reinforce", "backprop"]


def plain_grads(net, baseline, x, label, name, seed):
    """The README's training step without the optimizer, from a seed; returns the grads."""
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if name == "backprop":
        F.cross_entropy(net(x), label).backward()
    else:
        with hnca_kernels.record() as rec:
            action = net(x)
        reward = (action == label).float()
        estimator, _, backend = name.partition("-")
        rec.surrogate_loss(reward, estimator=estimator, baseline=baseline(reward), backend=backend or None).backward()
    return [p.grad.clone() for p in net.parameters()]


def skip_unavailable(name):
    if name == "hnca-cpp" and not is_available("cpp", "cpu"):
        pytest.skip("cpp is not available")


@pytest.mark.parametrize("phase", ["backward", "autograd"])
@pytest.mark.parametrize("name", METHODS)
def test_timed_backward_fills_the_grads_of_a_plain_step(name, phase):
    """``backward`` whole, or ``autograd`` after the surrogate its setup built: the same grads."""
    skip_unavailable(name)
    if name == "backprop" and phase != "backward":
        pytest.skip("backprop's backward has no parts")
    m = phases.method(name, WIDTHS)
    net, baseline = copy.deepcopy(m.net), MovingAverageBaseline(0.99)
    x, label = phases.batch(B, WIDTHS)
    setup, fn = phases.phase_call(m, phase, x, label)
    for seed in (1, 2):  # rounds on one method object, as the benchmark runs them
        expected = plain_grads(net, baseline, x, label, name, seed)
        torch.manual_seed(seed)
        fn(*setup())
        for got, want in zip(m.net.parameters(), expected):
            torch.testing.assert_close(got.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("phase", ["optimizer", "step"])
@pytest.mark.parametrize("name", METHODS)
def test_timed_optimizer_and_step_are_a_training_step(name, phase):
    skip_unavailable(name)
    m = phases.method(name, WIDTHS)
    net, baseline = copy.deepcopy(m.net), MovingAverageBaseline(0.99)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x, label = phases.batch(B, WIDTHS)
    setup, fn = phases.phase_call(m, phase, x, label)
    for seed in (1, 2):
        plain_grads(net, baseline, x, label, name, seed)
        opt.step()
        torch.manual_seed(seed)
        fn(*(setup() if setup else ()))
    initial = phases.method(name, WIDTHS).net.parameters()  # the same seed: the weights before
    moved = False
    for got, want, before in zip(m.net.parameters(), net.parameters(), initial):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        moved |= not torch.equal(got, before)
    assert moved


@pytest.mark.parametrize("name", ["hnca-reference", "hnca-cpp", "reinforce"])
def test_timed_forward_message_pass_and_surrogate_run(name):
    skip_unavailable(name)
    m = phases.method(name, WIDTHS)
    x, label = phases.batch(B, WIDTHS)
    for phase in ("forward", "message_pass", "surrogate") if name != "reinforce" else ("forward", "surrogate"):
        setup, fn = phases.phase_call(m, phase, x, label)
        fn(*(setup() if setup else ()))
    rec, _ = m.forward(x, label)
    assert all(c.logits.requires_grad for c in rec.calls)  # the timed forward keeps autograd on
    if name != "reinforce":  # every hidden layer gets a message, the output none
        assert [d is None for d in m.message_pass(rec)] == [False, False, False, True]


@pytest.mark.parametrize("estimator", ["hnca_baseline", "disarm"])
def test_vae_phases_fill_the_grads_of_elbo_loss(estimator):
    torch.manual_seed(0)
    vae = BernoulliVAE(2, hidden=5, data_dim=9)
    twin = copy.deepcopy(vae)
    x = (torch.rand(4, 9) < 0.5).float()
    for seed in (1, 2):
        twin.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        twin.elbo_loss(x, estimator).backward()
        torch.manual_seed(seed)
        phases.vae_backward(vae, x, estimator, phases.vae_prepare(vae, x))
        for got, want in zip(vae.parameters(), twin.parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
