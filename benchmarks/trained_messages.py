"""The Bernoulli messages of a trained VAE's f-HNCA step, and the step itself, for builds of the C++
kernels against each other (see kernel_variants.py): a trained model's weights pass the chunk
bound, which its initial weights do not, so the messages' cost depends on training.

    python benchmarks/trained_messages.py runs/vae-L2/checkpoint.pt AVX512@HEAD~1: AVX512:

The checkpoint is an ``hnca vae`` run's (2 layers of 200, Bernoulli latents, the defaults). The
messages are those of one step on the first 50 training images; each is timed for every build,
interleaved, with its error against the float64 reference; then whole steps (f-HNCA with baseline)
with each build's message, and, with the installed build, against REINFORCE LOO, DisARM,
straight-through Gumbel-softmax and ReinMax steps (ReinMax needs the ``compare`` extra).
Every line is printed for the model at initialisation and for the trained one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_variants  # noqa: E402
from phases import OneLineParser, load_trained  # noqa: E402

import hnca_kernels.ops.cpp as cpp_backend  # noqa: E402
from hnca_kernels.data import MNISTError, binarize, load_mnist  # noqa: E402
from hnca_kernels.experiments.rundir import CommandError  # noqa: E402
from hnca_kernels.models import BernoulliVAE  # noqa: E402
from hnca_kernels.ops import _extension, reference  # noqa: E402


def step(model, x, estimator="hnca_baseline"):
    model.zero_grad()
    model.elbo_loss(x, estimator).backward()


def captured_messages(model, x) -> list:
    """The arguments of every Bernoulli message of one f-HNCA-with-baseline step."""
    calls, original = [], cpp_backend.bernoulli_log_ratio

    def record(*args):
        calls.append(args)
        return original(*args)

    cpp_backend.bernoulli_log_ratio = record
    try:
        step(model, x)
    finally:
        cpp_backend.bernoulli_log_ratio = original
    return calls


def interleaved(calls, rounds):
    """Median times of each call and median per-round ratios to the first call."""
    times = [[] for _ in calls]
    for r in range(rounds + 1):
        for k, call in enumerate(calls):
            start = time.process_time()
            call()
            if r:
                times[k].append(time.process_time() - start)
    return [(statistics.median(t), statistics.median(a / b for a, b in zip(t, times[0]))) for t in times]


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("variants", nargs="+", help="builds as in kernel_variants.py, the first the baseline")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    kernel_variants.check_variants(parser, args.variants)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _extension.load_cpu()
    init, trained = BernoulliVAE(2, backend="cpp"), BernoulliVAE(2, backend="cpp")
    try:
        load_trained(trained, args.checkpoint)
    except CommandError as exc:
        parser.error(str(exc))
    try:
        x = binarize(load_mnist("train")[0][:50])
    except MNISTError as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory() as scratch:
        ops = [kernel_variants.build(k, spec, Path(scratch)) for k, spec in enumerate(args.variants)]
    swapped = [lambda x_, w, l, y, lo, hi, op=op: op.bernoulli_log_ratio(x_, w, l, y, lo, hi, True) for op in ops]
    original = cpp_backend.bernoulli_log_ratio
    for label, model in (("init", init), ("trained", trained)):
        for message in captured_messages(model, x):
            exact = reference.bernoulli_log_ratio(*[a.double() if torch.is_tensor(a) else a for a in message])
            calls = [lambda op=op: op.bernoulli_log_ratio(*message, True) for op in ops]
            line = f"{label:8s} message in={message[1].shape[1]} out={message[1].shape[0]}"
            for spec, call, (t, ratio) in zip(args.variants, calls, interleaved(calls, args.rounds)):
                error = ((call().double() - exact).abs() / (exact.abs() + 1e-3)).max().item()
                line += f" | {spec} {t * 1e3:6.2f} ms {ratio:.2f}x, error {error:.1e}"
            print(line)

        def with_build(fn):
            def run():
                cpp_backend.bernoulli_log_ratio = fn
                step(model, x)
            return run

        try:
            results = interleaved([with_build(fn) for fn in swapped], max(3, args.rounds // 2))
        finally:
            cpp_backend.bernoulli_log_ratio = original
        print(f"{label:8s} f-HNCA-with-baseline step | "
              + " | ".join(f"{spec} {t * 1e3:6.2f} ms {ratio:.2f}x" for spec, (t, ratio) in zip(args.variants, results)))
        estimators = ("hnca_baseline", "reinforce_loo", "disarm", "gumbel_st", "reinmax")
        results = interleaved([lambda e=e: step(model, x, e) for e in estimators], max(3, args.rounds // 2))
        print(f"{label:8s} installed build's steps | "
              + " | ".join(f"{e} {t * 1e3:6.2f} ms {ratio:.2f}x" for e, (t, ratio) in zip(estimators, results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
