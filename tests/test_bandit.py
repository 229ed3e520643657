"""Gradient-variance metric against brute force, and ``hnca bandit`` / ``hnca plot`` end to end."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, record
from hnca_kernels.cli import main
from hnca_kernels.experiments import common

SHARED = Path(os.environ.get("HNCA_DATA_DIR", "/work/shared/data/mnist"))
needs_mnist = pytest.mark.skipif(not (SHARED / "t10k-labels-idx1-ubyte.gz").exists(), reason=f"no MNIST files in {SHARED}")
QUICK = ["--limit-train", "300", "--limit-test", "100", "--width", "16", "--no-progress", "--data-dir", str(SHARED)]


def _net(depth, centered=True):
    sizes = [7] + [5] * depth
    layers = [BernoulliLinear(a, b, centered=centered, dtype=torch.float64) for a, b in zip(sizes, sizes[1:])]
    return StochasticSequential(*layers, CategoricalLinear(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("centered", [True, False], ids=["pm1", "01"])
@pytest.mark.parametrize("estimator", ["hnca", "reinforce"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gradient_variance_matches_per_example_autograd(depth, estimator, centered):
    torch.manual_seed(depth)
    net = _net(depth, centered)
    with torch.no_grad():  # spread the weights so that units and messages are far from trivial
        for p in net.parameters():
            p.normal_(0, 1.5)
    B = 9
    x = (torch.rand(B, 7, dtype=torch.float64) < 0.5).double()
    with record() as rec:
        action = net(x)
    samples = [c.sample for c in rec.calls]
    reward = torch.rand(B, dtype=torch.float64) + (action % 2)  # any black-box reward
    baseline = 0.4
    net.zero_grad()
    rec.surrogate_loss(reward, estimator, baseline=baseline).backward()
    batch_grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    metric = rec.gradient_variance()

    # Brute force: example b alone (same samples replayed) gives its own gradient estimate.
    per_example = []
    for b in range(B):
        net.zero_grad()
        with record(replay=[s[b : b + 1] for s in samples]) as one:
            net(x[b : b + 1])
        one.surrogate_loss(reward[b : b + 1], estimator, baseline=baseline).backward()
        per_example.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    per_example = torch.stack(per_example)  # [B, params]
    # The batch estimate is the mean of the per-example ones: the metric's "per example" is consistent.
    torch.testing.assert_close(per_example.mean(0), batch_grad, rtol=1e-12, atol=1e-14)
    expected = per_example.var(0, unbiased=False).mean().item()
    assert expected > 1e-4
    assert metric == pytest.approx(expected, rel=1e-10)


def test_hnca_variance_is_below_reinforce_on_the_same_samples():
    """Theorem 1 per parameter, checked on many replayed draws of a small fixed network."""
    torch.manual_seed(0)
    net = _net(2)
    x = (torch.rand(4000, 7, dtype=torch.float64) < 0.5).double()
    variances = {}
    for estimator in ("hnca", "reinforce"):
        torch.manual_seed(1)  # same samples for both estimators
        with record() as rec:
            action = net(x)
        rec.surrogate_loss((action == 0).double(), estimator)
        variances[estimator] = rec.gradient_variance()
    assert variances["hnca"] < 0.8 * variances["reinforce"]


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in common.read_metrics(run_dir)]


def _weights(run_dir):
    return torch.load(Path(run_dir) / common.CHECKPOINT, weights_only=False)["model"]


@needs_mnist
def test_resume_equals_uninterrupted_run(tmp_path):
    args = ["bandit", "--layers", "2", "--estimator", "hnca", "--seed", "5", *QUICK]
    main([*args, "--epochs", "2", "--out", str(tmp_path / "straight")])
    main([*args, "--epochs", "1", "--out", str(tmp_path / "split")])
    main([*args, "--epochs", "2", "--out", str(tmp_path / "split"), "--resume"])
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [m["epoch"] for m in split] == [1, 2]
    assert split == straight
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A different seed gives a different run: the comparison above can fail.
    main([*args, "--epochs", "1", "--seed", "6", "--out", str(tmp_path / "other")])
    assert _metrics(tmp_path / "other")[0] != straight[0]


@needs_mnist
def test_resume_drops_the_line_of_an_epoch_without_checkpoint(tmp_path):
    """A crash between the metrics line and the checkpoint: the epoch is redone, not duplicated."""
    args = ["bandit", "--layers", "1", *QUICK]
    main([*args, "--epochs", "1", "--out", str(tmp_path / "a")])
    main([*args, "--epochs", "2", "--out", str(tmp_path / "b")])
    with open(tmp_path / "a" / common.METRICS, "a") as f:
        f.write(json.dumps({"epoch": 2, "train_accuracy": -1.0}) + "\n")
    main([*args, "--epochs", "2", "--out", str(tmp_path / "a"), "--resume"])
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


@needs_mnist
def test_bad_configurations_are_clear_errors(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="no config.json"):
        main(["bandit", *QUICK, "--epochs", "1", "--out", out, "--resume"])
    main(["bandit", *QUICK, "--epochs", "1", "--out", out])
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["bandit", *QUICK, "--epochs", "1", "--out", out])
    with pytest.raises(SystemExit, match=r"different configuration:\n  estimator: 'hnca' in the run, 'reinforce' now"):
        main(["bandit", *QUICK, "--epochs", "2", "--estimator", "reinforce", "--out", out, "--resume"])
    for flag, value in (("--width", "0"), ("--epochs", "0"), ("--batch-size", "-1"), ("--lr", "nan")):
        with pytest.raises(SystemExit, match=f"{flag} must be a positive"):
            main(["bandit", *QUICK, flag, value, "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="cannot load MNIST"):
        main(["bandit", *QUICK, "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "nodata")])


@needs_mnist
def test_cli_end_to_end_then_plot(tmp_path, capsys):
    runs = []
    for estimator, baseline, layers in (("hnca", "--baseline", "1"), ("reinforce", "--no-baseline", "2")):
        out = tmp_path / f"{estimator}-{layers}"
        assert main(["bandit", "--limit-train", "500", "--limit-test", "200", "--epochs", "2", "--layers", layers,
                     "--estimator", estimator, baseline, "--data-dir", str(SHARED), "--out", str(out)]) == 0
        runs.append(out)
    metrics = common.read_metrics(runs[0])
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"epoch", "train_accuracy", "test_accuracy", "grad_variance", "log_grad_variance", "seconds"} <= m.keys()
        assert 0 <= m["train_accuracy"] <= 1 and 0 <= m["test_accuracy"] <= 1 and m["grad_variance"] > 0
        # test accuracy over 200 examples, train accuracy over 500: multiples of 1/200 and 1/500
        assert round(m["test_accuracy"] * 200, 9).is_integer() and round(m["train_accuracy"] * 500, 9).is_integer()
    config = json.loads((runs[0] / common.CONFIG).read_text())
    assert config["layers"] == 1 and config["estimator"] == "hnca" and config["baseline"] is True
    state = torch.load(runs[0] / common.CHECKPOINT, weights_only=False)
    assert state["epoch"] == 2 and "data_rng" in state and "rng" in state

    png = tmp_path / "fig.png"
    assert main(["plot", *map(str, runs), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_plot_accepts_elbo_runs_and_rejects_bad_input(tmp_path, capsys):
    run = tmp_path / "vae"
    run.mkdir()
    (run / common.CONFIG).write_text(json.dumps({"estimator": "hnca", "baseline": False, "layers": 2}))
    lines = [{"epoch": e, "train_elbo": -120.0 + e, "grad_variance": 0.1 / e} for e in range(1, 4)]
    lines[-1]["test_bound"] = -118.0
    (run / common.METRICS).write_text("".join(json.dumps(m) + "\n" for m in lines))
    png = tmp_path / "vae.png"
    main(["plot", str(run), "-o", str(png), "--table"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out.splitlines()
    assert table[-3].startswith("| run | layers | epochs | train_elbo | test_bound | log grad variance |")
    assert table[-1].split(" | ")[:6] == ["| hnca", "2", "3", "-117.0000", "-118.0000", f"{math.log(0.1 / 3):.2f}"]
    with pytest.raises(SystemExit, match="not a run directory"):
        main(["plot", str(tmp_path / "missing"), "-o", str(png)])
    with pytest.raises(SystemExit, match=".png"):
        main(["plot", str(run), "-o", str(tmp_path / "fig.pdf")])
