"""torch.distributed: two ranks (gloo, CPU, spawned processes) against one process on the union batch.

One spawn runs every scenario (starting a rank imports torch, seconds on a loaded machine): the
fixture draws each scenario's samples once, each rank replays its half under DDP, and the tests
compare what the ranks saved with one process replaying the whole batch.
"""

import contextlib
import datetime
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import hnca_kernels
from hnca_kernels import BernoulliLinear, CategoricalLinear, MovingAverageBaseline, StochasticSequential, record
from hnca_kernels.models import UNBIASED_ESTIMATORS as ESTIMATORS, BernoulliVAE

from _gloo import gloo_threads  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")]

WORLD, HALF = 2, 5             # each rank takes HALF examples of a batch of WORLD * HALF
DT = torch.float64
BACKEND = "reference"          # no C++ extension to load in the spawned ranks; distribution is backend-agnostic
SEED = 1234
COLLECTIVE_TIMEOUT_S = 120     # a loaded machine is slow, a hung collective is not
SPAWN_TIMEOUT_S = 300


def _rows(rank):
    return slice(None) if rank is None else slice(rank * HALF, (rank + 1) * HALF)


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


# ---- the bandit-style network: +-1 Bernoulli layers and a softmax output ------------------------

def bandit_net():
    return StochasticSequential(BernoulliLinear(6, 8, centered=True, dtype=DT),
                                BernoulliLinear(8, 5, centered=True, dtype=DT), CategoricalLinear(5, 3, dtype=DT))


def bandit_steps(net, steps, micro, generator):
    """``steps`` lists of ``micro`` union batches (x, label, samples), the samples drawn once."""
    out = []
    for _ in range(steps):
        batches = []
        for _ in range(micro):
            x = torch.randn(WORLD * HALF, 6, generator=generator, dtype=DT)
            with record() as rec:
                net(x)
            label = torch.randint(0, 3, (WORLD * HALF,), generator=generator)
            batches.append((x, label, [c.sample for c in rec.calls]))
        out.append(batches)
    return out


def train_bandit(model, baseline, steps, estimator, rank=None):
    """SGD steps replaying the rows of ``rank`` (all rows for None); the micro-batches of a step
    accumulate their gradients, under ``no_sync`` but the last when ``model`` is DDP.
    Returns per step (gradients, baseline value used, whether the action was the output's sample)."""
    rows, net = _rows(rank), model.module if isinstance(model, DDP) else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for batches in steps:
        opt.zero_grad()
        used, clean = [], True
        for m, (x, label, samples) in enumerate(batches):
            accumulate = isinstance(model, DDP) and m < len(batches) - 1
            with model.no_sync() if accumulate else contextlib.nullcontext():
                with record(replay=[s[rows] for s in samples]) as rec:
                    action = model(x[rows])
                reward = (action == label[rows]).to(DT)
                b = baseline(reward)
                rec.surrogate_loss(reward, estimator, baseline=b, backend=BACKEND).backward()
            used.append(b)
            clean = clean and action is rec.calls[-1].sample and not rec.fallbacks
        history.append((_grads(net), torch.stack(used), clean))
        opt.step()
    return history


# ---- the VAE ---------------------------------------------------------------------------------------

VAE_WIDTHS, PIXELS = [5, 4, 3], 7


def vae_model():
    return BernoulliVAE(len(VAE_WIDTHS), hidden=VAE_WIDTHS, data_dim=PIXELS, backend=BACKEND, dtype=DT)


def vae_steps(vae, steps, generator):
    """Per step a union batch x, its latents drawn once, and (for LOO and DisARM) branches: any
    0/1 values replay, so they are drawn as coin flips."""
    out = []
    for _ in range(steps):
        x = (torch.rand(WORLD * HALF, PIXELS, generator=generator) < 0.5).to(DT)
        flips = lambda w: (torch.rand(WORLD * HALF, w, generator=generator) < 0.5).to(DT)  # noqa: E731
        branches = [tuple([flips(w) for w in VAE_WIDTHS[k:]] for _ in range(2)) for k in range(len(VAE_WIDTHS))]
        out.append((x, vae.sample_latents(x), branches))
    return out


def train_vae(model, steps, estimator, rank=None):
    """SGD steps of ``model(x, estimator)`` (BernoulliVAE.forward is elbo_loss) on the rows of
    ``rank``. Returns per step (gradients, the baselines' values after it, all-reduce calls)."""
    rows, vae = _rows(rank), model.module if isinstance(model, DDP) else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for x, latents, branches in steps:
        replay = {"latents": [z[rows] for z in latents]}
        if estimator in ("reinforce_loo", "disarm"):
            replay["branches"] = [tuple([t[rows] for t in traj] for traj in pair) for pair in branches]
        opt.zero_grad()
        before = _ALL_REDUCES[0]
        model(x[rows], estimator, **replay).backward()
        history.append((_grads(vae), torch.stack([b.value.clone() for b in vae.baselines]),
                        _ALL_REDUCES[0] - before))
        opt.step()
    return history


# ---- the spawned ranks -----------------------------------------------------------------------------

_ALL_REDUCES = [0]  # torch.distributed.all_reduce calls in this process (DDP's own reducer is not one)


def _count_all_reduces():
    real = dist.all_reduce

    def counted(*args, **kwargs):
        _ALL_REDUCES[0] += 1
        return real(*args, **kwargs)
    dist.all_reduce = counted


def _draws():
    return torch.rand(4, dtype=DT), np.random.rand(3), random.random()


def _worker(rank, world, tmp):
    torch.set_num_threads(1)
    tmp = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        _count_all_reduces()
        cases, out = torch.load(tmp / "cases.pt", weights_only=False), {}
        # seeding: this rank's stream; a model built afterwards differs per rank until DDP wraps it
        out["rank"] = hnca_kernels.distributed.seed(SEED)
        out["draws"] = _draws()
        net = bandit_net()
        out["init_before_ddp"] = net[0].weight.detach().clone()
        out["init_after_ddp"] = DDP(net).module[0].weight.detach().clone()

        for name, case in cases["bandit"].items():
            net = bandit_net()
            net.load_state_dict(case["init"])
            baseline = MovingAverageBaseline(0.7)
            out[name] = train_bandit(DDP(net), baseline, case["steps"], case["estimator"], rank)
        for estimator, case in cases["vae"].items():
            vae = vae_model()
            vae.load_state_dict(case["init"])
            out[f"vae-{estimator}"] = train_vae(DDP(vae), case["steps"], estimator, rank)

        # shards of different sizes: the global mean is sum / count over the union
        synced, local = MovingAverageBaseline(0.6), MovingAverageBaseline(0.6, sync=False)
        values = []
        for signal in cases["uneven"]:
            part = signal[:3] if rank == 0 else signal[3:]
            values.append((synced(part), local(part)))
        out["uneven"] = values + [(synced.value.clone(), local.value.clone())]
        torch.save(out, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    torch.save(gloo_threads(), tmp / f"gloo-threads{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Draw every scenario once, run it on two ranks; (cases, [rank 0's results, rank 1's])."""
    tmp = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(7)
    cases = {"bandit": {}, "vae": {}}
    for name, estimator, steps, micro in (("hnca", "hnca", 3, 1), ("reinforce", "reinforce", 3, 1),
                                          ("no_sync", "hnca", 2, 3)):
        torch.manual_seed(len(cases["bandit"]))
        net = bandit_net()
        cases["bandit"][name] = {"estimator": estimator, "init": net.state_dict(),
                                 "steps": bandit_steps(net, steps, micro, g)}
    for k, estimator in enumerate(ESTIMATORS):
        torch.manual_seed(10 + k)
        vae = vae_model()
        cases["vae"][estimator] = {"init": vae.state_dict(), "steps": vae_steps(vae, 3, g)}
    cases["uneven"] = [torch.randn(8, generator=g, dtype=DT) for _ in range(4)]
    torch.save(cases, tmp / "cases.pt")

    context = mp.start_processes(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):   # raises with the rank's traceback if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {SPAWN_TIMEOUT_S} s")
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in range(WORLD):
        results[r]["gloo_threads_left"] = torch.load(tmp / f"gloo-threads{r}.pt")
    return cases, results


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


# ---- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hnca", "reinforce"])
def test_a_ddp_step_equals_one_process_on_the_union_batch(ranks, name):
    """Bandit network, synced MovingAverageBaseline: DDP's averaged gradients, the baselines used
    and the record's view of DDP's forward (the action is the output's sample, no fallback)."""
    cases, results = ranks
    case = cases["bandit"][name]
    net = bandit_net()
    net.load_state_dict(case["init"])
    single = train_bandit(net, MovingAverageBaseline(0.7), case["steps"], case["estimator"])
    assert single[0][1].abs().sum() == 0 and any(s[1].abs().sum() > 0 for s in single[1:])
    for step, (grads, used, _) in enumerate(single):
        assert any(g.abs().sum() > 0 for g in grads)
        for result in results:
            r_grads, r_used, clean = result[name][step]
            _same(r_grads, grads)
            _same(r_used, used)   # the same baseline on both ranks, the one-process one
            assert clean


def test_no_sync_accumulation_equals_one_process_accumulating(ranks):
    cases, results = ranks
    case = cases["bandit"]["no_sync"]
    net = bandit_net()
    net.load_state_dict(case["init"])
    single = train_bandit(net, MovingAverageBaseline(0.7), case["steps"], case["estimator"])
    for step, (grads, used, _) in enumerate(single):
        for result in results:
            _same(result["no_sync"][step][0], grads)
            _same(result["no_sync"][step][1], used)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_ddp_vae_step_equals_one_process_on_the_union_batch(ranks, estimator):
    """BernoulliVAE under DDP (its forward is elbo_loss): gradients and per-layer baselines after
    each step; the baselines of all layers take one all-reduce a step."""
    cases, results = ranks
    case = cases["vae"][estimator]
    vae = vae_model()
    vae.load_state_dict(case["init"])
    single = train_vae(vae, case["steps"], estimator)
    uses_baseline = estimator.endswith("_baseline")
    for step, (grads, values, _) in enumerate(single):
        assert all(g.abs().sum() > 0 for g in grads if g.numel())  # (the prior has no weight columns)
        assert (values.abs().sum() > 0) == uses_baseline
        for result in results:
            r_grads, r_values, all_reduces = result[f"vae-{estimator}"][step]
            _same(r_grads, grads)
            _same(r_values, values)
            assert all_reduces == int(uses_baseline)


def test_synced_baseline_averages_shards_of_any_size_and_sync_false_stays_local(ranks):
    cases, results = ranks
    union, shards = MovingAverageBaseline(0.6), [MovingAverageBaseline(0.6), MovingAverageBaseline(0.6)]
    expected = []
    for signal in cases["uneven"]:
        expected.append((union(signal), [shards[0](signal[:3]), shards[1](signal[3:])]))
    expected.append((union.value, [s.value for s in shards]))
    for rank, result in enumerate(results):
        assert len(result["uneven"]) == len(expected)
        for (synced, local), (u, per_rank) in zip(result["uneven"], expected):
            torch.testing.assert_close(synced, u, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(local, per_rank[rank], rtol=1e-12, atol=1e-14)
    assert results[0]["uneven"][-1][1] != results[1]["uneven"][-1][1]


def test_seed_gives_each_rank_its_own_stream_and_the_same_on_a_rerun(ranks):
    _, results = ranks
    assert [r["rank"] for r in results] == list(range(WORLD))
    draws = [r["draws"] for r in results]
    for a, b in zip(draws[0], draws[1]):
        assert not np.allclose(a, b)            # torch, numpy and random differ between ranks
    for rank, result in enumerate(results):     # a rerun (here, in this process) draws the same
        assert hnca_kernels.distributed.seed(SEED, rank=rank) == rank
        torch.testing.assert_close(_draws()[0], result["draws"][0], rtol=0, atol=0)
    # rank 0 is seeded like one process with torch.manual_seed / numpy / random
    torch.manual_seed(SEED), np.random.seed(SEED), random.seed(SEED)
    again = _draws()
    torch.testing.assert_close(again[0], draws[0][0], rtol=0, atol=0)
    assert np.array_equal(again[1], draws[0][1]) and again[2] == draws[0][2]
    # parameters built after seeding differ per rank; DDP broadcasts rank 0's when it wraps them
    assert not torch.equal(results[0]["init_before_ddp"], results[1]["init_before_ddp"])
    for result in results:
        torch.testing.assert_close(result["init_after_ddp"], results[0]["init_before_ddp"], rtol=0, atol=0)


def test_destroy_process_group_releases_the_group_after_ddp(ranks):
    """DDP's first construction imports torch.distributed.nn.functional, whose default arguments
    would hold the default group past destroy_process_group; its gloo threads then abort the
    process as the interpreter exits. hnca_kernels imports it before any group exists."""
    _, results = ranks
    for r in range(WORLD):
        left = results[r]["gloo_threads_left"]
        if left is None:
            pytest.skip("no /proc/self/task to list threads in")
        assert left == [], f"rank {r}: gloo threads left after destroy_process_group: {left}"


def test_seed_reads_the_rank_from_torchrun_before_the_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert hnca_kernels.distributed.current_rank() == 3
    assert hnca_kernels.distributed.seed(5) == 3
    first = torch.rand(3)
    hnca_kernels.distributed.seed(5, rank=3)
    assert torch.equal(torch.rand(3), first)
    assert hnca_kernels.distributed.rank_seed(5, 3) not in (5, 8, hnca_kernels.distributed.rank_seed(6, 3))
    monkeypatch.delenv("RANK")
    assert hnca_kernels.distributed.current_rank() == 0
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        hnca_kernels.distributed.seed(-1)
