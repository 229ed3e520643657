"""Grid: backend x phase (forward sampling, one layer's message, HNCA training step) x shape,
with the backprop step of the same-shaped deterministic network and the forward GEMM.

Not part of the default test run (testpaths is tests/); see benchmarks/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hnca_kernels import BernoulliLinear, CategoricalLinear, MovingAverageBaseline, StochasticSequential, record
from hnca_kernels import functional as Fn
from hnca_kernels.backends import is_available

SHAPES = {
    "paper": (50, [784, 200, 200, 200, 10]),
    "scale": (256, [784, 1024, 1024, 1024, 10]),
    "gpu": (4096, [4096, 4096, 4096, 4096, 10]),
}
BACKENDS = ("reference", "cpp", "triton", "cuda")
PHASES = ("forward", "message", "step")


def device_for(shape):
    return "cuda" if shape == "gpu" or torch.cuda.is_available() else "cpu"


def skip_unless_runs(backend, shape):
    device = device_for(shape)
    if shape == "gpu" and not torch.cuda.is_available():
        pytest.skip("the 4096-wide shape runs on a GPU only")
    if not is_available(backend, device):
        pytest.skip(f"{backend} does not run on {device}")
    return device


def hnca_net(widths, device):
    hidden = [BernoulliLinear(a, b, centered=True, device=device) for a, b in zip(widths[:-2], widths[1:-1])]
    return StochasticSequential(*hidden, CategoricalLinear(widths[-2], widths[-1], device=device))


def backprop_net(widths, device):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, device=device), nn.Sigmoid()]
    return nn.Sequential(*layers[:-1])


def batch(shape, device):
    B, widths = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(B, widths[0], generator=g) < 0.3).float().to(device)
    label = torch.randint(0, widths[-1], (B,), generator=g).to(device)
    return x, label


def hnca_step(net, opt, baseline, x, label, backend):
    with record() as rec:
        action = net(x)
    reward = (action == label).float()
    opt.zero_grad(set_to_none=True)
    rec.surrogate_loss(reward, baseline=baseline(reward), backend=backend).backward()
    opt.step()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hnca(record, note, backend, phase, shape):
    device = skip_unless_runs(backend, shape)
    if backend == "reference" and shape != "paper" and phase == "step":
        pytest.skip("the reference step at this shape takes seconds and gigabytes; its message is measured")
    if backend == "reference" and shape == "gpu" and phase == "message":
        pytest.skip("the reference message at this shape would materialise 4096^3 terms (275 GB)")
    torch.manual_seed(0)
    B, widths = SHAPES[shape]
    net = hnca_net(widths, device)
    x, label = batch(shape, device)
    rounds = 3 if backend == "reference" and shape != "paper" else None
    if phase == "forward":
        def fn():
            net(x)
            sync(device)
    elif phase == "message":
        # the middle hidden layer's message to its parents, the hot path of HNCA
        h = net[0](x)
        layer = net[1]
        logits = layer.logits(h).detach()
        y = layer.sample(logits)
        note(f"message/{backend}/{shape}/elements", str(B * widths[1] * widths[2]))

        def fn():
            Fn.counterfactual_log_ratio(h, layer.weight.detach(), logits, y, parent_values=(-1.0, 1.0), backend=backend)
            sync(device)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        baseline = MovingAverageBaseline(0.99).to(device)

        def fn():
            hnca_step(net, opt, baseline, x, label, backend)
            sync(device)
    record(f"{phase}/{backend}/{shape}", fn, rounds=rounds)


@pytest.mark.parametrize("shape", SHAPES)
def test_backprop_step(record, shape):
    device = skip_unless_runs("reference", shape)
    torch.manual_seed(0)
    B, widths = SHAPES[shape]
    net = backprop_net(widths, device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x, label = batch(shape, device)

    def fn():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), label).backward()
        opt.step()
        sync(device)

    record(f"backprop_step/{shape}", fn)


@pytest.mark.parametrize("shape", ["scale", "gpu"])
def test_gemm(record, shape):
    """The forward GEMM x @ W.T of a hidden layer's shape (B=256, in=out=1024 at the scale
    shape): the unit of the message's cost."""
    device = skip_unless_runs("reference", shape)
    B, widths = SHAPES[shape]
    x = (torch.rand(B, widths[1], device=device) < 0.5).float() * 2 - 1
    weight = torch.randn(widths[2], widths[1], device=device)

    def fn():
        x @ weight.t()
        sync(device)

    record(f"gemm/{shape}", fn)


_RSS_PROBE = r"""
import json, sys, torch
sys.path[:0] = json.loads(sys.argv[1])
from test_bench import SHAPES, hnca_net, batch, hnca_step
from hnca_kernels import MovingAverageBaseline
from hnca_kernels.ops import cpp

def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS

assert cpp.load_reason() is None  # the extension loaded before measuring
torch.manual_seed(0)
net = hnca_net(SHAPES["scale"][1], "cpu")
opt = torch.optim.Adam(net.parameters(), lr=1e-4)
baseline = MovingAverageBaseline(0.99)
x, label = batch("scale", "cpu")
result = {}
for name, steps in (("first", 1), ("steady", 3)):  # the first step also allocates grads and Adam's state
    before = rss_kib("VmRSS")
    reset_peak()
    for _ in range(steps):
        hnca_step(net, opt, baseline, x, label, "cpp")
    result[name] = (rss_kib("VmHWM") - before) / 1024
result["resting"] = before / 1024
print(json.dumps(result))
"""


def test_peak_rss_growth_of_a_scale_step(note):
    """Peak resident memory above the resting process during scale-shape HNCA steps (cpp)."""
    if not is_available("cpp", "cpu"):
        pytest.skip("cpp is not available")
    paths = [p for p in sys.path if p] + [str(__import__("pathlib").Path(__file__).parent)]
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, json.dumps(paths)], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    note("peak RSS growth of a scale HNCA step (cpp)", f"first step {result['first']:.1f} MiB (with grads and "
         f"Adam's state), later steps {result['steady']:.1f} MiB (resting process {result['resting']:.0f} MiB)")
    assert result["first"] < 150
