"""One numerical contract, every backend (hnca_kernels.ops.contract): the same cases, tolerances and
poisoned outputs for reference, cpp, triton (under TRITON_INTERPRET=1 here: the interpreter tier)
and cuda (on a GPU), each against the float64 reference on the same inputs; and ``checks()``
honoured by each of them."""

import pytest
import torch

import hnca_kernels
from hnca_kernels import backends
from hnca_kernels import functional as Fn
from hnca_kernels.ops import contract

# (B, in, out): odd sizes around the vector widths and tiles; one empty-ish and one of one element
SHAPES = [(1, 1, 1), (7, 33, 130), (33, 70, 7), (2, 130, 33), (33, 257, 7), (130, 7, 257)]
# (weight scale, logit range): Glorot-like, saturated children, large weights (|W| past the chunk bounds)
REGIMES = {"small": (0.1, 3.0), "saturated": (2.0, 60.0), "wide": (10.0, 60.0)}
CODINGS = {"01": (0.0, 1.0), "pm1": (-1.0, 1.0)}
DTYPES = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}


def _backends():
    out = []
    for name in backends.BACKENDS:
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            if not backends.is_available(name, device):
                continue
            marks = [pytest.mark.interpreter] if name == "triton" and device == "cpu" else []
            out.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return out


BACKENDS = _backends()


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Outputs start as NaN (torch.empty in Python, HNCA_POISON_OUTPUTS in the C++ kernels), so a
    kernel that leaves part of its output unwritten fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setenv("HNCA_POISON_OUTPUTS", "1")


def _case(op, shape, coding, regime, seed=0):
    """(the op's arguments in float64, keyword arguments): binary parents, weights and logits of the regime."""
    B, n_in, n_out = shape
    w_scale, logit_range = REGIMES[regime]
    g = torch.Generator().manual_seed(seed + B * 7 + n_in)
    lo, hi = CODINGS[coding]
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi).double()
    weight = (torch.randn(n_out, n_in, generator=g).double() * w_scale).clamp(-10, 10)
    logits = ((torch.rand(B, n_out, generator=g).double() * 2 - 1) * logit_range)
    pv = {"parent_values": (lo, hi)}
    if op in ("counterfactual_log_ratio", "counterfactual_log_ratio_and_entropy_delta"):
        y = torch.where(torch.rand(B, n_out, generator=g).double() < torch.sigmoid(logits), hi, lo).double()
        return (x, weight, logits, y), pv
    if op == "counterfactual_entropy_delta":
        return (x, weight, logits), pv
    K = 3
    if op in ("categorical_counterfactual_log_ratio", "categorical_entropy_delta"):  # V = 2 softmax variables
        weight = (torch.randn(2 * K, n_in, generator=g).double() * w_scale).clamp(-10, 10)
        logits = (torch.rand(B, 2, K, generator=g).double() * 2 - 1) * logit_range
        if op == "categorical_entropy_delta":
            return (x, weight, logits), pv
        a = torch.multinomial(torch.softmax(logits, -1).view(-1, K), 1, generator=g).view(B, 2)
        return (x, weight, logits, a), pv
    if op in ("categorical_parent_log_ratio", "categorical_parent_entropy_delta"):  # parents: 2 variables of K
        a = torch.randint(0, K, (B, 2), generator=g)
        weight = (torch.randn(n_out, 2 * K, generator=g).double() * w_scale).clamp(-10, 10)
        if op == "categorical_parent_entropy_delta":
            return (a, weight, logits), {}
        y = torch.where(torch.rand(B, n_out, generator=g).double() < torch.sigmoid(logits), 1.0, 0.0).double()
        return (a, weight, logits, y), {}
    assert op == "hnca_logit_credit"
    d = (torch.rand(B, n_out, generator=g).double() * 2 - 1) * logit_range
    return (logits, d), {}


def _cast(args, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in args]


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", contract.OPS)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_backend_meets_the_contract(backend, device, op, shape, coding, regime, dtype):
    if backend == "triton" and device == "cpu" and (shape[0] * shape[1] * shape[2] > 20000 or dtype == "bf16"):
        pytest.skip("the interpreter runs the smaller cases")
    if op == "hnca_logit_credit" and dtype == "bf16":
        pytest.skip("logit_credit computes in its inputs' dtype")
    args, kwargs = _case(op, shape, coding, regime)
    # the reference on the inputs as the backend sees them (rounded to the dtype)
    ref = getattr(Fn, op)(*_cast(_cast(args, DTYPES[dtype]), torch.float64), **kwargs, backend="reference")
    fast_args = [t.to(device) for t in _cast(args, DTYPES[dtype])]
    out = getattr(Fn, op)(*fast_args, **kwargs, backend=backend)
    outs, refs = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))  # an op of two messages: each
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.dtype == (torch.float64 if dtype == "f64" else torch.float32) or op == "hnca_logit_credit"
        assert out.shape == ref.shape and not out.isnan().any(), "unwritten (poisoned) or NaN entries"
        ok, error, bound = contract.within(out.cpu(), ref, DTYPES[dtype])
        assert ok, f"{backend} {op}: max error {error:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_every_backend_honours_checks(backend, device):
    """Bad parents raise (the same ValueError) unless checks("off") says the caller knows."""
    x, weight, logits = torch.zeros(4, 5, device=device), torch.randn(3, 5, device=device), torch.randn(4, 3, device=device)
    x[1, 2] = 0.5
    if device == "cpu":
        with pytest.raises(ValueError, match="must hold only the parent values"):
            Fn.counterfactual_entropy_delta(x, weight, logits, backend=backend)
    with hnca_kernels.checks("off"):
        out = Fn.counterfactual_entropy_delta(x, weight, logits, backend=backend)
    assert out.shape == x.shape
