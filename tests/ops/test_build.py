"""How the C++ ops are loaded: the library built at install time, a build on first use where it is
missing, a failed build as one warning and the reference backend, no CUDA warning on a CPU."""

import subprocess
import sys

import pytest
import torch

import hnca_kernels
from hnca_kernels import backends
from hnca_kernels import functional as Fn
from hnca_kernels.ops import reference
from test_cpp_kernels import make_layer

def test_build_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    """No installed library and a compiler that fails: one warning, the reference computes, and
    asking for cpp by name says why."""
    from hnca_kernels.ops import _extension

    def broken_build(**kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(_extension, "_installed", lambda module: False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_build)
    _extension.load_cpu.cache_clear()
    monkeypatch.setattr(backends, "_loaded", {"reference": backends._load("reference")})
    monkeypatch.setattr(backends, "_load_errors", {})
    try:
        with pytest.warns(UserWarning, match="compiler exploded") as record:
            assert "compiler exploded" in backends.unavailable_reason("cpp", "cpu")
            x, weight, logits, y, _, pv = make_layer((3, 4, 5), "01", "small")
            out = Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv)  # automatic choice
            Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv)
        assert len([w for w in record if "compiler exploded" in str(w.message)]) == 1
        torch.testing.assert_close(out, reference.bernoulli_log_ratio(x, weight, logits, y, *pv))
        with pytest.raises(hnca_kernels.BackendUnavailableError, match="compiler exploded"):
            Fn.counterfactual_log_ratio(x, weight, logits, y, parent_values=pv, backend="cpp")
    finally:
        _extension.load_cpu.cache_clear()  # the next load finds the real library


def _python(code: str, **env):
    import os

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return run


def test_an_installed_library_loads_without_a_build():
    """Where ``pip install --no-build-isolation`` built the CPU library, using the ops builds nothing
    and prints nothing; the first forward of a layer never touches the ops at all."""
    from hnca_kernels.ops import _build

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        __import__(f"hnca_kernels.{_build.cpu_module(capability)}")
    except ImportError:
        pytest.skip("no library was installed for this machine (an install without torch in its build)")
    run = _python("import torch, hnca_kernels\n"
                  "from hnca_kernels import functional as Fn, BernoulliLinear\n"
                  "import hnca_kernels.ops._extension as e\n"
                  "h = BernoulliLinear(3, 2)(torch.randn(4, 3))\n"
                  "assert e.load_cpu.cache_info().currsize == 0  # a forward loads no backend\n"
                  "x = torch.ones(2, 3)\n"
                  "Fn.counterfactual_log_ratio(x, torch.zeros(4, 3), torch.zeros(2, 4), torch.zeros(2, 4), backend='cpp')\n"
                  "print('ok')\n", TORCH_EXTENSIONS_DIR="/nonexistent/extensions")
    assert run.stdout.strip() == "ok" and "building" not in run.stderr, run.stderr


def test_cpu_machines_get_no_cuda_runtime_warning():
    """Importing torch.utils.cpp_extension on a machine with a CUDA toolkit and no GPU logs
    "No CUDA runtime is found"; building and using the cpp backend must not print it."""
    code = (
        "import torch, hnca_kernels\n"
        "from hnca_kernels import functional as Fn\n"
        "x = torch.ones(2, 3)\n"
        "out = Fn.counterfactual_log_ratio(x, torch.zeros(4, 3), torch.zeros(2, 4), torch.zeros(2, 4), backend='cpp')\n"
        "assert out.shape == (2, 3)\n"
        "print('ok')\n"
    )
    run = _python(code)
    assert run.stdout.strip().endswith("ok")
    assert "No CUDA runtime" not in run.stderr, run.stderr




def test_no_compiler_is_one_line_and_builds_nothing(monkeypatch, capsys):
    """CXX naming no program: no build starts (no banner, no build log), one single-line warning."""
    from hnca_kernels.ops import _extension

    def build(**kwargs):
        raise AssertionError("a build started without a compiler")

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(_extension, "_installed", lambda module: False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", build)
    _extension.load_cpu.cache_clear()
    try:
        with pytest.warns(UserWarning) as record:
            reason = _extension.load_cpu()
        assert "no C++ compiler: '/nonexistent/c++' is not found" in reason
        assert len(record) == 1 and "\n" not in str(record[0].message)
        assert capsys.readouterr().err == ""  # not even the "building" line
    finally:
        _extension.load_cpu.cache_clear()


def test_a_failed_build_is_summarised_in_one_line():
    from hnca_kernels.ops._extension import _one_line

    log = ("Error building extension 'hnca_ops': [1/2] c++ -c hnca_cpu.cpp\nFAILED: hnca_cpu.o\n"
           "/usr/bin/c++ -MMD ...\nhnca_cpu.cpp:12:3: error: 'foo' was not declared in this scope\n"
           "ninja: build stopped: subcommand failed.")
    line = _one_line(RuntimeError(log))
    assert line.endswith("; HNCA_VERBOSE_BUILD=1 shows the build")
    assert line.startswith("RuntimeError: hnca_cpu.cpp:12:3: error: 'foo' was not declared") and "\n" not in line
    assert _one_line(OSError("libfoo.so: cannot open shared object file")) == \
        "OSError: libfoo.so: cannot open shared object file"  # a load failure: no build to show
