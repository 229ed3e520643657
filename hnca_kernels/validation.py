"""Checks of tensor values (binary parents, class ranges, finite rewards): where they run.

A value check needs the values: on the CPU that is free, on a GPU ``bool(tensor)`` waits for the
device (a host synchronisation), which stalls the launch queue and cannot be captured in a CUDA
graph, and under ``torch.compile`` it is a data-dependent branch. So a check runs

    "host"    on the CPU, raising the ValueError that names the problem (the default for CPU
              tensors in eager code);
    "device"  as a device-side assert (``torch._assert_async``): no synchronisation; a failure
              stops the process with the same message (the default for GPU tensors and while
              torch.compile traces);
    "off"     not at all: for code that is known to pass them, e.g. a captured training step.

``hnca_kernels.checks(mode)`` chooses for a block of code; ``checks(None)`` is the default above.

>>> with hnca_kernels.checks("device"):   # a CPU step without host branches
...     loss = rec.surrogate_loss(reward)
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

MODES = ("host", "device", "off")
_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("hnca_checks", default=None)


@contextlib.contextmanager
def checks(mode: str | None):
    """Run value checks as ``mode`` ("host", "device", "off"; None: by device) inside the block."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown checks mode {mode!r}; choose one of {', '.join(MODES)} or None")
    if torch.compiler.is_compiling():  # ContextVar.set is not traceable: compiled code asserts on the device
        yield
        return
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def current_mode(device: torch.device) -> str:
    mode = _mode.get()
    if torch.compiler.is_compiling():
        return "off" if mode == "off" else "device"
    if mode is not None:
        return mode
    return "host" if device.type == "cpu" else "device"


def require(device: torch.device, good, error: Exception) -> None:
    """Check that ``good()`` (a one-element bool tensor on ``device``, computed only when a check
    runs) holds; else raise ``error`` ("host") or assert on the device with its message ("device")."""
    mode = current_mode(device)
    if mode == "off":
        return
    if mode == "device":
        torch._assert_async(good(), f"hnca: {error}")
    elif not good():
        raise error
