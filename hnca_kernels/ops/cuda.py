"""CUDA backend: the kernels of ``csrc/hnca_cuda.cu``, registered for the CUDA dispatch key.

Same contract as ``hnca_kernels.ops.reference``. Its library is installed where setup.py found a
GPU and a CUDA toolkit, or built on first use where a toolkit is found (see ``_extension``).
"""

from __future__ import annotations

import torch

from . import _extension

# The same torch ops as the cpp backend: the dispatcher runs their CUDA kernels on CUDA tensors.
from .cpp import bernoulli_log_ratio, categorical_log_ratio, entropy_delta  # noqa: E402,F401

# The CUDA kernels check the parent values and class indices on the device (a device-side assert,
# no host synchronisation); hnca_kernels.functional then skips its own check.
CHECKS_PARENT_VALUES = True


def load_reason() -> str | None:
    return _extension.load_cuda()


def unsupported_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got {device.type} (use 'cpp')"
    return None
