"""Unbiasedness and variance reduction, exactly, by enumerating tiny networks in float64."""

import pytest
import torch
import torch.nn as nn

from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, use_backend

from enumeration import estimator_moments, exact_gradient

DT = torch.float64


def _randomise(net, scale=1.5):
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale)
    return net


def _two_hidden(centered):
    return StochasticSequential(
        BernoulliLinear(3, 3, centered=centered, dtype=DT),
        BernoulliLinear(3, 2, centered=centered, dtype=DT),
        CategoricalLinear(2, 3, dtype=DT),
    )


def _one_hidden(centered):
    return StochasticSequential(BernoulliLinear(3, 3, centered=centered, dtype=DT), CategoricalLinear(3, 3, dtype=DT))


def _trunk_bernoulli_output(centered):
    # deterministic trunk in front, a Bernoulli output layer (its 4 configurations are the actions)
    return StochasticSequential(
        nn.Linear(3, 4, dtype=DT), nn.Tanh(),
        BernoulliLinear(4, 3, centered=centered, dtype=DT),
        BernoulliLinear(3, 2, centered=centered, dtype=DT),
    )


NETS = {"two_hidden": _two_hidden, "one_hidden": _one_hidden, "trunk_bernoulli_out": _trunk_bernoulli_output}
CODINGS = {"01": False, "pm1": True}


def _problem(make, centered, seed=0):
    torch.manual_seed(seed)
    net = _randomise(make(centered))
    x = torch.randn(2, 3, dtype=DT)
    num_actions = 3 if isinstance(net[-1], CategoricalLinear) else 2 ** net[-1].out_features
    reward = torch.rand(2, num_actions, dtype=DT) * 2 - 0.5
    return net, x, reward


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: f"coding={c}")
@pytest.mark.parametrize("net_name", NETS)
@pytest.mark.parametrize("baseline", [0.0, 0.7, "per_example"], ids=lambda b: f"baseline={b}")
def test_estimators_are_unbiased(net_name, coding, baseline):
    net, x, reward = _problem(NETS[net_name], CODINGS[coding])
    if baseline == "per_example":
        baseline = torch.tensor([0.3, -0.4], dtype=DT)
    truth = exact_gradient(net, x, reward)
    assert max(t.abs().max() for t in truth) > 1e-3  # the test can see a wrong gradient
    for estimator in ("hnca", "reinforce"):
        mean, _ = estimator_moments(net, x, reward, estimator, baseline)
        for name_t, t, m in zip(net.state_dict(), truth, mean):
            torch.testing.assert_close(m, t, rtol=0, atol=1e-9, msg=f"{estimator}: {name_t}")


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: f"coding={c}")
@pytest.mark.parametrize("net_name", NETS)
def test_hnca_variance_at_most_reinforce(net_name, coding):
    net, x, reward = _problem(NETS[net_name], CODINGS[coding], seed=1)
    _, var_hnca = estimator_moments(net, x, reward, "hnca")
    _, var_re = estimator_moments(net, x, reward, "reinforce")
    strictly_lower = 0
    for (name, _), vh, vr in zip(net.named_parameters(), var_hnca, var_re):
        assert (vh <= vr + 1e-12).all(), name
        strictly_lower += int((vh < vr - 1e-6).sum())
    assert strictly_lower > 0  # the hidden layers really are credited differently


def test_enumeration_detects_a_biased_estimator():
    """The exact test can fail: dropping the credit's normalisation biases the estimate."""
    import hnca_kernels.sequential as seq

    net, x, reward = _problem(_two_hidden, False)
    truth = exact_gradient(net, x, reward)
    original = seq.hnca_logit_credit
    seq.hnca_logit_credit = lambda logits, d: torch.sigmoid(logits) * torch.sigmoid(-logits) * torch.expm1(d)
    try:
        # the reference backend: the cpp one would use its fused credit, not the patched function
        with use_backend("reference"):
            mean, _ = estimator_moments(net, x, reward, "hnca")
    finally:
        seq.hnca_logit_credit = original
    assert max((m - t).abs().max() for m, t in zip(mean, truth)) > 1e-4
