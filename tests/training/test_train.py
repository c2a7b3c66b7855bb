"""train.py end to end (through its Hydra entry point, in this process) on small learnable data."""
import time

import pytest
import torch
from conftest import TINY, compose_config, read_run, run_train, tiny_char_lm, train_directly
from hydra.utils import instantiate

from adaptive_sparse.training.checkpoint import load_checkpoint
from adaptive_sparse.training.data import load_dataset
from adaptive_sparse.training.step import evaluation_sums, evaluation_sums_by_level

CONTRACT_EPOCH_KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "activation_rate", "threshold",
                       "epoch_time_s", "flops_executed", "compute_savings", "sample_savings"}
CONTRACT_SUMMARY_KEYS = {"val_acc", "activation_rate", "target_rate", "train_time_s", "epoch_times_s",
                         "flops_executed", "flops_full", "compute_savings", "sample_savings", "epochs"}


@pytest.mark.slow
def test_train_writes_metrics_summary_and_an_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = run_train(run_dir, "dataset=synthetic", "training.epochs=2", "gate.target_rate=0.5",
                       "wandb.mode=offline", env={"WANDB_DIR": str(tmp_path)})
    wall_clock = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(CONTRACT_EPOCH_KEYS <= set(r) for r in records)
    assert CONTRACT_SUMMARY_KEYS <= set(summary)
    assert summary["val_acc"] > 30.0  # 10 classes: chance is 10%
    assert 0.35 < summary["activation_rate"] < 0.65
    # 2 epochs of the 2,048 synthetic training images, each looked at once an epoch
    assert [r["samples_seen"] for r in records] == [2048, 2048] and summary["samples_seen"] == 4096
    assert summary["samples_trained"] == sum(r["samples_trained"] for r in records)
    assert summary["activation_rate"] == summary["samples_trained"] / 4096
    # forward scoring costs a forward (~1/3 of a step) on every sample on top of the trained rate
    per_sample_ratio = summary["flops_per_sample_forward"] / summary["flops_per_sample_train"]
    expected = 1 - (per_sample_ratio + summary["activation_rate"])
    assert abs(summary["compute_savings"] - expected) < 1e-9
    # training time excludes evaluation: both fit in the run's wall-clock, which also holds start-up
    assert summary["eval_time_s"] > 0 and summary["train_time_s"] + summary["eval_time_s"] < wall_clock
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_gate_none_trains_everything(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "gate=none")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert summary["activation_rate"] == 1.0 and summary["compute_savings"] == 0.0
    assert records[0]["threshold"] is None


@pytest.mark.slow
def test_vit_trains_a_few_steps(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "model=vit", "model.depth=2", "gate=random", "gate.target_rate=0.5",
                       "training.limit_train_batches=3")
    assert result.returncode == 0, result.stderr[-3000:]
    _, summary = read_run(tmp_path / "run")
    assert summary["model"] == "vit" and summary["samples_seen"] == 3 * 64


@pytest.mark.slow
def test_memory_scoring_runs_no_scoring_forward(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "training.epochs=2", "gate.scoring=memory",
                       "gate.target_rate=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert summary["flops_scoring"] == 0
    assert all(r["scoring_time_s"] == 0.0 or r["scoring_time_s"] < 1e-3 for r in records)
    # with no scoring pass, compute savings equal sample savings exactly
    assert summary["compute_savings"] == pytest.approx(summary["sample_savings"])
    assert abs(summary["activation_rate"] - 0.25) < 0.03
    assert records[-1]["threshold"] is None and "budget" in records[-1]


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["infobatch", "selective_backprop"])
def test_reference_gates_train_end_to_end(tmp_path, tiny, gate):
    result = run_train(tmp_path / "run", *tiny, f"gate={gate}", "training.epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert summary["gate"] == gate
    if gate == "infobatch":  # epoch 1: nothing seen, nothing pruned; epoch 2 (> 0.875 * 2): annealing
        assert summary["target_rate"] is None and summary["activation_rate"] == 1.0
    else:  # Selective-Backprop scores every sample with a forward first
        assert summary["flops_scoring"] > 0 and summary["target_rate"] == 0.25
        assert summary["samples_trained"] < summary["samples_seen"]


@pytest.mark.slow
def test_annealed_sundew_spends_the_target_over_the_run_and_evaluates_when_asked(tmp_path, tiny):
    result = run_train(tmp_path / "run", *tiny, "training.epochs=4", "gate.target_rate=0.5",
                       "gate.anneal_epochs=1", "training.eval_every_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(tmp_path / "run")
    assert records[-1]["activation_rate"] == 1.0  # the annealing epoch
    assert [r["activation_rate"] < 0.5 for r in records[:3]] == [True] * 3  # aim: (0.5*4 - 1)/3 = 1/3
    assert abs(summary["activation_rate"] - 0.5) < 0.05
    assert [r["val_acc"] is None for r in records] == [True, False, True, False]
    assert [r["eval_time_s"] == 0.0 for r in records] == [True, False, True, False]


@pytest.mark.parametrize("task", ["classification", "char_lm"])
def test_a_whole_run_in_process_per_task_and_its_training_loss_that_compares_across_gates(tmp_path, task):
    """The fast tier's whole run: train(cfg, run_dir, HydraRun) called directly, in this process.
    train_eval_loss is the eval-mode loss of a fixed training sample: the final weights, evaluated
    here on the same samples, give it back."""
    overrides = ([*TINY, "dataset.num_train=256", "dataset.num_test=64", "gate=random", "gate.target_rate=0.5",
                  "training.train_eval_samples=100", "dataset.val_size=56", "task.eval_flip_tta=true",
                  "task.eval_translate_tta=true"] if task == "classification" else
                 [*tiny_char_lm(tmp_path), "training.batch_size=32", "training.epochs=1", "gate=random", "gate.target_rate=0.5", "training.train_eval_samples=20"])
    run_dir = tmp_path / "run"
    returned = train_directly(run_dir, *overrides)  # train() itself, as a notebook calls it
    records, summary = read_run(run_dir)
    assert returned.items() <= summary.items()  # summary.json adds the W&B group
    cfg = compose_config(overrides)
    data, task_object = load_dataset(cfg.dataset), instantiate(cfg.task)
    model = instantiate(cfg.model, **task_object.model_kwargs(data))
    model = task_object.prepare_model(model, data, cfg, torch.device("cpu"))
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    sample = task_object.train_sample_indices(data, cfg.training.train_eval_samples)
    assert len(sample) == (100 if task == "classification" else 20)
    loss_sum, _, count = evaluation_sums(model, task_object.train_sample_loader(data, cfg, torch.device("cpu"), sample),
                                         summary["precision"])
    assert records[-1]["train_eval_loss"] == pytest.approx(loss_sum / count, rel=1e-4)
    assert summary["metric"] in summary and summary["epochs"] == 1
    if task == "classification":  # 56 of the 256 training images held out to validate on; test at the end
        assert records[-1]["samples_seen"] == 200 and len(data.validation) == 56
        test_sums = evaluation_sums(model, task_object.eval_loader(data, cfg, torch.device("cpu"), None, split="test"),
                                    summary["precision"], views=task_object.views(last=True))
        assert test_sums[2] == 64 and summary["test_acc"] == pytest.approx(100 * test_sums[1] / 64)
        assert summary["val_acc"] != summary["test_acc"] or summary["val_loss"] != summary["test_loss"]
        # the final weights at each TTA level (0 none, 1 mirror, 2 mirror and translate), by hand
        val_loader = task_object.eval_loader(data, cfg, torch.device("cpu"), None)
        for level, correct in enumerate(c for _, c, _ in evaluation_sums_by_level(
                model, val_loader, summary["precision"], views=task_object.views(last=True))):
            assert summary[f"val_acc_tta{level}"] == pytest.approx(100 * correct / 56)
        assert summary["val_acc_tta2"] == summary["val_acc"]
    else:  # no images, no TTA levels
        assert not any(key.startswith("val_acc_tta") for key in summary)


def test_the_training_sample_is_spread_evenly_over_the_split():
    from adaptive_sparse.training.tasks import ClassificationTask

    class Ten:
        train = list(range(10))

    assert ClassificationTask().train_sample_indices(Ten(), 5).tolist() == [0, 2, 4, 7, 9]  # round(0, 2.25, 4.5, 6.75, 9)
    assert ClassificationTask().train_sample_indices(Ten(), 50).tolist() == list(range(10))
