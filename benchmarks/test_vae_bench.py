"""One VAE training step (estimate + backward), batch 50, 200 hidden units, per estimator x depth.

f-HNCA is one forward pass plus a message pass (linear in depth); REINFORCE LOO and DisARM draw
a pair of partial forward passes from every layer (quadratic in depth). Depths 4 and 6 go beyond the
paper to make the growth visible.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest benchmarks/test_vae_bench.py --benchmark-enable
"""

import pytest
import torch

from hnca_kernels.models import ESTIMATORS, BernoulliVAE


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 6], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_vae_step(benchmark, estimator, layers):
    torch.manual_seed(0)
    vae = BernoulliVAE(layers)
    x = (torch.rand(50, 784) < 0.3).float()

    def step():
        vae.zero_grad(set_to_none=True)
        vae.elbo_loss(x, estimator).backward()

    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
