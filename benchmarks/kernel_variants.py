"""Build variants of the C++ kernels (preprocessor definitions, vector instruction sets) and time
their Bernoulli messages against each other in one process, interleaved: every round runs each
variant once, and each ratio is the median over rounds of the ratio within a round (a machine
whose speed drifts, or that other jobs share, hits all variants alike).

    python benchmarks/kernel_variants.py AVX2: AVX2:HNCA_ROWS=1 AVX512:
    python benchmarks/kernel_variants.py --shape 50x200x200 AVX2: AVX2:HNCA_MAX_CHUNK=64

A variant is CAPABILITY:NAME=VALUE,NAME=VALUE (AVX2, AVX512 or DEFAULT); the first is the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hnca_kernels.ops import _build  # noqa: E402


def build(index: int, spec: str):
    capability, _, defines = spec.partition(":")
    flags = [f"-D{d}" for d in defines.split(",") if d]
    namespace = f"hnca_variant{index}"
    from torch.utils.cpp_extension import load

    tag = "_".join(d.replace("=", "") for d in defines.split(",") if d) or "base"
    load(name=f"hnca_variant_{capability.lower()}_{tag}", sources=[str(ROOT / "csrc" / _build.CPU_SOURCE)],
         extra_cflags=[*_build.cxx_flags(capability.upper()), *flags, f"-DHNCA_NAMESPACE={namespace}"],
         extra_ldflags=_build.LINK_FLAGS, is_python_module=False)
    return getattr(torch.ops, namespace)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--shape", default="256x1024x1024", help="B x in x out")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--op", choices=("bernoulli", "entropy"), default="bernoulli")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    B, n_in, n_out = (int(v) for v in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, 1.0, -1.0)
    weight = (torch.rand(n_out, n_in, generator=g) * 2 - 1) * (6 / (n_in + n_out)) ** 0.5
    logits = x @ weight.t() + torch.randn(n_out, generator=g) * 0.1
    y = torch.where(torch.rand(B, n_out, generator=g) < torch.sigmoid(logits), 1.0, -1.0)
    ops = [build(k, spec) for k, spec in enumerate(args.variants)]
    if args.op == "bernoulli":
        calls = [lambda op=op: op.bernoulli_log_ratio(x, weight, logits, y, -1.0, 1.0, True) for op in ops]
    else:
        calls = [lambda op=op: op.entropy_delta(x, weight, logits, -1.0, 1.0, True) for op in ops]
    first = calls[0]()
    for spec, call in zip(args.variants, calls):
        error = float((call() - first).abs().max() / first.abs().max())
        print(f"{spec}: max relative difference from the first {error:.2e}")
    times = [[] for _ in calls]
    for r in range(args.rounds + 1):
        for k, call in enumerate(calls):
            start = time.process_time()
            call()
            if r:
                times[k].append(time.process_time() - start)
    terms = B * n_in * n_out
    for spec, t in zip(args.variants, times):
        ratio = statistics.median(a / b for a, b in zip(t, times[0]))
        print(f"{spec:40s} {statistics.median(t) * 1e3:8.2f} ms  {terms / statistics.median(t) / 1e9:6.2f} G terms/s  "
              f"{ratio:.3f}x the first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
