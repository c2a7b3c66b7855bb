"""A shareable report on a sweep, made offline from its run directories.

    python scripts/report.py SWEEP_DIR            # SWEEP_DIR/report.md and PNG plots beside it
    python scripts/report.py SWEEP_DIR --wandb    # also publishes a W&B Report for the sweep's group
    python scripts/report.py SWEEP_DIR --export docs/results/NAME/runs.jsonl   # the compact record
    python scripts/report.py docs/results/NAME/runs.jsonl   # the same report, from the record alone

Every run below SWEEP_DIR (a directory with .hydra/overrides.yaml, summary.json or
metrics.jsonl) is read. Runs are grouped into rows by the overrides whose values differ
between runs, seed excepted, so a row's figures are means and sample standard deviations over
its seeds. Runs without a readable summary.json (failed, or still running) are listed in the
report, never dropped in silence.
"""
from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from adaptive_sparse import records  # noqa: E402  (installed: pip install -r requirements.txt)
from adaptive_sparse.sweeps import parse_overrides, sweep_group_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Overrides that never tell rows apart: seeds are averaged over; the rest name places and
# logging, not experiments (the same keys that sweep sub-directory names leave out).
NOT_ROW_KEYS = {"seed", *OmegaConf.load(ROOT / "conf" / "config.yaml")
                .hydra.job.config.override_dirname.exclude_keys}
LOSSLESS_MARGIN = 0.3  # accuracy points: "reaches full training's accuracy" means within this
LOSSLESS_MARGIN_NATS = 0.01  # the same for a loss (task=char_lm): within this many nats
DEFAULT = "(default)"  # the table's value for a varying key a run does not override
# Row keys come first in this order when they vary, then any other key alphabetically.
KEY_ORDER = ("experiment", "gate", "gate.target_rate", "attention", "model", "training.epochs")
PLOTS = {"pareto": "final accuracy against training wall-clock, one line per gate through its target rates",
         "accuracy_vs_time": "validation accuracy against training wall-clock",
         "accuracy_vs_flops": "validation accuracy against FLOPs executed",
         "activation_rate": "achieved against target activation rate",
         "threshold": "the gate's threshold at the end of each epoch"}


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    summary: dict[str, Any] | None
    epochs: list[dict[str, Any]]
    problem: str | None = None  # why the run is incomplete; None for a finished run

    @property
    def complete(self) -> bool:
        return self.problem is None


@dataclass
class Row:
    """The runs of one setting of the varying keys, and their figures."""
    label: dict[str, str]
    runs: list[Run]
    figures: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # (mean, sd)
    metric: records.Metric = records.Metric()  # what the runs are judged by (summary.json's `metric`)
    speedup: float | None = None
    # seconds each run needed to come within the lossless margin of the gate=none runs' mean
    # final metric, as a share of their mean training time (None: never came within)
    time_to_baseline: list[float | None] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The legend's label: only the keys this row sets (a "(default)" tells nothing)."""
        return ", ".join(f"{k}={v}" for k, v in self.label.items() if v != DEFAULT) or "all runs"


# --------------------------------------------------------------------------- reading

def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Directories holding a run's files, outside W&B's and submitit's own folders."""
    marks = ("summary.json", "metrics.jsonl", ".hydra/overrides.yaml")
    found = {p.parent.parent if p.name == "overrides.yaml" else p.parent
             for mark in marks for p in sweep_dir.rglob(mark)}
    return sorted(d for d in found
                  if not {"wandb", ".submitit"} & set(d.relative_to(sweep_dir).parts))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_epochs(run_dir: Path) -> int | None:
    config = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(config).training.epochs if config.exists() else None


def load_run(run_dir: Path) -> Run:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(OmegaConf.load(overrides_file)) if overrides_file.exists() else {}
    try:
        epochs = read_metrics(run_dir / "metrics.jsonl")
    except json.JSONDecodeError as err:
        return Run(run_dir, overrides, None, [], f"metrics.jsonl unreadable ({err})")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        want = expected_epochs(run_dir)
        return Run(run_dir, overrides, None, epochs,
                   f"no summary.json: failed or still running ({len(epochs)} of {want or '?'} epochs "
                   "in metrics.jsonl)")
    try:
        summary = json.loads(summary_file.read_text())
    except json.JSONDecodeError as err:
        return Run(run_dir, overrides, None, epochs, f"summary.json unreadable ({err})")
    if not epochs:
        return Run(run_dir, overrides, summary, epochs, "summary.json but no metrics.jsonl records")
    return Run(run_dir, overrides, summary, epochs)


def collect_runs(source: str | Path) -> list[Run]:
    """Every run below a sweep directory, complete or not, in directory order; or every run
    of a record file written by `export_records`."""
    source = Path(source)
    if source.is_file():
        return read_records(source)
    return [load_run(d) for d in find_run_dirs(source)]


# per-epoch keys a record keeps: what the reports and the time-to-accuracy figures read
RECORD_EPOCH_KEYS = ("epoch", "val_acc", "val_loss", "val_bpc", "train_loss", "epoch_time_s", "scoring_time_s",
                     "train_step_time_s", "activation_rate", "threshold", "budget", "samples_trained",
                     "optimizer_steps", "flops_executed", "flops_scoring", "compute_savings", "lr",
                     "indexer_loss")


def export_records(runs: list[Run], root: Path, path: Path) -> int:
    """One JSON line per complete run (its directory relative to `root`, overrides, summary
    and trimmed per-epoch records): a few kB a run, committed in place of run directories."""
    lines = []
    for run in (r for r in runs if r.complete):
        epochs = [{k: rec[k] for k in RECORD_EPOCH_KEYS if k in rec} for rec in run.epochs]
        summary = {k: v for k, v in run.summary.items() if k != "epoch_times_s"}  # in the epochs already
        if "data_source" in summary:
            summary["data_source"] = records.short_source(summary["data_source"])
        lines.append(json.dumps({"run": str(run.path.relative_to(root)), "overrides": run.overrides,
                                 "summary": summary, "epochs": epochs}, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))  # directory order, as collect_runs reads them
    return len(lines)


def read_records(path: Path) -> list[Run]:
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs.append(Run(path.parent / record["run"], record["overrides"], record["summary"],
                            record["epochs"]))
    return runs


# --------------------------------------------------------------------------- figures

def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (a missing key counts as a value)."""
    keys = {k for r in runs for k in r.overrides} - NOT_ROW_KEYS
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    return sorted(varying, key=lambda k: (KEY_ORDER.index(k) if k in KEY_ORDER else len(KEY_ORDER), k))


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _baseline_key(label: dict[str, str]) -> tuple:
    """A row's label without the gate's own keys and the preset's name: the setting its gate=none
    baseline shares. The preset is left out so that presets meant to sit side by side in one
    directory (gate_ablation and gate_ablation_baselines) find each other's baseline."""
    return tuple((k, v) for k, v in label.items()
                 if k not in ("gate", "experiment") and not k.startswith("gate."))


def lossless_margin(metric: records.Metric) -> float:
    return LOSSLESS_MARGIN if metric.is_accuracy else LOSSLESS_MARGIN_NATS


def summarise(runs: list[Run]) -> list[Row]:
    """Rows over the varying keys of the complete runs, with means, SDs and speedups.

    speedup = mean train_time_s of the complete gate=none runs (by summary.json's gate) whose
    varying overrides other than gate, gate.*, experiment and seed equal this row's, divided
    by this row's mean train_time_s. None when the sweep has no such gate=none run.
    """
    complete = [r for r in runs if r.complete]
    metric = records.metric_of(r.summary for r in complete)
    keys = varying_keys(complete)
    rows: dict[tuple, Row] = {}
    for run in complete:
        label = {k: run.overrides.get(k, DEFAULT) for k in keys}
        rows.setdefault(tuple(label.items()), Row(label, [], metric=metric)).runs.append(run)
    for row in rows.values():
        for key in (metric.key, "train_time_s", "compute_savings", "sample_savings",
                    "activation_rate", "target_rate"):
            values = [r.summary[key] for r in row.runs if r.summary[key] is not None]
            row.figures[key] = mean_sd(values) if values else None  # target_rate: None for gate=infobatch
    for row in rows.values():
        baseline = [r for other in rows.values() if _baseline_key(other.label) == _baseline_key(row.label)
                    for r in other.runs if r.summary["gate"] == "none"]
        if baseline:
            baseline_time = statistics.fmean(r.summary["train_time_s"] for r in baseline)
            row.speedup = baseline_time / row.figures["train_time_s"][0]
            goal = metric.worse_by(statistics.fmean(r.summary[metric.key] for r in baseline),
                                   lossless_margin(metric))
            row.time_to_baseline = [None if (t := records.time_to_metric(r.epochs, goal, metric)) is None
                                    else t / baseline_time for r in row.runs]
    return list(rows.values())


def time_to_accuracy(run: Run, accuracy: float) -> float | None:
    """Training seconds until the first evaluated epoch at or above `accuracy`; None if none is."""
    return records.time_to_accuracy(run.epochs, accuracy)


def common_settings(runs: list[Run]) -> dict[str, Any]:
    """What every complete run shares: run facts from summary.json, then fixed overrides."""
    complete = [r for r in runs if r.complete]
    facts = {}
    for key in ("gate", "model", "attention", "dataset", "epochs", "device", "hardware", "num_threads"):
        values = {json.dumps(r.summary.get(key)) for r in complete}
        if len(values) == 1:
            facts[key] = complete[0].summary.get(key)
    for key, value in complete[0].overrides.items() if complete else ():
        if key != "seed" and all(r.overrides.get(key) == value for r in complete):
            facts.setdefault(key, value)
    return facts


# --------------------------------------------------------------------------- table

def _pm(figure: tuple[float, float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean, sd = figure
    return f"{scale * mean:.{digits}f}" + ("" if sd is None else f" ± {scale * sd:.{digits}f}")


def table_markdown(rows: list[Row]) -> str:
    keys = list(rows[0].label) if rows and rows[0].label else []
    metric = rows[0].metric if rows else records.Metric()
    target = (f"none's acc - {LOSSLESS_MARGIN} pt" if metric.is_accuracy
              else f"none's {metric.key.replace('_', ' ')} + {LOSSLESS_MARGIN_NATS} nats")
    head = [*(keys or ["runs"]), "seeds", metric.name, "train time (s)", "speedup vs none",
            f"time to {target} (share of none's)",
            "compute savings (%)", "sample savings (%)", "activation rate achieved / target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        f = row.figures
        cells = [*(row.label.values() if keys else ["all"]), str(len(row.runs)),
                 _pm(f[metric.key], digits=2 if metric.is_accuracy else 4),
                 _pm(f["train_time_s"], digits=1),
                 "–" if row.speedup is None else f"{row.speedup:.2f}x", _time_to_baseline_cell(row),
                 _pm(f["compute_savings"], 100, 1), _pm(f["sample_savings"], 100, 1),
                 f"{_pm(f['activation_rate'], digits=4)} / "
                 + ("none" if f["target_rate"] is None else f"{f['target_rate'][0]:.4g}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time_to_baseline_cell(row: Row) -> str:
    if not row.time_to_baseline:
        return "–"
    reached = [t for t in row.time_to_baseline if t is not None]
    n = len(row.time_to_baseline)
    if len(reached) < n:
        return f"not reached by {n - len(reached)} of {n}"
    return _pm(mean_sd(reached))


# --------------------------------------------------------------------------- plots

def _cumulative(run: Run, key: str) -> list[float]:
    """A per-epoch figure (epoch_time_s, flops_executed) summed up to each epoch."""
    return list(itertools.accumulate(rec[key] for rec in run.epochs))


def _curve(row: Row, x_key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per evaluated epoch over the row's seeds: mean cumulative x, and mean, min, max of the metric."""
    key = row.metric.key
    n = min(len(r.epochs) for r in row.runs)
    xs, mean, low, high = [], [], [], []
    for e in range(n):
        if any(r.epochs[e][key] is None for r in row.runs):  # training.eval_every_epochs > 1
            continue
        xs.append(statistics.fmean(_cumulative(r, x_key)[e] for r in row.runs))
        accs = [r.epochs[e][key] for r in row.runs]
        mean.append(statistics.fmean(accs))
        low.append(min(accs))
        high.append(max(accs))
    return xs, mean, low, high


def _plot_accuracy(rows: list[Row], x_key: str, x_label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        xs, mean, low, high = _curve(row, x_key)
        line, = ax.plot(xs, mean, marker="o", label=row.name)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        for run in row.runs:  # each seed faintly, so one-epoch runs show their spread too
            evaluated = [(x, rec[row.metric.key]) for x, rec in zip(_cumulative(run, x_key), run.epochs)
                         if rec[row.metric.key] is not None]
            ax.plot(*zip(*evaluated), marker=".", color=line.get_color(), alpha=0.35, linewidth=0.8)
    ax.set(xlabel=x_label, ylabel=metric_axis(rows[0].metric) if rows else "validation accuracy (%)")
    ax.set_title("mean over seeds, shaded min to max; faint: each seed", fontsize=9)
    _finish(fig, ax, path)


def metric_axis(metric: records.Metric, final: bool = False) -> str:
    """An axis label: 'validation accuracy (%)', or 'validation loss (nats)' (with 'final ' before)."""
    name = "validation accuracy (%)" if metric.is_accuracy else f"validation {metric.key[4:]} (nats)"
    return f"final {name}" if final else name


def _plot_pareto(rows: list[Row], path: Path) -> None:
    """Mean final accuracy (bars: min to max over seeds) against mean training time, one
    colour per gate, its rows joined in order of time and labelled with their target rate."""
    fig, ax = plt.subplots(figsize=(6, 4))
    by_gate: dict[str, list[Row]] = {}
    for row in rows:
        by_gate.setdefault(row.runs[0].summary["gate"], []).append(row)
    for colour, (gate, gate_rows) in enumerate(by_gate.items()):
        gate_rows.sort(key=lambda row: row.figures["train_time_s"][0])
        xs = [row.figures["train_time_s"][0] for row in gate_rows]
        key = gate_rows[0].metric.key
        ys = [row.figures[key][0] for row in gate_rows]
        spread = [[y - min(r.summary[key] for r in row.runs) for y, row in zip(ys, gate_rows)],
                  [max(r.summary[key] for r in row.runs) - y for y, row in zip(ys, gate_rows)]]
        ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, color=f"C{colour}", label=gate)
        for x, y, row in zip(xs, ys, gate_rows):
            if row.figures["target_rate"] is not None and gate != "none":
                ax.annotate(f"{row.figures['target_rate'][0]:g}", (x, y), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=f"C{colour}")
    ax.set(xlabel="training wall-clock (s, evaluation excluded)",
           ylabel=metric_axis(rows[0].metric, final=True) if rows else "final validation accuracy (%)")
    ax.set_title("mean over seeds, bars min to max; labels: target rate", fontsize=9)
    _finish(fig, ax, path)


def _plot_rates(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [row for row in rows if row.figures["target_rate"] is not None]  # gates with a target
    rates = [r.summary[k] for row in rows for r in row.runs for k in ("target_rate", "activation_rate")]
    rates = rates or [1.0]  # no gate with a target: an empty plot
    lo, hi = min(rates) / 1.5, min(1.0, max(rates) * 1.5)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="on target")
    for row in rows:
        ax.scatter([r.summary["target_rate"] for r in row.runs],
                   [r.summary["activation_rate"] for r in row.runs], label=row.name)
    ax.set(xscale="log", yscale="log", xlabel="target activation rate",
           ylabel="achieved activation rate")
    ax.set_title("one point per run", fontsize=9)
    _finish(fig, ax, path)


def _plot_threshold(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        for i, run in enumerate(row.runs):
            points = [(rec["epoch"], rec["threshold"]) for rec in run.epochs if rec.get("threshold") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{rows.index(row)}", alpha=0.8,
                        label=row.name if i == 0 else None)
    ax.set(xlabel="epoch", ylabel="threshold (standard deviations)")
    ax.set_title("one line per run; gates without a threshold (none, random) absent", fontsize=9)
    _finish(fig, ax, path)


def _finish(fig, ax, path: Path) -> None:
    entries = len(ax.get_legend_handles_labels()[0])
    if entries:
        # below the axes, not over the curves (a sweep's labels are long); the figure grows by
        # a line per entry so that the axes keep their height
        fig.set_size_inches(6, 4 + 0.15 * entries)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """The report's PNGs in out_dir; returns their paths."""
    paths = {name: out_dir / f"{name}.png" for name in PLOTS}
    _plot_pareto(rows, paths["pareto"])
    _plot_accuracy(rows, "epoch_time_s", "training wall-clock (s, evaluation excluded)",
                   paths["accuracy_vs_time"])
    _plot_accuracy(rows, "flops_executed", "FLOPs executed (counted)", paths["accuracy_vs_flops"])
    _plot_rates(rows, paths["activation_rate"])
    _plot_threshold(rows, paths["threshold"])
    return list(paths.values())


# --------------------------------------------------------------------------- report

def report_markdown(sweep_dir: Path, runs: list[Run], rows: list[Row], plots: list[Path]) -> str:
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    settings = ", ".join(f"{k}={v}" for k, v in common_settings(runs).items())
    parts = [f"# Sweep report: {sweep_group_name(sweep_dir.parent if sweep_dir.is_file() else sweep_dir)}", "",
             f"{len(complete)} complete and {len(incomplete)} incomplete runs in `{sweep_dir}`; "
             f"remake with `python scripts/report.py {sweep_dir}`.", ""]
    if rows:
        parts += [f"Common to all complete runs: {settings}.", "",
                  "Rows group runs by the overrides that differ between them (seed aside); figures "
                  "are mean ± sample standard deviation over the row's seeds.", "",
                  table_markdown(rows), "",
                  "Training time counts training only (data, scoring, selection, steps; no "
                  "evaluation). Speedup vs none: the mean training time of the `gate=none` runs "
                  "whose other differing overrides (all but `gate`, `gate.*`, `+experiment` and `seed`) equal "
                  "the row's, divided by the row's mean training time; – where the sweep has no "
                  "such run. Time to none's accuracy: the training seconds until a run's first "
                  f"evaluated epoch within {lossless_text(rows[0].metric)} of the mean final "
                  f"{'accuracy' if rows[0].metric.is_accuracy else rows[0].metric.key.replace('_', ' ')} of those "
                  "`gate=none` runs, divided by their mean training time (lossless at half the "
                  "wall-clock is 0.5 or less). Compute savings: 1 - FLOPs executed / FLOPs of full training, counted "
                  "with torch.utils.flop_counter; sample savings: 1 - activation rate.", "",
                  "## Plots", ""]
        parts += [f"![{PLOTS[p.stem]}]({p.name})  \n{PLOTS[p.stem]} (`{p.name}`)\n" for p in plots]
    parts += ["## Incomplete runs", ""]
    parts += [f"- `{r.path.name}`: {r.problem}" for r in incomplete] or ["none"]
    return "\n".join(parts) + "\n"


def lossless_text(metric: records.Metric) -> str:
    return f"{LOSSLESS_MARGIN} points" if metric.is_accuracy else f"{LOSSLESS_MARGIN_NATS} nats"


def write_report(source: str | Path) -> tuple[Path, list[Row], list[Run]]:
    """report.md and its plots in the sweep directory (or beside the record file); returns
    (report path, rows, all runs)."""
    source = Path(source)
    out_dir = source.parent if source.is_file() else source
    runs = collect_runs(source)
    rows = summarise(runs)
    plots = write_plots(rows, out_dir) if rows else []
    path = out_dir / "report.md"
    path.write_text(report_markdown(source, runs, rows, plots))
    return path, rows, runs


# --------------------------------------------------------------------------- W&B

def wandb_target(sweep_dir: Path, runs: list[Run]) -> tuple[list[str], str, str]:
    """(groups, project, entity) of the sweep's W&B runs, from what the runs recorded.

    Groups come from summary.json's wandb_group; runs that recorded none (or a directory
    without summaries) fall back to the name train.py gives a sweep's group.
    """
    groups = sorted({r.summary.get("wandb_group") for r in runs if r.complete} - {None}) \
        or [sweep_group_name(sweep_dir)]
    configs = [OmegaConf.load(r.path / ".hydra" / "config.yaml") for r in runs
               if (r.path / ".hydra" / "config.yaml").exists()]
    project = configs[0].wandb.project if configs else "adaptive-sparse-training"
    entity = (configs[0].wandb.entity if configs else None) or ""
    return groups, project, entity


def build_wandb_report(groups: list[str], project: str, entity: str, rows: list[Row],
                       title: str) -> Any:
    """A W&B Report with the local report's panels, one run set per W&B group. Needs no network."""
    import wandb_workspaces.reports.v2 as wr

    group_by = [f"summary.{k}" if k in ("gate", "model", "attention") else f"config.{k}"
                for k in (rows[0].label if rows else {})]
    metric = rows[0].metric if rows else records.Metric()
    wandb_key = "val/acc" if metric.is_accuracy else f"val/{metric.key[4:]}"  # tracking.WANDB_KEYS' names
    runsets = [wr.Runset(entity=entity, project=project, name=g, filters=f"Group = '{g}'",
                         groupby=group_by) for g in groups]
    panels = [
        wr.ScatterPlot(title=PLOTS["pareto"], x=wr.SummaryMetric("train_time_s"), y=wr.SummaryMetric(metric.key)),
        wr.LinePlot(title=PLOTS["accuracy_vs_time"], x="time/train_cumulative_s", y=[wandb_key]),
        wr.LinePlot(title=PLOTS["accuracy_vs_flops"], x="flops/executed_cumulative", y=[wandb_key]),
        wr.ScatterPlot(title=PLOTS["activation_rate"], x=wr.SummaryMetric("target_rate"),
                       y=wr.SummaryMetric("activation_rate"), log_x=True, log_y=True),
        wr.LinePlot(title="the gate's threshold", x="Step", y=["gate/threshold"]),
    ]
    return wr.Report(project=project, entity=entity, title=title,
                     description=f"W&B group(s) {', '.join(groups)}; made by scripts/report.py",
                     blocks=[wr.H1(text=title), wr.MarkdownBlock(text=table_markdown(rows) if rows else ""),
                             wr.PanelGrid(runsets=runsets, panels=panels)])


def network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout_s: float = 5.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def publish(report: Any) -> str:
    """Saves the Report to W&B; returns a line saying where it went or why it did not."""
    if not network_reachable():
        return "W&B Report not published: api.wandb.ai is unreachable (no network); the local report stands"
    try:
        report.save()
        return f"W&B Report published: {report.url}"
    except Exception as err:  # no API key, no permission, a service error
        return f"W&B Report not published ({type(err).__name__}: {err}); the local report stands"


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, or a runs.jsonl record file")
    parser.add_argument("--wandb", action="store_true", help="also publish a W&B Report for the sweep's group")
    parser.add_argument("--export", type=Path, metavar="RUNS_JSONL",
                        help="write the complete runs' compact record to this file")
    args = parser.parse_args(argv)
    if not args.sweep_dir.exists():
        parser.error(f"{args.sweep_dir} is neither a directory nor a record file")
    if args.export:
        count = export_records(collect_runs(args.sweep_dir), args.sweep_dir, args.export)
        print(f"wrote {count} runs to {args.export}")
    path, rows, runs = write_report(args.sweep_dir)
    print(table_markdown(rows) if rows else "no complete runs")
    for run in runs:
        if not run.complete:
            print(f"incomplete: {run.path}: {run.problem}")
    print(f"wrote {path} and {len(PLOTS) if rows else 0} plots beside it")
    if args.wandb:
        groups, project, entity = wandb_target(args.sweep_dir, runs)
        report = build_wandb_report(groups, project, entity, rows, f"Sweep {args.sweep_dir.name}")
        print(publish(report))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
