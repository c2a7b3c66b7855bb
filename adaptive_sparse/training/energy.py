"""Energy of the training phases, from codecarbon, always labelled with where it came from
(`energy_source` in summary.json: measured | estimated | none).

codecarbon reads what the machine has: NVML's energy counter on NVIDIA GPUs and RAPL package
counters on CPUs that expose them (measured); without them it models the CPU's power from its
TDP and utilisation (estimated); RAM is always modelled. This module reads nothing by hand: it
asks codecarbon which method it uses for the CPU and says "measured" only when that is a counter.
Each meter is read around training phases only (`measure()`), never around evaluation, and
its total continues across a resume (`resume_from`).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

# codecarbon's CPU methods that read an energy counter rather than model one
MEASURED_CPU_MODES = {"intel_rapl", "intel_power_gadget", "apple_powermetrics"}


class NullMeter:
    """`energy=none`: no figure (summary.json: energy_kwh null, energy_source none)."""

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
    """'measured' when codecarbon reads a counter for the CPU (GPUs it reads through NVML),
    else 'estimated'."""
    cpu_modes = {getattr(h, "_mode", None) for h in getattr(tracker, "_hardware", []) if type(h).__name__ == "CPU"}
    return "measured" if cpu_modes and cpu_modes <= MEASURED_CPU_MODES else "estimated"


def codecarbon_meter(country_iso_code: str = "USA") -> CodecarbonMeter | NullMeter:
    """`energy=codecarbon`: codecarbon's tracker, labelled measured or estimated; where it cannot
    start, a warning and no figure (energy_source none) rather than a stopped run."""
    try:
        return CodecarbonMeter(country_iso_code)
    except Exception as err:  # a missing library or counter must not stop training
        warnings.warn(f"energy metering unavailable ({err}); energy_source=none")
        return NullMeter()
