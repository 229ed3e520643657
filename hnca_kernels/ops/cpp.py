"""C++ backend: the fused CPU kernels of ``csrc/hnca_cpu.cpp`` (torch ops ``hnca::*``).

Same contract as ``hnca_kernels.ops.reference``; built on first use (see ``_extension``).
"""

from __future__ import annotations

import torch

from .. import validation
from . import _extension
from .matmul import categorical_entropy_delta  # noqa: F401  (matrix products, see ops/matmul.py)

# The ops check every argument (shapes, devices, dtypes: ValueError/TypeError from TORCH_CHECK_VALUE
# and TORCH_CHECK_TYPE) and that x holds only lo and hi (and, for the softmax child, the class
# range); hnca_kernels.functional then skips its own value check.
CHECKS_PARENT_VALUES = True
# categorical_log_ratio takes V softmax variables at once (logits [B, V, K])
CATEGORICAL_VARIABLES = True


def load_reason() -> str | None:
    return _extension.load_cpu()


def unsupported_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only, got {device.type} (use 'cuda' or 'triton')"
    return None


def _check(x) -> bool:
    """Whether the ops check the parents' values: ``hnca_kernels.checks`` (off: not at all)."""
    return validation.current_mode(x.device) != "off"


def bernoulli_log_ratio(x, weight, logits, y, lo, hi):
    return torch.ops.hnca.bernoulli_log_ratio(x, weight, logits, y, lo, hi, _check(x))


def categorical_log_ratio(x, weight, logits, a, lo, hi):
    return torch.ops.hnca.categorical_log_ratio(x, weight, logits, a, lo, hi, _check(x))


def entropy_delta(x, weight, logits, lo, hi):
    return torch.ops.hnca.entropy_delta(x, weight, logits, lo, hi, _check(x))


def bernoulli_log_ratio_and_entropy_delta(x, weight, logits, y, lo, hi):
    """Both messages of a sampled Bernoulli child layer in one pass (the optional backend hook):
    about the entropy delta's time, the log-ratio's products being the entropy's."""
    return torch.ops.hnca.log_ratio_and_entropy_delta(x, weight, logits, y, lo, hi, _check(x))


def logit_credit(logits, d):
    """``functional.hnca_logit_credit`` in one fused pass (the optional backend hook)."""
    return torch.ops.hnca.logit_credit(logits, d)


def categorical_parent_log_ratio(a, weight, logits, y):
    """Categorical parents' message, every variable in one call; Bernoulli children only (a softmax
    child takes the per-variable path of ``functional``)."""
    return torch.ops.hnca.categorical_parent_log_ratio(a, weight, logits, y)


def fma_peak(seconds: float = 0.05) -> float:
    """The calling core's float32 multiply-add rate in lanes per second, measured by a loop of
    independent vector FMA chains of this build's vector width for about ``seconds``: the
    yardstick of the messages' throughput (a narrow Bernoulli term is two multiply-adds)."""
    return torch.ops.hnca.fma_peak(float(seconds))
