"""The Triton kernels' own properties (the contract every backend meets is tests/ops/test_conformance.py):
chunks and paths for wide weights and saturated children, and on a GPU graph capture without a sync.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py), so the shapes stay
small; the same tests run compiled on CUDA.
"""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import hnca_kernels  # noqa: E402
from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential  # noqa: E402
from hnca_kernels import functional as Fn  # noqa: E402
from hnca_kernels.backends import unavailable_reason  # noqa: E402
from hnca_kernels.ops import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if unavailable_reason("triton", DEVICE) is not None:
    pytest.skip(f"triton backend unavailable: {unavailable_reason('triton', DEVICE)}", allow_module_level=True)

from hnca_kernels.ops import triton as T  # noqa: E402

pytestmark = pytest.mark.interpreter

CODINGS = {"01": (0.0, 1.0), "pm1": (-1.0, 1.0)}
SHAPES = [(7, 33, 130), (1, 257, 7), (33, 7, 1), (130, 1, 33)]  # (B, in, out)
# (input dtype, dtype of the reference computation, tolerance on |ref - fast| / |ref|)
DTYPES = {
    "f64": (torch.float64, torch.float64, 1e-10),
    "f32": (torch.float32, torch.float64, 2e-5),
    "bf16": (torch.bfloat16, torch.float32, 1e-4),
    "f16": (torch.float16, torch.float32, 1e-4),
}


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """torch.empty returns NaN-filled memory, so an output tail a kernel leaves unwritten fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)


def rel_err(ref, out):
    return ((ref - out.to(ref)).norm() / ref.norm().clamp_min(1e-30)).item()


def make_layer(B, n_in, n_out, coding, dtype, seed=0):
    """Binary parents, weights up to |10|, child logits anywhere in [-60, 60].

    (The reductions take any logits; drawing them apart from x @ W.T keeps a mix of saturated
    and undecided children in every shape, so no case has only negligible messages.)"""
    g = torch.Generator().manual_seed(seed)
    lo, hi = CODINGS[coding]
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, lo, hi)
    weight = (torch.randn(n_out, n_in, generator=g) * 4).clamp(-10, 10)
    weight[0, 0] = 10.0
    logits = (torch.rand(B, n_out, generator=g) * 2 - 1) * 60
    logits[0, 0] = -60.0
    return x.to(dtype), weight.to(dtype), logits.to(dtype), (lo, hi), g


def check(name, args, pv, dtype_id):
    dtype, ref_dtype, tol = DTYPES[dtype_id]
    args = [a.to(DEVICE) for a in args]
    out = getattr(Fn, name)(*args, parent_values=pv, backend="triton")
    assert out.dtype == torch.promote_types(dtype, torch.float32) and out.shape == args[0].shape
    assert not out.isnan().any()
    ref_args = [a.to(ref_dtype) if a.is_floating_point() else a for a in args]
    ref = getattr(Fn, name)(*ref_args, parent_values=pv, backend="reference")
    assert rel_err(ref, out) < tol


shape_ids = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("coding", CODINGS)
def test_bernoulli_log_ratio_beyond_the_tables(coding):
    """Weights whose tables overflow and logits far past saturation: the per-element path."""
    x, weight, logits, pv, g = make_layer(9, 20, 12, coding, torch.float32)
    weight[:3] *= 30.0  # |w*W| up to 600: exp overflows float32
    logits[:, 5] = 200.0 * torch.sign(logits[:, 5])  # sigmoid(-200) = 0 in float32
    y = torch.where(torch.rand(logits.shape, generator=g) < 0.5, pv[1], pv[0])
    check("counterfactual_log_ratio", (x, weight, logits, y), pv, "f32")


def test_chunks_close_before_the_product_overflows():
    """Many children each near the chunk limit: a single running product would overflow."""
    x, weight, logits, pv, g = make_layer(5, 9, 64, "pm1", torch.float32)
    weight = torch.full_like(weight, 9.5) * torch.where(torch.rand(weight.shape, generator=g) < 0.9, 1.0, -1.0)
    logits = torch.where(x @ weight.t() > 0, -1.0, 1.0) * 0.5  # each child misfits: r near exp(+19)
    y = torch.where(logits > 0, 1.0, -1.0)
    check("counterfactual_log_ratio", (x, weight, logits, y), pv, "f32")


def test_bernoulli_log_ratio_negligible_messages_have_small_absolute_error():
    """Every child saturated and agreeing with its sample: all messages are below float32's
    resolution relative to 1. The product of factors 1 + tiny rounds them to 0, so here the
    kernel is accurate in absolute terms only (unlike the reference's logsigmoid differences)."""
    x, weight, _, pv, g = make_layer(33, 7, 3, "01", torch.float32)
    logits = torch.full((33, 3), -60.0)
    y = torch.zeros(33, 3)
    out = Fn.counterfactual_log_ratio(x.to(DEVICE), weight.to(DEVICE), logits.to(DEVICE), y.to(DEVICE), backend="triton")
    ref = Fn.counterfactual_log_ratio(x.double(), weight.double(), logits.double(), y.double(), backend="reference")
    assert ref.abs().max() < 1e-6
    assert (out.cpu().double() - ref).abs().max() < 3 * 2**-23


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_wide_children_anywhere_keep_the_table_choice(where):
    """A wide child is summed in its own loop; the product loop still carries its sign change (the
    factors' sign picks the next child's table), wherever the wide child sits."""
    x, weight, logits, pv, g = make_layer(11, 21, 9, "pm1", torch.float32)
    weight = weight / 4
    j = {"first": 0, "middle": 4, "last": 8}[where]
    weight[j] *= 40.0  # w*|W| far past LIMIT
    y = torch.where(torch.rand(logits.shape, generator=g) < 0.5, pv[1], pv[0])
    check("counterfactual_log_ratio", (x, weight, logits, y), pv, "f32")


@pytest.mark.parametrize("dtype_id", ["f32", "f64"])
def test_entropy_of_saturated_children_is_exact_to_relative_rounding(dtype_id):
    """Every child saturated: each term is ~1e-18 and the message ~1e-16; the q-form and the flip
    to u = sigmoid(-|l|) keep it to relative rounding (the CPU backend's test, for triton)."""
    dtype, _, tol = DTYPES[dtype_id]
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(5, 40, generator=g) < 0.5, -1.0, 1.0).double()
    weight = torch.randn(20, 40, generator=g).double() * 0.1
    logits = torch.full((5, 20), 45.0, dtype=torch.float64) * torch.where(torch.rand(5, 20, generator=g) < 0.5, 1.0, -1.0)
    ref = reference.entropy_delta(x, weight, logits, -1.0, 1.0)
    assert 0 < ref.abs().max() < 1e-15
    args = [t.to(device=DEVICE, dtype=dtype) for t in (x, weight, logits)]
    out = Fn.counterfactual_entropy_delta(*args, parent_values=(-1.0, 1.0), backend="triton")
    assert rel_err(ref, out.cpu()) < tol


@pytest.mark.parametrize("coding", CODINGS)
def test_categorical_wide_spread_takes_the_logsumexp_path(coding):
    """Columns whose weights spread past the two-GEMM form's limit (a sum could lose its dominant
    term to underflow) are computed by the logsumexp form; tiles of both kinds in one call."""
    x, weight, logits, pv, g = make_layer(9, 150, 12, coding, torch.float32)
    weight[:, 70:] *= 8.0  # spread up to w*160 in the columns of the second tiles
    a = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=g).squeeze(1)
    check("categorical_counterfactual_log_ratio", (x, weight, logits, a), pv, "f32")


def test_bad_parents_and_classes_raise_the_same_value_errors():
    x, weight, logits, pv, g = make_layer(6, 19, 5, "pm1", torch.float32)
    y = torch.where(torch.rand(logits.shape, generator=g) < 0.5, pv[1], pv[0])
    a = torch.zeros(6, dtype=torch.long)
    x[3, 7] = 0.5
    x, weight, logits, y, a = (t.to(DEVICE) for t in (x, weight, logits, y, a))
    if DEVICE == "cuda":
        pytest.skip("on a GPU the kernels assert on the device (a failed assert ends the process's CUDA use)")
    for name, extra in (("counterfactual_log_ratio", (y,)), ("categorical_counterfactual_log_ratio", (a,)),
                        ("counterfactual_entropy_delta", ())):
        with pytest.raises(ValueError, match=r"x must hold only the parent values \(-1.0, 1.0\)"):
            getattr(Fn, name)(x, weight, logits, *extra, parent_values=pv, backend="triton")
    x[3, 7] = 1.0
    with pytest.raises(ValueError, match=r"a must hold class indices in \[0, 5\)"):
        Fn.categorical_counterfactual_log_ratio(x, weight, logits, torch.full((6,), 5, device=DEVICE),
                                                parent_values=pv, backend="triton")


def test_unsupported_reason():
    assert T.unsupported_reason(torch.device("cuda")) is None
    assert "CUDA" in T.unsupported_reason(torch.device("meta"))
    assert hnca_kernels.available_backends("cpu" if DEVICE == "cpu" else "cuda").count("triton") == 1


# ---- GPU only: no host synchronisation, CUDA-graph capture -----------------------------------

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _gpu_layer():
    x, weight, logits, pv, g = make_layer(33, 70, 20, "pm1", torch.float32)
    y = torch.where(torch.rand(logits.shape, generator=g) < torch.sigmoid(logits), 1.0, -1.0)
    a = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=g).squeeze(1)
    return [t.cuda() for t in (x, weight, logits, y, a)], pv


@gpu_only
def test_messages_do_not_synchronize():
    (x, weight, logits, y, a), pv = _gpu_layer()

    def calls():
        Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend="triton")
        Fn.categorical_counterfactual_log_ratio(x, weight, logits, a, parent_values=pv, backend="triton")
        Fn.counterfactual_entropy_delta(x, weight, logits, parent_values=pv, backend="triton")

    calls()  # compiles and autotunes (which synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu_only
def test_messages_replay_in_a_cuda_graph():
    (x, weight, logits, y, a), pv = _gpu_layer()

    def step():
        d = Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend="triton")
        e = Fn.counterfactual_entropy_delta(x, weight, logits, parent_values=pv, backend="triton")
        c = Fn.categorical_counterfactual_log_ratio(x, weight, logits, a, parent_values=pv, backend="triton")
        return d, e, c

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up on the side stream, as torch's graph docs ask
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for ours, theirs in zip(captured, eager):
            torch.testing.assert_close(ours, theirs)


@gpu_only
def test_messages_stay_float32_exact_with_tf32_allowed(monkeypatch):
    """No message uses a matrix unit (the softmax child's two GEMMs are FMAs in the kernel), so
    allowing TF32 for matmuls changes nothing: float32 rounding against the float64 reference."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x, weight, logits, pv, g = make_layer(70, 130, 90, "pm1", torch.float32)
    weight = weight / 4
    y = torch.where(torch.rand(logits.shape, generator=g) < torch.sigmoid(logits), 1.0, -1.0)
    a = torch.multinomial(torch.softmax(logits.double(), -1), 1, generator=g).squeeze(1)
    check("counterfactual_log_ratio", (x, weight, logits, y), pv, "f32")
    check("counterfactual_entropy_delta", (x, weight, logits), pv, "f32")
    check("categorical_counterfactual_log_ratio", (x, weight, logits, a), pv, "f32")
