"""Grid: method x phase x shape, each phase timed on its own (benchmarks/phases.py says what each
one runs), in pytest-benchmark groups "<shape>: <phase>" so each table puts the methods side by side.

- methods: HNCA on every backend that runs here (``hnca-reference``, ``hnca-cpp``; on a GPU
  ``hnca-triton``, ``hnca-cuda``), ``reinforce``, and ``backprop`` of the same-shaped
  deterministic network (sigmoid MLP, cross-entropy)
- phases: ``forward``, ``backward``, ``optimizer`` (Adam; one case per network: ``stochastic``
  and ``backprop``), ``step``; HNCA's backward in its parts ``message_pass``, ``surrogate``,
  ``autograd``; one hidden layer's ``message`` against the forward ``gemm`` of its shape
- shapes: ``paper`` (B=50, 784-200-200-200-10), ``scale`` (B=256, 784-1024-1024-1024-10), and
  on a GPU only ``gpu`` (B=4096, 4096-wide)

A phase that needs a fresh forward gets it in ``benchmark.pedantic``'s setup, untimed.
Not part of the default test run (testpaths is tests/); see benchmarks/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hnca_kernels import functional as Fn
from hnca_kernels.backends import is_available
from phases import BACKENDS, SHAPES, batch, hnca_net, method, phase_call, sync

METHODS = tuple(f"hnca-{b}" for b in BACKENDS) + ("reinforce", "backprop")
# rounds of one call per case (the auto-calibrated cases, message and gemm, choose their own)
ROUNDS = {"paper": 100, "scale": 20, "gpu": 10}  # gpu: repeats to 1% (RESULTS.md)


def device_for(shape):
    return "cuda" if shape == "gpu" or torch.cuda.is_available() else "cpu"


def skip_unless_runs(name, shape, phase):
    """The device for ``name`` (a method) at ``shape``, or a skip saying why it does not run."""
    device = device_for(shape)
    if shape == "gpu" and not torch.cuda.is_available():
        pytest.skip("the 4096-wide shape runs on a GPU only")
    backend = name.partition("-")[2] if name.startswith("hnca-") else None
    if backend is not None and not is_available(backend, device):
        pytest.skip(f"{backend} does not run on {device}")
    if name == "hnca-reference" and shape != "paper" and phase != "forward":
        pytest.skip("the reference backward at this shape takes seconds and gigabytes per step; "
                    "its one-layer message is measured")
    return device


def rounds_for(name, shape):
    return max(3, ROUNDS[shape] // 5) if name == "hnca-reference" else ROUNDS[shape]


def phase_cases():
    """(shape, method, phase) with the phases of one method adjacent, so that a ratio of two of
    them is measured within a minute (the machine's speed drifts over a run)."""
    for shape in SHAPES:
        for name in METHODS:
            phases = ["forward", "backward"]
            if name.startswith("hnca-"):
                phases.append("message_pass")
            if name != "backprop":
                phases += ["surrogate", "autograd"]
            for phase in phases + ["step"]:
                yield pytest.param(shape, name, phase, id=f"{shape}-{name}-{phase}")


@pytest.mark.parametrize("shape, name, phase", list(phase_cases()))
def test_phase(timed, shape, name, phase):
    """One phase of one method's training step; a phase after the forward gets a fresh forward
    (its record, reward, baseline and cleared grads) in the untimed setup of every round."""
    device = skip_unless_runs(name, shape, phase)
    B, widths = SHAPES[shape]
    m = method(name, widths, device)
    setup, fn = phase_call(m, phase, *batch(B, widths, device), device)
    timed(shape, phase, name, fn, setup=setup, rounds=rounds_for(name, shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("net", ["stochastic", "backprop"])
def test_optimizer(timed, net, shape):
    """Adam's step after a backward (REINFORCE's for the stochastic net: HNCA's parameters and
    Adam's work are the same)."""
    name = "backprop" if net == "backprop" else "reinforce"
    device = skip_unless_runs(name, shape, "optimizer")
    B, widths = SHAPES[shape]
    m = method(name, widths, device)
    setup, fn = phase_call(m, "optimizer", *batch(B, widths, device), device)
    timed(shape, "optimizer", net, fn, setup=setup, rounds=ROUNDS[shape])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_message(timed, note, backend, shape):
    """The middle hidden layer's message to its parents (``counterfactual_log_ratio``), the hot
    path of HNCA, for the ratio against ``test_gemm``."""
    device = device_for(shape)
    if shape == "gpu" and not torch.cuda.is_available():
        pytest.skip("the 4096-wide shape runs on a GPU only")
    if not is_available(backend, device):
        pytest.skip(f"{backend} does not run on {device}")
    if backend == "reference" and shape == "gpu":
        pytest.skip("the reference message at this shape would materialise 4096^3 terms (275 GB)")
    torch.manual_seed(0)
    B, widths = SHAPES[shape]
    net = hnca_net(widths, device)
    x, _ = batch(B, widths, device)
    h = net[0](x)
    layer = net[1]
    logits = layer.logits(h).detach()
    y = layer.sample(logits)
    note(f"{shape}/message/{backend}/elements", str(B * widths[1] * widths[2]))
    if backend == "cpp":  # the yardstick of the CPU messages' throughput, measured on this core
        from hnca_kernels.ops import cpp

        note("cpu/fma_peak", str(cpp.fma_peak(0.2)))

    def fn():
        Fn.counterfactual_log_ratio(h, layer.weight.detach(), logits, y, parent_values=(-1.0, 1.0), backend=backend)
        sync(device)

    timed(shape, "message", backend, fn, rounds=3 if backend == "reference" and shape != "paper" else None)


@pytest.mark.parametrize("shape", ["scale", "gpu"])
def test_gemm(timed, shape):
    """The forward GEMM x @ W.T of a hidden layer's shape (B=256, in=out=1024 at the scale
    shape): the unit of the message's cost."""
    device = skip_unless_runs("backprop", shape, "gemm")
    B, widths = SHAPES[shape]
    x = (torch.rand(B, widths[1], device=device) < 0.5).float() * 2 - 1
    weight = torch.randn(widths[2], widths[1], device=device)

    def fn():
        x @ weight.t()
        sync(device)

    timed(shape, "message", "gemm", fn)
    # (in the group of the messages, so their table shows the GEMM beside them)


_RSS_PROBE = r"""
import json, sys, torch
sys.path[:0] = json.loads(sys.argv[1])
from phases import SHAPES, batch, method
from hnca_kernels.ops import cpp

def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS

assert cpp.load_reason() is None  # the extension loaded before measuring
B, widths = SHAPES["scale"]
m = method("hnca-cpp", widths)
x, label = batch(B, widths)
result = {}
for name, steps in (("first", 1), ("steady", 3)):  # the first step also allocates grads and Adam's state
    before = rss_kib("VmRSS")
    reset_peak()
    for _ in range(steps):
        m.step(x, label)
    result[name] = (rss_kib("VmHWM") - before) / 1024
result["resting"] = before / 1024
print(json.dumps(result))
"""


def test_peak_rss_growth_of_a_scale_step(note):
    """Peak resident memory above the resting process during scale-shape HNCA steps (cpp)."""
    if not is_available("cpp", "cpu"):
        pytest.skip("cpp is not available")
    paths = [p for p in sys.path if p] + [str(Path(__file__).parent)]
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, json.dumps(paths)], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    note("peak RSS growth of a scale HNCA step (cpp)", f"first step {result['first']:.1f} MiB (with grads and "
         f"Adam's state), later steps {result['steady']:.1f} MiB (resting process {result['resting']:.0f} MiB)")
    assert result["first"] < 150
