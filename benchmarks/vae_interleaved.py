"""VAE training steps measured in alternation in one process (each round times every case once;
a ratio is the median over rounds of the ratio within a round): the record-based BernoulliVAE
against the hand-written chain it replaced (tests/_reference_vae.py, the regression reference),
estimator by estimator, and the categorical VAE's estimators against each other.

    OMP_NUM_THREADS=1 python benchmarks/vae_interleaved.py --rounds 60 --json docs/step-times.json

``--json`` writes the record-based models' medians (ms a step, with the machine and the date): the
wall-clock axis of the comparison figures in docs/results.md (epochs x 1200 steps), so that every
estimator is timed on one machine at one time rather than read from runs that shared a machine.
A step is what the training loop does: zero the gradients, the estimate, backward, and the
gradient-variance statistic the command logs. CPU time of the process, one thread, cpp backend.

    python benchmarks/vae_interleaved.py --checkpoints runs/paper/vae/L2-hnca_baseline-lr1e-3-s0/checkpoint.pt \
        runs/paper/vae/cat20x10-L1-hnca-lr1e-3-s0/checkpoint.pt

times the steps at trained models instead (``hnca vae`` checkpoints of the 2-layer Bernoulli and
the categorical VAE, the first 50 training images; without the chain): f-HNCA's messages cost
more as weights grow.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _reference_vae import ESTIMATORS as CHAIN_ESTIMATORS, BernoulliVAE as ChainVAE  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from phases import OneLineParser, load_trained, machine  # noqa: E402

from hnca_kernels.models import BernoulliVAE, CategoricalVAE  # noqa: E402

BERNOULLI = ("hnca_baseline", "reinforce_loo", "disarm", "reinforce_baseline", "gumbel_st", "reinmax")
CATEGORICAL = ("hnca", "reinforce_loo", "reinforce_baseline", "gumbel_st", "reinmax")


def step(model, estimator, x):
    model.zero_grad(set_to_none=True)
    estimate = model.estimate(x, estimator)
    estimate.loss.backward()
    estimate.gradient_variance()


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the medians here (see above)")
    parser.add_argument("--checkpoints", type=Path, nargs=2, metavar=("BERNOULLI", "CATEGORICAL"),
                        help="time the steps at these trained models (see above)")
    args = parser.parse_args(argv)
    if args.json and (args.layers != 2 or args.checkpoints):
        parser.error("--json writes the results page's step times, which are the 2-layer model's at initialisation")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = (torch.rand(50, 784) < 0.3).float()
    chain, record = ChainVAE(args.layers), BernoulliVAE(args.layers)
    record.load_state_dict(chain.state_dict())
    categorical = CategoricalVAE(1)
    if args.checkpoints:
        from hnca_kernels.data import MNISTError, binarize, load_mnist
        from hnca_kernels.experiments.rundir import CommandError

        for model, path in ((record, args.checkpoints[0]), (categorical, args.checkpoints[1])):
            try:
                load_trained(model, path)
            except CommandError as exc:
                parser.error(f"--checkpoints: {exc}")
        try:
            x = binarize(load_mnist("train")[0][:50])
        except MNISTError as exc:
            parser.error(str(exc))
    cases = {**{("chain", e): (chain, e) for e in BERNOULLI if e in CHAIN_ESTIMATORS and not args.checkpoints},
             **{("record", e): (record, e) for e in BERNOULLI},
             **{("categorical", e): (categorical, e) for e in CATEGORICAL}}
    times = {key: [] for key in cases}
    for r in range(args.warmup + args.rounds):
        for key, (model, estimator) in cases.items():
            start = time.process_time()
            step(model, estimator, x)
            if r >= args.warmup:
                times[key].append(time.process_time() - start)

    def ratio(a, b):
        return statistics.median(p / q for p, q in zip(times[a], times[b]))

    print(f"{args.layers}-layer BernoulliVAE and 1-layer CategoricalVAE (20 x 10), batch 50, "
          f"{args.rounds} rounds, {torch.backends.cpu.get_cpu_capability()}"
          + (", trained models" if args.checkpoints else ""))
    print("| model | estimator | step, ms (median) | ratio |")
    print("| --- | --- | --- | --- |")
    for (model, estimator), t in times.items():
        if model == "chain":
            continue
        notes = []
        if model == "record" and ("chain", estimator) in times:
            notes.append(f"{ratio((model, estimator), ('chain', estimator)):.3f}x the chain's "
                         f"({statistics.median(times[('chain', estimator)]) * 1e3:.2f} ms)")
        if estimator != "reinforce_loo":
            notes.append(f"{ratio((model, estimator), (model, 'reinforce_loo')):.3f}x LOO's")
        note = "; ".join(notes)
        print(f"| {model} | {estimator} | {statistics.median(t) * 1e3:.2f} | {note} |")
    if args.json:
        names = {"record": f"bernoulli-L{args.layers}", "categorical": "cat20x10-L1"}
        medians = {f"{names[m]}/{e}": round(statistics.median(t) * 1e3, 3) for (m, e), t in times.items() if m in names}
        args.json.write_text(json.dumps({
            "cpu": machine().rsplit(",", 1)[0],
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "threads": 1,
            "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}", "rounds": args.rounds,
            "step_ms": medians}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
