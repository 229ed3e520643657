"""``hnca vae`` and ``hnca bandit`` under torchrun: 2 gloo ranks on the CPU, tiny runs.

One torchrun launch (``_torchrun_commands.py``, one process group) runs every multi-process
scenario of the default suite: a rank's first command costs seconds of imports on a loaded machine,
the commands then a second each. The ``slow`` tests launch each command as a user would
(``torchrun -m hnca_kernels ...``, ``torchrun --no-python hnca ...``).

What 2 ranks cannot share with 1 process is the network's random samples (each rank draws from
its own stream), so the comparisons with one process fix the uniforms (``fixed-uniforms``): every
sample is then a function of its logits, and the runs agree up to float rounding (the ranks' mean
gradient is DDP's average of two halves, not one sum).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import _torchrun_commands as commands
from hnca_kernels.cli import main
from hnca_kernels.experiments import common
from hnca_kernels.experiments.rundir import CHECKPOINT, CONFIG, METRICS, UsageError, read_metrics
from hnca_kernels.experiments.world import World
from hnca_kernels.metrics import linear_gradient_square_sum, linear_gradient_variance

from paths import ROOT  # noqa: E402
from paths import SHARED  # noqa: E402

pytestmark = pytest.mark.slow  # ranks and commands as processes of their own
HAVE_MNIST = (SHARED / "t10k-labels-idx1-ubyte.gz").exists()
needs_ranks = pytest.mark.skipif(not (HAVE_MNIST and dist.is_available() and dist.is_gloo_available()),
                                 reason=f"needs torch.distributed with gloo and the MNIST files in {SHARED}")

TINY = ["--data-dir", str(SHARED), "--limit-train", "200", "--limit-test", "50", "--no-progress",
        "--backend", "reference", "--device", "cpu"]
VAE = ["vae", "--layers", "2", "--estimator", "hnca_baseline", "--hidden", "16", "--test-samples", "3",
       "--test-every", "1", *TINY]
BANDIT = ["bandit", "--layers", "2", "--width", "16", *TINY]
# 45 a batch: shares of 23 and 22 examples (unequal loss weights), then a last batch of 20
UNEVEN = ["--batch-size", "45", "--epochs", "1"]
LAUNCH_TIMEOUT_S = 600


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT from C++) prints every thread's Python stack
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
               PYTHONFAULTHANDLER="1")
    return env


def _torchrun(*args, timeout=LAUNCH_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def _failed(done) -> str:
    """A failed launch's stderr: the ranks' own lines come first, torchrun's summary of them last."""
    err = done.stderr
    return err if len(err) <= 8000 else f"{err[:6000]}\n[...]\n{err[-2000:]}"


def _records(run):
    """metrics.jsonl without the wall-clock seconds."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run / METRICS)[0]]


def _checkpoint(run):
    return torch.load(run / CHECKPOINT, weights_only=False)


def _same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- shares of a batch

@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shares_cover_every_batch_and_their_weights_give_the_mean_of_the_whole(size):
    for count in range(size, 14):
        shares = [World(r, size).shard(count) for r in range(size)]
        assert shares[0][0] == 0 and shares[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
        # DDP averages the ranks' weighted means: the mean over all count examples
        values = torch.arange(count, dtype=torch.float64) ** 1.5
        ddp = sum(World(r, size).loss_weight(count) * values[a:b].mean() for r, (a, b) in enumerate(shares)) / size
        torch.testing.assert_close(ddp, values.mean(), rtol=1e-14, atol=0)
    # 17 examples, batches of 5 over 3 ranks: 5, 5, 5 and a last batch of 2 < 3 ranks, dropped
    plans = [World(r, 3).batches(17, 5) for r in range(3)]
    assert [[start for start, _, _ in plan] for plan in plans] == [[0, 5, 10]] * 3
    assert [plan[1][1:] for plan in plans] == [(5, 7), (7, 9), (9, 10)]
    assert World().batches(17, 5) == [(0, 0, 5), (5, 5, 10), (10, 10, 15), (15, 15, 17)]


@pytest.mark.parametrize("calls", [1, 2], ids=["one call", "a layer called twice"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_ranks_variance_terms_sum_to_the_variance_of_the_whole_batch(calls, bias):
    g = torch.Generator().manual_seed(3)
    batch, size = 13, 3
    inputs = [torch.randn(batch, 7, generator=g, dtype=torch.float64) for _ in range(calls)]
    grads = [torch.randn(batch, 5, generator=g, dtype=torch.float64) + 0.3 for _ in range(calls)]
    total, count = linear_gradient_variance(inputs, grads, bias=bias)
    # the mean per-example gradient over the whole batch (what DDP's averaged gradient holds)
    mean = [sum(a.t() @ x for a, x in zip(grads, inputs)) / batch]
    if bias:
        mean.append(sum(grads).mean(0))
    terms = []
    for r in range(size):
        w = World(r, size)
        a, b = w.shard(batch)
        square, c = linear_gradient_square_sum([x[a:b] for x in inputs], [t[a:b] for t in grads], bias=bias)
        assert c == count
        terms.append(common.variance_share(square, count, b - a, w.loss_weight(batch), size, mean))
    torch.testing.assert_close(sum(terms), total / count, rtol=1e-12, atol=0)


def test_options_a_run_of_several_processes_cannot_take():
    import argparse

    world = World(1, 3)
    with pytest.raises(UsageError, match="--batch-size 2 is the batch of one update over all processes"):
        world.check_options(argparse.Namespace(batch_size=2, seed=0))
    with pytest.raises(UsageError, match="--seed -1: under torchrun the seed must be >= 0"):
        world.check_options(argparse.Namespace(batch_size=50, seed=-1))
    World().check_options(argparse.Namespace(batch_size=1, seed=-1))  # one process: as before


# ----------------------------------------------------------------------------- one launch, many commands

@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Every scenario in one torchrun launch of 2 ranks; the one-process runs it is compared with
    run here. Returns (directory, {name: (rank 0's result, rank 1's)})."""
    t = tmp_path_factory.mktemp("torchrun")
    (t / "a-file").write_text("x")
    assert main([*VAE, "--epochs", "1", "--out", str(t / "one-process")]) == 0
    for name, argv in (("vae", VAE), ("bandit", BANDIT)):
        with commands.patched("fixed-uniforms"):
            assert main([*argv, *UNEVEN, "--out", str(t / f"{name}-1p")]) == 0
    scenarios = {
        "vae-2p": {"argv": [*VAE, *UNEVEN], "patch": "fixed-uniforms"},
        "bandit-2p": {"argv": [*BANDIT, *UNEVEN], "patch": "fixed-uniforms"},
        # the GPU's loop (steps that never wait for the device, metrics summed on the device) on the CPU
        "vae-2p-device-loop": {"argv": [*VAE, *UNEVEN], "patch": ["fixed-uniforms", "device-loop"]},
        "bandit-2p-device-loop": {"argv": [*BANDIT, *UNEVEN], "patch": ["fixed-uniforms", "device-loop"]},
        "vae-straight": {"argv": [*VAE, "--epochs", "2"]},
        "vae-first": {"argv": [*VAE, "--epochs", "1", "--out", str(t / "vae-resumed")]},
        "vae-resume": {"argv": [*VAE, "--epochs", "2", "--resume", "--out", str(t / "vae-resumed")]},
        "bandit-straight": {"argv": [*BANDIT, "--epochs", "2"]},
        "bandit-first": {"argv": [*BANDIT, "--epochs", "1", "--out", str(t / "bandit-resumed")]},
        "bandit-resume": {"argv": [*BANDIT, "--epochs", "2", "--resume", "--out", str(t / "bandit-resumed")]},
        # 4 batches an epoch: rank 1's 6th estimate is epoch 2, batch 2; only rank 1 sees the loss
        "diverge-stop": {"argv": [*VAE, "--epochs", "2"], "patch": "nan-loss", "rank": 1, "call": 6},
        "diverge-skip": {"argv": [*VAE, "--epochs", "2", "--on-nonfinite", "skip"], "patch": "nan-loss", "rank": 1,
                         "call": 6},
        "rank-0-fails": {"argv": [*BANDIT, "--epochs", "1", "--out", str(t / "a-file")]},
        "resume-1p-run": {"argv": [*VAE, "--epochs", "2", "--resume", "--out", str(t / "one-process")]},
        "batch-too-small": {"argv": [*BANDIT, "--batch-size", "1", "--out", str(t / "never")]},
    }
    for name, scenario in scenarios.items():
        if "--out" not in scenario["argv"]:
            scenario["argv"] = [*scenario["argv"], "--out", str(t / name)]
    spec = t / "spec.json"
    spec.write_text(json.dumps(list(scenarios.values())))
    done = _torchrun(ROOT / "tests" / "_torchrun_commands.py", spec)
    assert done.returncode == 0, _failed(done)
    ranks = [json.loads(Path(f"{spec}.rank{r}.json").read_text()) for r in range(2)]
    return t, {name: (ranks[0][i], ranks[1][i]) for i, name in enumerate(scenarios)}


def _ok(results, *names):
    for name in names:
        for rank, result in enumerate(results[name]):
            assert result["status"] == 0, (name, rank, result)


@needs_ranks
@pytest.mark.parametrize("loop", ["", "-device-loop"], ids=["eager loop", "device loop"])
@pytest.mark.parametrize("experiment", ["vae", "bandit"])
def test_two_ranks_equal_one_process_on_the_same_batches(launch, experiment, loop):
    """Fixed uniforms, batches of 45 (shares of 23 and 22, a last batch of 20): the epoch's metrics,
    the weights, Adam's state and the baselines of 2 ranks equal one process's; in the eager loop
    and in the GPU's device loop (run on the CPU, without graphs)."""
    t, results = launch
    _ok(results, f"{experiment}-2p{loop}")
    one, two = t / f"{experiment}-1p", t / f"{experiment}-2p{loop}"
    [a], [b] = _records(one), _records(two)
    assert a.keys() == b.keys()
    for key in a:
        if key in ("train_accuracy", "test_accuracy"):
            assert a[key] == b[key], key  # counts of right guesses: exactly equal
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    ca, cb = _checkpoint(one), _checkpoint(two)
    for name, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    for p, state in ca["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(cb["optimizer"]["state"][p][key], state[key], rtol=1e-4, atol=1e-9)
    if experiment == "bandit":
        torch.testing.assert_close(cb["baseline"]["value"], ca["baseline"]["value"], rtol=1e-12, atol=0)
    assert torch.equal(ca["data_rng"], cb["data_rng"])  # the same data order and binarization


@needs_ranks
@pytest.mark.parametrize("experiment", ["vae", "bandit"])
def test_a_resumed_two_rank_run_equals_the_straight_run_and_rank_0_writes(launch, experiment):
    t, results = launch
    _ok(results, f"{experiment}-straight", f"{experiment}-first", f"{experiment}-resume")
    straight, resumed = t / f"{experiment}-straight", t / f"{experiment}-resumed"
    assert _records(straight) == _records(resumed) and len(_records(straight)) == 2
    a, b = _checkpoint(straight), _checkpoint(resumed)
    _same_tensors(a["model"], b["model"])  # bitwise
    assert a["world_size"] == 2 and len(a["rank_rng"]) == 2
    assert not torch.equal(a["rank_rng"][0]["torch"], a["rank_rng"][1]["torch"])  # a stream per rank
    # rank 0 alone wrote: one set of files, its lock, nothing from rank 1
    assert sorted(p.name for p in straight.iterdir()) == [".lock", CHECKPOINT, CONFIG, METRICS]
    assert json.loads((straight / CONFIG).read_text())["world_size"] == 2


@needs_ranks
def test_a_loss_only_one_rank_sees_stops_or_skips_on_every_rank(launch):
    t, results = launch
    stop = results["diverge-stop"]
    assert [r["status"] for r in stop] == [1, 1]
    kept = "stopped, the checkpoint of epoch 1 is kept (lower --lr, or pass --on-nonfinite skip to skip such batches)"
    assert stop[0]["stderr"] == [f"hnca vae: non-finite loss on another process at epoch 2, batch 2: {kept}"]
    assert stop[1]["stderr"] == [f"hnca vae: non-finite loss (nan) at epoch 2, batch 2: {kept}"]
    assert [r["epoch"] for r in _records(t / "diverge-stop")] == [1] and _checkpoint(t / "diverge-stop")["epoch"] == 1
    _ok(results, "diverge-skip")
    assert [r["skipped_batches"] for r in _records(t / "diverge-skip")] == [0, 1]


@needs_ranks
def test_a_failure_of_rank_0_stops_every_rank_with_one_line(launch):
    t, results = launch
    first, second = results["rank-0-fails"]
    message = f"--out {t / 'a-file'} is not a directory"
    assert first == {"status": 1, "stderr": [f"hnca bandit: {message}"]}
    assert second == {"status": 1, "stderr": [f"hnca bandit: stopped: rank 0 failed ({message})"]}
    for rank, result in enumerate(results["batch-too-small"]):
        assert result["status"] == 2 and result["stderr"] == [
            "hnca bandit: error: --batch-size 1 is the batch of one update over all processes: it needs at least one "
            "example for each of the 2"], rank
    assert not (t / "never").exists()


@needs_ranks
def test_resuming_with_another_number_of_processes_is_refused(launch, capsys):
    t, results = launch
    hint = "resume it with as many (torchrun --nproc-per-node ...): each process's random stream is in the checkpoint"
    for rank, result in enumerate(results["resume-1p-run"]):
        line = (f"--resume: the checkpoint in {t / 'one-process'} was written by 1 process(es) and this run has 2; "
                f"{hint}")
        assert result["status"] == 1
        assert result["stderr"] == [f"hnca vae: {line}" if rank == 0 else f"hnca vae: stopped: rank 0 failed ({line})"]
    assert [r["epoch"] for r in _records(t / "one-process")] == [1]
    capsys.readouterr()
    assert main([*VAE, "--epochs", "3", "--resume", "--out", str(t / "vae-straight")]) == 1
    assert capsys.readouterr().err == (f"hnca vae: --resume: the checkpoint in {t / 'vae-straight'} was written by 2 "
                                       f"process(es) and this run has 1; {hint}\n")


# ----------------------------------------------------------------------------- as a user launches them

@needs_ranks
def test_a_command_that_fails_under_torchrun_exits_with_its_status_and_one_line(tmp_path):
    """Each rank of ``hnca`` under torchrun exits with the command's status, after its one-line error."""
    (tmp_path / "a-file").write_text("x")
    done = _torchrun("-m", "hnca_kernels", *BANDIT, "--epochs", "1", "--out", tmp_path / "a-file")
    assert done.returncode == 1, _failed(done)
    # the first rank out exits 1; torchrun then stops the other (SIGTERM) unless it was out as well
    root_cause = done.stderr.split("Root Cause")[-1]
    assert "exitcode  : 1 " in root_cause and "SIGABRT" not in done.stderr, _failed(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("hnca bandit: ")]
    assert errors and all(str(tmp_path / "a-file") in line or "rank 0 failed" in line for line in errors), errors


@needs_ranks
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["-m hnca_kernels vae", "--no-python hnca bandit"])
def test_torchrun_runs_the_commands_and_resumes_exactly(tmp_path, launcher):
    """``torchrun -m hnca_kernels vae ...`` and ``torchrun --no-python hnca bandit ...`` (the console
    script): 2 epochs straight equal 1 epoch and ``--resume --epochs 2``, every launch a new process."""
    *prefix, command = launcher.split()
    if prefix[0] == "--no-python" and shutil.which("hnca") is None:
        pytest.skip("the hnca console script is not on PATH (pip install -e .)")
    argv = [*prefix, *(VAE if command == "vae" else BANDIT)]
    for extra in (["--epochs", "2", "--out", tmp_path / "straight"], ["--epochs", "1", "--out", tmp_path / "resumed"],
                  ["--epochs", "2", "--resume", "--out", tmp_path / "resumed"]):
        done = _torchrun(*argv, *extra)
        assert done.returncode == 0, _failed(done)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _records(straight) == _records(resumed) and len(_records(straight)) == 2
    _same_tensors(_checkpoint(straight)["model"], _checkpoint(resumed)["model"])
    assert sorted(p.name for p in resumed.iterdir()) == [".lock", CHECKPOINT, CONFIG, METRICS]
