"""The library on CUDA tensors against the same computation on the CPU (skipped without a GPU).

Run by ``benchmarks/gpu_check.sh`` on a GPU machine with the backend tests, tests/test_graphs.py
and the experiments' end-to-end runs on ``--device cuda``.
"""

import copy
import math
import os
from pathlib import Path

import pytest
import torch

import hnca_kernels
from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, record
from hnca_kernels.backends import is_available
from hnca_kernels.models import UNBIASED_ESTIMATORS as ESTIMATORS, BernoulliVAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [b for b in ("triton", "cuda", "reference") if torch.cuda.is_available() and is_available(b, "cuda")]
from paths import SHARED  # noqa: E402


class Dag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.h1 = BernoulliLinear(20, 16, centered=True, dtype=torch.float64)
        self.z = CategoricalLinear(16, 4, num_variables=3, one_hot=True, dtype=torch.float64)
        self.h2 = BernoulliLinear(16 + 12 + 20, 8, dtype=torch.float64)
        self.out = CategoricalLinear(8 + 16, 5, dtype=torch.float64)

    def forward(self, x):
        h1 = self.h1(x)
        z = self.z(h1)
        return self.out(self.h2(h1, z, x), h1)


def _grads(model):
    return [p.grad.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("model_name", ["chain", "dag"])
def test_record_step_on_cuda_equals_cpu(backend, model_name):
    torch.manual_seed(0)
    model = Dag() if model_name == "dag" else StochasticSequential(
        BernoulliLinear(20, 16, centered=True, dtype=torch.float64), BernoulliLinear(16, 8, dtype=torch.float64),
        CategoricalLinear(8, 5, dtype=torch.float64))
    x = torch.randn(33, 20, dtype=torch.float64)
    with record() as rec:
        action = model(x)
    samples = [c.sample for c in rec.calls]
    reward = (action == 2).double()
    rec.surrogate_loss(reward, baseline=0.3, backend="reference").backward()
    expected = _grads(model)
    model = model.cuda()
    model.zero_grad()
    with record(replay=[s.cuda() for s in samples]) as rec:
        model(x.cuda())
    rec.surrogate_loss(reward.cuda(), baseline=0.3, backend=backend).backward()
    for e, g in zip(expected, _grads(model)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_vae_estimate_on_cuda_equals_cpu(estimator):
    torch.manual_seed(1)
    vae = BernoulliVAE(3, hidden=[24, 16, 8], data_dim=40, dtype=torch.float64)
    x = (torch.rand(17, 40) < 0.4).double()
    latents = vae.sample_latents(x)
    branches = None
    if estimator in ("reinforce_loo", "disarm"):
        branches = [tuple(vae.sample_latents(x)[k:] for _ in range(2)) for k in range(3)]
    gpu_vae = copy.deepcopy(vae).cuda()  # before the CPU step moves the baselines
    vae.estimate(x, estimator, latents=latents, branches=branches).loss.backward()
    expected = _grads(vae)
    vae = gpu_vae
    vae.zero_grad()
    cuda_branches = None if branches is None else [tuple([z.cuda() for z in t] for t in pair) for pair in branches]
    vae.estimate(x.cuda(), estimator, latents=[z.cuda() for z in latents], branches=cuda_branches).loss.backward()
    for e, g in zip(expected, _grads(vae)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_message_pass_makes_no_host_synchronisation():
    torch.manual_seed(2)
    net = StochasticSequential(BernoulliLinear(64, 48, centered=True), BernoulliLinear(48, 32),
                               CategoricalLinear(32, 10)).cuda()
    x = torch.randn(50, 64, device="cuda")
    baseline = hnca_kernels.MovingAverageBaseline(0.99).cuda()
    for _ in range(2):  # the first call builds and autotunes
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with record() as rec:
                action = net(x)
            reward = (action == 1).float()
            rec.surrogate_loss(reward, baseline=baseline(reward)).backward()
            rec.gradient_variance(as_tensor=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not (SHARED / "t10k-labels-idx1-ubyte.gz").exists(), reason="no MNIST files")
@pytest.mark.parametrize("graphs", ["--cuda-graphs", "--no-cuda-graphs"])
@pytest.mark.parametrize("command", ["vae", "bandit"])
def test_experiments_run_on_cuda_and_resume_exactly(tmp_path, command, graphs):
    """2 epochs straight equal 1 epoch then --resume to 2 (captured RNG replays the eager streams)."""
    import json

    from hnca_kernels.cli import main

    common = ["--device", "cuda", "--limit-train", "1000", "--limit-test", "200", "--no-progress",
              "--data-dir", str(SHARED), graphs]
    extra = ["--layers", "2", "--estimator", "hnca_baseline", "--test-samples", "5", "--test-every", "1"] \
        if command == "vae" else ["--layers", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([command, *extra, *common, "--epochs", "2", "--out", str(straight)]) == 0
    assert main([command, *extra, *common, "--epochs", "1", "--out", str(split)]) == 0
    assert main([command, *extra, *common, "--epochs", "2", "--out", str(split), "--resume"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    key = "train_elbo" if command == "vae" else "train_accuracy"
    print(command, graphs, [(m["epoch"], m[key], m["seconds"]) for m in metrics])
    assert all(math.isfinite(m[key]) for m in metrics)
