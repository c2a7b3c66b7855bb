"""Figures read off a run's per-epoch records (metrics.jsonl), shared by the report and the
benchmarks. Light on purpose (no torch), like sweeps.py: scripts/report.py imports it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def time_to_accuracy(records: Iterable[dict[str, Any]], accuracy: float) -> float | None:
    """Training seconds (evaluation excluded) until the end of the first evaluated epoch at or
    above `accuracy`; None if none is. Epochs without evaluation (val_acc null) count their
    time but cannot reach it."""
    elapsed = 0.0
    for record in records:
        elapsed += record["epoch_time_s"]
        if record.get("val_acc") is not None and record["val_acc"] >= accuracy:
            return elapsed
    return None


def short_source(source: str | None) -> str | None:
    """folder:/any/path/cifar10 -> folder:cifar10: a record names the data copy, not a machine's paths."""
    if not source or ":" not in source:
        return source
    kind, place = source.split(":", 1)
    return f"{kind}:{Path(place).name}"
