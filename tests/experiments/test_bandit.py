"""Gradient-variance metric against brute force, and ``hnca bandit`` / ``hnca plot`` end to end."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from hnca_kernels import BernoulliLinear, CategoricalLinear, StochasticSequential, record
from hnca_kernels.cli import main
from hnca_kernels.experiments.rundir import CHECKPOINT, CONFIG, METRICS, read_metrics

from paths import SHARED  # noqa: E402
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


@pytest.mark.slow
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
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(Path(run_dir) / METRICS)[0]]


def _weights(run_dir):
    return torch.load(Path(run_dir) / CHECKPOINT, weights_only=False)["model"]


@pytest.mark.slow
@needs_mnist
def test_resume_equals_uninterrupted_run(tmp_path):
    """--resume --epochs 6 after a 3-epoch run equals a 6-epoch run: metrics and weights."""
    args = ["bandit", "--layers", "2", "--estimator", "hnca", "--seed", "5", *QUICK]
    assert main([*args, "--epochs", "6", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--epochs", "3", "--out", str(tmp_path / "split")]) == 0
    assert main([*args, "--epochs", "6", "--out", str(tmp_path / "split"), "--resume"]) == 0
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [m["epoch"] for m in split] == [1, 2, 3, 4, 5, 6]
    assert split == straight
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A different seed gives a different run: the comparison above can fail.
    assert main([*args, "--epochs", "1", "--seed", "6", "--out", str(tmp_path / "other")]) == 0
    assert _metrics(tmp_path / "other")[0] != straight[0]


@pytest.mark.slow
@needs_mnist
def test_resume_drops_the_line_of_an_epoch_without_checkpoint(tmp_path, capsys):
    """A crash between the metrics line and the checkpoint: the epoch is redone, not duplicated."""
    args = ["bandit", "--layers", "1", *QUICK]
    main([*args, "--epochs", "1", "--out", str(tmp_path / "a")])
    main([*args, "--epochs", "2", "--out", str(tmp_path / "b")])
    with open(tmp_path / "a" / METRICS, "a") as f:
        f.write(json.dumps({"epoch": 2, "train_accuracy": -1.0}) + "\n")
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "a"), "--resume"]) == 0
    assert f"{tmp_path / 'a'}: dropped the metrics of epoch 2" in capsys.readouterr().out
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def _error(capsys, argv, status=1):
    """Run the CLI in-process: its exit status must be ``status``; returns its one stderr line."""
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]


@needs_mnist
def test_bad_configurations_are_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _error(capsys, ["bandit", *QUICK, "--epochs", "1", "--out", out, "--resume"]) == \
        f"hnca bandit: --resume: nothing to resume in {out} (no such directory)"
    main(["bandit", *QUICK, "--epochs", "1", "--out", out])
    assert _error(capsys, ["bandit", *QUICK, "--epochs", "1", "--out", out]) == \
        f"hnca bandit: {out} already holds a run (1 epoch(s)); pass --resume to continue it or choose another --out"
    assert _error(capsys, ["bandit", *QUICK, "--epochs", "2", "--estimator", "reinforce", "--out", out, "--resume"]) == \
        (f"hnca bandit: --resume with different settings than the run in {out} (estimator 'hnca' -> 'reinforce'); "
         "use the run's settings or another --out")
    for flag, value in (("--width", "0"), ("--epochs", "0"), ("--batch-size", "-1"), ("--lr", "nan")):
        line = _error(capsys, ["bandit", *QUICK, flag, value, "--out", str(tmp_path / "bad")], status=2)
        assert line.startswith(f"hnca bandit: error: argument {flag}: must be a positive")
    line = _error(capsys, ["bandit", *QUICK, "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "nodata")])
    assert line.startswith("hnca bandit: cannot load MNIST: train-images-idx3-ubyte[.gz] not found")
    assert not (tmp_path / "nodata").exists()  # a failed start leaves no directory behind


@pytest.mark.slow
@needs_mnist
def test_cli_end_to_end_then_plot(tmp_path, capsys):
    runs = []
    for estimator, baseline, layers in (("hnca", "--baseline", "1"), ("reinforce", "--no-baseline", "2")):
        out = tmp_path / f"{estimator}-{layers}"
        assert main(["bandit", "--limit-train", "500", "--limit-test", "200", "--epochs", "2", "--layers", layers,
                     "--estimator", estimator, baseline, "--data-dir", str(SHARED), "--out", str(out)]) == 0
        runs.append(out)
    metrics, _ = read_metrics(runs[0] / METRICS)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"epoch", "train_accuracy", "test_accuracy", "grad_variance", "log_grad_variance", "seconds"} <= m.keys()
        assert 0 <= m["train_accuracy"] <= 1 and 0 <= m["test_accuracy"] <= 1 and m["grad_variance"] > 0
        # test accuracy over 200 examples, train accuracy over 500: multiples of 1/200 and 1/500
        assert round(m["test_accuracy"] * 200, 9).is_integer() and round(m["train_accuracy"] * 500, 9).is_integer()
    config = json.loads((runs[0] / CONFIG).read_text())
    assert config["layers"] == 1 and config["estimator"] == "hnca" and config["baseline"] is True
    assert config["experiment"] == "bandit" and config["on_nonfinite"] == "stop"
    state = torch.load(runs[0] / CHECKPOINT, weights_only=False)
    assert state["epoch"] == 2 and "data_rng" in state and "rng" in state

    png = tmp_path / "fig.png"
    assert main(["plot", *map(str, runs), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def _fake_run(path, config, lines):
    path.mkdir()
    (path / CONFIG).write_text(json.dumps(config))
    (path / METRICS).write_text("".join(json.dumps(m) + "\n" for m in lines))
    return path


def test_plot_accepts_elbo_runs_and_rejects_bad_input(tmp_path, capsys):
    lines = [{"epoch": e, "train_elbo": -120.0 + e, "grad_variance": 0.1 / e} for e in range(1, 4)]
    lines[-1]["test_bound"] = -118.0
    run = _fake_run(tmp_path / "vae", {"estimator": "hnca", "baseline": False, "layers": 2}, lines)
    png = tmp_path / "vae.png"
    main(["plot", str(run), "-o", str(png), "--table"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out.splitlines()
    assert table[-3].startswith("| run | layers | epochs | train_elbo | test_bound | log grad variance |")
    assert table[-1].split(" | ")[:6] == ["| hnca", "2", "3", "-117.0000", "-118.0000", f"{math.log(0.1 / 3):.2f}"]
    assert _error(capsys, ["plot", str(tmp_path / "missing"), "-o", str(png)]) == \
        f"hnca plot: {tmp_path / 'missing'}: not a run directory"
    assert _error(capsys, ["plot", str(run), "-o", str(tmp_path / "fig.pdf")], status=2) == \
        f"hnca plot: error: -o/--output must name a .png file, got {tmp_path / 'fig.pdf'}"


def test_plot_separates_kinds_and_labels_colliding_runs(tmp_path, monkeypatch):
    """A VAE run beside a bandit run: ELBO and accuracy on separate axes. Two VAE runs differing
    only in lr: labelled by their directories, in different colours."""
    elbo = [{"epoch": e, "train_elbo": -120.0 + e, "grad_variance": 0.1} for e in (1, 2)]
    acc = [{"epoch": e, "train_accuracy": 0.5, "test_accuracy": 0.6, "grad_variance": 0.1} for e in (1, 2)]
    vae = {"experiment": "vae", "estimator": "hnca", "layers": 2}
    runs = [_fake_run(tmp_path / "lr3", dict(vae, lr=1e-3), elbo),
            _fake_run(tmp_path / "lr4", dict(vae, lr=1e-4), elbo),
            _fake_run(tmp_path / "bandit", {"experiment": "bandit", "estimator": "hnca", "baseline": True, "layers": 2}, acc)]
    from matplotlib.figure import Figure

    saved = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.setdefault("fig", fig))
    assert main(["plot", *map(str, runs), "-o", str(tmp_path / "fig.png")]) == 0
    axes = saved["fig"].axes
    assert len(axes) == 4  # two rows: bandit 2 layers, VAE 2 layers
    assert [axes[0].get_ylabel(), axes[2].get_ylabel()] == ["accuracy", "ELBO"]
    assert [line.get_label() for line in axes[0].get_legend().get_lines()] == ["hnca+baseline, 2 layers"]
    vae_lines = axes[2].get_legend().get_lines()
    assert [line.get_label() for line in vae_lines] == [f"hnca, 2 layers ({runs[0]})", f"hnca, 2 layers ({runs[1]})"]
    assert vae_lines[0].get_color() != vae_lines[1].get_color()
