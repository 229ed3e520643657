"""The record API: what it models, what it refuses, and models that copy, pickle, hook and compile."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import hnca_kernels
from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, record
from hnca_kernels import functional as Fn
from hnca_kernels.ops import reference


class SkipNet(nn.Module):
    """A user's own module: a skip connection, a categorical hidden layer, context beside samples."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.h1 = BernoulliLinear(6, 5, centered=True, dtype=dtype)
        self.z = CategoricalLinear(5, 3, num_variables=2, one_hot=True, dtype=dtype)
        self.h2 = BernoulliLinear(5 + 6 + 6, 4, dtype=dtype)
        self.out = CategoricalLinear(4 + 5, 3, dtype=dtype)

    def forward(self, x):
        h1 = self.h1(x)
        z = self.z(h1)
        h2 = self.h2(h1, z, x)
        return self.out(h2, h1)


def _gradients(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_the_record_knows_parents_children_and_columns():
    net = SkipNet()
    with record() as rec:
        net(torch.randn(4, 6))
    h1, z, h2, out = rec.calls
    assert [c.layer for c in rec.calls] == [net.h1, net.z, net.h2, net.out]
    assert h1.children == [z, h2, out] and z.children == [h2] and h2.children == [out] and out.children == []
    assert [(s.start, s.stop, s.source) for s in h2.segments] == [(0, 5, h1), (5, 11, z), (11, 17, None)]
    assert z.sample.shape == (4, 6) and z.logits.shape == (4, 2, 3)
    assert not rec.fallbacks


def test_cat_and_copies_of_samples_are_followed():
    l1, l2 = BernoulliLinear(3, 2), BernoulliLinear(2 + 3, 2)
    x = torch.randn(5, 3)
    with record() as rec:
        h = l1(x)
        l2(torch.cat([h.detach().float(), x], dim=1))
    assert rec.calls[0].children == [rec.calls[1]] and not rec.fallbacks


def test_messages_follow_the_weight_columns_of_each_parent():
    """log_ratios of a DAG equal the functional messages computed by hand from the slices."""
    torch.manual_seed(0)
    net = SkipNet(torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64)
    with record() as rec:
        net(x)
    d = rec.log_ratios(backend="reference")
    h1, z, h2, out = rec.calls
    W2, Wo, Wz = net.h2.weight.detach(), net.out.weight.detach(), net.z.weight.detach()
    by_hand = (Fn.counterfactual_log_ratio(h1.sample, W2[:, :5], h2.logits.detach(), h2.sample, parent_values=(-1, 1))
               + Fn.categorical_counterfactual_log_ratio(h1.sample, Wo[:, 4:], out.logits.detach(), out.sample,
                                                         parent_values=(-1, 1)))
    # z's own child (a categorical layer with two variables) also sends h1 a message
    for v in range(2):
        by_hand = by_hand + Fn.categorical_counterfactual_log_ratio(
            h1.sample, Wz[3 * v:3 * v + 3], z.logits.detach()[:, v], z.layer.classes(z.sample)[:, v],
            parent_values=(-1, 1))
    torch.testing.assert_close(d[0], by_hand)
    torch.testing.assert_close(d[1], reference.categorical_parent_log_ratio(
        z.layer.classes(z.sample), W2[:, 5:11], h2.logits.detach(), h2.sample))
    assert d[3] is None


@pytest.mark.parametrize("child", ["bernoulli", "softmax"])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_categorical_parent_message_against_reference_and_brute_force(child, backend):
    if not hnca_kernels.backends.is_available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(1)
    B, V, K, out = 6, 3, 4, 5 if child == "bernoulli" else 4
    a = torch.randint(0, K, (B, V), generator=g)
    onehot = torch.nn.functional.one_hot(a, K).double().view(B, V * K)
    weight = torch.randn(out, V * K, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(out, generator=g, dtype=torch.float64)
    logits = onehot @ weight.t() + bias
    y = (torch.rand(B, out, generator=g) < 0.5).double() if child == "bernoulli" else torch.randint(0, out, (B,), generator=g)
    d = Fn.categorical_parent_log_ratio(a, weight, logits, y, backend=backend)
    ref = reference.categorical_parent_log_ratio(a, weight, logits, y)
    # brute force: set variable v to class k, recompute the children from scratch
    brute = torch.zeros(B, V, K, dtype=torch.float64)
    for v in range(V):
        for k in range(K):
            a2 = a.clone()
            a2[:, v] = k
            l2 = torch.nn.functional.one_hot(a2, K).double().view(B, V * K) @ weight.t() + bias
            if child == "bernoulli":
                s = torch.where(y > 0, 1.0, -1.0).double()
                brute[:, v, k] = (torch.nn.functional.logsigmoid(s * l2) - torch.nn.functional.logsigmoid(s * logits)).sum(-1)
            else:
                brute[:, v, k] = (l2.log_softmax(-1) - logits.log_softmax(-1)).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(ref, brute)
    torch.testing.assert_close(d, brute)


def test_an_operation_on_a_sample_falls_back_and_strict_raises():
    l1, l2 = BernoulliLinear(3, 2), BernoulliLinear(2, 2)
    x = torch.randn(4, 3)
    with record() as rec:
        l2(torch.relu(l1(x) * 2))
    first = rec.calls[0]
    assert first.children == [] and first.feeds_unmodeled
    assert "reaches call 1" in " ".join(rec.fallbacks[first])
    with pytest.warns(UserWarning, match="REINFORCE instead of HNCA"):
        rec.surrogate_loss(torch.ones(4))
    with pytest.raises(RuntimeError, match="strict"):
        with record(strict=True):
            l2(l1(x) * 2)


def test_reading_metadata_is_not_a_path():
    l1, l2 = BernoulliLinear(3, 2), BernoulliLinear(2, 2)
    with record() as rec:
        h = l1(torch.randn(4, 3))
        assert h.shape == (4, 2) and h.dim() == 2 and h.size(1) == 2 and h.dtype == torch.float32
        l2(h)
    assert not rec.fallbacks


def test_a_sample_changed_in_place_is_an_error():
    l1, l2 = BernoulliLinear(3, 2), BernoulliLinear(2, 2)
    with record() as rec:
        h = l1(torch.randn(4, 3))
        l2(h)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        rec.surrogate_loss(torch.ones(4))


def test_nested_records_both_see_every_call():
    net = SkipNet()
    with record() as outer:
        net(torch.randn(3, 6))
        with record() as inner:
            net(torch.randn(3, 6))
    assert len(outer.calls) == 8 and len(inner.calls) == 4
    assert outer.calls[4].layer is net.h1 and outer.calls[4].children  # the second forward's graph


def test_replay_checks_its_samples():
    layer = BernoulliLinear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"replay\[0\] must hold only"):
        with record(replay=[torch.full((4, 2), 0.5)]):
            layer(x)
    with pytest.raises(ValueError, match="holds 1 samples but sampled call 1"):
        with record(replay=[torch.zeros(4, 2)]):
            layer(x), layer(x)
    with pytest.raises(ValueError, match="one-hot rows"):
        with record(replay=[torch.ones(4, 3)]):
            CategoricalLinear(3, 3, one_hot=True)(x)


def test_categorical_layer_shapes():
    x = torch.randn(5, 4)
    many = CategoricalLinear(4, 3, num_variables=2)
    assert many(x).shape == (5, 2) and many.logits(x).shape == (5, 2, 3)
    hot = CategoricalLinear(4, 3, num_variables=2, one_hot=True)
    z = hot(x)
    assert z.shape == (5, 6) and torch.equal(z.view(5, 2, 3).sum(-1), torch.ones(5, 2))
    assert CategoricalLinear(4, 3, one_hot=True)(x).shape == (5, 3)
    with pytest.raises(TypeError, match="one_hot=True"):
        BernoulliLinear(2, 2)(many(x))
    with pytest.raises(ValueError, match=r"3 \+ 2 = 5"):
        BernoulliLinear(4, 2)(torch.randn(5, 3), torch.randn(5, 2))


def test_two_forwards_are_two_records():
    """The leave-one-out pattern: each record's surrogate uses its own forward's samples."""
    torch.manual_seed(0)
    net = SkipNet()
    x = torch.randn(6, 6)
    with record() as r1:
        a1 = net(x)
    with record() as r2:
        a2 = net(x)
    rewards = (a1 == 0).float(), (a2 == 0).float()
    (r1.surrogate_loss(rewards[0], baseline=rewards[1]) + r2.surrogate_loss(rewards[1], baseline=rewards[0])).backward()
    both = _gradients(net)
    separate = [torch.zeros_like(g) for g in both]
    for rec, own, other in ((r1, rewards[0], rewards[1]), (r2, rewards[1], rewards[0])):
        net.zero_grad()
        with record(replay=[c.sample for c in rec.calls]) as again:
            net(x)
        again.surrogate_loss(own, baseline=other).backward()
        separate = [s + g for s, g in zip(separate, _gradients(net))]
    for b, s in zip(both, separate):
        torch.testing.assert_close(b, s)


def test_deprecated_surrogate_loss_refuses_two_forwards():
    net = StochasticSequential(BernoulliLinear(4, 3), CategoricalLinear(3, 2))
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="call the model on a batch first"), pytest.warns(DeprecationWarning):
        net.surrogate_loss(torch.ones(5))
    a = net(x)
    with pytest.warns(DeprecationWarning):
        net.surrogate_loss((a == 1).float()).backward()
    net(x), net(x)
    with pytest.raises(RuntimeError, match="ran 2 times"), pytest.warns(DeprecationWarning):
        net.surrogate_loss(torch.ones(5))
    with torch.no_grad():
        net(x)
    with pytest.raises(RuntimeError, match="ran 3 times"), pytest.warns(DeprecationWarning):
        net.surrogate_loss(torch.ones(5))


def test_models_copy_pickle_and_average_mid_training():
    net = StochasticSequential(BernoulliLinear(4, 8), BernoulliLinear(8, 3), CategoricalLinear(3, 2))
    empty = io.BytesIO()
    torch.save(net, empty)
    with record() as rec:
        a = net(torch.randn(64, 4))
    rec.surrogate_loss((a == 1).float()).backward()
    net(torch.randn(64, 4))  # the deprecated path's record is kept outside the module
    clone = copy.deepcopy(net)
    saved = io.BytesIO()
    torch.save(net, saved)
    assert len(saved.getvalue()) < len(empty.getvalue()) + 4096  # the grads, no batch
    restored = pickle.loads(pickle.dumps(net))
    averaged = torch.optim.swa_utils.AveragedModel(net)
    averaged.update_parameters(net)
    for other in (clone, restored, averaged.module):
        with record() as r:
            out = other(torch.randn(3, 4))
        r.surrogate_loss((out == 0).float()).backward()
        assert all(p.grad is not None for p in other.parameters())


def test_hooks_fire_on_layers_inside_sequential():
    net = StochasticSequential(BernoulliLinear(4, 3), CategoricalLinear(3, 2))
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(("forward", tuple(o.shape))))
    net[1].register_forward_pre_hook(lambda m, i: seen.append(("pre", tuple(i[0].shape))))
    with record():
        net(torch.randn(5, 4))
    assert seen == [("forward", (5, 3)), ("pre", (5, 3))]


@pytest.mark.parametrize("change", ["append", "insert", "extend", "setitem", "iadd"])
def test_every_way_of_building_a_sequential_is_checked(change):
    net = StochasticSequential(BernoulliLinear(4, 3), BernoulliLinear(3, 2))
    bad = BernoulliLinear(5, 2)
    before = list(net)
    with pytest.raises(ValueError, match="expects 5 inputs"):
        {"append": lambda: net.append(bad), "insert": lambda: net.insert(1, bad),
         "extend": lambda: net.extend([bad]), "setitem": lambda: net.__setitem__(1, bad),
         "iadd": lambda: net.__iadd__(StochasticSequential(bad))}[change]()
    assert list(net) == before


@pytest.mark.parametrize("estimator", ["hnca_baseline", "reinforce_loo", "disarm", "gumbel_st"])
def test_a_record_is_freed_without_the_cycle_collector(estimator):
    """A step's record and its tensors go with the last reference to them (no reference cycles):
    a training loop's memory does not wait for the cycle collector (with the data's epoch tensor
    kept alive by any record still waiting for it)."""
    import gc
    import weakref

    from hnca_kernels.models import BernoulliVAE, CategoricalVAE

    for vae in (BernoulliVAE(2, hidden=6, data_dim=9), CategoricalVAE(1, variables=2, classes=3, data_dim=9)):
        if estimator == "disarm" and isinstance(vae, CategoricalVAE):
            continue
        data = (torch.rand(40, 9) < 0.5).float()
        gc.collect()
        gc.disable()
        try:
            estimate = vae.estimate(data[:8], estimator)
            estimate.loss.backward()
            estimate.gradient_variance()
            rec, storage = weakref.ref(estimate.record), weakref.ref(data)
            del estimate, data
            assert rec() is None, "the record outlives its last reference"
            assert storage() is None, "the data outlive the step"
        finally:
            gc.enable()
