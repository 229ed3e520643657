"""Layers, StochasticSequential and MovingAverageBaseline: sampling, saturation, bad input."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn

from hnca_kernels import BernoulliLinear, CategoricalLinear, MovingAverageBaseline, StochasticSequential, backends
from hnca_kernels import record, use_backend
from hnca_kernels.baseline import update_baselines


@pytest.fixture(params=["torch", "cpp"])
def drawn_by(request):
    """The layers' samples drawn by their torch expressions (the reference backend asked for) or,
    once the cpp backend is loaded, by its ops; yields a check that a call of logits took that path."""
    if request.param == "torch":
        with use_backend("reference"):
            yield lambda logits: not backends.draws_in_cpp(logits)
    else:
        if not backends.is_available("cpp", "cpu"):
            pytest.skip(backends.unavailable_reason("cpp", "cpu"))
        yield backends.draws_in_cpp


@pytest.mark.parametrize("centered", [False, True])
def test_bernoulli_samples_fire_with_sigmoid_probability(centered, drawn_by):
    layer = BernoulliLinear(4, 3, centered=centered)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([-2.0, 0.0, 1.5]))
        layer.weight.zero_()
    x = torch.zeros(20000, 4)
    assert drawn_by(layer.logits(x))
    h = layer(x)
    lo, hi = (-1.0, 1.0) if centered else (0.0, 1.0)
    assert set(h.unique().tolist()) <= {lo, hi}
    rate = (h == hi).double().mean(0)
    expected = torch.sigmoid(layer.bias.double())
    assert ((rate - expected).abs() < 4 * (expected * (1 - expected) / 20000).sqrt()).all()


def test_initialisation_is_glorot_uniform_with_zero_bias():
    layer = BernoulliLinear(300, 200)
    bound = math.sqrt(6 / 500)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.95 * bound
    assert (layer.bias == 0).all()


def test_categorical_samples_follow_softmax(drawn_by):
    layer = CategoricalLinear(2, 3)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    assert drawn_by(layer.logits(torch.zeros(1, 2)))
    a = layer(torch.zeros(30000, 2))
    assert a.dtype == torch.int64 and a.shape == (30000,)
    freq = torch.bincount(a, minlength=3).double() / 30000
    assert torch.allclose(freq, torch.softmax(layer.bias.double(), 0), atol=0.01)


def test_same_seed_same_samples():
    net = StochasticSequential(BernoulliLinear(6, 5), CategoricalLinear(5, 4))
    x = torch.randn(9, 6)
    torch.manual_seed(3)
    a1 = net(x)
    torch.manual_seed(3)
    assert torch.equal(net(x), a1)


def _draws(layer, logits, path, words_before=0):
    """The layer's sample of ``logits`` drawn by ``path`` from seed 5 after ``words_before`` of the
    generator's words, and the generator's whole state after it (the engine's words, where it reads
    next and when it regenerates them)."""
    torch.manual_seed(5)
    torch.rand(words_before)  # one word each
    with use_backend("reference" if path == "torch" else None):
        assert backends.draws_in_cpp(logits) == (path == "cpp")
        sample = layer.sample(logits)
    return sample, torch.get_rng_state()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layer", [
    BernoulliLinear(2, 333), BernoulliLinear(2, 333, centered=True), CategoricalLinear(2, 7),
    CategoricalLinear(2, 3, num_variables=5), CategoricalLinear(2, 4, num_variables=3, one_hot=True),
    CategoricalLinear(2, 1)], ids=["01", "pm1", "softmax", "softmax-V5", "one-hot-V3", "one-class"])
def test_the_cpp_ops_draw_the_torch_expressions_samples_bit_for_bit(layer, dtype):
    """The same generator words, sigmoid and softmax: the cpp path's samples are the torch path's,
    and it leaves the generator where the torch path does (an odd number of elements: not whole
    vectors or whole blocks of draws; saturated logits, for probabilities 0 and 1)."""
    if not backends.is_available("cpp", "cpu"):
        pytest.skip(backends.unavailable_reason("cpp", "cpu"))
    layer = layer.to(dtype)
    torch.manual_seed(0)
    shape = layer._logits(torch.zeros(250, 2, dtype=dtype)).shape  # [B, out], or [B, V, K]
    logits = torch.randn(shape) * 4
    logits.view(-1)[:3] = torch.tensor([-200.0, 200.0, 0.0])
    logits = logits.to(dtype)
    # draws that start at the first word of a state (the engine regenerates its 624 words first,
    # the cpp ops on vectors), at its last word, within it, and none; 250 rows: several
    # regenerations (Bernoulli) and more rows than a block of the ops' draws (softmax)
    for rows, words_before in ((9, 0), (9, 623), (9, 1000), (250, 100), (1, 0), (0, 0), (0, 5)):
        cpp = _draws(layer, logits[:rows], "cpp", words_before)
        torch_ = _draws(layer, logits[:rows], "torch", words_before)
        assert cpp[0].dtype == torch_[0].dtype and torch.equal(cpp[0], torch_[0])
        assert torch.equal(cpp[1], torch_[1])
        assert rows < 9 or len(layer.sample_values) == 1 or len(torch.unique(cpp[0])) > 1


def test_the_sampling_ops_draw_from_a_given_generator():
    """A generator passed to the ops is the one they advance: the default one is untouched."""
    if not backends.is_available("cpp", "cpu"):
        pytest.skip(backends.unavailable_reason("cpp", "cpu"))
    logits = torch.randn(6, 11)
    for op, args in ((torch.ops.hnca.bernoulli_sample, (-1.0, 1.0, torch.float32)),
                     (torch.ops.hnca.categorical_sample, ())):
        torch.manual_seed(1)
        first = op(logits, *args, generator=torch.Generator().manual_seed(7))
        untouched = torch.rand(4)
        torch.manual_seed(1)
        assert torch.equal(torch.rand(4), untouched)
        assert torch.equal(op(logits, *args, generator=torch.Generator().manual_seed(7)), first)
        assert not torch.equal(op(logits, *args, generator=torch.Generator().manual_seed(8)), first)


@pytest.mark.parametrize("estimator", ["hnca", "reinforce"])
@pytest.mark.parametrize("centered", [False, True])
def test_saturated_units_give_finite_gradients(estimator, centered):
    torch.manual_seed(0)
    net = StochasticSequential(
        BernoulliLinear(20, 30, centered=centered), BernoulliLinear(30, 20, centered=centered), CategoricalLinear(20, 5)
    )
    with torch.no_grad():
        for layer in net:
            layer.weight.normal_(0, 40.0)  # logits far beyond +-100
            layer.bias.uniform_(-100, 100)
    x = torch.randn(64, 20)
    with record() as rec:
        a = net(x)
    assert max(c.logits.abs().max() for c in rec.calls) > 100
    rec.surrogate_loss((a == 2).float(), estimator=estimator, baseline=0.3).backward()
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_trunk_receives_gradient_and_loss_value_is_minus_mean_reward():
    net = StochasticSequential(nn.Linear(5, 8), nn.ReLU(), BernoulliLinear(8, 4), CategoricalLinear(4, 3))
    with record() as rec:
        a = net(torch.randn(16, 5))
    reward = (a == 0).float()
    loss = rec.surrogate_loss(reward)
    assert loss.item() == pytest.approx(-reward.mean().item())
    loss.backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_training_improves_reward():
    """A small network learns a 4-class task from reward alone with either estimator."""
    torch.manual_seed(0)
    centers = torch.randn(4, 10) * 2
    results = {}
    for estimator in ("hnca", "reinforce"):
        torch.manual_seed(1)
        net = StochasticSequential(BernoulliLinear(10, 32, centered=True), CategoricalLinear(32, 4))
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        baseline = MovingAverageBaseline(0.9)
        for _ in range(300):
            label = torch.randint(0, 4, (64,))
            x = centers[label] + torch.randn(64, 10) * 0.5
            with record() as rec:
                reward = (net(x) == label).float()
            opt.zero_grad()
            rec.surrogate_loss(reward, estimator=estimator, baseline=baseline(reward)).backward()
            opt.step()
        label = torch.randint(0, 4, (2000,))
        with torch.no_grad():
            results[estimator] = (net(centers[label] + torch.randn(2000, 10) * 0.5) == label).float().mean().item()
    assert results["hnca"] > 0.8 and results["reinforce"] > 0.5, results


def test_moving_average_baseline_uses_earlier_batches_only():
    b = MovingAverageBaseline(0.5)
    assert b(torch.tensor([1.0, 1.0])).item() == 0.0
    assert b(torch.tensor([3.0])).item() == pytest.approx(0.5)
    assert b.value.item() == pytest.approx(1.75)
    restored = MovingAverageBaseline(0.5)
    restored.load_state_dict(b.state_dict())
    assert restored.value.item() == pytest.approx(1.75)
    with pytest.raises(ValueError, match="decay"):
        MovingAverageBaseline(1.0)


@pytest.mark.parametrize("signal", [torch.empty(0), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])],
                         ids=["empty", "nan", "inf"])
def test_a_baseline_keeps_its_state_on_an_empty_or_non_finite_signal(signal):
    b = MovingAverageBaseline(0.5)
    b(torch.tensor([2.0]))
    other = MovingAverageBaseline(0.5)
    if signal.numel():
        with pytest.raises(ValueError, match="non-finite values"):
            b(signal)
        with pytest.raises(ValueError, match="non-finite values"):  # several at once: none of them changes
            update_baselines([(other, torch.tensor([5.0])), (b, signal)])
    else:
        assert b(signal).item() == 1.0
    assert b.value.item() == 1.0 and other.value.item() == 0.0
    assert torch.isfinite(b.state_dict()["value"])
    assert b(torch.tensor([3.0])).item() == 1.0 and b.value.item() == 2.0  # later batches as usual


def test_baselines_without_a_process_group_and_their_copies():
    """One process: update_baselines is each baseline's own update; a process_group is a handle
    (shared by deepcopy, refused by pickle); a baseline pickled before `sync` existed still loads.
    The two-rank behaviour is in test_distributed.py."""
    signals = [torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 0.5, 4.0])]
    together, alone = [MovingAverageBaseline(0.5) for _ in signals], [MovingAverageBaseline(0.5) for _ in signals]
    update_baselines(list(zip(together, signals)))
    for b, s in zip(alone, signals):
        b.update(s)
    assert [b.value.item() for b in together] == [b.value.item() for b in alone] == [0.75, 0.25]
    group = object()  # stands for a torch.distributed ProcessGroup (not picklable either)
    held = MovingAverageBaseline(0.9, process_group=group)
    assert copy.deepcopy(held).process_group is group and held._sync_group() is None  # no process group here
    with pytest.raises(TypeError, match="save its state_dict"):
        pickle.dumps(held)
    old = MovingAverageBaseline(0.9, sync=False)
    assert "sync=False" in repr(old)
    del old.sync, old._group  # as unpickled from before the attributes existed
    assert pickle.loads(pickle.dumps(old)).sync is True


# ---- bad input -------------------------------------------------------------------------

def _net():
    return StochasticSequential(BernoulliLinear(4, 3), CategoricalLinear(3, 2))


def test_surrogate_of_an_empty_or_open_record():
    with record() as rec:
        with pytest.raises(RuntimeError, match="still open"):
            rec.surrogate_loss(torch.ones(2))
    with pytest.raises(RuntimeError, match="no stochastic layer call"):
        rec.surrogate_loss(torch.ones(2))


def test_surrogate_after_no_grad_forward():
    with torch.no_grad(), record() as rec:
        _net()(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="gradients disabled"):
        rec.surrogate_loss(torch.ones(2))


def _recorded(net, x):
    with record() as rec:
        net(x)
    return rec


@pytest.mark.parametrize(
    "reward, match",
    [
        (torch.ones(3), r"shape \[2\]"),
        (torch.ones(2, 1), r"shape \[2\]"),
        (torch.tensor([1.0, float("nan")]), "non-finite"),
        (torch.tensor([1.0, float("inf")]), "non-finite"),
        (torch.tensor([1, 0]), "floating"),
        ([1.0, 0.0], "tensor"),
    ],
    ids=["long", "2d", "nan", "inf", "int", "list"],
)
def test_bad_reward(reward, match):
    rec = _recorded(_net(), torch.randn(2, 4))
    with pytest.raises((ValueError, TypeError), match=match):
        rec.surrogate_loss(reward)


def test_bad_baseline_and_estimator():
    rec = _recorded(_net(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="baseline"):
        rec.surrogate_loss(torch.ones(2), baseline=torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        rec.surrogate_loss(torch.ones(2), baseline=float("nan"))
    with pytest.raises(ValueError, match="unknown estimator"):
        rec.surrogate_loss(torch.ones(2), estimator="hcna")


def test_empty_batch_is_an_error_not_a_nan():
    rec = _recorded(_net(), torch.randn(0, 4))
    with pytest.raises(ValueError, match="empty"):
        rec.surrogate_loss(torch.ones(0))


def test_bad_layer_input():
    layer = BernoulliLinear(4, 3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(2, 4, device="meta"))


@pytest.mark.parametrize(
    "modules, match",
    [
        ((nn.Linear(2, 2),), "at least one"),
        ((CategoricalLinear(2, 3), BernoulliLinear(3, 2)), "one_hot=True"),
        ((BernoulliLinear(2, 3), BernoulliLinear(4, 2)), "expects 4 inputs"),
        ((CategoricalLinear(2, 3, num_variables=2, one_hot=True), BernoulliLinear(3, 2)), "has 6 units"),
    ],
    ids=["no_stochastic", "categorical_indices_inside", "width_mismatch", "one_hot_width"],
)
def test_bad_architecture(modules, match):
    with pytest.raises(ValueError, match=match):
        StochasticSequential(*modules)


def test_functional_bad_inputs():
    from hnca_kernels import functional as Fn

    x = torch.randint(0, 2, (5, 4)).double()
    w = torch.randn(3, 4, dtype=torch.float64)
    l = torch.randn(5, 3, dtype=torch.float64)
    y = torch.ones(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="only the parent values"):
        Fn.counterfactual_log_ratio(x + 0.5, w, l, y)
    with pytest.raises(ValueError, match="only the parent values"):
        Fn.counterfactual_log_ratio(x, w, l, y, parent_values=(-1.0, 1.0))
    with pytest.raises(ValueError, match="weight has shape"):
        Fn.counterfactual_log_ratio(x, w.t(), l, y)
    with pytest.raises(ValueError, match="logits has shape"):
        Fn.counterfactual_log_ratio(x, w, l[:4], y)
    with pytest.raises(ValueError, match="y must be"):
        Fn.counterfactual_log_ratio(x, w, l, y[:, :2])
    with pytest.raises(TypeError, match="share a dtype"):
        Fn.counterfactual_log_ratio(x, w.float(), l, y)
    with pytest.raises(ValueError, match="meta"):
        Fn.counterfactual_log_ratio(x, w.to("meta"), l, y)
    with pytest.raises(ValueError, match="lo < hi"):
        Fn.counterfactual_log_ratio(x, w, l, y, parent_values=(1.0, 0.0))
    with pytest.raises(ValueError, match="class indices"):
        Fn.categorical_counterfactual_log_ratio(x, w, l, torch.full((5,), 3))
    with pytest.raises(TypeError, match="int64"):
        Fn.categorical_counterfactual_log_ratio(x, w, l, torch.zeros(5))


def test_autocast_bfloat16_matches_float32_on_the_same_samples():
    """Under CPU autocast the logits are bfloat16; the estimate stays close to float32's."""
    torch.manual_seed(0)
    net = StochasticSequential(
        nn.Linear(12, 16), nn.Tanh(), BernoulliLinear(16, 24, centered=True), BernoulliLinear(24, 8), CategoricalLinear(8, 3)
    )
    x = torch.randn(64, 12)
    with record() as rec:
        action = net(x)
    samples = [c.sample for c in rec.calls]
    reward = (action == 1).float()
    rec.surrogate_loss(reward, baseline=0.3).backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with record(replay=samples) as rec:
            net(x)
        assert rec.calls[0].logits.dtype == torch.bfloat16
        loss = rec.surrogate_loss(reward, baseline=0.3)
    loss.backward()
    for (name, p), e in zip(net.named_parameters(), expected):
        assert p.grad.dtype == torch.float32
        assert ((p.grad - e).norm() / e.norm()).item() < 0.05, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_bernoulli_units_own_components_are_its_log_probabilities_at_both_values(dtype):
    # to relative rounding at saturated logits too, where log pi(lo) = log sigmoid(-l) is tiny
    logits = torch.tensor([[-80.0, -20.0, -3.0, -1e-4, 0.0, 2e-4, 3.0, 20.0, 80.0]], dtype=dtype)
    at_hi, at_lo = BernoulliLinear(2, 9).to(dtype).own_values(logits)
    exact = logits.double()
    torch.testing.assert_close(at_hi.double(), torch.nn.functional.logsigmoid(exact), rtol=4 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(at_lo.double(), torch.nn.functional.logsigmoid(-exact), rtol=4 * torch.finfo(dtype).eps, atol=0)
