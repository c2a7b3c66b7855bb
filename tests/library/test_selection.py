"""Selection rules that the issue on beating random asks for: sundew's percentile rule with
inverse-probability weights (an unbiased gradient), annealing, and the two reference gates
written from their papers (InfoBatch, Selective-Backprop)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_sparse.gating.gates import (
    InfoBatchGate,
    SelectiveBackpropGate,
    SundewGate,
    gated_loss,
    pruning_epoch_rate,
)
from adaptive_sparse.gating.significance import BatchScores, ScoreHistory

BATCH = 64


def flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def percentile_gate(unbiased: bool, **kw) -> SundewGate:
    return SundewGate(target_rate=0.25, num_samples=BATCH, weights={"loss": 1.0}, selection="percentile",
                      unbiased=unbiased, exploration=0.2, min_selected=0, seed=0, **kw)


@pytest.mark.slow  # many sampled subsets per case: the full suite's
@pytest.mark.parametrize("unbiased", [True, False])
def test_inverse_probability_weights_make_the_subset_gradient_unbiased(unbiased):
    """Averaged over many draws, the weighted subset gradient is the full batch's gradient;
    without the weights the gradient leans towards the high-loss samples the gate prefers,
    and the same comparison fails (so the check can tell the two apart)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x, y = torch.randn(BATCH, 8), torch.randint(0, 4, (BATCH,))
    full = flat_grad(model, F.cross_entropy(model(x), y))
    with torch.no_grad():
        scores = BatchScores.from_logits(model(x), y)
    per_sample = torch.stack([flat_grad(model, F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]))
                              for i in range(BATCH)])  # [B, P]: the gradient is linear in the weights
    gate, draws = percentile_gate(unbiased), 4000
    total = torch.zeros_like(full)
    for _ in range(draws):
        chosen = gate.select(torch.arange(BATCH), scores)
        if len(chosen.index):
            w = chosen.weight if unbiased else torch.full((len(chosen.index),), 1.0 / len(chosen.index))
            total += (w.unsqueeze(1) * per_sample[chosen.index]).sum(0)
    error = ((total / draws - full).norm() / full.norm()).item()
    assert (error < 0.05) if unbiased else (error > 0.2), error


def test_weighted_loss_is_the_mean_without_weights_and_the_weighted_sum_with_them():
    losses = torch.tensor([1.0, 2.0, 6.0])
    assert gated_loss(losses, None).item() == pytest.approx(3.0)
    assert gated_loss(losses, torch.tensor([0.5, 0.25, 0.0])).item() == pytest.approx(1.0)


def test_score_history_percentiles_by_hand():
    history = ScoreHistory(size=4)
    assert history.percentile(torch.tensor([7.0])).item() == 0.5  # empty: the middle
    history.add(torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0]))  # holds the last 4: 1, 2, 3, 4
    got = history.percentile(torch.tensor([0.0, 2.0, 2.5, 5.0]))
    # 2.0: one below, one tie (counts half) -> 1.5 / 4; 2.5: two below -> 2 / 4
    assert got.tolist() == pytest.approx([0.0, 0.375, 0.5, 1.0])


@pytest.mark.parametrize("scoring", ["forward", "memory"])
@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
def test_percentile_rule_tracks_its_target(target, scoring):
    n, epochs = BATCH * 100, 3
    gate = SundewGate(target_rate=target, num_samples=n, weights={"loss": 1.0}, scoring=scoring, seed=0)
    g = torch.Generator().manual_seed(1)  # not the gate's seed
    hardness = torch.rand(n, generator=g).exp()  # a fixed, skewed loss per sample
    for epoch in range(1, epochs + 1):
        gate.start_epoch(epoch)
        trained = 0
        for idx in torch.randperm(n, generator=g).split(BATCH):
            scores = BatchScores(hardness[idx], torch.zeros(len(idx))) if gate.needs_scores else None
            chosen = gate.select(idx, scores).index
            gate.observe(idx[chosen], BatchScores(hardness[idx[chosen]], torch.zeros(len(chosen))))
            trained += len(chosen)
        if epoch > 1 or scoring == "forward":  # memory, epoch 1: every sample unseen, the controller catches up
            assert abs(trained / n - target) < 0.1 * target, (epoch, trained / n)


def test_percentile_rule_keeps_high_loss_samples_more_often_but_never_excludes_any():
    gate = percentile_gate(unbiased=True)
    loss = torch.linspace(0.1, 3.0, BATCH)
    scores = BatchScores(loss, torch.zeros(BATCH))
    counts = torch.zeros(BATCH)
    for _ in range(2000):
        counts[gate.select(torch.arange(BATCH), scores).index] += 1
    # p = budget * (0.8 * 2 * pct + 0.2): the top sample ~9x as likely as the bottom one
    assert counts[-8:].sum() > 4 * counts[:8].sum()
    assert counts.min() > 0  # the exploration share reaches every sample


def test_pruning_epoch_rate_by_hand():
    # 6 epochs at 0.25 spend 1.5 epochs of samples; a full last epoch leaves 0.5 for the other 5
    assert pruning_epoch_rate(0.25, 6, 1) == pytest.approx(0.1)
    assert pruning_epoch_rate(0.25, 6, 0) == 0.25
    with pytest.raises(ValueError, match="anneal_epochs=2 of epochs=6"):
        pruning_epoch_rate(0.25, 6, 2)  # two full epochs already exceed 1.5


def test_sundew_annealing_trains_everything_in_the_last_epochs_without_scoring():
    gate = SundewGate(target_rate=0.75, num_samples=BATCH, anneal_epochs=2, epochs=4)
    assert gate.controller.target == pytest.approx(0.5)  # (0.75 * 4 - 2) / (4 - 2)
    phases = []
    for epoch in range(1, 5):
        gate.start_epoch(epoch)
        phases.append((gate.needs_scores, gate.annealing))
    assert phases == [(True, False), (True, False), (False, True), (False, True)]
    assert gate.select(torch.arange(BATCH), None).index.tolist() == list(range(BATCH))


def infobatch_after_one_epoch(loss: torch.Tensor, **kw) -> InfoBatchGate:
    gate = InfoBatchGate(num_samples=len(loss), seed=0, **kw)
    gate.observe(torch.arange(len(loss)), BatchScores(loss, torch.zeros(len(loss))))
    return gate


def test_infobatch_prunes_only_below_the_mean_and_rescales_what_it_keeps():
    loss = torch.cat([torch.full((48,), 0.5), torch.full((16,), 2.5)])  # mean 1.0: 48 below
    gate = infobatch_after_one_epoch(loss, prune_ratio=0.5, epochs=10)
    gate.start_epoch(2)
    assert gate.mean_loss == pytest.approx(1.0)
    kept_low = 0
    for _ in range(500):
        chosen = gate.select(torch.arange(BATCH), None)
        index = chosen.index
        assert set(range(48, 64)) <= set(index.tolist())  # above the mean: always trained
        low = index < 48
        kept_low += int(low.sum())
        # kept below-mean losses count 1 / (1 - 0.5) = 2, the others 1, over the kept count:
        # InfoBatch's mean(w * loss) over the step's samples
        assert chosen.form == "mean" and torch.equal(chosen.weight, torch.where(low, 2.0, 1.0) / len(index))
    assert kept_low / (500 * 48) == pytest.approx(0.5, abs=0.02)  # std 0.0032


def test_infobatch_never_prunes_unseen_samples_and_anneals_at_the_end():
    loss = torch.tensor([0.1, 0.2, 5.0, float("nan")])  # sample 3 never seen
    gate = InfoBatchGate(num_samples=4, prune_ratio=0.9, epochs=8, seed=0)
    gate.observe(torch.arange(3), BatchScores(loss[:3], torch.zeros(3)))
    gate.start_epoch(2)
    for _ in range(50):
        assert {2, 3} <= set(gate.select(torch.arange(4), None).index.tolist())
    annealing = []
    for epoch in range(1, 9):  # the paper's delta 0.875 of 8 epochs: epoch 8 is full data
        gate.start_epoch(epoch)
        annealing.append(gate.annealing)
    assert annealing == [False] * 7 + [True]
    chosen = gate.select(torch.arange(4), None)
    assert chosen.index.tolist() == [0, 1, 2, 3] and chosen.weight is None


@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
def test_selective_backprop_keeps_its_rate_and_favours_the_biggest_losers(target):
    gate = SelectiveBackpropGate(64, target_rate=target, seed=0)
    assert gate.beta == pytest.approx(1 / target - 1)
    g = torch.Generator().manual_seed(1)  # not the gate's seed: its draws would equal the losses' draws
    trained, top, bottom = 0, 0, 0
    for _ in range(1000):
        loss = torch.rand(BATCH, generator=g).exp()
        index = gate.select(torch.arange(BATCH), BatchScores(loss, torch.zeros(BATCH))).index
        trained += len(index)
        order = loss.argsort()
        top += int(torch.isin(order[-16:], index).sum())
        bottom += int(torch.isin(order[:16], index).sum())
    assert trained / (1000 * BATCH) == pytest.approx(target, rel=0.05)
    assert top > 3 * bottom
