// Helpers shared by the CPU and CUDA kernels of hnca::* (see hnca_cpu.cpp for the design).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>

namespace hnca {

// A chunk of children whose summed bound w*max_i|W[j, i]| stays within kChunkRange keeps every
// partial product of its factors in [e^-4, e^4], where q = product - 1 loses at most e^4 ulp.
// NOTE: 4 still lets chunks of Glorot-initialised 1024-wide layers (w*max|W| ~ 0.11 with +-1
// units) hold ~37 children, so the one log1p per chunk costs little beside the products.
constexpr double kChunkRange = 4.0;

// Half and bfloat16 inputs are computed in float32; float64 stays float64.
inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// HNCA_POISON_OUTPUTS=1 fills outputs with NaN before a kernel runs, so that a test catches
// memory a kernel leaves unwritten.
inline at::Tensor new_output(const at::Tensor& x, at::ScalarType dtype) {
  auto out = at::empty(x.sizes(), x.options().dtype(dtype));
  const char* poison = std::getenv("HNCA_POISON_OUTPUTS");
  if (poison != nullptr && poison[0] == '1') {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

// Error messages here and in the kernels are string literals only, never formatted values.
// NOTE: on the H100 machine (torch 2.11, CUDA and CPU-only builds alike) a TORCH_CHECK whose
// message formatted numbers (c10::str through an ostringstream) crashed the process instead of
// raising; literal-only messages were raised as usual. Python adds the values where needed.
inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& logits) {
  TORCH_CHECK(x.device() == weight.device() && x.device() == logits.device(),
              "hnca: x, weight and logits must be on one device");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && logits.dim() == 2, "hnca: x, weight, logits must be 2-D");
  TORCH_CHECK(weight.size(1) == x.size(1) && logits.size(0) == x.size(0) && logits.size(1) == weight.size(0),
              "hnca: shapes of x [B, in], weight [out, in], logits [B, out] do not match");
}

}  // namespace hnca
