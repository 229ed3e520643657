"""Run the paper's experiments at full length, skipping finished cells, and report them.

    python docs/experiments.py run [--runs DIR] [--only PATTERN] [--jobs N]   # train missing cells
    python docs/experiments.py status [--runs DIR]                            # epochs done per cell
    python docs/experiments.py report [--runs DIR]                            # tables and figures
    python docs/experiments.py collect [--runs DIR] [--to docs/metrics]       # the committed copy

Every cell is one ``hnca`` command with one CPU thread; ``run`` starts it fresh, continues it with
``--resume`` when its directory holds a checkpoint, and skips it when its metrics already reach the
cell's epochs. Some cells depend on others: the comparison with the straight-through estimators
runs each estimator at the learning rate its sweep found best (the highest train ELBO at epoch 20),
and more seeds of f-HNCA and of the better straight-through estimator; ``run`` adds them as soon as
the cells they depend on have reached the epochs they are read at. ``report`` writes the tables of docs/results.md (between its markers) and the figures.
``collect`` copies every cell's config.json and metrics.jsonl (not its checkpoint) to docs/metrics,
the copy in the repository that ``report --runs docs/metrics`` redraws the page from.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from hnca_kernels.experiments.common import positive_int

DOCS = Path(__file__).resolve().parent
BANDIT_EPOCHS = 100
VAE_EPOCHS = 100
# The comparison with straight-through estimators (2 layers): a learning-rate sweep, each
# estimator at its best rate for VAE_EPOCHS, and more seeds of the two that matter most.
COMPARED = ("hnca_baseline", "disarm", "gumbel_st", "reinmax")
STRAIGHT_THROUGH = ("gumbel_st", "reinmax")
PAPER_RATE = "1e-4"
SWEEP_RATES = ("1e-4", "3e-4", "1e-3")
SWEEP_EPOCHS = 20
# The categorical VAE (20 x 10 one-hot latents, one layer): the paper-rate comparison, and each
# estimator at the rate the Bernoulli sweep found best for it (LOO at DisARM's, the closest one).
CATEGORICAL = ("--latent", "categorical", "--variables", "20", "--classes", "10")
CATEGORICAL_PAPER = ("hnca", "reinforce_loo", "reinforce_baseline")
CATEGORICAL_RATED = {"hnca": "hnca_baseline", "reinforce_loo": "disarm", "gumbel_st": "gumbel_st",
                     "reinmax": "reinmax"}


@dataclass(frozen=True)
class Cell:
    name: str          # run directory under --runs, e.g. bandit/hnca-baseline-L2
    command: str       # "bandit" or "vae"
    epochs: int
    args: tuple = field(default=())

    def argv(self, runs: Path) -> list[str]:
        out = runs / self.name
        argv = [sys.executable, "-m", "hnca_kernels", self.command, *self.args, "--epochs", str(self.epochs),
                "--out", str(out), "--no-progress"]
        if self.command == "bandit":
            argv += ["--threads", "1"]
        if (out / "checkpoint.pt").exists():
            argv.append("--resume")
        return argv


def _vae(layers, estimator, seed=0, extra=(), tag="", epochs=VAE_EPOCHS, rate=PAPER_RATE, prefix="") -> Cell:
    if rate != PAPER_RATE:
        tag, extra = f"{tag}-lr{rate}", (*extra, "--lr", rate)
    name = f"vae/{prefix}L{layers}-{estimator}{tag}-s{seed}"
    return Cell(name, "vae", epochs, ("--layers", str(layers), "--estimator", estimator, "--seed", str(seed),
                                      "--test-every", "50", *extra))


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _at(run: Path, epoch: int, key: str):
    """``key`` of the run at ``epoch`` (the test bound: the last one up to it), or None."""
    values = [m.get(key) for m in _metrics(run) if m["epoch"] <= epoch and m.get(key) is not None]
    reached = any(m["epoch"] >= epoch for m in _metrics(run))
    return values[-1] if values and reached else None


def best_rates(runs: Path) -> dict:
    """{estimator: its sweep's best learning rate} for the estimators whose sweep is complete: the
    highest train ELBO at epoch SWEEP_EPOCHS (train, not test: the test set chooses nothing)."""
    best = {}
    for estimator in COMPARED:
        elbos = {rate: _at(runs / _vae(2, estimator, rate=rate).name, SWEEP_EPOCHS, "train_elbo") for rate in SWEEP_RATES}
        if all(v is not None for v in elbos.values()):
            best[estimator] = max(SWEEP_RATES, key=lambda rate: elbos[rate])
    return best


def better_straight_through(runs: Path, best: dict) -> str | None:
    """The straight-through estimator with the higher test bound at VAE_EPOCHS, each at its best rate."""
    bounds = {e: _at(runs / _vae(2, e, rate=best[e]).name, VAE_EPOCHS, "test_bound")
              for e in STRAIGHT_THROUGH if e in best}
    if len(bounds) < len(STRAIGHT_THROUGH) or None in bounds.values():
        return None
    return max(STRAIGHT_THROUGH, key=lambda e: bounds[e])


def comparison_cells(runs: Path | None) -> list[Cell]:
    """The straight-through comparison's cells that can be named now (see the module's docs), and
    the categorical VAE's, in the order they run: the sweep, then the cells that depend on it, the
    categorical VAE's paper-rate cells in between (they depend on nothing)."""
    paper_categorical = categorical_cells()
    out = [_vae(2, e) for e in STRAIGHT_THROUGH]  # the paper's rate, full length (also the sweep's 1e-4)
    out += [_vae(2, e, epochs=SWEEP_EPOCHS, rate=r) for r in SWEEP_RATES[1:] for e in COMPARED]
    out += paper_categorical[:1]
    if runs is None:
        return out + paper_categorical[1:]
    best = best_rates(runs)
    out += [_vae(2, e, rate=best[e]) for e in COMPARED if e in best]  # a sweep cell, extended
    out += paper_categorical[1:]
    st = better_straight_through(runs, best)
    if "hnca_baseline" in best and st is not None:
        out += [_vae(2, e, seed, rate=best[e]) for seed in (1, 2) for e in ("hnca_baseline", st)]
    out += [_vae(1, e, extra=CATEGORICAL, prefix="cat20x10-", rate=best[of])
            for e, of in CATEGORICAL_RATED.items() if of in best]
    return out


def categorical_cells() -> list[Cell]:
    """The categorical VAE at the paper's rate."""
    return [_vae(1, e, extra=CATEGORICAL, prefix="cat20x10-") for e in CATEGORICAL_PAPER]


def cells(runs: Path | None = None) -> list[Cell]:
    """Every cell, in the order they are run (the most informative first); the cells that depend on
    others' results are named once those are in ``runs``. A cell named twice (a sweep cell and its
    extension) is listed once, at its longest."""
    out = []
    for layers in (1, 2, 3):  # Figure 1: contextual bandit
        for estimator in ("hnca", "reinforce"):
            for baseline in ("baseline", "no-baseline"):
                out.append(Cell(f"bandit/{estimator}-{baseline}-L{layers}", "bandit", BANDIT_EPOCHS,
                                ("--layers", str(layers), "--estimator", estimator, f"--{baseline}", "--seed", "0")))

    vae = _vae
    main = {1: "hnca", 2: "hnca_baseline", 3: "hnca_baseline"}
    for layers in (2, 1, 3):  # Figure 3: discrete VAE, seed 0
        for estimator in (main[layers], "reinforce_loo", "disarm"):
            out.append(vae(layers, estimator))
    out.append(vae(2, "reinforce_baseline"))
    out.append(vae(2, "hnca_baseline", extra=("--upstream",), tag="-upstream"))  # Appendix K
    for seed in (1, 2):  # spread of the 2-layer cells
        for estimator in ("hnca_baseline", "reinforce_loo", "disarm"):
            out.append(vae(2, estimator, seed))
    out.append(vae(2, "hnca_baseline", extra=("--rho-direct",), tag="-rho_direct"))  # Appendix K
    out += comparison_cells(runs)
    longest: dict = {}
    for cell in out:
        if cell.name not in longest or cell.epochs > longest[cell.name].epochs:
            longest[cell.name] = cell
    return list({c.name: longest[c.name] for c in out}.values())


def epochs_done(run_dir: Path) -> int:
    return max((m["epoch"] for m in _metrics(run_dir)), default=0)


def select(patterns: list[str] | None, runs: Path | None = None) -> list[Cell]:
    chosen = cells(runs)
    if patterns:
        chosen = [c for c in chosen if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    return chosen


def run_cell(cell: Cell, runs: Path) -> tuple[Cell, int, float]:
    out = runs / cell.name
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(out / "train.log", "a") as log:
        code = subprocess.call(cell.argv(runs), stdout=log, stderr=subprocess.STDOUT, env=env)
    return cell, code, time.time() - began


def in_use(run_dir: Path) -> bool:
    """Whether another process holds the cell's run directory (its ``.lock``, see rundir.py)."""
    lock = run_dir / ".lock"
    if not lock.exists():
        return False
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def cmd_run(args) -> int:
    """Train the selected cells ``--jobs`` at a time, naming the dependent ones as they become known.
    A cell another process is training counts against the jobs and is left to it."""
    started, failed = set(), 0
    running: dict = {}

    def todo():  # a cell extended since it ran (a sweep cell at its best rate) is a new (name, epochs)
        return [c for c in select(args.only, args.runs)
                if (c.name, c.epochs) not in started and epochs_done(args.runs / c.name) < c.epochs
                and not any(c.name == r.name for r in running.values())]

    print(f"{len(todo())} cell(s) to train now", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        while True:
            waiting = todo()
            elsewhere = [c for c in waiting if in_use(args.runs / c.name)]
            ready = [c for c in waiting if c not in elsewhere]
            for cell in ready[: max(0, args.jobs - len(running) - len(elsewhere))]:
                started.add((cell.name, cell.epochs))
                running[pool.submit(run_cell, cell, args.runs)] = cell
            if not running and not elsewhere:
                break
            if not running:  # only others' cells: look again in a minute
                time.sleep(60)
                continue
            done, _ = wait(running, timeout=60, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                cell, code, seconds = future.result()
                status = "done" if code == 0 else f"FAILED (exit {code}, see {args.runs / cell.name / 'train.log'})"
                print(f"{cell.name}: {status} in {seconds / 60:.1f} min", flush=True)
                failed += code != 0
    return 1 if failed else 0


def cmd_status(args) -> int:
    for cell in select(args.only, args.runs):
        print(f"{cell.name:40s} {epochs_done(args.runs / cell.name):4d} / {cell.epochs}")
    return 0


def cmd_collect(args) -> int:
    copied = 0
    for cell in cells(args.runs):
        for name in ("config.json", "metrics.jsonl"):
            source = args.runs / cell.name / name
            if source.exists():
                (args.to / cell.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, args.to / cell.name / name)
                copied += 1
    print(f"copied {copied} file(s) to {args.to}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "status", "report", "collect"))
    parser.add_argument("--runs", type=Path, default=Path("runs/paper"), help="directory of the run directories")
    parser.add_argument("--only", nargs="*", help="cell name patterns (fnmatch), e.g. 'vae/L2-*'")
    parser.add_argument("--to", type=Path, default=DOCS / "metrics", help="collect: where the copies go")
    parser.add_argument("--jobs", type=positive_int, default=1, help="cells trained at once (one CPU thread each)")
    args = parser.parse_args(argv)
    if args.action != "run" and not any(epochs_done(args.runs / c.name) for c in cells(args.runs)):
        # a mistyped --runs would otherwise redraw the page with every cell "not run"
        print(f"experiments.py {args.action}: no cell's metrics under {args.runs}", file=sys.stderr)
        return 2
    if args.action == "run":
        return cmd_run(args)
    if args.action == "status":
        return cmd_status(args)
    if args.action == "collect":
        return cmd_collect(args)
    sys.path.insert(0, str(DOCS))
    from report import write_report  # docs/report.py: tables and figures from the run directories

    return write_report(args.runs)


if __name__ == "__main__":
    raise SystemExit(main())
