"""Checkpoints: exact resume after SIGKILL, safe loading, and a NaN that stops the run cleanly."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, read_run, run_train, tiny_char_lm

from adaptive_sparse.training.checkpoint import CheckpointError, load_checkpoint, locate_checkpoint

DETERMINISTIC = [*TINY, "training.epochs=3", "deterministic=true", "training.num_threads=1"]
TIMING_KEYS = {"epoch_time_s", "data_time_s", "scoring_time_s", "select_time_s", "train_step_time_s",
               "eval_time_s", "samples_per_s"}


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def _kill_after_first_epoch(run_dir, settings=DETERMINISTIC) -> None:
    """Start train.py, SIGKILL it as soon as epoch 1's metrics line (written after its
    checkpoint) appears."""
    process = subprocess.Popen([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *settings],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch-1 metrics line within 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def language_settings(tmp_path) -> list[str]:
    """A small GPT on a small corpus, the window grid's random phase on (its draw is resumable
    state too), sundew with memory scoring, packed."""
    return [*tiny_char_lm(tmp_path, 12000), "task.random_phase=true", "gate=sundew_memory", "gate.target_rate=0.5",
            "gate.pack=true", "training.batch_size=32", "training.epochs=3", "deterministic=true",
            "training.num_threads=1"]


# the classification run is FastNet's full recipe, small, with the default gate: its lookahead's
# slow weights, alternating flips' epoch count and the whitening bias frozen after epoch 2 are
# resumable state too, and the last epoch stops at half its batches; packed, the selected samples
# left at an epoch's end wait in the checkpoint for the next epoch (training.pack_remainder=carry)
FASTNET_RECIPE = [*DETERMINISTIC, "+experiment=fastnet", "gate=sundew", "gate.target_rate=0.5", "gate.pack=true",
                  "model.widths=[8,16,16]", "model.whiten_bias_epochs=2", "training.batch_size=64",
                  "training.last_epoch_fraction=0.5", "training.lookahead.every_steps=3"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "char_lm"])
def test_killed_run_resumes_to_the_same_final_metrics(tmp_path, task):
    settings = FASTNET_RECIPE if task == "classification" else language_settings(tmp_path)
    reference = tmp_path / "uninterrupted"
    assert run_train(reference, *settings).returncode == 0
    killed = tmp_path / "killed"
    _kill_after_first_epoch(killed, settings)
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["epoch"] >= 1
    # a stale line of an epoch the checkpoint does not cover must not survive the resume
    with (killed / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"epoch": 99, "stale": True}) + "\n")

    result = run_train(killed, *settings, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_records, resumed_summary = read_run(killed)
    reference_records, reference_summary = read_run(reference)
    assert [r["epoch"] for r in resumed_records] == [1, 2, 3]  # no duplicate, none missing
    assert [_without_timings(r) for r in resumed_records] == [_without_timings(r) for r in reference_records]
    assert resumed_summary["val_acc"] == reference_summary["val_acc"]
    assert resumed_summary["val_loss"] == reference_summary["val_loss"]
    if task == "classification":  # 8 batches of 64 an epoch, the last epoch 4 of them: 2.5 epochs
        assert resumed_summary["epochs_trained"] == reference_summary["epochs_trained"] == 2.5
        # every step a full batch of 64: the remainder waited, the run's last one was dropped
        assert all(r["samples_trained"] == 64 * r["optimizer_steps"] for r in resumed_records)
    assert resumed_summary["samples_trained"] == reference_summary["samples_trained"]


@pytest.mark.slow
def test_kept_epoch_checkpoints_hold_their_own_epoch(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, *TINY, "training.epochs=3", "checkpoint.keep_epochs=[1,2]")
    assert result.returncode == 0, result.stderr[-3000:]
    kept = {e: load_checkpoint(run_dir / "checkpoints" / f"epoch_{e}.pt") for e in (1, 2)}
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert [kept[1]["epoch"], kept[2]["epoch"], last["epoch"]] == [1, 2, 3]
    assert [len(kept[1]["history"]), len(kept[2]["history"])] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "last.pt"]
    # epoch 1's file was not overwritten by the later saves
    assert any(not torch.equal(a, b) for a, b in zip(kept[1]["model"].values(), last["model"].values()))


def test_resume_and_fresh_runs_refuse_the_wrong_checkpoint_state(tmp_path):
    with pytest.raises(CheckpointError, match=r"resume=true but there is no checkpoint .*last\.pt"):
        locate_checkpoint(tmp_path, resume=True)
    assert locate_checkpoint(tmp_path, resume="auto") == (tmp_path / "checkpoints" / "last.pt", False)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pass resume=true"):
        locate_checkpoint(tmp_path, resume=False)
    assert locate_checkpoint(tmp_path, resume="auto") == (tmp_path / "checkpoints" / "last.pt", True)


def _minimal_checkpoint() -> dict:
    return {"format": 1, "epoch": 1, "step": 8, "world_size": 1, "model": {"w": torch.ones(1000)},
            "optimizer": {}, "scheduler": None, "history": [{"epoch": 1}], "wandb_run_id": None, "ranks": []}


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    torch.save(_minimal_checkpoint(), path)
    assert load_checkpoint(path)["epoch"] == 1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {path}"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs a shell command: exactly what a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_a_code_running_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({**_minimal_checkpoint(), "model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert str(path) in str(refused.value) and "system" in str(refused.value)
    assert not marker.exists()
    # the same bytes through a plain pickle load would have run it: the test can fail
    with path.open("rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path):
    # 512 samples / 64 = 8 steps an epoch: step 11 is the third step of epoch 2
    result = run_train(tmp_path, *TINY, "training.epochs=3", "debug.inject_nan_at_step=11")
    assert result.returncode != 0
    assert "non-finite training loss at epoch 2, step 11" in result.stdout + result.stderr
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 8
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (tmp_path / "summary.json").exists()


def test_resume_refuses_a_changed_training_key_naming_both_values(tmp_path):
    from conftest import compose_config

    from adaptive_sparse.training.checkpoint import flat_config, refuse_changed_config

    saved = flat_config(compose_config(["gate.target_rate=0.06"]))
    assert saved["gate.target_rate"] == 0.06 and saved["training.optimizer._target_"] == "torch.optim.Adam"
    where = flat_config(compose_config(["gate.target_rate=0.06", "training.num_threads=2", "resume=auto",
                                        "dataset.root=/elsewhere", "wandb.mode=disabled"]))
    refuse_changed_config(tmp_path, saved, where)  # where things go and how they show may change
    refuse_changed_config(tmp_path, None, where)   # a checkpoint that predates saved configs
    changed = flat_config(compose_config(["gate.target_rate=0.2", "gate.pack=true"]))
    with pytest.raises(CheckpointError, match=r"gate\.pack: checkpoint False, now True; "
                                              r"gate\.target_rate: checkpoint 0\.06, now 0\.2"):
        refuse_changed_config(tmp_path, saved, changed)
    # a checkpoint written before training.loss_reduction existed trained with the mean
    older = {k: v for k, v in saved.items() if k != "training.loss_reduction"}
    refuse_changed_config(tmp_path, older, saved)
    with pytest.raises(CheckpointError, match=r"training\.loss_reduction: checkpoint 'mean', now 'sum'"):
        refuse_changed_config(tmp_path, older, {**saved, "training.loss_reduction": "sum"})


@pytest.mark.slow
def test_resume_with_another_target_rate_exits_1_with_the_keys(tmp_path, tiny):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *tiny, "gate.target_rate=0.06").returncode == 0
    result = run_train(run_dir, *tiny, "resume=true", "gate.target_rate=0.2")
    assert result.returncode == 1
    assert "gate.target_rate: checkpoint 0.06, now 0.2" in result.stdout


@pytest.mark.slow
def test_fp16_trains_with_a_gradient_scaler_and_checkpoints_it(tmp_path, tiny):
    run_dir = tmp_path / "run"
    # emulated fp16 is slow on a CPU (2 batches of 64: 34 s): 2 batches of 8 show the scaler
    result = run_train(run_dir, *tiny, "training.precision=fp16", "gate=none", "training.limit_train_batches=2",
                       "training.batch_size=8", "dataset.num_test=16", "training.eval_batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    records, summary = read_run(run_dir)
    assert summary["precision"] == "fp16" and math.isfinite(records[0]["train_loss"])
    scaler = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and scaler["growth_interval"] == 2000
