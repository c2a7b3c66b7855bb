"""Figures read off a run's per-epoch records (metrics.jsonl), shared by the analysis library
(adaptive_sparse.analysis) and the benchmarks. Light on purpose (no torch), like sweeps.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


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
    def short_unit(self) -> str:
        return "pt" if self.is_accuracy else "nats"

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
