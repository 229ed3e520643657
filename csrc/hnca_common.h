// Helpers shared by the CPU and CUDA kernels of hnca::* (see hnca_cpu.cpp for the design).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <limits>

namespace hnca {

// A chunk of children whose summed bound w*max_i|W[j, i]| stays within kChunkRange keeps every
// partial product of its factors within e^4 of the product it starts from (1; in the CPU kernels'
// float32 with AVX2 or AVX-512, within [sqrt(1/2), sqrt(2))), where q = product - 1 loses at most
// e^4 (sqrt(2) e^4) ulp.
// 4 still lets chunks of Glorot-initialised 1024-wide layers (w*max|W| ~ 0.11 with +-1 units)
// hold ~37 children, so a chunk's end costs little beside the products.
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

// Every argument of a registered op is checked here, before a kernel reads it: the ops are public
// (torch.ops.hnca.*) and must never read out of bounds. Shapes, devices and values raise ValueError
// (TORCH_CHECK_VALUE), dtypes TypeError (TORCH_CHECK_TYPE), as hnca_kernels.functional does.
// Error messages here and in the kernels are string literals only, never formatted values: with
// torch 2.11 a TORCH_CHECK whose message formatted numbers (c10::str through an ostringstream)
// crashed the process instead of raising (benchmarks/RESULTS.md, the H100 session).
inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& logits, double lo,
                         double hi) {
  TORCH_CHECK_VALUE(x.device() == weight.device() && x.device() == logits.device(),
                    "hnca: x, weight and logits must be on one device");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && logits.dim() == 2, "hnca: x, weight, logits must be 2-D");
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1) && logits.size(0) == x.size(0) && logits.size(1) == weight.size(0),
                    "hnca: shapes of x [B, in], weight [out, in], logits [B, out] do not match");
  TORCH_CHECK_TYPE(x.is_floating_point() && weight.is_floating_point() && logits.is_floating_point(),
                   "hnca: x, weight and logits must be floating tensors");
  TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo < hi,
                    "hnca: the parent values lo, hi must be finite with lo < hi");
}

// The Bernoulli children's samples y [B, out] (fired where y > 0).
inline void check_children(const at::Tensor& y, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(y.device() == logits.device(), "hnca: y must be on the device of x, weight and logits");
  TORCH_CHECK_VALUE(y.sizes() == logits.sizes(), "hnca: y must have the shape of logits [B, out]");
  TORCH_CHECK_TYPE(!y.is_complex(), "hnca: y must be a real tensor");
}

// A softmax child's sampled classes a [B] (their range is checked where the kernel reads them).
inline void check_classes(const at::Tensor& a, const at::Tensor& x) {
  TORCH_CHECK_VALUE(a.device() == x.device(), "hnca: a must be on the device of x, weight and logits");
  TORCH_CHECK_VALUE(a.dim() == 1 && a.size(0) == x.size(0), "hnca: a must have shape [B]");
  TORCH_CHECK_TYPE(a.scalar_type() == at::kLong || a.scalar_type() == at::kInt,
                   "hnca: a must hold class indices (int64 or int32)");
}

// logit_credit's logits and d: one shape, one device, floating.
inline void check_credit(const at::Tensor& logits, const at::Tensor& d) {
  TORCH_CHECK_VALUE(logits.device() == d.device(), "hnca: logits and d must be on one device");
  TORCH_CHECK_VALUE(logits.sizes() == d.sizes(), "hnca: logits and d must have one shape");
  TORCH_CHECK_TYPE(logits.is_floating_point() && d.is_floating_point(), "hnca: logits and d must be floating tensors");
}

}  // namespace hnca

#ifdef HNCA_PYTHON_MODULE
// Built by setup.py as a Python extension module (each library includes this header in its one
// source): importing the module loads the library, whose static registrations add the ops; the
// module itself is empty. (The build on first use loads the library with
// torch.ops.load_library instead.)
#include <Python.h>
#define HNCA_CAT(a, b) a##b
#define HNCA_MODULE_INIT(name) HNCA_CAT(PyInit_, name)
extern "C" PyObject* HNCA_MODULE_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif
