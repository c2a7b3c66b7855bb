"""Selection before loading (adaptive_sparse/gating/sampler.py): the same decisions as selecting after
loading, only the selected samples loaded, in any DataLoader, across ranks, through a resume."""
from __future__ import annotations

import pytest
import torch
from conftest import read_run, run_train, two_ranks_spawn
from torch.utils.data import DataLoader, Dataset

from adaptive_sparse.gating.gates import (
    InfoBatchGate,
    RandomGate,
    Selection,
    SelectiveBackpropGate,
    SundewGate,
    gated_loss,
)
from adaptive_sparse.gating.sampler import EpochOrder, Look, SelectingBatchSampler
from adaptive_sparse.gating.significance import BatchScores


def fake_losses(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """A loss per sample that differs by sample and falls with the epoch (deterministic)."""
    return ((idx * 37) % 11).float() / 4 + 3.0 / epoch


def make_gate(kind: str, n: int):
    if kind == "random":
        return RandomGate(n, 0.3, seed=3)
    if kind == "infobatch":
        return InfoBatchGate(prune_ratio=0.5, anneal_after=1.0, num_samples=n, seed=3, epochs=3)
    return SundewGate(n, 0.3, scoring="memory", seed=3, selection=kind)


@pytest.mark.parametrize("kind", ["random", "percentile", "top", "infobatch"])
def test_planning_the_epoch_first_makes_the_decisions_selecting_after_loading_makes(kind):
    """After loading, the gate selects batch by batch with the previous batches' losses already
    handed back; before loading, it decides the whole epoch first. Same choices, 3 epochs."""
    n, batch = 200, 16
    after, before = make_gate(kind, n), make_gate(kind, n)
    order_after = EpochOrder(torch.arange(n), batch, seed=5)
    sampler = SelectingBatchSampler(before, batch, seed=5, pack=False)
    for epoch in (1, 2, 3):
        after.start_epoch(epoch)
        chosen_after = []
        for idx in order_after.index_batches():
            chosen = idx[after.select(idx, None).index]
            after.observe(chosen, BatchScores(fake_losses(chosen, epoch), torch.zeros(len(chosen))))
            chosen_after.append(chosen)
        chosen_before = []
        for batch_idx in sampler:
            chosen = torch.tensor(batch_idx)
            sampler.update(fake_losses(chosen, epoch))
            chosen_before.append(chosen)
        nonempty = [c for c in chosen_after if len(c)]
        assert [c.tolist() for c in chosen_before] == [c.tolist() for c in nonempty]
    assert 0 < sum(map(len, chosen_before)) < n


def test_packed_batches_are_full_and_in_selection_order():
    n, batch = 100, 8
    sampler = SelectingBatchSampler(RandomGate(n, 0.5, seed=0), batch, seed=1)
    reference = SelectingBatchSampler(RandomGate(n, 0.5, seed=0), batch, seed=1, pack=False)
    packed, looks = list(sampler), list(reference)
    flat = [i for b in looks for i in b]
    assert [i for b in packed for i in b] == flat  # the same samples, in the same order
    assert all(len(b) == batch for b in packed[:-1]) and 0 < len(packed[-1]) <= batch
    assert len(sampler) == len(packed) == -(-len(flat) // batch)
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch


def test_steps_deal_each_epoch_evenly_into_that_many_batches_of_the_same_selection():
    """100 samples at 0.5 in looks of 8: each epoch's selection (about 50) in exactly 7 batches
    whose sizes differ by at most one, the same indices in the same order as batches of 8."""
    even = SelectingBatchSampler(RandomGate(100, 0.5, seed=0), 8, seed=1, steps=7)
    plain = SelectingBatchSampler(RandomGate(100, 0.5, seed=0), 8, seed=1)
    assert len(even) == 7  # known before the epoch is planned
    for _ in range(3):
        batches, plain_batches = list(even), list(plain)
        sizes = [len(b) for b in batches]
        assert len(batches) == len(even) == 7 and max(sizes) - min(sizes) <= 1
        assert [i for b in batches for i in b] == [i for b in plain_batches for i in b]
        for b in batches:
            even.update(torch.ones(len(b)))
        for b in plain_batches:
            plain.update(torch.ones(len(b)))
    tiny = list(SelectingBatchSampler(RandomGate(10, 0.5, seed=0), 8, steps=20))  # fewer samples than steps
    assert tiny and all(len(b) == 1 for b in tiny)  # one each


def test_a_state_kept_in_memory_is_not_moved_by_later_epochs():
    sampler = SelectingBatchSampler(SundewGate(64, 0.5, scoring="memory", seed=0), 8, seed=0)
    for batch in sampler:
        sampler.update(torch.rand(len(batch)))
    state = sampler.state_dict()
    kept = {k: v.clone() for k, v in state["gate"]["memory"].items() if isinstance(v, torch.Tensor)}
    for batch in sampler:  # epoch 2 writes new losses into the gate's memory
        sampler.update(torch.rand(len(batch)) + 5)
    for key, before in kept.items():
        torch.testing.assert_close(state["gate"]["memory"][key], before, equal_nan=True, rtol=0, atol=0)
    assert kept


def test_update_returns_the_gate_weighted_loss_and_teaches_the_memory():
    """InfoBatch in its second epoch: a sample below the first epoch's mean loss that survives
    pruning counts 1 / (1 - 0.5) = 2 times; the rest count once."""
    n = 8
    gate = InfoBatchGate(prune_ratio=0.5, anneal_after=1.0, num_samples=n, epochs=2, seed=0)
    sampler = SelectingBatchSampler(gate, 8, shuffle=False)
    (first,) = list(sampler)
    assert first == list(range(8))  # epoch 1: nothing seen, nothing pruned
    losses = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])  # mean 2: samples 0-3 are well learned
    torch.testing.assert_close(sampler.update(losses), torch.tensor(2.0))
    torch.testing.assert_close(gate.memory.last_loss, losses)
    (second,) = list(sampler)
    kept_low = [i for i in second if i < 4]
    assert set(range(4, 8)) <= set(second) and len(kept_low) < 4
    # by hand: weights 2 for each kept low sample (loss 1), 1 for each high one (loss 3), and
    # InfoBatch's mean(w * loss) over the batch's samples (one kept low sample: 14 / 5 = 2.8)
    expected = (2 * 1.0 * len(kept_low) + 3.0 * 4) / (len(kept_low) + 4)
    torch.testing.assert_close(sampler.update(losses[second]), torch.tensor(expected))


def test_a_gate_that_needs_a_scoring_forward_is_refused_by_name():
    for gate in (SundewGate(10, 0.5), SundewGate(10, 0.5, scoring="memory", refresh_every_epochs=2),
                 SelectiveBackpropGate(10, 0.5)):
        with pytest.raises(ValueError, match="scoring forward"):
            SelectingBatchSampler(gate, 4)


def test_losses_of_the_wrong_shape_or_without_a_batch_are_refused():
    sampler = SelectingBatchSampler(RandomGate(8, 1.0), 4)
    with pytest.raises(RuntimeError, match="no batch is waiting"):
        sampler.update(torch.ones(4))
    iter(sampler).__next__()
    with pytest.raises(ValueError, match="one loss per sample"):
        sampler.update(torch.ones(4, 3))


class Counting(Dataset):
    """Returns its index as the sample; remembers nothing (workers have their own copies)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i % 3


def test_dataloader_with_workers_loads_only_the_selected_and_resumes_exactly():
    def run(sampler, epochs):
        loader = DataLoader(Counting(), batch_sampler=sampler, num_workers=2)
        served = []  # per epoch, its batches of sample indices
        for _ in range(epochs):
            served.append([])
            for x, y in loader:
                served[-1].append(x[:, 0].long().tolist())
                logits = torch.zeros(len(y), 3)
                sampler.update(torch.nn.functional.cross_entropy(logits, y, reduction="none") + x[:, 0] / 64,
                               logits)
        return served

    gate = lambda: SundewGate(64, 0.5, scoring="memory", seed=1)
    whole = SelectingBatchSampler(gate(), 8, seed=2)
    served = run(whole, 3)
    first = SelectingBatchSampler(gate(), 8, seed=2)
    served_first = run(first, 2)
    state = first.state_dict()
    resumed = SelectingBatchSampler(gate(), 8, seed=2)
    resumed.load_state_dict(state)
    assert served_first + run(resumed, 1) == served
    for epoch in served:
        flat = [i for batch in epoch for i in batch]
        assert all(len(batch) == 8 for batch in epoch[:-1]) and len(set(flat)) == len(flat)
        assert 24 <= len(flat) <= 40  # about half of the 64 samples loaded, each at most once


def _sampler_rank(rank: int, port: int, out: str, steps: int | None = None) -> None:
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gate = SundewGate(101, 0.5, scoring="memory", seed=7)  # same seed on every rank
    sampler = SelectingBatchSampler(gate, 8, seed=4, steps=steps)
    epochs = []
    for epoch in (1, 2):
        served = []
        for batch in sampler:
            idx = torch.tensor(batch)
            sampler.update(fake_losses(idx, epoch))
            served.append(batch)
        epochs.append(served)
    torch.save({"epochs": epochs, "memory": gate.memory.last_loss}, f"{out}/rank{rank}.pt")
    torch_dist.destroy_process_group()


def _sampler_rank_in_five_steps(rank: int, port: int, out: str) -> None:
    _sampler_rank(rank, port, out, steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [None, 5])
def test_two_ranks_yield_equal_batch_counts_of_disjoint_samples_with_one_memory(tmp_path, steps):
    ranks = two_ranks_spawn(_sampler_rank if steps is None else _sampler_rank_in_five_steps, tmp_path)
    for epoch in (0, 1):
        a, b = (r["epochs"][epoch] for r in ranks)
        assert len(a) == len(b) and all(len(x) for x in a + b)  # collectives line up, no empty batch
        assert steps is None or len(a) == steps
        flat_a, flat_b = [i for x in a for i in x], [i for x in b for i in x]
        assert not set(flat_a) & set(flat_b) and len(set(flat_a)) == len(flat_a)
        share = (len(flat_a) + len(flat_b)) / 100  # 101 samples: one dropped so both ranks see 50
        assert 0.35 <= share <= 0.65
        assert all(abs(len(x) - len(y)) <= 1 for x, y in zip(a, b))
    torch.testing.assert_close(ranks[0]["memory"], ranks[1]["memory"], equal_nan=True)  # merged


@pytest.mark.slow
def test_train_py_trains_the_same_samples_to_the_same_model_either_way(tmp_path, tiny):
    """Without augmentation the loader's rows do not depend on what else is loaded, so selecting
    before loading must reproduce selecting after loading to the last digit."""
    runs = {}
    for mode in ("false", "auto"):
        result = run_train(tmp_path / mode, *tiny, "training.epochs=2", "gate=sundew_memory", "gate.pack=true",
                           "gate.target_rate=0.4", f"gate.select_before_loading={mode}")
        assert result.returncode == 0, result.stderr[-2000:]
        runs[mode] = read_run(tmp_path / mode)
    (after, after_summary), (before, before_summary) = runs["false"], runs["auto"]
    assert before_summary["select_before_loading"] is True and after_summary["select_before_loading"] is False
    for key in ("samples_trained", "samples_seen", "optimizer_steps", "train_loss", "val_loss"):
        assert [r[key] for r in before] == [r[key] for r in after], key
    assert before_summary["activation_rate"] < 1.0


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 0.25])])
def test_a_look_saved_in_a_checkpoint_comes_back_as_it_was(weight):
    look = Look(torch.tensor([40, 7, 13, 2]), Selection(torch.tensor([1, 3]), weight))
    back = Look.from_state(look.state_dict(), torch.device("cpu"))
    assert back.chosen.tolist() == [7, 2] and back.looked_at.tolist() == [40, 7, 13, 2]
    relative = back.relative_weight()  # weight x 4 looked at: 1 is an ordinary sample
    assert (relative is None) if weight is None else relative.tolist() == [2.0, 1.0]


def test_sundews_unbiased_weights_give_the_loss_selecting_after_loading_gives():
    """Unpacked, each batch is one look: `update` returns gated_loss with the gate's 1 / (B p), the
    estimate of the looked-at batch's mean that selecting after loading trains on. Packed, a batch
    mixing looks gets the weighted mean sum(w * loss) / sum(w) with w = 1 / p."""
    n, batch = 96, 16

    def gate() -> SundewGate:  # a remembered loss per sample: unequal keep probabilities
        made = SundewGate(n, 0.4, scoring="memory", unbiased=True, exploration=0.2, seed=3)
        made.observe(torch.arange(n), fake_losses(torch.arange(n), 1))
        return made

    after = gate()
    after.start_epoch(2)
    unpacked, chosen, relative = [], [], []
    for idx in EpochOrder(torch.arange(n), batch, seed=5).index_batches():
        selection = after.select(idx, None)
        if len(selection.index):
            unpacked.append(gated_loss(fake_losses(idx[selection.index], 2), selection))
            chosen.append(idx[selection.index])
            relative.append(selection.relative_weight(len(idx)))
    chosen, relative = torch.cat(chosen), torch.cat(relative)
    packed = [(w * fake_losses(i, 2)).sum() / w.sum() for i, w in zip(chosen.split(batch), relative.split(batch))]
    for pack, expected in ((False, unpacked), (True, packed)):
        sampler = SelectingBatchSampler(gate(), batch, seed=5, pack=pack)
        sampler.set_epoch(2)
        got = [sampler.update(fake_losses(torch.tensor(b), 2)) for b in sampler]
        torch.testing.assert_close(torch.stack(got), torch.stack(expected))
