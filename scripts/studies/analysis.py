"""The analysis library behind every results page: the sweep report of scripts.studies.report and
the study pages of scripts.studies.convergence and scripts.studies.recipe.

- Runs: a sweep's run directories, or the compact record file that replaces them in the
  repository (`collect_runs`, `export_records`, `read_records`).
- Arms: the runs of one setting, by seed (`Arm`), judged by the metric their records name
  (`records.metric_of`: val_acc, higher is better; val_loss for task=char_lm, lower is better).
- One uncertainty convention for every page: the mean over seeds with a 95% Student-t
  interval, half-width t(0.975, n - 1) * sd / sqrt(n); a single seed has none (`interval`,
  `pm`); every page states it in one sentence (`INTERVAL_NOTE`).
- The sweep report: rows over the overrides that differ between runs (`summarise`), its table,
  plots and page (`write_report`), and its W&B Report (`build_wandb_report`, `publish`).
- What the study pages share: paired differences by seed (`paired`), the queue's runs that
  have no record yet, where a page goes, and how a figure is finished (`finish`).

Light to import: matplotlib loads inside the plotting functions (`pyplot`), wandb-workspaces
inside `build_wandb_report`.
"""
from __future__ import annotations

import itertools
import json
import math
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, NamedTuple

from omegaconf import OmegaConf

from adaptive_sparse.training import records
from adaptive_sparse.training.records import (
    PLACEMENT_KEYS,
    PRESET_GROUPS,
    Metric,
    parse_overrides,
    preset_of,
    read_queue,
    run_name,
    sweep_group_name,
)

# Overrides that never tell rows apart: seeds are averaged over; the rest name places and
# logging, not experiments: conf/config.yaml's hydra.job.config.override_dirname.exclude_keys
# (tests/studies/test_analysis.py holds the two equal).
NOT_ROW_KEYS = frozenset({"seed", *PLACEMENT_KEYS})
LOSSLESS_MARGIN = 0.3  # accuracy points: "reaches full training's accuracy" means within this
LOSSLESS_MARGIN_NATS = 0.01  # the same for a loss (task=char_lm): within this many nats
DEFAULT = "(default)"  # the table's value for a varying key a run does not override
# Row keys come first in this order when they vary, then any other key alphabetically. The preset
# (`experiment`, or `study`: PRESET_GROUPS) is one column, named after the first of them the runs set.
KEY_ORDER = ("experiment", "study", "gate", "gate.target_rate", "attention", "model", "training.epochs")
PLOTS = {"pareto": "final accuracy against training wall-clock, one line per gate through its target rates",
         "accuracy_vs_time": "validation accuracy against training wall-clock",
         "accuracy_vs_flops": "validation accuracy against FLOPs executed",
         "activation_rate": "achieved against target activation rate",
         "threshold": "the gate's threshold at the end of each epoch"}
# per-epoch keys a record keeps: what the reports and the time-to-accuracy figures read
RECORD_EPOCH_KEYS = ("epoch", "val_acc", "val_loss", "val_bpc", "train_loss", "epoch_time_s", "scoring_time_s",
                     "train_step_time_s", "activation_rate", "threshold", "budget", "samples_trained",
                     "optimizer_steps", "flops_executed", "flops_scoring", "compute_savings", "lr",
                     "indexer_loss", "val_acc_tta0", "val_acc_tta1", "val_acc_tta2", "train_eval_loss",
                     "samples_seen")


# --------------------------------------------------------------------------- runs

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

    @property
    def seed(self) -> int:
        """The seed the run recorded (summary.json), else the one it was given (seed=N)."""
        return int(self.summary.get("seed", self.overrides.get("seed", 0)))


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


def export_records(runs: list[Run], root: Path, path: Path) -> int:
    """One JSON line per complete run (its directory relative to `root`, overrides, summary
    and trimmed per-epoch records): a few kB a run, committed in place of run directories.
    An existing record at `path` keeps the runs `runs` do not hold, because a study outlives
    its sessions and a fresh machine's sweep directory holds only the runs made there; a run in
    both is written from `runs`. Returns how many runs the record holds."""
    lines = {}  # by run directory: the record's, then this export's
    if path.exists():
        lines = {json.loads(line)["run"]: line for line in path.read_text().splitlines() if line.strip()}
    for run in (r for r in runs if r.complete):
        epochs = [{k: rec[k] for k in RECORD_EPOCH_KEYS if k in rec} for rec in run.epochs]
        summary = {k: v for k, v in run.summary.items() if k != "epoch_times_s"}  # in the epochs already
        if "data_source" in summary:
            summary["data_source"] = records.short_source(summary["data_source"])
        name = str(run.path.relative_to(root))
        lines[name] = json.dumps({"run": name, "overrides": run.overrides, "summary": summary, "epochs": epochs},
                                 sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines[name] + "\n" for name in sorted(lines)))  # directory order, as collect_runs reads them
    return len(lines)


def read_records(path: Path) -> list[Run]:
    runs = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            runs.append(Run(path.parent / record["run"], record["overrides"], record["summary"],
                            record["epochs"]))
    return runs


# --------------------------------------------------------------------------- uncertainty

INTERVAL_NOTE = "± is a 95% Student-t interval over seeds (a single seed has none)."
# two-sided 95% Student-t quantiles t(0.975, df), to three decimals, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
Z975 = 1.959963985  # the normal distribution's 0.975 quantile


def t95(df: int) -> float:
    """t(0.975, df): from the table up to 10 degrees of freedom, beyond it from the normal
    quantile's expansion in 1 / df (Abramowitz and Stegun 26.7.5; within 0.001 there)."""
    if df in T95:
        return T95[df]
    z = Z975
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(g / df ** (i + 1) for i, g in enumerate(terms))


class Estimate(NamedTuple):
    """A mean over seeds and the half-width of its 95% Student-t interval (None for one seed)."""
    mean: float
    half: float | None
    n: int


def interval(values: list[float]) -> Estimate:
    """The mean of `values` with the half-width t(0.975, n - 1) * sd / sqrt(n) of its 95% interval."""
    n = len(values)
    mean = statistics.fmean(values)
    return Estimate(mean, t95(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None, n)


def pm(figure: Estimate, digits: int = 2, scale: float = 1.0) -> str:
    """'42.00 ± 2.83' (scaled, to `digits` decimals); '42.00' for a single seed."""
    text = f"{scale * figure.mean:.{digits}f}"
    return text if figure.half is None else f"{text} ± {scale * figure.half:.{digits}f}"


# --------------------------------------------------------------------------- arms

@dataclass
class Arm:
    """The runs of one setting, by seed, and the metric they are judged by. `key` is what sets
    the arm apart: a `Setting` in the sweep report, a study's own key in a study page."""
    key: Any
    metric: Metric = Metric()
    runs: dict[int, Run] = field(default_factory=dict)  # by seed, in the order they were added

    def add(self, run: Run) -> None:
        if run.seed in self.runs:
            raise ValueError(f"two runs of seed {run.seed} in one arm ({self.runs[run.seed].path}, {run.path}): "
                             "the overrides that tell them apart are ones the reports ignore")
        self.runs[run.seed] = run

    def values(self, key: str) -> list[float]:
        """summary.json's `key` of each run that recorded one."""
        return [r.summary[key] for r in self.runs.values() if r.summary.get(key) is not None]

    def figure(self, key: str) -> Estimate | None:
        """The mean and 95% interval of summary.json's `key` over seeds (None: no run has it)."""
        values = self.values(key)
        return interval(values) if values else None

    def finals(self, seeds: Collection[int] | None = None) -> dict[int, float]:
        """Each seed's final metric (of `seeds` only, if given)."""
        return {s: r.summary[self.metric.key] for s, r in self.runs.items() if seeds is None or s in seeds}

    def times(self) -> list[float]:
        return [r.summary["train_time_s"] for r in self.runs.values()]

    def times_to(self, target: float) -> list[float | None]:
        """Each run's training seconds until its first evaluated epoch at `target` or better."""
        return [records.time_to_metric(r.epochs, target, self.metric) for r in self.runs.values()]

    def best(self) -> list[float]:
        """Each seed's best evaluated epoch (the highest accuracy, the lowest loss)."""
        pick = max if self.metric.higher_is_better else min
        key = self.metric.key
        return [pick(e[key] for e in r.epochs if e.get(key) is not None) for r in self.runs.values()]


def paired(arm: Arm, other: Arm | None) -> Estimate | None:
    """The mean of arm - other over their common seeds, with its 95% interval (None: no common seed)."""
    seeds = sorted(set(arm.runs) & set(other.runs)) if other is not None else []
    if not seeds:
        return None
    a, b = arm.finals(seeds), other.finals(seeds)
    return interval([a[s] - b[s] for s in seeds])


# --------------------------------------------------------------------------- the sweep report

@dataclass(frozen=True)
class Setting:
    """A sweep report row's key: the values of the overrides that differ between runs."""
    overrides: dict[str, str]

    @property
    def label(self) -> str:
        """The legend's label: only the keys this row sets (a "(default)" tells nothing)."""
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items() if v != DEFAULT) or "all runs"

    def baseline_key(self) -> tuple:
        """The setting without the gate's own keys and the preset's name: the setting its
        gate=none baseline shares. The preset is left out so that presets meant to sit side by
        side in one directory (gate_ablation and gate_ablation_baselines) find each other's."""
        return tuple((k, v) for k, v in self.overrides.items()
                     if k not in ("gate", *PRESET_GROUPS) and not k.startswith("gate."))


def row_value(run: Run, key: str) -> str | None:
    """A run's value of a row key; a preset key reads the run's preset (`preset_of`), so a study's
    records from before conf/study (`+experiment=NAME`) and its new runs (`+study=NAME`) share rows."""
    return preset_of(run.overrides) if key in PRESET_GROUPS else run.overrides.get(key)


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (a missing key counts as a value); the
    preset keys count as one, the first of them the runs set."""
    keys = {k for r in runs for k in r.overrides} - NOT_ROW_KEYS
    keys -= set([k for k in PRESET_GROUPS if k in keys][1:])
    varying = [k for k in keys if len({row_value(r, k) for r in runs}) > 1]
    return sorted(varying, key=lambda k: (KEY_ORDER.index(k) if k in KEY_ORDER else len(KEY_ORDER), k))


def summarise(runs: list[Run]) -> list[Arm]:
    """The sweep report's rows: the complete runs by the values of their varying keys, in the
    order the runs come."""
    complete = [r for r in runs if r.complete]
    metric = records.metric_of(r.summary for r in complete)
    keys = varying_keys(complete)
    rows: dict[tuple, Arm] = {}
    for run in complete:
        values = {k: DEFAULT if (v := row_value(run, k)) is None else v for k in keys}
        rows.setdefault(tuple(values.items()), Arm(Setting(values), metric)).add(run)
    return list(rows.values())


def lossless_margin(metric: Metric) -> float:
    return LOSSLESS_MARGIN if metric.is_accuracy else LOSSLESS_MARGIN_NATS


def lossless_text(metric: Metric) -> str:
    return f"{LOSSLESS_MARGIN} points" if metric.is_accuracy else f"{LOSSLESS_MARGIN_NATS} nats"


def baseline_runs(row: Arm, rows: list[Arm]) -> list[Run]:
    """The gate=none runs (by summary.json's gate) of the rows whose setting other than the
    gate's keys and the preset equals this row's."""
    key = row.key.baseline_key()
    return [r for other in rows if other.key.baseline_key() == key
            for r in other.runs.values() if r.summary["gate"] == "none"]


def speedup(row: Arm, rows: list[Arm]) -> float | None:
    """Mean train_time_s of the row's gate=none baseline / the row's; None without a baseline."""
    baseline = baseline_runs(row, rows)
    if not baseline:
        return None
    return statistics.fmean(r.summary["train_time_s"] for r in baseline) / row.figure("train_time_s").mean


def time_to_baseline(row: Arm, rows: list[Arm]) -> list[float | None]:
    """Seconds each run needed to come within the lossless margin of its gate=none baseline's
    mean final metric, as a share of the baseline's mean training time (None: never came
    within; an empty list without a baseline)."""
    baseline = baseline_runs(row, rows)
    if not baseline:
        return []
    metric = row.metric
    baseline_time = statistics.fmean(r.summary["train_time_s"] for r in baseline)
    goal = metric.worse_by(statistics.fmean(r.summary[metric.key] for r in baseline), lossless_margin(metric))
    return [None if t is None else t / baseline_time for t in row.times_to(goal)]


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


def table_markdown(rows: list[Arm]) -> str:
    keys = list(rows[0].key.overrides) if rows and rows[0].key.overrides else []
    metric = rows[0].metric if rows else Metric()
    target = (f"none's acc - {LOSSLESS_MARGIN} pt" if metric.is_accuracy
              else f"none's {metric.key.replace('_', ' ')} + {LOSSLESS_MARGIN_NATS} nats")
    head = [*(keys or ["runs"]), "seeds", metric.name, "train time (s)", "speedup vs none",
            f"time to {target} (share of none's)",
            "compute savings (%)", "sample savings (%)", "activation rate achieved / target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        times = speedup(row, rows)
        target_rate = row.figure("target_rate")  # None for gate=infobatch
        cells = [*(row.key.overrides.values() if keys else ["all"]), str(len(row.runs)),
                 pm(row.figure(metric.key), digits=2 if metric.is_accuracy else 4),
                 pm(row.figure("train_time_s"), digits=1),
                 "–" if times is None else f"{times:.2f}x", time_to_baseline_cell(time_to_baseline(row, rows)),
                 pm(row.figure("compute_savings"), 1, 100), pm(row.figure("sample_savings"), 1, 100),
                 f"{pm(row.figure('activation_rate'), digits=4)} / "
                 + ("none" if target_rate is None else f"{target_rate.mean:.4g}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_to_baseline_cell(shares: list[float | None]) -> str:
    if not shares:
        return "–"
    reached = [t for t in shares if t is not None]
    if len(reached) < len(shares):
        return f"not reached by {len(shares) - len(reached)} of {len(shares)}"
    return pm(interval(reached))


def preset_words(runs: list[Run]) -> str:
    """The preset overrides the runs set, as the report names them (`+experiment` where none does)."""
    keys = [k for k in PRESET_GROUPS if any(k in r.overrides for r in runs)] or ["experiment"]
    return ", ".join(f"`+{k}`" for k in keys)


def report_markdown(sweep_dir: Path, runs: list[Run], rows: list[Arm], plots: list[Path]) -> str:
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    settings = ", ".join(f"{k}={v}" for k, v in common_settings(runs).items())
    parts = [f"# Sweep report: {sweep_group_name(sweep_dir.parent if sweep_dir.is_file() else sweep_dir)}", "",
             f"{len(complete)} complete and {len(incomplete)} incomplete runs in `{sweep_dir}`; "
             f"remake with `python -m scripts.studies.report {sweep_dir}`.", ""]
    if rows:
        metric = rows[0].metric
        parts += [f"Common to all complete runs: {settings}.", "",
                  "Rows group runs by the overrides that differ between them (seed aside); figures "
                  f"are means over the row's seeds. {INTERVAL_NOTE}", "",
                  table_markdown(rows), "",
                  "Training time counts training only (data, scoring, selection, steps; no "
                  "evaluation). Speedup vs none: the mean training time of the `gate=none` runs "
                  f"whose other differing overrides (all but `gate`, `gate.*`, {preset_words(runs)} and `seed`) equal "
                  "the row's, divided by the row's mean training time; – where the sweep has no "
                  "such run. Time to none's accuracy: the training seconds until a run's first "
                  f"evaluated epoch within {lossless_text(metric)} of the mean final "
                  f"{'accuracy' if metric.is_accuracy else metric.key.replace('_', ' ')} of those "
                  "`gate=none` runs, divided by their mean training time (lossless at half the "
                  "wall-clock is 0.5 or less). Compute savings: 1 - FLOPs executed / FLOPs of full training, counted "
                  "with torch.utils.flop_counter; sample savings: 1 - activation rate.", "",
                  "## Plots", ""]
        parts += [f"![{PLOTS[p.stem]}]({p.name})  \n{PLOTS[p.stem]} (`{p.name}`)\n" for p in plots]
    parts += ["## Incomplete runs", ""]
    parts += [f"- `{r.path.name}`: {r.problem}" for r in incomplete] or ["none"]
    return "\n".join(parts) + "\n"


def write_report(source: str | Path) -> tuple[Path, list[Arm], list[Run]]:
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


# --------------------------------------------------------------------------- plots

def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only (Agg: no display on servers and in tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig: Any, ax: Any, path: Path) -> None:
    """Legend below the axes, grid, saved at dpi 100 and closed."""
    entries = len(ax.get_legend_handles_labels()[0])
    if entries:
        # below the axes, not over the curves (a sweep's labels are long); the figure grows by
        # a line per entry so that the axes keep their height
        fig.set_size_inches(6, 4 + 0.15 * entries)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def cumulative(run: Run, key: str) -> list[float]:
    """A per-epoch figure (epoch_time_s, flops_executed) summed up to each epoch."""
    return list(itertools.accumulate(rec[key] for rec in run.epochs))


def curve(arm: Arm, x_key: str, key: str | None = None, x_scale: Callable[[Run], float | None] | None = None
          ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per evaluated epoch over the arm's seeds: mean cumulative x, and mean, min, max of the
    metric (or of the record's `key`). `x_scale` multiplies each run's x (a share of a baseline
    on the run's own hardware, say); runs it gives None are left out. All lists are empty when
    no run is left."""
    key, runs = key or arm.metric.key, list(arm.runs.values())
    scales = {id(r): 1.0 if x_scale is None else x_scale(r) for r in runs}
    runs = [r for r in runs if scales[id(r)] is not None]
    xs, mean, low, high = [], [], [], []
    for e in range(min((len(r.epochs) for r in runs), default=0)):
        if any(r.epochs[e].get(key) is None for r in runs):  # training.eval_every_epochs > 1, or a key added later
            continue
        xs.append(statistics.fmean(cumulative(r, x_key)[e] * scales[id(r)] for r in runs))
        values = [r.epochs[e][key] for r in runs]
        mean.append(statistics.fmean(values))
        low.append(min(values))
        high.append(max(values))
    return xs, mean, low, high


def axis_label(rows: list[Arm], final: bool = False) -> str:
    return (rows[0].metric if rows else Metric()).axis_label(final)


def plot_metric(rows: list[Arm], x_key: str, x_label: str, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for row in rows:
        xs, mean, low, high = curve(row, x_key)
        line, = ax.plot(xs, mean, marker="o", label=row.key.label)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        for run in row.runs.values():  # each seed faintly, so one-epoch runs show their spread too
            evaluated = [(x, rec[row.metric.key]) for x, rec in zip(cumulative(run, x_key), run.epochs)
                         if rec[row.metric.key] is not None]
            ax.plot(*zip(*evaluated), marker=".", color=line.get_color(), alpha=0.35, linewidth=0.8)
    ax.set(xlabel=x_label, ylabel=axis_label(rows))
    ax.set_title("mean over seeds, shaded min to max; faint: each seed", fontsize=9)
    finish(fig, ax, path)


def plot_pareto(rows: list[Arm], path: Path) -> None:
    """Mean final metric (bars: min to max over seeds) against mean training time, one
    colour per gate, its rows joined in order of time and labelled with their target rate."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    by_gate: dict[str, list[Arm]] = {}
    for row in rows:
        by_gate.setdefault(next(iter(row.runs.values())).summary["gate"], []).append(row)
    for colour, (gate, gate_rows) in enumerate(by_gate.items()):
        gate_rows.sort(key=lambda row: row.figure("train_time_s").mean)
        xs = [row.figure("train_time_s").mean for row in gate_rows]
        key = gate_rows[0].metric.key
        ys = [row.figure(key).mean for row in gate_rows]
        spread = [[y - min(row.values(key)) for y, row in zip(ys, gate_rows)],
                  [max(row.values(key)) - y for y, row in zip(ys, gate_rows)]]
        ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, color=f"C{colour}", label=gate)
        for x, y, row in zip(xs, ys, gate_rows):
            if row.figure("target_rate") is not None and gate != "none":
                ax.annotate(f"{row.figure('target_rate').mean:g}", (x, y), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=f"C{colour}")
    ax.set(xlabel="training wall-clock (s, evaluation excluded)", ylabel=axis_label(rows, final=True))
    ax.set_title("mean over seeds, bars min to max; labels: target rate", fontsize=9)
    finish(fig, ax, path)


def plot_rates(rows: list[Arm], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    rows = [row for row in rows if row.figure("target_rate") is not None]  # gates with a target
    rates = [v for row in rows for k in ("target_rate", "activation_rate") for v in row.values(k)]
    rates = rates or [1.0]  # no gate with a target: an empty plot
    lo, hi = min(rates) / 1.5, min(1.0, max(rates) * 1.5)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="on target")
    for row in rows:
        ax.scatter(row.values("target_rate"), row.values("activation_rate"), label=row.key.label)
    ax.set(xscale="log", yscale="log", xlabel="target activation rate", ylabel="achieved activation rate")
    ax.set_title("one point per run", fontsize=9)
    finish(fig, ax, path)


def plot_threshold(rows: list[Arm], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for colour, row in enumerate(rows):
        for i, run in enumerate(row.runs.values()):
            points = [(rec["epoch"], rec["threshold"]) for rec in run.epochs if rec.get("threshold") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{colour}", alpha=0.8,
                        label=row.key.label if i == 0 else None)
    ax.set(xlabel="epoch", ylabel="threshold (standard deviations)")
    ax.set_title("one line per run; gates without a threshold (none, random) absent", fontsize=9)
    finish(fig, ax, path)


def write_plots(rows: list[Arm], out_dir: Path) -> list[Path]:
    """The sweep report's PNGs in out_dir; returns their paths."""
    paths = {name: out_dir / f"{name}.png" for name in PLOTS}
    plot_pareto(rows, paths["pareto"])
    plot_metric(rows, "epoch_time_s", "training wall-clock (s, evaluation excluded)", paths["accuracy_vs_time"])
    plot_metric(rows, "flops_executed", "FLOPs executed (counted)", paths["accuracy_vs_flops"])
    plot_rates(rows, paths["activation_rate"])
    plot_threshold(rows, paths["threshold"])
    return list(paths.values())


# --------------------------------------------------------------------------- study pages

def page_locations(source: Path, out: Path | None, queue: Path | None) -> tuple[Path, Path | None]:
    """Where a study page goes and which queue it lists: by default beside the record file
    (for a sweep directory, into it, with no queue)."""
    out = out or (source.parent if source.is_file() else source)
    return out, queue or (source.parent / "queue.txt" if source.is_file() else None)


def missing_runs(runs: list[Run], queue_file: Path | None) -> list[str]:
    """The queue's runs (train.py overrides) that have no complete run here, in queue order."""
    if queue_file is None or not queue_file.exists():
        return []
    have = {r.path.name for r in runs if r.complete}
    return [" ".join(o) for o in read_queue(queue_file) if run_name(o) not in have]


def not_yet_run_section(missing: list[str], queue_file: Path | None) -> list[str]:
    """A page's closing section: the queue's runs without a record (nothing if none)."""
    if not missing:
        return []
    return ["## Not yet run", "", f"In `{queue_file}` without a record yet:", "", *(f"- `{m}`" for m in missing), ""]


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


def build_wandb_report(groups: list[str], project: str, entity: str, rows: list[Arm], title: str) -> Any:
    """A W&B Report with the local report's panels, one run set per W&B group. Needs no network."""
    import wandb_workspaces.reports.v2 as wr

    group_by = [f"summary.{k}" if k in ("gate", "model", "attention") else f"config.{k}"
                for k in (rows[0].key.overrides if rows else {})]
    metric = rows[0].metric if rows else Metric()
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
                     description=f"W&B group(s) {', '.join(groups)}; made by python -m scripts.studies.report",
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
