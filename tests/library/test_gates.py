"""Gates hit their targets; sundew's PI controller tracks targets on drifting score streams."""
import math

import pytest
import torch

from adaptive_sparse.gating.gates import NoGate, RandomGate, SundewGate
from adaptive_sparse.gating.rules import PIController, normal_threshold
from adaptive_sparse.gating.significance import BatchScores, SampleMemory, SignificanceModel

BATCH = 64


def drifting_scores(step: int, steps: int, g: torch.Generator) -> BatchScores:
    """Skewed (log-normal) losses whose location falls and spread widens over the stream."""
    loc, scale = 1.0 - 2.0 * step / steps, 0.5 + 0.5 * step / steps
    loss = torch.exp(loc + scale * torch.randn(BATCH, generator=g))
    return BatchScores(loss=loss, entropy=torch.rand(BATCH, generator=g))


def test_none_selects_every_sample():
    gate = NoGate(8)
    assert gate.select(torch.arange(10, 20), None).index.tolist() == list(range(10))


@pytest.mark.parametrize("rate", [0.06, 0.25, 0.5])
def test_random_gate_hits_its_target(rate):
    gate = RandomGate(target_rate=rate, num_samples=BATCH * 2000, seed=1)
    chosen = [gate.select(torch.arange(BATCH), None).index for _ in range(2000)]
    achieved = sum(len(c) for c in chosen) / (2000 * BATCH)
    # stochastic rounding of rate*64: per-batch std <= 0.5/64, so 2000 batches give std < 1.2e-4
    assert abs(achieved - rate) < 1e-3
    assert all(len(c.unique()) == len(c) for c in chosen)  # a subset, no repeats


@pytest.mark.parametrize("temperature", [0.0, 1.0])  # hard and soft gating
@pytest.mark.parametrize("target", [0.02, 0.06, 0.1, 0.25, 0.5])
def test_sundew_tracks_target_on_drifting_scores(target, temperature):
    steps = 2000
    gate = SundewGate(target_rate=target, num_samples=BATCH * steps, temperature=temperature,
                      selection="threshold", controller={"kp": 2.0, "ki": 0.5, "ema": 0.1}, seed=0)
    g = torch.Generator().manual_seed(0)
    rates = []
    for step in range(steps):
        idx = torch.arange(step * BATCH, (step + 1) * BATCH)
        rates.append(len(gate.select(idx, drifting_scores(step, steps, g)).index) / BATCH)
    # after a 200-batch settling phase: every 300-batch window within 15% of the target (the
    # per-epoch bar of the acceptance runs) and the whole stream within 5%. At 0.02 the
    # one-sample floor fires in about a quarter of the batches, which the controller offsets.
    for start in range(200, steps, 300):
        window = rates[start:start + 300]
        assert abs(sum(window) / len(window) - target) < 0.15 * target, (start, sum(window) / len(window))
    settled = rates[200:]
    assert abs(sum(settled) / len(settled) - target) < 0.05 * target


def test_sundew_prefers_high_loss_samples():
    gate = SundewGate(target_rate=0.25, num_samples=BATCH * 50, weights={"loss": 1.0}, temperature=0.0,
                      selection="threshold", seed=0)
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        loss = torch.rand(BATCH, generator=g) * 3
        chosen = gate.select(torch.arange(step * BATCH, (step + 1) * BATCH),
                             BatchScores(loss, torch.zeros(BATCH))).index
    skipped = torch.ones(BATCH, dtype=torch.bool)
    skipped[chosen] = False
    assert loss[chosen].min() > loss[skipped].max()  # a hard threshold on the score


def test_sundew_floor_trains_the_top_sample_when_nothing_passes():
    gate = SundewGate(target_rate=0.06, num_samples=BATCH, min_selected=1, selection="threshold",
                      controller={"min_threshold": 6.0, "max_threshold": 6.0})
    loss = torch.linspace(0, 1, BATCH)
    chosen = gate.select(torch.arange(BATCH), BatchScores(loss, torch.zeros(BATCH))).index
    assert chosen.tolist() == [BATCH - 1]


@pytest.mark.parametrize("rate", [0.02, 0.06, 0.25, 0.5])
def test_soft_feed_forward_threshold_keeps_the_rate_of_normal_scores(rate):
    n = 400_000
    z = torch.randn(n, generator=torch.Generator().manual_seed(0))
    tolerance = 5 * math.sqrt(rate * (1 - rate) / n)  # 5 binomial standard deviations
    kept = torch.sigmoid(z - normal_threshold(rate, 1.0)).mean().item()
    assert kept == pytest.approx(rate, abs=tolerance)
    assert (z > normal_threshold(rate, 0.0)).float().mean().item() == pytest.approx(rate, abs=tolerance)


def test_pi_controller_anti_windup_stops_integrating_at_the_bound():
    controller = PIController(target=0.1, kp=1.0, ki=1.0, ema=1.0, max_threshold=0.5)
    for _ in range(100):
        controller.update(1.0)  # far too many selected: wants a higher threshold than allowed
    assert controller.threshold == 0.5
    assert controller.integral == pytest.approx(0.0)  # every step would have saturated: no windup
    controller.update(0.1)
    assert controller.threshold < 0.5  # recovers at once when the error falls


def test_significance_components_by_hand():
    model = SignificanceModel({"loss": 1.0, "entropy": 0.5, "learning_value": 0.5, "novelty": 1.0},
                              num_outputs=10)
    memory = SampleMemory(4)
    memory.record(torch.tensor([1]), BatchScores(torch.tensor([1.0]), torch.tensor([0.3])))
    memory.record_trained(torch.tensor([1]))
    scores = BatchScores(loss=torch.tensor([2.0, 3.0]), entropy=torch.tensor([1.0, 0.0]))
    idx = torch.tensor([0, 1])
    parts = model.components(scores.loss, scores.entropy, memory.last_loss[idx], memory.times_trained[idx])
    log10 = math.log(10)
    assert parts["loss"].tolist() == pytest.approx([2 / log10, 3 / log10])
    assert parts["learning_value"].tolist() == pytest.approx([0.0, 2 / log10])  # unseen -> 0
    assert parts["novelty"].tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    total = model.fresh(idx, scores, memory)
    assert total[0].item() == pytest.approx(2 / log10 + 0.5 / log10 + 1.0)
    # from memory alone: sample 1's last visit (loss 1.0, entropy 0.3), sample 0 never seen
    remembered = model.remembered(idx, memory)
    assert remembered[0].isnan()
    assert remembered[1].item() == pytest.approx(1 / log10 + 0.15 / log10 + 1 / math.sqrt(2))


def memory_gate(target: float, n: int, exploration: float = 0.1, selection: str = "threshold",
                **kw) -> SundewGate:
    return SundewGate(target_rate=target, num_samples=n, scoring="memory", exploration=exploration,
                      selection=selection, weights={"loss": 1.0}, seed=0, **kw)


@pytest.mark.parametrize("selection", ["threshold", "percentile"])
@pytest.mark.parametrize("target", [0.06, 0.25])
def test_memory_scoring_needs_no_scores_and_tracks_its_target(target, selection):
    n, epochs = BATCH * 100, 3
    gate = memory_gate(target, n, selection=selection)
    g = torch.Generator().manual_seed(0)
    hardness = torch.rand(n, generator=g)  # a fixed loss per sample
    for epoch in range(1, epochs + 1):
        gate.start_epoch(epoch)
        assert not gate.needs_scores
        trained = 0
        for idx in torch.randperm(n, generator=g).split(BATCH):
            chosen = gate.select(idx, None).index
            gate.observe(idx[chosen], BatchScores(hardness[idx[chosen]], torch.zeros(len(chosen))))
            trained += len(chosen)
        assert abs(trained / n - target) < 0.1 * target, (epoch, trained / n)


def test_memory_scoring_trains_unseen_first_then_the_hardest():
    n = BATCH * 4
    gate = memory_gate(0.25, n, exploration=0.0)
    loss = torch.arange(n, dtype=torch.float)  # sample i has loss i
    gate.memory.record(torch.arange(n // 2), BatchScores(loss[: n // 2], torch.zeros(n // 2)))
    idx = torch.cat([torch.arange(8), torch.arange(n // 2, n // 2 + 8)])  # 8 seen, 8 unseen
    chosen = idx[gate.select(idx, None).index]
    assert set(chosen.tolist()) <= set(range(n // 2, n // 2 + 8))  # budget 4 of 16: unseen only
    idx = torch.arange(16)  # all seen, losses 0..15: the budget of 4 goes to the highest
    assert sorted(idx[gate.select(idx, None).index].tolist()) == [12, 13, 14, 15]


def test_exploration_floor_trains_the_least_significant_sample_at_its_stated_rate():
    """A sample whose remembered score is the lowest in every batch is trained only through
    the exploration share: with probability exploration * target_rate per epoch (here
    0.5 * 0.25 = 0.125), so over E epochs P(never trained) = (1 - 0.125)^E."""
    n, epochs = BATCH * 8, 400
    gate = memory_gate(0.25, n, exploration=0.5)
    loss = torch.linspace(1.0, 2.0, n)
    loss[0] = 0.0  # sample 0: always the least significant
    gate.memory.record(torch.arange(n), BatchScores(loss, torch.zeros(n)))
    g = torch.Generator().manual_seed(1)
    hits = 0
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(BATCH):
            hits += int(0 in idx[gate.select(idx, None).index].tolist())
    # binomial(400, 0.125): mean 50, std 6.6
    assert abs(hits / epochs - 0.125) < 4 * math.sqrt(0.125 * 0.875 / epochs)


def test_refresh_epoch_scores_every_sample():
    gate = memory_gate(0.1, BATCH, refresh_every_epochs=2)
    gate.observe(torch.arange(4), torch.ones(4))  # losses handed back: no warning at epoch 2
    flags = []
    for epoch in range(1, 6):
        gate.start_epoch(epoch)
        flags.append(gate.needs_scores)
    assert flags == [False, False, True, False, True]


def test_none_trains_every_sample_and_takes_no_target_rate():
    gate = NoGate(64)
    assert gate.target_rate == 1.0
    assert len(gate.select(torch.arange(64), None).index) == 64
    with pytest.raises(TypeError, match="target_rate"):
        NoGate(64, target_rate=0.25)  # a sweep sets `budget`, which full training ignores


def test_sample_memory_merges_two_ranks_epoch_by_hand():
    """Two ranks, four samples: rank 0 visited sample 0 this epoch, rank 1 sample 2 (twice).
    After the merge both hold both visits, and trained counts add up."""
    from adaptive_sparse.gating.significance import BatchScores, SampleMemory

    ranks = [SampleMemory(4), SampleMemory(4)]
    for memory in ranks:
        memory.record(torch.tensor([1]), BatchScores(torch.tensor([0.5]), torch.tensor([0.1])))
        memory.record_trained(torch.tensor([1]))
    starts = [memory.snapshot() for memory in ranks]
    ranks[0].record(torch.tensor([0]), BatchScores(torch.tensor([2.0]), torch.tensor([0.3])))
    ranks[0].record_trained(torch.tensor([0]))
    ranks[1].record(torch.tensor([2]), BatchScores(torch.tensor([1.5]), torch.tensor([0.2])))
    ranks[1].record_trained(torch.tensor([2]))
    ranks[1].record_trained(torch.tensor([2]))  # twice this epoch
    # two threads stand for two ranks; the fake all-reduce sums the pair of tensors in place
    import threading
    slots, barrier = [None, None], threading.Barrier(2)

    def all_reduce_of(rank):
        def all_reduce(tensor):
            slots[rank] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both sums made before either rank overwrites its tensor
            tensor.copy_(total)
        return all_reduce

    threads = [threading.Thread(target=m.merge_ranks, args=(s, all_reduce_of(r)))
               for r, (m, s) in enumerate(zip(ranks, starts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for memory in ranks:
        assert memory.last_loss[:3].tolist() == [2.0, 0.5, 1.5] and memory.last_loss[3].isnan()
        assert memory.times_trained.tolist() == [1, 1, 2, 0]
        assert memory.last_entropy.tolist() == pytest.approx([0.3, 0.1, 0.2, 0.0])
