"""The encoder gradient of each estimator at one trained VAE's parameters: how far the biased
straight-through estimators' expectation is from the true gradient there, and how noisy each
estimator is, all on the same batch and the same parameters.

    python docs/gradient_study.py runs/paper/vae/L2-hnca_baseline-lr1e-3-s0 --samples 1000

For each estimator, ``--samples`` independent estimates of the gradient of the batch-mean ELBO
with respect to the encoder's parameters (one batch of ``--batch`` test images, binarized once),
the baselines warmed on the batch (``--warm``) and restored before every estimate. The true gradient
is estimated by the pooled mean of the unbiased estimators; each estimator's relative distance
||mean - truth|| / ||truth|| is printed beside the noise floor that many samples leave (what it
would be for an unbiased estimator: sqrt(tr Var / n + tr Var_truth / n_truth) / ||truth||, the
pooled mean's share left out for the unbiased ones) and the bias net of that noise,
sqrt(distance^2 - floor^2).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

from hnca_kernels.data import binarize, load_mnist
from hnca_kernels.models import BernoulliVAE

UNBIASED = ("hnca_baseline", "disarm", "reinforce_loo")
BIASED = ("gumbel_st", "reinmax")


def encoder_gradients(vae, x, estimator, samples) -> torch.Tensor:
    """[samples, encoder parameters]: independent estimates, the baselines as they were before each."""
    params = list(vae.encoder.parameters())
    baselines = copy.deepcopy(vae.baselines.state_dict())
    out = torch.empty(samples, sum(p.numel() for p in params), dtype=torch.float64)
    for n in range(samples):
        vae.zero_grad(set_to_none=True)
        vae.estimate(x, estimator).loss.backward()
        out[n] = torch.cat([p.grad.reshape(-1) for p in params]).double()
        vae.baselines.load_state_dict(baselines)
    return -out  # the loss is minus the ELBO: its gradient is minus the estimate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a 2-layer BernoulliVAE run directory (config.json, checkpoint.pt)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--warm", type=int, default=200,
                        help="estimates of hnca_baseline on the batch before the study, so that the baselines "
                             "track it (a run of another estimator leaves them at their start)")
    args = parser.parse_args(argv)
    missing = [name for name in ("config.json", "checkpoint.pt") if not (args.run / name).is_file()]
    if missing:
        print(f"gradient_study.py: {args.run} is not a run directory with a checkpoint (no {', '.join(missing)})",
              file=sys.stderr)
        return 2
    if args.samples < 2 or args.batch < 1:
        print("gradient_study.py: --samples must be at least 2 and --batch at least 1", file=sys.stderr)
        return 2
    config = json.loads((args.run / "config.json").read_text())
    checkpoint = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=False)
    if config.get("latent", "bernoulli") != "bernoulli":
        print(f"gradient_study.py: {args.run} is not a Bernoulli VAE", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    vae = BernoulliVAE(config["layers"], config.get("hidden", 200))
    vae.load_state_dict(checkpoint["model"])
    images, _ = load_mnist("test", args.data_dir)
    x = binarize(images[: args.batch], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for _ in range(args.warm):  # each estimate folds the batch into the baselines (earlier estimates only)
        vae.estimate(x, "hnca_baseline")
    grads = {e: encoder_gradients(vae, x, e, args.samples) for e in (*UNBIASED, *BIASED)}
    means = {e: g.mean(0) for e, g in grads.items()}
    trace_var = {e: g.var(0).sum().item() for e, g in grads.items()}
    # the pooled mean of the unbiased estimators, each weighted by its inverse variance
    weights = {e: 1 / trace_var[e] for e in UNBIASED}
    truth = sum(weights[e] * means[e] for e in UNBIASED) / sum(weights.values())
    truth_var = 1 / sum(weights.values()) / args.samples  # tr Var of the pooled mean
    norm = truth.norm().item()
    print(f"{args.run} (epoch {checkpoint['epoch']}), {args.batch} test images, {args.samples} estimates each, "
          f"baselines warmed by {args.warm}")
    print("| estimator | relative distance from the truth | noise floor | bias net of noise | cosine with the truth "
          "| mean variance per parameter |")
    print("| --- | --- | --- | --- | --- | --- |")
    for e in (*UNBIASED, *BIASED):
        # an unbiased estimator's distance from the pooled mean includes its own share of it
        floor = math.sqrt(max(trace_var[e] / args.samples + truth_var
                              - (2 * weights[e] * trace_var[e] / args.samples / sum(weights.values())
                                 if e in UNBIASED else 0.0), 0.0)) / norm
        bias = (means[e] - truth).norm().item() / norm
        cosine = torch.nn.functional.cosine_similarity(means[e], truth, dim=0).item()
        net = math.sqrt(max(bias ** 2 - floor ** 2, 0.0))  # E||mean - truth||^2 = bias^2 + floor^2
        print(f"| {e}{' (biased)' if e in BIASED else ''} | {bias:.3f} | {floor:.3f} | {net:.3f} | {cosine:.3f} | "
              f"{trace_var[e] / truth.numel():.3e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
