"""Benchmark fixtures and the summary printed at the end of a run: medians per shape, phase and
method, backward / forward of every estimator next to backprop's, HNCA step / backprop step, what
HNCA's backward costs part by part, and the message against the forward GEMM.

Run: ``python -m pytest benchmarks --benchmark-enable`` (see benchmarks/README.md).
"""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import pytest
import torch
from phases import machine as _machine

# (shape, phase, method) -> median in seconds; shape is "paper", "scale", "gpu" or "vae-L<n>"
_medians: dict[tuple, float] = {}
_extra: dict[str, str] = {}
_load: list[float] = []


def pytest_sessionstart(session):
    _load.append(os.getloadavg()[0])


@pytest.fixture
def timed(benchmark):
    """timed(shape, phase, method, fn, setup=None, rounds=None): benchmark ``fn`` in the group
    "<shape>: <phase>" (pytest-benchmark prints one table per group: the methods side by side)
    and keep its median for the summary.

    With ``setup`` (untimed, run before every round; it returns fn's positional arguments) or
    ``rounds``, ``benchmark.pedantic`` runs ``rounds`` rounds of one call after 2 warm-up rounds;
    otherwise pytest-benchmark calibrates the number of calls itself.
    """

    def run(shape, phase, method, fn, setup=None, rounds=None):
        benchmark.group = f"{shape}: {phase}"
        benchmark.extra_info.update(shape=shape, phase=phase, method=method)
        if setup is None and rounds is None:
            benchmark(fn)
        else:
            wrapped = None if setup is None else (lambda: (setup(), {}))
            benchmark.pedantic(fn, setup=wrapped, rounds=rounds or 20, warmup_rounds=2)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            _medians[(shape, phase, method)] = stats.stats.median

    return run


@pytest.fixture
def note():
    def put(key, value):
        _extra[key] = value

    return put


def _commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fma_peak() -> float | None:
    """G float32 multiply-add lanes per second of one core (noted by test_message's cpp case)."""
    value = _extra.get("cpu/fma_peak")
    return float(value) / 1e9 if value else None


def _ms(shape, phase, method):
    value = _medians.get((shape, phase, method))
    return "" if value is None else f"{value * 1e3:.3f}"


def _ratio(num, den):
    if num in _medians and den in _medians:
        return f"{_medians[num] / _medians[den]:.2f}"
    return ""


def _methods(shape, phases):
    seen = []
    for (s, phase, method) in _medians:
        if s == shape and phase in phases and method not in seen:
            seen.append(method)
    return seen


def pytest_terminal_summary(terminalreporter):
    if not _medians and not _extra:
        return
    write = terminalreporter.write_line
    write("")
    load = f"load {_load[0]:.2f} -> {os.getloadavg()[0]:.2f}" if _load else f"load {os.getloadavg()[0]:.2f}"
    write(f"## hnca benchmark medians, ms ({_machine()}, {torch.get_num_threads()} threads, {load})")
    now = datetime.datetime.now(datetime.timezone.utc)
    write(f"torch {torch.__version__}, commit {_commit()}, {now:%Y-%m-%d %H:%M} UTC")
    order = ("hnca-reference", "hnca-cpp", "hnca-triton", "hnca-cuda", "reinforce", "backprop")
    for shape in ("paper", "scale", "gpu"):
        methods = [m for m in order if m in _methods(shape, ("forward", "backward", "step"))]
        if not methods:
            continue
        write("")
        write(f"### {shape}: phases (backprop: the same-shaped sigmoid MLP, cross-entropy)")
        write("| method | forward | backward | optimizer | step | backward / forward | backprop's backward / forward "
              "| step / backprop step |")
        write("| --- | --- | --- | --- | --- | --- | --- | --- |")
        bp_ratio = _ratio((shape, "backward", "backprop"), (shape, "forward", "backprop"))
        for m in methods:
            net = "backprop" if m == "backprop" else "stochastic"
            write(f"| {m} | {_ms(shape, 'forward', m)} | {_ms(shape, 'backward', m)} | "
                  f"{_ms(shape, 'optimizer', net)} | {_ms(shape, 'step', m)} | "
                  f"{_ratio((shape, 'backward', m), (shape, 'forward', m))} | {bp_ratio} | "
                  f"{_ratio((shape, 'step', m), (shape, 'step', 'backprop'))} |")
        parts = [m for m in order if (shape, "surrogate", m) in _medians or (shape, "message_pass", m) in _medians]
        if parts:
            write("")
            write(f"### {shape}: the backward in parts (surrogate = messages, credits and scores; share of backward)")
            write("| method | message pass | surrogate | autograd | surrogate + autograd | backward |")
            write("| --- | --- | --- | --- | --- | --- |")
            for m in parts:
                back = _medians.get((shape, "backward", m))
                cells = []
                for phase in ("message_pass", "surrogate", "autograd"):
                    value = _medians.get((shape, phase, m))
                    share = f" ({value / back:.0%})" if value is not None and back else ""
                    cells.append("" if value is None else f"{value * 1e3:.3f}{share}")
                both = [_medians.get((shape, p, m)) for p in ("surrogate", "autograd")]
                total = "" if None in both else f"{sum(both) * 1e3:.3f}"
                write(f"| {m} | {' | '.join(cells)} | {total} | {_ms(shape, 'backward', m)} |")
    vae = sorted({s for (s, _, _) in _medians if s.startswith("vae-")}, key=lambda s: int(s[5:]))
    if vae:
        write("")
        write("### discrete VAE (batch 50, 200 units): phases; backward = estimate (signals, surrogate) + autograd")
        write("| depth | estimator | forward | backward | estimate | autograd | optimizer | backward / forward "
              "| step (elbo_loss + backward) |")
        write("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for shape in vae:
            for m in _methods(shape, ("forward", "backward", "step")):
                write(f"| {shape[4:]} | {m} | {_ms(shape, 'forward', m)} | {_ms(shape, 'backward', m)} | "
                      f"{_ms(shape, 'estimate', m)} | {_ms(shape, 'autograd', m)} | "
                      f"{_ms(shape, 'optimizer', 'adam')} | "
                      f"{_ratio((shape, 'backward', m), (shape, 'forward', m))} | {_ms(shape, 'step', m)} |")
    lines = []
    for shape, size in (("scale", "B=256, 1024x1024"), ("gpu", "B=4096, 4096x4096")):
        for backend in ("cpp", "reference", "triton", "cuda"):
            r = _ratio((shape, "message", backend), (shape, "message", "gemm"))
            if r:
                lines.append(f"| message {backend} / forward GEMM ({size}) | {r} |")
    for (shape, phase, method), value in sorted(_medians.items()):
        elements = _extra.get(f"{shape}/message/{method}/elements")
        if phase == "message" and elements:  # B x in x out counterfactual terms
            rate = float(elements) / value / 1e9
            # a narrow term is two float32 multiply-adds: half the core's FMA lane rate bounds it
            share = f" ({2 * rate / peak:.0%} of FMA peak / 2)" if method == "cpp" and (peak := _fma_peak()) else ""
            lines.append(f"| message throughput {method} ({shape}) | {rate:.2f} G terms/s{share} |")
    both = ("vae-L2", "sampled child's messages")
    r = _ratio((*both, "one call"), (*both, "two ops"))
    if r:
        lines.append(f"| a sampled Bernoulli child layer's two messages, one call / two ops (B=50, 200x200) | {r} |")
    if _fma_peak():
        lines.append(f"| FMA peak of one CPU core (float32, {torch.backends.cpu.get_cpu_capability()}) | "
                     f"{_fma_peak():.1f} G lanes/s |")
    lines += [f"| {key} | {value} |" for key, value in sorted(_extra.items())
              if not key.endswith("/elements") and key != "cpu/fma_peak"]
    if lines:
        write("")
        write("### one hidden layer's message against the forward GEMM of its shape; memory")
        write("| ratio | value |")
        write("| --- | --- |")
        for line in lines:
            write(line)
