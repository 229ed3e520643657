"""C++ backend: the fused CPU kernels of ``csrc/hnca_cpu.cpp`` (torch ops ``hnca::*``).

Same contract as ``hnca_kernels.ops.reference``; built on first use (see ``_extension``).
"""

from __future__ import annotations

import torch

from . import _extension, bad_parent_values

# The ops check that x holds only lo and hi (and, for the softmax child, the class range);
# hnca_kernels.functional then skips its own check.
CHECKS_PARENT_VALUES = True


def _call(op, *args, lo, hi, classes=None):
    """op(*args), its bad-value errors (RuntimeError with a fixed text) raised as ValueError."""
    try:
        return op(*args)
    except RuntimeError as exc:
        message = str(exc)
        if "must hold only the parent values" in message:
            raise bad_parent_values(lo, hi) from None
        if "must hold class indices" in message:
            raise ValueError(f"a must hold class indices in [0, {classes})") from None
        raise


def load_reason() -> str | None:
    return _extension.load()[0]


def unsupported_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only, got {device.type} (use 'cuda' or 'triton')"
    return None


def bernoulli_log_ratio(x, weight, logits, y, lo, hi):
    return _call(torch.ops.hnca.bernoulli_log_ratio, x, weight, logits, y, lo, hi, lo=lo, hi=hi)


def categorical_log_ratio(x, weight, logits, a, lo, hi):
    return _call(torch.ops.hnca.categorical_log_ratio, x, weight, logits, a, lo, hi, lo=lo, hi=hi,
                 classes=weight.shape[0])


def entropy_delta(x, weight, logits, lo, hi):
    return _call(torch.ops.hnca.entropy_delta, x, weight, logits, lo, hi, lo=lo, hi=hi)


def logit_credit(logits, d):
    """``functional.hnca_logit_credit`` in one fused pass (the optional backend hook)."""
    return torch.ops.hnca.logit_credit(logits, d)
