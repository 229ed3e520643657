"""The functional API against brute-force recomputation, and the credit at its extremes."""

from decimal import Decimal, getcontext

import pytest
import torch

import brute
from hnca_kernels import functional as Fn

CODINGS = {"01": (0.0, 1.0), "pm1": (-1.0, 1.0)}
SHAPES = [(1, 1, 1), (7, 5, 3), (33, 17, 9), (4, 130, 2)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def rel_err(ref, out):
    return ((ref - out.to(ref)).norm() / ref.norm().clamp_min(1e-30)).item()


def make_layer(B, n_in, n_out, coding, dtype, w_scale=2.0, logit_range=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = CODINGS[coding]
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi).double()
    weight = torch.randn(n_out, n_in, generator=g).double() * w_scale
    bias = (torch.rand(n_out, generator=g).double() * 2 - 1) * logit_range
    logits = x @ weight.t() + bias
    return x, weight, bias, logits, (lo, hi), g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bernoulli_log_ratio_matches_brute_force(shape, coding, dtype):
    x, weight, bias, logits, pv, g = make_layer(*shape, coding, dtype)
    y = torch.where(torch.rand(logits.shape, generator=g) < torch.sigmoid(logits), pv[1], pv[0]).double()
    ref = brute.bernoulli_log_ratio(x, weight, bias, y, *pv)
    out = Fn.counterfactual_log_ratio(x.to(dtype), weight.to(dtype), logits.to(dtype), y.to(dtype), parent_values=pv)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(ref, out) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_categorical_log_ratio_matches_brute_force(shape, coding, dtype):
    x, weight, bias, logits, pv, g = make_layer(*shape, coding, dtype)
    a = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
    ref = brute.categorical_log_ratio(x, weight, bias, a, *pv)
    out = Fn.categorical_counterfactual_log_ratio(x.to(dtype), weight.to(dtype), logits.to(dtype), a, parent_values=pv)
    assert rel_err(ref, out) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_entropy_delta_matches_brute_force(shape, coding, dtype):
    x, weight, bias, logits, pv, _ = make_layer(*shape, coding, dtype, logit_range=5.0)
    ref = brute.entropy_delta(x, weight, bias, *pv)
    out = Fn.counterfactual_entropy_delta(x.to(dtype), weight.to(dtype), logits.to(dtype), parent_values=pv)
    assert rel_err(ref, out) < TOL[dtype] * 10


def _exact_credit(p, d):
    getcontext().prec = 60
    p, d = Decimal(p), Decimal(d)
    e = d.exp()
    return float((e - 1) / (p * e + 1 - p))


def _exact_logit_credit(l, d):
    getcontext().prec = 60
    l, d = Decimal(l), Decimal(d)
    sig = lambda z: 1 / (1 + (-z).exp())
    return float(sig(l + d) - sig(l))


EXTREME_D = [-1e4, -700.0, -88.0, -20.0, -1.0, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 1.0, 20.0, 88.0, 700.0, 1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hnca_credit_accurate_at_extremes(dtype):
    ps = torch.tensor([1e-6, 1e-3, 0.2, 0.5, 0.9, 1 - 1e-3, 1 - 1e-6], dtype=dtype)
    ds = torch.tensor(EXTREME_D, dtype=dtype)
    P, D = torch.meshgrid(ps, ds, indexing="ij")
    out = Fn.hnca_credit(P, D)
    assert torch.isfinite(out).all()
    ref = torch.tensor([[_exact_credit(p.item(), d.item()) for d in row_d] for p, row_d in zip(P[:, 0], D)], dtype=torch.float64)
    rel = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-300))[ref != 0]
    assert rel.max() < (1e-5 if dtype == torch.float32 else 1e-12)
    assert (out[D == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hnca_logit_credit_is_bounded_and_accurate(dtype):
    ls = torch.tensor([-100.0, -30.0, -5.0, 0.0, 0.3, 5.0, 30.0, 100.0], dtype=dtype)
    ds = torch.tensor(EXTREME_D, dtype=dtype)
    L, D = torch.meshgrid(ls, ds, indexing="ij")
    out = Fn.hnca_logit_credit(L, D)
    assert torch.isfinite(out).all() and (out.abs() <= 1).all()
    ref = torch.tensor([[_exact_logit_credit(l.item(), d.item()) for d in row] for l, row in zip(L[:, 0], D)], dtype=torch.float64)
    err = (out.double() - ref).abs()
    assert (err <= 1e-5 * ref.abs() + 1e-37).all()
    # p(1-p)(rho1-rho0), where it can be formed without overflow
    p = torch.sigmoid(L.double())
    safe = (D.abs() < 30) & (L.abs() < 30)
    direct = p * (1 - p) * Fn.hnca_credit(p, D.double())
    torch.testing.assert_close(out.double()[safe], direct[safe], rtol=1e-5, atol=1e-12)


def test_backend_argument_and_context():
    import hnca_kernels

    x, weight, _, logits, pv, g = make_layer(5, 4, 3, "01", torch.float64)
    y = (torch.rand(logits.shape, generator=g) < 0.5).double()
    ref = Fn.counterfactual_log_ratio(x, weight, logits, y, backend="reference")
    with hnca_kernels.use_backend("reference"):
        torch.testing.assert_close(Fn.counterfactual_log_ratio(x, weight, logits, y), ref)
    with pytest.raises(ValueError, match="unknown backend"):
        with hnca_kernels.use_backend("fortran"):
            pass
    with pytest.raises(hnca_kernels.BackendUnavailableError, match="not available on cpu"):
        Fn.counterfactual_log_ratio(x, weight, logits, y, backend="cuda")


def _exact_entropy(l):
    getcontext().prec = 60
    l = Decimal(l)
    p = 1 / (1 + (-l).exp())
    q = 1 - p
    return float(-(p * p.ln() + q * q.ln()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bernoulli_entropy_and_its_gradient_are_accurate_for_any_logit(dtype):
    # saturated units have a tiny entropy: relative accuracy there, where a difference of terms
    # of the size of the logit would cancel (down to the dtype's smallest normal number)
    ls = torch.tensor([-100.0, -30.0, -5.0, -1e-3, 0.0, 0.3, 5.0, 30.0, 100.0], dtype=dtype, requires_grad=True)
    h = Fn.bernoulli_entropy(ls)
    ref = torch.tensor([_exact_entropy(l) for l in ls.tolist()], dtype=torch.float64)
    rtol = 1e-5 if dtype == torch.float32 else 1e-13
    assert ((h.double() - ref).abs() <= rtol * ref + torch.finfo(dtype).tiny).all()
    h.sum().backward()
    exact_grad = -ls.detach().double() * torch.sigmoid(ls.detach().double()) * torch.sigmoid(-ls.detach().double())
    # autograd's terms of the gradient are of order 1/2 and cancel near l = 0: to the dtype's epsilon
    torch.testing.assert_close(ls.grad.double(), exact_grad, rtol=rtol, atol=torch.finfo(dtype).eps)
