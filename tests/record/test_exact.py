"""Unbiasedness and variance reduction, exactly, by enumerating tiny models in float64.

Every model is recorded with ``hnca_kernels.record()``; chains, skip connections, a unit with
children in two layers, a shared layer, categorical hidden units, a deterministic trunk in front
of a middle layer, and samples the record cannot follow (which must fall back to REINFORCE).
"""

import pytest
import torch
import torch.nn as nn

from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, record, use_backend

from enumeration import estimator_mean, estimator_moments, exact_gradient

DT = torch.float64


def B(n_in, n_out, centered=False):
    return BernoulliLinear(n_in, n_out, centered=centered, dtype=DT)


def C(n_in, k, **kw):
    return CategoricalLinear(n_in, k, dtype=DT, **kw)


class Model(nn.Module):
    """A model from a forward function over named submodules (the structures under test)."""

    def __init__(self, forward, **modules):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self._forward = forward

    def forward(self, x):
        return self._forward(self.parts, x)


def classes(out):
    return out[0] if isinstance(out, tuple) else out


# ---- the structures ---------------------------------------------------------------------------
def chain_two_hidden(c):
    return StochasticSequential(B(3, 3, c), B(3, 2, c), C(2, 3))


def chain_trunk_bernoulli_out(c):
    # a deterministic trunk in front, a Bernoulli output layer (its 4 configurations are the actions)
    return StochasticSequential(nn.Linear(3, 4, dtype=DT), nn.Tanh(), B(4, 3, c), B(3, 2, c))


def skip(c):
    # h1 feeds h2 and, past it, the output: layers called with several tensors
    def forward(m, x):
        h1 = m.h1(x)
        h2 = m.h2(h1, x)           # context x beside the sample h1
        return m.out(h1, h2)       # the skip connection
    return Model(forward, h1=B(3, 2, c), h2=B(2 + 3, 2, c), out=C(2 + 2, 3))


def two_children(c):
    # h1 has children in two layers; torch.cat builds one child's input
    def forward(m, x):
        h1 = m.h1(x)
        h2, h3 = m.h2(h1), m.h3(torch.cat([x, h1], -1))
        return m.out(h2, h3)
    return Model(forward, h1=B(3, 2, c), h2=B(2, 2, c), h3=B(3 + 2, 1, c), out=C(3, 2))


def shared(c):
    # the same layer called twice (an unrolled recurrent step with shared weights)
    def forward(m, x):
        h = m.h1(x)
        for _ in range(2):
            h = m.step(h, x)
        return m.out(h)
    return Model(forward, h1=B(3, 2, c), step=B(2 + 3, 2, c), out=C(2, 2))


def categorical_bernoulli_child(c):
    # a categorical hidden layer (2 variables, K = 3) with a Bernoulli child
    return Model(lambda m, x: m.out(m.h(m.z(x))), z=C(3, 3, num_variables=2, one_hot=True), h=B(6, 1, c),
                 out=C(1, 3))


def categorical_softmax_child(c):
    # a categorical hidden layer (K = 3) whose child is the softmax output, plus context
    return Model(lambda m, x: m.out(m.z(x), x), z=C(3, 3, one_hot=True), out=C(3 + 3, 3))


def trunk_middle(c):
    # a deterministic module of x in front of a middle stochastic layer (trained by backprop)
    def forward(m, x):
        h1 = m.h1(x)
        return m.out(m.h2(h1, torch.tanh(m.trunk(x))))
    return Model(forward, h1=B(3, 2, c), trunk=nn.Linear(3, 2, dtype=DT), h2=B(2 + 2, 2, c), out=C(2, 3))


STRUCTURES = {
    "chain": chain_two_hidden,
    "chain_trunk_bernoulli_out": chain_trunk_bernoulli_out,
    "skip": skip,
    "two_children": two_children,
    "shared": shared,
    "categorical_bernoulli_child": categorical_bernoulli_child,
    "categorical_softmax_child": categorical_softmax_child,
    "trunk_middle": trunk_middle,
}
CODINGS = {"01": False, "pm1": True}


def _reward_table(model, x, seed):
    """A random reward per (example, output configuration)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(x.shape[0], 8, generator=g, dtype=DT) * 2 - 0.5


def _action_index(out):
    out = classes(out)
    if out.is_floating_point():  # Bernoulli output units: their configuration's index
        bits = (out > 0).long()
        return (bits * (2 ** torch.arange(bits.shape[1]))).sum(1)
    return out


def _problem(make, centered, seed=0, scale=1.5):
    torch.manual_seed(seed)
    model = make(centered)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    x = torch.randn(2, 3, dtype=DT)
    table = _reward_table(model, x, seed)

    def reward(rec, out, rows):
        return table[rows, _action_index(out)]

    return model, list(model.parameters()), x, reward


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: f"coding={c}")
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("baseline", [0.0, "per_example"], ids=lambda b: f"baseline={b}")
def test_estimators_are_unbiased(structure, coding, baseline):
    model, params, x, reward = _problem(STRUCTURES[structure], CODINGS[coding])
    if baseline == "per_example":
        baseline = torch.tensor([0.3, -0.4], dtype=DT)
    truth = exact_gradient(model, params, x, reward)
    assert max(t.abs().max() for t in truth) > 1e-3  # the test can see a wrong gradient
    for estimator in ("hnca", "reinforce"):
        mean = estimator_mean(model, params, x, reward, estimator, baseline)
        for k, (t, m) in enumerate(zip(truth, mean)):
            torch.testing.assert_close(m, t, rtol=0, atol=1e-9, msg=f"{estimator}: parameter {k}")


def test_a_scalar_baseline_keeps_the_chain_unbiased():
    test_estimators_are_unbiased("chain", "pm1", 0.7)


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: f"coding={c}")
@pytest.mark.parametrize("structure", STRUCTURES)
def test_hnca_variance_at_most_reinforce(structure, coding):
    model, params, x, reward = _problem(STRUCTURES[structure], CODINGS[coding], seed=1)
    _, var_hnca = estimator_moments(model, params, x, reward, "hnca")
    _, var_re = estimator_moments(model, params, x, reward, "reinforce")
    strictly_lower = 0
    for k, (vh, vr) in enumerate(zip(var_hnca, var_re)):
        assert (vh <= vr + 1e-12).all(), f"parameter {k}"
        strictly_lower += int((vh < vr - 1e-6).sum())
    assert strictly_lower > 0  # the hidden layers really are credited differently


def test_enumeration_detects_a_biased_estimator():
    """The exact test can fail: dropping the credit's normalisation biases the estimate."""
    import hnca_kernels.layers as layers

    model, params, x, reward = _problem(skip, False)
    truth = exact_gradient(model, params, x, reward)
    original = layers.functional.hnca_logit_credit
    layers.functional.hnca_logit_credit = lambda logits, d, **kw: torch.sigmoid(logits) * torch.sigmoid(-logits) * torch.expm1(d)
    try:
        # the reference backend: the cpp one would use its fused credit, not the patched function
        with use_backend("reference"):
            mean = estimator_mean(model, params, x, reward, "hnca")
    finally:
        layers.functional.hnca_logit_credit = original
    assert max((m - t).abs().max() for m, t in zip(mean, truth)) > 1e-4


# ---- samples the record cannot follow: REINFORCE for their units, still unbiased ------------------
def _direct_reward_model(c):
    # the reward reads h1 directly, beside the output: HNCA for h1 would be biased
    return Model(lambda m, x: (lambda h1: (m.out(m.h2(h1)), h1))(m.h1(x)), h1=B(3, 2, c), h2=B(2, 2, c),
                 out=C(2, 3))


def _reward_reading_h1(table):
    def reward(rec, out, rows):
        a, h1 = out
        return table[rows, a] + 0.8 * (h1 > 0).to(DT).sum(-1)
    return reward


def _watched_direct_model(c):
    # the model itself computes the h1-dependent part of the reward inside the record
    def forward(m, x):
        h1 = m.h1(x)
        return m.out(m.h2(h1)), 0.8 * (h1 > 0).to(DT).sum(-1)
    return Model(forward, h1=B(3, 2, c), h2=B(2, 2, c), out=C(2, 3))


def _hidden_path_model(c):
    # h1 reaches h2 through a deterministic module the record cannot follow
    lin = nn.Linear(2, 2, dtype=DT)
    return Model(lambda m, x: m.out(m.h2(torch.tanh(m.lin(m.h1(x))))), h1=B(3, 2, c), lin=lin, h2=B(2, 2, c),
                 out=C(2, 3))


def _extra_reward(table):
    def reward(rec, out, rows):
        a, extra = out
        return table[rows, a] + extra
    return reward


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: f"coding={c}")
@pytest.mark.parametrize("case", ["outputs=", "watched", "hidden_path"])
@pytest.mark.filterwarnings("ignore:hnca. these units get REINFORCE")
def test_unmodeled_paths_fall_back_to_reinforce_and_stay_unbiased(case, coding):
    make = {"outputs=": _direct_reward_model, "watched": _watched_direct_model,
            "hidden_path": _hidden_path_model}[case]
    model, params, x, reward = _problem(make, CODINGS[coding])
    table = _reward_table(model, x, 0)
    if case == "outputs=":
        reward, outputs = _reward_reading_h1(table), (lambda rec: [rec.calls[0].sample])
    elif case == "watched":
        reward, outputs = _extra_reward(table), None
    else:
        outputs = None
    truth = exact_gradient(model, params, x, reward)
    for estimator in ("hnca", "reinforce"):
        mean = estimator_mean(model, params, x, reward, estimator, 0.3, outputs=outputs)
        for k, (t, m) in enumerate(zip(truth, mean)):
            torch.testing.assert_close(m, t, rtol=0, atol=1e-9, msg=f"{estimator}: parameter {k}")
    with record() as rec:
        model(x)
    rec.surrogate_loss(torch.zeros(2, dtype=DT), outputs=outputs(rec) if outputs else ())
    assert list(rec.fallbacks) == [rec.calls[0]]  # h1, and only h1, falls back
    if case == "outputs=":  # without the fallback HNCA is biased here: the test can tell
        mean = estimator_mean(model, params, x, reward, "hnca", 0.3)
        assert max((m - t).abs().max() for m, t in zip(mean, truth)) > 1e-4
