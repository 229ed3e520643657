// CUDA kernels of hnca::* (the CUDA dispatch key; the schemas live in hnca_cpu.cpp).
//
// Same math and numerical contract as the CPU kernels (see hnca_cpu.cpp), organised for a GPU:
//
// - A prologue computes once per call what depends on one index pair only: per (child, parent)
//   the tables of the weight (expm1(+-c), c = w*W[j, i], for the Bernoulli message; also c*e^c
//   for the entropy; per-column shifted exps for the softmax) and per child the bound
//   w*max_i|W[j, i]|; per (example, child) the child's factor (v = sigmoid(-s*l), signed by the
//   sample; for the entropy the pair (+-u, kappa)), written transposed, [out, B], through a shared
//   memory tile, so that the main kernel reads contiguous rows. Rows are padded to whole tiles.
// - The main kernel: a block of 128 threads owns a 64 x 64 tile of (examples, parents); each
//   thread a register tile of 8 examples x 4 parents. The block stages the rows of 16 children
//   (tables, factors, bounds) in shared memory, then every thread runs its 32 terms per child
//   reading 4-wide table vectors and its 8 examples' factors from shared memory (broadcasts).
//   Per term that is a compare-and-XOR (parent at lo != child fired), a select of the table entry
//   and two FMAs: q <- q + (A - 1) * v * (1 + q), the product of the chunk's factors minus 1 (the
//   CPU kernels' q-form: relative accuracy for saturated children), one log1p per chunk of
//   summed bound <= kChunkRange. The chunk bookkeeping depends on the child only: uniform, no
//   divergence. A wide child (bound > kChunkRange) is summed per element in the log domain, in a
//   second loop.
// - Entropy: log D - N / D per term, N the term's numerator (one reciprocal, rcp.approx, instead
//   of two exps, two log1ps and two divisions), the same staging. Softmax: the two-GEMM form
//   S+- = pi @ exp(+-c - m+-) (per-column max), two FMAs a term, one log per (b, i); a block whose
//   columns spread past kSpreadLimit takes the online logsumexp (an exp a term).
// - No host synchronisation: bounds are computed on the device; parent values (and class
//   indices) are checked inside the kernels, which clear a flag of a per-device pair that
//   at::_assert_async checks (a device-side assert, as for an out-of-range index).
// What the inner loops cost (their sm_90 SASS, nvcc 13, float32): Bernoulli 167 instructions for a
// thread's 32 terms of a child, 5.2 a term (LOP3 extracting the parent's side from a bit field the
// compiler packs, FSETP.XOR with the child's sample, FSEL, 2 FFMA), 128 registers (4 blocks of 4
// warps per SM); keeping x in registers instead (the entropy's `hi_here`) gives 5.0 a term at 168
// registers (3 blocks), so the bit field stays. Entropy 10.7 a term (one MUFU.RCP), 255 registers;
// softmax 2.3 (2 FFMA), 168 registers. The q-form keeps the CPU contract (relative accuracy for
// saturated children) at the same count as a product form. The tile sizes are a first guess for
// an H100; benchmarks/gpu_kernels.py measures them against the Triton kernels and cuBLAS.
// float16/bfloat16 inputs are computed in float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hnca_common.h"

#include <mutex>
#include <unordered_map>

namespace hnca {
namespace {

constexpr int kRows = 8;                        // examples per thread
constexpr int kCols = 4;                        // parents per thread (one 4-wide vector)
constexpr int kThreadsB = 8;                    // threads along the examples
constexpr int kThreadsI = 16;                   // threads along the parents
constexpr int kThreads = kThreadsB * kThreadsI; // 128
constexpr int kTileB = kThreadsB * kRows;       // 64 examples a block
constexpr int kTileI = kThreadsI * kCols;       // 64 parents a block
constexpr int kStage = 16;                      // children (or classes) staged per round
// Softmax: below this spread w*(max_k W[k, i] - min_k W[k, i]) a column's sums keep their
// dominant term a normal number (see hnca_kernels/ops/triton.py); float64 has more room.
constexpr double kSpreadLimitFloat = 60.0, kSpreadLimitDouble = 600.0;

inline int64_t pad_to(int64_t n, int64_t multiple) { return std::max<int64_t>(multiple, (n + multiple - 1) / multiple * multiple); }

// ---- small device helpers ------------------------------------------------------------------

__device__ __forceinline__ float fast_rcp(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));  // ~1 ulp; x in [1/2, e^4] here
  return r;
}
__device__ __forceinline__ double fast_rcp(double x) { return 1.0 / x; }

template <typename T>
__device__ __forceinline__ T softplus(T z) {  // log(1 + e^z), finite for every z
  return (z > T(0) ? z : T(0)) + log1p(exp(-fabs(z)));
}

template <typename T>
__device__ __forceinline__ T entropy(T z) {  // H(sigmoid(z)) = log1p(t) + |z| t / (1 + t), t = e^-|z|
  const T m = fabs(z), t = exp(-m);
  return log1p(t) + m * t / (T(1) + t);
}

// Vectors of kCols values from shared memory.
template <typename T>
struct Vec4 {
  T v[kCols];
};

template <typename T>
__device__ __forceinline__ Vec4<T> load4(const T* p) {
  Vec4<T> r;
  if constexpr (sizeof(T) == 4) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    r.v[0] = f.x, r.v[1] = f.y, r.v[2] = f.z, r.v[3] = f.w;
  } else {
#pragma unroll
    for (int c = 0; c < kCols; ++c) r.v[c] = p[c];
  }
  return r;
}

// The tile's parents: x in registers (examples b0 + ty*kRows + r, parents i0 + tx*kCols + c),
// hi outside the input; ok[0] cleared where an input value is neither lo nor hi.
template <typename T>
__device__ void load_parents(const T* __restrict__ x, int64_t batch, int64_t in, T lo, T hi, int* __restrict__ ok,
                             T (&xv)[kRows][kCols]) {
  const int64_t b0 = int64_t(blockIdx.y) * kTileB + threadIdx.y * kRows;
  const int64_t i0 = int64_t(blockIdx.x) * kTileI + threadIdx.x * kCols;
  bool bad = false;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const bool inside = b0 + r < batch && i0 + c < in;
      const T v = inside ? x[(b0 + r) * in + i0 + c] : hi;
      bad |= !(v == lo || v == hi);
      xv[r][c] = v;
    }
  }
  if (bad) ok[0] = 0;  // the same value from every writer: no atomic needed
}

template <typename T>
__device__ void store_tile(T* __restrict__ d, int64_t batch, int64_t in, const T (&xv)[kRows][kCols], T hi,
                           const T (&sum)[kRows][kCols], bool negate_at_hi) {
  const int64_t b0 = int64_t(blockIdx.y) * kTileB + threadIdx.y * kRows;
  const int64_t i0 = int64_t(blockIdx.x) * kTileI + threadIdx.x * kCols;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (b0 + r < batch && i0 + c < in) {
        const bool at_hi = xv[r][c] == hi;
        d[(b0 + r) * in + i0 + c] = (at_hi == negate_at_hi) ? -sum[r][c] : sum[r][c];
      }
    }
  }
}

// ---- prologues -----------------------------------------------------------------------------

// One block per child j: `rows` table rows of LDI (the padding included) and bound[j] =
// w*max_i|W[j, i]|. kind 0 (Bernoulli): expm1(+c), expm1(-c); kind 1 (entropy): also c*e^c,
// -c*e^-c; c clamped to +-kChunkRange (a wide child's rows are never read).
template <typename T>
__global__ void child_tables_kernel(const T* __restrict__ weight, int64_t in, int64_t ldi, T w, int kind,
                                    T* __restrict__ tables, float* __restrict__ bound) {
  const int64_t j = blockIdx.x;
  const int rows = kind == 0 ? 2 : 4;
  T top = 0;
  for (int64_t i = threadIdx.x; i < ldi; i += blockDim.x) {
    T c = i < in ? w * weight[j * in + i] : T(0);
    top = fmax(top, fabs(c));
    c = fmin(fmax(c, T(-kChunkRange)), T(kChunkRange));
    T* row = tables + j * rows * ldi + i;
    row[0] = expm1(c);
    row[ldi] = expm1(-c);
    if (kind == 1) {
      row[2 * ldi] = c * exp(c);
      row[3 * ldi] = -c * exp(-c);
    }
  }
  __shared__ T part[32];
  for (int offset = 16; offset > 0; offset /= 2) top = fmax(top, __shfl_down_sync(0xffffffffu, top, offset));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = top;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < int(blockDim.x / 32); ++k) top = fmax(top, part[k]);
    bound[j] = float(top);
  }
}

// Per (example, child), written transposed at [j, b] (b < ldb) through a 32 x 32 shared tile.
// kind 0 (Bernoulli): one value, v = sigmoid(-s*l) with the sign of the sample (+ fired).
// kind 1 (entropy): the pair (u = sigmoid(-|l|) with the sign of l, kappa = -|l| sigmoid(|l|)).
template <typename T>
__global__ void child_factors_kernel(const T* __restrict__ logits, const T* __restrict__ y, int64_t batch,
                                     int64_t out, int64_t ldb, int kind, T* __restrict__ factors) {
  __shared__ T first[32][33], second[32][33];
  const int64_t j0 = int64_t(blockIdx.x) * 32, b0 = int64_t(blockIdx.y) * 32;
  for (int k = threadIdx.y; k < 32; k += blockDim.y) {
    const int64_t b = b0 + k, j = j0 + threadIdx.x;
    const bool inside = b < batch && j < out;
    const T l = inside ? logits[b * out + j] : T(0);
    const T t = exp(-fabs(l));
    const T inv = T(1) / (T(1) + t);  // sigmoid(|l|)
    if (kind == 0) {
      const bool fired = inside && y[b * out + j] > T(0);
      const bool agree = fired == (l >= T(0));  // s*l >= 0: v = sigmoid(-|l|), else sigmoid(|l|)
      const T v = agree ? t * inv : inv;
      first[k][threadIdx.x] = fired ? v : -v;
    } else {
      first[k][threadIdx.x] = l > T(0) ? t * inv : -t * inv;
      second[k][threadIdx.x] = -fabs(l) * inv;
    }
  }
  __syncthreads();
  for (int k = threadIdx.y; k < 32; k += blockDim.y) {
    const int64_t j = j0 + k, b = b0 + threadIdx.x;
    if (j < out && b < ldb) {
      if (kind == 0) {
        factors[j * ldb + b] = first[threadIdx.x][k];
      } else {
        factors[(j * ldb + b) * 2] = first[threadIdx.x][k];
        factors[(j * ldb + b) * 2 + 1] = second[threadIdx.x][k];
      }
    }
  }
}

// ---- Bernoulli children --------------------------------------------------------------------

// d[b, i] = sign * sum_j -log(1 + v*(A - 1)), A = exp(-s*W[j, i]*Delta): expm1(+c) where
// "parent at lo" != "child fired", else expm1(-c).
template <typename T>
__global__ void __launch_bounds__(kThreads) bernoulli_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ tables,
    const T* __restrict__ factors, const float* __restrict__ bound, const T* __restrict__ logits,
    const T* __restrict__ y, int64_t batch, int64_t in, int64_t out, int64_t ldi, int64_t ldb, T lo, T hi,
    T w, int* __restrict__ ok, T* __restrict__ d) {
  __shared__ __align__(16) T s_tab[kStage][2][kTileI];
  __shared__ __align__(16) T s_v[kStage][kTileB];
  __shared__ float s_bound[kStage];
  T xv[kRows][kCols];
  load_parents(x, batch, in, lo, hi, ok, xv);
  T q[kRows][kCols] = {}, total[kRows][kCols] = {};
  float spent = 0.f;
  const int tid = threadIdx.y * kThreadsI + threadIdx.x;
  const int64_t b_tile = int64_t(blockIdx.y) * kTileB, i_tile = int64_t(blockIdx.x) * kTileI;
  for (int64_t j0 = 0; j0 < out; j0 += kStage) {
    const int n = out - j0 < kStage ? int(out - j0) : kStage;
    __syncthreads();  // the previous round's rows are read
    for (int e = tid; e < n * 2 * kTileI; e += kThreads) {
      const int jj = e / (2 * kTileI), side = (e / kTileI) % 2, i = e % kTileI;
      s_tab[jj][side][i] = tables[((j0 + jj) * 2 + side) * ldi + i_tile + i];
    }
    for (int e = tid; e < n * kTileB; e += kThreads) {
      s_v[e / kTileB][e % kTileB] = factors[(j0 + e / kTileB) * ldb + b_tile + e % kTileB];
    }
    if (tid < n) s_bound[tid] = bound[j0 + tid];
    __syncthreads();
    for (int jj = 0; jj < n; ++jj) {
      const float r = s_bound[jj];
      if (!(r <= float(kChunkRange))) continue;  // wide (or NaN): the second loop
      if (spent + r > float(kChunkRange)) {
#pragma unroll
        for (int a = 0; a < kRows; ++a)
#pragma unroll
          for (int c = 0; c < kCols; ++c) total[a][c] += log1p(q[a][c]), q[a][c] = 0;
        spent = 0.f;
      }
      spent += r;
      const Vec4<T> plus = load4(&s_tab[jj][0][threadIdx.x * kCols]);
      const Vec4<T> minus = load4(&s_tab[jj][1][threadIdx.x * kCols]);
#pragma unroll
      for (int a = 0; a < kRows; ++a) {
        const T v_signed = s_v[jj][threadIdx.y * kRows + a];
        const bool fired = v_signed > T(0);
        const T v = fabs(v_signed);
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const T a_m1 = ((xv[a][c] != hi) != fired) ? plus.v[c] : minus.v[c];
          q[a][c] = fma(a_m1, fma(v, q[a][c], v), q[a][c]);  // q <- q + (A - 1) v (1 + q)
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < kRows; ++a)
#pragma unroll
    for (int c = 0; c < kCols; ++c) total[a][c] += log1p(q[a][c]);
  // wide children: log r = logaddexp(log u, log v + log A), log A = +-c, per element
  const int64_t b0 = b_tile + threadIdx.y * kRows, i0 = i_tile + threadIdx.x * kCols;
  for (int64_t j = 0; j < out; ++j) {
    if (bound[j] <= float(kChunkRange)) continue;
#pragma unroll
    for (int a = 0; a < kRows; ++a) {
      if (b0 + a >= batch) continue;
      const bool fired = y[(b0 + a) * out + j] > T(0);
      const T sl = fired ? logits[(b0 + a) * out + j] : -logits[(b0 + a) * out + j];
      const T log_u = -softplus(-sl), log_v = -softplus(sl);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (i0 + c >= in) continue;
        const T ww = w * weight[j * in + i0 + c];
        const T other = log_v + (((xv[a][c] != hi) != fired) ? ww : -ww);
        const T top = log_u > other ? log_u : other;
        total[a][c] += top + log1p(exp(-fabs(log_u - other)));
      }
    }
  }
  store_tile(d, batch, in, xv, hi, total, /*negate_at_hi=*/false);  // d = -sign*total: at hi +total
}

// ---- entropy delta -------------------------------------------------------------------------

// d[b, i] = sign * sum_j H(l_j + Delta*W[j, i]) - H(l_j): per term log D - n / D (hnca_cpu.cpp)
template <typename T>
__global__ void __launch_bounds__(kThreads) entropy_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ tables,
    const T* __restrict__ factors, const float* __restrict__ bound, const T* __restrict__ logits, int64_t batch,
    int64_t in, int64_t out, int64_t ldi, int64_t ldb, T lo, T hi, T w, int* __restrict__ ok, T* __restrict__ d) {
  constexpr int kEntropyStage = sizeof(T) == 8 ? kStage / 2 : kStage;  // 48 KiB of static shared memory
  __shared__ __align__(16) T s_tab[kEntropyStage][4][kTileI];
  __shared__ __align__(16) T s_uk[kEntropyStage][kTileB][2];
  __shared__ float s_bound[kEntropyStage];
  T xv[kRows][kCols];
  load_parents(x, batch, in, lo, hi, ok, xv);
  T q[kRows][kCols] = {}, rational[kRows][kCols] = {}, total[kRows][kCols] = {};
  float spent = 0.f;
  const int tid = threadIdx.y * kThreadsI + threadIdx.x;
  const int64_t b_tile = int64_t(blockIdx.y) * kTileB, i_tile = int64_t(blockIdx.x) * kTileI;
  for (int64_t j0 = 0; j0 < out; j0 += kEntropyStage) {
    const int n = out - j0 < kEntropyStage ? int(out - j0) : kEntropyStage;
    __syncthreads();
    for (int e = tid; e < n * 4 * kTileI; e += kThreads) {
      const int jj = e / (4 * kTileI), row = (e / kTileI) % 4, i = e % kTileI;
      s_tab[jj][row][i] = tables[((j0 + jj) * 4 + row) * ldi + i_tile + i];
    }
    for (int e = tid; e < n * kTileB * 2; e += kThreads) {
      const int jj = e / (2 * kTileB), b = (e / 2) % kTileB;
      s_uk[jj][b][e % 2] = factors[((j0 + jj) * ldb + b_tile + b) * 2 + e % 2];
    }
    if (tid < n) s_bound[tid] = bound[j0 + tid];
    __syncthreads();
    for (int jj = 0; jj < n; ++jj) {
      const float r = s_bound[jj];
      if (!(r <= float(kChunkRange))) continue;
      if (spent + r > float(kChunkRange)) {
#pragma unroll
        for (int a = 0; a < kRows; ++a)
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            total[a][c] += log1p(q[a][c]) - rational[a][c];
            q[a][c] = 0, rational[a][c] = 0;
          }
        spent = 0.f;
      }
      spent += r;
      // hi again, but unknown to the compiler before the child (r is finite here): otherwise it
      // hoists the 32 compares x != hi out of the loop, packs them into the bits of a register and
      // spends a LOP3 a term extracting one (359 instead of 342 instructions per child)
      const T hi_here = fma(T(0), T(r), hi);
      const Vec4<T> am1_plus = load4(&s_tab[jj][0][threadIdx.x * kCols]);
      const Vec4<T> am1_minus = load4(&s_tab[jj][1][threadIdx.x * kCols]);
      const Vec4<T> ca_plus = load4(&s_tab[jj][2][threadIdx.x * kCols]);
      const Vec4<T> ca_minus = load4(&s_tab[jj][3][threadIdx.x * kCols]);
#pragma unroll
      for (int a = 0; a < kRows; ++a) {
        const T u_signed = s_uk[jj][threadIdx.y * kRows + a][0], kappa = s_uk[jj][threadIdx.y * kRows + a][1];
        const bool positive = u_signed > T(0);
        const T u = fabs(u_signed);
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          // c~ = -s*W*Delta is +w*W exactly where "parent at lo" != "l > 0"
          const bool plus = (xv[a][c] != hi_here) != positive;
          const T am1 = plus ? am1_plus.v[c] : am1_minus.v[c];  // A - 1
          const T ca = plus ? ca_plus.v[c] : ca_minus.v[c];     // c~ * A
          const T delta = u * am1;
          const T D = T(1) + delta;
          q[a][c] = fma(q[a][c], D, delta);  // (1 + q) D - 1
          rational[a][c] = fma(u * fma(am1, kappa, ca), fast_rcp(D), rational[a][c]);
        }
      }
    }
  }
#pragma unroll
  for (int a = 0; a < kRows; ++a)
#pragma unroll
    for (int c = 0; c < kCols; ++c) total[a][c] += log1p(q[a][c]) - rational[a][c];
  // wide children: the stable per-term form
  const int64_t b0 = b_tile + threadIdx.y * kRows, i0 = i_tile + threadIdx.x * kCols;
  for (int64_t j = 0; j < out; ++j) {
    if (bound[j] <= float(kChunkRange)) continue;
#pragma unroll
    for (int a = 0; a < kRows; ++a) {
      if (b0 + a >= batch) continue;
      const T l = logits[(b0 + a) * out + j], h = entropy(l);
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (i0 + c >= in) continue;
        const T delta = xv[a][c] == hi ? -w : w;
        total[a][c] += entropy(l + delta * weight[j * in + i0 + c]) - h;
      }
    }
  }
  store_tile(d, batch, in, xv, hi, total, /*negate_at_hi=*/true);  // d = sign*total
}

// ---- softmax child -------------------------------------------------------------------------

// One thread per padded column: m+ = max_k c, m- = max_k -c (c = w*W[k, i], 0 in the padding), the
// tables exp(c - m+), exp(-c - m-) [K, 2, ldi] and the rows m+, m-, m+ + m- [3, ldi].
template <typename T>
__global__ void class_tables_kernel(const T* __restrict__ weight, int64_t in, int64_t classes, int64_t ldi, T w,
                                    T* __restrict__ tables, T* __restrict__ top) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= ldi) return;
  T top_p = -INFINITY, top_m = -INFINITY;
  for (int64_t k = 0; k < classes; ++k) {
    const T c = i < in ? w * weight[k * in + i] : T(0);
    top_p = fmax(top_p, c);
    top_m = fmax(top_m, -c);
  }
  for (int64_t k = 0; k < classes; ++k) {
    const T c = i < in ? w * weight[k * in + i] : T(0);
    tables[(k * 2) * ldi + i] = exp(c - top_p);
    tables[(k * 2 + 1) * ldi + i] = exp(-c - top_m);
  }
  top[i] = top_p;
  top[ldi + i] = top_m;
  top[2 * ldi + i] = top_p + top_m;
}

// One warp per padded example: pi and log pi (the softmax of its logits) at [0/1, k, b], and the
// class check (ok[1] cleared where a is outside [0, K)).
template <typename T>
__global__ void class_probabilities_kernel(const T* __restrict__ logits, const int64_t* __restrict__ a,
                                           int64_t batch, int64_t classes, int64_t ldb, int* __restrict__ ok,
                                           T* __restrict__ pi) {
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= ldb) return;
  const bool inside = b < batch;
  if (inside && lane == 0 && (a[b] < 0 || a[b] >= classes)) ok[1] = 0;
  T top = -INFINITY;
  for (int64_t k = lane; k < classes; k += 32) top = fmax(top, inside ? logits[b * classes + k] : T(0));
  for (int offset = 16; offset > 0; offset /= 2) top = fmax(top, __shfl_xor_sync(0xffffffffu, top, offset));
  T sum = 0;
  for (int64_t k = lane; k < classes; k += 32) sum += exp((inside ? logits[b * classes + k] : T(0)) - top);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const T lse = top + log(sum);
  for (int64_t k = lane; k < classes; k += 32) {
    const T log_pi = (inside ? logits[b * classes + k] : T(0)) - lse;
    pi[k * ldb + b] = exp(log_pi);
    pi[(classes + k) * ldb + b] = log_pi;
  }
}

// d = c_a - m+ - log(S+) at lo, c_a + m- + log(S-) at hi, S+- = sum_k pi_k exp(+-c_k - m+-); where
// the block's columns spread too far: d = -sign * logsumexp_k(log pi_k + Delta*(W[k, i] - W[a, i])).
template <typename T>
__global__ void __launch_bounds__(kThreads) categorical_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ tables, const T* __restrict__ top,
    const T* __restrict__ pi, const int64_t* __restrict__ a, int64_t batch, int64_t in, int64_t classes, int64_t ldi,
    int64_t ldb, T lo, T hi, T w, T spread_limit, int* __restrict__ ok, T* __restrict__ d) {
  __shared__ __align__(16) T s_tab[kStage][2][kTileI];
  __shared__ __align__(16) T s_pi[kStage][kTileB];
  T xv[kRows][kCols];
  load_parents(x, batch, in, lo, hi, ok, xv);
  const int tid = threadIdx.y * kThreadsI + threadIdx.x;
  const int64_t b_tile = int64_t(blockIdx.y) * kTileB, i_tile = int64_t(blockIdx.x) * kTileI;
  const int64_t b0 = b_tile + threadIdx.y * kRows, i0 = i_tile + threadIdx.x * kCols;
  T w_a[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t raw = b0 + r < batch ? a[b0 + r] : 0;  // a bad index is reported by the prologue
    const int64_t ar = raw < 0 ? 0 : (raw >= classes ? classes - 1 : raw);
#pragma unroll
    for (int c = 0; c < kCols; ++c) w_a[r][c] = i0 + c < in ? weight[ar * in + i0 + c] : T(0);
  }
  bool wide = false;
#pragma unroll
  for (int c = 0; c < kCols; ++c) wide |= !(top[2 * ldi + i0 + c] <= spread_limit);
  T result[kRows][kCols];
  if (!__syncthreads_or(wide)) {
    T s_plus[kRows][kCols] = {}, s_minus[kRows][kCols] = {};
    for (int64_t k0 = 0; k0 < classes; k0 += kStage) {
      const int n = classes - k0 < kStage ? int(classes - k0) : kStage;
      __syncthreads();
      for (int e = tid; e < n * 2 * kTileI; e += kThreads) {
        const int kk = e / (2 * kTileI), side = (e / kTileI) % 2, i = e % kTileI;
        s_tab[kk][side][i] = tables[((k0 + kk) * 2 + side) * ldi + i_tile + i];
      }
      for (int e = tid; e < n * kTileB; e += kThreads) {
        s_pi[e / kTileB][e % kTileB] = pi[(k0 + e / kTileB) * ldb + b_tile + e % kTileB];
      }
      __syncthreads();
      for (int kk = 0; kk < n; ++kk) {
        const Vec4<T> plus = load4(&s_tab[kk][0][threadIdx.x * kCols]);
        const Vec4<T> minus = load4(&s_tab[kk][1][threadIdx.x * kCols]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const T p = s_pi[kk][threadIdx.y * kRows + r];
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            s_plus[r][c] = fma(p, plus.v[c], s_plus[r][c]);
            s_minus[r][c] = fma(p, minus.v[c], s_minus[r][c]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const T c_a = w * w_a[r][c];
        result[r][c] = xv[r][c] != hi ? c_a - top[i0 + c] - log(s_plus[r][c])
                                      : c_a + top[ldi + i0 + c] + log(s_minus[r][c]);
      }
  } else {
    // online logsumexp (top, rest): one exp a term
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t b = b0 + r < batch ? b0 + r : batch - 1;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int64_t i = i0 + c < in ? i0 + c : in - 1;
        const T delta = xv[r][c] != hi ? w : -w;
        T best = -INFINITY, rest = 0;
        for (int64_t k = 0; k < classes; ++k) {
          const T z = pi[(classes + k) * ldb + b] + delta * (weight[k * in + i] - w_a[r][c]);
          const T e = exp(-fabs(z - best));
          if (z > best) {
            rest = (rest + T(1)) * e;
            best = z;
          } else {
            rest += e;
          }
        }
        const T lse = best + log1p(rest);
        result[r][c] = xv[r][c] != hi ? -lse : lse;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (b0 + r < batch && i0 + c < in) d[(b0 + r) * in + i0 + c] = result[r][c];
}

// ---- launchers -----------------------------------------------------------------------------

// [parents ok, classes ok] per device, cleared by a kernel that finds a bad value and checked by
// at::_assert_async; never reset (a failed device assert ends the process's use of the GPU).
// Leaked on purpose: no destructor runs after the CUDA context is gone.
at::Tensor ok_flags(const at::Device& device) {
  static std::mutex mutex;
  static auto* flags = new std::unordered_map<int, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& t = (*flags)[device.index()];
  if (!t.defined()) t = at::ones({2}, at::TensorOptions().dtype(at::kInt).device(device));
  return t;
}

struct Prepared {
  at::Tensor x, weight, logits, d, ok;
  int64_t batch, in, out, ldi, ldb;
};

Prepared prepare(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in, double lo,
                 double hi) {
  check_inputs(x_in, weight_in, logits_in, lo, hi);
  TORCH_CHECK_VALUE(x_in.is_cuda(), "hnca: the CUDA kernel got tensors that are not on a CUDA device");
  const auto dtype = compute_type(logits_in);
  const auto x = x_in.to(dtype).contiguous();
  Prepared p{x, weight_in.to(dtype).contiguous(), logits_in.to(dtype).contiguous(), new_output(x, dtype),
             ok_flags(x.device()), x.size(0), x.size(1), weight_in.size(0), 0, 0};
  p.ldi = pad_to(p.in, kTileI);
  p.ldb = pad_to(p.batch, kTileB);
  return p;
}

dim3 tile_grid(const Prepared& p) {
  return dim3(static_cast<unsigned>((p.in + kTileI - 1) / kTileI), static_cast<unsigned>((p.batch + kTileB - 1) / kTileB));
}

void assert_parents(const Prepared& p) {
  at::_assert_async(p.ok.select(0, 0), "hnca: x must hold only the parent values (lo or hi)");
}

at::Tensor bernoulli_log_ratio(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                               const at::Tensor& y_in, double lo, double hi, bool check) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  Prepared p = prepare(x_in, weight_in, logits_in, lo, hi);
  check_children(y_in, logits_in);
  if (p.d.numel() == 0) return p.d;
  if (p.out == 0) return p.d.zero_();
  const auto y = y_in.to(p.logits.scalar_type()).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "hnca_bernoulli_log_ratio_cuda", [&] {
    using T = scalar_t;
    auto tables = at::empty({p.out, 2, p.ldi}, p.x.options());
    auto factors = at::empty({p.out, p.ldb}, p.x.options());
    auto bound = at::empty({p.out}, p.x.options().dtype(at::kFloat));
    child_tables_kernel<T><<<static_cast<unsigned>(p.out), 256, 0, stream>>>(
        p.weight.data_ptr<T>(), p.in, p.ldi, T(hi - lo), 0, tables.data_ptr<T>(), bound.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    child_factors_kernel<T><<<dim3(static_cast<unsigned>((p.out + 31) / 32), static_cast<unsigned>(p.ldb / 32)),
                              dim3(32, 8), 0, stream>>>(
        p.logits.data_ptr<T>(), y.data_ptr<T>(), p.batch, p.out, p.ldb, 0, factors.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bernoulli_kernel<T><<<tile_grid(p), dim3(kThreadsI, kThreadsB), 0, stream>>>(
        p.x.data_ptr<T>(), p.weight.data_ptr<T>(), tables.data_ptr<T>(), factors.data_ptr<T>(),
        bound.data_ptr<float>(), p.logits.data_ptr<T>(), y.data_ptr<T>(), p.batch, p.in, p.out, p.ldi, p.ldb,
        T(lo), T(hi), T(hi - lo), p.ok.data_ptr<int>(), p.d.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (check) assert_parents(p);
  return p.d;
}

at::Tensor entropy_delta(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                         double lo, double hi, bool check) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  Prepared p = prepare(x_in, weight_in, logits_in, lo, hi);
  if (p.d.numel() == 0) return p.d;
  if (p.out == 0) return p.d.zero_();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "hnca_entropy_delta_cuda", [&] {
    using T = scalar_t;
    auto tables = at::empty({p.out, 4, p.ldi}, p.x.options());
    auto factors = at::empty({p.out, p.ldb, 2}, p.x.options());
    auto bound = at::empty({p.out}, p.x.options().dtype(at::kFloat));
    child_tables_kernel<T><<<static_cast<unsigned>(p.out), 256, 0, stream>>>(
        p.weight.data_ptr<T>(), p.in, p.ldi, T(hi - lo), 1, tables.data_ptr<T>(), bound.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    child_factors_kernel<T><<<dim3(static_cast<unsigned>((p.out + 31) / 32), static_cast<unsigned>(p.ldb / 32)),
                              dim3(32, 8), 0, stream>>>(
        p.logits.data_ptr<T>(), p.logits.data_ptr<T>(), p.batch, p.out, p.ldb, 1, factors.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    entropy_kernel<T><<<tile_grid(p), dim3(kThreadsI, kThreadsB), 0, stream>>>(
        p.x.data_ptr<T>(), p.weight.data_ptr<T>(), tables.data_ptr<T>(), factors.data_ptr<T>(),
        bound.data_ptr<float>(), p.logits.data_ptr<T>(), p.batch, p.in, p.out, p.ldi, p.ldb, T(lo), T(hi),
        T(hi - lo), p.ok.data_ptr<int>(), p.d.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (check) assert_parents(p);
  return p.d;
}

at::Tensor categorical_log_ratio(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                                 const at::Tensor& a_in, double lo, double hi, bool check) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  Prepared p = prepare(x_in, weight_in, logits_in, lo, hi);
  check_classes(a_in, x_in);
  TORCH_CHECK_VALUE(p.out > 0 || p.batch == 0, "hnca: a must hold class indices in [0, classes)");
  if (p.d.numel() == 0) return p.d;
  const auto a = a_in.to(at::kLong).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "hnca_categorical_log_ratio_cuda", [&] {
    using T = scalar_t;
    auto tables = at::empty({p.out, 2, p.ldi}, p.x.options());
    auto top = at::empty({3, p.ldi}, p.x.options());
    auto pi = at::empty({2, p.out, p.ldb}, p.x.options());
    class_tables_kernel<T><<<static_cast<unsigned>((p.ldi + 127) / 128), 128, 0, stream>>>(
        p.weight.data_ptr<T>(), p.in, p.out, p.ldi, T(hi - lo), tables.data_ptr<T>(), top.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    class_probabilities_kernel<T><<<static_cast<unsigned>((p.ldb + 3) / 4), 128, 0, stream>>>(
        p.logits.data_ptr<T>(), a.data_ptr<int64_t>(), p.batch, p.out, p.ldb, p.ok.data_ptr<int>(), pi.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const T limit = std::is_same_v<T, double> ? T(kSpreadLimitDouble) : T(kSpreadLimitFloat);
    categorical_kernel<T><<<tile_grid(p), dim3(kThreadsI, kThreadsB), 0, stream>>>(
        p.x.data_ptr<T>(), p.weight.data_ptr<T>(), tables.data_ptr<T>(), top.data_ptr<T>(), pi.data_ptr<T>(),
        a.data_ptr<int64_t>(), p.batch, p.in, p.out, p.ldi, p.ldb, T(lo), T(hi), T(hi - lo), limit,
        p.ok.data_ptr<int>(), p.d.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (check) assert_parents(p);
  at::_assert_async(p.ok.select(0, 1), "hnca: a must hold class indices in [0, classes)");
  return p.d;
}

}  // namespace
}  // namespace hnca

TORCH_LIBRARY_IMPL(hnca, CUDA, m) {
  m.impl("bernoulli_log_ratio", &hnca::bernoulli_log_ratio);
  m.impl("categorical_log_ratio", &hnca::categorical_log_ratio);
  m.impl("entropy_delta", &hnca::entropy_delta);
}
