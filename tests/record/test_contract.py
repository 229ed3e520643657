"""The record's contract, tried the way users break it: every path a sample can take is exact (HNCA's
expectation equals the true gradient), a declared fallback (REINFORCE for that unit, exact too), or
an error from the package that names the problem. Exact enumeration in float64.

The fuzz test draws small random models (2-4 stochastic calls of Bernoulli 0/1, +-1 and categorical
units; chains, skips, shared layers, context) with random torch operations between the calls and in
the reward; the named tests below pin the cases that were silently biased once.
"""

from __future__ import annotations

import random
import traceback
from pathlib import Path

import pytest

from paths import ROOT  # noqa: E402
import torch
import torch.nn as nn

from hnca_kernels import BernoulliLinear, CategoricalLinear, backends, record

from enumeration import estimator_mean_batched, exact_gradient_batched

DT = torch.float64
PACKAGE = str(ROOT / "hnca_kernels")
MAX_CONFIGURATIONS = 64


# ---- operations between calls: sample [B, w] and context x [B, 3] -> a tensor a layer can take -----
def _linear_tanh(h, x, module):
    return torch.tanh(module(h))


FEED_OPS = {
    # value-preserving, followed or not: exact or a fallback, never biased
    "identity": lambda h, x: h,
    "detach": lambda h, x: h.detach(),
    "clone": lambda h, x: h.clone(),
    "contiguous": lambda h, x: h.contiguous(),
    "to_same": lambda h, x: h.to(DT),
    "float_double": lambda h, x: h.float().double(),
    "type_same": lambda h, x: h.type(DT),
    "int8_back": lambda h, x: h.to(torch.int8).to(DT),
    "real": lambda h, x: h.real,
    "T_T": lambda h, x: h.T.T,
    "mT_mT": lambda h, x: h.mT.mT,
    "H_H": lambda h, x: h.H.H,
    "getitem_all": lambda h, x: h[:, :],
    "view_as": lambda h, x: h.view_as(h),
    "neg_neg": lambda h, x: -(-h),
    "cat_x": lambda h, x: torch.cat([h, x], -1),
    "cat_self": lambda h, x: torch.cat([h, h], 1),
    "cat_detached": lambda h, x: torch.cat((x, h.detach()), dim=-1),
    # value-changing: the record must not take them for the sample
    "bool_back": lambda h, x: h.to(torch.bool).to(DT),
    "uint8_back": lambda h, x: h.to(torch.uint8).to(DT),
    "times_two": lambda h, x: h * 2,
    "plus_x": lambda h, x: h + x[:, : h.shape[1]],
    "tanh": lambda h, x: torch.tanh(h),
    "flip": lambda h, x: h.flip(-1),
    "where": lambda h, x: torch.where(h > 0, 1.0, 0.0).to(DT),
    "abs": lambda h, x: h.abs(),
    "clone_scaled_in_place": lambda h, x: h.clone().mul_(2.0),
    "detach_scaled_in_place": lambda h, x: h.detach().clone().add_(1.0),
    "linear_tanh": _linear_tanh,
    # changing the sample itself: an error
    "in_place_on_sample": lambda h, x: h.mul_(1.0),
    "data_zero": lambda h, x: (h.data.zero_(), h)[1],
    "data_fill": lambda h, x: (h.data.fill_(1.0), h)[1],
    "data_column": lambda h, x: (h.data.__setitem__((slice(None), 0), 1.0), h)[1],
    "data": lambda h, x: h.data,
}
# widths of the op's output for a sample of width w
_WIDTH = {"cat_x": lambda w: w + 3, "cat_detached": lambda w: w + 3, "cat_self": lambda w: 2 * w}

# reads of a sample inside the record, per example [B]
READ_OPS = {
    "sum": lambda h: h.sum(-1),
    "T": lambda h: (h.T * 0.5).sum(0),
    "mT": lambda h: h.mT.sum(-2),
    "H": lambda h: h.H.sum(0),
    "data": lambda h: h.data.sum(-1),
    "matmul_T": lambda h: (torch.linspace(-1, 1, h.shape[1], dtype=DT) @ h.T),
    "bool": lambda h: h.to(torch.bool).to(DT).sum(-1),
    "float": lambda h: h.float().double().sum(-1),
    "max": lambda h: h.max(-1).values,
    "detach": lambda h: h.detach().sum(-1),
}


class FuzzModel(nn.Module):
    """A random model: each call samples a layer on some earlier samples (through FEED_OPS) and x;
    the model returns its leaves' samples and the reward terms it reads inside the record."""

    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        self.modules_between = nn.ModuleList()
        self.plan, self.reads = [], []
        widths, kinds, configurations = [], [], 1
        for i in range(rng.randint(2, 4)):
            sources = []
            for j in rng.sample(range(i), k=min(i, rng.choice((0, 1, 1, 2)))):
                op = rng.choice(sorted(FEED_OPS))
                width = _WIDTH.get(op, lambda w: w)(widths[j])
                module = None
                if op == "linear_tanh":
                    module = len(self.modules_between)
                    self.modules_between.append(nn.Linear(widths[j], 2, dtype=DT))
                    width = 2
                sources.append((j, op, module, width))
            context = not sources or rng.random() < 0.5
            in_features = sum(s[3] for s in sources) + 3 * context
            kind = rng.choice(("b01", "bpm1", "cat"))
            reusable = [k for k, layer in enumerate(self.layers) if layer.in_features == in_features]
            new = not (reusable and rng.random() < 0.4)
            if not new:  # a shared layer
                index = rng.choice(reusable)
                layer = self.layers[index]
            else:
                if kind == "cat":
                    layer = CategoricalLinear(in_features, rng.choice((2, 3)), one_hot=True, dtype=DT)
                else:
                    layer = BernoulliLinear(in_features, rng.randint(1, 3), centered=kind == "bpm1", dtype=DT)
                index = len(self.layers)
                self.layers.append(layer)
            values = layer.num_classes if isinstance(layer, CategoricalLinear) else 2 ** layer.out_features
            if configurations * values > MAX_CONFIGURATIONS and i >= 2:
                if new:
                    del self.layers[-1]
                break
            configurations *= values
            self.plan.append((index, sources, context))
            widths.append(layer.out_features)
            kinds.append(kind)
            if rng.random() < 0.3:
                self.reads.append((i, rng.choice(sorted(READ_OPS)), rng.uniform(-1, 1)))
        used = {j for _, sources, _ in self.plan for j, *_ in sources}
        self.leaves = [i for i in range(len(self.plan)) if i not in used]
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 1.5)
        self.table = torch.rand(8, 4096, generator=g, dtype=DT) * 2 - 0.5
        self.ops = sorted({op for _, sources, _ in self.plan for _, op, _, _ in sources}
                          | {f"read:{op}" for _, op, _ in self.reads})

    def forward(self, x):
        samples, extra = [], torch.zeros(x.shape[0], dtype=DT)
        for i, (index, sources, context) in enumerate(self.plan):
            inputs = []
            for j, op, module, _ in sources:
                if op == "linear_tanh":
                    inputs.append(_linear_tanh(samples[j], x, self.modules_between[module]))
                else:
                    inputs.append(FEED_OPS[op](samples[j], x))
            if context:
                inputs.append(x)
            samples.append(self.layers[index](*inputs))
            for call, op, coefficient in self.reads:
                if call == i:
                    extra = extra + coefficient * READ_OPS[op](samples[i])
        return [samples[i] for i in self.leaves], extra

    def reward(self, rec, out, rows):
        leaves, extra = out
        index = torch.zeros(rows.shape[0], dtype=torch.long)
        for leaf in leaves:  # the joint configuration of the leaves, as a number
            bits = (leaf > 0).long()
            index = index * 2 ** bits.shape[1] + (bits * 2 ** torch.arange(bits.shape[1])).sum(1)
        return self.table[rows % 8, index % 4096] + extra


def _raised_by_the_package(exc: BaseException) -> bool:
    """The error comes from the package's own checks (a frame inside hnca_kernels raised it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, (RuntimeError, ValueError, TypeError)) and any(f.filename.startswith(PACKAGE)
                                                                          for f in frames[-1:])


def judge(model, params, x, reward, label="", min_gradient=1e-3) -> str:
    """'exact', 'fallback' or 'error' (the package raised); an AssertionError where an estimate is
    silently biased. Both estimators' exact expectations are compared with the true gradient."""
    means, fallback = {}, False
    try:
        with _quiet():
            for estimator in ("hnca", "reinforce"):
                means[estimator], rec = estimator_mean_batched(model, params, x, reward, estimator, 0.25)
                fallback |= bool(rec.fallbacks)
        truth = exact_gradient_batched(model, params, x, reward)
    except Exception as exc:  # noqa: BLE001 - sorted below
        if _raised_by_the_package(exc):
            return "error"
        raise AssertionError(f"{label}: an error that is not the package's: {exc!r}") from exc
    assert max(t.abs().max().item() for t in truth) >= min_gradient, f"{label}: a gradient too small to test"
    for estimator, mean in means.items():
        for k, (m, t) in enumerate(zip(mean, truth)):
            error = (m - t).abs().max().item()
            assert error < 1e-9, (f"{label}: {estimator} is biased by {error:.3g} on parameter {k} "
                                  f"(largest gradient {max(t.abs().max().item() for t in truth):.3g}); "
                                  f"fallbacks declared: {fallback}")
    return "fallback" if fallback else "exact"


def check_model(seed: int) -> str:
    """``judge`` of the random model of ``seed``."""
    model = FuzzModel(seed)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return judge(model, list(model.parameters()), x, model.reward, f"seed {seed} ({model.ops})", min_gradient=0.0)


class _quiet:
    """Silence the fallback warning (the test reads rec.fallbacks instead)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.filterwarnings("ignore", message="hnca: these units get REINFORCE")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def _fuzz(seeds):
    outcomes, failures = {"exact": 0, "fallback": 0, "error": 0}, []
    for seed in seeds:
        try:
            outcomes[check_model(seed)] += 1
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
    assert not failures, f"{len(failures)} of {len(seeds)} models silently wrong:\n" + "\n".join(failures[:20])
    # every outcome occurs: the fuzz reaches exact paths, fallbacks and errors
    assert all(outcomes.values()), outcomes
    print(f"{len(seeds)} random models: {outcomes}")
    return outcomes


def test_fuzz_random_models_are_exact_fall_back_or_raise():
    _fuzz(range(300))


@pytest.mark.slow
def test_fuzz_more_random_models():
    _fuzz(range(300, 3300))


# ---- the cases that were silently biased once, each exact, a declared fallback, or an error ----------
class Chain(nn.Module):
    """x -> h1 -> h2 -> out; ``feed`` is what h2 takes of h1, ``read`` what the reward reads of h1
    inside the record (None: nothing)."""

    def __init__(self, centered, feed=lambda h: h, read=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h1 = BernoulliLinear(3, 2, centered=centered, dtype=DT)
        self.h2 = BernoulliLinear(2, 2, centered=centered, dtype=DT)
        self.out = CategoricalLinear(2, 3, dtype=DT)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 1.5)
        self.feed, self.read = feed, read
        self.table = torch.rand(2, 3, dtype=DT) * 2 - 0.5

    def forward(self, x):
        h1 = self.h1(x)
        out = self.out(self.h2(self.feed(h1)))
        extra = self.read(h1) if self.read is not None else torch.zeros(x.shape[0], dtype=DT)
        return out, extra

    def reward(self, rec, out, rows):
        classes, extra = out
        return self.table[rows % 2, classes] + extra


def _judge_chain(centered, **kw):
    model = Chain(centered, **kw)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    return judge(model, list(model.parameters()), x, model.reward)


READS = {"T": lambda h: (torch.tensor([0.7, -1.1], dtype=DT) @ h.T), "mT": lambda h: h.mT.sum(0),
         "H": lambda h: 0.9 * h.H.sum(0), "matmul_T": lambda h: (h @ h.T).diagonal()}


@pytest.mark.parametrize("centered", [False, True], ids=["01", "pm1"])
@pytest.mark.parametrize("read", READS)
def test_a_reward_reading_a_hidden_sample_through_a_view_falls_back(read, centered):
    assert _judge_chain(centered, read=READS[read]) == "fallback"


@pytest.mark.parametrize("centered", [False, True], ids=["01", "pm1"])
@pytest.mark.parametrize("feed", ["T.T", "mT.mT", "H.H"])
def test_a_child_fed_a_view_of_a_view_falls_back(feed, centered):
    ops = {"T.T": lambda h: h.T.T, "mT.mT": lambda h: h.mT.mT, "H.H": lambda h: h.H.H}
    assert _judge_chain(centered, feed=ops[feed]) == "fallback"


@pytest.mark.parametrize("use", ["read", "feed", "zero_", "fill_", "column"])
def test_data_of_a_sample_inside_the_record_is_an_error(use):
    def write(h, how):
        {"zero_": lambda: h.data.zero_(), "fill_": lambda: h.data.fill_(1.0),
         "column": lambda: h.data.__setitem__((slice(None), 0), 1.0)}[how]()
        return h

    kw = {"read": {"read": lambda h: h.data.sum(-1)}, "feed": {"feed": lambda h: h.data}}.get(
        use, {"feed": lambda h: write(h, use)})
    model = Chain(False, **kw)
    with pytest.raises(RuntimeError, match=r"call 0 \(BernoulliLinear\) is read through .data"):
        with record():
            model(torch.randn(4, 3, dtype=DT))
    assert _judge_chain(False, **kw) == "error"


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_casts_follow_a_sample_only_where_they_keep_its_values(dtype):
    feed = lambda h: h.to(dtype).to(DT)  # noqa: E731
    assert _judge_chain(True, feed=feed) == "fallback"   # -1/+1 as bool or uint8: changed values
    assert _judge_chain(False, feed=feed) == "exact"     # 0/1 survive both: followed, HNCA exact
    assert _judge_chain(True, feed=lambda h: h.to(torch.int8).half().to(DT)) == "exact"


def test_a_weight_changed_in_place_after_the_forward_is_an_error():
    model = Chain(False)
    x = torch.randn(4, 3, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record() as first:
        model(x)
    with record() as second:
        model(x)
    first.surrogate_loss(torch.ones(4, dtype=DT)).backward()
    opt.step()  # between the two records' losses
    with pytest.raises(RuntimeError, match=r"weight of call 1 \(BernoulliLinear\) was changed in place"):
        second.surrogate_loss(torch.ones(4, dtype=DT))


@pytest.mark.parametrize("strict", [False, True])
def test_a_layer_compiled_alone_inside_an_eager_record_is_an_error(strict):
    torch._dynamo.reset()
    model = Chain(False)
    model.h2 = torch.compile(model.h2, backend="eager")
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(RuntimeError, match="runs under torch.compile inside an eager"):
        with record(strict=strict):
            model(x)
    model.h2(torch.ones(4, 2, dtype=DT))  # outside a record it runs (compiled) as before
    torch._dynamo.reset()


@pytest.mark.parametrize("uniform", [0.0, 1.0 - 2.0 ** -24, 2.0 ** -24, 0.5])
def test_categorical_samples_never_hit_a_class_of_probability_zero(uniform, monkeypatch):
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.0, 0.0, -inf], [0.0, -inf, -inf, -inf], [-inf, -inf, -inf, 3.0],
                           [-inf, -30.0, -inf, 30.0], [5.0, -inf, 0.0, -inf], [-inf, 88.0, 88.0, -inf]])
    layer = CategoricalLinear(2, 4)
    # the torch expression draws its uniforms with rand_like (the cpp backend's sampling op draws
    # the same ones from the generator, tests/layers/test_layers.py)
    monkeypatch.setattr(backends, "draws_in_cpp", lambda logits: False)
    monkeypatch.setattr(torch, "rand_like", lambda t, **kw: torch.full_like(t, uniform, **kw))
    classes = layer.sample(logits)
    monkeypatch.undo()
    assert torch.isfinite(torch.log_softmax(logits, -1).gather(1, classes[:, None])).all(), classes
    # and the whole estimate stays finite: masked actions in a policy
    policy = CategoricalLinear(2, 4)
    with torch.no_grad():
        policy.bias.copy_(torch.tensor([-inf, 0.0, 1.0, -inf]))
    monkeypatch.setattr(backends, "draws_in_cpp", lambda logits: False)
    monkeypatch.setattr(torch, "rand_like", lambda t, **kw: torch.full_like(t, uniform, **kw))
    with record() as rec:
        policy(torch.randn(3, 2))
    monkeypatch.undo()
    rec.surrogate_loss(torch.ones(3)).backward()
    assert torch.isfinite(policy.weight.grad).all()


def test_a_reward_that_requires_grad_warns_that_it_is_detached():
    model = Chain(False)
    with record() as rec:
        model(torch.randn(4, 3, dtype=DT))
    reward = torch.ones(4, dtype=DT, requires_grad=True)
    with pytest.warns(UserWarning, match="the reward requires grad"):
        rec.surrogate_loss(reward * 2)
