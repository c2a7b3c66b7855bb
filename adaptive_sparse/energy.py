"""Energy of the training phases, from codecarbon, always labelled with where it came from
(`energy_source` in summary.json: measured | estimated | none).

codecarbon reads what the machine has: NVML's energy counter on NVIDIA GPUs and RAPL package
counters on CPUs that expose them (measured); without them it models the CPU's power from its
TDP and utilisation (estimated). This module reads nothing by hand: it asks codecarbon which
method each piece of hardware uses and says "measured" only when every one is a counter.
Each meter is read around training phases only (`measure()`), never around evaluation, and
its total continues across a resume (`resume_from`).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

# codecarbon's CPU methods that read an energy counter rather than model one
MEASURED_CPU_MODES = {"intel_rapl", "intel_power_gadget", "apple_powermetrics"}


class NullMeter:
    source = "none"
    kwh: float | None = None

    @contextmanager
    def measure(self) -> Iterator[None]:
        yield

    def resume_from(self, kwh: float | None) -> None:
        pass

    def close(self) -> None:
        pass


class CodecarbonMeter:
    """codecarbon's offline tracker (no network), one task per measured phase."""

    def __init__(self, country_iso_code: str):
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self.tracker = OfflineEmissionsTracker(country_iso_code=country_iso_code, save_to_file=False,
                                               log_level="error", tracking_mode="process")
        self.tracker.start()
        self.kwh = 0.0
        self.source = energy_source(self.tracker)

    @contextmanager
    def measure(self) -> Iterator[None]:
        self.tracker.start_task("train")
        try:
            yield
        finally:
            self.kwh += float(self.tracker.stop_task().energy_consumed)

    def resume_from(self, kwh: float | None) -> None:
        """Continue a resumed run's total (the checkpoint's last epoch record)."""
        self.kwh = float(kwh or 0.0)

    def close(self) -> None:
        self.tracker.stop()


def energy_source(tracker) -> str:
    """'measured' when codecarbon reads counters for the CPU and every GPU, else 'estimated'."""
    kinds = {type(h).__name__: getattr(h, "_mode", None) for h in getattr(tracker, "_hardware", [])}
    cpu_measured = kinds.get("CPU") in MEASURED_CPU_MODES
    return "measured" if cpu_measured else "estimated"


def make_energy_meter(kind: str, device: torch.device, country_iso_code: str = "USA"):
    """`none`: nothing. `codecarbon`: codecarbon's tracker, labelled measured or estimated."""
    if kind == "none":
        return NullMeter()
    try:
        return CodecarbonMeter(country_iso_code)
    except Exception as err:  # a missing library or counter must not stop training
        warnings.warn(f"energy metering unavailable ({err}); energy_source=none")
        return NullMeter()
