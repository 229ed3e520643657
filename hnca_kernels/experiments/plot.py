"""``hnca plot RUN_DIR... [-o out.png]``: learning curves and log gradient variance, like the paper's figures.

One row per network depth (config ``layers``), two panels per row: on the left the learning
curve (``train_accuracy`` dotted and ``test_accuracy`` solid when a run has them, otherwise
``train_elbo`` as a line and ``test_bound`` as markers), on the right log(``grad_variance``).
Each run is labelled from its config.json, e.g. "hnca+baseline, 2 layers"; its final value is
written at the end of its line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import common


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot runs' learning curves and gradient variance",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (config.json, metrics.jsonl)")
    p.add_argument("-o", "--output", type=Path, default=Path("figure.png"), help="PNG to write (default figure.png)")
    p.add_argument("--title", default=None)
    p.add_argument("--table", action="store_true", help="also print a markdown table of each run's final epoch")
    p.set_defaults(func=run)


def _method(config: dict) -> str:
    """The run's label without its depth, e.g. 'hnca+baseline'."""
    if "label" in config:
        return str(config["label"])
    name = str(config.get("estimator", config.get("experiment", "run")))
    return name + ("+baseline" if config.get("baseline") else "")


def load_run(run_dir: Path) -> dict:
    """{'dir', 'config', 'metrics', 'method', 'layers'} of one run directory, with clear errors."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"{run_dir}: not a run directory")
    config_path = run_dir / common.CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    metrics = common.read_metrics(run_dir)
    if not metrics:
        raise SystemExit(f"{run_dir}: {common.METRICS} is empty")
    return {"dir": run_dir, "config": config, "metrics": metrics,
            "method": _method(config) if config else run_dir.name, "layers": config.get("layers")}


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
    depths = sorted({r["layers"] for r in runs}, key=lambda d: (d is None, d))
    methods = sorted({r["method"] for r in runs})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}

    fig, axes = plt.subplots(len(depths), 2, figsize=(11, 3.4 * len(depths)), squeeze=False)
    for row, depth in enumerate(depths):
        left, right = axes[row]
        depth_name = f"{depth} hidden layer{'s' if depth != 1 else ''}" if depth is not None else ""
        left_label = None
        for r in (r for r in runs if r["layers"] == depth):
            color, m = colors[r["method"]], r["metrics"]
            label = r["method"] + (f", {depth} layer{'s' if depth != 1 else ''}" if depth is not None else "")
            if any("train_accuracy" in x or "test_accuracy" in x for x in m):
                left_label = "accuracy"
                xs, ys = _series(m, "train_accuracy")
                left.plot(xs, ys, ":", color=color)
                _annotate(left, xs, ys, color)
                xs, ys = _series(m, "test_accuracy")
                left.plot(xs, ys, "-", color=color, label=label)
            else:
                left_label = left_label or "ELBO"
                xs, ys = _series(m, "train_elbo")
                left.plot(xs, ys, "-", color=color, label=label)
                _annotate(left, xs, ys, color, "{:.1f}")
                bx, by = _series(m, "test_bound")
                left.plot(bx, by, "o", color=color, markersize=4)
            xs, ys = _series(m, "grad_variance")
            logs = [math.log(v) if v > 0 else float("nan") for v in ys]
            right.plot(xs, logs, "-", color=color, label=label)
            _annotate(right, xs, logs, color, "{:.2f}")
        left.set_ylabel(left_label or "")
        left.set_title(f"{depth_name} — {'train (dotted), test (solid)' if left_label == 'accuracy' else 'train ELBO, test bound (o)'}".strip(" —"), fontsize=9)
        right.set_ylabel("log mean gradient variance")
        right.set_title(depth_name, fontsize=9)
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        left.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def results_table(run_dirs) -> str:
    """Markdown table of each run's last epoch: method, depth, epochs, final metrics, mean seconds/epoch."""
    runs = sorted((load_run(d) for d in run_dirs), key=lambda r: (r["layers"] is None, r["layers"] or 0, r["method"]))
    keys = [k for k in ("train_accuracy", "test_accuracy", "train_elbo", "test_bound")
            if any(k in r["metrics"][-1] for r in runs)]
    head = ["run", "layers", "epochs", *keys, "log grad variance", "s/epoch"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        last = r["metrics"][-1]
        seconds = [m["seconds"] for m in r["metrics"] if "seconds" in m]
        cells = [r["method"], str(r["layers"] if r["layers"] is not None else "-"), str(last["epoch"])]
        cells += [f"{last[k]:.4f}" if k in last else "-" for k in keys]
        variance = last.get("grad_variance")
        cells.append(f"{math.log(variance):.2f}" if variance else "-")
        cells.append(f"{sum(seconds) / len(seconds):.1f}" if seconds else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run(args) -> int:
    if args.output.suffix.lower() != ".png":
        raise SystemExit(f"-o/--output must name a .png file, got {args.output}")
    print(plot_runs(args.runs, args.output, args.title))
    if args.table:
        print(results_table(args.runs))
    return 0
