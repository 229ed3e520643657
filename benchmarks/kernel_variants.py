"""Build variants of the C++ kernels (preprocessor definitions, vector instruction sets) and time
their Bernoulli messages against each other in one process, interleaved: every round runs each
variant once, and each ratio is the median over rounds of the ratio within a round (a machine
whose speed drifts, or that other jobs share, hits all variants alike).

    python benchmarks/kernel_variants.py AVX2: AVX2:HNCA_ROWS=1 AVX512:
    python benchmarks/kernel_variants.py --shape 50x200x200 AVX2: AVX2:HNCA_MAX_CHUNK=32
    python benchmarks/kernel_variants.py AVX2@HEAD~1: AVX2:
    python benchmarks/kernel_variants.py --op categorical --shape 50x200x784 --regime confident AVX512@HEAD~1: AVX512:

A variant is CAPABILITY[@REVISION]:NAME=VALUE,NAME=VALUE (AVX2, AVX512 or DEFAULT; the sources of
a git revision, else the working tree's); the first is the baseline. The core's FMA peak, measured
in the same process, is printed beside the throughputs (a narrow term is two multiply-adds), and
the forward GEMM of the shape (x @ W.T, torch's), timed in the same rounds, beside the times.

--op categorical times the message to categorical parents (in = variables x --classes, Bernoulli
children); --op softmax the message of one softmax child of out classes (the bandit's output layer)
to its Bernoulli parents; --op sample the Bernoulli layer's sample of the logits [B, out] (its
rate in draws a second); --op credit the Bernoulli units' credit from the logits [B, out] and a
message of the same shape. --regime confident gives children as a trained model's: weights three
times the initial scale's bound, logits of +-(25 to 35) and 3% of the children against their logit.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hnca_kernels.ops import _build  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from phases import OneLineParser  # noqa: E402


def sources(revision: str, into: Path) -> Path:
    """The csrc directory of a git revision, written under ``into`` (the working tree's without one)."""
    if not revision:
        return ROOT / "csrc"
    into.mkdir(parents=True, exist_ok=True)
    for name in (_build.CPU_SOURCE, "hnca_common.h"):
        text = subprocess.run(["git", "show", f"{revision}:csrc/{name}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        (into / name).write_text(text)
    return into


def check_variants(parser: argparse.ArgumentParser, specs) -> None:
    """A one-line usage error for a variant whose capability or git revision does not exist."""
    for spec in specs:
        capability, _, revision = spec.partition(":")[0].partition("@")
        if capability.upper() not in ("AVX2", "AVX512", "DEFAULT"):
            parser.error(f"variant {spec!r}: the capability must be AVX2, AVX512 or DEFAULT")
        if revision and subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], cwd=ROOT,
                                       capture_output=True).returncode != 0:
            parser.error(f"variant {spec!r}: no git revision {revision!r}")


def build(index: int, spec: str, scratch: Path):
    target, _, defines = spec.partition(":")
    capability, _, revision = target.partition("@")
    flags = [f"-D{d}" for d in defines.split(",") if d]
    namespace = f"hnca_variant{index}"
    from torch.utils.cpp_extension import load

    csrc = sources(revision, scratch / f"variant{index}")
    tag = "_".join(d.replace("=", "") for d in defines.split(",") if d) or "base"
    tag += f"_{revision.replace('~', 'm').replace('^', 'p')}" if revision else ""
    load(name=f"hnca_variant_{capability.lower()}_{tag}", sources=[str(csrc / _build.CPU_SOURCE)],
         extra_cflags=[*_build.cxx_flags(capability.upper()), *flags, f"-DHNCA_NAMESPACE={namespace}"],
         extra_ldflags=_build.LINK_FLAGS, is_python_module=False)
    return getattr(torch.ops, namespace)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--shape", default="256x1024x1024", help="B x in x out")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--op", choices=("bernoulli", "entropy", "categorical", "softmax", "sample", "credit"), default="bernoulli")
    parser.add_argument("--classes", type=int, default=10, help="classes of a categorical parent")
    parser.add_argument("--regime", choices=("init", "confident"), default="init")
    args = parser.parse_args(argv)
    try:
        B, n_in, n_out = (int(v) for v in args.shape.split("x"))
    except ValueError:
        parser.error(f"--shape: {args.shape!r} is not B x in x out, e.g. 256x1024x1024")
    check_variants(parser, args.variants)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if args.op == "categorical":
        if n_in % args.classes:
            parser.error(f"--shape: in = {n_in} is not a multiple of --classes {args.classes}")
        a = torch.randint(0, args.classes, (B, n_in // args.classes), generator=g)
        x = torch.nn.functional.one_hot(a, args.classes).flatten(1).float()
    else:
        x = torch.where(torch.rand(B, n_in, generator=g) < 0.5, 1.0, -1.0)
    weight = (torch.rand(n_out, n_in, generator=g) * 2 - 1) * (6 / (n_in + n_out)) ** 0.5
    logits = x @ weight.t() + torch.randn(n_out, generator=g) * 0.1
    y = torch.where(torch.rand(B, n_out, generator=g) < torch.sigmoid(logits), 1.0, -1.0)
    if args.regime == "confident":
        weight = weight * 3 / (6 / (n_in + n_out)) ** 0.5
        logits = torch.where(torch.rand(B, n_out, generator=g) < 0.5, 1.0, -1.0) * (25 + 10 * torch.rand(B, n_out, generator=g))
        y = torch.where((logits > 0) ^ (torch.rand(B, n_out, generator=g) < 0.03), 1.0, -1.0)
    with tempfile.TemporaryDirectory() as scratch:
        ops = [build(k, spec, Path(scratch)) for k, spec in enumerate(args.variants)]
    if args.op == "bernoulli":
        calls = [lambda op=op: op.bernoulli_log_ratio(x, weight, logits, y, -1.0, 1.0, True) for op in ops]
    elif args.op == "entropy":
        calls = [lambda op=op: op.entropy_delta(x, weight, logits, -1.0, 1.0, True) for op in ops]
    elif args.op == "sample":  # each variant from the same generator state: the same draws
        calls = [lambda op=op: op.bernoulli_sample(logits, -1.0, 1.0, torch.float32,
                                                   generator=torch.Generator().manual_seed(1)) for op in ops]
    elif args.op == "credit":
        message = torch.randn(B, n_out, generator=g) * 2
        calls = [lambda op=op: op.logit_credit(logits, message) for op in ops]
    elif args.op == "softmax":
        sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
        calls = [lambda op=op: op.categorical_log_ratio(x, weight, logits, sampled, -1.0, 1.0, True) for op in ops]
    else:
        y01 = (y > 0).float()
        calls = [lambda op=op: op.categorical_parent_log_ratio(a, weight, logits, y01) for op in ops]
    first = calls[0]()
    for spec, call in zip(args.variants, calls):
        error = float((call() - first).abs().max() / first.abs().max())
        print(f"{spec}: max relative difference from the first {error:.2e}")
    gemm = lambda: x @ weight.t()  # noqa: E731
    times = [[] for _ in calls]
    gemm_times = []
    for r in range(args.rounds + 1):
        for k, call in enumerate([*calls, gemm]):
            start = time.process_time()
            call()
            if r:
                (times[k] if k < len(calls) else gemm_times).append(time.process_time() - start)
    terms, unit = {"sample": (B * n_out, "draws"), "credit": (B * n_out, "units")}.get(args.op, (B * n_in * n_out, "terms"))
    peaks = {spec: op.fma_peak(0.2) for spec, op in zip(args.variants, ops) if hasattr(op, "fma_peak")}
    for spec, t in zip(args.variants, times):
        ratio = statistics.median(a / b for a, b in zip(t, times[0]))
        rate = terms / statistics.median(t)
        limit = f"  {2 * rate / peaks[spec]:4.0%} of FMA peak / 2" if spec in peaks and unit == "terms" else ""
        # a message against the GEMM of its shape; a sample or a credit is per unit, not per term
        to_gemm = statistics.median(a / b for a, b in zip(t, gemm_times))
        gemm = f"  {to_gemm:5.2f}x the GEMM" if unit == "terms" else ""
        print(f"{spec:40s} {statistics.median(t) * 1e3:8.3f} ms  {rate / 1e9:6.2f} G {unit}/s  "
              f"{ratio:.3f}x the first{gemm}{limit}")
    print(f"forward GEMM x @ W.T of the shape ({torch.backends.cpu.get_cpu_capability()}): "
          f"{statistics.median(gemm_times) * 1e3:.3f} ms")
    for spec, peak in peaks.items():
        print(f"FMA peak measured by {spec}: {peak / 1e9:.1f} G float32 lanes/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
