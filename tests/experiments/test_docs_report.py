"""docs/experiments.py and docs/report.py on synthetic run directories (nothing is trained)."""

import json
import math
import sys
from pathlib import Path

import pytest

from paths import ROOT  # noqa: E402

DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import experiments  # noqa: E402
import report  # noqa: E402

pytestmark = pytest.mark.slow  # the docs scripts


def _run(path: Path, rows: list[dict], config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text(json.dumps(config or {}))
    return path


def _bandit(runs: Path, name: str, accuracy: float, log_var: float, epochs: int = 100):
    rows = [{"epoch": e, "train_accuracy": accuracy, "test_accuracy": accuracy + 0.001 * (e == epochs),
             "grad_variance": math.exp(log_var), "log_grad_variance": log_var, "seconds": 6.0} for e in range(1, epochs + 1)]
    _run(runs / "bandit" / name, rows)


def _vae(runs: Path, name: str, offset: float, epochs: int, device: str = "cpu"):
    # train ELBO -200 + epoch + offset; the test bound every 50 epochs and at 120, 10 above the ELBO
    rows = [{"epoch": e, "train_elbo": -200.0 + e + offset, "grad_variance": math.exp(-1.0), "log_grad_variance": -1.0,
             "seconds": 30.0}
            for e in range(1, epochs + 1)]
    for row in rows:
        if row["epoch"] % 50 == 0 or row["epoch"] == 120:
            row["test_bound"] = row["train_elbo"] + 10
    _run(runs / "vae" / name, rows, {"device": device})


def test_cells_are_read_at_their_planned_length(tmp_path):
    _vae(tmp_path, "L2-reinforce_loo-s0", offset=0.0, epochs=133, device="cuda (NVIDIA H200)")
    _vae(tmp_path, "L2-hnca_baseline-s0", offset=5.0, epochs=100)
    _vae(tmp_path, "L2-hnca_baseline-s1", offset=7.0, epochs=100)
    rows = {line.split(" | ")[1]: line for line in report.vae_table(tmp_path).splitlines()[2:]
            if line.startswith("| 2 ")}
    # epoch 100 of the longer run, its test bound of epoch 100 (not 120's), and how far it went
    assert rows["reinforce_loo"].startswith("| 2 | reinforce_loo | 1 | 100 (of 133) | -100.00 | -90.00 |")
    assert "H200 GPU" in rows["reinforce_loo"]
    # two seeds: mean (min to max)
    assert "| 2 | 100/100 | -94.00 (-95.00 to -93.00) | -84.00 (-85.00 to -83.00) |" in rows["hnca_baseline"]
    assert "| 3 | hnca_baseline | - | not run |" in report.vae_table(tmp_path)


def test_claims_say_which_hold_and_which_cells_are_missing(tmp_path):
    for layers, reinforce_accuracy in ((1, 0.80), (2, 0.95)):  # at 2 layers REINFORCE wins: the claim fails
        _bandit(tmp_path, f"hnca-baseline-L{layers}", 0.90, -9.0)
        _bandit(tmp_path, f"hnca-no-baseline-L{layers}", 0.90, -8.0)
        _bandit(tmp_path, f"reinforce-baseline-L{layers}", reinforce_accuracy, -5.0)
        _bandit(tmp_path, f"reinforce-no-baseline-L{layers}", 0.70, -4.0)
    _bandit(tmp_path, "hnca-baseline-L3", 0.90, -9.0, epochs=99)  # short of 100: not judged
    for name, offset in (("L1-hnca-s0", 1.0), ("L1-reinforce_loo-s0", 0.0), ("L1-disarm-s0", 2.0)):
        _vae(tmp_path, name, offset, epochs=100)
    lines = report.claims(tmp_path).splitlines()
    assert lines[0] == ("- bandit, 1 hidden layer, baseline: HNCA above REINFORCE in test accuracy "
                        "(0.9010 vs 0.8010): holds; below it in log gradient variance (-9.00 vs -5.00): holds.")
    assert "(0.9010 vs 0.9510): **does not hold**; below it in log gradient variance (-9.00 vs -5.00): holds" in lines[2]
    assert lines[4] == "- bandit, 3 hidden layers: not every cell has reached 100 epochs yet."
    assert lines[5] == ("- VAE, 1 layer, train ELBO (hnca -99.00, reinforce_loo -100.00, disarm -98.00): "
                        "hnca best: **does not hold**.")
    assert lines[7] == "- VAE, 2 layers: not every cell has reached 100 epochs yet."



def test_the_two_layer_claim_over_seeds_needs_every_seed_to_hold(tmp_path):
    for seed, (mine, loo, disarm) in enumerate(((5.0, 0.0, 1.0), (6.0, 2.0, 5.5), (7.0, 1.0, 2.0))):
        _vae(tmp_path, f"L2-hnca_baseline-s{seed}", mine, epochs=100)
        _vae(tmp_path, f"L2-reinforce_loo-s{seed}", loo, epochs=100)
        _vae(tmp_path, f"L2-disarm-s{seed}", disarm, epochs=100 if seed < 2 else 60)  # seed 2 cut: left out
    elbo, bound = report.seed_claims(tmp_path)
    # means 6.0 against 1.0 and 3.25; hnca's worst seed (5.0) below DisARM's best (5.5)
    assert elbo == ("- VAE, 2 layers over seeds, train ELBO (mean, range: hnca_baseline -94.00 (3 seeds, -95.00 to -93.00), "
                    "reinforce_loo -99.00 (3 seeds, -100.00 to -98.00), disarm -96.75 (2 seeds, -99.00 to -94.50)): "
                    "hnca_baseline best in the mean: holds; its worst seed above every seed of the others: **does not hold**.")
    assert bound.startswith("- VAE, 2 layers over seeds, test bound (mean, range: hnca_baseline -84.00 (3 seeds")
    (tmp_path / "vae" / "L2-disarm-s1" / "metrics.jsonl").unlink()  # one finished DisARM seed: no claim over seeds
    assert report.seed_claims(tmp_path) == []

def test_experiments_skip_finished_cells_and_resume_cut_ones(tmp_path):
    names = [c.name for c in experiments.select(["vae/L2-hnca_baseline-s*"])]
    assert names == ["vae/L2-hnca_baseline-s0", "vae/L2-hnca_baseline-s1", "vae/L2-hnca_baseline-s2"]
    cell = experiments.select(["vae/L2-hnca_baseline-s0"])[0]
    assert "--resume" not in cell.argv(tmp_path)
    _vae(tmp_path, "L2-hnca_baseline-s0", 0.0, epochs=40)
    (tmp_path / cell.name / "checkpoint.pt").write_bytes(b"")
    assert experiments.epochs_done(tmp_path / cell.name) == 40
    argv = cell.argv(tmp_path)
    assert argv[-1] == "--resume" and argv[argv.index("--epochs") + 1] == "100"
    rho = experiments.select(["*rho_direct*"])[0]  # the ablation as the paper's code runs it
    assert "--rho-direct" in rho.argv(tmp_path) and "--no-direct-in-baseline" not in rho.argv(tmp_path)


def test_collect_copies_metrics_and_configs_but_not_checkpoints(tmp_path):
    runs, to = tmp_path / "runs", tmp_path / "metrics"
    _vae(runs, "L2-disarm-s0", 0.0, epochs=3)
    (runs / "vae" / "L2-disarm-s0" / "checkpoint.pt").write_bytes(b"weights")
    assert experiments.main(["collect", "--runs", str(runs), "--to", str(to)]) == 0
    copied = sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file())
    assert copied == ["vae/L2-disarm-s0/config.json", "vae/L2-disarm-s0/metrics.jsonl"]
    assert experiments.epochs_done(to / "vae" / "L2-disarm-s0") == 3


def test_report_fills_the_page_between_its_markers_and_links_its_figures(tmp_path):
    runs = tmp_path / "runs"
    for name, accuracy in (("hnca-baseline-L1", 0.9), ("reinforce-baseline-L1", 0.8)):
        _bandit(runs, name, accuracy, -5.0)
    _vae(runs, "L2-hnca_baseline-s0", 0.0, epochs=60)
    (tmp_path / "results.md").write_text(f"# Page\n\nprose\n\n{report.BEGIN}\nold tables\n{report.END}\n\nafter\n")
    assert report.write_report(runs, docs=tmp_path) == 0
    page = (tmp_path / "results.md").read_text()
    assert page.startswith("# Page\n\nprose\n\n") and page.endswith(f"{report.END}\n\nafter\n")
    assert "old tables" not in page and "| 1 | hnca | True | 100 | 0.9000 | 0.9010 | -5.00 | CPU, 10 min |" in page
    for figure in ("bandit-100.png", "vae-100.png", "vae-seeds.png", "vae-ablations.png"):
        assert f"]({figure})" in page and (tmp_path / figure).stat().st_size > 0


def test_a_short_ablation_is_compared_at_its_epoch(tmp_path):
    _vae(tmp_path, "L2-hnca_baseline-s0", 0.0, epochs=100)
    _vae(tmp_path, "L2-hnca_baseline-rho_direct-s0", -3.0, epochs=60)
    rows = report.ablation_table(tmp_path).splitlines()
    assert rows[3] == "| rho on the direct components too (--rho-direct) | 60 | -143.00 | -143.00 | -1.00 |"
    assert rows[4] == "| as in the paper, at the same epoch as the row above | 60 | -140.00 | -140.00 | -1.00 |"
    assert rows[5] == "| upstream components too (--upstream) | not run | | | |"


@pytest.mark.parametrize("action", ["status", "report", "collect"])
def test_a_runs_directory_without_cells_is_one_line_and_touches_nothing(tmp_path, capsys, action):
    page = DOCS / "results.md"
    before = page.read_bytes()
    assert experiments.main([action, "--runs", str(tmp_path / "typo"), "--to", str(tmp_path / "copy")]) == 2
    assert capsys.readouterr().err == f"experiments.py {action}: no cell's metrics under {tmp_path / 'typo'}\n"
    assert page.read_bytes() == before and not (tmp_path / "copy").exists()


def test_a_bad_jobs_count_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        experiments.main(["run", "--runs", str(tmp_path), "--jobs", "0"])
    assert stop.value.code == 2
    assert "--jobs: must be a positive integer, got 0" in capsys.readouterr().err


def test_the_comparison_reads_each_estimators_best_rate_from_the_sweep(tmp_path):
    # the sweep: hnca_baseline best at 1e-3, reinmax at 3e-4; gumbel_st's 1e-3 cell is short of 20 epochs
    for estimator, offsets in (("hnca_baseline", (0.0, 1.0, 2.0)), ("reinmax", (0.0, 3.0, 1.0)),
                               ("disarm", (2.0, 1.0, 0.0)), ("gumbel_st", (0.0, 1.0, 9.0))):
        for rate, offset in zip(experiments.SWEEP_RATES, offsets):
            epochs = 100 if rate == "1e-4" else (19 if estimator == "gumbel_st" and rate == "1e-3" else 20)
            _vae(tmp_path, Path(experiments._vae(2, estimator, rate=rate).name).name, offset, epochs)
    _vae(tmp_path, "L2-hnca_baseline-lr1e-3-s1", 4.0, epochs=100)
    assert experiments.best_rates(tmp_path) == {"hnca_baseline": "1e-3", "reinmax": "3e-4", "disarm": "1e-4"}
    sweep = report.sweep_table(tmp_path).splitlines()
    assert sweep[2] == "| hnca_baseline | -180.00 | -179.00 | -178.00 | 1e-3 |"
    assert sweep[4] == "| gumbel_st (biased) | -180.00 | -179.00 | not run | - |"
    table = report.comparison_table(tmp_path, docs=tmp_path)
    # at its best rate, over the seeds that reached 100 epochs; where none has, the longest as far as it went
    assert "| hnca_baseline, 1e-3 (best) | 1 | 20/100 | -96.00 |" in table  # seed 0 is short of 100 epochs
    assert "| reinmax (biased), 3e-4 (best) | 1 | 20 | -177.00 |" in table
    assert "| gumbel_st (biased), best rate | - | sweep not complete |" in table
    assert "disarm, 1e-4 (best)" in table and "disarm, 1e-4 (best) | 1 | 100 | -98.00" in table


def test_the_comparison_figure_takes_its_time_axis_from_the_measured_steps(tmp_path):
    pytest.importorskip("matplotlib")
    _vae(tmp_path, "L2-hnca_baseline-s0", 0.0, epochs=10)
    (tmp_path / report.STEP_TIMES).write_text(json.dumps({
        "cpu": "a CPU", "capability": "AVX2", "torch": "2", "date": "2026-01-01", "step_ms": {"bernoulli-L2/hnca_baseline": 3.0}}))
    out = report.comparison_figure(tmp_path, tmp_path, tmp_path / "f.png",
                                   [("hnca_baseline", [tmp_path / "vae" / "L2-hnca_baseline-s0"], "bernoulli-L2/hnca_baseline")], "t")
    assert out == tmp_path / "f.png" and out.stat().st_size > 0
    assert report._step_ms(tmp_path) == ({"bernoulli-L2/hnca_baseline": 3.0}, "a CPU (AVX2), one thread, torch 2, 2026-01-01")
    assert report.comparison_figure(tmp_path, tmp_path, tmp_path / "g.png", [("x", [], "k")], "t") is None


def test_gradient_study_refuses_a_directory_without_a_checkpoint(tmp_path, capsys):
    import gradient_study

    _run(tmp_path / "run", [], {"layers": 2})  # config and metrics, no checkpoint
    assert gradient_study.main([str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint.pt" in err
