"""A process's place among torchrun's ranks, and the few collectives a gate needs there.

A single process gets `Ranks()` (inactive): every method is then the identity or a no-op, so
one code path serves one process and many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass
class Ranks:
    """This process's place among the ranks; `active` is False for a single process."""

    active: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @classmethod
    def from_torch_distributed(cls, device: torch.device) -> "Ranks":
        """The ranks of an initialised torch.distributed process group (inactive without one)."""
        if not (torch_dist.is_available() and torch_dist.is_initialized()):
            return cls()
        return cls(True, torch_dist.get_rank(), torch_dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: list[float], dtype: torch.dtype = torch.float64) -> list[float]:
        """Sum a few numbers over ranks (identity for a single process)."""
        if not self.active:
            return list(values)
        buffer = torch.tensor(values, dtype=dtype, device=self.device)
        torch_dist.all_reduce(buffer)
        return buffer.tolist()

    def global_rate(self, keep: torch.Tensor) -> float:
        """A gate's achieved rate over all ranks' batches (`Gate.use_global_rate`): selected / seen,
        so every rank's controller sees the same rate and moves to the same threshold."""
        selected, total = self.all_reduce([int(keep.sum()), len(keep)])
        return selected / total

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def snapshot_gate_memory(self, gate: Any) -> dict[str, torch.Tensor] | None:
        """The gate's per-sample memory at epoch start (under torchrun; None otherwise)."""
        memory = getattr(gate, "memory", None)
        if not self.active or memory is None:
            return None
        return memory.snapshot()

    def sync_sample_memory(self, gate: Any, epoch_start: dict[str, torch.Tensor] | None) -> None:
        """One per-sample memory on every rank at epoch end (SampleMemory.merge_ranks)."""
        memory = getattr(gate, "memory", None)
        if self.active and memory is not None and epoch_start is not None:
            memory.merge_ranks(epoch_start, torch_dist.all_reduce)
