"""Sundew's parts on their own: scoring sources and selection rules, with numbers by hand."""
import math

import pytest
import torch

from adaptive_sparse.gating.rules import PercentileRule, PriorityRule, ThresholdRule, probabilities_with_mean
from adaptive_sparse.gating.significance import (
    BatchScores,
    FreshScoring,
    MemoryScoring,
    SampleMemory,
    SignificanceModel,
)

LOSS_ONLY = SignificanceModel({"loss": 1.0}, num_outputs=10)


def test_memory_scoring_remembers_training_losses_and_refreshes_on_schedule():
    source = MemoryScoring(LOSS_ONLY, SampleMemory(4), refresh_every_epochs=2)
    source.start_epoch(1)
    assert not source.needs_scores
    assert source.significance(torch.tensor([0, 1]), None).isnan().all()  # never seen
    source.observe(torch.tensor([1]), BatchScores(torch.tensor([math.log(10)]), torch.zeros(1)))
    assert source.significance(torch.tensor([0, 1]), None)[1].item() == pytest.approx(1.0)  # loss / log(C)
    assert [(source.start_epoch(e), source.needs_scores)[1] for e in (2, 3, 4, 5)] == [False, True, False, True]


def test_fresh_scoring_uses_the_batch_and_records_it():
    source = FreshScoring(LOSS_ONLY, SampleMemory(3))
    scores = BatchScores(torch.tensor([0.0, math.log(10) / 2]), torch.zeros(2))
    assert source.needs_scores
    assert source.significance(torch.tensor([2, 0]), scores).tolist() == pytest.approx([0.0, 0.5])
    assert source.memory.last_loss[[2, 0]].tolist() == pytest.approx([0.0, math.log(10) / 2])


def test_priority_rule_fills_its_budget_with_unseen_then_most_significant():
    rule = PriorityRule(rate=0.5, exploration=0.0, min_selected=0)
    keep, prob = rule.keep(torch.tensor([float("nan"), 0.1, 0.9, 0.5]), torch.Generator().manual_seed(0))
    assert keep.tolist() == [True, False, True, False] and prob is None  # budget 0.5 * 4 = 2


def test_top_selection_keeps_the_highest_loss_half_of_every_batch():
    from adaptive_sparse.gating.gates import SundewGate

    gate = SundewGate(target_rate=0.5, num_samples=8, selection="top", exploration=0.0,
                      weights={"loss": 1.0})
    assert isinstance(gate.rule, PriorityRule)
    scores = BatchScores(torch.tensor([0.3, 2.0, 0.1, 1.5, 0.2, 0.9]), torch.zeros(6))
    chosen = gate.select(torch.arange(6), scores).index
    assert sorted(chosen.tolist()) == [1, 3, 5]  # losses 2.0, 1.5, 0.9: exactly 0.5 * 6 of them


def test_percentile_rule_keeps_its_budget_in_expectation():
    rule, g = PercentileRule(rate=0.25, exploration=0.2, min_selected=0), torch.Generator().manual_seed(0)
    kept = sum(int(rule.keep(torch.rand(64, generator=g), g)[0].sum()) for _ in range(400))
    assert abs(kept / (400 * 64) - 0.25) < 0.01


def test_water_filling_by_hand():
    # weights 1, 1, 6 with mean 0.5: uncapped c = 1.5 / 8 gives 0.1875, 0.1875, 1.125 -> cap the
    # last at 1, the other two share 0.5 -> 0.25 each
    assert probabilities_with_mean(torch.tensor([1.0, 1.0, 6.0]), 0.5).tolist() == pytest.approx([0.25, 0.25, 1.0])


def test_threshold_rule_starts_at_the_normal_quantile_of_its_rate():
    hard = ThresholdRule(rate=0.1587, temperature=0.0)  # P(z > 1) for a standard normal
    assert hard.controller.threshold == pytest.approx(1.0, abs=1e-3)


def test_controller_gains_act_on_the_threshold_rule_and_are_refused_elsewhere():
    from adaptive_sparse.gating.gates import SundewGate

    gate = SundewGate(8, selection="threshold", controller={"kp": 4.0, "ki": None})
    assert (gate.controller.kp, gate.controller.ki) == (4.0, 0.5)  # null: the rule's default
    assert (SundewGate(8, selection="threshold").controller.kp, SundewGate(8).controller.kp) == (2.0, 0.0)
    with pytest.raises(ValueError, match="controller kp and ki act only with selection='threshold'"):
        SundewGate(8, selection="percentile", controller={"kp": 4.0})
    with pytest.raises(ValueError, match="scoring='memory'"):
        SundewGate(8, selection="threshold", scoring="memory", controller={"ki": 1.0})
