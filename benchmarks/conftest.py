"""Benchmark fixtures: the networks, batches and a table of medians and ratios at the end.

Run: ``python -m pytest benchmarks --benchmark-enable`` (see benchmarks/README.md).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

_medians: dict[str, float] = {}
_extra: dict[str, str] = {}


@pytest.fixture
def record(benchmark):
    """record(key, fn, rounds=None): benchmark fn and keep its median (seconds) under key."""

    def run(key, fn, rounds=None):
        if rounds is None:
            benchmark(fn)
        else:
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            _medians[key] = stats.stats.median

    return run


@pytest.fixture
def note():
    def put(key, value):
        _extra[key] = value

    return put


def _ratio(num, den):
    if num in _medians and den in _medians:
        return f"{_medians[num] / _medians[den]:.2f}x"
    return "n/a"


def pytest_terminal_summary(terminalreporter):
    if not _medians and not _extra:
        return
    write = terminalreporter.write_line
    write("")
    write(f"## hnca benchmark medians ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f})")
    write("| case | median (ms) |")
    write("| --- | --- |")
    for key, value in sorted(_medians.items()):
        write(f"| {key} | {value * 1e3:.3f} |")
    write("")
    write("| ratio | value |")
    write("| --- | --- |")
    for backend in ("cpp", "reference", "triton", "cuda"):
        write(f"| message {backend} / gemm (B=256, 1024x1024) | "
              f"{_ratio(f'message/{backend}/scale', 'gemm/scale')} |")
    for backend in ("triton", "cuda"):
        if f"message/{backend}/gpu" in _medians:
            write(f"| message {backend} / gemm (B=4096, 4096x4096) | "
                  f"{_ratio(f'message/{backend}/gpu', 'gemm/gpu')} |")
    for shape in ("paper", "scale", "gpu"):
        for backend in ("cpp", "reference", "triton", "cuda"):
            key = f"step/{backend}/{shape}"
            if key in _medians:
                write(f"| HNCA step {backend} / backprop step ({shape}) | {_ratio(key, f'backprop_step/{shape}')} |")
    for key, value in sorted(_medians.items()):
        if key.startswith("message/") and f"{key}/elements" in _extra:
            rate = float(_extra[f"{key}/elements"]) / value
            write(f"| throughput {key} | {rate / 1e9:.2f} G terms/s |")
    for key, value in sorted(_extra.items()):
        if not key.endswith("/elements"):
            write(f"| {key} | {value} |")
