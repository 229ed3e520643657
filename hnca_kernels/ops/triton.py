"""Triton backend: the counterfactual reductions.

Design. Each message is two launches: a prologue computing, once per call, everything that
depends on one index pair only, and a main kernel tiled over (examples, parents) whose loop over
the children does the O(B * in * out) work with no transcendental per term.

- Prologue (one launch, two roles picked by the program id). Per (child, parent): the tables of
  the weight (exp(+-w*W) for the Bernoulli message; expm1 and c*e^c for the entropy; per-column
  shifted exps for the softmax) and the bound w*max_i|W[j, i]| per child. Per (example, child):
  the child's factors (u = sigmoid(s*l) and v = sigmoid(-s*l), both computed directly), stored
  transposed, [out, B], so that the main loop reads contiguous rows, like the tables' rows.
- Main kernel. A program owns a BLOCK_B x BLOCK_I tile of d; per child it reads one row of each
  table and one 64-bit (u, v) pair per example, and does BLOCK_B*BLOCK_I terms. Buffers are padded
  to whole tiles so these reads need no masks (a masked load costs a move per register). Tiles
  are autotuned on a GPU (keyed on the shape); the interpreter uses one fixed small tile.
- Parent values (and class indices) are checked inside the kernels, which read them anyway: a
  bad value clears a flag that the launcher checks on the CPU (the same ValueError as every
  backend) or ``torch._assert_async`` checks on the GPU. No message call waits for the GPU: a
  call can be captured in a CUDA graph.

Bernoulli children (``reference.bernoulli_log_ratio``; docs/math.md, section 1). Each term is a factor
r = u + v*E, E = exp(-s*W*Delta) one of the two table entries: exp(+w*W) exactly where "parent at
lo" != "child fired". A chunk of children multiplies its factors and takes one log; since
|log r| <= w*|W[j, i]|, a chunk closes before the children's bounds in it would sum past LIMIT,
so the product stays a normal float. A child whose bound exceeds LIMIT (its table would overflow)
is summed per element in softplus form, exact for any weight, in a second loop. Saturated logits
need no path of their own: with LIMIT = 64 (float32) every table entry is >= e^-64, while u or v
only underflow below e^-87, where they are below e^-23 of the other term of r (float64: 650, 708).
Per-term instructions, read off the sm_90 SASS of the inner loop (triton 3.8): FSETP
(prod > 0: which table), SEL, FFMA (u + v*E), FMUL (the product): 4, the floor for a select, an
FMA and a multiply. Neither the parent's side nor the child's sample costs an instruction a
term: the running product's sign says "at lo != fired" for the current child, and each factor
is stored with the sign sigma = -1 where the next child's sample differs from this child's, so
multiplying by it moves the sign on to the next child (in the first version, per-row "fired"
predicates were spilled into bit fields: ~1 extra instruction a term; before that the compare
and XOR cost one each). With the loads (one 64-bit pair per row and one vector per table per
child) the inner block is 289 instructions for 64 terms a thread: 4.5 a term. At an H100's issue
rate (132 SMs x 128 thread-instructions x 1.98 GHz = 33 T/s) that bounds the message at ~7.4 T
terms/s, ~3.4x the time of the FP32 GEMM of the same shape (~25 T FMA/s, 1 FMA a term); the
previous kernel ran at 1.25 T terms/s (20x the GEMM).
The identity r = (p + q*E^-)(fired ? 1 : E^+) (a select that depends on the parent only) was
not taken: the sigma trick already removes the per-child predicate, and it would add an exact
FP32 GEMM exp(w * sum_{j not fired} W[j, i]) (1 FMA a term unless split over tensor cores) whose
cancellation against the product costs eps * w|W| per confident child.
Accuracy: each factor is rounded once, so log(product) carries an absolute error of about eps per
factor in the chunk; messages smaller than that come out as ~0, not with relative accuracy.

Entropy delta (``reference.entropy_delta``; the CPU backend's form, see csrc/hnca_cpu.cpp): H is
even, so with s = sign(l) each term is H(-|l| + c~) - H(-|l|) = log D - n / D with c~ = -s*W*Delta,
u = sigmoid(-|l|), A = e^c~, delta = u*(A - 1), D = 1 + delta, n = u*((A - 1)*kappa + c~*A),
kappa = -|l| sigmoid(|l|). The logs multiply as q = prod(D) - 1 (q <- q*D + delta), one log1p per
chunk of summed bound <= 4 (relative accuracy for saturated children, whose terms are ~u).
Per term (SASS): FSETP (x != hi XOR l > 0), 2 SEL (A - 1, c~*A), FMUL (delta), FFMA (D),
FFMA (q), FFMA and FMUL (n), MUFU.RCP (1/D; 16/SM/clk against an issue rate of 128, so at ~10
instructions a term it does not bind; x / y would add ~8 instructions of range checks) and FFMA:
10, 11.6 with the loads, against ~40 with two exps, two log1ps and two divisions per term.

Softmax child: the two-GEMM form (docs/math.md, section 1) fused in one kernel: S+- = pi @ exp(+-w*W - m+-)
with a per-column max m+- (2 FFMA per term, both sums kept, the side picked at the end: 2.8
instructions a term with the loads), one log per (b, i). A tile holding a column whose spread
w*(max_k W - min_k W) exceeds the limit (a sum could lose its dominant term to underflow) takes
the logsumexp form instead (two exps per term); no matrix unit is used, so TF32 cannot enter.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import validation

from . import bad_parent_values

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the registry reports load_reason(); nothing below is defined
    triton = None

__all__ = [
    "bernoulli_log_ratio",
    "categorical_log_ratio",
    "entropy_delta",
    "unsupported_reason",
    "load_reason",
]

# The kernels check the parent values (and the class indices) themselves: functional skips its check.
CHECKS_PARENT_VALUES = True


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

    # ---- elementwise helpers -----------------------------------------------------------------
    # ACCURATE (compiled on a GPU) takes libdevice's functions: tl.exp is ex2.approx(x * log2 e),
    # whose error grows with |x| (~6e-6 relative at |x| = 64), too coarse for the tables. The
    # interpreter has no libdevice; numpy's functions are accurate there.

    @triton.jit
    def _exp(x, ACCURATE: tl.constexpr):
        if ACCURATE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def _log1p(e, ACCURATE: tl.constexpr):
        if ACCURATE:
            return libdevice.log1p(e)
        else:
            # Goldberg's trick: exact where 1 + e rounds to 1
            t = 1.0 + e
            exact = t == 1.0
            return tl.where(exact, e, tl.log(t) * (e / tl.where(exact, 1.0, t - 1.0)))

    @triton.jit
    def _expm1(x, ACCURATE: tl.constexpr):
        if ACCURATE:
            return libdevice.expm1(x)
        else:
            # Kahan's trick: (e^x - 1) * x / log(e^x), exact where e^x rounds to 1
            e = tl.exp(x)
            em1 = e - 1.0
            safe = (em1 != 0.0) & (em1 != -1.0) & (e < float("inf"))
            return tl.where(safe, em1 * x / tl.log(tl.where(safe, e, 2.0)), tl.where(em1 == 0.0, x, em1))

    @triton.jit
    def _reciprocal(x, ACCURATE: tl.constexpr):
        # float32 on a GPU: the hardware estimate (one MUFU.RCP, ~1 ulp) for a term's 1/D, D in
        # [1/2, e^4]; x / y would add range checks and fix-ups (div.full: ~8 instructions)
        if ACCURATE and x.dtype == tl.float32:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _softplus(z, ACCURATE: tl.constexpr):
        # log(1 + e^z) = max(z, 0) + log1p(e^-|z|), finite for every z
        return tl.maximum(z, 0.0) + _log1p(_exp(-tl.abs(z), ACCURATE), ACCURATE)

    @triton.jit
    def _entropy(z, ACCURATE: tl.constexpr):
        # H(sigmoid(z)) = log1p(e) + |z| e / (1 + e) with e = exp(-|z|): symmetric, stable
        a = tl.abs(z)
        e = _exp(-a, ACCURATE)
        return _log1p(e, ACCURATE) + a * e / (1.0 + e)

    @triton.jit
    def _parents(x_ptr, ok_ptr, B, IN, LO: tl.constexpr, HI: tl.constexpr, acc_t: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr):
        """The tile's rows, columns and parent values; clears ok[0] if a value is neither lo nor hi.

        (lo, hi) are compile-time constants made with tl.full in the accumulator's dtype: a float
        kernel argument would be rounded to float32."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < B
        col_ok = cols < IN
        mask = row_ok[:, None] & col_ok[None, :]
        lo = tl.full([], LO, acc_t)
        hi = tl.full([], HI, acc_t)
        # (converted before comparing: the interpreter holds bfloat16 as raw uint16 bits)
        x = tl.load(x_ptr + rows[:, None] * IN + cols[None, :], mask=mask, other=LO).to(acc_t)
        bad = tl.max(((x != lo) & (x != hi)).to(tl.int32))
        tl.store(ok_ptr, 0, mask=bad > 0)
        return rows, cols, row_ok, col_ok, mask, x, hi

    @triton.jit
    def _pair(ptr, j, LDB, rows, PAIRED: tl.constexpr):
        """Child j's two per-example values at [j, b, 0] and [j, b, 1]: in float32 one 64-bit load
        per example (the halves are the two floats; little-endian), else two loads."""
        if PAIRED:
            pair = tl.load(ptr.to(tl.pointer_type(tl.int64)) + j * LDB + rows)
            first = pair.to(tl.int32).to(tl.float32, bitcast=True)
            second = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            at = ptr + (j * LDB + rows) * 2
            first = tl.load(at)
            second = tl.load(at + 1)
        return first, second

    @triton.jit
    def _row(ptr, index, LDI, zero, cols):
        """Table row `index` at the tile's columns, as a [BLOCK_B, BLOCK_I] tile constant along the
        rows. A [BLOCK_I] load would get a layout of its own and a conversion through shared memory
        (with barriers) per child; this one has the tile's layout, and the compiler merges the equal
        addresses of a thread into one vector load per 4 columns. Unmasked: the rows are padded."""
        return tl.load(ptr + index * LDI + zero + cols[None, :])

    # ---- Bernoulli children --------------------------------------------------------------------

    @triton.jit(do_not_specialize=["B", "IN", "OUT"])
    def _bernoulli_prologue_kernel(
        w_ptr, l_ptr, y_ptr, tab_ptr, bound_ptr, uv_ptr,
        B, IN, OUT, LDI, LDB,
        W_DELTA: tl.constexpr, LIMIT: tl.constexpr, ACCURATE: tl.constexpr,
        ROW_BLOCK: tl.constexpr, PB: tl.constexpr, PJ: tl.constexpr,
    ):
        """Programs [0, OUT): child j's table rows exp(+c), exp(-c) (c = w*W[j, :]; 1 in the padding)
        and its bound w*max|W[j, :]|. Programs from OUT: a PB x PJ tile of the pairs
        (sigma*u, sigma*v) at [j, b] (b < LDB), u = sigmoid(s*l), v = sigmoid(-s*l), and
        sigma = -1 where child j + 1 fired and child j did not, or the reverse, else +1."""
        pid = tl.program_id(0)
        acc_t = tab_ptr.dtype.element_ty
        if pid < OUT:
            j = pid
            top = tl.zeros([ROW_BLOCK], acc_t)
            for i0 in range(0, LDI, ROW_BLOCK):
                cols = i0 + tl.arange(0, ROW_BLOCK)
                c = tl.load(w_ptr + j * IN + cols, mask=cols < IN, other=0.0).to(acc_t) * W_DELTA
                top = tl.maximum(top, tl.abs(c))
                c = tl.minimum(tl.maximum(c, -LIMIT), LIMIT)  # a wide child's rows are not read
                tl.store(tab_ptr + (2 * j) * LDI + cols, _exp(c, ACCURATE), mask=cols < LDI)
                tl.store(tab_ptr + (2 * j + 1) * LDI + cols, _exp(-c, ACCURATE), mask=cols < LDI)
            tl.store(bound_ptr + j, tl.max(top).to(tl.float32))
        else:
            t = pid - OUT
            n_j = tl.cdiv(OUT, PJ)
            rows = (t // n_j) * PB + tl.arange(0, PB)
            kids = (t % n_j) * PJ + tl.arange(0, PJ)
            m = (rows < B)[:, None] & (kids < OUT)[None, :]
            offs = rows[:, None] * OUT + kids[None, :]
            l = tl.load(l_ptr + offs, mask=m, other=0.0).to(acc_t)
            fired = tl.load(y_ptr + offs, mask=m, other=0.0).to(acc_t) > 0
            has_next = (rows < B)[:, None] & (kids + 1 < OUT)[None, :]
            fired_next = tl.load(y_ptr + offs + 1, mask=has_next, other=0.0).to(acc_t) > 0
            sigma = tl.where(has_next & (fired != fired_next), -1.0, 1.0)
            sl = tl.where(fired, l, -l)
            e = _exp(-tl.abs(sl), ACCURATE)
            big = 1.0 / (1.0 + e)
            u = tl.where(sl >= 0, big, e * big)  # sigmoid(s*l)
            v = tl.where(sl >= 0, e * big, big)  # sigmoid(-s*l), not 1 - u
            out = uv_ptr + (kids[None, :] * LDB + rows[:, None]) * 2
            ok = (rows < LDB)[:, None] & (kids < OUT)[None, :]
            tl.store(out, sigma * u, mask=ok)
            tl.store(out + 1, sigma * v, mask=ok)

    @triton.jit(do_not_specialize=["B", "IN", "OUT", "B_KEY"])
    def _bernoulli_kernel(
        x_ptr, w_ptr, tab_ptr, bound_ptr, uv_ptr, l_ptr, y_ptr, d_ptr, ok_ptr,
        B, IN, OUT, LDI, LDB, B_KEY,
        LO: tl.constexpr, HI: tl.constexpr, LIMIT: tl.constexpr, ACCURATE: tl.constexpr, PAIRED: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        acc_t = d_ptr.dtype.element_ty
        rows, cols, row_ok, col_ok, mask, x, hi = _parents(x_ptr, ok_ptr, B, IN, LO, HI, acc_t, BLOCK_B, BLOCK_I)
        zero = 0 * rows[:, None]
        # |prod| is the open chunk's product of factors r. Its sign says which table the next child
        # takes: prod > 0 exactly where "parent at lo" != "child j fired" (E = exp(+w*W) there).
        # Each factor carries the sign sigma that moves this to child j + 1 (see the prologue).
        # (every mask has the block's shape: triton 3.9's interpreter refuses a scalar one, OUT > 0)
        fired = tl.load(y_ptr + rows * OUT, mask=row_ok & (rows * 0 + OUT > 0), other=0.0).to(acc_t) > 0
        prod = tl.where((x != hi) != fired[:, None], 1.0, -1.0).to(acc_t)
        # The sum of the closed chunks' logs lives in d (a chunk closes every ~LIMIT / (w max|W|)
        # children): a register tile less, for more programs per SM.
        out = d_ptr + rows[:, None] * IN + cols[None, :]
        tl.store(out, tl.zeros([BLOCK_B, BLOCK_I], acc_t), mask=mask)
        spent = 0.0  # sum of the open chunk's bounds: |log prod| <= spent <= LIMIT
        # child j + 1's bound, loaded during child j (the buffer holds at least one entry; the last
        # child's "next" is itself, and unused)
        n_bound = tl.load(bound_ptr)
        for j in range(OUT):
            bound = n_bound
            n_bound = tl.load(bound_ptr + tl.minimum(j + 1, OUT - 1))
            if bound <= LIMIT:
                if spent + bound > LIMIT:
                    tl.debug_barrier()  # (the same threads read what they wrote; a barrier costs nothing here)
                    tl.store(out, tl.load(out, mask=mask, other=0.0) + tl.log(tl.abs(prod)), mask=mask)
                    prod = tl.where(prod > 0, 1.0, -1.0).to(acc_t)
                    spent = 0.0
                u, v = _pair(uv_ptr, j, LDB, rows, PAIRED)  # sigma*u, sigma*v
                e = tl.where(prod > 0, _row(tab_ptr, 2 * j, LDI, zero, cols), _row(tab_ptr, 2 * j + 1, LDI, zero, cols))
                prod = prod * (u[:, None] + v[:, None] * e)
                spent += bound
            else:
                # a wide child, summed below: only its sign change
                now = tl.load(y_ptr + rows * OUT + j, mask=row_ok, other=0.0).to(acc_t) > 0
                has_next = rows * 0 + j + 1 < OUT
                nxt = tl.load(y_ptr + rows * OUT + j + 1, mask=row_ok & has_next, other=0.0).to(acc_t) > 0
                prod = prod * tl.where(has_next & (now != nxt), -1.0, 1.0).to(acc_t)[:, None]
        tl.debug_barrier()
        total = tl.load(out, mask=mask, other=0.0) + tl.log(tl.abs(prod))
        # Wide children (or NaN weights), in a loop of their own so that the product's loop stays
        # small: log r = softplus(c - s*l) - softplus(-s*l), c = -s*W*Delta.
        at_lo = tl.load(x_ptr + rows[:, None] * IN + cols[None, :], mask=mask, other=LO).to(acc_t) != hi
        wd = tl.full([], HI - LO, acc_t)
        delta = tl.where(at_lo, wd, -wd)
        for j in range(OUT):
            bound = tl.load(bound_ptr + j)
            if not (bound <= LIMIT):
                l = tl.load(l_ptr + rows * OUT + j, mask=row_ok, other=0.0).to(acc_t)
                fired = tl.load(y_ptr + rows * OUT + j, mask=row_ok, other=0.0).to(acc_t) > 0
                w = tl.load(w_ptr + j * IN + zero + cols[None, :], mask=col_ok[None, :], other=0.0).to(acc_t)
                c = tl.where(fired[:, None], -w, w) * delta
                sl = tl.where(fired, l, -l)
                total += _softplus(c - sl[:, None], ACCURATE) - _softplus(-sl, ACCURATE)[:, None]
        # d = sign * sum_j -log r, sign = +1 from lo
        tl.store(out, tl.where(at_lo, -total, total), mask=mask)

    # ---- entropy delta -------------------------------------------------------------------------

    @triton.jit(do_not_specialize=["B", "IN", "OUT"])
    def _entropy_prologue_kernel(
        w_ptr, l_ptr, tab_ptr, bound_ptr, uk_ptr,
        B, IN, OUT, LDI, LDB,
        W_DELTA: tl.constexpr, LIMIT: tl.constexpr, ACCURATE: tl.constexpr,
        ROW_BLOCK: tl.constexpr, PB: tl.constexpr, PJ: tl.constexpr,
    ):
        """Programs [0, OUT): child j's rows expm1(+c), expm1(-c), c*e^c, -c*e^-c (c = w*W[j, :]; 0
        in the padding) and its bound. Programs from OUT: per (b, j) the pair (u signed, kappa),
        u = sigmoid(-|l|) with the sign of l (+u where l > 0), kappa = -|l| sigmoid(|l|)."""
        pid = tl.program_id(0)
        acc_t = tab_ptr.dtype.element_ty
        if pid < OUT:
            j = pid
            top = tl.zeros([ROW_BLOCK], acc_t)
            for i0 in range(0, LDI, ROW_BLOCK):
                cols = i0 + tl.arange(0, ROW_BLOCK)
                ok = cols < LDI
                c = tl.load(w_ptr + j * IN + cols, mask=cols < IN, other=0.0).to(acc_t) * W_DELTA
                top = tl.maximum(top, tl.abs(c))
                c = tl.minimum(tl.maximum(c, -LIMIT), LIMIT)  # a wide child's rows are not read
                row = tab_ptr + (4 * j) * LDI + cols
                tl.store(row, _expm1(c, ACCURATE), mask=ok)
                tl.store(row + LDI, _expm1(-c, ACCURATE), mask=ok)
                tl.store(row + 2 * LDI, c * _exp(c, ACCURATE), mask=ok)
                tl.store(row + 3 * LDI, -c * _exp(-c, ACCURATE), mask=ok)
            tl.store(bound_ptr + j, tl.max(top).to(tl.float32))
        else:
            t = pid - OUT
            n_j = tl.cdiv(OUT, PJ)
            rows = (t // n_j) * PB + tl.arange(0, PB)
            kids = (t % n_j) * PJ + tl.arange(0, PJ)
            m = (rows < B)[:, None] & (kids < OUT)[None, :]
            l = tl.load(l_ptr + rows[:, None] * OUT + kids[None, :], mask=m, other=0.0).to(acc_t)
            a = tl.abs(l)
            t_ = _exp(-a, ACCURATE)
            inv = 1.0 / (1.0 + t_)  # sigmoid(|l|)
            u = t_ * inv
            out = uk_ptr + (kids[None, :] * LDB + rows[:, None]) * 2
            ok = (rows < LDB)[:, None] & (kids < OUT)[None, :]
            tl.store(out, tl.where(l > 0, u, -u), mask=ok)
            tl.store(out + 1, -a * inv, mask=ok)

    @triton.jit(do_not_specialize=["B", "IN", "OUT", "B_KEY"])
    def _entropy_kernel(
        x_ptr, w_ptr, tab_ptr, bound_ptr, uk_ptr, l_ptr, d_ptr, ok_ptr,
        B, IN, OUT, LDI, LDB, B_KEY,
        LO: tl.constexpr, HI: tl.constexpr, LIMIT: tl.constexpr, ACCURATE: tl.constexpr, PAIRED: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        acc_t = d_ptr.dtype.element_ty
        rows, cols, row_ok, col_ok, mask, x, hi = _parents(x_ptr, ok_ptr, B, IN, LO, HI, acc_t, BLOCK_B, BLOCK_I)
        zero = 0 * rows[:, None]
        q = tl.zeros([BLOCK_B, BLOCK_I], acc_t)  # product of the open chunk's D, minus 1
        rational = tl.zeros([BLOCK_B, BLOCK_I], acc_t)  # the open chunk's sum of n / D
        total = tl.zeros([BLOCK_B, BLOCK_I], acc_t)  # sum of the closed chunks' terms
        spent = 0.0
        for j in range(OUT):
            bound = tl.load(bound_ptr + j)
            if bound <= LIMIT:
                if spent + bound > LIMIT:
                    total += _log1p(q, ACCURATE) - rational
                    q = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
                    rational = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
                    spent = 0.0
                u_signed, kappa = _pair(uk_ptr, j, LDB, rows, PAIRED)
                am1_plus = _row(tab_ptr, 4 * j, LDI, zero, cols)
                am1_minus = _row(tab_ptr, 4 * j + 1, LDI, zero, cols)
                ca_plus = _row(tab_ptr, 4 * j + 2, LDI, zero, cols)
                ca_minus = _row(tab_ptr, 4 * j + 3, LDI, zero, cols)
                # c~ = -s*W*Delta is +w*W exactly when "parent at lo" != "l > 0"
                plus = (x != hi) != (u_signed > 0)[:, None]
                u = tl.abs(u_signed)[:, None]
                am1 = tl.where(plus, am1_plus, am1_minus)  # A - 1
                ca = tl.where(plus, ca_plus, ca_minus)  # c~ * A
                delta = u * am1
                D = 1.0 + delta
                q = q * D + delta  # (1 + q) * D - 1
                rational += u * (am1 * kappa[:, None] + ca) * _reciprocal(D, ACCURATE)
                spent += bound
        total += _log1p(q, ACCURATE) - rational
        # wide children: the stable per-term form H(l + c) - H(l), c = Delta*W
        wd = tl.full([], HI - LO, acc_t)
        delta = tl.where(x != hi, wd, -wd)
        for j in range(OUT):
            bound = tl.load(bound_ptr + j)
            if not (bound <= LIMIT):
                l = tl.load(l_ptr + rows * OUT + j, mask=row_ok, other=0.0).to(acc_t)
                w = tl.load(w_ptr + j * IN + zero + cols[None, :], mask=col_ok[None, :], other=0.0).to(acc_t)
                total += _entropy(l[:, None] + w * delta, ACCURATE) - _entropy(l, ACCURATE)[:, None]
        tl.store(d_ptr + rows[:, None] * IN + cols[None, :], tl.where(x != hi, total, -total), mask=mask)

    # ---- softmax child -------------------------------------------------------------------------

    @triton.jit(do_not_specialize=["B", "IN", "K"])
    def _categorical_prologue_kernel(
        w_ptr, l_ptr, a_ptr, ok_ptr, tab_ptr, top_ptr, pi_ptr,
        B, IN, K, LDI, LDB,
        W_DELTA: tl.constexpr, ACCURATE: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr, KB: tl.constexpr,
    ):
        """Programs [0, cdiv(LDI, CB)): for CB columns, m+ = max_k c, m- = max_k -c (c = w*W[k, i],
        0 in the padding), the tables exp(c - m+), exp(-c - m-) [K, 2, LDI], and [3, LDI] rows m+,
        m-, m+ + m- (the spread). Programs from there: for RB examples, pi and log pi (the softmax
        of the logits) stored transposed [2, K, LDB], and the class check (ok[1] cleared where a is
        outside [0, K))."""
        pid = tl.program_id(0)
        acc_t = tab_ptr.dtype.element_ty
        n_col = tl.cdiv(LDI, CB)
        if pid < n_col:
            cols = pid * CB + tl.arange(0, CB)
            ok = cols < LDI
            top_p = tl.full([CB], float("-inf"), acc_t)
            top_m = tl.full([CB], float("-inf"), acc_t)
            for k in range(K):
                c = tl.load(w_ptr + k * IN + cols, mask=cols < IN, other=0.0).to(acc_t) * W_DELTA
                top_p = tl.maximum(top_p, c)
                top_m = tl.maximum(top_m, -c)
            for k in range(K):
                c = tl.load(w_ptr + k * IN + cols, mask=cols < IN, other=0.0).to(acc_t) * W_DELTA
                tl.store(tab_ptr + (2 * k) * LDI + cols, _exp(c - top_p, ACCURATE), mask=ok)
                tl.store(tab_ptr + (2 * k + 1) * LDI + cols, _exp(-c - top_m, ACCURATE), mask=ok)
            tl.store(top_ptr + cols, top_p, mask=ok)
            tl.store(top_ptr + LDI + cols, top_m, mask=ok)
            tl.store(top_ptr + 2 * LDI + cols, top_p + top_m, mask=ok)
        else:
            rows = (pid - n_col) * RB + tl.arange(0, RB)
            row_ok = rows < B
            a = tl.load(a_ptr + rows, mask=row_ok, other=0)
            tl.store(ok_ptr + 1, 0, mask=tl.max((((a < 0) | (a >= K)) & row_ok).to(tl.int32)) > 0)
            top = tl.full([RB], float("-inf"), acc_t)
            for k0 in range(0, K, KB):
                ks = k0 + tl.arange(0, KB)
                m = row_ok[:, None] & (ks < K)[None, :]
                l = tl.load(l_ptr + rows[:, None] * K + ks[None, :], mask=m, other=float("-inf")).to(acc_t)
                top = tl.maximum(top, tl.max(l, axis=1))
            top = tl.where(row_ok, top, 0.0)
            total = tl.zeros([RB], acc_t)
            for k0 in range(0, K, KB):
                ks = k0 + tl.arange(0, KB)
                m = row_ok[:, None] & (ks < K)[None, :]
                l = tl.load(l_ptr + rows[:, None] * K + ks[None, :], mask=m, other=float("-inf")).to(acc_t)
                total += tl.sum(_exp(l - top[:, None], ACCURATE), axis=1)
            lse = top + tl.log(tl.where(row_ok, total, 1.0))
            for k0 in range(0, K, KB):
                ks = k0 + tl.arange(0, KB)
                m = (rows < LDB)[:, None] & (ks < K)[None, :]
                l = tl.load(l_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                            other=0.0).to(acc_t)
                log_pi = l - lse[:, None]
                out = pi_ptr + ks[None, :] * LDB + rows[:, None]
                tl.store(out, _exp(log_pi, ACCURATE), mask=m)
                tl.store(out + K * LDB, log_pi, mask=m)

    @triton.jit(do_not_specialize=["B", "IN", "K", "B_KEY"])
    def _categorical_kernel(
        x_ptr, w_ptr, tab_ptr, top_ptr, pi_ptr, a_ptr, d_ptr, ok_ptr,
        B, IN, K, LDI, LDB, B_KEY,
        LO: tl.constexpr, HI: tl.constexpr, LIMIT: tl.constexpr, ACCURATE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        acc_t = d_ptr.dtype.element_ty
        rows, cols, row_ok, col_ok, mask, x, hi = _parents(x_ptr, ok_ptr, B, IN, LO, HI, acc_t, BLOCK_B, BLOCK_I)
        zero = 0 * rows[:, None]
        at_lo = x != hi
        a = tl.load(a_ptr + rows, mask=row_ok, other=0)
        a = tl.minimum(tl.maximum(a, 0), K - 1)  # a bad index is reported by the prologue; no stray load
        wd = tl.full([], HI - LO, acc_t)
        w_a = tl.load(w_ptr + a[:, None] * IN + cols[None, :], mask=mask, other=0.0).to(acc_t)
        c_a = w_a * wd
        spread = tl.max(tl.load(top_ptr + 2 * LDI + cols))
        if spread <= LIMIT:
            # d = c_a - m+ - log(S+) at lo, c_a + m- + log(S-) at hi, S+- = sum_k pi_k exp(+-c_k - m+-)
            s_plus = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
            s_minus = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
            for k in range(K):
                p = tl.load(pi_ptr + k * LDB + rows)[:, None]
                s_plus += p * _row(tab_ptr, 2 * k, LDI, zero, cols)
                s_minus += p * _row(tab_ptr, 2 * k + 1, LDI, zero, cols)
            top_p = _row(top_ptr, 0, LDI, zero, cols)
            top_m = _row(top_ptr, 1, LDI, zero, cols)
            d = tl.where(at_lo, c_a - top_p - tl.log(tl.where(at_lo, s_plus, 1.0)),
                         c_a + top_m + tl.log(tl.where(at_lo, 1.0, s_minus)))
        else:
            # d = -sign * logsumexp_k(log pi_k + (W[k,i] - W[a,i]) * Delta), in two passes over k
            delta = tl.where(at_lo, wd, -wd)
            top = tl.full([BLOCK_B, BLOCK_I], float("-inf"), acc_t)
            for k in range(K):
                lp = tl.load(pi_ptr + (K + k) * LDB + rows)
                w = tl.load(w_ptr + k * IN + zero + cols[None, :], mask=col_ok[None, :], other=0.0).to(acc_t)
                top = tl.maximum(top, lp[:, None] + (w - w_a) * delta)
            total = tl.zeros([BLOCK_B, BLOCK_I], acc_t)
            for k in range(K):
                lp = tl.load(pi_ptr + (K + k) * LDB + rows)
                w = tl.load(w_ptr + k * IN + zero + cols[None, :], mask=col_ok[None, :], other=0.0).to(acc_t)
                total += _exp(lp[:, None] + (w - w_a) * delta - top, ACCURATE)
            lse = top + tl.log(total)
            d = tl.where(at_lo, -lse, lse)
        tl.store(d_ptr + rows[:, None] * IN + cols[None, :], d, mask=mask)

    _INTERPRETED = type(_entropy_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


# ---- launchers -----------------------------------------------------------------------------
# The kernels do not specialise on B, in, out (do_not_specialize): one compiled kernel per
# tile serves every shape (a kernel with its unrolled logs compiles in seconds; specialising on
# divisibility by 16 would compile each config again per shape class, for one vector load of x
# per program). The row strides LDI, LDB (multiples of 16) stay specialised: the inner loop's
# loads are vectorised by them.

# Bernoulli: the running product of a chunk stays within exp(+-LIMIT); the LIMIT also makes an
# underflowed u or v negligible (see the module docstring).
_LIMIT = {torch.float32: 64.0, torch.float64: 650.0}
# Entropy: the chunk's product of D stays in [e^-4, e^4], where q = prod - 1 loses at most e^4 ulp
# (kChunkRange of the CPU kernels).
_ENTROPY_LIMIT = 4.0
# Softmax: a column whose spread w*(max_k W - min_k W) is below this keeps every sum's dominant
# term a normal number (pi_k >= 1/K for some k, its exp(c_k - m) >= e^-LIMIT).
_SPREAD_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}

# Under the interpreter: one fixed tile, shrunk to the shape (autotuning there would be slow).
_INTERPRETER_BLOCK_B, _INTERPRETER_BLOCK_I = 32, 64


def _configs(specs):
    if _INTERPRETED or triton is None:
        return []
    return [triton.Config({"BLOCK_B": bb, "BLOCK_I": bi}, num_warps=nw, num_stages=1, maxnreg=reg)
            for bb, bi, nw, reg in specs]


# Candidate tiles (BLOCK_B, BLOCK_I, warps, register cap), untimed until the GPU run
# (benchmarks/gpu_kernels.py prints the pick). What the sm_90 SASS (triton 3.8) says:
# - The layout is Triton's coalesced one: a warp spans one row of 128 columns (4 per thread),
#   warps stack along the rows, so a thread holds R = BLOCK_B*BLOCK_I/(128*warps) rows x 4
#   columns. Per child it loads one 64-bit (u, v) pair per row and one 128-bit vector per table;
#   nothing else but the 4 instructions a term.
# - Bernoulli, 64 terms a thread (64x128, 4 warps): the inner block is 289 instructions, 4.5 a
#   term with the loads; 255 registers (2 programs of 4 warps per SM) or, capped at 168, 3
#   programs with one spill reload a child; 32 terms a thread (32x128) fits in 128 registers
#   (4.5 a term, 4 programs per SM).
# - Entropy, 32 terms a thread: 11.6 instructions a term, 254 registers; a cap spills in the
#   inner loop, so none is offered.
# - Softmax (the GEMM form), 32 terms a thread: 2.8 instructions a term.
# - The tables' L2 traffic is (B/BLOCK_B) x in x out x 8 bytes: 17 GB at B = in = out = 4096 with
#   BLOCK_B = 32, ~3 ms of H100 L2 bandwidth beside ~10 ms of arithmetic; BLOCK_B = 64 halves it.
# - Small tiles keep small shapes spread over the SMs (B=50, in=200: 16 programs of 16x64).
# - num_stages is 1: the per-child loads sit inside the chunk branch, and at 3 stages the
#   SASS has no asynchronous copies, only a larger spill stack.
_BERNOULLI_SPECS = [(64, 128, 4, None), (64, 128, 4, 168), (128, 128, 8, None), (32, 128, 4, 128),
                    (32, 128, 4, None), (16, 64, 2, None)]
_ENTROPY_SPECS = [(32, 128, 4, None), (64, 128, 8, None), (16, 128, 4, None), (16, 64, 2, None)]
_CATEGORICAL_SPECS = [(64, 128, 4, None), (32, 128, 4, None), (64, 256, 8, None), (16, 64, 2, None)]


def _autotuned(kernel, specs):
    if _INTERPRETED or triton is None:
        return None
    return triton.autotune(configs=_configs(specs), key=["B_KEY", "IN", "OUT" if "OUT" in kernel.arg_names else "K"])(kernel)


if triton is not None:
    _BERNOULLI_TUNED = _autotuned(_bernoulli_kernel, _BERNOULLI_SPECS)
    _ENTROPY_TUNED = _autotuned(_entropy_kernel, _ENTROPY_SPECS)
    _CATEGORICAL_TUNED = _autotuned(_categorical_kernel, _CATEGORICAL_SPECS)

# Fixed tiles instead of autotuning (benchmarks/gpu_kernels.py compares them): (BLOCK_B, BLOCK_I,
# num_warps, maxnreg or None), or None for the autotuned choice.
_FORCED_TILE: dict[str, tuple | None] = {"bernoulli": None, "entropy": None, "categorical": None}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@functools.lru_cache(maxsize=64)
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """value rounded to dtype (on the CPU: no device work), so the kernel compares exactly."""
    return torch.tensor(value, dtype=dtype).item()


# The main kernels read the per-child rows without masks: buffers are padded to whole tiles of
# the largest BLOCK_I and BLOCK_B any config (or the interpreter's tile) uses.
def _pad(n: int, block: int) -> int:
    return max(block, triton.cdiv(n, block) * block)


def _pads(B: int, n_in: int) -> tuple[int, int]:
    if _INTERPRETED:
        return _pad(n_in, _INTERPRETER_BLOCK_I), _pad(B, _INTERPRETER_BLOCK_B)
    specs = _BERNOULLI_SPECS + _ENTROPY_SPECS + _CATEGORICAL_SPECS + [t for t in _FORCED_TILE.values() if t]
    return _pad(n_in, max(s[1] for s in specs)), _pad(B, max(s[0] for s in specs))


_OK_WORDS: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _ok_word(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[parents ok, classes ok] for a kernel to clear, with a view of each flag: fresh on the CPU
    (read after the launch), one persistent pair per GPU (checked by a device assert; a failed
    assert ends the process's use of that GPU, so it never needs resetting)."""
    if device.type == "cpu":
        word = torch.ones(2, dtype=torch.int32)
        return word, word[0], word[1]
    words = _OK_WORDS.get(device)
    if words is None:
        word = torch.ones(2, dtype=torch.int32, device=device)
        words = _OK_WORDS[device] = (word, word[0], word[1])
    return words


def _check(ok, lo: float, hi: float, classes: int | None = None) -> None:
    """Raise (CPU) or assert on the device (CUDA, no synchronisation) what the kernel found
    (``hnca_kernels.checks`` says where)."""
    word, parents_ok, classes_ok = ok
    validation.require(word.device, lambda: parents_ok.bool(), bad_parent_values(lo, hi))
    if classes is not None:
        validation.require(word.device, lambda: classes_ok.bool(),
                           ValueError(f"a must hold class indices in [0, {classes})"))


def _launch(kind, tuned, kernel, B, n_in, args, kwargs):
    """The main kernel over (B, in) tiles: autotuned, a forced tile, or the interpreter's tile."""
    forced = _FORCED_TILE.get(kind)
    if _INTERPRETED:
        bb = min(_INTERPRETER_BLOCK_B, triton.next_power_of_2(B))
        bi = min(_INTERPRETER_BLOCK_I, triton.next_power_of_2(n_in))
        kernel[(triton.cdiv(B, bb), triton.cdiv(n_in, bi))](*args, **kwargs, BLOCK_B=bb, BLOCK_I=bi)
    elif forced is not None:
        bb, bi, nw, reg = forced
        options = {"maxnreg": reg} if reg else {}
        kernel[(triton.cdiv(B, bb), triton.cdiv(n_in, bi))](*args, **kwargs, BLOCK_B=bb, BLOCK_I=bi,
                                                             num_warps=nw, num_stages=1, **options)
    else:
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(n_in, meta["BLOCK_I"]))  # noqa: E731
        tuned[grid](*args, **kwargs)


def _prologue_grid(ldb: int, n_out: int) -> int:
    return n_out + triton.cdiv(ldb, _PB) * triton.cdiv(n_out, _PJ)


def _common(x, weight, logits, lo, hi):
    """Contiguous inputs in the compute dtype, that dtype, lo/hi as stored in x, the output, the
    ok word and the padded row lengths.

    float16/bfloat16 inputs are converted here (an elementwise pass, small beside a message), so
    that the kernels are compiled for float32 and float64 only."""
    dt = _acc_dtype(logits.dtype)
    lo_x, hi_x = _in_dtype(lo, x.dtype), _in_dtype(hi, x.dtype)
    x, weight, logits = (t.to(dt).contiguous() for t in (x, weight, logits))
    d = torch.empty(x.shape, dtype=dt, device=x.device)
    ldi, ldb = _pads(*x.shape)
    return x, weight, logits, dt, lo_x, hi_x, d, _ok_word(x.device), ldi, ldb


_PB, _PJ, _ROW_BLOCK = 32, 32, 1024


def bernoulli_log_ratio(x, weight, logits, y, lo, hi):
    """d [B, in]: see ``hnca_kernels.ops.reference.bernoulli_log_ratio``."""
    x, weight, logits, dt, lo_x, hi_x, d, ok, ldi, ldb = _common(x, weight, logits, lo, hi)
    y = y.to(dt).contiguous()
    B, n_in = x.shape
    n_out = weight.shape[0]
    if d.numel() == 0:
        return d
    tables = torch.empty(n_out, 2, ldi, dtype=dt, device=x.device)  # exp(+c), exp(-c) per child
    uv = torch.empty(n_out, ldb, 2, dtype=dt, device=x.device)  # (u, +-v) per child and example
    bound = torch.zeros(max(n_out, 1), dtype=torch.float32, device=x.device)
    accurate = not _INTERPRETED
    if n_out:
        _bernoulli_prologue_kernel[(_prologue_grid(ldb, n_out),)](
            weight, logits, y, tables, bound, uv, B, n_in, n_out, ldi, ldb,
            W_DELTA=hi_x - lo_x, LIMIT=_LIMIT[dt], ACCURATE=accurate, ROW_BLOCK=min(_ROW_BLOCK, triton.next_power_of_2(ldi)), PB=_PB, PJ=_PJ,
        )
    _launch("bernoulli", _BERNOULLI_TUNED if not _INTERPRETED else None, _bernoulli_kernel, B, n_in,
            (x, weight, tables, bound, uv, logits, y, d, ok[0], B, n_in, n_out, ldi, ldb, triton.next_power_of_2(B)),
            dict(LO=lo_x, HI=hi_x, LIMIT=_LIMIT[dt], ACCURATE=accurate, PAIRED=dt == torch.float32))
    _check(ok, lo, hi)
    return d


def entropy_delta(x, weight, logits, lo, hi):
    """d [B, in]: see ``hnca_kernels.ops.reference.entropy_delta``."""
    x, weight, logits, dt, lo_x, hi_x, d, ok, ldi, ldb = _common(x, weight, logits, lo, hi)
    B, n_in = x.shape
    n_out = weight.shape[0]
    if d.numel() == 0:
        return d
    tables = torch.empty(n_out, 4, ldi, dtype=dt, device=x.device)  # expm1(+-c), +-c e^+-c per child
    uk = torch.empty(n_out, ldb, 2, dtype=dt, device=x.device)  # (+-u, kappa) per child and example
    bound = torch.empty(max(n_out, 1), dtype=torch.float32, device=x.device)
    accurate = not _INTERPRETED
    if n_out:
        _entropy_prologue_kernel[(_prologue_grid(ldb, n_out),)](
            weight, logits, tables, bound, uk, B, n_in, n_out, ldi, ldb,
            W_DELTA=hi_x - lo_x, LIMIT=_ENTROPY_LIMIT, ACCURATE=accurate, ROW_BLOCK=min(_ROW_BLOCK, triton.next_power_of_2(ldi)),
            PB=_PB, PJ=_PJ,
        )
    _launch("entropy", _ENTROPY_TUNED if not _INTERPRETED else None, _entropy_kernel, B, n_in,
            (x, weight, tables, bound, uk, logits, d, ok[0], B, n_in, n_out, ldi, ldb, triton.next_power_of_2(B)),
            dict(LO=lo_x, HI=hi_x, LIMIT=_ENTROPY_LIMIT, ACCURATE=accurate, PAIRED=dt == torch.float32))
    _check(ok, lo, hi)
    return d


_CB, _RB = 64, 16


def categorical_log_ratio(x, weight, logits, a, lo, hi):
    """d [B, in]: see ``hnca_kernels.ops.reference.categorical_log_ratio``."""
    x, weight, logits, dt, lo_x, hi_x, d, ok, ldi, ldb = _common(x, weight, logits, lo, hi)
    a = a.contiguous()
    B, n_in = x.shape
    K = weight.shape[0]
    if K == 0 and B:
        raise ValueError("a must hold class indices in [0, 0)")
    if d.numel() == 0:
        return d
    tables = torch.empty(K, 2, ldi, dtype=dt, device=x.device)  # exp(+c - m+), exp(-c - m-) per class
    top = torch.empty(3, ldi, dtype=dt, device=x.device)  # m+, m-, m+ + m-
    pi = torch.empty(2, K, ldb, dtype=dt, device=x.device)  # pi and log pi, transposed
    accurate = not _INTERPRETED
    _categorical_prologue_kernel[(triton.cdiv(ldi, _CB) + triton.cdiv(ldb, _RB),)](
        weight, logits, a, ok[0], tables, top, pi, B, n_in, K, ldi, ldb,
        W_DELTA=hi_x - lo_x, ACCURATE=accurate, CB=_CB, RB=_RB, KB=min(64, triton.next_power_of_2(K)),
    )
    _launch("categorical", _CATEGORICAL_TUNED if not _INTERPRETED else None, _categorical_kernel, B, n_in,
            (x, weight, tables, top, pi, a, d, ok[0], B, n_in, K, ldi, ldb, triton.next_power_of_2(B)),
            dict(LO=lo_x, HI=hi_x, LIMIT=_SPREAD_LIMIT[dt], ACCURATE=accurate))
    _check(ok, lo, hi, K)
    return d


# Exposed for benchmarks/gpu_kernels.py: the autotuned kernels (their .best_config after a call).
TUNED = {"bernoulli": "_BERNOULLI_TUNED", "entropy": "_ENTROPY_TUNED", "categorical": "_CATEGORICAL_TUNED"}


def tuned_kernel(kind: str):
    return globals().get(TUNED[kind])


# the environment may pin a tile for every kernel, e.g. HNCA_TRITON_TILE=64,128,4,0 (0: no register
# cap): no autotuning (tests/conftest.py does so on a GPU, where every shape would be autotuned)
if os.environ.get("HNCA_TRITON_TILE"):
    _tile = tuple(int(v) for v in os.environ["HNCA_TRITON_TILE"].split(","))
    _FORCED_TILE.update({k: (*_tile[:3], _tile[3] if len(_tile) > 3 and _tile[3] else None) for k in _FORCED_TILE})
