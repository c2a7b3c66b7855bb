"""Misuse of the library, refused where it happens in Python terms: one table, each case with the
exception (or warning) it ends in and the one line that names the argument."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from adaptive_sparse.gating.gates import InfoBatchGate, NoGate, RandomGate, SundewGate
from adaptive_sparse.gating.packing import SelectionPacker
from adaptive_sparse.gating.sampler import SelectingBatchSampler

NAN = float("nan")


def sampler_with_batches(gate=None, batch_size: int = 4) -> tuple[SelectingBatchSampler, list[list[int]]]:
    """A sampler and its first epoch's batches, drawn but none handed back yet."""
    sampler = SelectingBatchSampler(gate or RandomGate(16, 1.0), batch_size, seed=0)
    return sampler, list(sampler)


def nan_to_update() -> None:
    sampler, _ = sampler_with_batches()
    sampler.update(torch.tensor([1.0, NAN, 1.0, 1.0]))


def nan_to_observe() -> None:
    SundewGate(8, 0.5, scoring="memory").observe(torch.tensor([0, 1]), torch.tensor([NAN, 1.0]))


def skipped_update() -> None:
    """The loop skips the first batch's update: its dataset indices say whose losses these are."""
    sampler, batches = sampler_with_batches()
    sampler.update(torch.ones(4), idx=torch.tensor(batches[1]))


def skipped_update_without_indices() -> None:
    """Without `idx` the skip cannot be told at once; the next epoch says it."""
    sampler, batches = sampler_with_batches()
    for _ in batches[1:]:
        sampler.update(torch.ones(4))
    iter(sampler).__next__()


def forgotten_losses() -> None:
    sampler_with_batches()[0].__iter__().__next__()  # a second epoch, not one loss handed back


def forgotten_observe() -> None:
    gate = InfoBatchGate(8, epochs=4)
    gate.start_epoch(1)
    gate.select(torch.arange(8), None)
    gate.start_epoch(2)  # InfoBatch would prune nothing: it never saw a loss


def mid_epoch_state_dict() -> None:
    sampler, _ = sampler_with_batches()
    sampler.update(torch.ones(4))
    sampler.state_dict()


CASES: list[tuple[str, Callable[[], object], type, str]] = [
    ("NaN loss handed to the sampler", nan_to_update, ValueError,
     r"SelectingBatchSampler.update: losses holds non-finite losses \(NaN or inf\) for 1 of 4 samples: refused"),
    ("NaN loss handed to a gate", nan_to_observe, ValueError,
     r"SundewGate.observe: trained holds non-finite losses \(NaN or inf\) for 1 of 2 samples: refused, nothing stored"),
    ("a skipped update, indices given", skipped_update, ValueError,
     r"SelectingBatchSampler.update: idx is not the batch waiting for its losses"),
    ("a skipped update, no indices", skipped_update_without_indices, UserWarning,
     r"SelectingBatchSampler: a new epoch starts while 1 of epoch 1's batches never had their losses handed back"),
    ("losses never handed to the sampler", forgotten_losses, UserWarning,
     r"a new epoch starts while 4 of epoch 1's batches never had their losses handed back"),
    ("losses never handed to a gate", forgotten_observe, UserWarning,
     r"InfoBatchGate: epoch 2 starts with no loss ever handed back: call gate.observe"),
    ("an empty dataset", lambda: SelectingBatchSampler(RandomGate(8, 0.5), 4, indices=torch.zeros(0, dtype=torch.long)),
     ValueError, r"SelectingBatchSampler: indices holds no samples: an empty dataset has no epoch to sample"),
    ("a gate for an empty dataset", lambda: SundewGate(0), ValueError,
     r"SundewGate: num_samples=0 is not allowed: the dataset's size, an integer >= 1"),
    ("batch_size 0 to the sampler", lambda: SelectingBatchSampler(RandomGate(8, 0.5), 0), ValueError,
     r"SelectingBatchSampler: batch_size=0 is not allowed: an integer >= 1"),
    ("steps 0 to the sampler", lambda: SelectingBatchSampler(RandomGate(8, 0.5), 4, steps=0), ValueError,
     r"SelectingBatchSampler: steps=0 is not allowed: an integer >= 1, or None"),
    ("steps without packing", lambda: SelectingBatchSampler(RandomGate(8, 0.5), 4, pack=False, steps=2), ValueError,
     r"SelectingBatchSampler: steps needs pack=True: unpacked, each look is its own batch"),
    ("batch_size 0 to the packer", lambda: SelectionPacker(0, enabled=True), ValueError,
     r"SelectionPacker: batch_size=0 is not allowed: an integer >= 1"),
    ("a gate sized for fewer samples: select", lambda: InfoBatchGate(8, epochs=2).select(torch.arange(10), None),
     ValueError, (r"InfoBatchGate.select: idx holds dataset index 8, outside the gate's num_samples=8: "
                  r"build the gate with num_samples=len\(dataset\)")),
    ("a gate sized for fewer samples: observe", lambda: RandomGate(8).observe(torch.tensor([3, 12]), torch.ones(2)),
     ValueError, r"RandomGate.observe: trained_idx holds dataset index 12, outside the gate's num_samples=8"),
    ("a negative index", lambda: SundewGate(8, scoring="memory").select(torch.tensor([0, -1]), None),
     ValueError, r"SundewGate.select: idx holds dataset index -1, outside the gate's num_samples=8"),
    ("sampler indices beyond the gate", lambda: SelectingBatchSampler(RandomGate(8), 4, indices=torch.arange(10)),
     ValueError, r"SelectingBatchSampler: indices holds dataset index 8, outside the gate's num_samples=8"),
    ("a mid-epoch state_dict", mid_epoch_state_dict, RuntimeError,
     (r"SelectingBatchSampler.state_dict: epoch 1 still has 3 of 4 batches to hand back; a resume starts at the "
      r"next epoch, so saved now the rest of this one would be skipped")),
    ("InfoBatch without the run's epochs", lambda: InfoBatchGate(8), TypeError,
     r"missing 1 required keyword-only argument: 'epochs'"),
    ("InfoBatch's prune_ratio by position", lambda: InfoBatchGate(8, 0.5, epochs=4), TypeError,
     r"takes 2 positional arguments but 3"),
    ("full training given a rate by position", lambda: NoGate(8, 0.5), TypeError,
     r"takes 2 positional arguments but 3"),
    ("num_samples and target_rate swapped", lambda: RandomGate(0.5, 8), ValueError,
     r"RandomGate: num_samples=0.5 is not allowed: the dataset's size, an integer >= 1"),
    ("a rate above 1", lambda: SundewGate(8, 1.5), ValueError,
     r"SundewGate: target_rate=1.5 is not allowed: a fraction in \(0, 1\]"),
    ("token losses for sequence losses", lambda: SundewGate(8).observe(torch.arange(2), torch.ones(2, 5)), ValueError,
     r"SundewGate.observe: trained holds losses of shape \(2, 5\) for trained_idx of shape \(2,\): one loss per"),
]


@pytest.mark.parametrize("case, misuse, refusal, message", CASES, ids=[c[0] for c in CASES])
def test_misuse_ends_in_one_line_naming_the_argument(case, misuse, refusal, message):
    if issubclass(refusal, Warning):
        with pytest.warns(refusal, match=message) as caught:
            misuse()
        text = str(caught[0].message)
    else:
        with warnings.catch_warnings(), pytest.raises(refusal, match=message) as caught:
            warnings.simplefilter("error")  # a refusal, not a warning first
            misuse()
        text = str(caught.value)
    assert "\n" not in text  # one line


def test_a_refused_update_leaves_the_batch_waiting_and_the_gate_untouched():
    gate = SundewGate(16, 1.0, scoring="memory")
    sampler, batches = sampler_with_batches(gate)
    with pytest.raises(ValueError, match="non-finite"):
        sampler.update(torch.tensor([1.0, NAN, 1.0, 1.0]))
    assert gate.memory.last_loss.isnan().all() and len(sampler.pending) == len(batches)
    for batch in batches:  # the same batches still take their losses, in order
        sampler.update(torch.ones(len(batch)), idx=torch.tensor(batch))
    assert not gate.memory.last_loss.isnan().any()
    assert sampler.state_dict()["epoch"] == 1  # an epoch boundary: saved
