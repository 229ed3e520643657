"""Loads the C++ and CUDA libraries that register the torch ops ``hnca::*``, once per process.

``pip install --no-build-isolation .`` builds them at install time (setup.py): the CPU library
``hnca_kernels._cpu_<capability>`` for the vector instructions torch dispatches to on the machine
(AVX512, AVX2 or none), and ``hnca_kernels._cuda`` where a GPU and a CUDA toolkit were present.
Where the installed library is missing (an install without torch in its build, a source
checkout, another machine's capability), the sources (``csrc/``, installed as
``hnca_kernels/csrc``) are compiled on first use with ``torch.utils.cpp_extension.load`` into
torch's extensions cache (``TORCH_EXTENSIONS_DIR`` overrides it), announced in one line. The CUDA
library is separate: its failure leaves the CPU ops working; ``HNCA_NO_CUDA=1`` never loads it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from . import _build

_PACKAGE = Path(__file__).resolve().parent.parent
# installed: hnca_kernels/csrc (package data); source checkout: the repository's csrc/
_SOURCE_DIRS = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")


def source_dir() -> Path:
    for candidate in _SOURCE_DIRS:
        if (candidate / _build.CPU_SOURCE).is_file():
            return candidate
    raise FileNotFoundError(f"hnca C++ sources not found in {' or '.join(map(str, _SOURCE_DIRS))}")


class _NoCudaRuntimeWarning(logging.Filter):
    """Drops the one record torch.utils.cpp_extension logs at import on a machine with a CUDA
    toolkit but no GPU ("No CUDA runtime is found, using CUDA_HOME=..."): every command that
    built or loaded the CPU kernels printed it, and it says nothing about them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without that warning (its module-level CUDA_HOME
    search runs once, at the first import)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaRuntimeWarning()
    logger.addFilter(quiet)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


def _installed(module: str) -> bool:
    """Import an installed library (its import registers the ops); False if it is not there, or
    was built against another torch than this one (setup.py writes the version beside it): loading
    it could not be undone, so the version is read first."""
    built_for = _PACKAGE / f"{module}.torch"
    if not built_for.is_file() or built_for.read_text().strip() != torch.__version__:
        return False
    try:
        importlib.import_module(f"hnca_kernels.{module}")
    except ImportError:
        return False
    return True


class NoCompilerError(RuntimeError):
    """No C++ compiler to build the kernels with."""


def _compiler_missing() -> str | None:
    """Why no C++ build can start (torch's builder would print a banner and a ninja log), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not found (install g++, or name one in CXX)"
    return None


def _one_line(exc: BaseException) -> str:
    """A build failure in one line: the compiler's first error where the log has one, else the
    exception's first line (HNCA_VERBOSE_BUILD=1 prints the whole build)."""
    text = str(exc)
    if isinstance(exc, NoCompilerError):
        return text
    errors = [line.strip() for line in text.splitlines() if re.search(r":\s*(fatal )?error:", line)]
    line = errors[0] if errors else (text.strip().splitlines() or [""])[0]
    line = line if len(line) <= 240 else line[:237] + "..."
    built = "Error building extension" in text or "ninja" in text  # a load failure has no build log
    return f"{type(exc).__name__}: {line}" + ("; HNCA_VERBOSE_BUILD=1 shows the build" if built else "")


def _built_before(name: str, sources: list) -> bool:
    """Whether torch's extension cache holds a build of ``name`` newer than its sources (then
    loading it takes a moment, and nothing is announced)."""
    try:
        library = Path(_cpp_extension()._get_build_directory(name, verbose=False)) / f"{name}.so"
    except Exception:  # a private helper of torch's: without it, announce every build
        return False
    if not library.exists():
        return False
    newest = max(Path(s).stat().st_mtime for s in [*sources, *Path(sources[0]).parent.glob("*.h")])
    return library.stat().st_mtime >= newest


def _build_now(name: str, sources: list, what: str, **options) -> None:
    missing = _compiler_missing()
    if missing is not None:
        raise NoCompilerError(missing)
    if not _built_before(name, sources):
        print(f"hnca: building the {what} (first use, about 30 s; "
              "pip install --no-build-isolation builds them at install time)", file=sys.stderr, flush=True)
    _cpp_extension().load(name=name, sources=sources, is_python_module=False,
                          verbose=os.environ.get("HNCA_VERBOSE_BUILD") == "1", **options)


@functools.lru_cache(maxsize=None)
def load_cpu() -> str | None:
    """Why the CPU ops could not be loaded or built, or None. Runs once per process; a failure
    warns once and the cpp backend reports it."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        if not _installed(_build.cpu_module(capability)):
            _build_now(f"hnca_ops{_build.cpu_module(capability)}", [str(source_dir() / _build.CPU_SOURCE)],
                       f"hnca C++ kernels for {capability}", extra_cflags=_build.cxx_flags(capability),
                       extra_ldflags=_build.LINK_FLAGS)
        _register_fake()
        return None
    except Exception as exc:  # a failed build is a reason to fall back, said once
        reason = f"the hnca C++ kernels failed to build or load ({_one_line(exc)})"
        warnings.warn(f"{reason}; the 'cpp' and 'cuda' backends are unavailable, using 'reference'", stacklevel=2)
        return reason


@functools.lru_cache(maxsize=None)
def load_cuda() -> str | None:
    """Why the CUDA ops could not be loaded or built, or None (the CPU ops are loaded first: they
    define the ops the CUDA library implements)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if os.environ.get("HNCA_NO_CUDA") == "1":
        return "HNCA_NO_CUDA=1"
    reason = load_cpu()
    if reason is not None:
        return reason
    if _installed(_build.CUDA_MODULE):
        return None
    if _cpp_extension().CUDA_HOME is None:
        return "the CUDA kernels are not installed and no CUDA toolkit is found to build them"
    try:
        _build_now("hnca_ops_cuda", [str(source_dir() / _build.CUDA_SOURCE)], "hnca CUDA kernels",
                   extra_cflags=["-O3"], extra_cuda_cflags=_build.NVCC_FLAGS)
        return None
    except Exception as exc:
        reason = f"the hnca CUDA kernels failed to build or load ({_one_line(exc)})"
        warnings.warn(f"{reason}; the 'cuda' backend is unavailable (the CPU ops are not affected)", stacklevel=2)
        return reason


def _require(ok: bool, error, message: str) -> None:
    if not ok:
        raise error(f"hnca: {message}")


def _check_message(x, weight, logits, lo, hi) -> None:
    """The C++ ops' argument checks (csrc/hnca_common.h), for their fake (meta) implementations."""
    _require(x.device == weight.device == logits.device, ValueError, "x, weight and logits must be on one device")
    _require(x.dim() == weight.dim() == logits.dim() == 2, ValueError, "x, weight, logits must be 2-D")
    _require(weight.shape[1] == x.shape[1] and logits.shape == (x.shape[0], weight.shape[0]), ValueError,
             "shapes of x [B, in], weight [out, in], logits [B, out] do not match")
    _require(x.is_floating_point() and weight.is_floating_point() and logits.is_floating_point(), TypeError,
             "x, weight and logits must be floating tensors")
    _require(math.isfinite(lo) and math.isfinite(hi) and lo < hi, ValueError,
             "the parent values lo, hi must be finite with lo < hi")


def _register_fake() -> None:
    """Shapes and dtypes of the ops' outputs, for torch.compile and opcheck, after the same
    argument checks as the kernels."""

    def output(x):
        return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))

    def bernoulli(x, weight, logits, y, lo, hi, check=True):
        _check_message(x, weight, logits, lo, hi)
        _require(y.device == logits.device, ValueError, "y must be on the device of x, weight and logits")
        _require(y.shape == logits.shape, ValueError, "y must have the shape of logits [B, out]")
        _require(not y.is_complex(), TypeError, "y must be a real tensor")
        return output(x)

    def bernoulli_and_entropy(x, weight, logits, y, lo, hi, check=True):
        return bernoulli(x, weight, logits, y, lo, hi), output(x)

    def categorical(x, weight, logits, a, lo, hi, check=True):
        _require(logits.dim() in (2, 3), ValueError, "logits must be [B, K] or [B, V, K]")
        _require(a.dim() == logits.dim() - 1 and (logits.dim() == 2 or a.shape[-1] == logits.shape[1]),
                 ValueError, "a must have shape [B] for logits [B, K], or [B, V] for logits [B, V, K]")
        _check_message(x, weight, logits.reshape(logits.shape[0], -1), lo, hi)
        _require(a.device == x.device, ValueError, "a must be on the device of x, weight and logits")
        _require(a.shape[0] == x.shape[0], ValueError, "a must have shape [B] (or [B, V])")
        _require(a.dtype in (torch.int64, torch.int32), TypeError, "a must hold class indices (int64 or int32)")
        return output(x)

    def entropy(x, weight, logits, lo, hi, check=True):
        _check_message(x, weight, logits, lo, hi)
        return output(x)

    def credit(logits, d):
        _require(logits.device == d.device, ValueError, "logits and d must be on one device")
        _require(logits.shape == d.shape, ValueError, "logits and d must have one shape")
        _require(logits.is_floating_point() and d.is_floating_point(), TypeError,
                 "logits and d must be floating tensors")
        return torch.empty_like(logits)

    def categorical_parents(a, weight, logits, y):
        _require(a.device == weight.device == logits.device == y.device, ValueError,
                 "a, weight, logits and y must be on one device")
        _require(a.dim() == weight.dim() == logits.dim() == y.dim() == 2, ValueError,
                 "a [B, V], weight [out, V*K], logits and y [B, out] must be 2-D")
        _require(a.dtype in (torch.int64, torch.int32), TypeError, "a must hold class indices (int64 or int32)")
        _require(a.shape[1] > 0 and weight.shape[1] % a.shape[1] == 0 and weight.shape[1] > 0, ValueError,
                 "weight must be [out, V*K] for a of shape [B, V]")
        _require(logits.shape == (a.shape[0], weight.shape[0]) and y.shape == logits.shape, ValueError,
                 "logits and y must be [B, out] for a [B, V] and weight [out, V*K]")
        return logits.new_empty(a.shape[0], a.shape[1], weight.shape[1] // a.shape[1],
                                dtype=torch.promote_types(logits.dtype, torch.float32))

    def sampled_logits(logits):
        _require(logits.is_floating_point(), TypeError, "logits must be floating")

    def bernoulli_sample(logits, lo, hi, dtype, generator=None):
        sampled_logits(logits)
        _require(dtype.is_floating_point, TypeError, "dtype must be floating")
        _require(logits.is_contiguous(), ValueError, "logits must be contiguous")
        _require(math.isfinite(lo) and math.isfinite(hi) and lo < hi, ValueError,
                 "the values lo, hi must be finite with lo < hi")
        return logits.new_empty(logits.shape, dtype=dtype)

    def categorical_sample(logits, generator=None):
        sampled_logits(logits)
        _require(logits.dim() >= 1 and logits.shape[-1] >= 1, ValueError,
                 "logits must have a last dimension of at least one class")
        return logits.new_empty(logits.shape[:-1], dtype=torch.int64)

    for op, fake in (("bernoulli_log_ratio", bernoulli), ("categorical_log_ratio", categorical),
                     ("entropy_delta", entropy), ("log_ratio_and_entropy_delta", bernoulli_and_entropy),
                     ("logit_credit", credit),
                     ("categorical_parent_log_ratio", categorical_parents),
                     ("bernoulli_sample", bernoulli_sample), ("categorical_sample", categorical_sample)):
        torch.library.register_fake(f"hnca::{op}", fake)
