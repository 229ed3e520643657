"""The numerical contract of the counterfactual ops, one for every backend.

Each op of ``hnca_kernels.functional`` equals the float64 reference (``hnca_kernels.ops.reference``,
run on the same inputs) within

    max |out - ref| <= rtol * max |ref| + atol

with (rtol, atol) by the dtype of the inputs below: relative to the message's largest entry, with
an absolute floor, so a message whose entries are all tiny is accurate in absolute terms (some
kernels do better: the C++ ones keep tiny Bernoulli messages exact to relative rounding; that is
a property of those kernels, not of the contract). Messages of float16 and bfloat16 inputs are
computed and returned in float32, so their tolerance is float32's. The contract holds for binary
parents, any finite logits, and weights with |W| * (hi - lo) up to 20 (beyond it a backend may
take the reference's path). A backend without a kernel for an op runs the reference's.
``tests/ops/test_conformance.py`` checks every backend that runs against it, on the same cases.
"""

from __future__ import annotations

import torch

TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (2e-5, 1e-6),
    torch.float16: (2e-5, 1e-6),
}

OPS = (
    "counterfactual_log_ratio",
    "categorical_counterfactual_log_ratio",
    "counterfactual_entropy_delta",
    "counterfactual_log_ratio_and_entropy_delta",
    "categorical_entropy_delta",
    "categorical_parent_log_ratio",
    "categorical_parent_entropy_delta",
    "hnca_logit_credit",
)


def within(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, float]:
    """(whether ``out`` meets the contract against ``ref`` for inputs of ``dtype``, the error, the bound)."""
    rtol, atol = TOLERANCE[dtype]
    ref = ref.double()
    error = float((out.double() - ref).abs().max()) if ref.numel() else 0.0
    bound = rtol * (float(ref.abs().max()) if ref.numel() else 0.0) + atol
    return error <= bound, error, bound
