"""Compiled backends (cpp, and cuda where a GPU is present) against the reference.

Every case compares the backend with the float64 reference by ||ref - fast|| / ||ref|| on odd
shapes, both unit codings, float32 and float64, large weights (|W| up to 10, past the chunk
bound: the per-term log-domain path) and saturated logits (up to +-60).
"""

import warnings

import pytest
import torch

import hnca_kernels
from hnca_kernels import backends
from hnca_kernels import functional as Fn
from hnca_kernels.ops import reference

CODINGS = {"01": (0.0, 1.0), "pm1": (-1.0, 1.0)}
# (B, in, out): odd sizes around the vector width and the 4-vector tiles of parents
SHAPES = [(1, 1, 1), (7, 33, 130), (33, 257, 7), (130, 7, 257), (2, 130, 33)]
# (weight scale, logit range): Glorot-like, moderate, saturated with large weights
REGIMES = {"small": (0.1, 3.0), "saturated": (2.0, 60.0), "wide": (10.0, 60.0)}
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


def compiled_backends():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        pytest.param(name, device, id=f"{name}-{device}")
        for device in devices
        for name in ("cpp", "cuda")
        if backends.is_available(name, device)
    ]


BACKENDS = compiled_backends()


def rel_err(ref, out):
    return ((ref - out.to(ref)).norm() / ref.norm().clamp_min(1e-300)).item()


def messages_by_dtype(backend, device, x, weight, logits, y, lo, hi):
    """(dtype, the backend's Bernoulli message as float64 on the CPU) for float32 and float64 inputs."""
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (x, weight, logits, y)]
        yield dtype, Fn.counterfactual_log_ratio(*args, parent_values=(lo, hi), backend=backend).cpu().double()


def make_layer(shape, coding, regime, seed=0):
    B, n_in, n_out = shape
    w_scale, logit_range = REGIMES[regime]
    g = torch.Generator().manual_seed(seed)
    lo, hi = CODINGS[coding]
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi).double()
    weight = torch.randn(n_out, n_in, generator=g).double() * w_scale
    # logits anywhere in [-range, range] (a bias), not only the weights' spread
    logits = x @ weight.t() + (torch.rand(n_out, generator=g).double() * 2 - 1) * logit_range
    logits = logits.clamp(-logit_range, logit_range)
    y = torch.where(torch.rand(logits.shape, generator=g) < torch.sigmoid(logits), hi, lo).double()
    a = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    return x, weight, logits, y, a, (lo, hi)


def test_a_compiled_backend_runs_on_cpu():
    # if this fails, every comparison below was skipped: say why
    assert backends.is_available("cpp", "cpu"), backends.unavailable_reason("cpp", "cpu")


@pytest.mark.parametrize("message", ["bernoulli", "entropy"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_saturated_children_send_tiny_messages_exactly(backend, device, message):
    # every child saturated (in the direction it fired): each term is ~1e-18, and the q-form
    # (and, for the entropy, the flip to u = sigmoid(-|l|)) keeps it to relative rounding where a
    # running product or 1 - sigmoid(|l|) would round it to 0
    x, weight, _, _, _, pv = make_layer((5, 40, 20), "pm1", "small")
    logits = torch.full((5, 20), 45.0, dtype=torch.float64) * torch.where(torch.rand(5, 20) < 0.5, 1.0, -1.0)
    y = torch.where(logits > 0, 1.0, -1.0)
    if message == "bernoulli":
        ref = reference.bernoulli_log_ratio(x, weight, logits, y, *pv)
    else:
        ref = reference.entropy_delta(x, weight, logits, *pv)
    assert 0 < ref.abs().max() < 1e-15
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (x, weight, logits)]
        if message == "bernoulli":
            out = Fn.counterfactual_log_ratio(*args, y.to(device, dtype), parent_values=pv, backend=backend)
        else:
            out = Fn.counterfactual_entropy_delta(*args, parent_values=pv, backend=backend)
        assert rel_err(ref, out.cpu()) < TOL[dtype]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_wide_children_among_narrow_ones(backend, device, where, monkeypatch):
    # a wide child (w*max|W| past the chunk range) is summed per element, apart from the chunks;
    # 40 children: more than one staged round of the CUDA kernel
    monkeypatch.setenv("HNCA_POISON_OUTPUTS", "1")
    x, weight, logits, y, _, pv = make_layer((70, 67, 40), "pm1", "small")
    j = {"first": 0, "middle": 17, "last": 39}[where]
    weight[j] *= 100.0
    logits = x @ weight.t()
    y = torch.where(torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)).double() < torch.sigmoid(logits),
                    1.0, -1.0).double()
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (x, weight, logits)]
        out = Fn.counterfactual_log_ratio(*args, y.to(device, dtype), parent_values=pv, backend=backend)
        assert rel_err(reference.bernoulli_log_ratio(x, weight, logits, y, *pv), out.cpu()) < TOL[dtype]
        out = Fn.counterfactual_entropy_delta(*args, parent_values=pv, backend=backend)
        assert rel_err(reference.entropy_delta(x, weight, logits, *pv), out.cpu()) < TOL[dtype]


@pytest.mark.parametrize("coding", sorted(CODINGS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_confident_children_with_large_weights(backend, device, coding):
    # a trained model's children: weights past the chunk range (every child wide by its weights'
    # bound), but most examples confident about most children (v tiny), so that the bounds of
    # their factors let a pair of examples share long chunks; some children are confidently
    # wrong (v near 1: scored as the other outcome plus a linear part) and the batch is odd (a
    # last single row)
    lo, hi = CODINGS[coding]
    g = torch.Generator().manual_seed(3)
    B, n_in, n_out = 13, 70, 100
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi).double()
    weight = torch.randn(n_out, n_in, generator=g).double() * 3.0
    weight[5] *= 40.0  # exp(w*W) overflows float32: wide for every example, whatever its v
    sign = torch.where(torch.rand(B, n_out, generator=g) < 0.5, 1.0, -1.0).double()
    logits = sign * (25.0 + 10 * torch.rand(B, n_out, generator=g).double())  # |l| far past the weights' pull
    wrong = (torch.rand(B, n_out, generator=g) < 0.1) & (torch.arange(B) % 3 == 0)[:, None]
    y = torch.where((logits > 0) ^ wrong, hi, lo).double()
    logits = logits + x @ weight.t() * 0.1
    ref = reference.bernoulli_log_ratio(x, weight, logits, y, lo, hi)
    quiet = ~wrong.any(1)  # examples with no wrong child: small terms, each kept to rounding
    assert quiet.any() and (~quiet).any()
    for dtype, out in messages_by_dtype(backend, device, x, weight, logits, y, lo, hi):
        assert rel_err(ref, out) < TOL[dtype]
        elementwise = ((out - ref).abs() / ref.abs().clamp_min(1e-300))[quiet].max().item()
        assert elementwise < {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]


# 64 children, each moved by one parent (or class) with pull c and the logit l of an outcome
# o, and the log-ratio it makes:
# - wrong: confidently wrong (v near 1), e^3 more likely by the flip: about 192, a product of
#   e^-192 that underflows float32 unless the wrong children are scored by their other outcome
#   or the chunks end every child;
# - uncertain: v = 1/2, factors of about 1/2 (about 43): 32 of them in one chunk leave 1 + q
#   below float32's resolution, so chunks must end where the factors' shrink bounds say;
# - growing: v = 1e-3 and factors of about 164 (about -326): 32 of them overflow float32, so
#   chunks must end where the growth bounds say.
PRODUCTS = {"wrong": (3.0, -20.0, 1, lambda r: r.min() > 150), "uncertain": (3.9, 0.0, 1, lambda r: r.min() > 40),
            "growing": (12.0, -6.9, 0, lambda r: r.max() < -300)}


@pytest.mark.parametrize("children", sorted(PRODUCTS))
@pytest.mark.parametrize("coding", sorted(CODINGS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_chunks_keep_products_in_range(backend, device, coding, children):
    lo, hi = CODINGS[coding]
    pull, logit, outcome, expected = PRODUCTS[children]
    B, n_in, n_out = 5, 8, 64
    x = torch.full((B, n_in), lo, dtype=torch.float64)
    weight = torch.full((n_out, n_in), 0.1, dtype=torch.float64)
    weight[:, 0] = pull / (hi - lo)
    logits = torch.full((B, n_out), logit, dtype=torch.float64)
    y = torch.full((B, n_out), hi if outcome else lo, dtype=torch.float64)
    ref = reference.bernoulli_log_ratio(x, weight, logits, y, lo, hi)
    assert expected(ref[:, 0])
    for dtype, out in messages_by_dtype(backend, device, x, weight, logits, y, lo, hi):
        assert ((out - ref).abs() / ref.abs()).max() < {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


@pytest.mark.parametrize("coding", sorted(CODINGS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pulls_up_to_float32_overflow(backend, device, coding):
    # the kernels' tables of expm1(+-c) at every pull c from 1e-6 to 85 (e^85 is near float32's
    # largest): child j is pulled by parent 0 alone, with v about e^-|c| / 2 (a confident child,
    # right about its outcome), so its factor stays near 1.5 and its chunk narrow; both signs of c
    # and both parent values, so every entry of both tables is read
    lo, hi = CODINGS[coding]
    g = torch.Generator().manual_seed(5)
    B, n_in, n_out = 4, 8, 64
    pull = torch.cat([torch.logspace(-6, 0, 16), torch.linspace(1.2, 85, 48)]).double()
    sign = torch.where(torch.rand(n_out, generator=g) < 0.5, 1.0, -1.0).double()
    x = torch.full((B, n_in), lo, dtype=torch.float64)
    x[1::2, 0] = hi
    weight = torch.full((n_out, n_in), 0.01, dtype=torch.float64)
    weight[:, 0] = sign * pull / (hi - lo)
    outcome = torch.rand(B, n_out, generator=g) < 0.5
    logits = torch.where(outcome, 1.0, -1.0).double() * (pull + 0.7)
    y = torch.where(outcome, hi, lo).double()
    ref = reference.bernoulli_log_ratio(x, weight, logits, y, lo, hi)
    assert ref[:, 0].abs().min() > 5
    for dtype, out in messages_by_dtype(backend, device, x, weight, logits, y, lo, hi):
        assert ((out - ref).abs()[:, 0] / ref[:, 0].abs()).max() < {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_chunks(backend, device):
    # 300 children each near the chunk range: a chunk closes every child or two
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(9, 70, generator=g) < 0.5, -1.0, 1.0).double()
    weight = torch.full((300, 70), 1.9, dtype=torch.float64) * torch.where(torch.rand(300, 70, generator=g) < 0.8, 1.0, -1.0)
    logits = torch.where(x @ weight.t() > 0, -1.0, 1.0).double() * 0.5
    y = torch.where(logits > 0, 1.0, -1.0).double()
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (x, weight, logits)]
        out = Fn.counterfactual_log_ratio(*args, y.to(device, dtype), parent_values=(-1.0, 1.0), backend=backend)
        assert rel_err(reference.bernoulli_log_ratio(x, weight, logits, y, -1.0, 1.0), out.cpu()) < TOL[dtype]
        out = Fn.counterfactual_entropy_delta(*args, parent_values=(-1.0, 1.0), backend=backend)
        assert rel_err(reference.entropy_delta(x, weight, logits, -1.0, 1.0), out.cpu()) < TOL[dtype]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_reaches_the_messages_it_touches(backend, device):
    # a NaN logit (example 1, child 70) and a NaN weight (child 200, parent 3): NaN where the
    # reference has it (example 1's every parent; parent 3 of every example), the reference's
    # values elsewhere; the products carry NaN across chunk ends (whose exponents stay finite)
    g = torch.Generator().manual_seed(6)
    x = torch.where(torch.rand(5, 40, generator=g) < 0.5, -1.0, 1.0).double()
    weight = torch.randn(300, 40, generator=g).double() * 0.2
    logits = x @ weight.t()
    y = torch.where(torch.rand(logits.shape, generator=g) < torch.sigmoid(logits), 1.0, -1.0).double()
    logits[1, 70] = float("nan")
    weight[200, 3] = float("nan")
    ref = reference.bernoulli_log_ratio(x, weight, logits, y, -1.0, 1.0)
    assert ref.isnan()[1].all() and ref.isnan()[:, 3].all() and not ref.isnan()[0, 0]
    for dtype, out in messages_by_dtype(backend, device, x, weight, logits, y, -1.0, 1.0):
        assert torch.equal(out.isnan(), ref.isnan())
        assert rel_err(ref.nan_to_num(), out.nan_to_num()) < TOL[dtype]


@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "one-wide"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_products_carried_across_chunk_ends(backend, device, wide):
    # weights so small that one chunk could hold all 300 children: the chunks end at the kernels'
    # tiles of children (64 or 32) and the product goes on from one chunk to the next, past a
    # wide child (150) summed in the log domain; the batch is odd (a last single row)
    g = torch.Generator().manual_seed(4)
    x = torch.where(torch.rand(9, 70, generator=g) < 0.5, -1.0, 1.0).double()
    weight = torch.randn(300, 70, generator=g).double() * 2e-3
    if wide:
        weight[150] *= 1e4
    logits = x @ weight.t() + torch.randn(300, generator=g).double()
    y = torch.where(torch.rand(logits.shape, generator=g) < torch.sigmoid(logits), 1.0, -1.0).double()
    ref = reference.bernoulli_log_ratio(x, weight, logits, y, -1.0, 1.0)
    for dtype, out in messages_by_dtype(backend, device, x, weight, logits, y, -1.0, 1.0):
        assert rel_err(ref, out) < TOL[dtype]
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (x, weight, logits)]
        out = Fn.counterfactual_entropy_delta(*args, parent_values=(-1.0, 1.0), backend=backend)
        assert rel_err(reference.entropy_delta(x, weight, logits, -1.0, 1.0), out.cpu()) < TOL[dtype]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_categorical_both_forms(backend, device):
    # columns with a small spread (the two-GEMM form on a GPU) and a wide one (logsumexp), classes
    # in more than one staged round
    x, weight, logits, _, _, pv = make_layer((70, 130, 37), "pm1", "small")
    weight[:, 64:] *= 300.0
    logits = (x @ weight.t()).clamp(-60, 60)
    a = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(2)).squeeze(1)
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device=device, dtype=dtype) for t in (x, weight, logits)]
        out = Fn.categorical_counterfactual_log_ratio(*args, a.to(device), parent_values=pv, backend=backend)
        assert rel_err(reference.categorical_log_ratio(x, weight, logits, a, *pv), out.cpu()) < TOL[dtype]


def _softmax_child_oracle(x, weight, logits, a, lo, hi):
    """The softmax child's message for one variable in float64, each logsumexp relative to the
    sampled class and taken as log1p of the other classes' terms: exact to relative rounding where
    the sampled class dominates (where the reference's log_softmax rounds to 0)."""
    z = logits - logits.gather(1, a[:, None])                                  # [B, K], z_a = 0
    is_hi = x == hi
    delta = torch.where(is_hi, lo - hi, hi - lo)                                # the flip's change
    cf = z[:, None, :] + delta[..., None] * (weight.t()[None] - weight[a][:, :, None])  # [B, in, K]
    others = ~torch.nn.functional.one_hot(a, logits.shape[1]).bool()
    ratio = torch.log1p((z.exp() * others).sum(-1))[:, None] - torch.log1p((cf.exp() * others[:, None]).sum(-1))
    return torch.where(is_hi, -ratio, ratio)


@pytest.mark.skipif(not backends.is_available("cpp", "cpu"), reason="the cpp backend is not available")
@pytest.mark.parametrize("coding", ["01", "pm1"])
def test_softmax_children_of_dominant_classes_send_tiny_messages_exactly(coding):
    # the sampled class ahead of the others by 45: terms ~1e-18 that the reference's log_softmax
    # rounds away, kept to relative rounding by the C++ kernel's log1p on the tabled columns
    # (weights of a small spread); the wide columns (the last vector's) take the online pass
    x, weight, _, _, _, (lo, hi) = make_layer((50, 37, 6), coding, "saturated")
    weight[:, 32:] *= 8
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 3, (50,), generator=g)
    logits = (torch.rand(50, 6, generator=g, dtype=torch.float64) * 2 - 1) * 3
    logits.scatter_(1, a[:, None], 45.0)
    ref = _softmax_child_oracle(x, weight, logits, a, lo, hi)
    assert 0 < ref[:, :32].abs().max() < 1e-9
    for dtype in (torch.float32, torch.float64):
        out = torch.ops.hnca.categorical_log_ratio(x.to(dtype), weight.to(dtype), logits.to(dtype), a, lo, hi)
        assert rel_err(ref[:, :32], out[:, :32]) < TOL[dtype]
        assert rel_err(ref[:, 32:], out[:, 32:]) < TOL[dtype]
    # the others' rows one apart from a's around a common 40 / w: e^(w*W) alone is e^+-40, and its
    # product with an r of e^-60 would fall below float32's normal range; every message (no
    # cancellation: the others move together) stays exact to relative rounding, entry by entry
    weight = torch.full((6, 37), 40 / (hi - lo), dtype=torch.float64)
    weight[1:] += torch.where(torch.rand(37, generator=g) < 0.5, 0.5, -0.5).double()
    a = torch.zeros(50, dtype=torch.long)
    logits[:, 0] = 60.0
    ref = _softmax_child_oracle(x, weight, logits, a, lo, hi)
    for dtype in (torch.float32, torch.float64):
        out = torch.ops.hnca.categorical_log_ratio(x.to(dtype), weight.to(dtype), logits.to(dtype), a, lo, hi)
        assert ((out.double() - ref).abs() / ref.abs()).max() < TOL[dtype] * 10


@pytest.mark.skipif(not backends.is_available("cpp", "cpu"), reason="the cpp backend is not available")
def test_softmax_child_columns_too_wide_for_the_tables_take_the_online_pass():
    # a column whose classes span 78 (0/1 parents, w = 1): the top class (70 ahead of the sampled
    # one) falls by 39 where the parent flips on and a class 81 below it rises by 39, to within e^-3 of
    # it. Its r = e^-81 is flushed to 0 on a tabled column, so the kernel must take the online pass
    # there; the other columns stay tabled.
    B, n_in = 4, 9
    x = torch.zeros(B, n_in, dtype=torch.float64)
    weight = torch.randn(3, n_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    weight[:, 2] = torch.tensor([0.0, -39.0, 39.0])  # the sampled class 0, the top 1, the riser 2
    logits = torch.tensor([0.0, 70.0, -11.0], dtype=torch.float64).expand(B, 3).clone()
    a = torch.zeros(B, dtype=torch.long)
    ref = reference.categorical_log_ratio(x, weight, logits, a, 0.0, 1.0)
    assert (ref[:, 2] - (70 - torch.tensor(31.0, dtype=torch.float64).logaddexp(torch.tensor(28.0, dtype=torch.float64)))).abs().max() < 1e-9
    for dtype in (torch.float32, torch.float64):
        out = torch.ops.hnca.categorical_log_ratio(x.to(dtype), weight.to(dtype), logits.to(dtype), a, 0.0, 1.0)
        assert rel_err(ref, out) < TOL[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_messages_do_not_synchronize():
    # torch raises on any synchronising call (.item(), bool(tensor), a host copy) in this mode
    if not backends.is_available("cuda", "cuda"):
        pytest.skip(backends.unavailable_reason("cuda", "cuda"))
    x, weight, logits, y, a, pv = make_layer((33, 70, 20), "pm1", "small")
    x, weight, logits, y, a = (t.to("cuda") for t in (x.float(), weight.float(), logits.float(), y.float(), a))
    Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend="cuda")  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend="cuda")
        Fn.categorical_counterfactual_log_ratio(x, weight, logits, a, parent_values=pv, backend="cuda")
        Fn.counterfactual_entropy_delta(x, weight, logits, parent_values=pv, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_shapes(backend, device):
    for B, n_in, n_out in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        x = torch.zeros(B, n_in, device=device)
        weight = torch.zeros(n_out, n_in, device=device)
        logits = torch.zeros(B, n_out, device=device)
        out = Fn.counterfactual_log_ratio(x, weight, logits, logits, backend=backend)
        assert out.shape == (B, n_in) and (out == 0).all()
        assert Fn.counterfactual_entropy_delta(x, weight, logits, backend=backend).shape == (B, n_in)


    for B, n_in, n_out in [(0, 5, 3), (4, 0, 3), (4, 5, 0)]:
        x, weight, logits = torch.zeros(B, n_in), torch.zeros(n_out, n_in), torch.zeros(B, n_out)
        ratio, entropy = Fn.counterfactual_log_ratio_and_entropy_delta(x, weight, logits, logits, backend="cpp")
        assert ratio.shape == entropy.shape == (B, n_in) and (ratio == 0).all() and (entropy == 0).all()


# children for the fused messages (the log-ratio from the entropy's products): Glorot weights with
# every kind of child (uncertain, saturated either way, confidently wrong: the linear part large),
# and weights past the chunk bounds (there the log-ratio is bernoulli_log_ratio's own)
FUSED = {"glorot": (0.1, False), "saturated": (0.02, False), "wide": (3.0, True)}


@pytest.mark.skipif(not backends.is_available("cpp", "cpu"), reason="the cpp backend is not available")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("coding", sorted(CODINGS))
@pytest.mark.parametrize("regime", sorted(FUSED))
def test_log_ratio_and_entropy_delta_in_one_pass(regime, coding, dtype):
    scale, cut_short = FUSED[regime]
    lo, hi = CODINGS[coding]
    g = torch.Generator().manual_seed(5)
    B, n_in, n_out = 11, 70, 200
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi).double()
    weight = (torch.rand(n_out, n_in, generator=g).double() * 2 - 1) * scale
    saturated = 60 if regime != "saturated" else n_out
    logits = (torch.rand(B, n_out, generator=g).double() * 2 - 1) * 3.0
    logits[:, :saturated] = 45.0 * torch.where(torch.rand(B, saturated, generator=g) < 0.5, 1.0, -1.0).double()
    logits[:, 7] = 0.0  # sign(0) is the entropy's -1: a fired child there has the other outcome
    y = torch.where(torch.rand(B, n_out, generator=g).double() < torch.sigmoid(logits), hi, lo)
    y[:3, 40:60] = torch.where(logits[:3, 40:60] > 0, lo, hi)  # confidently wrong
    args = [t.to(dtype) for t in (x, weight, logits, y)]
    ratio, entropy = Fn.counterfactual_log_ratio_and_entropy_delta(*args, parent_values=(lo, hi), backend="cpp")
    # the entropy is the entropy delta's own; the log-ratio meets bernoulli_log_ratio's accuracy
    assert torch.equal(entropy, Fn.counterfactual_entropy_delta(*args[:3], parent_values=(lo, hi), backend="cpp"))
    alone = Fn.counterfactual_log_ratio(*args, parent_values=(lo, hi), backend="cpp")
    assert torch.equal(ratio, alone) == cut_short or dtype == torch.float64
    ref = reference.bernoulli_log_ratio(x, weight, logits, y, lo, hi)
    assert rel_err(ref, ratio) < TOL[dtype]
    if regime == "saturated":  # examples without a wrong child: tiny terms, each message to their rounding
        quiet = ((ref - ratio.double()).abs() / ref.abs().clamp_min(1e-300))[3:].max().item()
        assert quiet < {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_parents_and_classes_raise_value_error(backend):
    # cpp checks inside its ops (functional skips its own check for it); reference in Python
    x, weight, logits, y, a, pv = make_layer((6, 19, 5), "pm1", "small")
    x[3, 7] = 0.5
    with pytest.raises(ValueError, match="only the parent values"):
        Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend=backend)
    with pytest.raises(ValueError, match="only the parent values"):
        Fn.categorical_counterfactual_log_ratio(x, weight, logits, a, parent_values=pv, backend=backend)
    with pytest.raises(ValueError, match="only the parent values"):
        Fn.counterfactual_entropy_delta(x, weight, logits, parent_values=pv, backend=backend)
    x[3, 7] = pv[1]
    with pytest.raises(ValueError, match="class indices"):
        Fn.categorical_counterfactual_log_ratio(x, weight, logits, torch.full((6,), 5), parent_values=pv,
                                                backend=backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_logit_credit_matches_functional(dtype):
    # awkward length (a vector tail), logits and messages from tiny to saturated, both signs, 0
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-6, 1e-2, 1.0, 10.0, 60.0, 300.0]).double().repeat_interleave(20)
    logits = torch.randn(120, 7, generator=g).double() * scale[:, None]
    d = torch.randn(120, 7, generator=g).double() * scale.flip(0)[:, None]
    d[::9] = 0.0
    out = torch.ops.hnca.logit_credit(logits.to(dtype), d.to(dtype))
    ref = Fn.hnca_logit_credit(logits.to(dtype), d.to(dtype))  # what the fused op replaces
    assert out.dtype == dtype and out.shape == ref.shape
    # relative to rounding, except below the smallest normal number (products of tiny sigmoids)
    torch.testing.assert_close(out, ref, rtol=TOL[dtype] * 10, atol=torch.finfo(dtype).tiny)
    assert (out[::9] == 0).all()

def test_cuda_backend_says_why_it_is_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "no CUDA device" in backends.unavailable_reason("cuda", "cpu")
    with pytest.raises(hnca_kernels.BackendUnavailableError, match="no CUDA device"):
        Fn.counterfactual_entropy_delta(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 4), backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(7, 3, 4, 13), (50, 20, 10, 784), (1, 1, 1, 1), (9, 2, 17, 40), (3, 2, 40, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("regime", ["small", "wide", "saturated", "confident"])
def test_categorical_parent_message_matches_reference(shape, regime, dtype, monkeypatch):
    """Every variable's message in one call (Bernoulli children) against the reference, relative to
    its largest entry; outputs poisoned with NaN first."""
    monkeypatch.setenv("HNCA_POISON_OUTPUTS", "1")
    assert backends.is_available("cpp", "cpu")
    B, V, K, out = shape
    g = torch.Generator().manual_seed(B * 131 + K)
    # confident: a trained model's children, weights past the chunk bound but most children
    # predicted far beyond their pull (v tiny), a few confidently wrong
    w_scale, l_scale = {"small": (0.3, 3.0), "wide": (8.0, 3.0), "saturated": (1.0, 60.0), "confident": (3.0, 30.0)}[regime]
    a = torch.randint(0, K, (B, V), generator=g)
    weight = torch.randn(out, V * K, generator=g, dtype=torch.float64) * w_scale
    logits = torch.randn(B, out, generator=g, dtype=torch.float64) * l_scale
    y = (torch.rand(B, out, generator=g) < 0.5).double()
    if regime == "confident":
        logits = torch.where(torch.rand(B, out, generator=g) < 0.5, 1.0, -1.0).double() * (25 + 10 * torch.rand(B, out, generator=g).double())
        y = ((logits > 0) ^ (torch.rand(B, out, generator=g) < 0.03)).double()
    ref = reference.categorical_parent_log_ratio(a, weight, logits, y)
    got = torch.ops.hnca.categorical_parent_log_ratio(a, weight.to(dtype), logits.to(dtype), y.to(dtype))
    assert got.dtype == dtype and got.shape == (B, V, K) and torch.isfinite(got).all()
    scale = ref.abs().max().clamp_min(1e-3)  # relative, with a floor (one class: the message is 0)
    assert ((got.double() - ref).abs().max() / scale) < TOL[dtype] * 20
    assert (got.gather(2, a.unsqueeze(2)) == 0).all()  # the actual class's own entry


@pytest.mark.parametrize("children", sorted(PRODUCTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_categorical_parent_chunks_keep_products_in_range(dtype, children):
    # the children of test_chunks_keep_products_in_range, moved by every class but the actual one
    pull, logit, outcome, expected = PRODUCTS[children]
    B, V, K, out = 5, 2, 3, 64
    a = torch.zeros(B, V, dtype=torch.long)
    weight = torch.full((out, V * K), pull, dtype=torch.float64)
    weight[:, ::K] = 0.0  # class 0 (the actual one) of each variable
    logits = torch.full((B, out), logit, dtype=torch.float64)
    y = torch.full((B, out), float(outcome), dtype=torch.float64)
    ref = reference.categorical_parent_log_ratio(a, weight, logits, y)
    assert expected(ref[:, :, 1:])
    got = torch.ops.hnca.categorical_parent_log_ratio(a, weight.to(dtype), logits.to(dtype), y.to(dtype)).double()
    assert ((got - ref).abs()[:, :, 1:] / ref[:, :, 1:].abs()).max() < {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(7, 13, 3, 4), (50, 200, 20, 10), (5, 9, 1, 3), (6, 33, 2, 17)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("coding", ["01", "pm1"])
def test_softmax_variables_message_and_entropy_match_reference(shape, coding, dtype):
    """V softmax children of binary parents in one call: the log-ratio (C++ kernel) relative to its
    largest entry, the entropy delta (matrix products, ops/matmul.py) with an absolute floor."""
    B, n_in, V, K = shape
    g = torch.Generator().manual_seed(n_in)
    lo, hi = (0.0, 1.0) if coding == "01" else (-1.0, 1.0)
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, hi, lo).double()
    weight = torch.randn(V * K, n_in, generator=g, dtype=torch.float64)
    logits = torch.randn(B, V, K, generator=g, dtype=torch.float64) * 4
    a = torch.randint(0, K, (B, V), generator=g)
    cast = [t.to(dtype) for t in (x, weight, logits)]
    ref = reference.categorical_log_ratio(x, weight, logits, a, lo, hi)
    got = Fn.categorical_counterfactual_log_ratio(*cast, a, parent_values=(lo, hi), backend="cpp")
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < TOL[dtype] * 20
    ref = reference.categorical_entropy_delta(x, weight, logits, lo, hi)
    got = Fn.categorical_entropy_delta(*cast, parent_values=(lo, hi), backend="cpp")
    assert got.dtype == dtype and ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)) < TOL[dtype] * 20


@pytest.mark.skipif(not backends.is_available("cpp", "cpu"), reason="the cpp backend is not available")
def test_fma_peak_checks_its_duration():
    from hnca_kernels.ops import cpp

    for seconds in (0.0, -1.0, 11.0, float("nan")):
        with pytest.raises(ValueError, match="seconds must be in"):
            cpp.fma_peak(seconds)
    assert 1e8 < cpp.fma_peak(0.01) < 1e13  # lanes per second: a core's, whatever its vectors
