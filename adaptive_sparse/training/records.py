"""The run-record contract: what a run's records mean and what identifies a run.

- The metric a run is judged by and how it is printed (`Metric`), and figures read off a run's
  per-epoch records (metrics.jsonl): epochs trained, time to a metric.
- The keys that place a run rather than define it (`PLACEMENT_KEYS`), and the preset a run was
  started from (`preset_of`).
- What identifies a job inside a sweep: its overrides, its W&B group and tags, its name in a
  study's queue; shared by train.py's W&B set-up, the study pages (scripts/studies) and
  scripts/run_queue.py, so a sweep's W&B group, its report and its queue agree on names.

Light on purpose (no torch): the study pages import it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

# Keys that say where a run goes or how it is shown, not what it trains: kept out of sweep
# sub-directory names and W&B tags (conf/config.yaml's override_dirname.exclude_keys, which a
# test holds equal to this), out of a study page's rows, and free to change on resume.
PLACEMENT_KEYS = ("dataset.root", "dataset.cache_dir", "progress", "resume", "training.num_threads",
                  "hydra.run.dir", "hydra.sweep.dir", "wandb.mode", "wandb.project", "wandb.entity", "wandb.group",
                  "wandb.tags", "wandb.name", "wandb.log_every_steps", "wandb.init_timeout_s")
# The config groups whose options are presets of a whole run (`# @package _global_`): recipes
# (conf/experiment, `+experiment=NAME`) and study sweeps (conf/study, `+study=NAME`). Records
# written before conf/study existed name a study's preset `+experiment=NAME`.
PRESET_GROUPS = ("experiment", "study")


@dataclass(frozen=True)
class Metric:
    """The figure a study judges runs by, read from their summary.json (`metric`,
    `higher_is_better`; records from before those keys: val_acc, higher is better), with how
    pages write it and the margins its goals use, in its own unit."""
    key: str = "val_acc"
    higher_is_better: bool = True

    @property
    def is_accuracy(self) -> bool:
        return self.key.startswith("val_acc")  # val_acc_tta0: the accuracy without TTA

    @property
    def sign(self) -> int:
        """+1 where higher is better, -1 where lower is: sign * (a - b) > 0 means a is better."""
        return 1 if self.higher_is_better else -1

    @property
    def name(self) -> str:  # a table header
        return "val acc (%)" if self.is_accuracy else f"{self.key.replace('_', ' ')} (nats)"

    @property
    def unit(self) -> str:  # of a difference
        return "points" if self.is_accuracy else "nats"

    @property
    def column(self) -> str:  # the console table's header: Val Acc, Val Loss
        return "Val Acc" if self.is_accuracy else f"Val {self.key[4:].title()}"

    def cell(self, value: float | None) -> str:
        """The console table's cell: '- ' for an epoch without evaluation."""
        return "     -  " if value is None else f"{value:6.2f}% " if self.is_accuracy else f"{value:8.4f} "

    @property
    def digits(self) -> int:
        return 2 if self.is_accuracy else 3

    def axis_label(self, final: bool = False) -> str:
        """'validation accuracy (%)', or 'validation loss (nats)' (with 'final ' before)."""
        name = "validation accuracy (%)" if self.is_accuracy else f"validation {self.key[4:]} (nats)"
        return f"final {name}" if final else name

    def value_text(self, value: float) -> str:
        return f"{value:.2f}%" if self.is_accuracy else f"{value:.4f}"

    def reached(self, value: float | None, target: float) -> bool:
        """Whether `value` is at `target` or better (False for an epoch without evaluation)."""
        return value is not None and (value >= target if self.higher_is_better else value <= target)

    def worse_by(self, value: float, margin: float) -> float:
        """`value` moved `margin` toward worse: accuracy minus margin, a loss plus margin."""
        return value - self.sign * margin


def metric_of(summaries: Iterable[dict[str, Any]]) -> Metric:
    """The one metric a set of runs shares (their summary.json's `metric`); refused if they differ."""
    found = {(s.get("metric", "val_acc"), bool(s.get("higher_is_better", True))) for s in summaries}
    if len(found) > 1:
        raise ValueError(f"runs judged by different metrics {sorted(found)}: report each task apart")
    return Metric(*found.pop()) if found else Metric()


def time_to_metric(records: Iterable[dict[str, Any]], target: float, metric: Metric = Metric()) -> float | None:
    """Training seconds (evaluation excluded) until the end of the first evaluated epoch whose
    metric is at `target` or better; None if none is. Epochs without evaluation (null) count
    their time but cannot reach it."""
    elapsed = 0.0
    for record in records:
        elapsed += record["epoch_time_s"]
        if metric.reached(record.get(metric.key), target):
            return elapsed
    return None


def epochs_trained(records: list[dict[str, Any]]) -> float:
    """Epochs a run trained, its last counted by its share of a whole one (samples seen in it
    over the first epoch's): airbench94's 10 epochs with a last of 44 of 48 batches are 9.917."""
    return len(records) - 1 + records[-1]["samples_seen"] / records[0]["samples_seen"]


def time_to_accuracy(records: Iterable[dict[str, Any]], accuracy: float) -> float | None:
    """`time_to_metric` for val_acc: the first evaluated epoch at or above `accuracy`."""
    return time_to_metric(records, accuracy)


def short_source(source: str | None) -> str | None:
    """folder:/any/path/cifar10 -> folder:cifar10: a record names the data copy, not a machine's paths."""
    if not source or ":" not in source:
        return source
    kind, place = source.split(":", 1)
    return f"{kind}:{Path(place).name}"


WANDB_TAG_MAX_CHARS = 64  # W&B refuses longer tags


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """{'gate': 'none', 'seed': '0', 'experiment': 'seed_report', ...} from Hydra override lines.

    Keys are Hydra's `key_or_group` ('+experiment=x' -> 'experiment'), the same keys that
    hydra.job.config.override_dirname.exclude_keys names; values are the text after '='.
    """
    parsed = OverridesParser.create().parse_overrides(list(lines))
    return {o.key_or_group: o.input_line.split("=", 1)[1] if "=" in o.input_line else ""
            for o in parsed}


def preset_of(overrides: Mapping[str, str]) -> str | None:
    """The preset a run was started from, by parse_overrides' keys: `+study=NAME` or
    `+experiment=NAME` (a study's records from before conf/study) -> NAME; None without one."""
    return overrides.get("study") or overrides.get("experiment")


def job_tags(override_lines: Iterable[str], exclude_keys: Iterable[str]) -> list[str]:
    """W&B tags of one sweep job: its overrides as 'key=value', minus the excluded keys.

    Tags longer than W&B allows are shortened (and end in '~') rather than left out.
    """
    excluded = set(exclude_keys)
    tags = [f"{key}={value}" for key, value in parse_overrides(override_lines).items()
            if key not in excluded]
    return [t if len(t) <= WANDB_TAG_MAX_CHARS else t[:WANDB_TAG_MAX_CHARS - 1] + "~" for t in tags]


def sweep_group_name(sweep_dir: str | Path) -> str:
    """The W&B group of every job of one multirun: the sweep directory's last two parts.

    multirun/2026-11-24/10-30-00 -> '2026-11-24_10-30-00'; hydra.sweep.dir=multirun/gates
    -> 'multirun_gates'. The sweep report derives the same name from the directory it is given.
    """
    return "_".join(Path(sweep_dir).resolve().parts[-2:])


def wandb_identity(wandb_cfg: Mapping[str, Any], hydra_cfg: Any | None) -> dict[str, Any]:
    """group, tags and name for wandb.init: the config's, completed from the sweep in a multirun.

    In a multirun with wandb.group null, every job joins the group named after the sweep
    directory, is tagged with its overrides (gate=none, seed=1, ...) besides wandb.tags, and
    is named after its sweep sub-directory unless wandb.name is set.
    """
    group, tags, name = wandb_cfg.get("group"), list(wandb_cfg.get("tags") or []), wandb_cfg.get("name")
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        exclude = hydra_cfg.job.config.override_dirname.exclude_keys
        group = group or sweep_group_name(hydra_cfg.sweep.dir)
        tags += [t for t in job_tags(hydra_cfg.overrides.task, exclude) if t not in tags]
        name = name or Path(hydra_cfg.runtime.output_dir).name
    return {"group": group, "tags": tags, "name": name}


def read_queue(path: Path) -> list[list[str]]:
    """A study's queue file: one run (train.py overrides) per non-empty line, `#` comments aside."""
    runs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            runs.append(line.split())
    return runs


def run_name(overrides: list[str]) -> str:
    """A queued run's directory name: '+study=convergence gate=random gate.pack=true seed=0'
    -> 'convergence,gate.pack=true,gate=random,seed=0'. A preset's group is dropped, `study=` as
    `experiment=`, so a study's queue lines name the same directories (and match the same
    committed records) whether they say `+study=NAME` or, as before conf/study, `+experiment=NAME`."""
    parts = sorted(re.sub(rf"^({'|'.join(PRESET_GROUPS)})=", "", o.lstrip("+")) for o in overrides)
    return re.sub(r"[^A-Za-z0-9=.,_-]", "_", ",".join(parts))
