"""How many kernels a VAE training step launches: the operations an eager step dispatches (each
one that is not a view a kernel launch on a GPU), and for the step compiled whole (``torch.compile(fullgraph=True)``,
inductor) the fused kernels it generates and the calls it leaves outside them (the hnca custom ops,
matrix products, random draws). On a GPU a step of paper-shape work costs about its launches,
so this count is what a fused step must bring down. Runs on the CPU (inductor's C++ kernels; on
a GPU the same graph becomes Triton kernels).

    OMP_NUM_THREADS=1 python benchmarks/step_kernels.py
    python benchmarks/step_kernels.py --device cuda

The compiled step's gradients are checked against the eager step's on the same draws.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hnca_kernels.models import BernoulliVAE, CategoricalVAE

CASES = [("bernoulli", 1, "hnca"), ("bernoulli", 2, "hnca_baseline"), ("bernoulli", 3, "hnca_baseline"),
         ("bernoulli", 2, "reinforce_loo"), ("bernoulli", 2, "reinforce_baseline"), ("categorical", 1, "hnca")]


class CountOps(TorchDispatchMode):
    """Counts the ATen (and custom) operations dispatched, views and metadata included."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        self.views += func.is_view  # a view launches no kernel on a GPU
        return func(*args, **(kwargs or {}))


def make(kind, layers, device):
    torch.manual_seed(0)
    vae = BernoulliVAE(layers) if kind == "bernoulli" else CategoricalVAE(layers)
    return vae.to(device)


def eager_ops(vae, x, estimator) -> tuple[int, int]:
    """(operations dispatched by one eager step, how many of them are views)."""
    vae.elbo_loss(x, estimator).backward()  # warm: first calls load backends
    vae.zero_grad(set_to_none=True)
    with CountOps() as counter:
        vae.elbo_loss(x, estimator).backward()
    return sum(counter.ops.values()), counter.views


def compiled_kernels(vae, x, estimator) -> tuple[int, Counter, float]:
    """(fused kernels, the calls outside them by name, max |compiled - eager| gradient relative to its scale)."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    previous, config.fallback_random = config.fallback_random, True  # the eager step's random draws
    try:
        step = torch.compile(lambda x: vae.elbo_loss(x, estimator), fullgraph=True)
        baselines = [b.value.clone() for b in getattr(vae, "baselines", [])]
        vae.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        _, code = run_and_get_code(lambda: step(x).backward())
        fast = [p.grad.clone() for p in vae.parameters() if p.grad is not None]
        for b, value in zip(getattr(vae, "baselines", []), baselines):
            b.value.copy_(value)
        vae.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        vae.elbo_loss(x, estimator).backward()
        eager = [p.grad for p in vae.parameters() if p.grad is not None]
        error = max(((f - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for f, e in zip(fast, eager)
                    if e.numel())
    finally:
        config.fallback_random = previous
        torch._dynamo.reset()
    text = "\n".join(code)
    # a fused kernel is launched as `<name>(...)` where <name> is defined by async_compile
    fused = set(re.findall(r"^(\w+) = async_compile\.(?:cpp_pybinding|cpp|triton)\(", text, flags=re.M))
    launches = sum(len(re.findall(rf"^\s+{re.escape(name)}\(", text, flags=re.M)) for name in fused)
    outside = Counter(m.removesuffix(".default") for m in
                      re.findall(r"(?<![\w.'])(extern_kernels\.\w+|(?:torch\.ops\.)?\w+\.\w+\.default)\(", text))
    return launches, outside, error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="the eager counts only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print("| VAE | estimator | eager: operations a step (views among them) | compiled: fused kernels "
          "| compiled: calls outside them | compiled vs eager gradient |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, layers, estimator in CASES:
        vae = make(kind, layers, device)
        x = (torch.rand(50, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float().to(device)
        ops, views = eager_ops(vae, x, estimator)
        cells = ["-", "-", "-"]
        if not args.no_compile:
            launches, outside, error = compiled_kernels(vae, x, estimator)
            named = ", ".join(f"{n.split('.')[-1]} {c}" for n, c in outside.most_common())
            cells = [str(launches), f"{sum(outside.values())} ({named})", f"{error:.1e}"]
        print(f"| {kind}, {layers} layer{'s' * (layers > 1)} | {estimator} | {ops} ({views}) | " + " | ".join(cells) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
