"""Data-parallel training over `torchrun` ranks, without DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 train.py device=cpu ...

Why no DDP wrapper: a gate selects a different number of samples on each rank, possibly
none. Each rank backpropagates the sum of its selected samples' losses divided by the
*global* number of selected samples, and the gradients are summed over ranks in one flat
buffer: exactly the mean over every sample selected anywhere (`step.train_on_subset`, the
one training step). A rank with nothing selected contributes zeros but still joins every
collective, so no rank waits forever.

Every collective below is called the same number of times on every rank: equal batch
counts per rank (the loader drops the remainder), one rate all-reduce per gate selection,
one count and one gradient all-reduce per step.

A single process (no torchrun) gets `Distributed(active=False)`: every method is then a
no-op or a local computation, so the single-process path runs exactly as before.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from adaptive_sparse.gating.ranks import Ranks
from adaptive_sparse.training.metering import Tally

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def agree_on_run_dir(argv: list[str]) -> list[str]:
    """All ranks must write one run directory. The default `outputs/${now:...}` is resolved by
    each rank on its own clock and could differ by a second, so under torchrun without an
    explicit `hydra.run.dir` every rank uses `outputs/torchrun/<rendezvous id>` instead
    (torchrun gives all ranks the same id; --standalone makes a fresh uuid per launch)."""
    if not launched_by_torchrun() or any(a.startswith(("hydra.run.dir=", "-m", "--multirun")) for a in argv):
        return argv
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id == "none":
        sys.exit("distributed: ranks cannot agree on a run directory: pass hydra.run.dir=PATH "
                 "(or torchrun --rdzv_id=ID)")
    return [*argv, f"hydra.run.dir=outputs/torchrun/{run_id}"]


class Distributed(Ranks):
    """The training app's torchrun side: shards, counts and gradients summed over ranks, on top
    of the collectives a gate needs (`Ranks`); inactive for a single process."""

    # ------------------------------------------------------------------ data
    def shard(self, n: int) -> torch.Tensor | None:
        """This rank's contiguous slice of range(n) for evaluation (sizes may differ by one:
        evaluation runs no collective per batch, only one all-reduce of the sums at the end)."""
        if not self.active:
            return None
        return torch.arange(n).tensor_split(self.world_size)[self.rank]

    @property
    def train_shard(self) -> tuple[int, int] | None:
        """(rank, world size) for BatchLoader: one global permutation per epoch, sliced."""
        return (self.rank, self.world_size) if self.active else None

    # ------------------------------------------------------------------ reductions
    def all_reduce_max(self, value: float) -> float:
        """The largest of one number over ranks (itself for a single process)."""
        if not self.active:
            return value
        buffer = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.MAX)
        return buffer.item()

    def attach(self, gate: Any, packer: Any) -> None:
        """Make the gate's controller work on the global activation rate, and the packer step
        when enough samples wait on all ranks together."""
        if self.active:
            gate.use_global_rate(self.global_rate)
            packer.count_reducer, packer.ranks = self.global_count, self.world_size

    def global_count(self, n: int) -> int:
        return int(self.all_reduce([n])[0])

    def reduce_tally(self, tally: Tally) -> Tally:
        """The epoch's counts and trained-loss sum over all ranks."""
        seen, scored, trained, loss_sum, scoring_flops = self.all_reduce(
            [tally.seen, tally.scored, tally.trained, tally.loss_sum, tally.scoring_flops])
        tally.seen, tally.scored, tally.trained, tally.loss_sum = int(seen), int(scored), int(trained), loss_sum
        tally.scoring_flops = scoring_flops  # optimizer_steps: the same on every rank already
        return tally

    def evaluate(self, sums: tuple[float, int, int]) -> tuple[float, float]:
        """(mean loss, accuracy %) over the whole validation set from each rank's
        (loss sum, correct, count)."""
        loss_sum, correct, count = self.all_reduce(list(sums))
        return loss_sum / count, 100.0 * correct / count

    def merge_epoch(self, tally: Tally, gate: Any, memory_at_start: dict[str, torch.Tensor] | None) -> None:
        """Epoch end under torchrun: global counts in `tally`, one per-sample memory on all ranks."""
        if self.active:
            self.reduce_tally(tally)
            self.sync_sample_memory(gate, memory_at_start)

    # ------------------------------------------------------------------ training step
    def sum_gradients(self, model: nn.Module) -> None:
        """Sum every gradient over ranks in one flat all-reduce (a no-op for one process). A
        parameter without a gradient (nothing selected on this rank) contributes zeros."""
        if not self.active:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        torch_dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).clone() if p.grad is None else p.grad.copy_(chunk.view_as(p))

    def close(self) -> None:
        if self.active and torch_dist.is_initialized():
            # ranks arrive here at different times (rank 0 writes the summary); a rank that
            # tears gloo down while its peer is still connected can abort the peer's teardown
            # (SIGABRT, "terminate called without an active exception"), so leave together
            torch_dist.barrier()
            torch_dist.destroy_process_group()


def setup_distributed(backend: str, device_name: str) -> Distributed:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA unless `backend` says
    otherwise); a plain `python train.py` returns an inactive Distributed."""
    if not launched_by_torchrun():
        return Distributed()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                  timeout=timedelta(minutes=10))
    if rank != 0:  # rank 0 alone writes train.log; the others keep warnings on the console
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    log.info("distributed: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return Distributed(True, rank, world_size, device)
