"""The grid's phases (benchmarks/phases.py) measured in alternation in one process: every round
times each (method, phase) once, so a slowdown of the machine hits all of them alike, and each
ratio is the median over rounds of the ratio within a round. A check on the pytest-benchmark
grid's ratios where other jobs share the machine (there one case runs after another, minutes apart).

    OMP_NUM_THREADS=1 python benchmarks/interleaved.py --shape paper --rounds 100
    OMP_NUM_THREADS=1 python benchmarks/interleaved.py --shape scale --rounds 15
    OMP_NUM_THREADS=1 python benchmarks/interleaved.py --shape paper --rounds 100 --torch-draws

Prints the medians (ms) with the quartiles over rounds, backward / forward and step / backprop
step per method, and HNCA's backward in its parts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hnca_kernels import backends

sys.path.insert(0, str(Path(__file__).parent))
from phases import SHAPES, batch, method, phase_call  # noqa: E402

PHASES = {"backprop": ("forward", "backward", "optimizer", "step"),
          "reinforce": ("forward", "backward", "surrogate", "autograd", "step")}
HNCA_PHASES = ("forward", "backward", "message_pass", "surrogate", "autograd", "step")


def quartiles(values):
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q2, q1, q3


def torch_draws(fn):
    """``fn`` with the layers drawing by their torch expressions (``backends.draws_in_cpp`` off)."""
    def run(*args):
        real = backends.draws_in_cpp
        backends.draws_in_cpp = lambda logits: False
        try:
            fn(*args)
        finally:
            backends.draws_in_cpp = real
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "gpu"], default="paper")
    parser.add_argument("--methods", nargs="+", default=["hnca-cpp", "reinforce", "backprop"])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--wall", action="store_true", help="wall clock instead of the process's CPU time")
    parser.add_argument("--torch-draws", action="store_true",
                        help="also time each stochastic method's step with the samples drawn by the layers' torch "
                             "expressions instead of the cpp backend's ops (the same samples)")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.wall else time.process_time
    B, widths = SHAPES[args.shape]
    x, label = batch(B, widths)
    cases = []
    for name in args.methods:
        m = method(name, widths)
        for phase in PHASES.get(name, HNCA_PHASES):
            cases.append((name, phase, *phase_call(m, phase, x, label)))
        if args.torch_draws and name != "backprop":
            setup, fn = phase_call(m, "step", x, label)
            cases.append((name, "step, torch draws", setup, torch_draws(fn)))
    times = {(name, phase): [] for name, phase, _, _ in cases}
    load = os.getloadavg()[0]
    for r in range(args.rounds + 2):  # two warm-up rounds
        for name, phase, setup, fn in cases:
            state = setup() if setup else ()
            start = clock()
            fn(*state)
            if r >= 2:
                times[(name, phase)].append(clock() - start)
    print(f"{args.shape} (B={B}, {'-'.join(map(str, widths))}), {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, {'wall clock' if args.wall else 'CPU time'}, "
          f"load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| method | phase | median ms (q1-q3) |\n| --- | --- | --- |")
    for (name, phase), values in times.items():
        q2, q1, q3 = quartiles(values)
        print(f"| {name} | {phase} | {q2 * 1e3:.3f} ({q1 * 1e3:.3f}-{q3 * 1e3:.3f}) |")

    def ratio(num, den):
        if num not in times or den not in times:
            return ""
        q2, q1, q3 = quartiles([a / b for a, b in zip(times[num], times[den])])
        return f"{q2:.2f} ({q1:.2f}-{q3:.2f})"

    print("\n| ratio, per round (q1-q3) | value |\n| --- | --- |")
    for name in args.methods:
        print(f"| {name}: backward / forward | {ratio((name, 'backward'), (name, 'forward'))} |")
        if name != "backprop":
            print(f"| {name}: step / backprop step | {ratio((name, 'step'), ('backprop', 'step'))} |")
            if (name, "step, torch draws") in times:
                print(f"| {name}: step / step with torch draws | {ratio((name, 'step'), (name, 'step, torch draws'))} |")
                print(f"| {name}: step with torch draws / backprop step | "
                      f"{ratio((name, 'step, torch draws'), ('backprop', 'step'))} |")
            for part in ("message_pass", "surrogate", "autograd"):
                if (name, part) in times:
                    print(f"| {name}: {part} / backward | {ratio((name, part), (name, 'backward'))} |")


if __name__ == "__main__":
    main()
