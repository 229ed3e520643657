"""``hnca plot RUN_DIR... [-o out.png]``: learning curves and log gradient variance, like the paper's figures.

One row per kind of run and network depth (config ``experiment`` and ``layers``): bandit runs and
VAE runs never share an axis. Two panels per row: on the left the learning curve
(``train_accuracy`` dotted and ``test_accuracy`` solid for bandit runs, ``train_elbo`` as a line
and ``test_bound`` as markers for VAE runs), on the right log(``grad_variance``). Each run is
labelled from its config.json, e.g. "hnca+baseline, 2 layers", followed by its directory when
that label is not unique; its final value is written at the end of its line.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from . import common
from .rundir import CONFIG, METRICS, CommandError, UsageError, experiment_of, one_line, read_json, read_metrics

_KINDS = ("bandit", "vae")
_LEFT = {"bandit": ("accuracy", "train (dotted), test (solid)"), "vae": ("ELBO", "train ELBO, test bound (o)")}


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", formatter_class=common.HelpFormatter, help="plot runs' learning curves and gradient variance",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (config.json, metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="PNG to write (default: figure.png in the run directory, or in the directory holding the runs)")
    p.add_argument("--title", default=None)
    p.add_argument("--table", action="store_true", help="also print a markdown table of each run's final epoch")
    p.set_defaults(func=run)


def _method(config: dict) -> str:
    """The run's label without its depth, e.g. 'hnca+baseline'."""
    if "label" in config:
        return str(config["label"])
    name = str(config.get("estimator", experiment_of(config) or "run"))
    return name + ("+baseline" if config.get("baseline") else "")


def _kind(config: dict, metrics: list[dict], run_dir: Path) -> str:
    kind = experiment_of(config)
    if kind in _KINDS:
        return kind
    if any("train_accuracy" in m or "test_accuracy" in m for m in metrics):
        return "bandit"
    if any("train_elbo" in m or "test_bound" in m for m in metrics):
        return "vae"
    raise CommandError(f"{run_dir}: {METRICS} holds neither accuracies (bandit) nor ELBOs (VAE)")


def load_run(run_dir: Path) -> dict:
    """{'dir', 'config', 'metrics', 'kind', 'method', 'layers'} of one run directory, with clear errors."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CommandError(f"{run_dir}: not a run directory")
    config_path = run_dir / CONFIG
    config = read_json(config_path) if config_path.exists() else {}
    if not (run_dir / METRICS).exists():
        raise CommandError(f"no {METRICS} in {run_dir}")
    metrics, _ = read_metrics(run_dir / METRICS)  # a torn last line (a run being killed) is left out
    if not metrics:
        raise CommandError(f"{run_dir}: {METRICS} is empty")
    return {"dir": run_dir, "config": config, "metrics": metrics, "kind": _kind(config, metrics, run_dir),
            "method": _method(config) if config else run_dir.name, "layers": config.get("layers")}


def _layers(depth) -> str:
    return f"{depth} layer{'s' if depth != 1 else ''}" if depth is not None else ""


def _label_runs(runs: list[dict]) -> None:
    """Set each run's 'name' (its method, and its directory when several runs of the same kind and
    depth share the method: runs differing only in lr or seed, say), which picks its colour, and
    its 'label' (name and depth) for the legend."""
    counts = Counter((r["kind"], r["layers"], r["method"]) for r in runs)
    for r in runs:
        collides = counts[(r["kind"], r["layers"], r["method"])] > 1
        r["name"] = f"{r['method']} ({r['dir']})" if collides else r["method"]
        r["label"] = ", ".join(filter(None, (r["method"], _layers(r["layers"])))) + (f" ({r['dir']})" if collides else "")


def _series(metrics, key):
    points = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
    return [e for e, _ in points], [v for _, v in points]


def _annotate(ax, xs, ys, color, fmt="{:.3f}"):
    if xs:
        ax.annotate(fmt.format(ys[-1]), (xs[-1], ys[-1]), xytext=(3, 0), textcoords="offset points",
                    color=color, fontsize=7, va="center")


def plot_runs(run_dirs, output: Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [load_run(d) for d in run_dirs]
    _label_runs(runs)
    rows = sorted({(r["kind"], r["layers"]) for r in runs},
                  key=lambda g: (_KINDS.index(g[0]), g[1] is None, g[1] or 0))
    names = sorted({r["name"] for r in runs})
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.4 * len(rows)), squeeze=False)
    for (kind, depth), (left, right) in zip(rows, axes):
        row_name = " ".join(filter(None, ("bandit" if kind == "bandit" else "VAE", _layers(depth))))
        for r in (r for r in runs if (r["kind"], r["layers"]) == (kind, depth)):
            color, m = colors[r["name"]], r["metrics"]
            if kind == "bandit":
                xs, ys = _series(m, "train_accuracy")
                left.plot(xs, ys, ":", color=color)
                _annotate(left, xs, ys, color)
                xs, ys = _series(m, "test_accuracy")
                left.plot(xs, ys, "-", color=color, label=r["label"])
            else:
                xs, ys = _series(m, "train_elbo")
                left.plot(xs, ys, "-", color=color, label=r["label"])
                _annotate(left, xs, ys, color, "{:.1f}")
                bx, by = _series(m, "test_bound")
                left.plot(bx, by, "o", color=color, markersize=4)
            xs, ys = _series(m, "grad_variance")
            logs = [math.log(v) if v > 0 else float("nan") for v in ys]
            right.plot(xs, logs, "-", color=color, label=r["label"])
            _annotate(right, xs, logs, color, "{:.2f}")
        ylabel, what = _LEFT[kind]
        left.set_ylabel(ylabel)
        left.set_title(f"{row_name} — {what}", fontsize=9)
        right.set_ylabel("log mean gradient variance")
        right.set_title(row_name, fontsize=9)
        for ax in (left, right):
            ax.margins(x=0.12)  # room for the last value's label right of each curve
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        left.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=120, format="png", bbox_inches="tight")
    except OSError as exc:
        raise CommandError(f"cannot write {output}: {one_line(exc)}") from None
    finally:
        plt.close(fig)
    return output


def results_table(run_dirs) -> str:
    """Markdown table of each run's last epoch: label, depth, epochs, final metrics, mean seconds/epoch."""
    runs = [load_run(d) for d in run_dirs]
    _label_runs(runs)
    runs.sort(key=lambda r: (_KINDS.index(r["kind"]), r["layers"] is None, r["layers"] or 0, r["name"]))
    keys = [k for k in ("train_accuracy", "test_accuracy", "train_elbo", "test_bound")
            if any(k in r["metrics"][-1] for r in runs)]
    head = ["run", "layers", "epochs", *keys, "log grad variance", "s/epoch"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        last = r["metrics"][-1]
        seconds = [m["seconds"] for m in r["metrics"] if m.get("seconds") is not None]
        cells = [r["name"], str(r["layers"] if r["layers"] is not None else "-"), str(last["epoch"])]
        cells += [f"{last[k]:.4f}" if last.get(k) is not None else "-" for k in keys]
        variance = last.get("grad_variance")
        cells.append(f"{math.log(variance):.2f}" if variance else "-")
        cells.append(f"{sum(seconds) / len(seconds):.1f}" if seconds else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def default_output(runs) -> Path:
    """figure.png in the one run directory, or in the directory that holds them all."""
    if len(runs) == 1:
        return Path(runs[0]) / "figure.png"
    return Path(os.path.commonpath([str(Path(r).resolve()) for r in runs])) / "figure.png"


def run(args) -> int:
    if args.output is None:
        args.output = default_output(args.runs)
    if args.output.suffix.lower() != ".png":
        raise UsageError(f"-o/--output must name a .png file, got {args.output}")
    print(plot_runs(args.runs, args.output, args.title))
    if args.table:
        print(results_table(args.runs))
    return 0
