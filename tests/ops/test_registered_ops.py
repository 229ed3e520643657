"""The registered ops (torch.ops.hnca.*) are public: every argument is checked (shapes, devices,
dtypes: ValueError/TypeError, never a read out of bounds), in the kernels and in their fake
implementations, and torch.library.opcheck passes."""

import pytest
import torch

from hnca_kernels import backends
from test_cpp_kernels import make_layer

def test_ops_pass_opcheck():
    assert backends.is_available("cpp", "cpu")
    x, weight, logits, y, a, pv = make_layer((6, 19, 5), "pm1", "small")
    for dtype in (torch.float32, torch.float64):
        x_, w_, l_, y_ = (t.to(dtype) for t in (x, weight, logits, y))
        torch.library.opcheck(torch.ops.hnca.bernoulli_log_ratio, (x_, w_, l_, y_, *pv))
        torch.library.opcheck(torch.ops.hnca.categorical_log_ratio, (x_, w_, l_, a, *pv))
        torch.library.opcheck(torch.ops.hnca.entropy_delta, (x_, w_, l_, *pv))
        torch.library.opcheck(torch.ops.hnca.log_ratio_and_entropy_delta, (x_, w_, l_, y_, *pv))
        torch.library.opcheck(torch.ops.hnca.logit_credit, (l_, x_ @ w_.t()))
        # the samplers draw anew at every call: the checks that compare two calls' outputs do not apply
        for op, args in ((torch.ops.hnca.bernoulli_sample, (l_, -1.0, 1.0, dtype)),
                         (torch.ops.hnca.categorical_sample, (l_.view(6, 5, 1).expand(6, 5, 3).contiguous(),))):
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _bad_calls():
    """(name, op call) pairs whose arguments are wrong, each in one way."""
    ops = torch.ops.hnca
    B, n_in, n_out = 5, 7, 4
    x, w, l = torch.zeros(B, n_in), torch.randn(n_out, n_in), torch.randn(B, n_out)
    y, a = torch.ones(B, n_out), torch.zeros(B, dtype=torch.long)
    return {
        "y with fewer rows": (ValueError, lambda: ops.bernoulli_log_ratio(x, w, l, y[:2], 0.0, 1.0)),
        "y of one element": (ValueError, lambda: ops.bernoulli_log_ratio(
            torch.zeros(64, 512), torch.randn(8, 512), torch.randn(64, 8), torch.ones(1, 1), 0.0, 1.0)),
        "y on the meta device": (ValueError, lambda: ops.bernoulli_log_ratio(x, w, l, y.to("meta"), 0.0, 1.0)),
        "complex y": (TypeError, lambda: ops.bernoulli_log_ratio(x, w, l, y.to(torch.complex64), 0.0, 1.0)),
        "both messages' y with fewer rows": (ValueError, lambda: ops.log_ratio_and_entropy_delta(x, w, l, y[:2], 0.0, 1.0)),
        "both messages' complex y": (TypeError, lambda: ops.log_ratio_and_entropy_delta(
            x, w, l, y.to(torch.complex64), 0.0, 1.0)),
        "both messages' x not binary": (ValueError, lambda: ops.log_ratio_and_entropy_delta(x + 0.5, w, l, y, 0.0, 1.0)),
        "weight of the wrong width": (ValueError, lambda: ops.entropy_delta(x, w[:, :3], l, 0.0, 1.0)),
        "3-D x": (ValueError, lambda: ops.entropy_delta(x[None], w, l, 0.0, 1.0)),
        "integer x": (TypeError, lambda: ops.entropy_delta(x.long(), w, l, 0.0, 1.0)),
        "lo above hi": (ValueError, lambda: ops.entropy_delta(x, w, l, 1.0, 0.0)),
        "nan parent value": (ValueError, lambda: ops.entropy_delta(x, w, l, float("nan"), 1.0)),
        "a of the wrong length": (ValueError, lambda: ops.categorical_log_ratio(x, w, l, a[:3], 0.0, 1.0)),
        "2-D a": (ValueError, lambda: ops.categorical_log_ratio(x, w, l, a[:, None], 0.0, 1.0)),
        "float a": (TypeError, lambda: ops.categorical_log_ratio(x, w, l, a.double(), 0.0, 1.0)),
        "a on the meta device": (ValueError, lambda: ops.categorical_log_ratio(x, w, l, a.to("meta"), 0.0, 1.0)),
        "a out of range": (ValueError, lambda: ops.categorical_log_ratio(x, w, l, a + n_out, 0.0, 1.0)),
        "negative a": (ValueError, lambda: ops.categorical_log_ratio(x, w, l, a - 1, 0.0, 1.0)),
        "x not binary": (ValueError, lambda: ops.bernoulli_log_ratio(x + 0.5, w, l, y, 0.0, 1.0)),
        "credit of two shapes": (ValueError, lambda: ops.logit_credit(l, l[:, :2])),
        "categorical parents' y of fewer rows": (ValueError, lambda: ops.categorical_parent_log_ratio(
            a.view(B, 1), torch.randn(n_out, 3), l, y[:2])),
        "categorical parents' classes out of range": (ValueError, lambda: ops.categorical_parent_log_ratio(
            (a + 3).view(B, 1), torch.randn(n_out, 3), l, y)),
        "categorical parents' weight not V*K wide": (ValueError, lambda: ops.categorical_parent_log_ratio(
            a.view(B, 1).expand(B, 2), torch.randn(n_out, 3), l, y)),
        "integer credit": (TypeError, lambda: ops.logit_credit(l.long(), l.long())),
        "integer logits to sample": (TypeError, lambda: ops.bernoulli_sample(l.long(), 0.0, 1.0, torch.float32)),
        "an integer sample": (TypeError, lambda: ops.bernoulli_sample(l, 0.0, 1.0, torch.int64)),
        "transposed logits to sample": (ValueError, lambda: ops.bernoulli_sample(l.t(), 0.0, 1.0, torch.float32)),
        "sample values hi below lo": (ValueError, lambda: ops.bernoulli_sample(l, 1.0, -1.0, torch.float32)),
        "infinite sample value": (ValueError, lambda: ops.bernoulli_sample(l, 0.0, float("inf"), torch.float32)),
        "integer logits of classes": (TypeError, lambda: ops.categorical_sample(l.long())),
        "logits of no classes": (ValueError, lambda: ops.categorical_sample(l[:, :0])),
        "0-D logits of classes": (ValueError, lambda: ops.categorical_sample(l[0, 0])),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_registered_ops_check_every_argument(case):
    """torch.ops.hnca.* are public: each bad argument is a clear error, never a read out of bounds."""
    assert backends.is_available("cpp", "cpu")
    error, call = _bad_calls()[case]
    with pytest.raises(error, match="hnca: "):
        call()


def test_opcheck_sees_the_argument_checks():
    """opcheck runs the op on fake tensors too: bad arguments fail there as in eager code, and
    the meta implementations raise the kernels' errors."""
    assert backends.is_available("cpp", "cpu")
    x, w, l = torch.zeros(5, 7), torch.randn(4, 7), torch.randn(5, 4)
    with pytest.raises(Exception, match="hnca: y must have the shape of logits"):
        torch.library.opcheck(torch.ops.hnca.bernoulli_log_ratio, (x, w, l, torch.ones(2, 4), 0.0, 1.0))
    meta = [t.to("meta") for t in (x, w, l)]
    with pytest.raises(ValueError, match="hnca: a must have shape"):
        torch.ops.hnca.categorical_log_ratio(*meta, torch.zeros(3, dtype=torch.long, device="meta"), 0.0, 1.0)
    with pytest.raises(TypeError, match="hnca: logits and d must be floating"):
        torch.ops.hnca.logit_credit(meta[2].long(), meta[2].long())
    with pytest.raises(ValueError, match="hnca: logits must be contiguous"):
        torch.ops.hnca.bernoulli_sample(meta[2].t(), 0.0, 1.0, torch.float32)
    with pytest.raises(ValueError, match="hnca: logits must have a last dimension"):
        torch.ops.hnca.categorical_sample(meta[2][:, :0])


