"""Preemption that saves: SIGTERM (SLURM, submitit, a cluster's eviction) and Ctrl-C finish the
current batch, write a checkpoint that resumes exactly where the run stopped, and exit.

The handler only raises a flag; the training loop looks at it after every loader batch (all
ranks together under torchrun, so every rank stops after the same batch and joins the same
checkpoint). A second Ctrl-C while the checkpoint is being written stops at once.
"""
from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for a run's lifetime (`with StopRequest() as stop:`); `signal` is the first stop
    signal received, or None."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: stop now (exit 130)

    def requested(self, ranks) -> bool:
        """Whether to stop after this batch: here, or under torchrun on any rank."""
        mine = float(self.signal or 0)
        agreed = ranks.all_reduce_max(mine)
        if agreed and self.signal is None:
            self.signal = int(agreed)
        return bool(agreed)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "none"

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or 0)  # the shell's convention for a death by signal
