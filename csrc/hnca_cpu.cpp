// CPU kernels of the counterfactual reductions, registered as torch ops hnca::*.
//
// The reference (hnca_kernels/ops/reference.py) evaluates two log-sigmoids per (b, i, j). The
// Bernoulli message here uses docs/math.md, section 1: with v = sigmoid(-s*l) per (example, child) and
// the tables expm1(+w*W), expm1(-w*W) computed once per call, each term is -log(1 + delta) with
// delta = v * (A - 1), A - 1 read from one of the two tables. The factors 1 + delta are multiplied
// as q = prod - 1 (q <- q + delta + q*delta), and one vector log1p(q) per example and parent
// replaces a log per term. Keeping q rather than the product keeps messages near 0 exact to
// relative rounding (saturated children send tiny terms), but its error grows as 1/prod; so the
// children are cut into chunks, each ending before the summed bounds of its factors' |log| would
// pass kChunkRange, and at each chunk's end chunk_log moves the product's power of two into the
// sum of logs (float32 with AVX2 or AVX-512; elsewhere all of log1p(q), leaving q = 0), which
// leaves it in [sqrt(1/2), sqrt(2)): every partial product lies in [e^-4 / sqrt(2), sqrt(2) e^64].
// The bound of a factor is w*max_i|W[j, i]|. Where those bounds cut the chunks short (a trained
// model's weights), the messages first score each child
// unlikely under the actual parents as if it had the other outcome (u + v*A = A*(v + u/A): the
// other outcome's factor times A, whose log is linear in W and added by one matrix product), so
// that v <= 1/2 and no factor is below 1/2; then the bounds of a factor's fall (2v(1 - e^-r),
// summed to at most kChunkRange) and rise (v*expm1(r), to at most kGrowthRange: a large product
// only must not overflow) cut each pair (Bernoulli) or vector (categorical) of examples' chunks,
// and a trained model's confident children, right or wrong, share long chunks. A child whose
// bounds alone pass a range ("wide") is summed per term in the log domain: -logaddexp(log u,
// log v + log A), exact for any weight.
//
// Layout: the tables are stored block by block, [block of parents][child][record][parent] with a
// record of rows +, xor and -, so a block's rows are contiguous (rows of a power-of-two stride
// fell into a few cache sets: about 2x slower at in = 1024). A task is one block of parents x 32
// examples; it walks tiles of at most kMaxChunk children (24 KiB of tables, held in L1), and for
// each tile every pair of examples runs the loop over the tile's children with its 2 x 4
// accumulators in registers.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include "hnca_common.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

namespace hnca {
namespace {

using at::vec::Vectorized;

// The register tile (examples x vectors of parents; the tables' blocks are kVecs vectors wide).
// HNCA_ROWS / HNCA_VECS override it for a build (benchmarks/kernel_variants.py times variants
// against each other: on AVX2 and AVX-512 alike, 2 x 4 measured as fast as any smaller tile).
#ifndef HNCA_ROWS
#define HNCA_ROWS 2
#endif
#ifndef HNCA_VECS
#define HNCA_VECS 4
#endif
constexpr int kRows = HNCA_ROWS;
constexpr int kVecs = HNCA_VECS;
// Bernoulli: examples per task sharing each chunk's tables in L1, and the longest chunk: 32
// children with AVX-512 (3 rows x 4 vectors each, 24 KiB in float32; 64, 48 KiB, measured slower),
// 64 with AVX2 (3 rows x 4 vectors of 8, 24 KiB of a 32 KiB L1; 32 measured 1.01x slower), where
// the chunks' ends weigh more at 32 (benchmarks/RESULTS.md).
// HNCA_MAX_CHUNK overrides it for a build.
constexpr int64_t kRowsPerTask = 32;
#ifndef HNCA_MAX_CHUNK
#ifdef CPU_CAPABILITY_AVX512
#define HNCA_MAX_CHUNK 32
#else
#define HNCA_MAX_CHUNK 64
#endif
#endif
constexpr int64_t kMaxChunk = HNCA_MAX_CHUNK;
// A chunk's product may grow to e^kGrowthRange (float32 overflows past e^88; see log1p_inline).
constexpr double kGrowthRange = 64.0;
static_assert(kRowsPerTask % kRows == 0, "a task's pairs of rows must be the pairs that share a plan of chunks");
// The values of one of a task's sums: [row][vector][lane] (message_task).
template <typename T>
constexpr int64_t task_values = kRowsPerTask * kVecs * Vectorized<T>::size();

// Work below this many counterfactual terms (~0.4 ms on one core) runs on the calling thread.
// NOTE: on the shared 2-core machine a parallel region waits whenever the other core is busy;
// at the paper's shape (2M terms a message) that made a training step 5x slower under load.
constexpr int64_t kTermsPerThread = int64_t(1) << 22;

// Elementwise maps (a few transcendentals per element) split into tasks of this many elements;
// below it they run on the calling thread (see kTermsPerThread).
constexpr int64_t kElementsPerTask = int64_t(1) << 16;

// out[n] = f(a[n], b[n]) over n elements, in parallel tasks of kElementsPerTask.
template <typename T, typename F>
void parallel_map2(F f, T* out, const T* a, const T* b, int64_t n) {
  at::parallel_for(0, n, kElementsPerTask, [&](int64_t begin, int64_t end) {
    at::vec::map2(f, out + begin, a + begin, b + begin, end - begin);
  });
}

// Parallel loop over tiles (block of parents, group of examples), block-major so that a thread
// keeps one block of the tables in L2 while it walks the examples; `terms` is one tile's work.
template <typename F>
void for_each_tile(int64_t batch, int64_t in, int64_t block, int64_t rows_per_tile, int64_t terms, F tile) {
  const int64_t blocks = (in + block - 1) / block;
  const int64_t groups = (batch + rows_per_tile - 1) / rows_per_tile;
  const int64_t grain = std::max<int64_t>(1, kTermsPerThread / std::max<int64_t>(1, terms));
  at::parallel_for(0, blocks * groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = (t % groups) * rows_per_tile;
      tile(b0, std::min<int64_t>(rows_per_tile, batch - b0), (t / groups) * block);
    }
  });
}

// The messages are defined for binary parents: every x must be lo or hi. Checked here, in one
// pass over x, rather than in Python (the ops read x anyway); a bad value raises ValueError.
// NOTE: the Python check ((x == lo) | (x == hi)).all() took ~0.14 ms per call at B=50, in=200,
// a quarter of the message itself (1 thread).
template <typename T>
void check_parent_values(const at::Tensor& x, double lo, double hi) {
  const T* p = x.data_ptr<T>();
  const T l = T(lo), h = T(hi);
  int64_t others = 0;  // a count, not a bool with early exit, so that the loop vectorises
  for (int64_t i = 0, n = x.numel(); i < n; ++i) others += (p[i] != l) & (p[i] != h);
  TORCH_CHECK_VALUE(others == 0, "hnca: x must hold only the parent values lo and hi (a layer of stochastic units); "
                    "counterfactual messages are defined for binary parents");
}

// A message op's inputs in its compute type (float32, or float64), contiguous, and its output
// d [B, in]; the parents checked where there is anything to compute.
struct MessageInputs {
  at::Tensor x, weight, logits, d;
  int64_t batch, in, out;
};

MessageInputs prepare_message(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                              double lo, double hi, bool check) {
  check_inputs(x_in, weight_in, logits_in, lo, hi);
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "hnca: the CPU kernel got tensors that are not on the CPU");
  const auto dtype = compute_type(logits_in);
  const auto x = x_in.to(dtype).contiguous();
  MessageInputs m{x, weight_in.to(dtype).contiguous(), logits_in.to(dtype).contiguous(), new_output(x, dtype),
                  x.size(0), x.size(1), weight_in.size(0)};
  if (check && m.d.numel() > 0) {  // check=false: the caller knows (hnca_kernels.checks("off"))
    AT_DISPATCH_FLOATING_TYPES(dtype, "hnca_check_parent_values", [&] { check_parent_values<scalar_t>(x, lo, hi); });
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Bernoulli children.

struct Chunk {
  int64_t end;  // children [previous end, end)
  bool wide;    // a single child summed in the log domain
};

// The bound r_j = w*max_i|W[j, i]| of each child's factors: |log factor| <= r_j (NaN for a row
// holding NaN: maximum propagates it).
// NOTE: one vector pass over the (contiguous) weight; abs/amax/mul/to as ATen ops cost ~40 us
// a call at 200x200, a tenth of the message.
template <typename T>
std::vector<double> child_bounds(const at::Tensor& weight, double w) {
  using Vec = Vectorized<T>;
  const int64_t out = weight.size(0), in = weight.size(1);
  const T* wp = weight.data_ptr<T>();
  std::vector<double> r(out);
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, in));
  at::parallel_for(0, out, rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {  // maximum propagates NaN: a NaN row is wide
      const auto abs = [](Vec x) { return x.abs(); };
      const auto max = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
      r[j] = w * double(at::vec::map_reduce_all<T>(abs, max, wp + j * in, in));
    }
  });
  return r;
}

// Cut the children into chunks by bounds of their factors' logs: `down` of -log factor, `up` of
// log factor (child_bounds for both, or tighter). A chunk's down bounds sum to at most kChunkRange
// (q = product - 1 loses 1/product ulp: a product must not get small) and its up bounds to at most
// kGrowthRange (a large product only must not overflow); a child past either (or NaN) is a chunk
// of its own, wide, and no chunk crosses a multiple of kMaxChunk (the tiles of message_task).
template <typename B>
std::vector<Chunk> plan_chunks(const std::vector<B>& down, const std::vector<B>& up) {
  const int64_t out = static_cast<int64_t>(down.size());
  std::vector<Chunk> chunks;
  int64_t begin = 0;  // the open chunk of narrow children is [begin, j)
  double used_down = 0.0, used_up = 0.0;
  auto close = [&](int64_t j) {
    if (j > begin) chunks.push_back({j, false});
    begin = j;
    used_down = used_up = 0.0;
  };
  for (int64_t j = 0; j < out; ++j) {
    if (!(down[j] <= kChunkRange && up[j] <= kGrowthRange)) {  // wide (or NaN): alone, in the log domain
      close(j);
      chunks.push_back({j + 1, true});
      begin = j + 1;
    } else {
      if (used_down + down[j] > kChunkRange || used_up + up[j] > kGrowthRange || j % kMaxChunk == 0) close(j);
      used_down += down[j];
      used_up += up[j];
    }
  }
  close(out);
  return chunks;
}

// By the weights' bounds r_j alone (|log factor| <= r_j either way).
template <typename B>
std::vector<Chunk> plan_chunks(const std::vector<B>& r) {
  return plan_chunks(r, r);
}

// expm1(x) for x >= 0 (or NaN): the tables' one transcendental per weight.
template <typename T>
Vectorized<T> expm1_nonnegative(const Vectorized<T>& x) {
  return x.expm1();
}

// log1p(q) for q in (-1, 2^126] (or NaN): the products' logs (a chunk's end or, with chunk_log's
// exponents taken out, a row's end: q in [e^-4 / sqrt(2) - 1, sqrt(2) e^64 - 1]), and
// log1p(e^-|z|) in the log-domain paths.
template <typename T>
Vectorized<T> log1p_inline(const Vectorized<T>& q) {
  return q.log1p();
}

// A chunk's end: takes part of log(1 + q) out of the product q (= product - 1) and returns it,
// leaving 1 + q within [sqrt(1/2), sqrt(2)), where the next chunk's products lose at most sqrt(2)
// times what a fresh chunk's lose to q's rounding (see kChunkRange); the rest of the log is taken
// at the row's end. Here all of it (q = 0 after); float32 with AVX2 or AVX-512 takes only the
// exponent (below).
template <typename T>
Vectorized<T> chunk_log(Vectorized<T>& q) {
  const Vectorized<T> log = log1p_inline(q);
  q = Vectorized<T>(T(0));
  return log;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float32, inline and without a division, so that the compiler interleaves a row's 8 logs:
// u = fl(1 + q) = 2^k * m with m in [sqrt(1/2), sqrt(2)), and e = q - (u - 1) the rounding of u
// (exact: Sterbenz for u in [1/2, 2], and 1 a multiple of u's ulp above). Then
// log1p(q) = k*ln2 + log1p(f) with f = m - 1 + e*2^-k, log1p(f) = f - f^2/2 + f^3*P(f) with
// Cephes' logf polynomial P (about 1 ulp on that range). q tiny gives k = 0, f = q: exact
// to relative rounding, as the messages near 0 need. Only for the range above: q = -1 gives
// -88 (not -inf), and 1 + q >= 2^127 overflows 2^-k.
// NOTE: not Sleef's logf with Goldberg's q / (u - 1): a call per vector (the accumulators
// spilled around it) and a division, where this is ~20 FMA-port instructions the compiler
// schedules with the loop (the A/B is in benchmarks/RESULTS.md, kernel variants); nor Sleef's
// log1pf, as slow as its expm1f with AVX-512 on AMD Zen 5 (see expm1_nonnegative).
#if defined(CPU_CAPABILITY_AVX512)
using IntReg = __m512i;
inline IntReg bits_of(__m512 x) { return _mm512_castps_si512(x); }
inline __m512 float_of(IntReg x) { return _mm512_castsi512_ps(x); }
inline IntReg int_sub(IntReg a, IntReg b) { return _mm512_sub_epi32(a, b); }
inline __m512 int_to_float(IntReg a) { return _mm512_cvtepi32_ps(a); }
inline IntReg float_to_int(__m512 a) { return _mm512_cvtps_epi32(a); }
inline IntReg int_add(IntReg a, IntReg b) { return _mm512_add_epi32(a, b); }
inline IntReg int_splat(int a) { return _mm512_set1_epi32(a); }
inline IntReg int_and(IntReg a, IntReg b) { return _mm512_and_si512(a, b); }
inline IntReg int_or(IntReg a, IntReg b) { return _mm512_or_si512(a, b); }
inline IntReg int_xor(IntReg a, IntReg b) { return _mm512_xor_si512(a, b); }
template <int k> IntReg shift_left(IntReg a) { return _mm512_slli_epi32(a, k); }
template <int k> IntReg shift_right(IntReg a) { return _mm512_srli_epi32(a, k); }
template <int k> IntReg shift_right_signed(IntReg a) { return _mm512_srai_epi32(a, k); }
inline IntReg words_load(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void words_store(uint32_t* p, IntReg v) { _mm512_storeu_si512(p, v); }
#else
using IntReg = __m256i;
inline IntReg bits_of(__m256 x) { return _mm256_castps_si256(x); }
inline __m256 float_of(IntReg x) { return _mm256_castsi256_ps(x); }
inline IntReg int_sub(IntReg a, IntReg b) { return _mm256_sub_epi32(a, b); }
inline __m256 int_to_float(IntReg a) { return _mm256_cvtepi32_ps(a); }
inline IntReg float_to_int(__m256 a) { return _mm256_cvtps_epi32(a); }
inline IntReg int_add(IntReg a, IntReg b) { return _mm256_add_epi32(a, b); }
inline IntReg int_splat(int a) { return _mm256_set1_epi32(a); }
inline IntReg int_and(IntReg a, IntReg b) { return _mm256_and_si256(a, b); }
inline IntReg int_or(IntReg a, IntReg b) { return _mm256_or_si256(a, b); }
inline IntReg int_xor(IntReg a, IntReg b) { return _mm256_xor_si256(a, b); }
template <int k> IntReg shift_left(IntReg a) { return _mm256_slli_epi32(a, k); }
template <int k> IntReg shift_right(IntReg a) { return _mm256_srli_epi32(a, k); }
template <int k> IntReg shift_right_signed(IntReg a) { return _mm256_srai_epi32(a, k); }
inline IntReg words_load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void words_store(uint32_t* p, IntReg v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
#endif
// a float's exponent field, bits 23 and up (arithmetic: a difference of floats' bits keeps its
// sign), and back
inline IntReg exponent_field(IntReg a) { return shift_right_signed<23>(a); }
inline IntReg to_exponent_field(IntReg a) { return shift_left<23>(a); }

// 1 + q = 2^k (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)): (f, k), f to q's relative rounding
// where k = 0 (then f = q exactly)
struct Exponent {
  Vectorized<float> f, k;
};

inline Exponent split_exponent(const Vectorized<float>& q) {
  using Vec = Vectorized<float>;
  const Vec one(1.f);
  const Vec u = one + q;
  const Vec e = q - (u - one);
  // k = floor(log2(u / sqrt(1/2))): the exponent after moving m's range to [sqrt(1/2), sqrt(2))
  const IntReg k = exponent_field(int_sub(bits_of(u), bits_of(Vec(0.70710678f))));
  const IntReg k_field = to_exponent_field(k);
  const Vec m(float_of(int_sub(bits_of(u), k_field)));
  const Vec two_to_minus_k(float_of(int_sub(bits_of(one), k_field)));
  return {at::vec::fmadd(e, two_to_minus_k, m - one), Vec(int_to_float(k))};
}

// k*ln2 in two parts (ln2_hi has 9 significant bits, so k*ln2_hi is exact for |k| < 2^15), plus x
inline Vectorized<float> k_ln2_plus(const Vectorized<float>& kf, const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
  return at::vec::fmadd(kf, Vec(0.693359375f), at::vec::fmadd(kf, Vec(-2.12194440e-4f), x));
}

// the exponent's part of the log alone: 13 instructions where log1p_inline takes about 30, and
// 1 + q in [sqrt(1/2), sqrt(2)) after
template <>
inline Vectorized<float> chunk_log(Vectorized<float>& q) {
  const Exponent split = split_exponent(q);
  q = split.f;
  return k_ln2_plus(split.k, Vectorized<float>(0.f));
}

template <>
inline Vectorized<float> log1p_inline(const Vectorized<float>& q) {
  using Vec = Vectorized<float>;
  const Exponent split = split_exponent(q);
  const Vec f = split.f;
  const Vec z = f * f;
  Vec p(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    p = at::vec::fmadd(p, f, Vec(c));
  }
  return k_ln2_plus(split.k, f + at::vec::fmadd(Vec(-0.5f), z, f * z * p));
}

// float32, inline: x = k*ln2 + r with k = round(x / ln2) (at most 127) and |r| <= ln2/2 (up to
// 0.97 for x in [88.4, 89], where 2^k stops at 2^127), expm1(r) by its Taylor series to r^11
// (truncated below 1e-9 relative for |r| <= 1), and expm1(x) = 2^k * expm1(r) + (2^k - 1), which
// overflows to inf past log(FLT_MAX). x small gives k = 0 and the series itself: exact to relative
// rounding.
// NOTE: not Sleef's expm1f (at::vec's): with AVX-512 on AMD Zen 5 it runs an order of magnitude
// slower than its expf, and the message tables cost as much as the messages (benchmarks/RESULTS.md,
// "Zen 5").
template <>
inline Vectorized<float> expm1_nonnegative(const Vectorized<float>& x_in) {
  using Vec = Vectorized<float>;
  const Vec x = at::vec::minimum(x_in, Vec(89.f));
  const Vec kf = at::vec::minimum((x * Vec(1.44269504f)).round(), Vec(127.f));
  const Vec r = at::vec::fmadd(kf, Vec(2.12194440e-4f), at::vec::fmadd(kf, Vec(-0.693359375f), x));
  // expm1(r) = r + r^2 * S(r), S = sum of r^n / (n + 2)! for n < 10, by Estrin's scheme (pairs of
  // terms, then powers r^2, r^4, r^8): 4 dependent steps where Horner's takes 10
  const auto pair = [&](float a, float b) { return at::vec::fmadd(r, Vec(b), Vec(a)); };
  const Vec r2 = r * r, r4 = r2 * r2;
  const Vec low = at::vec::fmadd(r2, pair(1.f / 24, 1.f / 120), pair(1.f / 2, 1.f / 6));
  const Vec mid = at::vec::fmadd(r2, pair(1.f / 40320, 1.f / 362880), pair(1.f / 720, 1.f / 5040));
  const Vec high = pair(1.f / 3628800, 1.f / 39916800);
  const Vec series = at::vec::fmadd(r4, at::vec::fmadd(r4, high, mid), low);
  const Vec expm1_r = at::vec::fmadd(r2, series, r);
  const Vec two_to_k(float_of(to_exponent_field(int_add(float_to_int(kf), int_splat(127)))));
  return at::vec::fmadd(two_to_k, expm1_r, two_to_k - Vec(1.f));
}
#endif

// log sigmoid(z) = min(z, 0) - log1p(e^-|z|), for any z.
template <typename T>
Vectorized<T> log_sigmoid(const Vectorized<T>& z) {
  return at::vec::minimum(z, Vectorized<T>(T(0))) - log1p_inline(z.abs().neg().exp());
}

// expm1(+c) and expm1(-c) by one expm1: with e = expm1(|c|), expm1(-|c|) = -e / (1 + e) (-1 where
// e overflows).
template <typename T>
struct Expm1Pair {
  Vectorized<T> plus, minus;
};

template <typename T>
inline Expm1Pair<T> expm1_pair(const Vectorized<T>& c) {
  using Vec = Vectorized<T>;
  const Vec e = expm1_nonnegative(c.abs());
  const Vec e_inv = Vec::blendv(e.neg() / (Vec(T(1)) + e), Vec(T(-1)), e == Vec(std::numeric_limits<T>::infinity()));
  const Vec negative = c < Vec(T(0));
  return {Vec::blendv(e, e_inv, negative), Vec::blendv(e_inv, e, negative)};
}

// plus[n] = expm1(c[n]) and minus[n] = expm1(-c[n]) for n values.
template <typename T>
void expm1_both(const T* c, int64_t n, T* plus, T* minus) {
  using Vec = Vectorized<T>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const Expm1Pair<T> e = expm1_pair(Vec::loadu(c + i, count));
    e.plus.store(plus + i, count);
    e.minus.store(minus + i, count);
  }
}

// The tables [2, blocks, out, kRecord, block]: for each child and block of parents, expm1(+c), the
// bits of expm1(+c) xor those of expm1(-c), and expm1(-c), then (a second table of the same
// layout, table_size(...) further) +c, the bits of c xor -c, and -c, with
// c = w*W[j, i]; 0 past the last parent (a factor of 1, a term of 0). A narrow chunk reads the
// expm1 rows, a wide child and the entropy's rational term the c rows; without `with_c` (a
// Bernoulli message without wide children) the second table is left out. The xor row picks a
// lane's row by bitwise operations (see pick), which any vector port runs: a blend shares the
// FMA ports with the message's two multiply-adds.
// NOTE: a record of two rows (+ and xor, the + row's bits picked per lane by three bitwise
// operations, `plus ^ (xor & (is_hi ^ positive))`) keeps an AVX2 tile of 64 children in 16 KiB,
// but the third operation shares the vector ports with the loop's multiply-adds: three rows
// measured 0.97-0.98x its time with AVX2 on AMD Zen 4 (benchmarks/RESULTS.md).
// NOTE: with the c rows beside the expm1 rows (a 1 KiB record per child) the Bernoulli message
// at B=256, in = out = 1024 measured 8% slower (1 thread, interleaved with this layout).
constexpr int64_t kRecord = 3;  // blocks of a child's record: +, xor, -
inline int64_t table_size(int64_t in, int64_t out, int64_t block) {
  return (in + block - 1) / block * out * kRecord * block;
}

template <typename T>
at::Tensor message_tables(const at::Tensor& weight, T w, bool with_c) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  constexpr int64_t block = kVecs * L;
  const int64_t out = weight.size(0), in = weight.size(1), blocks = (in + block - 1) / block;
  auto tables = at::empty({with_c ? 2 : 1, blocks, out, kRecord, block}, weight.options());
  const T* const wp = weight.data_ptr<T>();
  T* const tp = tables.data_ptr<T>();
  const int64_t c_rows = table_size(in, out, block);
  // NOTE: the loop takes its sizes by value and walks a block's vectors in a fixed-count inner
  // loop, so that no size is re-read after a store (the stores may alias a capture by reference)
  // and no index is divided by the block: otherwise each vector's expm1 waits on the one before
  // (0.93x the message at B = 2, 200 x 200, AVX2; benchmarks/RESULTS.md).
  at::parallel_for(0, out, std::max<int64_t>(1, kTermsPerThread / 16 / (blocks * block)),
                   [wp, tp, w, with_c, in, out, blocks, c_rows](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t b = 0; b < blocks; ++b) {
        T* const dst = tp + (b * out + j) * kRecord * block;
        const int64_t i0 = b * block;
        for (int k = 0; k < kVecs; ++k) {
          T* const at = dst + k * L;
          // lanes past the last parent load 0: every row is 0 there
          const Vec c = Vec::loadu(wp + j * in + i0 + k * L, std::clamp<int64_t>(in - i0 - k * L, 0, L)) * Vec(w);
          const Expm1Pair<T> e = expm1_pair(c);
          e.plus.store(at);
          (e.plus ^ e.minus).store(at + block);
          e.minus.store(at + 2 * block);
          if (with_c) {
            c.store(at + c_rows);
            (c ^ c.neg()).store(at + c_rows + block);
            c.neg().store(at + c_rows + 2 * block);
          }
        }
      }
    }
  });
  return tables;
}

// A lane's or scalar's bits as a signed integer.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// All bits set where `b`, else 0 (a mask, as a value of T).
template <typename T>
T mask_of(bool b) {
  return c10::bit_cast<T>(Bits<T>(-Bits<T>(b)));
}

// Child j's expm1 rows in one block of the tables for a term of sign s (s = +1 where the
// Bernoulli child fired, or where the entropy's child logit is positive): A - 1 = expm1(c~) with
// c~ = -s*Delta*W[j, i], Delta = +w from lo and -w from hi; c~ itself is table_size(...)
// further; `positive` is mask_of(s = +1). The sign picks the row of parents at lo by its address
// (the - row where s = +1, else the + row: arithmetic, not a branch, as s is random), and a lane
// at hi reads the other row as that row's bits xor the xor row's: two bitwise operations a lane.
template <typename T>
struct ChildRows {
  const T* at_lo;
  const T* flip;

  // the row's vector at `offset` for parents at hi where `is_hi`, at lo elsewhere
  Vectorized<T> pick(int64_t offset, const Vectorized<T>& is_hi) const {
    return Vectorized<T>::loadu(at_lo + offset) ^ (Vectorized<T>::loadu(flip + offset) & is_hi);
  }
};

template <typename T>
ChildRows<T> child_rows(const T* block_tables, int64_t j, T positive, int64_t block) {
  const T* row = block_tables + j * kRecord * block;
  return {row + (c10::bit_cast<Bits<T>>(positive) & (2 * block)), row + block};
}

// The per-(example, child) values of a message's loop (Bernoulli: v and the outcome as a mask;
// entropy: u, kappa and the sign as a mask), stored by pairs of rows: value n of row b for child
// j at pair_offset(b, out, values) + (values * j + n) * kRows. A pair reads one cache line per few
// children, where rows of a power-of-two length (out = 1024) put every row's value for child j in
// one L1 set (4 KiB apart), evicting the tables held there. The pairs are a further 1 KiB apart:
// with out = 1024 every pair's values for a tile fell into the same quarter of the L1 sets (pairs
// 16 KiB apart), and the tile's tables held there were evicted pair by pair (0.96x with the pad
// at B=256, 1024 x 1024; benchmarks/RESULTS.md).
template <typename T>
int64_t pair_stride(int64_t out, int64_t values) {
  return values * out * kRows + 1024 / int64_t(sizeof(T));
}
template <typename T>
int64_t pair_offset(int64_t b, int64_t out, int64_t values) {
  return b / kRows * pair_stride<T>(out, values) + b % kRows;
}

// Stores row b's VALUES values per child, value(n, j) for value n of child j, at their places.
template <int VALUES, typename T, typename F>
void store_by_pairs(T* by_pairs, int64_t b, int64_t out, F value) {
  T* at = by_pairs + pair_offset<T>(b, out, VALUES);
  for (int64_t j = 0; j < out; ++j, at += VALUES * kRows) {
    for (int n = 0; n < VALUES; ++n) at[n * kRows] = value(n, j);
  }
}

template <typename T>
struct BernoulliArgs {
  static constexpr int kLogSign = -1;  // the change is minus the log of the factors' product
  static constexpr int kParts = 1;     // message_task's sums: the change
  const T* x;          // [B, in]
  const T* tables;     // [2, blocks, out, kRecord, block] (message_tables)
  int64_t c_rows;      // offset of the c rows: table_size(in, out, block)
  const T* y;          // [B, out] child j fired where y > 0 (s = +1, else -1) (wide children only)
  const T* by_pairs;   // sigmoid(-s*l) and mask_of(s = +1), by pairs of rows (pair_offset)
  const T* log_u;      // [B, out] log sigmoid(s*l) (wide children only)
  const T* log_v;      // [B, out] log sigmoid(-s*l) (wide children only)
  const std::vector<Chunk>* plans;  // example b's chunks: plans[b / examples_per_plan]
  int64_t examples_per_plan, in, out;
  T hi;
  T* d;                // [B, in]
};

// Bounds of the log of a factor 1 + v*(A - 1), A in [e^-r, e^r], for v in [0, 1/2] (every child
// once the unlikely ones are scored by their other outcome): growth, log <= min(r, v*expm1(r))
// (log(1 + x) <= x); shrink, -log <= 2v(1 - e^-r) (-log(1 - x) <= x / (1 - x) <= 2x for
// x = v(1 - A) <= 1/2), at most r. A confident child (v small) multiplies every parent's product by
// nearly 1 whatever its weights, and no factor is below 1/2, so the products of a trained model's
// children, whose weights pass kChunkRange, still run in long chunks. NaN (from r or v) gives NaN:
// wide.
template <typename T>
struct FactorBounds {
  std::vector<T> r, expm1_r, shrink_r;  // per child: r_j, expm1(r_j), 1 - e^-r_j

  explicit FactorBounds(std::vector<T> bounds) : r(std::move(bounds)) {
    for (const T b : r) {
      expm1_r.push_back(std::expm1(b));
      shrink_r.push_back(-std::expm1(-b));
    }
  }
  // children [j, j + count) of one example (the lanes are children)
  Vectorized<T> growth(const Vectorized<T>& v, int64_t j, int64_t count) const {
    return growth_bound(v, Vectorized<T>::loadu(r.data() + j, count), Vectorized<T>::loadu(expm1_r.data() + j, count));
  }
  Vectorized<T> shrink(const Vectorized<T>& v, int64_t j, int64_t count) const {
    return shrink_bound(v, Vectorized<T>::loadu(shrink_r.data() + j, count));
  }
  // child j of a vector of examples (the lanes are examples)
  Vectorized<T> growth_of(const Vectorized<T>& v, int64_t j) const {
    return growth_bound(v, Vectorized<T>(r[j]), Vectorized<T>(expm1_r[j]));
  }
  Vectorized<T> shrink_of(const Vectorized<T>& v, int64_t j) const {
    return shrink_bound(v, Vectorized<T>(shrink_r[j]));
  }

 private:
  static Vectorized<T> growth_bound(const Vectorized<T>& v, const Vectorized<T>& r, const Vectorized<T>& expm1_r) {
    const Vectorized<T> bound = v * expm1_r;
    return Vectorized<T>::blendv(r, bound, bound < r);
  }
  static Vectorized<T> shrink_bound(const Vectorized<T>& v, const Vectorized<T>& shrink_r) {
    return Vectorized<T>(T(2)) * v * shrink_r;
  }
};

// Whether the chunks by the weights' bounds alone are cut short (a wide child, or more than two
// chunks every 32 children: a trained model's weights), so that chunks by each example's bounds,
// after scoring the unlikely children by their other outcome, pay for their planning. (Initial
// weights of 200 parents give chunks of about 28 children, not cut short.)
inline bool cut_short(const std::vector<Chunk>& by_weights, int64_t out) {
  return std::any_of(by_weights.begin(), by_weights.end(), [](const Chunk& c) { return c.wide; }) ||
         static_cast<int64_t>(by_weights.size()) > 2 * ((out + 31) / 32);
}

// v = sigma(-s*z) of a child with logit z (or base) and outcome s (+1 where `fired`, a mask).
template <typename T>
Vectorized<T> other_outcome(const Vectorized<T>& z, const Vectorized<T>& fired) {
  return (Vectorized<T>(T(1)) + Vectorized<T>::blendv(z.neg(), z, fired).exp()).reciprocal();
}

// A child scored by its likelier outcome: where s*z < 0 (unlikely), u + v*A = A*(v + u/A), so its
// term is the other outcome's plus log A = -s*(change of z), linear in W (the caller adds it by
// one matrix product of `flip` with W). v = sigma(-|z|) <= 1/2 either way.
template <typename T>
struct Likelier {
  Vectorized<T> v;      // sigma(-|z|)
  Vectorized<T> fired;  // the outcome scored: 1 where it fired, else 0
  Vectorized<T> flip;   // s where flipped, else 0
};

template <typename T>
Likelier<T> likelier(const Vectorized<T>& z, const Vectorized<T>& fired) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1));
  const Vec s = Vec::blendv(one.neg(), one, fired);
  const Vec flipped = s * z < zero;
  const Vec actual = Vec::blendv(zero, one, fired);
  return {(one + z.abs().exp()).reciprocal(), Vec::blendv(actual, one - actual, flipped), Vec::blendv(zero, s, flipped)};
}

// ROWS x NV vectors at `at`, [row][vector][lane] (the layout of message_task's arrays)
template <typename T, int ROWS, int NV>
void load_rows(Vectorized<T> (&acc)[ROWS][NV], const T* at) {
  for (int r = 0; r < ROWS; ++r) {
    for (int k = 0; k < NV; ++k) acc[r][k] = Vectorized<T>::loadu(at + (r * kVecs + k) * Vectorized<T>::size());
  }
}

// A narrow chunk's end: each product in `acc` (as q, loaded by load_rows at the chunk's start)
// goes back to `product` less what chunk_log takes out of its log, and `acc` holds what it took.
template <typename T, int ROWS, int NV>
void end_chunk(Vectorized<T> (&acc)[ROWS][NV], T* product) {
  for (int r = 0; r < ROWS; ++r) {
    for (int k = 0; k < NV; ++k) {
      Vectorized<T> q = acc[r][k];
      acc[r][k] = chunk_log(q);
      q.store(product + (r * kVecs + k) * Vectorized<T>::size());
    }
  }
}

// Adds, for ROWS examples from b0 and NV vectors of parents from i0, each flip's change of the
// log-likelihood of one chunk of children into `change` and `product` (the rows' factors so far,
// as q, less what chunk_log took into `change`); `hi_masks` holds where the rows' parents are at
// hi (all three [row][vector][lane], as in message_task). NV < kVecs only in the last block of
// parents, where the vectors past `in` would be all padding.
template <typename T, int ROWS, int NV>
void message_chunk(const BernoulliArgs<T>& p, int64_t b0, int64_t i0, int64_t j0, const Chunk& chunk, const T* hi_masks,
                   T* change, T* product) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  constexpr int64_t block = kVecs * L;
  Vec is_hi[ROWS][NV], sum[ROWS][NV];
  load_rows(is_hi, hi_masks);
  const T* tables = p.tables + (i0 / block) * p.out * kRecord * block;
  if (chunk.wide) {
    // log(u + v*A) = logaddexp(log u, log v + log A), log A = c~
    for (int r = 0; r < ROWS; ++r) {
      const int64_t bj = (b0 + r) * p.out + j0;
      const ChildRows<T> rows = child_rows(tables, j0, mask_of<T>(p.y[bj] > 0), block);
      const Vec lu(p.log_u[bj]), lv(p.log_v[bj]);
      for (int k = 0; k < NV; ++k) {
        const Vec log_a = rows.pick(p.c_rows + k * L, is_hi[r][k]);
        const Vec other = lv + log_a;
        sum[r][k] = at::vec::maximum(lu, other) + log1p_inline((lu - other).abs().neg().exp());
      }
    }
  } else {
    load_rows(sum, product);
    const T* by_pairs[ROWS];
    for (int r = 0; r < ROWS; ++r) by_pairs[r] = p.by_pairs + pair_offset<T>(b0 + r, p.out, 2);
    for (int64_t j = j0; j < chunk.end; ++j) {
      for (int r = 0; r < ROWS; ++r) {
        const T* at = by_pairs[r] + 2 * j * kRows;
        const ChildRows<T> rows = child_rows(tables, j, at[kRows], block);
        const Vec v(at[0]);
        for (int k = 0; k < NV; ++k) {
          // q <- q + delta*(1 + q) with delta = v*(A - 1)
          const Vec a_m1 = rows.pick(k * L, is_hi[r][k]);
          sum[r][k] = at::vec::fmadd(a_m1, at::vec::fmadd(v, sum[r][k], v), sum[r][k]);
        }
      }
    }
    end_chunk(sum, product);  // the product goes on into the next chunk
  }
  // each factor is pi(y | actual) / pi(y | flipped): the change is minus its log
  for (int r = 0; r < ROWS; ++r) {
    for (int k = 0; k < NV; ++k) {
      T* acc = change + (r * kVecs + k) * L;
      (Vec::loadu(acc) - sum[r][k]).store(acc);
    }
  }
}

// One task: examples [b0, b0 + rows) and one block of parents from i0, for either message
// (BernoulliArgs or EntropyArgs, each with its message_chunk). Tile by tile of kMaxChunk children,
// every pair of rows (and a last single row) runs its chunks of the tile while the tile's tables
// are in L1; rows of one pair share their chunks (p.plans).
template <typename T, template <typename> class Args>
void message_task(const Args<T>& p, int64_t b0, int64_t rows, int64_t i0) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  const auto row = [](int64_t r) { return r * kVecs * L; };  // row r's place in change and hi_masks
  // [part][row][vector][lane]: the summed change at each flip (and, for the entropy, the summed
  // log D at task_values: see its message_chunk)
  T change[Args<T>::kParts * task_values<T>] = {};
  // [row][vector][lane]: the product of the factors so far as q = product - 1, less the logs that
  // chunk_log took out into `change` (its log1p is the rest of the change, taken at the end)
  T product[kRowsPerTask * kVecs * L] = {};
  // [row][vector][lane]: where the parent is at hi, read at every chunk's start. Rows of x a power
  // of two long (in = 1024) put the task's rows of a block in the same two L1 sets.
  alignas(64) T hi_masks[kRowsPerTask * kVecs * L];
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < kVecs; ++k) {
      // lanes past the row's end read 0: their tables are 0 (a factor of 1), and are not stored
      const int64_t count = std::clamp<int64_t>(p.in - i0 - k * L, 0, L);
      (Vec::loadu(p.x + (b0 + r) * p.in + i0 + k * L, count) == Vec(p.hi)).store(hi_masks + row(r) + k * L);
    }
  }
  auto run = [&](auto nv) {  // nv: the vectors of this block that hold parents, as a constant
    struct Cursor {
      const Chunk* next;  // the row's next chunk, from j0
      int64_t j0;
    };
    Cursor cursor[kRowsPerTask];  // one per pair of rows (per row in the last, partial pair)
    for (int64_t r = 0; r < rows; ++r) cursor[r] = {p.plans[(b0 + r) / p.examples_per_plan].data(), 0};
    // A block's last vectors of parents (nv < kVecs) give a pair of rows fewer chains than the
    // FMA latency needs (8); where all rows share one plan, groups of rows make up the 8 (a
    // group's rows advance by its first row's cursor).
    constexpr int kGroup = std::max(kRows, 8 / nv());
    const bool grouped = p.examples_per_plan > kRows;  // one plan for every row (see the callers)
    for (int64_t end = std::min(p.out, kMaxChunk);; end = std::min(p.out, end + kMaxChunk)) {
      int64_t r = 0;
      if constexpr (kGroup > kRows) {
        for (; grouped && r + kGroup <= rows; r += kGroup) {
          for (Cursor& c = cursor[r]; c.j0 < end; c.j0 = (c.next++)->end) {
            message_chunk<T, kGroup, nv()>(p, b0 + r, i0, c.j0, *c.next, hi_masks + row(r), change + row(r),
                                          product + row(r));
          }
        }
      }
      for (; r + kRows <= rows; r += kRows) {
        for (Cursor& c = cursor[r]; c.j0 < end; c.j0 = (c.next++)->end) {
          message_chunk<T, kRows, nv()>(p, b0 + r, i0, c.j0, *c.next, hi_masks + row(r), change + row(r),
                                          product + row(r));
        }
      }
      for (; r < rows; ++r) {
        for (Cursor& c = cursor[r]; c.j0 < end; c.j0 = (c.next++)->end) {
          message_chunk<T, 1, nv()>(p, b0 + r, i0, c.j0, *c.next, hi_masks + row(r), change + row(r),
                                          product + row(r));
        }
      }
      if (end == p.out) break;
    }
  };
  // NOTE: at in = 200 (float32, blocks of 64) the last block holds 8 parents; running its 4
  // vectors did 256 parents' work for 200.
  switch (std::min<int64_t>(kVecs, (p.in - i0 + L - 1) / L)) {
    case 1: run(std::integral_constant<int, 1>()); break;
    case 2: run(std::integral_constant<int, 2>()); break;
    case 3: run(std::integral_constant<int, 3>()); break;
    default: run(std::integral_constant<int, kVecs>()); break;
  }
  // d = sign * change, sign = +1 from lo (the flip goes to hi) and -1 from hi
  for (int64_t r = 0; r < rows; ++r) {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t count = std::clamp<int64_t>(p.in - i0 - k * L, 0, L);
      if (count > 0) {
        const Vec is_hi = Vec::loadu(hi_masks + row(r) + k * L);
        const Vec rest = log1p_inline(Vec::loadu(product + row(r) + k * L));
        const Vec sum = Vec::loadu(change + row(r) + k * L) + Vec(T(Args<T>::kLogSign)) * rest;
        Vec::blendv(sum, sum.neg(), is_hi).store(p.d + (b0 + r) * p.in + i0 + k * L, count);
        if constexpr (Args<T>::kParts == 2) {
          if (p.log_ratio != nullptr) {  // minus the log of the product of the D
            const Vec logs = Vec::loadu(change + task_values<T> + row(r) + k * L) + rest;
            Vec::blendv(logs.neg(), logs, is_hi).store(p.log_ratio + (b0 + r) * p.in + i0 + k * L, count);
          }
        }
      }
    }
  }
}

at::Tensor bernoulli_log_ratio(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                               const at::Tensor& y, double lo, double hi, bool check) {
  const MessageInputs m = prepare_message(x_in, weight_in, logits_in, lo, hi, check);
  check_children(y, logits_in);
  const at::Tensor &x = m.x, &weight = m.weight, &logits = m.logits, &d = m.d;
  const int64_t batch = m.batch, in = m.in, out = m.out;
  if (d.numel() == 0) {
    return d;
  }
  const auto y_ = y.to(logits.scalar_type()).contiguous();
  const double w = hi - lo;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "hnca_bernoulli_log_ratio", [&] {
    using T = scalar_t;
    using Vec = Vectorized<T>;
    constexpr int L = Vec::size();
    const std::vector<double> r = child_bounds<T>(weight, w);
    // The chunks by the weights' bounds, for every example; where they are short (a trained model's
    // weights), each child unlikely under the actual parents (s*l < 0) is scored as if it had the
    // other outcome: u + v*A = A*(v + u/A), so its term is the other outcome's plus log A, a linear
    // part (below), and every child's v becomes sigma(-|l|) <= 1/2. Then the chunks of each pair
    // of examples (they share the loop over children) by the larger of their growth and shrink
    // bounds: a confident child, right or wrong, multiplies the products by nearly 1, and a wide
    // child is one whose product could overflow.
    std::vector<std::vector<Chunk>> plans{plan_chunks(r)};
    const bool per_pair = cut_short(plans[0], out);
    const FactorBounds<T> bounds(per_pair ? std::vector<T>(r.begin(), r.end()) : std::vector<T>());
    const auto scored = per_pair ? at::empty_like(logits) : y_;  // the outcomes scored (fired where > 0)
    const auto flip = per_pair ? at::empty_like(logits) : at::Tensor();  // s where flipped, else 0
    const T *lp = logits.data_ptr<T>(), *yp = y_.data_ptr<T>();
    T *sp = scored.data_ptr<T>(), *fp = per_pair ? flip.data_ptr<T>() : nullptr;
    const int64_t groups = (batch + kRows - 1) / kRows;
    auto by_pairs = at::empty({groups * pair_stride<T>(out, 2)}, logits.options());
    T* pp = by_pairs.data_ptr<T>();
    if (per_pair) plans.resize(groups);
    at::parallel_for(0, groups, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, kRows * out)),
                     [&](int64_t begin, int64_t end) {
      std::vector<T> down(out), up(out), v(kRows * out);  // v: the group's rows, then packed by pairs
      // NaN sticks: its child is wide
      const auto keep_max = [](T* into, Vec x, int64_t count) {
        const Vec so_far = Vec::loadu(into, count);
        Vec::blendv(so_far, x, (x > so_far) | x.isnan()).store(into, count);
      };
      for (int64_t g = begin; g < end; ++g) {
        std::fill(down.begin(), down.end(), T(0));
        std::fill(up.begin(), up.end(), T(0));
        for (int64_t n = g * kRows * out; n < std::min(batch, (g + 1) * kRows) * out; n += out) {
          for (int64_t j = 0; j < out; j += L) {
            const int64_t count = std::min<int64_t>(L, out - j);
            const Vec l = Vec::loadu(lp + n + j, count);
            const Vec fired = Vec::loadu(yp + n + j, count) > Vec(T(0));
            if (!per_pair) {
              other_outcome(l, fired).store(v.data() + n - g * kRows * out + j, count);
              continue;
            }
            const Likelier<T> c = likelier(l, fired);
            c.v.store(v.data() + n - g * kRows * out + j, count);
            c.fired.store(sp + n + j, count);
            c.flip.store(fp + n + j, count);
            keep_max(up.data() + j, bounds.growth(c.v, j, count), count);
            keep_max(down.data() + j, bounds.shrink(c.v, j, count), count);
          }
        }
        if (per_pair) plans[g] = plan_chunks(down, up);
        for (int64_t b = g * kRows; b < std::min(batch, (g + 1) * kRows); ++b) {
          const T* vb = v.data() + (b - g * kRows) * out;
          store_by_pairs<2>(pp, b, out, [&](int which, int64_t j) {
            return which == 0 ? vb[j] : mask_of<T>(sp[b * out + j] > 0);
          });
        }
      }
    });
    const bool any_wide = std::any_of(plans.begin(), plans.end(), [](const std::vector<Chunk>& plan) {
      return std::any_of(plan.begin(), plan.end(), [](const Chunk& c) { return c.wide; });
    });
    const int64_t block = kVecs * L;
    const auto tables = message_tables<T>(weight, T(w), /*with_c=*/any_wide);
    at::Tensor log_u, log_v;
    if (any_wide) {  // per_pair: every scored outcome has s*l = |l|
      log_u = at::empty_like(logits);
      log_v = at::empty_like(logits);
      T *up = log_u.data_ptr<T>(), *wp = log_v.data_ptr<T>();
      at::parallel_for(0, logits.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; n += L) {
          const int64_t count = std::min<int64_t>(L, end - n);
          const Vec sl = Vec::loadu(lp + n, count).abs();
          const Vec lu = log_sigmoid(sl);  // log sigmoid(-|l|) = log sigmoid(|l|) - |l|
          lu.store(up + n, count);
          (lu - sl).store(wp + n, count);
        }
      });
    }
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const BernoulliArgs<T> p{x.data_ptr<T>(), tables.data_ptr<T>(), table_size(in, out, block), sp,
                             pp, ptr(log_u), ptr(log_v), plans.data(), per_pair ? kRows : batch, in, out, T(hi),
                             d.data_ptr<T>()};
    for_each_tile(batch, in, block, kRowsPerTask, kRowsPerTask * block * out, [&](int64_t b0, int64_t rows, int64_t i0) {
      message_task(p, b0, rows, i0);
    });
    // the flipped children's log A = -s*Delta*W[j, i] with Delta = w*sign (sign as at the end of
    // message_task): minus it in the change, times sign in d, is w * (flip @ W)
    if (per_pair) d.addmm_(flip, weight, 1, w);
  });
  return d;
}

// ---------------------------------------------------------------------------------------------
// Softmax child: with z_k = l_k - l_a (0 for the sampled class a),
//   d = sign * (lse_k(z_k) - lse_k(z_k + Delta*(W[k, i] - W[a, i]))),
// each logsumexp kept as top + log1p(rest), rest = sum of exp(z - top) but the top term. Where
// the sampled class dominates both are tiny and exact to relative rounding. The counterfactual
// one is tabled (below) where the weights allow, else taken in one pass over the classes
// (online), an exp a term, which no W can overflow.

// Tabled columns: a term is a multiply-add instead of an exp. With m = max_k z_k >= 0 and
// r_k = e^(z_k - m) per example, and the tables E+-[k, i] = e^(+-w*(W[k, i] - c_i)) (2*K*in exps a
// call, one per term otherwise; c_i centres column i's classes, so |exponent| <= R/2):
//   lse_k(z_k + Delta*(W[k, i] - W[a, i])) - m = log(r_a + E_-Delta[a, i] * sum_{k != a} r_k E_Delta[k, i]),
// taken as log1p(...) where a is the top class (r_a = 1). A column whose classes' weights span
// R / w with R <= kTabledRange keeps that sum's largest term at least e^-R times the top class's,
// and the r_k flushed to 0 below e^-flush_exponent<T> (where r_k E_k would leave the normal range)
// lose less than K e^(R - 74) of it: below float32's rounding for any K up to a thousand, far below
// float64's. So messages are exact to relative rounding, as the online pass's are, down to
// terms of about e^-(74 - R) (float32). Other columns take the online pass.
constexpr double kTabledRange = 25;

template <typename T>
constexpr T flush_exponent() {
  return std::is_same_v<T, float> ? T(74) : T(700);  // e^-(74 + 12.5) is float32's smallest normal
}

template <typename T>
struct CategoricalTables {
  // [V][Delta = +w, -w][k][stride]: e^(Delta * (W[v*K + k, i] - c_i)); rows a cache line further apart
  // than the parents' width (rows of a power-of-two width would share a few cache sets)
  std::vector<T> tables;
  std::vector<uint8_t> tabled;  // [V][vector of parents]: whether the vector's columns are tabled
  int64_t stride;
};

template <typename T>
CategoricalTables<T> categorical_tables(const T* weight, int64_t in, int64_t classes, int64_t variables, T w) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  const int64_t vectors = (in + L - 1) / L;
  const int64_t stride = vectors * L + 64 / int64_t(sizeof(T));
  CategoricalTables<T> t{std::vector<T>(variables * 2 * classes * stride), std::vector<uint8_t>(variables * vectors, 1),
                         stride};
  at::parallel_for(0, variables, 1, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const T* rows = weight + v * classes * in;
      std::vector<T> centre(vectors * L, T(0));
      for (int64_t i = 0; i < in; ++i) {
        T top = rows[i], bottom = rows[i];
        for (int64_t k = 1; k < classes; ++k) {
          top = std::max(top, rows[k * in + i]);
          bottom = std::min(bottom, rows[k * in + i]);
        }
        centre[i] = (top + bottom) / 2;
        // (a NaN weight past class 0 passes unseen here, and reaches the output through the sums)
        if (!(w * (top - bottom) <= T(kTabledRange))) t.tabled[v * vectors + i / L] = 0;
      }
      for (int64_t sign = 0; sign < 2; ++sign) {
        const Vec delta(sign == 0 ? w : -w);
        for (int64_t k = 0; k < classes; ++k) {
          T* table = t.tables.data() + ((v * 2 + sign) * classes + k) * stride;
          for (int64_t i0 = 0; i0 < in; i0 += L) {
            const int64_t count = std::min<int64_t>(L, in - i0);
            const Vec centred = Vec::loadu(rows + k * in + i0, count) - Vec::loadu(centre.data() + i0);
            (delta * centred).exp().store(table + i0, count);
          }
        }
      }
    }
  });
  return t;
}

template <typename T>
void categorical_rows(const T* x, const T* weight_all, const T* logits_all, const int64_t* a_all,
                      const CategoricalTables<T>& tables, T* d, int64_t b, int64_t in, int64_t classes,
                      int64_t variables, T lo, T hi, std::vector<T>& r) {  // r: K values of scratch
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  const int64_t vectors = (in + L - 1) / L;
  for (int64_t v = 0; v < variables; ++v) {  // the variables' log-ratios add up
    const T* l = logits_all + (b * variables + v) * classes;
    const T* weight = weight_all + v * classes * in;
    const int64_t a = a_all[b * variables + v];
    const T* w_a = weight + a * in;
    // m = max_k z_k >= 0 (z_a = 0) and r_k = e^(z_k - m): lse_actual = m + log1p(the r but the top's)
    int64_t top_class = a;
    for (int64_t k = 0; k < classes; ++k) top_class = l[k] > l[top_class] ? k : top_class;
    const T top = l[top_class] - l[a];
    T others = 0, rest = 0;  // the r but a's, and but the top class's
    for (int64_t k = 0; k < classes; ++k) {
      const T z = l[k] - l[a] - top, e = std::exp(z);
      r[k] = z < -flush_exponent<T>() ? T(0) : e;
      others += k == a ? T(0) : r[k];
      rest += k == top_class ? T(0) : e;  // not flushed: the online pass's lse_actual is exact
    }
    const Vec lse_actual(top + std::log1p(rest));
    const int64_t stride = tables.stride;
    const T* table = tables.tables.data() + v * 2 * classes * stride;
    const bool a_on_top = top_class == a;
    const T r_a = r[a];
    r[a] = 0;  // the tabled columns' sums leave a's own term out
    // log(r_a + sum_{k != a} r_k) = lse_actual - m, as the tabled columns take it
    const T actual = a_on_top ? std::log1p(others) : std::log(r_a + others);
    const Vec w(hi - lo), one(T(1));
    for (int64_t i0 = 0; i0 < in; i0 += L) {
      const int64_t count = std::min<int64_t>(L, in - i0);
      const Vec is_hi = Vec::loadu(x + b * in + i0, count) == Vec(hi);
      Vec ratio;
      if (tables.tabled[v * vectors + i0 / L]) {
        // E_Delta[k] for Delta = +w where the parent is lo, -w where it is hi
        auto e = [&](int64_t k, bool minus_delta) {
          const T* row = table + k * stride + i0;
          const Vec plus = Vec::loadu(row, count), minus = Vec::loadu(row + classes * stride, count);
          return minus_delta ? Vec::blendv(minus, plus, is_hi) : Vec::blendv(plus, minus, is_hi);
        };
        // two chains of multiply-adds: half the latency
        Vec even(T(0)), odd(T(0));
        int64_t k = 0;
        for (; k + 1 < classes; k += 2) {
          even = at::vec::fmadd(Vec(r[k]), e(k, false), even);
          odd = at::vec::fmadd(Vec(r[k + 1]), e(k + 1, false), odd);
        }
        if (k < classes) even = at::vec::fmadd(Vec(r[k]), e(k, false), even);
        const Vec sum = (even + odd) * e(a, true);
        ratio = Vec(actual) - (a_on_top ? log1p_inline(sum) : (Vec(r_a) + sum).log());
      } else {
        const Vec delta = Vec::blendv(w, w.neg(), is_hi);
        const Vec own = Vec::loadu(w_a + i0, count);
        auto z = [&](int64_t k) {
          return at::vec::fmadd(delta, Vec::loadu(weight + k * in + i0, count) - own, Vec(l[k] - l[a]));
        };
        Vec top_cf = z(0), rest_cf(T(0));
        for (int64_t k = 1; k < classes; ++k) {
          const Vec zk = z(k);
          const Vec e = (zk - top_cf).abs().neg().exp();
          rest_cf = Vec::blendv(rest_cf + e, (rest_cf + one) * e, zk > top_cf);
          top_cf = at::vec::maximum(top_cf, zk);
        }
        ratio = lse_actual - (top_cf + log1p_inline(rest_cf));
      }
      const Vec signed_ratio = Vec::blendv(ratio, ratio.neg(), is_hi);
      T* out = d + b * in + i0;
      (v == 0 ? signed_ratio : Vec::loadu(out, count) + signed_ratio).store(out, count);
    }
  }
}

at::Tensor categorical_log_ratio(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                                 const at::Tensor& a_in, double lo, double hi, bool check) {
  // one softmax variable (logits [B, K], a [B]) or V of them (logits [B, V, K], a [B, V]; weight
  // [V*K, in]), their log-ratios summed
  TORCH_CHECK_VALUE(logits_in.dim() == 2 || logits_in.dim() == 3, "hnca: logits must be [B, K] or [B, V, K]");
  const int64_t variables = logits_in.dim() == 3 ? logits_in.size(1) : 1;
  const int64_t classes = logits_in.size(-1);
  TORCH_CHECK_VALUE(a_in.dim() == logits_in.dim() - 1 && (variables == 1 || a_in.size(-1) == variables),
                    "hnca: a must have shape [B] for logits [B, K], or [B, V] for logits [B, V, K]");
  const MessageInputs m = prepare_message(x_in, weight_in, logits_in.reshape({logits_in.size(0), -1}), lo, hi, check);
  TORCH_CHECK_VALUE(a_in.device() == x_in.device(), "hnca: a must be on the device of x, weight and logits");
  TORCH_CHECK_VALUE(a_in.size(0) == x_in.size(0), "hnca: a must have shape [B] (or [B, V])");
  TORCH_CHECK_TYPE(a_in.scalar_type() == at::kLong || a_in.scalar_type() == at::kInt,
                   "hnca: a must hold class indices (int64 or int32)");
  const at::Tensor &x = m.x, &weight = m.weight, &logits = m.logits, &d = m.d;
  const int64_t batch = m.batch, in = m.in;
  const auto a = a_in.to(at::kLong).contiguous();
  // the kernel indexes weight and logits by a: check it here (the cpp backend skips the Python check)
  const int64_t* ap = a.data_ptr<int64_t>();
  bool in_range = true;
  for (int64_t n = 0; n < a.numel(); ++n) in_range &= ap[n] >= 0 && ap[n] < classes;
  TORCH_CHECK_VALUE(in_range, "hnca: a must hold class indices in [0, classes)");
  if (d.numel() == 0) {
    return d;
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "hnca_categorical_log_ratio", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* dp = d.data_ptr<scalar_t>();
    const auto tables = categorical_tables<scalar_t>(wp, in, classes, variables, scalar_t(hi - lo));
    // a term (one class for one parent) costs an exp (or, tabled, a multiply-add)
    const int64_t grain = std::max<int64_t>(1, kTermsPerThread / 16 / std::max<int64_t>(1, in * classes * variables));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> r(classes);  // once a task, not once an example
      for (int64_t b = begin; b < end; ++b) {
        categorical_rows<scalar_t>(xp, wp, lp, ap, tables, dp, b, in, classes, variables, scalar_t(lo), scalar_t(hi), r);
      }
    });
  });
  return d;
}

// ---------------------------------------------------------------------------------------------
// Entropy delta: d = sign * sum_j H(l_j + c_ij) - H(l_j), c = Delta*W[j, i]. H is even, so with
// s = sign(l_j) a term is H(-|l| + c~) - H(-|l|), c~ = -s*c: the same c~ and tables as a
// Bernoulli child whose "firing" is s. With u = sigmoid(-|l|) <= 1/2, A = e^c~ and
// delta = u*(A - 1), D = 1 + delta >= 1/2:
//   H(-|l| + c~) - H(-|l|) = log D - (c~*u + delta*(c~ + kappa)) / D,   kappa = -|l| sigmoid(|l|)
// (from softplus(z~) = softplus(-|l|) + log D and sigmoid(-z~) = (1 - u) / D). The logs multiply
// like the Bernoulli factors (q-form, chunk_log at each chunk's end, one log1p per example and
// parent at the end). The rational terms of a chunk are summed as one fraction over the same
// product P of the D (n <- n*D + numerator*P, then n / P at the chunk's end, P within e^+-4 of
// its start): two multiply-adds a term and one division a chunk, not a division (or a reciprocal
// estimate and its Newton step) a term.
// Saturated children (u tiny) send terms exact to relative
// rounding; a wide child (w*max|W| > kChunkRange, where A could overflow) uses per term the
// stable H(z) = log1p(t) + |z| t / (1 + t), t = exp(-|z|).
// NOTE: the per-term form everywhere took 5.2-5.9x as long (B=50, 200 -> 200 and 200 -> 784;
// B=256, 1024 -> 1024; 1 thread, interleaved), 43% of an f-HNCA step of a two-layer VAE.

template <typename T>
Vectorized<T> entropy(const Vectorized<T>& z) {
  using Vec = Vectorized<T>;
  const Vec m = z.abs();
  const Vec t = m.neg().exp();
  return log1p_inline(t) + m * t / (Vec(T(1)) + t);
}

template <typename T>
struct EntropyArgs {
  static constexpr int kLogSign = 1;  // the change is the log of the product of the D plus the rest
  static constexpr int kParts = 2;    // message_task's sums: the change, and the sum of the log D
  const T* x;          // [B, in]
  const T* tables;     // [2, blocks, out, kRecord, block] (message_tables)
  int64_t c_rows;      // offset of the c rows: table_size(in, out, block)
  const T* logits;     // [B, out] l (s = +1 where l > 0)
  const T* h;          // [B, out] H(l)
  const T* by_pairs;   // u, kappa and mask_of(l > 0), by pairs of rows (pair_offset, 3 values)
  const std::vector<Chunk>* plans;  // example b's chunks: plans[b / examples_per_plan]
  int64_t examples_per_plan, in, out;
  T hi;
  T* d;                // [B, in]
  T* log_ratio;        // [B, in] or null: the children's log-ratio less its linear part (entropy_messages;
                       // only where no chunk is wide)
};

// Adds, for ROWS examples from b0 and NV vectors of parents from i0, each flip's change of the
// entropy of one chunk of children into `change` and `product` (the terms' D so far, as q; see
// the Bernoulli message_chunk).
template <typename T, int ROWS, int NV>
void message_chunk(const EntropyArgs<T>& p, int64_t b0, int64_t i0, int64_t j0, const Chunk& chunk, const T* hi_masks,
                   T* change, T* product) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  constexpr int64_t block = kVecs * L;
  Vec is_hi[ROWS][NV], q[ROWS][NV], rational[ROWS][NV];
  load_rows(is_hi, hi_masks);
  const T* tables = p.tables + (i0 / block) * p.out * kRecord * block;
  if (chunk.wide) {
    for (int r = 0; r < ROWS; ++r) {
      const int64_t bj = (b0 + r) * p.out + j0;
      const ChildRows<T> rows = child_rows(tables, j0, mask_of<T>(p.logits[bj] > 0), block);
      const Vec neg_abs_l(-std::abs(p.logits[bj])), h(p.h[bj]);
      for (int k = 0; k < NV; ++k) {
        const Vec c = rows.pick(p.c_rows + k * L, is_hi[r][k]);
        q[r][k] = entropy(neg_abs_l + c) - h;  // the change itself
      }
    }
  } else {
    load_rows(q, product);
    for (int r = 0; r < ROWS; ++r) {
      for (int k = 0; k < NV; ++k) rational[r][k] = Vec(T(0));
    }
    const T* by_pairs[ROWS];
    for (int r = 0; r < ROWS; ++r) by_pairs[r] = p.by_pairs + pair_offset<T>(b0 + r, p.out, 3);
    for (int64_t j = j0; j < chunk.end; ++j) {
      for (int r = 0; r < ROWS; ++r) {
        const T* at = by_pairs[r] + 3 * j * kRows;
        const ChildRows<T> rows = child_rows(tables, j, at[2 * kRows], block);
        const Vec u(at[0]), kappa(at[kRows]);
        for (int k = 0; k < NV; ++k) {
          const Vec a_m1 = rows.pick(k * L, is_hi[r][k]);
          const Vec c = rows.pick(p.c_rows + k * L, is_hi[r][k]);
          const Vec delta = u * a_m1;
          const Vec numerator = at::vec::fmadd(delta, c + kappa, c * u);
          // the fraction's numerator: n <- n*D + numerator*P with P = 1 + q before this term
          const Vec scaled = at::vec::fmadd(numerator, q[r][k], numerator);
          rational[r][k] = at::vec::fmadd(rational[r][k], delta, rational[r][k] + scaled);
          q[r][k] = at::vec::fmadd(delta, q[r][k], q[r][k] + delta);  // q <- q + delta*(1 + q)
        }
      }
    }
    // the chunk's rational terms, n / P: one division a chunk
    for (int r = 0; r < ROWS; ++r) {
      for (int k = 0; k < NV; ++k) rational[r][k] = rational[r][k] / (Vec(T(1)) + q[r][k]);
    }
    end_chunk(q, product);
    for (int r = 0; r < ROWS; ++r) {
      for (int k = 0; k < NV; ++k) {
        if (p.log_ratio != nullptr) {  // the log D alone, for the log-ratio
          T* logs = change + task_values<T> + (r * kVecs + k) * L;
          (Vec::loadu(logs) + q[r][k]).store(logs);
        }
        q[r][k] = q[r][k] - rational[r][k];
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int k = 0; k < NV; ++k) {
      T* acc = change + (r * kVecs + k) * L;
      (Vec::loadu(acc) + q[r][k]).store(acc);
    }
  }
}

// The entropy delta, and with children's outcomes y (else undefined) their log-ratio too. Scored
// by its likelier outcome sign(l) (the entropy's s), child j's factor is D; where y has the other
// outcome its factor is D / A (u + v*A = A*(v + u/A), as in bernoulli_log_ratio), so the log-ratio
// is minus the sum of the log D plus the linear part w * (flip @ W), flip = s_y where they differ:
// the entropy's products give the log-ratio for a matrix product. Where the weights' bounds cut
// the chunks short (a wide child, or a trained model's weights), bernoulli_log_ratio's chunks by
// each pair of examples' factors are far longer than these: there it runs on its own.
std::tuple<at::Tensor, at::Tensor> entropy_messages(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                    const at::Tensor& logits_in, const at::Tensor& y, double lo,
                                                    double hi, bool check) {
  const MessageInputs m = prepare_message(x_in, weight_in, logits_in, lo, hi, check);
  const at::Tensor &x = m.x, &weight = m.weight, &logits = m.logits, &d = m.d;
  const int64_t batch = m.batch, in = m.in, out = m.out;
  const bool with_ratio = y.defined();
  if (with_ratio) check_children(y, logits_in);
  at::Tensor ratio;  // the log-ratio, with y
  if (d.numel() == 0) {
    return {d, with_ratio ? at::empty_like(d) : ratio};
  }
  const double w = hi - lo;
  bool fused = false;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "hnca_entropy_delta", [&] {
    using T = scalar_t;
    using Vec = Vectorized<T>;
    constexpr int L = Vec::size();
    const auto chunks = plan_chunks(child_bounds<T>(weight, w));
    fused = with_ratio && !cut_short(chunks, out);
    if (fused) ratio = new_output(d, d.scalar_type());
    const int64_t block = kVecs * L;
    const auto tables = message_tables<T>(weight, T(w), /*with_c=*/true);
    // per (example, child), with t = exp(-|l|): u = t / (1 + t), kappa = -|l| / (1 + t), and
    // H(l) by the wide terms' formula, so that a zero weight gives a zero term
    auto h = at::empty_like(logits);
    const int64_t groups = (batch + kRows - 1) / kRows;
    auto by_pairs = at::empty({groups * pair_stride<T>(out, 3)}, logits.options());
    const T* lp = logits.data_ptr<T>();
    T *hp = h.data_ptr<T>(), *pp = by_pairs.data_ptr<T>();
    const at::Tensor y_ = fused ? y.to(logits.scalar_type()).contiguous() : at::Tensor();
    const at::Tensor flip = fused ? at::empty_like(logits) : at::Tensor();
    const T* yp = fused ? y_.data_ptr<T>() : nullptr;
    T* fp = fused ? flip.data_ptr<T>() : nullptr;
    const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, out));
    at::parallel_for(0, batch, rows_per_task, [&](int64_t begin, int64_t end) {
      std::vector<T> u(out), kappa(out);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * out;
        for (int64_t j = 0; j < out; j += L) {
          const int64_t count = std::min<int64_t>(L, out - j);
          const Vec l = Vec::loadu(lp + n + j, count);
          if (fused) {  // s_y where y's outcome is not sign(l)'s (l = 0 counts as -1, as below)
            const Vec zero(T(0)), one(T(1)), fired = Vec::loadu(yp + n + j, count) > zero;
            const Vec s = Vec::blendv(one.neg(), one, fired);
            Vec::blendv(zero, s, fired ^ (l > zero)).store(fp + n + j, count);
          }
          const Vec t = l.abs().neg().exp();
          const Vec inv = (Vec(T(1)) + t).reciprocal();  // sigmoid(|l|)
          (t * inv).store(u.data() + j, count);
          (l.abs().neg() * inv).store(kappa.data() + j, count);
          entropy(l).store(hp + n + j, count);
        }
        store_by_pairs<3>(pp, b, out, [&](int which, int64_t j) {
          return which == 0 ? u[j] : which == 1 ? kappa[j] : mask_of<T>(lp[n + j] > 0);
        });
      }
    });
    const EntropyArgs<T> p{x.data_ptr<T>(), tables.data_ptr<T>(), table_size(in, out, block), lp, hp, pp,
                           &chunks, batch, in, out, T(hi), d.data_ptr<T>(),
                           fused ? ratio.data_ptr<T>() : nullptr};
    const int64_t terms = 3 * kRowsPerTask * block * out;  // a term costs about 3 Bernoulli terms
    for_each_tile(batch, in, block, kRowsPerTask, terms, [&](int64_t b0, int64_t rows, int64_t i0) {
      message_task(p, b0, rows, i0);
    });
    if (fused) ratio.addmm_(flip, weight, 1, w);
  });
  if (with_ratio && !fused) ratio = bernoulli_log_ratio(x_in, weight_in, logits_in, y, lo, hi, /*check=*/false);
  return {d, ratio};
}

at::Tensor entropy_delta(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                         double lo, double hi, bool check) {
  return std::get<0>(entropy_messages(x_in, weight_in, logits_in, at::Tensor(), lo, hi, check));
}

// The log-ratio of the children's outcomes y and the entropy delta in one pass (f-HNCA's two
// messages from a sampled Bernoulli child layer), in about the entropy delta's time alone.
std::tuple<at::Tensor, at::Tensor> log_ratio_and_entropy_delta(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& logits, const at::Tensor& y,
                                                               double lo, double hi, bool check) {
  auto [entropy, ratio] = entropy_messages(x, weight, logits, y, lo, hi, check);
  return {ratio, entropy};
}

// ---------------------------------------------------------------------------------------------
// Categorical parents of Bernoulli children, all variables in one call: D[b, v, k] = m[k] - m[a],
//   m[k] = sum_j log sigma(s_j (base_j + W[j, vK + k])) - log sigma(s_j base_j),
// base_j = l_j - W[j, vK + a] (the child's logit with variable v switched off), a = a[b, v]: the
// message of K binary parents at 0 (hnca_kernels.functional.categorical_parent_log_ratio). With
// v = sigma(-s base) each term is -log(1 + v (A - 1)), A = e^{-s W[j, vK + k]}: the product form
// and chunks of the Bernoulli message above (a wide child is summed per term in the log domain).
// The examples are the vector lanes: for one (variable, child) the classes' factors A - 1 are
// broadcast scalars (a blend picks each example's sign), so every lane does useful work whatever
// K, and the K products are independent chains.

template <typename T>
struct CategoricalParentArgs {
  const T* logits_t;    // [out, Bp]: the children's logits, examples last
  const T* fired;       // [out, Bp]: 1 where the child fired, else 0
  const int64_t* a;     // [B, V]
  const T* tables;      // [2, V, out, K]: expm1(-W) (a child that fired), expm1(+W)
  const T* weight;      // [V, out, K]: W
  int64_t batch, padded_batch, variables, classes, out;
  T* m;                 // [V, K, Bp]: m[k] for each example
};

// A variable's per (child, example) terms: base = l - W[j, own] and v = sigma(-s base), [out, Bp],
// row by row (a child's K weights of the variable share one cache line). With `flip` (null
// otherwise) each child is scored by its likelier outcome under base (`likelier`; its log A is
// s W[j, k], added by the caller), and `fired` gets the outcomes scored.
template <typename T>
void categorical_parent_prologue(const CategoricalParentArgs<T>& p, int64_t v, T* base, T* sig, T* fired, T* flip) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  const int64_t out = p.out, Bp = p.padded_batch, K = p.classes;
  std::vector<int64_t> own(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) own[b] = p.a[b * p.variables + v];
  for (int64_t j = 0; j < out; ++j) {
    const T* w = p.weight + (v * out + j) * K;
    T* row = base + j * Bp;
    for (int64_t b = 0; b < p.batch; ++b) row[b] = p.logits_t[j * Bp + b] - w[own[b]];
    for (int64_t b = p.batch; b < Bp; ++b) row[b] = T(0);
    for (int64_t b = 0; b < Bp; b += L) {
      const int64_t n = j * Bp + b;
      const Vec x = Vec::loadu(row + b);
      const Vec actual = Vec::loadu(p.fired + n) > Vec(T(0));
      if (flip == nullptr) {
        other_outcome(x, actual).store(sig + n);
      } else {
        const Likelier<T> c = likelier(x, actual);
        c.v.store(sig + n);
        c.fired.store(fired + n);
        c.flip.store(flip + n);
      }
    }
    // padding lanes: no terms (v = 0), so no bounds that would cut the last vector's chunks short
    for (int64_t b = p.batch; b < Bp; ++b) sig[j * Bp + b] = T(0);
  }
}

// Classes [k0, k0 + NK) of variable v for examples [b0, b0 + L).
template <typename T, int NK>
void categorical_parent_block(const CategoricalParentArgs<T>& p, const std::vector<Chunk>& chunks, int64_t v,
                              int64_t b0, int64_t k0, const T* base, const T* sig, const T* fired_all) {
  using Vec = Vectorized<T>;
  const int64_t out = p.out, K = p.classes, Bp = p.padded_batch;
  const T* expm1_fired = p.tables + v * out * K;
  const T* expm1_silent = p.tables + (p.variables + v) * out * K;
  Vec total[NK], q[NK];  // q: the product of the factors so far less what chunk_log took (-1)
  for (int k = 0; k < NK; ++k) total[k] = q[k] = Vec(T(0));
  int64_t j0 = 0;
  for (const Chunk& chunk : chunks) {
    if (chunk.wide) {
      const int64_t j = j0;
      const Vec b_j = Vec::loadu(base + j * Bp + b0);
      const Vec fired = Vec::loadu(fired_all + j * Bp + b0) > Vec(T(0));
      const Vec now = log_sigmoid(Vec::blendv(b_j.neg(), b_j, fired));
      for (int k = 0; k < NK; ++k) {
        const Vec z = b_j + Vec(p.weight[(v * out + j) * K + k0 + k]);
        total[k] = total[k] + log_sigmoid(Vec::blendv(z.neg(), z, fired)) - now;
      }
    } else {
      for (int64_t j = j0; j < chunk.end; ++j) {
        const Vec vj = Vec::loadu(sig + j * Bp + b0);
        const Vec fired = Vec::loadu(fired_all + j * Bp + b0) > Vec(T(0));
        const T* hi = expm1_fired + j * K + k0;
        const T* lo = expm1_silent + j * K + k0;
        for (int k = 0; k < NK; ++k) {
          const Vec a_m1 = Vec::blendv(Vec(lo[k]), Vec(hi[k]), fired);
          q[k] = at::vec::fmadd(a_m1, at::vec::fmadd(vj, q[k], vj), q[k]);  // q + v(A - 1)(1 + q)
        }
      }
      // each factor is pi(y | base) / pi(y | base + W): the change is minus its log
      for (int k = 0; k < NK; ++k) total[k] = total[k] - chunk_log(q[k]);
    }
    j0 = chunk.end;
  }
  for (int k = 0; k < NK; ++k) (total[k] - log1p_inline(q[k])).store(p.m + (v * K + k0 + k) * Bp + b0);
}

// Variable v's chunks: by its weights' bounds r_j = max_k |W[j, vK + k]|, and where those cut
// them short (a trained model's weights), with the unlikely children flipped (the prologue), for
// each vector of examples by the largest of their growth and shrink bounds (see the Bernoulli
// message).
// Returns whether it flipped: then m[v] lacks the linear part W_v^T flip.
template <typename T>
bool categorical_parent_variable(const CategoricalParentArgs<T>& p, int64_t v, T* base, T* sig, T* fired, T* flip) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  // classes at once: their accumulators are the chains that hide the FMA latency (8 needed), so
  // K is cut into near-equal blocks of at most kBlock (10 classes: one block, not 8 and a
  // latency-bound 2); a block's totals are touched only at chunk ends
  constexpr int kBlock = 12;
  const int64_t out = p.out, Bp = p.padded_batch, K = p.classes;
  std::vector<T> bound(out);  // r_j; NaN where a weight is NaN
  for (int64_t j = 0; j < out; ++j) {
    const T* w = p.weight + (v * out + j) * K;
    T r = T(0);
    bool nan = false;
    // no branch per weight: this loop runs on every call, beside the message (benchmarks/RESULTS.md,
    // "Confident mistakes")
    for (int64_t k = 0; k < K; ++k) {
      r = std::max(r, std::abs(w[k]));
      nan |= std::isnan(w[k]);
    }
    bound[j] = nan ? std::numeric_limits<T>::quiet_NaN() : r;
  }
  const std::vector<Chunk> by_weights = plan_chunks(bound);
  const bool by_examples = cut_short(by_weights, out);
  categorical_parent_prologue(p, v, base, sig, fired, by_examples ? flip : nullptr);
  const T* scored = by_examples ? fired : p.fired;
  const FactorBounds<T> bounds(by_examples ? bound : std::vector<T>());
  std::vector<T> down(out), up(out);
  std::vector<Chunk> per_vector;
  for (int64_t b0 = 0; b0 < p.batch; b0 += L) {
    if (by_examples) {
      const auto largest = [](Vec x) {  // NaN sticks (maximum propagates it): its child is wide
        return at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, x);
      };
      for (int64_t j = 0; j < out; ++j) {
        const Vec v_j = Vec::loadu(sig + j * Bp + b0);
        up[j] = largest(bounds.growth_of(v_j, j));
        down[j] = largest(bounds.shrink_of(v_j, j));
      }
      per_vector = plan_chunks(down, up);
    }
    const std::vector<Chunk>& chunks = by_examples ? per_vector : by_weights;
    const int64_t blocks = (K + kBlock - 1) / kBlock, per_block = (K + blocks - 1) / blocks;
    for (int64_t k0 = 0; k0 < K; k0 += per_block) {
      const auto block = [&](auto nk) { categorical_parent_block<T, nk()>(p, chunks, v, b0, k0, base, sig, scored); };
      switch (std::min(per_block, K - k0)) {
        case 1: block(std::integral_constant<int, 1>()); break;
        case 2: block(std::integral_constant<int, 2>()); break;
        case 3: block(std::integral_constant<int, 3>()); break;
        case 4: block(std::integral_constant<int, 4>()); break;
        case 5: block(std::integral_constant<int, 5>()); break;
        case 6: block(std::integral_constant<int, 6>()); break;
        case 7: block(std::integral_constant<int, 7>()); break;
        case 8: block(std::integral_constant<int, 8>()); break;
        case 9: block(std::integral_constant<int, 9>()); break;
        case 10: block(std::integral_constant<int, 10>()); break;
        case 11: block(std::integral_constant<int, 11>()); break;
        default: block(std::integral_constant<int, kBlock>()); break;
      }
    }
  }
  return by_examples;
}

at::Tensor categorical_parent_log_ratio(const at::Tensor& a_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                                        const at::Tensor& y_in) {
  TORCH_CHECK_VALUE(a_in.device() == weight_in.device() && a_in.device() == logits_in.device() &&
                        a_in.device() == y_in.device(),
                    "hnca: a, weight, logits and y must be on one device");
  TORCH_CHECK_VALUE(a_in.device().is_cpu(), "hnca: the CPU kernel got tensors that are not on the CPU");
  TORCH_CHECK_VALUE(a_in.dim() == 2 && weight_in.dim() == 2 && logits_in.dim() == 2 && y_in.dim() == 2,
                    "hnca: a [B, V], weight [out, V*K], logits and y [B, out] must be 2-D");
  TORCH_CHECK_TYPE(a_in.scalar_type() == at::kLong || a_in.scalar_type() == at::kInt,
                   "hnca: a must hold class indices (int64 or int32)");
  TORCH_CHECK_TYPE(weight_in.is_floating_point() && logits_in.is_floating_point() && !y_in.is_complex(),
                   "hnca: weight and logits must be floating tensors, y a real one");
  const int64_t batch = a_in.size(0), variables = a_in.size(1), out = weight_in.size(0);
  TORCH_CHECK_VALUE(variables > 0 && weight_in.size(1) % variables == 0 && weight_in.size(1) > 0,
                    "hnca: weight must be [out, V*K] for a of shape [B, V]");
  TORCH_CHECK_VALUE(logits_in.size(0) == batch && logits_in.size(1) == out && y_in.sizes() == logits_in.sizes(),
                    "hnca: logits and y must be [B, out] for a [B, V] and weight [out, V*K]");
  const int64_t classes = weight_in.size(1) / variables;
  const auto dtype = compute_type(logits_in);
  const auto a = a_in.to(at::kLong).contiguous();
  const int64_t* ap = a.data_ptr<int64_t>();
  bool in_range = true;
  for (int64_t n = 0; n < a.numel(); ++n) in_range &= ap[n] >= 0 && ap[n] < classes;
  TORCH_CHECK_VALUE(in_range, "hnca: a must hold class indices in [0, classes)");
  auto d = new_output(at::empty({batch, variables, classes}, logits_in.options()), dtype);
  if (d.numel() == 0) return d;
  if (out == 0) return d.zero_();
  const auto opts = logits_in.options().dtype(dtype);
  const auto weight = weight_in.to(dtype).contiguous();
  const auto logits = logits_in.to(dtype);
  const auto y = (y_in > 0).to(dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "hnca_categorical_parent_log_ratio", [&] {
    using T = scalar_t;
    const int64_t L = Vectorized<T>::size();
    const int64_t padded_batch = (batch + L - 1) / L * L;  // examples are the lanes: pad to whole vectors
    auto logits_t = at::zeros({out, padded_batch}, opts);
    logits_t.narrow(1, 0, batch).copy_(logits.t());
    auto fired = at::zeros({out, padded_batch}, opts);
    fired.narrow(1, 0, batch).copy_(y.t());
    const auto by_variable = weight.view({out, variables, classes}).permute({1, 0, 2});  // [V, out, K]
    const auto weight_v = by_variable.contiguous();
    auto tables = at::empty({2, variables, out, classes}, opts);  // expm1(-W), expm1(+W)
    expm1_both(weight_v.data_ptr<T>(), weight_v.numel(), tables.data_ptr<T>() + weight_v.numel(), tables.data_ptr<T>());
    auto m = at::empty({variables, classes, padded_batch}, opts);
    const CategoricalParentArgs<T> p{logits_t.data_ptr<T>(), fired.data_ptr<T>(), ap,
                                     tables.data_ptr<T>(), weight_v.data_ptr<T>(), batch, padded_batch,
                                     variables, classes, out, m.data_ptr<T>()};
    const int64_t grain = std::max<int64_t>(1, kTermsPerThread / std::max<int64_t>(1, out * batch * classes));
    at::parallel_for(0, variables, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> base(out * padded_batch), sig(out * padded_batch), scored(out * padded_batch);
      auto flip = at::empty({out, padded_batch}, opts);
      for (int64_t var = begin; var < end; ++var) {
        if (categorical_parent_variable(p, var, base.data(), sig.data(), scored.data(), flip.data_ptr<T>())) {
          m.select(0, var).addmm_(weight_v.select(0, var).t(), flip);  // the flipped children's s W
        }
      }
    });
    // D = m - m at the actual class, per example
    const auto m_b = m.narrow(2, 0, batch).permute({2, 0, 1});  // [B, V, K]
    d.copy_(m_b - m_b.gather(2, a.unsqueeze(2)));
  });
  return d;
}

// ---------------------------------------------------------------------------------------------
// The HNCA learning signal per unit logit (hnca_kernels.functional.hnca_logit_credit, the
// reference): sign(d) * sigmoid(-s*l) * sigmoid(s*(l + d)) * (1 - e^-|d|), s = sign(d), in
// one pass. NOTE: the torch expression is 14 elementwise ops; replacing them (two hidden layers
// of 200 units, B=50) took the paper-shape training step from 3.67 to 3.54 ms (1 thread).

template <typename T>
Vectorized<T> logit_credit_vec(const Vectorized<T>& l, const Vectorized<T>& d) {
  using Vec = Vectorized<T>;
  const Vec one(T(1));
  const Vec s = Vec::blendv(one, one.neg(), d < Vec(T(0)));
  const Vec magnitude = expm1_pair(d.abs()).minus.neg();           // 1 - e^-|d|
  const Vec posterior = (one + (s * (l + d)).neg().exp()).reciprocal();  // sigmoid(s*(l + d))
  const Vec prior = (one + (s * l).exp()).reciprocal();                // sigmoid(-s*l)
  return s * magnitude * posterior * prior;
}

at::Tensor logit_credit(const at::Tensor& logits_in, const at::Tensor& d_in) {
  check_credit(logits_in, d_in);
  TORCH_CHECK_VALUE(logits_in.device().is_cpu(), "hnca: the CPU kernel got tensors that are not on the CPU");
  const auto dtype = compute_type(logits_in);
  const auto logits = logits_in.to(dtype).contiguous();
  const auto d = d_in.to(dtype).contiguous();
  auto out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(dtype, "hnca_logit_credit", [&] {
    parallel_map2([](Vectorized<scalar_t> l, Vectorized<scalar_t> dd) { return logit_credit_vec(l, dd); },
                  out.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), out.numel());
  });
  return out.to(logits_in.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// A Bernoulli layer's sample, hi where u < sigmoid(l) and lo elsewhere, bit for bit the torch
// expression of BernoulliLinear.sample: the same sigmoid (torch's, in float32), and u drawn as
// torch.rand_like(logits) draws it, from the generator's next numel() words in memory order by
// torch's own uniform transform. torch's uniform_ calls the generator once per element through
// its serial kernel (most of the five ops' time at the paper's shape); here the engine's words
// come in blocks (for_each_uniform_block, below).

// ATen's mt19937 regenerates its 624 words of state at once (the twist) and tempers one word per
// call; engine_words gives the next n words as n calls would, and leaves the engine where they
// leave it, with both steps on vectors. In the twist, word i takes words i + 1 and i + 397 (mod
// 624), the latter already regenerated for i >= 227: a vector of words reads only words of earlier
// vectors or not yet rewritten, so it keeps the scalar order's values.
inline uint32_t temper(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr int kWordLanes = sizeof(IntReg) / sizeof(uint32_t);

// words i .. i + kWordLanes - 1 of the twist, from the state words at i, i + 1 and `far`
inline void twist_words(uint32_t* state, int64_t i, const uint32_t* far) {
  const IntReg u = words_load(state + i), v = words_load(state + i + 1);
  const IntReg mixed = int_or(int_and(u, int_splat(int(at::UMASK))), int_and(v, int_splat(int(at::LMASK))));
  const IntReg odd = shift_right_signed<31>(shift_left<31>(v));  // all bits set where v is odd
  words_store(state + i, int_xor(words_load(far), int_xor(shift_right<1>(mixed),
                                                          int_and(odd, int_splat(int(at::MATRIX_A))))));
}

#endif

void temper_words(const uint32_t* from, uint32_t* to, int64_t n) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  for (; k + kWordLanes <= n; k += kWordLanes) {
    IntReg y = words_load(from + k);
    y = int_xor(y, shift_right<11>(y));
    y = int_xor(y, int_and(shift_left<7>(y), int_splat(int(0x9d2c5680u))));
    y = int_xor(y, int_and(shift_left<15>(y), int_splat(int(0xefc60000u))));
    words_store(to + k, int_xor(y, shift_right<18>(y)));
  }
#endif
  for (; k < n; ++k) to[k] = temper(from[k]);
}

void twist_state(uint32_t* state) {
  constexpr int64_t N = at::MERSENNE_STATE_N, M = at::MERSENNE_STATE_M;
  auto scalar = [&](int64_t i) {
    const uint32_t u = state[i], v = state[(i + 1) % N];
    state[i] = state[(i + M) % N] ^ ((((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ (v & 1 ? at::MATRIX_A : 0u));
  };
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  for (; i + kWordLanes <= N - M; i += kWordLanes) twist_words(state, i, state + i + M);
  for (; i < N - M; ++i) scalar(i);
  for (; i + kWordLanes < N; i += kWordLanes) twist_words(state, i, state + i + M - N);
#endif
  for (; i < N; ++i) scalar(i);
}

void engine_words(at::mt19937& engine, uint32_t* words, int64_t n) {
  at::mt19937_data_pod s = engine.data();
  uint32_t* state = s.state_.data();
  while (n > 0) {
    if (s.left_ == 1) {  // the call that finds left_ at 1 twists, then reads word 0
      twist_state(state);
      s.left_ = at::MERSENNE_STATE_N + 1;
      s.next_ = 0;
    }
    const int64_t take = std::min<int64_t>(n, s.left_ - 1);
    temper_words(state + s.next_, words, take);
    s.next_ += take;
    s.left_ -= take;
    words += take;
    n -= take;
  }
  engine.set_data(s);
}

// Words drawn ahead, handed to at::uniform_real_distribution as its generator's.
struct DrawnWords {
  const uint32_t* next;
  uint32_t random() { return *next++; }
};

// f(n0, u, count) for blocks of the next n uniforms of `generator` (the default one if none), u[k]
// in [0, 1) the (n0 + k)-th, as torch.rand draws them: its uniform transform of one engine word
// each. Under the generator's lock; the engine is put back after the last block.
template <typename F>
void for_each_uniform_block(const std::optional<at::Generator>& generator, int64_t n, F f) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  const at::uniform_real_distribution<float> uniform(0.f, 1.f);
  constexpr int64_t kDraws = 512;
  uint32_t words[kDraws];
  float u[kDraws];
  for (int64_t n0 = 0; n0 < n; n0 += kDraws) {
    const int64_t count = std::min(kDraws, n - n0);
    engine_words(engine, words, count);
    DrawnWords draws{words};
    for (int64_t k = 0; k < count; ++k) u[k] = uniform(&draws);
    f(n0, u, count);
  }
  gen->set_engine(engine);
}

at::Tensor bernoulli_sample(const at::Tensor& logits, double lo, double hi, at::ScalarType dtype,
                            std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "hnca: logits must be on the CPU, got ",
                    logits.device());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "hnca: logits must be floating, got ",
                   logits.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "hnca: dtype must be floating, got ", dtype);
  // rand_like fills a tensor of the logits' strides in memory order; contiguous logits keep
  // that order the element order
  TORCH_CHECK_VALUE(logits.is_contiguous(), "hnca: logits must be contiguous");
  TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo < hi,
                    "hnca: the values lo, hi must be finite with lo < hi");
  at::Tensor p = at::sigmoid(logits.to(at::kFloat));
  float* values = p.data_ptr<float>();  // the probabilities, overwritten by the sample
  const int64_t numel = p.numel();
  using Vec = Vectorized<float>;
  const Vec lo_v(static_cast<float>(lo)), hi_v(static_cast<float>(hi));
  // the comparisons are vector blends: a scalar u < p compiles to a branch, and a coin flip is
  // what no predictor learns
  for_each_uniform_block(generator, numel, [&](int64_t n0, const float* u, int64_t count) {
    for (int64_t k = 0; k < count; k += Vec::size()) {
      const int64_t c = std::min<int64_t>(Vec::size(), count - k);
      float* v = values + n0 + k;
      Vec::blendv(lo_v, hi_v, Vec::loadu(u + k, c) < Vec::loadu(v, c)).store(v, c);
    }
  });
  return p.to(dtype);  // the layer's values are exact in any floating type
}

// A softmax layer's sample, bit for bit CategoricalLinear.sample's torch expression: per variable
// (a row of K logits) one uniform u in (0, total] (rand's 0 taken as 1, times the last cumulative
// probability), drawn in row order as rand_like draws them, and the class is the number of
// cumulative probabilities below u. One pass for the expression's eight ops.

at::Tensor categorical_sample(const at::Tensor& logits, std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "hnca: logits must be on the CPU, got ",
                    logits.device());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "hnca: logits must be floating, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1,
                    "hnca: logits must have a last dimension of at least one class");
  const at::Tensor cdf = at::softmax(logits.to(at::kFloat), -1).cumsum_(-1).contiguous();
  const int64_t classes = cdf.size(-1), rows = cdf.numel() / classes;
  at::Tensor out = at::empty(cdf.sizes().slice(0, cdf.dim() - 1), cdf.options().dtype(at::kLong));
  const float* c = cdf.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  for_each_uniform_block(generator, rows, [&](int64_t r0, const float* u, int64_t count) {
    for (int64_t r = 0; r < count; ++r) {
      const float* row = c + (r0 + r) * classes;
      const float at = (u[r] == 0.f ? 1.f : u[r]) * row[classes - 1];
      int64_t below = 0;
      for (int64_t k = 0; k < classes; ++k) below += row[k] < at;
      o[r0 + r] = below;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The calling core's float32 multiply-add rate, lanes per second: the yardstick of the message's
// throughput (a narrow term is two multiply-adds, so the message's limit is half this rate in
// terms per second). kChains independent chains of this build's vectors hide the FMA latency on
// either instruction set (4 cycles x 2 ports needs 8) and leave registers for the constants.
// The best of the timed rounds within `seconds` is kept: a shared core only ever slows a round.

double fma_peak(double seconds) {
  TORCH_CHECK_VALUE(seconds > 0 && seconds <= 10, "hnca.fma_peak: seconds must be in (0, 10], got ", seconds);
  using Vec = Vectorized<float>;
  using Clock = std::chrono::steady_clock;
  constexpr int kChains = 12;
  constexpr int64_t kSteps = int64_t(1) << 16;  // ~0.2 ms a round at 50 G lanes/s
  // volatile: constants the compiler cannot fold; acc converges to b / (1 - a), no denormals
  volatile float a_in = 0.9999f, b_in = 1e-4f;
  const Vec a(a_in), b(b_in);
  Vec acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = Vec(float(c));
  double best = 0;
  const auto start = Clock::now();
  do {
    const auto t0 = Clock::now();
    for (int64_t n = 0; n < kSteps; ++n) {
      for (int c = 0; c < kChains; ++c) acc[c] = at::vec::fmadd(acc[c], a, b);
    }
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, double(kSteps) * kChains * Vec::size() / dt);
  } while (std::chrono::duration<double>(Clock::now() - start).count() < seconds);
  Vec sum(0.f);
  for (int c = 0; c < kChains; ++c) sum = sum + acc[c];
  float lanes[Vec::size()];
  sum.store(lanes);
  volatile float keep = lanes[0];  // the chains' results are used
  (void)keep;
  return best;
}

}  // namespace
}  // namespace hnca

// HNCA_NAMESPACE renames the ops' namespace (default hnca), so that two builds of these kernels
// can be loaded in one process and timed against each other (benchmarks/kernel_variants.py).
#ifndef HNCA_NAMESPACE
#define HNCA_NAMESPACE hnca
#endif
#define HNCA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define HNCA_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

HNCA_LIBRARY(HNCA_NAMESPACE, m) {
  // check: whether the parents' values are checked (the class indices always are: they are indices)
  m.def("bernoulli_log_ratio(Tensor x, Tensor weight, Tensor logits, Tensor y, float lo, float hi, bool check=True) "
        "-> Tensor");
  m.def("categorical_log_ratio(Tensor x, Tensor weight, Tensor logits, Tensor a, float lo, float hi, "
        "bool check=True) -> Tensor");
  m.def("entropy_delta(Tensor x, Tensor weight, Tensor logits, float lo, float hi, bool check=True) -> Tensor");
  m.def("log_ratio_and_entropy_delta(Tensor x, Tensor weight, Tensor logits, Tensor y, float lo, float hi, "
        "bool check=True) -> (Tensor, Tensor)");
  m.def("logit_credit(Tensor logits, Tensor d) -> Tensor");
  m.def("categorical_parent_log_ratio(Tensor a, Tensor weight, Tensor logits, Tensor y) -> Tensor");
  // drawn from a generator: torch.compile must not reorder, merge or replay them
  m.def("bernoulli_sample(Tensor logits, float lo, float hi, ScalarType dtype, Generator? generator=None) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  m.def("categorical_sample(Tensor logits, Generator? generator=None) -> Tensor", {at::Tag::nondeterministic_seeded});
  // no tensor argument, so no dispatch key: one kernel for all of them
  m.def("fma_peak(float seconds=0.05) -> float", &hnca::fma_peak);
}

HNCA_LIBRARY_IMPL(HNCA_NAMESPACE, CPU, m) {
  m.impl("bernoulli_log_ratio", &hnca::bernoulli_log_ratio);
  m.impl("categorical_log_ratio", &hnca::categorical_log_ratio);
  m.impl("entropy_delta", &hnca::entropy_delta);
  m.impl("log_ratio_and_entropy_delta", &hnca::log_ratio_and_entropy_delta);
  m.impl("logit_credit", &hnca::logit_credit);
  m.impl("categorical_parent_log_ratio", &hnca::categorical_parent_log_ratio);
  m.impl("bernoulli_sample", &hnca::bernoulli_sample);
  m.impl("categorical_sample", &hnca::categorical_sample);
}
