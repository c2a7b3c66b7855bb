"""InfoBatch as published: for the same keep decisions and losses, every route returns the loss
InfoBatch's own `update` returns, mean(w * loss) over the step's samples (w = 1 / (1 - r) for a
kept sample below the mean loss, 1 otherwise): the sampler (packed and not), selecting after
loading (`gated_loss`), and train.py's step (`train_on_subset`) unpacked and packed, with the
selections made after loading or served before it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.gating.gates import InfoBatchGate, gated_loss
from adaptive_sparse.gating.packing import SelectionPacker
from adaptive_sparse.gating.sampler import SelectingBatchSampler, plan_epoch

N = 16
FIRST_EPOCH = torch.where(torch.arange(N) < 8, 1.0, 3.0)  # mean 2: samples 0-7 are well learned
WEIGHT = torch.where(torch.arange(N) < 8, 2.0, 1.0)  # kept well-learned: 1 / (1 - 0.5); the rest 1
LOOK = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])  # four well-learned samples, four not


def infobatch_update(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference: InfoBatch.update's lines on the loss (NUS-HPC-AI-Lab/InfoBatch,
    infobatch/infobatch.py, commit 8bbb012), `weights` being its `self.weights[self.cur_batch_index]`.
    Its distributed gather and score bookkeeping in between leave the returned loss alone."""
    values = values.clone()
    values.mul_(weights)
    return values.mean()


def second_epoch_gate(seed: int = 0) -> InfoBatchGate:
    gate = InfoBatchGate(N, epochs=4, prune_ratio=0.5, seed=seed)
    gate.observe(torch.arange(N), FIRST_EPOCH)
    gate.start_epoch(2)
    return gate


def test_by_hand_one_look_every_route_returns_infobatchs_loss():
    """Seed 0 keeps one of the four well-learned samples (1) and the other four: losses 1 (weight
    2) and 3 (weight 1). InfoBatch: (2 * 1 + 4 * 3) / 5 = 2.8. Before, the sampler and packing
    returned 14 / (2 + 4) = 2.33 and the unpacked step 14 / 8 = 1.75."""
    selection = second_epoch_gate().select(LOOK, None)
    kept = LOOK[selection.index]
    assert kept.tolist() == [1, 8, 9, 10, 11]
    losses = torch.where(kept < 8, 1.0, 3.0)
    assert infobatch_update(losses, WEIGHT[kept]).item() == pytest.approx(2.8)
    assert gated_loss(losses, selection).item() == pytest.approx(2.8)  # selected after loading
    for pack in (True, False):  # one look of 8: the same draw
        sampler = SelectingBatchSampler(second_epoch_gate(), 8, shuffle=False, pack=pack, indices=LOOK)
        sampler.set_epoch(2)
        assert list(sampler) == [[1, 8, 9, 10, 11]]
        assert sampler.update(losses).item() == pytest.approx(2.8)


@pytest.mark.parametrize("pack, steps", [(True, None), (False, None), (True, 5)])
def test_the_sampler_returns_infobatchs_loss_for_every_batch_of_an_epoch(pack, steps):
    """Packed, unpacked, and dealt into a fixed number of steps (the Hugging Face Trainer's way):
    each batch's loss is mean(w * loss) over its own samples."""
    losses = torch.linspace(0.5, 2.0, N)  # this epoch's: a different loss per sample
    sampler = SelectingBatchSampler(second_epoch_gate(), 4, seed=3, pack=pack, steps=steps)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert 0 < sum(map(len, batches)) < N  # something pruned
    for batch in batches:
        idx = torch.tensor(batch)
        torch.testing.assert_close(sampler.update(losses[idx]), infobatch_update(losses[idx], WEIGHT[idx]))


def step_taken(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               weights: torch.Tensor | None) -> list[torch.Tensor]:
    """The change train_on_subset makes with SGD at lr 1: the gradient of the loss it minimised."""
    pytest.importorskip("hydra")  # train.py's step belongs to the app
    from adaptive_sparse.training.step import train_on_subset

    trained = copy.deepcopy(model)
    train_on_subset(trained, torch.optim.SGD(trained.parameters(), lr=1.0), inputs, targets, weights=weights)
    return [before - after for before, after in zip(model.parameters(), trained.parameters())]


@pytest.mark.parametrize("served", [False, True])  # selected after loading, or before (train.py's auto)
@pytest.mark.parametrize("pack", [False, True])
def test_train_on_subset_minimises_infobatchs_loss_packed_and_unpacked(pack, served):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    inputs, targets = torch.randn(N, 5), torch.randint(0, 3, (N,))
    gate = second_epoch_gate()
    looks = plan_epoch(gate, list(torch.arange(N).split(8)))  # the selections, in loader batches of 8
    packer = SelectionPacker(batch_size=4, enabled=pack)
    steps = []
    for look in looks:
        idx = look.chosen if served else look.looked_at  # served: the batch holds the chosen alone
        selection = look.served_selection(torch.device("cpu")) if served else look.selection
        packer.add(inputs[idx], targets[idx], idx, selection)
        steps += list(packer.ready())
    steps += list(packer.drain())
    assert all(len(step) <= 4 for step in steps) if pack else len(steps) == len(looks)
    for step in steps:
        per_sample = F.cross_entropy(model(step.inputs), step.targets, reduction="none")
        expected = torch.autograd.grad(infobatch_update(per_sample, WEIGHT[step.idx]), list(model.parameters()))
        for got, want in zip(step_taken(model, step.inputs, step.targets, step.weight), expected):
            torch.testing.assert_close(got, want)


def test_epochs_is_required_so_a_gate_cannot_silently_never_prune():
    """Without the run's length, int(0.875 * 1) = 0: every epoch would anneal, training everything."""
    with pytest.raises(TypeError, match="required keyword-only argument: 'epochs'"):
        InfoBatchGate(N)
    with pytest.raises(ValueError, match="InfoBatchGate: epochs=0 is not allowed"):
        InfoBatchGate(N, epochs=0)
