"""Triton backend: the counterfactual reductions and a fused BernoulliLinear forward.

Design. Every reduction is tiled over (examples, parents): one program owns a
BLOCK_B x BLOCK_I tile of d, loops over the children and accumulates in float32 (float64 for
float64 inputs), so the [B, in, out] tensor of the reference is never formed. Per child a
program loads one column of the logits (BLOCK_B values) and one row of the weight or its tables
(BLOCK_I values) and does O(BLOCK_B * BLOCK_I) work with them, so the loads are amortised and the
inner loop is arithmetic.

Bernoulli children (``hnca_kernels.ops.reference.bernoulli_log_ratio``; MATH.md section 1)
multiply the factors r = u + v*E, E = exp(-s*W*Delta) read from two tables exp(+-w*W), and take
one log per chunk of children. Since |log r| <= w*|W[j,i]|, the host gives each child the bound
w*max_i|W[j,i]|; the kernel closes a chunk (one log) before the bounds in it would sum past
LIMIT, so the running product stays a normal float. A child whose bound exceeds LIMIT (its table
would overflow) or whose logits reach LIMIT in size (u or v could underflow, or flush to zero)
takes a per-element softplus path instead: exact and finite for any weights and logits, at one
exp and one log per element. Training weights never get there; the path exists for safety.
Accuracy: each factor is rounded once, so log(product) carries an absolute error of about
eps per factor in the chunk; messages smaller than that (every child saturated and agreeing with
its sample) come out as ~0 rather than with the reference's relative accuracy.

The fused forward computes logits = x @ W.T + b with tl.dot and samples from them in the same
program, from a seed drawn through torch (see ``bernoulli_linear``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the registry reports load_reason(); nothing below is defined
    triton = None

__all__ = [
    "bernoulli_log_ratio",
    "categorical_log_ratio",
    "entropy_delta",
    "bernoulli_linear",
    "unsupported_reason",
    "load_reason",
]


def load_reason() -> str | None:
    return None if triton is not None else "triton is not installed (pip install 'hnca-kernels[triton]')"


def unsupported_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return "triton runs on CUDA tensors; set TRITON_INTERPRET=1 to run it on the CPU"
    return f"triton runs on CUDA tensors, not {device.type}"


if triton is not None:

    # ---- kernels ---------------------------------------------------------------------------

    @triton.jit
    def _softplus(z):
        # log(1 + e^z) = max(z, 0) + log1p(e^-|z|), finite for every z
        return tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))

    @triton.jit
    def _log1p(e):
        # log(1 + e) for e >= 0, accurate for tiny e (Goldberg's trick; libdevice's log1p
        # is not available under the interpreter)
        t = 1.0 + e
        exact = t == 1.0
        return tl.where(exact, e, tl.log(t) * (e / tl.where(exact, 1.0, t - 1.0)))

    @triton.jit
    def _entropy(z):
        # H(sigmoid(z)) = log1p(e) + |z| e / (1 + e) with e = exp(-|z|): symmetric, stable
        a = tl.abs(z)
        e = tl.exp(-a)
        return _log1p(e) + a * e / (1.0 + e)

    @triton.jit
    def _tile(x_ptr, values_ptr, B, IN, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr):
        """Rows, columns, masks, and each parent's side (at lo?) and flip delta, as the reference.

        (lo, hi) come from a tensor in the accumulator's dtype: a float argument would be
        rounded to float32."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < B
        col_ok = cols < IN
        mask = row_ok[:, None] & col_ok[None, :]
        lo = tl.load(values_ptr)
        hi = tl.load(values_ptr + 1)
        x = tl.load(x_ptr + rows[:, None] * IN + cols[None, :], mask=mask, other=0.0).to(lo.dtype)
        at_lo = x != hi
        delta = tl.where(at_lo, hi - x, lo - x)
        return rows, cols, row_ok, col_ok, mask, at_lo, delta

    @triton.jit
    def _bernoulli_log_ratio_kernel(
        x_ptr, values_ptr, w_ptr, e_plus_ptr, e_minus_ptr, bound_ptr, l_ptr, y_ptr, d_ptr,
        B, IN, OUT,
        LIMIT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        rows, cols, row_ok, col_ok, mask, at_lo, delta = _tile(x_ptr, values_ptr, B, IN, BLOCK_B, BLOCK_I)
        acc_t = values_ptr.dtype.element_ty
        total = tl.zeros([BLOCK_B, BLOCK_I], acc_t)  # sum of log r closed so far
        prod = tl.full([BLOCK_B, BLOCK_I], 1.0, acc_t)  # product of the open chunk's r
        spent = 0.0  # sum of the open chunk's bounds: |log prod| <= spent <= LIMIT
        for j in range(OUT):
            l = tl.load(l_ptr + rows * OUT + j, mask=row_ok, other=0.0).to(acc_t)
            # (converted before comparing: the interpreter holds bfloat16 as raw uint16 bits)
            fired = tl.load(y_ptr + rows * OUT + j, mask=row_ok, other=0).to(acc_t) > 0
            sl = tl.where(fired, l, -l)
            bound = tl.load(bound_ptr + j)
            if bound > LIMIT:
                # log r = softplus(c - s*l) - softplus(-s*l) with c = -s*W*Delta
                w = tl.load(w_ptr + j * IN + cols, mask=col_ok, other=0.0).to(acc_t)
                c = tl.where(fired, -1.0, 1.0).to(acc_t)[:, None] * w[None, :] * delta
                total += _softplus(c - sl[:, None]) - _softplus(-sl)[:, None]
            else:
                if spent + bound > LIMIT:
                    total += tl.log(prod)
                    prod = tl.full([BLOCK_B, BLOCK_I], 1.0, acc_t)
                    spent = 0.0
                e = tl.exp(-tl.abs(sl))
                big = 1.0 / (1.0 + e)
                u = tl.where(sl >= 0, big, e * big)  # sigmoid(s*l)
                v = tl.where(sl >= 0, e * big, big)  # sigmoid(-s*l), not 1 - u
                e_plus = tl.load(e_plus_ptr + j * IN + cols, mask=col_ok, other=1.0)
                e_minus = tl.load(e_minus_ptr + j * IN + cols, mask=col_ok, other=1.0)
                # E = exp(-s*W*Delta) is exp(+w*W) exactly when "parent at lo" != "child fired"
                E = tl.where(at_lo != fired[:, None], e_plus[None, :], e_minus[None, :])
                prod *= u[:, None] + v[:, None] * E
                spent += bound
        total += tl.log(prod)
        # d = sign * sum_j -log r, sign = +1 from lo
        d = tl.where(at_lo, -total, total)
        tl.store(d_ptr + rows[:, None] * IN + cols[None, :], d, mask=mask)

    @triton.jit
    def _categorical_log_ratio_kernel(
        x_ptr, values_ptr, w_ptr, logpi_ptr, a_ptr, d_ptr,
        B, IN, K,
        BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        rows, cols, row_ok, col_ok, mask, at_lo, delta = _tile(x_ptr, values_ptr, B, IN, BLOCK_B, BLOCK_I)
        acc_t = values_ptr.dtype.element_ty
        a = tl.load(a_ptr + rows, mask=row_ok, other=0)
        w_a = tl.load(w_ptr + a[:, None] * IN + cols[None, :], mask=mask, other=0.0).to(acc_t)
        # d = -sign * logsumexp_k(logpi[k] + (W[k,i] - W[a,i]) * Delta), in two passes over k:
        # the max, then the sum of exps below it (one exp per class and element)
        top = tl.full([BLOCK_B, BLOCK_I], float("-inf"), acc_t)
        for k in range(K):
            lp = tl.load(logpi_ptr + rows * K + k, mask=row_ok, other=0.0)
            w = tl.load(w_ptr + k * IN + cols, mask=col_ok, other=0.0).to(acc_t)
            top = tl.maximum(top, lp[:, None] + (w[None, :] - w_a) * delta)
        total = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
        for k in range(K):
            lp = tl.load(logpi_ptr + rows * K + k, mask=row_ok, other=0.0)
            w = tl.load(w_ptr + k * IN + cols, mask=col_ok, other=0.0).to(acc_t)
            total += tl.exp(lp[:, None] + (w[None, :] - w_a) * delta - top)
        lse = top + tl.log(total)
        tl.store(d_ptr + rows[:, None] * IN + cols[None, :], tl.where(at_lo, -lse, lse), mask=mask)

    @triton.jit
    def _entropy_delta_kernel(
        x_ptr, values_ptr, w_ptr, l_ptr, d_ptr,
        B, IN, OUT,
        BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        rows, cols, row_ok, col_ok, mask, at_lo, delta = _tile(x_ptr, values_ptr, B, IN, BLOCK_B, BLOCK_I)
        acc_t = values_ptr.dtype.element_ty
        total = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
        for j in range(OUT):
            l = tl.load(l_ptr + rows * OUT + j, mask=row_ok, other=0.0).to(acc_t)
            w = tl.load(w_ptr + j * IN + cols, mask=col_ok, other=0.0).to(acc_t)
            # difference per child, then the sum: no cancellation between two large sums
            total += _entropy(l[:, None] + w[None, :] * delta) - _entropy(l)[:, None]
        tl.store(d_ptr + rows[:, None] * IN + cols[None, :], tl.where(at_lo, total, -total), mask=mask)

    @triton.jit(do_not_specialize=["seed"])
    def _bernoulli_linear_kernel(
        x_ptr, w_ptr, b_ptr, logits_ptr, sample_ptr, seed,
        B, IN, OUT, lo, hi,
        HAS_BIAS: tl.constexpr, ACC_T: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        row_ok = rows < B
        out_ok = outs < OUT
        acc = tl.zeros([BLOCK_B, BLOCK_O], ACC_T)
        for k0 in range(0, IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < IN
            xt = tl.load(x_ptr + rows[:, None] * IN + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + outs[None, :] * IN + ks[:, None], mask=k_ok[:, None] & out_ok[None, :], other=0.0)
            if UPCAST:
                xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION, out_dtype=ACC_T)
        if HAS_BIAS:
            acc += tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(ACC_T)[None, :]
        logits = acc.to(logits_ptr.dtype.element_ty)
        mask = row_ok[:, None] & out_ok[None, :]
        offsets = rows[:, None] * OUT + outs[None, :]
        tl.store(logits_ptr + offsets, logits, mask=mask)
        # the unit fires where uniform < sigmoid(stored logit); uniform = tl.rand(seed, b*out + j)
        fired = tl.rand(seed, offsets) < tl.sigmoid(logits.to(tl.float32))
        tl.store(sample_ptr + offsets, tl.where(fired, hi, lo), mask=mask)

    _INTERPRETED = type(_entropy_delta_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


# ---- launchers -----------------------------------------------------------------------------

# The running product of a chunk stays within exp(+-LIMIT), a normal number in the accumulator.
_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}
# NOTE: tile sizes are untuned defaults (no GPU measurement yet): 32 x 64 keeps 16 accumulator
# elements per thread at 4 warps and gives B*in/2048 programs.
_BLOCK_B, _BLOCK_I = 32, 64


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _values(lo: float, hi: float, dt: torch.dtype, device) -> torch.Tensor:
    return torch.tensor([lo, hi], dtype=dt, device=device)


def _grid(B: int, n: int, block_b: int, block_n: int):
    return (triton.cdiv(B, block_b), triton.cdiv(n, block_n))


def _blocks(B: int, n: int):
    return min(_BLOCK_B, triton.next_power_of_2(B)), min(_BLOCK_I, triton.next_power_of_2(n))


def bernoulli_log_ratio(x, weight, logits, y, lo, hi):
    """d [B, in]: see ``hnca_kernels.ops.reference.bernoulli_log_ratio``."""
    x, weight, logits, y = (t.contiguous() for t in (x, weight, logits, y))
    B, n_in = x.shape
    n_out = weight.shape[0]
    dt = _acc_dtype(logits.dtype)
    w = hi - lo
    wide = weight.to(dt)
    # NOTE: two tables (2*in*out exps, amortised over B) leave a compare-and-select, one FMA
    # and one multiply per (b, i, j); exp in the kernel would add an SFU exp per (b, i, j), and
    # the table rows are [BLOCK_I] loads shared by BLOCK_B examples. Not yet measured on a GPU.
    e_plus, e_minus = torch.exp(w * wide), torch.exp(-w * wide)
    limit = _LIMIT[dt]
    bound = (w * wide.abs().amax(1)).float() if n_in else torch.zeros(n_out, device=x.device)
    if B:
        # a child whose logits reach LIMIT takes the per-element path (u or v could underflow)
        bound = torch.where(logits.abs().amax(0).float() < limit, bound, float("inf"))
    d = torch.empty(B, n_in, dtype=dt, device=x.device)
    if d.numel():
        bb, bi = _blocks(B, n_in)
        _bernoulli_log_ratio_kernel[_grid(B, n_in, bb, bi)](
            x, _values(lo, hi, dt, x.device), weight, e_plus, e_minus, bound, logits, y, d, B, n_in, n_out,
            LIMIT=limit, BLOCK_B=bb, BLOCK_I=bi,
        )
    return d


def categorical_log_ratio(x, weight, logits, a, lo, hi):
    """d [B, in]: see ``hnca_kernels.ops.reference.categorical_log_ratio``."""
    x, weight, a = x.contiguous(), weight.contiguous(), a.contiguous()
    B, n_in = x.shape
    dt = _acc_dtype(logits.dtype)
    logpi = torch.log_softmax(logits.to(dt), dim=-1).contiguous()
    d = torch.empty(B, n_in, dtype=dt, device=x.device)
    if d.numel():
        bb, bi = _blocks(B, n_in)
        _categorical_log_ratio_kernel[_grid(B, n_in, bb, bi)](
            x, _values(lo, hi, dt, x.device), weight, logpi, a, d, B, n_in, weight.shape[0],
            BLOCK_B=bb, BLOCK_I=bi,
        )
    return d


def entropy_delta(x, weight, logits, lo, hi):
    """d [B, in]: see ``hnca_kernels.ops.reference.entropy_delta``."""
    x, weight, logits = x.contiguous(), weight.contiguous(), logits.contiguous()
    B, n_in = x.shape
    dt = _acc_dtype(logits.dtype)
    d = torch.empty(B, n_in, dtype=dt, device=x.device)
    if d.numel():
        bb, bi = _blocks(B, n_in)
        _entropy_delta_kernel[_grid(B, n_in, bb, bi)](
            x, _values(lo, hi, dt, x.device), weight, logits, d, B, n_in, weight.shape[0],
            BLOCK_B=bb, BLOCK_I=bi,
        )
    return d


# ---- fused BernoulliLinear forward ---------------------------------------------------------

def _launch_bernoulli_linear(x, weight, bias, lo, hi, seed):
    B, n_in = x.shape
    n_out = weight.shape[0]
    logits = torch.empty(B, n_out, dtype=x.dtype, device=x.device)
    sample = torch.empty(B, n_out, dtype=weight.dtype, device=x.device)
    if logits.numel():
        if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and x.is_cuda:
            precision = "tf32"  # as F.linear does under the same flag
        else:
            precision = "ieee"
        acc_t = tl.float64 if x.dtype == torch.float64 else tl.float32
        # tl.dot needs every block dimension >= 16; masks cover the rest
        bb = max(16, min(64, triton.next_power_of_2(B)))
        bo = max(16, min(64, triton.next_power_of_2(n_out)))
        bk = max(16, min(32, triton.next_power_of_2(n_in)))
        _bernoulli_linear_kernel[_grid(B, n_out, bb, bo)](
            x, weight, bias if bias is not None else x, logits, sample, seed, B, n_in, n_out, lo, hi,
            HAS_BIAS=bias is not None, ACC_T=acc_t, PRECISION=precision,
            # the interpreter (triton 3.9) multiplies bfloat16 blocks as their raw uint16 bits
            UPCAST=_INTERPRETED and x.dtype == torch.bfloat16,
            BLOCK_B=bb, BLOCK_O=bo, BLOCK_K=bk,
        )
    return logits, sample


class _BernoulliLinearFunction(torch.autograd.Function):
    """Fused logits and sample forward; the ordinary linear backward for the logits."""

    @staticmethod
    def forward(ctx, x, weight, bias, lo, hi, seed):
        logits, sample = _launch_bernoulli_linear(x, weight, bias, lo, hi, seed)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(sample)
        return logits, sample

    @staticmethod
    def backward(ctx, grad_logits, _grad_sample):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_logits @ weight if need_x else None
        grad_w = grad_logits.t() @ x if need_w else None
        grad_b = grad_logits.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None


def bernoulli_linear(x, weight, bias, lo, hi, seed=None):
    """Logits ``x @ weight.T + bias`` [B, out] and a Bernoulli sample of them, in one kernel.

    The sample holds ``hi`` where ``tl.rand(seed, b * out + j) < sigmoid(logits[b, j])``, else
    ``lo``, in ``weight``'s dtype. ``seed`` defaults to one drawn with ``torch.randint``, so
    ``torch.manual_seed`` reproduces the draws. Gradients flow through the logits only.

    >>> logits, h = bernoulli_linear(x, layer.weight, layer.bias, 0.0, 1.0)
    """
    if seed is None:
        seed = int(torch.randint(2**31, (1,)).item())  # CPU generator: no device sync
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return _BernoulliLinearFunction.apply(x, weight, bias, float(lo), float(hi), seed)
