"""Packed selection, proxy scoring and automatic precision: the convergence issue's new parts."""
import math

import pytest
import torch
from conftest import read_run, run_train

from adaptive_sparse.gating.gates import RandomGate, Selection, SundewGate
from adaptive_sparse.gating.packing import SelectionPacker
from adaptive_sparse.training.runtime import cpu_has_native_bf16, resolve_precision


def loader_batches(n: int, batch: int):
    """(images, labels, idx) with each image's pixels equal to its dataset index."""
    for start in range(0, n, batch):
        idx = torch.arange(start, min(start + batch, n))
        yield idx.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2), idx % 10, idx


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_packing_trains_each_selected_sample_once_in_order_in_full_batches(rate):
    gate, packer = RandomGate(5000, target_rate=rate, seed=0), SelectionPacker(batch_size=64, enabled=True)
    selected, trained, sizes = [], [], []
    for images, labels, idx in loader_batches(5000, 64):
        selection = gate.select(idx, None)
        selected.append(idx[selection.index])
        packer.add(images, labels, idx, selection)
        for batch in packer.ready():
            assert torch.equal(batch.inputs[:, 0, 0, 0].long(), batch.idx)  # rows stay together
            trained.append(batch.idx)
            sizes.append(len(batch))
    for batch in packer.drain():
        trained.append(batch.idx)
        sizes.append(len(batch))
    selected, trained = torch.cat(selected), torch.cat(trained)
    assert torch.equal(trained, selected)  # every selected sample, once, in selection order
    assert sizes[:-1] == [64] * (len(sizes) - 1) and 0 < sizes[-1] <= 64
    assert len(sizes) == math.ceil(len(selected) / 64)  # about rate x full training's steps
    assert abs(len(trained) / 5000 - rate) < 0.02  # packing does not change the rate


def test_unpacked_is_one_step_per_loader_batch_with_the_gates_own_weights():
    packer = SelectionPacker(batch_size=4, enabled=False)
    images, labels, idx = next(loader_batches(4, 4))
    weight = torch.tensor([0.125, 0.375])
    packer.add(images, labels, idx, Selection(torch.tensor([1, 3]), weight))
    (batch,) = list(packer.ready())
    assert batch.idx.tolist() == [1, 3] and torch.equal(batch.weight, weight)
    packer.add(images, labels, idx, Selection(torch.tensor([], dtype=torch.long)))
    (empty,) = list(packer.ready())  # nothing selected: an empty step (skipped by train.py)
    assert len(empty) == 0 and list(packer.drain()) == []


def test_packed_weights_are_relative_to_their_loader_batch_then_normalised():
    """Loader batch of 4 with gate weights 1/(B p) = [0.25, 0.5] and one of 2 with [0.5]:
    relative weights 4 * [0.25, 0.5] = [1, 2] and 2 * [0.5] = [1]; normalised over the
    packed step: [1, 2, 1] / 4."""
    packer = SelectionPacker(batch_size=3, enabled=True)
    images, labels, idx = next(loader_batches(4, 4))
    packer.add(images, labels, idx, Selection(torch.tensor([0, 2]), torch.tensor([0.25, 0.5])))
    assert list(packer.ready()) == []  # 2 waiting, fewer than a batch
    packer.add(images[:2], labels[:2], idx[:2] + 4, Selection(torch.tensor([1]), torch.tensor([0.5])))
    (batch,) = list(packer.ready())
    assert batch.idx.tolist() == [0, 2, 5]
    assert batch.weight.tolist() == pytest.approx([0.25, 0.5, 0.25])


@pytest.mark.slow
def test_packing_through_train_py_counts_steps_samples_and_rate(tmp_path, tiny):
    """512 samples in 8 loader batches of 64 at rate 0.5: packed, ceil(trained / 64) steps an
    epoch; unpacked, one step per loader batch that selected anything (all 8 here)."""
    steps = {}
    for pack in ("true", "false"):
        run_dir = tmp_path / pack
        result = run_train(run_dir, *tiny, "gate=random", "gate.target_rate=0.5", f"gate.pack={pack}",
                           "training.epochs=2", "training.batch_size=64")
        assert result.returncode == 0, result.stderr[-3000:]
        records, summary = read_run(run_dir)
        for r in records:
            expected = math.ceil(r["samples_trained"] / 64) if pack == "true" else 8
            assert r["optimizer_steps"] == expected
        assert 0.4 < summary["activation_rate"] < 0.6
        steps[pack] = sum(r["optimizer_steps"] for r in records)
    assert steps["true"] < steps["false"]


# the proxy, SimpleCNN(width=0.25) on 3x32x32: conv 3->8 at 32x32, 8->16 at 32x32, 16->32 at 16x16,
# linear 2048->64, 64->10; multiply-adds x 2
PROXY_FORWARD = 2 * (1024 * 27 * 8 + 1024 * 72 * 16 + 256 * 144 * 32 + 2048 * 64 + 64 * 10)
# backward: twice the forward, less the first convolution's input gradient (images need none)
PROXY_TRAIN = 3 * PROXY_FORWARD - 2 * 1024 * 27 * 8


@pytest.mark.slow
def test_proxy_scoring_is_charged_as_scoring_and_costs_a_few_percent(tmp_path, tiny):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, *tiny, "gate=sundew_proxy", "gate.target_rate=0.25", "gate.pack=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (record,), summary = read_run(run_dir)
    assert PROXY_FORWARD == 5_424_384
    expected = record["samples_seen"] * PROXY_FORWARD + record["samples_trained"] * PROXY_TRAIN
    assert record["flops_scoring"] == expected
    assert record["flops_training"] == record["samples_trained"] * summary["flops_per_sample_train"]
    assert PROXY_FORWARD < 0.1 * summary["flops_per_sample_train"]  # the bound: 10% of a step
    assert record["scoring_time_s"] > 0


def test_gate_state_lives_on_the_device_it_is_built_for():
    gate = SundewGate(target_rate=0.5, num_samples=10, scoring="proxy", device="meta",
                      proxy=torch.nn.Linear(4, 10))
    assert {t.device.type for t in gate.memory.tensors().values()} == {"meta"}
    assert {p.device.type for p in gate.scorer.model.parameters()} == {"meta"}
    assert gate.rule.history.values.device.type == "meta"
    from adaptive_sparse.gating.gates import InfoBatchGate, SelectiveBackpropGate
    assert InfoBatchGate(num_samples=10, epochs=1, device="meta").memory.last_loss.device.type == "meta"
    assert SelectiveBackpropGate(10, device="meta").history.values.device.type == "meta"


def test_proxy_scoring_without_a_proxy_model_is_refused():
    with pytest.raises(ValueError, match="scoring='proxy' needs proxy="):
        SundewGate(10, scoring="proxy", proxy=None)


AMD_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 fma\n"
OLD_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw fma\n"


def test_auto_precision_picks_bf16_only_where_the_cpu_has_it(monkeypatch):
    assert cpu_has_native_bf16(AMD_FLAGS) and not cpu_has_native_bf16(OLD_FLAGS)
    assert cpu_has_native_bf16("flags : avx512f amx_bf16 amx_tile\n")
    for flags, expected in ((AMD_FLAGS, "bf16"), (OLD_FLAGS, "fp32")):
        monkeypatch.setattr("adaptive_sparse.training.runtime.cpu_has_native_bf16", lambda info=None, f=flags: cpu_has_native_bf16(f))
        assert resolve_precision("auto", torch.device("cpu")) == expected
        assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # explicit choices stay
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.slow
def test_summary_records_the_precision_and_loss_reduction_actually_used(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "gate=none", "training.precision=fp32", "training.loss_reduction=sum")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_run(tmp_path / "run")[1]
    assert (summary["precision"], summary["loss_reduction"]) == ("fp32", "sum")
