"""The gated step trains exactly the selected rows; FLOP counts match arithmetic by hand."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.gating.gates import Gate, Selection
from adaptive_sparse.gating.scorers import score_batch
from adaptive_sparse.models.cnn import SimpleCNN
from adaptive_sparse.training.metering import FlopMeter, Tally, class_example
from adaptive_sparse.training.step import train_on_subset


class FixedGate(Gate):
    """Selects the same batch positions every time (for exact comparisons)."""
    needs_scores = True

    def __init__(self, positions):
        super().__init__(8, target_rate=0.5)
        self.positions = torch.tensor(positions)

    def select(self, idx, scores):
        return Selection(self.positions)


def test_gated_step_equals_a_plain_step_on_the_subset():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    gated_model = SimpleCNN()
    plain_model = copy.deepcopy(gated_model)
    gated_opt = torch.optim.Adam(gated_model.parameters(), lr=1e-3)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    gate = FixedGate([1, 4, 6])

    torch.manual_seed(1)  # same dropout masks in both steps
    scores = score_batch(gated_model, images, labels)
    chosen = gate.select(torch.arange(8), scores).index
    train_on_subset(gated_model, gated_opt, images[chosen], labels[chosen])

    torch.manual_seed(1)
    plain_opt.zero_grad()
    F.cross_entropy(plain_model(images[[1, 4, 6]]), labels[[1, 4, 6]]).backward()
    plain_opt.step()

    for gated, plain in zip(gated_model.parameters(), plain_model.parameters()):
        assert torch.equal(gated, plain)


def test_weighted_step_follows_the_gates_weights():
    """With Selection.weight the step minimises sum(weight * loss): weights [0.5, 0.25, 0]
    on three rows give the gradient of 0.5 * loss_0 + 0.25 * loss_1, and row 2 none."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x, y = torch.randn(3, 6), torch.randint(0, 3, (3,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = copy.deepcopy(model)
    train_on_subset(model, optimizer, x, y, weights=torch.tensor([0.5, 0.25, 0.0]))
    per_row = F.cross_entropy(before(x), y, reduction="none")
    expected = torch.autograd.grad(0.5 * per_row[0] + 0.25 * per_row[1], list(before.parameters()))
    for new, old, grad in zip(model.parameters(), before.parameters(), expected):
        assert torch.allclose(old - new, grad, atol=1e-6)  # SGD with lr 1: the step is the gradient


def test_scoring_builds_no_graph_and_changes_nothing():
    model = SimpleCNN()
    before = [p.clone() for p in model.parameters()]
    scores = score_batch(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert scores.loss.shape == (4,) and not scores.loss.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.training  # restored after the eval-mode scoring pass


def test_flop_meter_counts_a_two_layer_mlp_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    meter = FlopMeter(model, class_example((4,)))
    # forward: 2*4*3 + 2*3*2 = 36 per sample
    assert meter.forward_per_sample == 36
    # backward: layer 2 grad-input 2*3*2 and grad-weight 2*3*2; layer 1 grad-weight 2*4*3 only
    # (its input needs no grad) -> 12 + 12 + 24 = 48; train step = 36 + 48 = 84
    assert meter.train_per_sample == 84


def test_compute_savings_of_a_tally_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    meter = FlopMeter(model, class_example((4,)))
    tally = Tally()
    for trained in (6, 10):
        tally.add_batch(seen=64, scored=64, scoring_flops=64 * meter.forward_per_sample)
        tally.add_step(torch.ones(trained))
    flops = tally.flops(meter)
    assert tally.optimizer_steps == 2 and tally.trained == 16
    # executed = 128 scored * 36 + 16 trained * 84 = 4608 + 1344 = 5952; full = 128 * 84 = 10752
    assert flops["flops_executed"] == 5952 and flops["flops_full"] == 10752
    assert flops["compute_savings"] == pytest.approx(1 - 5952 / 10752)


def test_a_summed_loss_over_the_full_batch_takes_half_the_means_step_on_half_a_batch():
    """summed_over=4 on 2 selected rows: the objective is (loss_0 + loss_1) / 4, half their mean,
    so SGD at lr 1 moves every parameter by exactly half the mean's step (airbench's summed loss)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 6), torch.randint(0, 3, (2,))
    summed, mean = nn.Linear(6, 3), nn.Linear(6, 3)
    mean.load_state_dict(summed.state_dict())
    before = copy.deepcopy(summed)
    train_on_subset(summed, torch.optim.SGD(summed.parameters(), lr=1.0), x, y, summed_over=4)
    train_on_subset(mean, torch.optim.SGD(mean.parameters(), lr=1.0), x, y)
    per_row = F.cross_entropy(before(x), y, reduction="none")
    expected = torch.autograd.grad((per_row[0] + per_row[1]) / 4, list(before.parameters()))
    for new, old, grad, meaned in zip(summed.parameters(), before.parameters(), expected, mean.parameters()):
        assert torch.allclose(old - new, grad, atol=1e-6)
        assert torch.allclose(old - new, (old - meaned) / 2, atol=1e-6)
