"""torchrun data parallelism: a 2-rank gloo run on CPU, the gradient average across ranks
with unequal (and zero) selections, and the global activation rate."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, compose_config, read_run, two_ranks_spawn
from hydra.utils import instantiate

from adaptive_sparse.gating.gates import RandomGate
from adaptive_sparse.training.checkpoint import load_checkpoint
from adaptive_sparse.training.data import load_dataset
from adaptive_sparse.training.step import evaluation_sums


def _torchrun(run_dir, *overrides: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone --nproc_per_node=2 train.py ..., one thread a rank."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", f"hydra.run.dir={run_dir}", "training.num_threads=1", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _random_gate_selections(seed: int, batches: int, batch_size: int, rate: float) -> list[int]:
    gate = RandomGate(64, target_rate=rate, seed=seed)
    return [len(gate.select(torch.arange(batch_size), None).index) for _ in range(batches)]


@pytest.mark.slow
def test_two_rank_run_with_ranks_selecting_nothing_finishes_and_counts_globally(tmp_path):
    # random gate at 1% of 64: each rank keeps 0 or 1 sample per batch, so ranks often
    # select nothing (and sometimes both do) while the other still all-reduces gradients
    run_dir = tmp_path / "ddp"
    result = _torchrun(run_dir, *TINY, "gate=random", "gate.target_rate=0.01", "training.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    # 512 samples, 2 ranks -> 256 each -> 4 batches of 64 per rank per epoch; the gates are
    # seeded seed + rank, so the counts below are what each rank's gate drew, summed by hand
    per_rank = [_random_gate_selections(seed, batches=8, batch_size=64, rate=0.01) for seed in (0, 1)]
    assert 0 in per_rank[0] and 0 in per_rank[1]  # both ranks had steps with nothing selected
    assert [r["samples_seen"] for r in records] == [512, 512]
    assert [r["samples_trained"] for r in records] == [sum(per_rank[0][:4]) + sum(per_rank[1][:4]),
                                                       sum(per_rank[0][4:]) + sum(per_rank[1][4:])]
    assert summary["epochs"] == 2
    # the ranks' evaluation shares cover the test set exactly once: the final weights, evaluated
    # here in one process over all 256 test images, give the recorded figures
    cfg = compose_config([*TINY, "gate=random"])
    data, task = load_dataset(cfg.dataset), instantiate(cfg.task)
    model = instantiate(cfg.model, **task.model_kwargs(data))
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    loss_sum, correct, count = evaluation_sums(model, task.eval_loader(data, cfg, torch.device("cpu"), None),
                                               summary["precision"])
    assert count == 256
    assert summary["val_acc"] == pytest.approx(100 * correct / count, abs=0.4)  # bf16: one image may flip
    assert summary["val_loss"] == pytest.approx(loss_sum / count, rel=1e-3)
    assert not (run_dir / "wandb").exists()  # wandb disabled; rank 1 wrote no files of its own
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "metrics.jsonl", "summary.json", "train.log"]


@pytest.mark.slow
def test_two_rank_sundew_shares_one_threshold_and_tracks_the_target(tmp_path):
    run_dir = tmp_path / "ddp_sundew"
    # 16 steps a rank: faster controller gains than the defaults, which need more steps than
    # this (one process at the same global batch of 128 behaves the same; see README), and a
    # hard threshold, whose rate answers a threshold move faster than soft gating's sigmoid
    # (the default, which does not settle in 16 steps)
    result = _torchrun(run_dir, *TINY, "dataset.num_train=2048", "gate=sundew", "gate.target_rate=0.25",
                       "gate.selection=threshold", "gate.controller.kp=4", "gate.controller.ki=2",
                       "gate.temperature=0")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(run_dir)
    assert abs(summary["activation_rate"] - 0.25) < 0.05, summary["activation_rate"]
    ranks = load_checkpoint(run_dir / "checkpoints" / "last.pt")["ranks"]
    # the controller saw the global rate on both ranks: identical state, bit for bit
    assert ranks[0]["gate"]["controller"] == ranks[1]["gate"]["controller"]
    assert ranks[0]["gate"]["controller"]["threshold"] == records[-1]["threshold"]
    # the per-sample memory was merged at epoch end: every rank knows every sample's visit
    memories = [r["gate"]["memory"] for r in ranks]
    assert torch.equal(memories[0]["times_trained"], memories[1]["times_trained"])
    assert torch.equal(memories[0]["last_loss"].isnan(), memories[1]["last_loss"].isnan())
    assert int(memories[0]["times_trained"].sum()) == summary["samples_trained"]
    assert int((~memories[0]["last_loss"].isnan()).sum()) == 2048  # every sample scored by some rank


@pytest.mark.slow
def test_two_rank_weighted_selection_trains_and_tracks_the_target(tmp_path):
    """The default sundew rule weights each kept loss 1/(B p): under torchrun each rank's
    weighted sum estimates its own batch mean, and the gradients are averaged over ranks."""
    run_dir = tmp_path / "ddp_weighted"
    result = _torchrun(run_dir, *TINY, "dataset.num_train=2048", "gate=sundew", "gate.target_rate=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    _, summary = read_run(run_dir)
    assert abs(summary["activation_rate"] - 0.25) < 0.05, summary["activation_rate"]
    assert summary["val_acc"] > 20.0  # it learns (10 classes: chance is 10%)


def _average_gradients_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as torch_dist

    from adaptive_sparse.training.distributed import Distributed
    from adaptive_sparse.training.step import train_on_subset

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # rank 0 holds three samples of class 0, rank 1 holds none (it must not hang)
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) if rank == 0 else torch.zeros(0, 2)
    labels = torch.zeros(len(images), dtype=torch.long)
    distributed = Distributed(True, rank, 2, torch.device("cpu"))
    trained = train_on_subset(model, optimizer, images, labels, ranks=distributed)  # the one training step
    torch.save({"weight": model.weight.detach(), "losses": trained.loss}, f"{out}/rank{rank}.pt")
    distributed.close()


@pytest.mark.slow
def test_gradient_is_the_global_mean_and_a_rank_with_no_samples_joins(tmp_path):
    results = two_ranks_spawn(_average_gradients_worker, tmp_path)
    # by hand: zero weights -> uniform softmax (1/3 each); d loss / d W = (p - onehot) x^T.
    # Row 0 (the true class): (1/3 - 1) * mean(x) = -2/3 * (2/3, 2/3) = -4/9 each;
    # rows 1, 2: 1/3 * (2/3, 2/3) = 2/9 each. One SGD step with lr 1 subtracts the gradient.
    expected = torch.tensor([[4 / 9, 4 / 9], [-2 / 9, -2 / 9], [-2 / 9, -2 / 9]])
    for result in results:
        torch.testing.assert_close(result["weight"], expected)
    assert len(results[0]["losses"]) == 3 and len(results[1]["losses"]) == 0
    torch.testing.assert_close(results[0]["losses"], torch.full((3,), torch.log(torch.tensor(3.0)).item()))


def test_sharded_loader_gives_disjoint_equal_slices_of_one_permutation():
    from adaptive_sparse.training.data import BatchLoader, Split

    split = Split(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    loaders = [BatchLoader(split, 2, torch.device("cpu"), shuffle=True, seed=7, shard=(r, 3)) for r in range(3)]
    for epoch in range(2):
        served = [torch.cat([idx for _, _, idx, _ in loader]) for loader in loaders]
        assert [len(s) for s in served] == [3, 3, 3] and [len(loader) for loader in loaders] == [2, 2, 2]
        union = torch.cat(served)
        assert len(set(union.tolist())) == 9  # disjoint; 10 % 3 = 1 sample dropped this epoch
        permutation = torch.randperm(10, generator=torch.Generator().manual_seed(7))
        if epoch == 0:
            assert torch.equal(union, permutation[:9])


@pytest.mark.slow
def test_two_rank_packed_run_steps_together_and_trains_each_selection_once(tmp_path):
    """gate.pack=true under torchrun: ranks step when 2 x 64 samples wait on both together,
    each with up to 64 of its own, and the epoch's remainder is drained on every rank."""
    run_dir = tmp_path / "ddp_packed"
    result = _torchrun(run_dir, *TINY, "gate=random", "gate.target_rate=0.3", "gate.pack=true", "training.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    records, _ = read_run(run_dir)
    per_rank = [_random_gate_selections(seed, batches=8, batch_size=64, rate=0.3) for seed in (0, 1)]
    for epoch, record in enumerate(records):
        waiting = [sum(sel[4 * epoch:4 * epoch + 4]) for sel in per_rank]  # each rank's selections
        assert record["samples_trained"] == sum(waiting)  # every selected sample trained once
        assert record["optimizer_steps"] == _packed_steps([sel[4 * epoch:4 * epoch + 4] for sel in per_rank])
    ranks = load_checkpoint(run_dir / "checkpoints" / "last.pt")["ranks"]
    assert len(ranks) == 2


def _packed_steps(selections: list[list[int]], batch: int = 64) -> int:
    """The packing rule by hand: after each loader batch, step while batch x ranks samples wait
    on all ranks together (each rank trains up to `batch` of its own); at the epoch's end, step
    while any wait."""
    waiting, steps = [0] * len(selections), 0

    def step():
        nonlocal steps
        waiting[:] = [max(0, w - batch) for w in waiting]
        steps += 1

    for counts in zip(*selections):
        waiting[:] = [w + c for w, c in zip(waiting, counts)]
        while sum(waiting) >= batch * len(waiting):
            step()
    while sum(waiting) > 0:
        step()
    return steps
