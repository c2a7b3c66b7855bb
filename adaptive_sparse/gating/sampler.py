"""Selection before loading: a batch sampler that yields only the samples a gate selects.

A gate that decides without a scoring forward (random, sundew with memory scoring, InfoBatch:
`gate.can_select_before_loading`) can make an epoch's decisions from dataset indices alone.
`SelectingBatchSampler` does, at the start of each epoch: it draws the epoch's order, lets the
gate select from each batch-sized stretch of it (a *look*), and yields the selected indices
packed into full batches. Skipped samples are then never read, decoded or augmented. Three
lines in any loop over a map-style dataset:

    sampler = SelectingBatchSampler(gate, batch_size=128)   # gate = SundewGate(len(dataset), ...)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    loss = sampler.update(per_sample_losses, logits)   # in the loop: the loss to backpropagate

Why deciding a whole epoch first is exact: each sample appears once per epoch, and a memory
gate's decision about it reads only its own memory, which this epoch has not touched yet,
and the controller's budget, which moves with the rates of the looks before it. The losses
handed back during the epoch update the memory for the next one, as they would have done
had the gate selected after loading.

Under torchrun (torch.distributed initialised) each rank looks at its own slice of one global
order, the gate's controller works on the global rate, the ranks' selections are pooled and
dealt out again so every rank yields the same number of non-empty batches (collectives line
up), and the per-sample memories are merged when the epoch's last batch is handed back.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

from adaptive_sparse.gating.gates import Gate, Selection, check_finite, check_indices, gated_loss, step_weight
from adaptive_sparse.gating.ranks import Ranks


@dataclass
class Look:
    """One batch-sized stretch of the epoch's order, as the gate saw it before loading."""
    looked_at: torch.Tensor  # [B] dataset indices
    selection: Selection     # positions within `looked_at` to train, and their loss weights

    @property
    def chosen(self) -> torch.Tensor:
        return self.looked_at[self.selection.index]  # [k] dataset indices

    def relative_weight(self) -> torch.Tensor | None:
        """[k] loss weights with 1 for an ordinary sample (None: all equal), comparable across looks."""
        return self.selection.relative_weight(len(self.looked_at))

    def state_dict(self) -> dict:
        weight = self.selection.weight
        return {"looked_at": self.looked_at.cpu(), "index": self.selection.index.cpu(),
                "weight": None if weight is None else weight.cpu(), "form": self.selection.form}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "Look":
        """The Look that `state_dict` saved (in a mid-epoch checkpoint), on `device`."""
        weight = state["weight"]
        form = state.get("form", "estimate")  # saved before forms: its weights divide by the looked-at count
        return cls(state["looked_at"].to(device),
                   Selection(state["index"].to(device), None if weight is None else weight.to(device), form=form))

    def served_selection(self, device: torch.device) -> Selection:
        """For a batch that holds exactly the chosen samples: all of its rows, the gate's weights,
        and how many samples the gate chose them from."""
        weight = self.selection.weight
        return Selection(torch.arange(len(self.selection.index), device=device),
                         None if weight is None else weight.to(device), looked_at=len(self.looked_at),
                         form=self.selection.form)


def plan_epoch(gate: Gate, index_batches: list[torch.Tensor]) -> list[Look]:
    """The gate's selection from each look of an epoch's order, in order (the gate's epoch
    already started): selection before loading, for this sampler and for any loader."""
    looks = []
    for idx in index_batches:
        idx = idx.to(gate.device)  # [B]: where the gate keeps its per-sample memory
        looks.append(Look(idx, gate.select(idx, None)))
    return looks


class EpochOrder:
    """Each epoch's order of dataset indices, in batch-sized stretches.

    One permutation of `indices` per epoch (drawn from `seed`'s generator when shuffling, else
    their own order); under torchrun (`shard` = (rank, world size)) every rank draws the same
    permutation and keeps its own slice, the last len % world indices dropped so every rank
    has as many; at most `limit_batches` batches; with `drop_last` only full ones. The
    generator is the only state, so a checkpoint of it resumes the order exactly.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 limit_batches: int | None = None, shard: tuple[int, int] | None = None, drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed: an integer >= 1")
        self.indices, self.batch_size, self.shuffle = indices, batch_size, shuffle
        self.limit_batches, self.shard, self.drop_last = limit_batches, shard, drop_last
        self.generator = torch.Generator().manual_seed(seed)  # CPU generator: same stream on any device

    @property
    def samples_served(self) -> int:
        return len(self.indices) if self.shard is None else len(self.indices) // self.shard[1]

    def __len__(self) -> int:
        served = self.samples_served
        full = served // self.batch_size if self.drop_last else -(-served // self.batch_size)
        return full if self.limit_batches is None else min(full, self.limit_batches)

    def index_batches(self) -> list[torch.Tensor]:
        """The next epoch's batches of dataset indices (CPU), each [B]."""
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=self.generator)]
        if self.shard is not None:
            rank, per_rank = self.shard[0], self.samples_served
            order = order[rank * per_rank:(rank + 1) * per_rank]
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SelectingBatchSampler(Sampler[list[int]]):
    """Yields, each epoch, only the dataset indices `gate` selects, in batches of `batch_size`.

    The epoch's order is one permutation of range(gate.num_samples) (or of `indices`) from
    `seed`'s generator, in looks of `batch_size` (under torchrun: this rank's slice of one
    global order). With `pack` (the default) the selected indices of consecutive looks fill
    whole batches, the last one possibly short; without it each look's selection is one batch
    (empty ones are skipped). With `steps` (packed only) every epoch's selection is dealt evenly
    into that many batches instead, sizes differing by at most one, for a loop that fixes its
    steps per epoch once (the Hugging Face Trainer): each batch still carries its own weights.
    Hand every batch's per-sample losses back with `update`, in the
    order the batches came: the gate learns from them, and `update` returns the batch's training
    loss (the gate's weights applied). `state_dict` holds the order's generator, the epoch and
    the gate, so a run resumes exactly at an epoch boundary.
    """

    def __init__(self, gate: Gate, batch_size: int, *, shuffle: bool = True, seed: int = 0, pack: bool = True,
                 limit_batches: int | None = None, indices: torch.Tensor | None = None, steps: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SelectingBatchSampler: batch_size={batch_size!r} is not allowed: an integer >= 1")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"SelectingBatchSampler: steps={steps!r} is not allowed: an integer >= 1, or None")
        if steps is not None and not pack:
            raise ValueError("SelectingBatchSampler: steps needs pack=True: unpacked, each look is its own batch")
        if not gate.can_select_before_loading:
            raise ValueError(f"{type(gate).__name__} with these settings needs a scoring forward of each loaded "
                             "batch, so it cannot select before loading: select after loading instead")
        self.gate, self.batch_size, self.pack, self.steps = gate, batch_size, bool(pack), steps
        self.ranks = Ranks.from_torch_distributed(gate.device)
        if self.ranks.active and not self.pack:
            raise ValueError("SelectingBatchSampler: pack=False is not allowed under torchrun: every rank must "
                             "yield as many batches")
        indices = torch.arange(gate.num_samples) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self._check_indices(indices)
        shard = (self.ranks.rank, self.ranks.world_size) if self.ranks.active else None
        self.order = EpochOrder(indices, batch_size, shuffle=shuffle, seed=seed, limit_batches=limit_batches,
                                shard=shard)
        if self.ranks.active:
            gate.use_global_rate(self.ranks.global_rate)  # one controller budget for all ranks
        self.epoch = 0
        self.batches: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # this epoch's, once planned
        self.pending: deque[tuple[torch.Tensor, torch.Tensor | None]] = deque()  # yielded, losses not yet back
        self.updates_left = 0  # this epoch's batches whose losses have not come back
        self.memory_at_start: dict[str, torch.Tensor] | None = None

    def _check_indices(self, indices: torch.Tensor) -> None:
        """An order with no sample for some rank would yield no batch at all; an index outside the
        gate's num_samples would fail deep inside its memory."""
        if not len(indices):
            raise ValueError("SelectingBatchSampler: indices holds no samples: an empty dataset has no epoch to sample")
        if self.ranks.active and len(indices) < self.ranks.world_size:
            raise ValueError(f"SelectingBatchSampler: indices holds {len(indices)} samples for "
                             f"{self.ranks.world_size} ranks: each rank needs at least one")
        check_indices("SelectingBatchSampler", "indices", indices, self.gate.num_samples)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (1-based); without it each iteration is the next epoch."""
        self.epoch = int(epoch) - 1

    def __iter__(self) -> Iterator[list[int]]:
        if self.updates_left:
            warnings.warn(f"SelectingBatchSampler: a new epoch starts while {self.updates_left} of epoch "
                          f"{self.epoch}'s batches never had their losses handed back, so the gate did not learn "
                          "from them: call sampler.update(per_sample_losses) once per batch", stacklevel=2)
        self._merge_rank_memories()  # the last epoch's, if its last losses never came back
        self.epoch += 1
        self.gate.start_epoch(self.epoch)
        self.memory_at_start = self.ranks.snapshot_gate_memory(self.gate)
        self.batches = self._batches_of(plan_epoch(self.gate, self.order.index_batches()))
        self.pending.clear()
        self.updates_left = len(self.batches)
        for idx, weight in self.batches:
            self.pending.append((idx, weight))
            yield idx.tolist()

    def __len__(self) -> int:
        """The epoch's number of batches, exact once it is planned (from its first batch on);
        before that, the last epoch's, or on the first the number the target rate implies."""
        if self.batches is not None:
            return len(self.batches)
        if self.steps is not None:
            return self.steps
        rate = self.gate.target_rate if self.gate.target_rate is not None else 1.0
        return math.ceil(rate * self.order.samples_served / self.batch_size) if self.pack else len(self.order)

    @property
    def samples_looked_at(self) -> int:
        """This process's samples the gate looks at each epoch: its slice of the order, cut at
        `limit_batches`; the epoch's activation rate is the samples its batches hold over this."""
        return min(len(self.order) * self.order.batch_size, self.order.samples_served)

    def _batches_of(self, looks: list[Look]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The epoch's batches: dataset indices [k] and the step's loss weights [k] (None: the mean),
        those of a packed batch from its samples' relative weights (`step_weight`)."""
        if not self.pack:
            return [(look.chosen, look.selection.weight) for look in looks if len(look.chosen)]
        chosen, relative = self._pooled(looks)
        batches = self._dealt(chosen, relative)
        form = next((look.selection.form for look in looks if look.selection.weight is not None), "estimate")
        return [(idx, None if weight is None else step_weight(weight, form)) for idx, weight in batches]

    def _pooled(self, looks: list[Look]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every look's chosen indices in order [n], with relative weights [n] (None: all 1);
        under torchrun, every rank's, in rank order."""
        chosen = torch.cat([look.chosen.cpu() for look in looks]) if looks else torch.empty(0, dtype=torch.long)
        weighted = any(look.selection.weight is not None for look in looks)
        weight = torch.cat([(w.cpu() if (w := look.relative_weight()) is not None
                             else torch.ones(len(look.chosen))) for look in looks]) if weighted else None
        if self.ranks.active:
            parts = self.ranks.gather((chosen, weight))
            chosen = torch.cat([c for c, _ in parts])
            weight = torch.cat([w if w is not None else torch.ones(len(c)) for c, w in parts]) \
                if any(w is not None for _, w in parts) else None
        return chosen, weight

    def _step_bounds(self, n: int) -> list[tuple[int, int]]:
        """The epoch's global steps as [start, end) positions in a pooled selection of n samples:
        batch_size x world each, a last one too small to give every rank a sample joining the one
        before; or with `steps`, that many (fewer only when some rank would get no sample), sizes
        differing by at most one."""
        world = self.ranks.world_size
        if self.steps is not None:
            count = max(min(self.steps, n // world), 1)
            edges = [n * step // count for step in range(count + 1)]
            return list(zip(edges[:-1], edges[1:]))
        starts = list(range(0, n, self.batch_size * world))
        if len(starts) > 1 and n - starts[-1] < world:
            starts.pop()
        return list(zip(starts, starts[1:] + [n]))

    def _dealt(self, chosen: torch.Tensor, weight: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The pooled selection [n] (and its relative weights) as this rank's batches: each global
        step (`_step_bounds`) split evenly over the ranks, sizes differing by at most one."""
        world, rank = self.ranks.world_size, self.ranks.rank
        batches = []
        for start, end in self._step_bounds(len(chosen)):
            mine = torch.arange(start, end).tensor_split(world)[rank]  # [about batch_size] positions
            batches.append((chosen[mine], None if weight is None else weight[mine]))
        return [b for b in batches if len(b[0])]

    # ------------------------------------------------------------------ losses handed back
    def update(self, losses: torch.Tensor, logits: torch.Tensor | None = None, *,
               idx: torch.Tensor | None = None) -> torch.Tensor:
        """Hand back the per-sample losses [k] of the oldest batch not yet handed back; returns
        the loss to backpropagate: their mean, or with a gate's weights sum(w * loss) (InfoBatch:
        mean(w * loss) over the batch, as its own `update`; see `Selection`). With `logits` ([k, C],
        or [k, T, V]) the gate also learns each sample's prediction entropy (sundew's entropy
        signal); without them it counts as 0. `idx`, the batch's dataset indices when the loop has
        them, makes a skipped update an error here rather than these losses crediting the
        waiting batch's samples. Non-finite losses are refused (nothing is stored)."""
        if not self.pending:
            raise RuntimeError("SelectingBatchSampler.update: no batch is waiting for its losses "
                               "(one update per batch, in the order the loader gave them)")
        waiting, weight = self.pending[0]
        if losses.shape != waiting.shape:
            raise ValueError(f"SelectingBatchSampler.update: losses of shape {tuple(losses.shape)} for a batch of "
                             f"{len(waiting)} samples (pass one loss per sample: reduction='none', then a mean over "
                             "tokens)")
        if idx is not None and not torch.equal(torch.as_tensor(idx).long().cpu(), waiting.cpu()):
            raise ValueError("SelectingBatchSampler.update: idx is not the batch waiting for its losses (the oldest "
                             "not handed back): one update per batch, in the order the loader gave them")
        check_finite("SelectingBatchSampler.update", "losses", losses)
        self.gate.observe(waiting, losses, logits)
        self.pending.popleft()
        self.updates_left -= 1
        if self.updates_left == 0:
            self._merge_rank_memories()
        return gated_loss(losses, None if weight is None else weight.to(losses.device))

    def _merge_rank_memories(self) -> None:
        """torchrun: one per-sample memory on every rank (each sample trained on one rank)."""
        if self.memory_at_start is not None:
            self.ranks.sync_sample_memory(self.gate, self.memory_at_start)
            self.memory_at_start = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """A copy of the state at an epoch boundary; refused inside an epoch, whose remaining
        batches a resume would otherwise silently skip."""
        if self.updates_left:
            raise RuntimeError(f"SelectingBatchSampler.state_dict: epoch {self.epoch} still has {self.updates_left} of "
                               f"{len(self.batches)} batches to hand back; a resume starts at the next epoch, so saved "
                               "now the rest of this one would be skipped: save after the epoch's last update")
        # a copy: the gate's own tensors move with the next epoch, and a state kept in memory must not
        return copy.deepcopy({"epoch": self.epoch, "order": self.order.state_dict(), "gate": self.gate.state_dict()})

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.order.load_state_dict(state["order"])
        self.gate.load_state_dict(state["gate"])
        self.batches, self.pending, self.updates_left = None, deque(), 0
