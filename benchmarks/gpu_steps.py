"""Whole training steps on a GPU: HNCA against backprop and the VAE's estimators, graphed and eager.

    python benchmarks/gpu_steps.py            # on a GPU; writes $OUT/steps.json if OUT is set
    python benchmarks/gpu_steps.py --dry-run  # tiny shapes on the CPU: the code runs, no timings

Every case is a full step (forward, estimator, backward, fused Adam) timed with CUDA events over
many replays of a CUDA graph (``hnca_kernels.CapturedStep``), and eagerly, FP32 with TF32 off:

- the bandit network (784-200-200-200-10, ±1 units, softmax output) at B=50 and the GPU shape
  (4096-wide, B=4096): HNCA (each backend), REINFORCE, and backprop of the same-shaped sigmoid MLP;
- the discrete VAE (1-3 layers) at the paper's shape (B=50, 200 units) and a wide one (B=1024,
  1024 units): f-HNCA (with baseline from 2 layers), REINFORCE LOO and DisARM.

Each case runs in its own try block, so one failure costs one line of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import hnca_kernels
from hnca_kernels import BernoulliLinear, CapturedStep, CategoricalLinear, MovingAverageBaseline, StochasticSequential
from hnca_kernels.backends import is_available
from hnca_kernels.models import BernoulliVAE


def bandit_net(widths, device):
    hidden = [BernoulliLinear(a, b, centered=True, device=device) for a, b in zip(widths[:-2], widths[1:-1])]
    return StochasticSequential(*hidden, CategoricalLinear(widths[-2], widths[-1], device=device))


def backprop_net(widths, device):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, device=device), nn.Sigmoid()]
    return nn.Sequential(*layers[:-1])


def adam(params, device):
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=1e-4, fused=True, capturable=True)
    return torch.optim.Adam(params, lr=1e-4)


def bandit_step(widths, batch, device, estimator, backend):
    net = bandit_net(widths, device)
    opt, baseline = adam(net.parameters(), device), MovingAverageBaseline(0.99).to(device)

    def step(x, label):
        with hnca_kernels.use_backend(backend), hnca_kernels.record() as rec:
            action = net(x)
        reward = (action == label).float()
        opt.zero_grad(set_to_none=True)
        with hnca_kernels.use_backend(backend):
            rec.surrogate_loss(reward, estimator=estimator, baseline=baseline(reward)).backward()
        opt.step()
        return reward.sum()

    return step, _bandit_batch(widths, batch, device)


def backprop_step(widths, batch, device):
    net = backprop_net(widths, device)
    opt = adam(net.parameters(), device)

    def step(x, label):
        loss = F.cross_entropy(net(x), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, _bandit_batch(widths, batch, device)


def _bandit_batch(widths, batch, device):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, widths[0], generator=g) < 0.3).float().to(device)
    return x, torch.randint(0, widths[-1], (batch,), generator=g).to(device)


def vae_step(layers, hidden, batch, device, estimator):
    torch.manual_seed(0)
    vae = BernoulliVAE(layers, hidden=hidden, device=device)
    opt = adam(vae.parameters(), device)

    def step(x):
        estimate = vae.estimate(x, estimator)
        opt.zero_grad(set_to_none=True)
        estimate.loss.backward()
        opt.step()
        return estimate.elbo.sum()

    x = (torch.rand(batch, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float().to(device)
    return step, (x,)


def time_step(make, graphs: bool, device, replays: int, repeats: int = 5) -> float:
    """Median seconds per step over ``repeats`` blocks of ``replays`` steps (after warming up)."""
    step, inputs = make()
    runner = CapturedStep(step, warmup=3, enabled=graphs)
    for _ in range(5):  # warm-up calls, then (graphs) the capture
        runner(*inputs)
    if device.type != "cuda":
        began = time.perf_counter()
        runner(*inputs)
        return time.perf_counter() - began
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            runner(*inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(times)


def cases(dry: bool, device):
    """Every case, the issue's three questions first: the paper-shape bandit step against
    backprop, the 2-layer VAE against LOO, the GPU-shape step; then the other depths and shapes."""
    paper = [784, 200, 200, 200, 10] if not dry else [20, 8, 8, 8, 3]
    gpu = [4096] * 4 + [10] if not dry else [16] * 4 + [3]
    backends = [b for b in ("triton", "cuda") if is_available(b, device)] or ["reference"]

    def bandit(shape, widths, batch, replays):
        for backend in backends:
            yield f"bandit/{shape}/hnca/{backend}", replays, lambda w=widths, b=batch, k=backend: bandit_step(
                w, b, device, "hnca", k)
        yield f"bandit/{shape}/reinforce", replays, lambda w=widths, b=batch: bandit_step(
            w, b, device, "reinforce", None)
        yield f"bandit/{shape}/backprop", replays, lambda w=widths, b=batch: backprop_step(w, b, device)

    def vae(shape, layers, hidden, batch, replays):
        if dry:
            hidden, batch = 8, 4
        main = "hnca" if layers == 1 else "hnca_baseline"
        for estimator in (main, "reinforce_loo", "disarm"):
            yield f"vae/{shape}/L{layers}/{estimator}", replays, lambda L=layers, h=hidden, b=batch, e=estimator: \
                vae_step(L, h, b, device, e)

    yield from bandit("paper", paper, 50, 300)
    yield from vae("paper", 2, 200, 50, 200)
    yield from bandit("gpu", gpu, 4096 if not dry else 8, 5)
    for layers in (1, 3):
        yield from vae("paper", layers, 200, 50, 200)
    for layers in (1, 2, 3):
        yield from vae("wide", layers, 1024, 1024, 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (no timings)")
    parser.add_argument("--only", default="", help="substring of the case names to run")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; later cases are skipped")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results, began = {}, time.perf_counter()
    for name, replays, make in cases(args.dry_run, device):
        if args.only not in name:
            continue
        if time.perf_counter() - began > args.budget:
            print(f"{name}: skipped (budget)", flush=True)
            continue
        for graphs in (True, False):
            key = f"{name}/{'graph' if graphs else 'eager'}"
            try:
                results[key] = time_step(make, graphs, device, replays if graphs else max(1, replays // 4))
                print(f"{key}: {results[key] * 1e3:.3f} ms ({1 / results[key]:.0f} steps/s)", flush=True)
            except Exception as exc:  # one line per failed case; the others still run
                print(f"{key}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    summarise(results)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "steps.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "seconds_per_step": results}, f, indent=1)
    return 0


def summarise(results) -> None:
    def ratio(a, b):
        return f"{results[a] / results[b]:.2f}x" if a in results and b in results else "n/a"

    print("\n| ratio | graph | eager |\n| --- | --- | --- |")
    for shape in ("paper", "gpu"):
        for key in sorted({k.rsplit("/", 1)[0] for k in results if k.startswith(f"bandit/{shape}/hnca")}):
            print(f"| {key} / backprop | {ratio(key + '/graph', f'bandit/{shape}/backprop/graph')} | "
                  f"{ratio(key + '/eager', f'bandit/{shape}/backprop/eager')} |")
    for shape in ("paper", "wide"):
        for layers in (1, 2, 3):
            main = f"vae/{shape}/L{layers}/{'hnca' if layers == 1 else 'hnca_baseline'}"
            loo = f"vae/{shape}/L{layers}/reinforce_loo"
            print(f"| {main} / reinforce_loo | {ratio(main + '/graph', loo + '/graph')} | "
                  f"{ratio(main + '/eager', loo + '/eager')} |")


if __name__ == "__main__":
    sys.exit(main())
