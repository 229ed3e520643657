// CUDA kernels of hnca::* (the CUDA dispatch key; the schemas live in hnca_cpu.cpp).
//
// Same math as the CPU kernels: one thread per (example, parent), a block is 32 parents (one
// warp: coalesced rows of W) x 8 examples, and each thread loops over the children. The
// Bernoulli factor's A - 1 = expm1(log A) is computed on the fly (a GPU has exp to spare, and
// no table means no extra memory); the chunking by kChunkRange depends on j only, so the warps
// never diverge on it. float16/bfloat16 inputs are computed in float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "hnca_common.h"

namespace hnca {
namespace {

constexpr int kParents = 32;
constexpr int kExamples = 8;

template <typename T>
__device__ T log_add_exp(T a, T b) {
  const T top = a > b ? a : b;
  return top + log1p(exp(-fabs(a - b)));
}

template <typename T>
__device__ T entropy(T z) {
  // H(z) = log1p(t) + |z| t / (1 + t), t = exp(-|z|)
  const T m = fabs(z), t = exp(-m);
  return log1p(t) + m * t / (T(1) + t);
}

// d[b, i] = sign * sum_j -log(1 + v*(A - 1)), A = exp(-s*W[j, i]*Delta)
template <typename T>
__global__ void bernoulli_kernel(const T* __restrict__ x, const T* __restrict__ weight, const bool* __restrict__ fired,
                                 const T* __restrict__ v, const T* __restrict__ log_u, const T* __restrict__ log_v,
                                 const T* __restrict__ bound, T w, T hi, int64_t batch, int64_t in, int64_t out,
                                 T* __restrict__ d) {
  const int64_t i = blockIdx.x * int64_t(kParents) + threadIdx.x;
  const int64_t b = blockIdx.y * int64_t(kExamples) + threadIdx.y;
  if (i >= in || b >= batch) return;
  const bool at_hi = x[b * in + i] == hi;
  T q = 0, logsum = 0, used = 0;
  for (int64_t j = 0; j < out; ++j) {
    const int64_t bj = b * out + j;
    const T ww = w * weight[j * in + i];
    const T log_a = (at_hi == fired[bj]) ? ww : -ww;
    const T r = bound[j];
    if (!(r <= T(kChunkRange))) {  // wide child: the log domain
      logsum += log_add_exp(log_u[bj], log_v[bj] + log_a);
      continue;
    }
    if (used + r > T(kChunkRange)) {
      logsum += log1p(q);
      q = 0;
      used = 0;
    }
    used += r;
    q = fma(expm1(log_a), fma(v[bj], q, v[bj]), q);  // q <- q + v*(A - 1)*(1 + q)
  }
  logsum += log1p(q);
  d[b * in + i] = at_hi ? logsum : -logsum;
}

// Fold z into the online logsumexp top + log1p(rest) (rest: the terms but the top one).
template <typename T>
__device__ void online_lse(T& top, T& rest, T z) {
  const T e = exp(-fabs(z - top));
  if (z > top) {
    rest = (rest + 1) * e;
    top = z;
  } else {
    rest += e;
  }
}

// d[b, i] = sign * (lse_k(z_k) - lse_k(z_k + Delta*(W[k, i] - W[a, i]))), z_k = l_k - l_a
template <typename T>
__global__ void categorical_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ logits,
                                   const int64_t* __restrict__ a, T w, T hi, int64_t batch, int64_t in,
                                   int64_t classes, T* __restrict__ d) {
  const int64_t i = blockIdx.x * int64_t(kParents) + threadIdx.x;
  const int64_t b = blockIdx.y * int64_t(kExamples) + threadIdx.y;
  if (i >= in || b >= batch) return;
  const bool at_hi = x[b * in + i] == hi;
  const T delta = at_hi ? -w : w;
  const T* l = logits + b * classes;
  const int64_t ab = a[b];
  const T own = weight[ab * in + i];
  T top = l[0] - l[ab], rest = 0;
  T top_cf = top + delta * (weight[i] - own), rest_cf = 0;
  for (int64_t k = 1; k < classes; ++k) {
    const T z = l[k] - l[ab];
    online_lse(top, rest, z);
    online_lse(top_cf, rest_cf, z + delta * (weight[k * in + i] - own));
  }
  const T ratio = (top + log1p(rest)) - (top_cf + log1p(rest_cf));
  d[b * in + i] = at_hi ? -ratio : ratio;
}

// d[b, i] = sign * sum_j H(l_j + Delta*W[j, i]) - H(l_j)
template <typename T>
__global__ void entropy_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ logits,
                               T w, T hi, int64_t batch, int64_t in, int64_t out, T* __restrict__ d) {
  const int64_t i = blockIdx.x * int64_t(kParents) + threadIdx.x;
  const int64_t b = blockIdx.y * int64_t(kExamples) + threadIdx.y;
  if (i >= in || b >= batch) return;
  const bool at_hi = x[b * in + i] == hi;
  const T delta = at_hi ? -w : w;
  T sum = 0;
  for (int64_t j = 0; j < out; ++j) {
    const T l = logits[b * out + j];
    sum += entropy(l + delta * weight[j * in + i]) - entropy(l);
  }
  d[b * in + i] = at_hi ? -sum : sum;
}

dim3 grid_for(int64_t batch, int64_t in) {
  return dim3(static_cast<unsigned>((in + kParents - 1) / kParents),
              static_cast<unsigned>((batch + kExamples - 1) / kExamples));
}

at::Tensor bernoulli_log_ratio(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                               const at::Tensor& y, double lo, double hi) {
  check_inputs(x_in, weight_in, logits_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dtype = compute_type(logits_in);
  const auto x = x_in.to(dtype).contiguous();
  const auto weight = weight_in.to(dtype).contiguous();
  const auto logits = logits_in.to(dtype);
  const auto fired = (y > 0).contiguous();
  const auto sl = at::where(fired, logits, -logits);  // s*l
  const auto v = at::sigmoid(-sl).contiguous();
  const auto log_u = at::log_sigmoid(sl).contiguous(), log_v = at::log_sigmoid(-sl).contiguous();
  const double w = hi - lo;
  auto d = new_output(x, dtype);
  const int64_t batch = x.size(0), in = x.size(1), out = weight.size(0);
  if (d.numel() == 0) return d;  // before amax, which rejects an empty row
  const auto bound = (weight.abs().amax(1) * w).contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "hnca_bernoulli_log_ratio_cuda", [&] {
    bernoulli_kernel<scalar_t><<<grid_for(batch, in), dim3(kParents, kExamples), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), fired.data_ptr<bool>(), v.data_ptr<scalar_t>(),
        log_u.data_ptr<scalar_t>(), log_v.data_ptr<scalar_t>(), bound.data_ptr<scalar_t>(), scalar_t(w),
        scalar_t(hi), batch, in, out, d.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

at::Tensor categorical_log_ratio(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                                 const at::Tensor& a_in, double lo, double hi) {
  check_inputs(x_in, weight_in, logits_in);
  TORCH_CHECK(a_in.dim() == 1 && a_in.size(0) == x_in.size(0), "hnca: a must have shape [B]");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dtype = compute_type(logits_in);
  const auto x = x_in.to(dtype).contiguous();
  const auto weight = weight_in.to(dtype).contiguous();
  const auto logits = logits_in.to(dtype).contiguous();
  const auto a = a_in.to(at::kLong).contiguous();
  auto d = new_output(x, dtype);
  const int64_t batch = x.size(0), in = x.size(1), classes = weight.size(0);
  if (d.numel() == 0) return d;
  AT_DISPATCH_FLOATING_TYPES(dtype, "hnca_categorical_log_ratio_cuda", [&] {
    categorical_kernel<scalar_t><<<grid_for(batch, in), dim3(kParents, kExamples), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), a.data_ptr<int64_t>(),
        scalar_t(hi - lo), scalar_t(hi), batch, in, classes, d.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

at::Tensor entropy_delta(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& logits_in,
                         double lo, double hi) {
  check_inputs(x_in, weight_in, logits_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dtype = compute_type(logits_in);
  const auto x = x_in.to(dtype).contiguous();
  const auto weight = weight_in.to(dtype).contiguous();
  const auto logits = logits_in.to(dtype).contiguous();
  auto d = new_output(x, dtype);
  const int64_t batch = x.size(0), in = x.size(1), out = weight.size(0);
  if (d.numel() == 0) return d;
  AT_DISPATCH_FLOATING_TYPES(dtype, "hnca_entropy_delta_cuda", [&] {
    entropy_kernel<scalar_t><<<grid_for(batch, in), dim3(kParents, kExamples), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), scalar_t(hi - lo),
        scalar_t(hi), batch, in, out, d.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d;
}

}  // namespace
}  // namespace hnca

TORCH_LIBRARY_IMPL(hnca, CUDA, m) {
  m.impl("bernoulli_log_ratio", &hnca::bernoulli_log_ratio);
  m.impl("categorical_log_ratio", &hnca::categorical_log_ratio);
  m.impl("entropy_delta", &hnca::entropy_delta);
}
