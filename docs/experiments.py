"""Run the paper's experiments at full length, skipping finished cells, and report them.

    python docs/experiments.py run [--runs DIR] [--only PATTERN] [--jobs N]   # train missing cells
    python docs/experiments.py status [--runs DIR]                            # epochs done per cell
    python docs/experiments.py report [--runs DIR]                            # tables and figures
    python docs/experiments.py collect [--runs DIR] [--to docs/metrics]       # the committed copy

Every cell is one ``hnca`` command with one CPU thread; ``run`` starts it fresh, continues it with
``--resume`` when its directory holds a checkpoint, and skips it when its metrics already reach the
cell's epochs. ``report`` writes the tables of docs/results.md (between its markers) and the figures.
``collect`` copies every cell's config.json and metrics.jsonl (not its checkpoint) to docs/metrics,
the copy in the repository that ``report --runs docs/metrics`` redraws the page from.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hnca_kernels.experiments.common import positive_int

DOCS = Path(__file__).resolve().parent
BANDIT_EPOCHS = 100
VAE_EPOCHS = 100


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


def cells() -> list[Cell]:
    """Every cell, in the order they are run (the most informative first)."""
    out = []
    for layers in (1, 2, 3):  # Figure 1: contextual bandit
        for estimator in ("hnca", "reinforce"):
            for baseline in ("baseline", "no-baseline"):
                out.append(Cell(f"bandit/{estimator}-{baseline}-L{layers}", "bandit", BANDIT_EPOCHS,
                                ("--layers", str(layers), "--estimator", estimator, f"--{baseline}", "--seed", "0")))

    def vae(layers, estimator, seed=0, extra=(), tag=""):
        name = f"vae/L{layers}-{estimator}{tag}-s{seed}"
        return Cell(name, "vae", VAE_EPOCHS, ("--layers", str(layers), "--estimator", estimator, "--seed", str(seed),
                                              "--test-every", "50", *extra))

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
    return out


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    epochs = [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]
    return max(epochs, default=0)


def select(patterns: list[str] | None) -> list[Cell]:
    chosen = cells()
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


def cmd_run(args) -> int:
    todo = [c for c in select(args.only) if epochs_done(args.runs / c.name) < c.epochs]
    print(f"{len(todo)} cell(s) to train", flush=True)
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for cell, code, seconds in pool.map(lambda c: run_cell(c, args.runs), todo):
            status = "done" if code == 0 else f"FAILED (exit {code}, see {args.runs / cell.name / 'train.log'})"
            print(f"{cell.name}: {status} in {seconds / 60:.1f} min", flush=True)
            failed += code != 0
    return 1 if failed else 0


def cmd_status(args) -> int:
    for cell in select(args.only):
        print(f"{cell.name:40s} {epochs_done(args.runs / cell.name):4d} / {cell.epochs}")
    return 0


def cmd_collect(args) -> int:
    copied = 0
    for cell in cells():
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
    if args.action != "run" and not any(epochs_done(args.runs / c.name) for c in cells()):
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
