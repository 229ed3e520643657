"""Backend registry for the counterfactual reductions (the hot path of HNCA).

Every backend module implements the same three functions with one numerical contract
(see ``hnca_kernels.ops.reference`` for the specification):

    bernoulli_log_ratio(x, weight, logits, y, lo, hi) -> d [B, in]
    categorical_log_ratio(x, weight, logits, a, lo, hi) -> d [B, in]
    entropy_delta(x, weight, logits, lo, hi) -> d [B, in]

and ``unsupported_reason(device) -> str | None`` saying why it cannot run on a device.
Further ops (``logit_credit``, ``categorical_entropy_delta``, ``categorical_parent_log_ratio``)
are optional: a backend without one runs the reference's (``hnca_kernels.ops.contract``); and
a backend without ``bernoulli_log_ratio_and_entropy_delta`` (both messages of a sampled Bernoulli
child layer in one call) runs its two ops.
Inputs reach a backend already checked by ``hnca_kernels.functional``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")

# Fastest first, per device type, for ``backend=None``: on a GPU whole HNCA steps run faster with
# the CUDA kernels than with Triton's (benchmarks/RESULTS.md, the H200 session).
_AUTO_ORDER = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("hnca_backend", default=None)
_loaded: dict[str, ModuleType] = {}
_load_errors: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for by name but cannot run here."""


def _load(name: str) -> ModuleType | None:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(f"hnca_kernels.ops.{name}")
        reason = module.load_reason() if hasattr(module, "load_reason") else None
    except Exception as exc:  # an import or build failure is a reason, not a crash
        reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        _load_errors[name] = reason
        return None
    _loaded[name] = module
    return module


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run (on ``device`` if given), or None if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    module = _load(name)
    if module is None:
        return _load_errors[name]
    if device is not None:
        return module.unsupported_reason(torch.device(device))
    return None


def is_available(name: str, device: torch.device | str | None = None) -> bool:
    return unavailable_reason(name, device) is None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here (on ``device`` if given)."""
    return [name for name in BACKENDS if is_available(name, device)]


def get_backend(name: str | None, device: torch.device) -> ModuleType:
    """The backend module to use for tensors on ``device``.

    ``name=None`` takes the ``use_backend`` default, else the fastest available one.
    A backend asked for by name that cannot run raises ``BackendUnavailableError``.
    """
    return _loaded[_choose(name if name is not None else _default.get(), device.type)]


def _choose(name: str | None, device_type: str) -> str:
    """The name of the backend to use (loaded), for a name or None on a device type.

    torch.compile runs it once while tracing and keeps its answer, so the imports and the build
    behind a backend's first use are never traced (see the marking below).
    """
    if name is None:
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if is_available(candidate, device_type):
                return candidate
        name = "reference"
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available on {device_type}: {reason}")
    return name


# What torch.compiler.assume_constant_result(_choose) does, without its import of torch._dynamo
# (which would double the time `import hnca_kernels` takes)
_choose._dynamo_marked_constant = True


def draws_in_cpp(logits: torch.Tensor) -> bool:
    """Whether the C++ ops ``hnca::bernoulli_sample`` and ``hnca::categorical_sample`` draw the
    layers' samples from ``logits``: contiguous CPU logits, the reference not asked for, outside
    torch.compile's tracing, and the cpp backend already loaded (by a message pass: a forward alone
    never loads, let alone builds, a backend). They draw bit for bit the samples of the layers'
    torch expressions (the same generator words, the same sigmoid and softmax), in one op where
    the expressions take five to eight."""
    return (logits.device.type == "cpu" and "cpp" in _loaded and logits.is_contiguous()
            and _default.get() != "reference" and not torch.compiler.is_compiling())


@contextlib.contextmanager
def use_backend(name: str | None):
    """Make ``name`` the default backend inside the ``with`` block (None: automatic).

    >>> with hnca_kernels.use_backend("reference"):
    ...     loss = model.surrogate_loss(reward)
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    token = _default.set(name)
    try:
        yield
    finally:
        _default.reset(token)
