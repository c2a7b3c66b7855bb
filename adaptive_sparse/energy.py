"""Energy of the training phases: measured where a counter exists, otherwise estimated, and
always labelled so (`energy_source` in summary.json: measured | estimated | none).

- CUDA: NVML's total-energy counter of the GPU (measured).
- CPU with readable RAPL counters (/sys/class/powercap/intel-rapl:*): package energy (measured).
- CPU without RAPL: codecarbon's offline tracker, which models power from the CPU's TDP and
  utilisation (estimated).
Each meter is read around training phases only (`measure()`), never around evaluation.
"""
from __future__ import annotations

import glob
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

JOULES_PER_KWH = 3.6e6


class NullMeter:
    source = "none"
    kwh: float | None = None

    @contextmanager
    def measure(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


class CounterMeter:
    """Reads a monotonically increasing joule counter before and after each measured phase."""

    source = "measured"

    def __init__(self):
        self.kwh = 0.0

    def joules(self) -> float:
        raise NotImplementedError

    @contextmanager
    def measure(self) -> Iterator[None]:
        start = self.joules()
        try:
            yield
        finally:
            self.kwh += max(self.joules() - start, 0.0) / JOULES_PER_KWH

    def close(self) -> None:
        pass


class RaplMeter(CounterMeter):
    """Sum of the CPU package domains' RAPL counters, unwrapped at their maximum range."""

    def __init__(self, domains: list[Path]):
        super().__init__()
        self.domains = domains
        self.ranges = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self.last = [self._read(d) for d in domains]
        self.total_uj = 0

    @staticmethod
    def _read(domain: Path) -> int:
        return int((domain / "energy_uj").read_text())

    def joules(self) -> float:
        for i, domain in enumerate(self.domains):
            now = self._read(domain)
            self.total_uj += (now - self.last[i]) % self.ranges[i]  # one wrap at most between reads
            self.last[i] = now
        return self.total_uj / 1e6

    @classmethod
    def available(cls) -> list[Path]:
        domains = [Path(p) for p in sorted(glob.glob("/sys/class/powercap/intel-rapl:[0-9]*"))
                   if Path(p).name.count(":") == 1]  # packages, not their sub-domains
        try:
            for d in domains:
                cls._read(d)
        except OSError:  # present but not readable without privileges
            return []
        return domains


class NvmlMeter(CounterMeter):
    def __init__(self, device: torch.device):
        super().__init__()
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def joules(self) -> float:
        torch.cuda.synchronize()
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ -> J


class CodecarbonMeter:
    """codecarbon's offline estimate (no network), one task per measured phase."""

    source = "estimated"

    def __init__(self, country_iso_code: str):
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self.tracker = OfflineEmissionsTracker(country_iso_code=country_iso_code, save_to_file=False,
                                               log_level="error", tracking_mode="process")
        self.tracker.start()
        self.kwh = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        self.tracker.start_task("train")
        try:
            yield
        finally:
            self.kwh += float(self.tracker.stop_task().energy_consumed)

    def close(self) -> None:
        self.tracker.stop()


def make_energy_meter(kind: str, device: torch.device, country_iso_code: str = "USA"):
    """`none`: nothing. `codecarbon`: the best source this machine has (see module doc)."""
    if kind == "none":
        return NullMeter()
    try:
        if device.type == "cuda":
            return NvmlMeter(device)
        domains = RaplMeter.available()
        if domains:
            return RaplMeter(domains)
        return CodecarbonMeter(country_iso_code)
    except Exception as err:  # a missing library or counter must not stop training
        warnings.warn(f"energy metering unavailable ({err}); energy_source=none")
        return NullMeter()
