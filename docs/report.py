"""The tables and figures of docs/results.md, from the run directories of docs/experiments.py.

    python docs/experiments.py report [--runs DIR]

Writes docs/bandit-100.png, docs/vae-100.png, docs/vae-seeds.png and docs/vae-ablations.png, and
replaces the text between ``<!-- report:begin -->`` and ``<!-- report:end -->`` in docs/results.md
with the claims, the tables and the figures' links (cells that have not run yet are shown as such). A cell's numbers are those of its planned length (100
epochs; a run that went further is read at that epoch, so every cell is compared at the same
length), the test bound the last one up to there. The claims section compares the cells that
reached their length.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import experiments  # docs/experiments.py: the cells, their directories, the sweep's best rates
from experiments import COMPARED, PAPER_RATE, SWEEP_EPOCHS, SWEEP_RATES

DOCS = Path(__file__).resolve().parent
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
PLANNED = 100  # epochs of every cell (docs/experiments.py)


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _config(run: Path) -> dict:
    path = run / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _upto(metrics, epochs=PLANNED):
    """The metrics of the first ``epochs`` epochs (the cell's planned length)."""
    return [m for m in metrics if m["epoch"] <= epochs]


def _last(metrics, key):
    values = [m[key] for m in metrics if m.get(key) is not None]
    return values[-1] if values else None


def _epochs(metrics) -> str:
    """Epochs read, and how many ran where a run went further: "100 (of 133)"."""
    read = _upto(metrics)[-1]["epoch"] if _upto(metrics) else 0
    return f"{read} (of {metrics[-1]['epoch']})" if metrics[-1]["epoch"] > read else str(read)


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def _device(run: Path) -> str:
    device = str(_config(run).get("device", "cpu"))  # configs from before the VAE recorded it: the CPU
    return "H200 GPU" if "H200" in device else ("GPU" if device.startswith("cuda") else "CPU")


def _hours(metrics) -> str:
    seconds = sum(m.get("seconds") or 0 for m in metrics)
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def bandit_table(runs: Path) -> str:
    rows = ["| layers | estimator | baseline | epochs | train acc | test acc | log grad var | device, train time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for layers in (1, 2, 3):
        for estimator in ("hnca", "reinforce"):
            for baseline in ("baseline", "no-baseline"):
                run = runs / "bandit" / f"{estimator}-{baseline}-L{layers}"
                m = _metrics(run)
                if not m:
                    rows.append(f"| {layers} | {estimator} | {baseline == 'baseline'} | not run | | | | |")
                    continue
                at = _upto(m)
                rows.append(f"| {layers} | {estimator} | {baseline == 'baseline'} | {_epochs(m)} | "
                            f"{_fmt(_last(at, 'train_accuracy'), 4)} | {_fmt(_last(at, 'test_accuracy'), 4)} | "
                            f"{_fmt(_last(at, 'log_grad_variance'))} | {_device(run)}, {_hours(m)} |")
    return "\n".join(rows)


def _vae_dirs(runs: Path, layers: int, estimator: str, tag: str = "") -> list[Path]:
    return sorted(d for d in (runs / "vae").glob(f"L{layers}-{estimator}{tag}-s*") if _metrics(d))


def vae_table(runs: Path) -> str:
    """Seed 0 of every cell; mean (min-max) over the seeds where several ran."""
    rows = ["| layers | estimator | seeds | epochs | train ELBO | test bound (k=100) | log grad var | device, train time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    cells = [(1, "hnca", ""), (1, "reinforce_loo", ""), (1, "disarm", ""),
             (2, "hnca_baseline", ""), (2, "reinforce_loo", ""), (2, "disarm", ""), (2, "reinforce_baseline", ""),
             (3, "hnca_baseline", ""), (3, "reinforce_loo", ""), (3, "disarm", "")]
    for layers, estimator, tag in cells:
        dirs = _vae_dirs(runs, layers, estimator, tag)
        if not dirs:
            rows.append(f"| {layers} | {estimator} | - | not run | | | | |")
            continue
        ms = [_metrics(d) for d in dirs]

        def spread(key, digits=2):
            values = [_last(_upto(m), key) for m in ms if _last(_upto(m), key) is not None]
            if not values:
                return "-"
            if len(values) == 1:
                return _fmt(values[0], digits)
            return f"{_fmt(statistics.mean(values), digits)} ({_fmt(min(values), digits)} to {_fmt(max(values), digits)})"

        epochs = "/".join(_epochs(m) for m in ms)
        where = " / ".join(f"{_device(d)}, {_hours(m)}" for d, m in zip(dirs, ms))
        rows.append(f"| {layers} | {estimator} | {len(dirs)} | {epochs} | {spread('train_elbo')} | "
                    f"{spread('test_bound')} | {spread('log_grad_variance')} | {where} |")
    return "\n".join(rows)


def ablation_table(runs: Path) -> str:
    """The Appendix K cells; an ablation still short of its length is compared with the paper's
    variant at the same epoch (an extra row)."""
    rows = ["| 2 layers, f-HNCA with baseline | epochs | train ELBO | test bound | log grad var |",
            "| --- | --- | --- | --- | --- |"]

    def row(name, metrics, epochs=PLANNED):
        at = _upto(metrics, epochs)
        return (f"| {name} | {_epochs(metrics) if epochs == PLANNED else epochs} | {_fmt(_last(at, 'train_elbo'))} | "
                f"{_fmt(_last(at, 'test_bound'))} | {_fmt(_last(at, 'log_grad_variance'))} |")

    paper = _metrics(runs / "vae" / "L2-hnca_baseline-s0")
    for name, tag in (("as in the paper (children only, mediated components)", ""),
                      ("rho on the direct components too (--rho-direct)", "-rho_direct"),
                      ("upstream components too (--upstream)", "-upstream")):
        m = _metrics(runs / "vae" / f"L2-hnca_baseline{tag}-s0")
        if not m:
            rows.append(f"| {name} | not run | | | |")
            continue
        rows.append(row(name, m))
        if tag and paper and m[-1]["epoch"] < PLANNED:
            rows.append(row("as in the paper, at the same epoch as the row above", paper, m[-1]["epoch"]))
    return "\n".join(rows)


def _final(run: Path) -> dict | None:
    """A run's metrics at its planned epoch (the test bound: the last up to it); None if it is shorter."""
    at = _upto(_metrics(run))
    if not at or at[-1]["epoch"] < PLANNED:
        return None
    return {**at[-1], "test_bound": _last(at, "test_bound")}


def _verdict(holds: bool) -> str:
    return "holds" if holds else "**does not hold**"


def claims(runs: Path) -> str:
    """The paper's claims, checked on the seed-0 cells that reached their planned length."""
    lines = []
    for layers in (1, 2, 3):
        cell = {(e, b): _final(runs / "bandit" / f"{e}-{b}-L{layers}")
                for e in ("hnca", "reinforce") for b in ("baseline", "no-baseline")}
        if None in cell.values():
            lines.append(f"- bandit, {layers} hidden layer{'s' * (layers > 1)}: not every cell has reached {PLANNED} epochs yet.")
            continue
        for b in ("baseline", "no-baseline"):
            h, r = cell["hnca", b], cell["reinforce", b]
            lines.append(f"- bandit, {layers} hidden layer{'s' * (layers > 1)}, {b.replace('-', ' ')}: HNCA above REINFORCE in test "
                         f"accuracy ({h['test_accuracy']:.4f} vs {r['test_accuracy']:.4f}): "
                         f"{_verdict(h['test_accuracy'] > r['test_accuracy'])}; below it in log gradient variance "
                         f"({h['log_grad_variance']:.2f} vs {r['log_grad_variance']:.2f}): "
                         f"{_verdict(h['log_grad_variance'] < r['log_grad_variance'])}.")
    for layers, mine in ((1, "hnca"), (2, "hnca_baseline"), (3, "hnca_baseline")):
        cell = {e: _final(runs / "vae" / f"L{layers}-{e}-s0") for e in (mine, "reinforce_loo", "disarm")}
        if None in cell.values():
            lines.append(f"- VAE, {layers} layer{'s' * (layers > 1)}: not every cell has reached {PLANNED} epochs yet.")
            continue
        for key, label in (("train_elbo", "train ELBO"), ("test_bound", "test bound")):
            values = ", ".join(f"{e} {m[key]:.2f}" for e, m in cell.items())
            best = all(cell[mine][key] > cell[e][key] for e in ("reinforce_loo", "disarm"))
            lines.append(f"- VAE, {layers} layer{'s' * (layers > 1)}, {label} ({values}): {mine} best: {_verdict(best)}.")
    lines += seed_claims(runs)
    return "\n".join(lines)


def seed_claims(runs: Path) -> list[str]:
    """The 2-layer claim over every seed that reached its length, once each estimator has several:
    f-HNCA with baseline best in the mean, and its worst seed above every seed of the others."""
    mine, others = "hnca_baseline", ("reinforce_loo", "disarm")
    finals = {e: [f for f in map(_final, _vae_dirs(runs, 2, e)) if f] for e in (mine, *others)}
    if min(len(f) for f in finals.values()) < 2:
        return []
    lines = []
    for key, label in (("train_elbo", "train ELBO"), ("test_bound", "test bound")):
        values = {e: [f[key] for f in fs] for e, fs in finals.items()}
        means = {e: statistics.mean(v) for e, v in values.items()}
        listed = ", ".join(f"{e} {means[e]:.2f} ({len(v)} seeds, {min(v):.2f} to {max(v):.2f})" for e, v in values.items())
        best_mean = all(means[mine] > means[e] for e in others)
        every = min(values[mine]) > max(max(values[e]) for e in others)
        lines.append(f"- VAE, 2 layers over seeds, {label} (mean, range: {listed}): {mine} best in the mean: "
                     f"{_verdict(best_mean)}; its worst seed above every seed of the others: {_verdict(every)}.")
    return lines


def seeds_figure(runs: Path, output: Path) -> Path | None:
    """2-layer cells over their seeds: mean train ELBO and log gradient variance with min-max bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    drawn = False
    for color, estimator in zip(("C0", "C1", "C2"), ("hnca_baseline", "reinforce_loo", "disarm")):
        ms = [_metrics(d) for d in _vae_dirs(runs, 2, estimator)]
        if not ms:
            continue
        drawn = True
        epochs = min(m[-1]["epoch"] for m in ms)
        for ax, key, fn in ((left, "train_elbo", lambda v: v), (right, "grad_variance", math.log)):
            series = [[fn(m[e][key]) for e in range(epochs)] for m in ms]
            xs = list(range(1, epochs + 1))
            mean = [statistics.mean(col) for col in zip(*series)]
            ax.plot(xs, mean, color=color, label=f"{estimator} ({len(ms)} seed{'s' * (len(ms) > 1)})")
            ax.fill_between(xs, [min(c) for c in zip(*series)], [max(c) for c in zip(*series)], color=color,
                            alpha=0.2)
    if not drawn:
        plt.close(fig)
        return None
    left.set_ylabel("train ELBO")
    right.set_ylabel("log mean gradient variance")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("discrete VAE, 2 layers: mean over seeds, band from the lowest to the highest seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


STEP_TIMES = "step-times.json"  # benchmarks/vae_interleaved.py --json


def _cell(runs: Path, layers: int, estimator: str, rate: str = PAPER_RATE, seed: int = 0, prefix: str = "") -> Path:
    """The run directory docs/experiments.py gives this cell."""
    extra = experiments.CATEGORICAL if prefix else ()
    return runs / experiments._vae(layers, estimator, seed, extra=extra, rate=rate, prefix=prefix).name


def _seeds(runs: Path, layers: int, estimator: str, rate: str, prefix: str = "") -> list[Path]:
    return [d for d in (_cell(runs, layers, estimator, rate, seed, prefix) for seed in range(10)) if _metrics(d)]


def _name(estimator: str) -> str:
    return f"{estimator} (biased)" if estimator in experiments.STRAIGHT_THROUGH else estimator


def _reached(run: Path, epoch: int) -> bool:
    return any(m["epoch"] >= epoch for m in _metrics(run))


def sweep_table(runs: Path) -> str:
    rows = [f"| 2 layers, train ELBO at epoch {SWEEP_EPOCHS} | " + " | ".join(f"Adam {r}" for r in SWEEP_RATES)
            + " | best |", "| --- |" + " --- |" * (len(SWEEP_RATES) + 1)]
    best = experiments.best_rates(runs)
    for estimator in COMPARED:
        cells = []
        for rate in SWEEP_RATES:
            run = _cell(runs, 2, estimator, rate)
            at = _upto(_metrics(run), SWEEP_EPOCHS)
            cells.append(_fmt(_last(at, "train_elbo")) if _reached(run, SWEEP_EPOCHS) else "not run")
        rows.append(f"| {_name(estimator)} | {' | '.join(cells)} | {best.get(estimator, '-')} |")
    return "\n".join(rows)


def _step_ms(docs: Path) -> tuple[dict, str]:
    path = docs / STEP_TIMES
    if not path.exists():
        return {}, ""
    times = json.loads(path.read_text())
    return times["step_ms"], f"{times['cpu']} ({times['capability']}), one thread, torch {times['torch']}, {times['date']}"


def _row(label, dirs, ms=None) -> str:
    """One comparison row: mean (range) over the seeds that reached their planned length; where
    none has, the longest one as far as it went (the epochs column says how far each went)."""
    if not dirs:
        return f"| {label} | - | not run | | | | |"
    ms_all = [_metrics(d) for d in dirs]
    complete = [m for m in ms_all if _upto(m)[-1]["epoch"] >= PLANNED]
    shown = complete or [max(ms_all, key=lambda m: _upto(m)[-1]["epoch"])]

    def spread(key):
        values = [_last(_upto(m), key) for m in shown if _last(_upto(m), key) is not None]
        if len(values) <= 1:
            return _fmt(values[0]) if values else "-"
        return f"{statistics.mean(values):.2f} ({min(values):.2f} to {max(values):.2f})"

    epochs = "/".join(_epochs(m) for m in ms_all)
    return (f"| {label} | {len(shown)} | {epochs} | {spread('train_elbo')} | {spread('test_bound')} | "
            f"{spread('log_grad_variance')} | {_fmt(ms)} |")


HEADER = ["| estimator, Adam rate | seeds read | epochs of each seed | train ELBO | test bound (k=100) | log grad var | ms a step |",
          "| --- | --- | --- | --- | --- | --- | --- |"]


def comparison_table(runs: Path, docs: Path = DOCS) -> str:
    """2 layers: each estimator at the paper's rate and at its best rate (mean and range over seeds)."""
    steps, _ = _step_ms(docs)
    best = experiments.best_rates(runs)
    rows = list(HEADER)
    for rate_of in ("paper", "best"):
        for estimator in (*COMPARED, *(("reinforce_loo",) if rate_of == "paper" else ())):
            rate = PAPER_RATE if rate_of == "paper" else best.get(estimator)
            if rate is None:
                rows.append(f"| {_name(estimator)}, best rate | - | sweep not complete | | | | |")
                continue
            if rate_of == "best" and rate == PAPER_RATE:
                continue  # its row is above
            dirs = _seeds(runs, 2, estimator, rate)
            rows.append(_row(f"{_name(estimator)}, {rate}{' (best)' if best.get(estimator) == rate else ''}", dirs,
                             steps.get(f"bernoulli-L2/{estimator}")))
    return "\n".join(rows)


def categorical_table(runs: Path, docs: Path = DOCS) -> str:
    """The categorical VAE (20 x 10, one layer): the paper's rate, then each estimator at the rate
    its Bernoulli counterpart's sweep chose."""
    steps, _ = _step_ms(docs)
    best = experiments.best_rates(runs)
    rows = list(HEADER)
    for estimator in ("hnca", "reinforce_loo", "reinforce_baseline"):
        rows.append(_row(f"{estimator}, {PAPER_RATE}", _seeds(runs, 1, estimator, PAPER_RATE, "cat20x10-"),
                         steps.get(f"cat20x10-L1/{estimator}")))
    for estimator, of in experiments.CATEGORICAL_RATED.items():
        rate = best.get(of)
        if rate is None:
            rows.append(f"| {_name(estimator)}, {of}'s best rate | - | sweep not complete | | | | |")
            continue
        if rate == PAPER_RATE and estimator in ("hnca", "reinforce_loo"):
            continue  # the row above
        rows.append(_row(f"{_name(estimator)}, {rate}", _seeds(runs, 1, estimator, rate, "cat20x10-"),
                         steps.get(f"cat20x10-L1/{estimator}")))
    return "\n".join(rows)


def comparison_figure(runs: Path, docs: Path, output: Path, curves, title: str) -> Path | None:
    """Train ELBO against epoch and against the training time it takes on one thread (epochs x 1200
    steps x the step time of docs/step-times.json, every estimator timed in one process): mean over
    the seeds, band from the lowest to the highest. ``curves``: [(label, dirs, step-time key)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, timed_on = _step_ms(docs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = False
    for k, (label, dirs, key) in enumerate(curves):
        ms = [m for m in (_upto(_metrics(d)) for d in dirs) if m]
        if not ms:
            continue
        # as in the tables: the seeds that reached the planned length, else the longest one
        ms = [m for m in ms if m[-1]["epoch"] >= PLANNED] or [max(ms, key=lambda m: m[-1]["epoch"])]
        drawn = True
        epochs = min(m[-1]["epoch"] for m in ms)
        series = [[m[e]["train_elbo"] for e in range(epochs)] for m in ms]
        mean = [statistics.mean(col) for col in zip(*series)]
        xs = list(range(1, epochs + 1))
        label = f"{label} ({len(ms)} seeds)" if len(ms) > 1 else label
        axes = [(left, xs)]
        if key in steps:
            axes.append((right, [e * 1200 * steps[key] / 3.6e6 for e in xs]))
        for ax, x in axes:
            ax.plot(x, mean, color=f"C{k}", label=label)
            if len(ms) > 1:
                ax.fill_between(x, [min(c) for c in zip(*series)], [max(c) for c in zip(*series)], color=f"C{k}", alpha=0.2)
    if not drawn:
        plt.close(fig)
        return None
    left.set_xlabel("epoch")
    right.set_xlabel("hours of training on one CPU thread (step times measured together)" if timed_on
                     else "no step times (benchmarks/vae_interleaved.py --json docs/step-times.json)")
    for ax in (left, right):
        ax.set_ylabel("train ELBO")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -160))
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def comparison_figures(runs: Path, docs: Path) -> list[str]:
    best = experiments.best_rates(runs)
    bernoulli = [(f"{_name(e)}, {best[e]}", _seeds(runs, 2, e, best[e]), f"bernoulli-L2/{e}") for e in COMPARED if e in best]
    bernoulli += [(f"{_name(e)}, {PAPER_RATE}", _seeds(runs, 2, e, PAPER_RATE)[:1], f"bernoulli-L2/{e}")
                  for e in ("hnca_baseline", "reinmax") if best.get(e) != PAPER_RATE]
    categorical = [(f"{_name(e)}, {best[of]}", _seeds(runs, 1, e, best[of], "cat20x10-"), f"cat20x10-L1/{e}")
                   for e, of in experiments.CATEGORICAL_RATED.items() if of in best]
    categorical += [(f"{e}, {PAPER_RATE}", _seeds(runs, 1, e, PAPER_RATE, "cat20x10-"), f"cat20x10-L1/{e}")
                    for e in ("hnca", "reinforce_loo") if best.get(experiments.CATEGORICAL_RATED[e]) != PAPER_RATE]
    links = []
    for name, curves, title in (
            ("vae-straight-through.png", bernoulli, "2-layer Bernoulli VAE: each estimator at its best rate"),
            ("vae-categorical.png", categorical, "categorical VAE (20 x 10, one layer)")):
        if comparison_figure(runs, docs, docs / name, curves, title):
            links.append(f"![{title}: train ELBO against epoch and against one-thread training time]({name})")
    return links


def write_report(runs: Path, docs: Path = DOCS) -> int:
    """The page ``docs``/results.md and its figures beside it, from the run directories under ``runs``."""
    from hnca_kernels.experiments.plot import plot_runs

    runs, docs = Path(runs), Path(docs)

    def figure(dirs, name, title, caption) -> str:
        """Draw ``dirs`` into docs/<name> and return its Markdown link ("" when nothing ran)."""
        if not dirs:
            return ""
        print(plot_runs(dirs, docs / name, title))
        return f"![{caption}]({name})"

    bandit = sorted(d for d in (runs / "bandit").glob("*") if _metrics(d))
    seed0 = sorted(d for d in (runs / "vae").glob("L*-s0") if _metrics(d) and "rho" not in d.name
                   and "upstream" not in d.name)
    ablations = [d for d in (runs / "vae" / f"L2-hnca_baseline{tag}-s0" for tag in ("", "-rho_direct", "-upstream"))
                 if _metrics(d)]
    seeds = seeds_figure(runs, docs / "vae-seeds.png")
    sections = [
        "### The paper's claims at this length (seed 0, and the 2-layer VAE over its seeds)", claims(runs),
        "### Contextual bandit", bandit_table(runs),
        figure(bandit, "bandit-100.png", "contextual-bandit MNIST (paper Figure 1)",
               "bandit: accuracy (train dotted, test solid) and log mean gradient variance per epoch"),
        "### Discrete VAE", vae_table(runs),
        figure(seed0, "vae-100.png", "discrete VAE on MNIST, seed 0 (paper Figure 3)",
               "VAE, seed 0: train ELBO and log mean encoder gradient variance per epoch"),
        f"![VAE, 2 layers: mean and range over seeds]({seeds.name})" if seeds else "",
        "### Appendix K ablations", ablation_table(runs),
        figure(ablations, "vae-ablations.png", "2-layer f-HNCA with baseline: Appendix K ablations",
               "ablations: train ELBO and log gradient variance per epoch"),
        "### Against the straight-through estimators: the learning-rate sweep (2 layers, seed 0)", sweep_table(runs),
        "### Against the straight-through estimators: 2 layers, 100 epochs", comparison_table(runs, docs),
        "### The categorical VAE (20 x 10, one layer, seed 0)", categorical_table(runs, docs),
        *comparison_figures(runs, docs),
        f"Step times (the figures' time axis and the tables' last column): {_step_ms(docs)[1]}, "
        "`benchmarks/vae_interleaved.py`." if _step_ms(docs)[1] else "",
    ]
    tables = "\n\n".join(part for part in sections if part)
    page = docs / "results.md"
    text = page.read_text() if page.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{page} lacks the markers {BEGIN} and {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{tables}\n{END}{tail}")
    print(f"wrote the tables into {page}")
    return 0
