"""The adapters' shared parts, with torch alone: a length exact before the epoch, epochs served in
a fixed number of steps with every loss handed back once, and the causal-LM per-sequence loss."""
from __future__ import annotations

import math

import torch

from adaptive_sparse import RandomGate, SelectingBatchSampler, SundewGate
from adaptive_sparse.integrations.common import PlannedSampler, causal_lm_losses, epoch_record


def test_causal_lm_losses_average_the_shifted_tokens_and_leave_out_ignored_ones():
    """Every position predicts token 1 with p = 3/4 (logits [0, log 3]): a label 1 costs log(4/3), a label 0
    log 4. Labels are read one position on (the shift), so labels[:, 0] never counts."""
    logits = torch.tensor([0.0, math.log(3.0)]).expand(3, 3, 2)  # [B=3, T=3, V=2]
    labels = torch.tensor([[0, 1, 0],           # scored: 1, 0
                           [1, -100, 1],        # scored: 1
                           [1, -100, -100]])    # nothing scored
    expected = torch.tensor([(math.log(4 / 3) + math.log(4)) / 2, math.log(4 / 3), 0.0])
    assert torch.allclose(causal_lm_losses(logits, labels), expected, atol=1e-6)


def _epochs(sampler: SelectingBatchSampler, epochs: int = 3) -> list[tuple[int, list[list[int]]]]:
    """(len before the epoch, the epoch's batches) per epoch; each sample's loss is its index / 200."""
    out = []
    for _ in range(epochs):
        before = len(sampler)
        assert len(sampler) == before  # reading it again plans nothing more
        batches = list(sampler)
        for batch in batches:
            sampler.update(torch.tensor(batch, dtype=torch.float) / 200)
        out.append((before, batches))
    return out


def test_planned_sampler_knows_each_epochs_batch_count_before_it_and_decides_as_the_plain_one():
    planned = _epochs(PlannedSampler(SundewGate(200, 0.5, scoring="memory", seed=0), 16, seed=0))
    plain = _epochs(SelectingBatchSampler(SundewGate(200, 0.5, scoring="memory", seed=0), 16, seed=0))
    for (before, batches), (_, plain_batches) in zip(planned, plain):
        assert before == len(batches) and batches == plain_batches


def test_planned_sampler_saved_with_an_epoch_planned_ahead_resumes_to_plan_it_the_same_way():
    """Lightning reads the length after the last epoch too: the epoch planned then is not begun, so
    the state is the one from before it."""
    sampler = PlannedSampler(SundewGate(200, 0.5, scoring="memory", seed=0), 16, seed=0)
    _epochs(sampler, 2)
    len(sampler)  # the third epoch planned
    assert sampler.epoch == 3 and sampler.served_epoch == 2 and sampler.at_epoch_boundary
    state = sampler.state_dict()
    third = _epochs(sampler, 1)
    resumed = PlannedSampler(SundewGate(200, 0.5, scoring="memory", seed=0), 16, seed=0)
    len(resumed)  # an epoch planned before the load is dropped by it
    resumed.load_state_dict(state)
    assert _epochs(resumed, 1) == third and resumed.epoch == 3


def test_epoch_record_is_trained_over_looked_at_the_looks_cut_at_limit_batches():
    sampler = SelectingBatchSampler(RandomGate(100, 0.5, seed=0), 8, limit_batches=5)  # looks at 5 x 8 = 40
    batches = list(sampler)
    trained = sum(len(b) for b in batches)
    assert sampler.samples_looked_at == 40 and SelectingBatchSampler(RandomGate(100, 0.5), 8).samples_looked_at == 100
    assert epoch_record(sampler, trained) == {"epoch": 1, "samples_trained": trained, "samples_seen": 40,
                                              "activation_rate": trained / 40}
