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

from adaptive_sparse.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_initial_weights,
    locate_checkpoint,
    refuse_other_data,
    state_dict_mismatch,
)

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
    with pytest.raises(CheckpointError, match=f"{path} is not a checkpoint written by this project: a zip archive "
                                              r"cut short or damaged \(an interrupted copy or save\?\)"):
        load_checkpoint(path)


def test_a_file_that_is_not_a_checkpoint_says_what_it_is_never_to_load_it_unsafely(tmp_path):
    from PIL import Image

    photo = tmp_path / "cat.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    (tmp_path / "random.pt").write_bytes(bytes(range(7, 250)))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    said = {"random.pt": "it is not a zip archive, as torch.save writes", "empty.pt": "the file is empty",
            "weights.pt": "it holds tensors alone (a model's state_dict?), not a run's checkpoints/last.pt"}
    for name, what in said.items():
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(tmp_path / name)
        assert str(refused.value).startswith(f"{tmp_path / name} is not a checkpoint written by this project: {what}")
        assert "weights_only" not in str(refused.value)
    with pytest.raises(CheckpointError) as refused:
        load_initial_weights(torch.nn.Linear(2, 2), photo)
    assert str(refused.value) == f"init_from={photo} is not a checkpoint written by this project: it is a JPEG image"


def test_a_model_that_does_not_fit_the_checkpoint_names_the_sizes_and_the_keys(tmp_path):
    """Resuming a character model on a corpus of another vocabulary (a checkpoint from before data
    fingerprints): both sizes of each tensor, not torch's first line."""
    saved = torch.nn.Sequential(torch.nn.Embedding(65, 16), torch.nn.Linear(16, 65)).state_dict()
    model = torch.nn.Sequential(torch.nn.Embedding(13, 16), torch.nn.Linear(16, 13), torch.nn.Linear(2, 2))
    assert state_dict_mismatch(model, saved) == (
        "0.weight is (65, 16) in the checkpoint, (13, 16) in the model; 1.weight is (65, 16) in the checkpoint, "
        "(13, 16) in the model; 1.bias is (65,) in the checkpoint, (13,) in the model; missing from the "
        "checkpoint: 2.weight, 2.bias")
    assert state_dict_mismatch(model, model.state_dict()) is None
    path = tmp_path / "last.pt"
    torch.save({**_minimal_checkpoint(), "model": saved}, path)
    with pytest.raises(CheckpointError, match=r"init_from=.* does not fit this model: 0.weight is \(65, 16\) in the "
                                              r"checkpoint, \(13, 16\) in the model; .*missing from the checkpoint"):
        load_initial_weights(model, path)


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


def _text_fingerprint(tmp_path, text: str, name: str = "corpus.txt") -> dict:
    from omegaconf import OmegaConf

    from adaptive_sparse.training.data import load_shakespeare_char

    folder = tmp_path / name.split(".")[0]
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    cfg = OmegaConf.create({"root": str(folder / name), "file_name": name, "search_roots": [], "download": False,
                            "cache_dir": str(tmp_path / "cache"), "train_fraction": 0.9})
    return load_shakespeare_char(cfg).train.fingerprint


def test_a_resume_on_other_data_is_refused_naming_what_changed_and_both_sources(tmp_path):
    from conftest import cyclic_text

    text = cyclic_text(600)
    shifted = text.translate({c: c + 1 for c in range(97, 110)})  # every letter one on: same size and vocabulary
    saved, moved = _text_fingerprint(tmp_path, text, "a.txt"), _text_fingerprint(tmp_path, text, "b.txt")
    other = _text_fingerprint(tmp_path, shifted, "c.txt")
    assert saved["source"] != moved["source"] and saved["sha256"] == moved["sha256"]
    refuse_other_data(tmp_path / "last.pt", saved, moved)  # the same corpus elsewhere: a moved copy resumes
    refuse_other_data(tmp_path / "last.pt", None, other)   # a checkpoint from before fingerprints
    with pytest.raises(CheckpointError) as refused:
        refuse_other_data(tmp_path / "last.pt", saved, other)
    assert str(refused.value) == (
        f"resuming {tmp_path / 'last.pt'} on other training data (sha256: checkpoint {saved['sha256'][:12]}..., "
        f"now {other['sha256'][:12]}...; source: checkpoint file:{tmp_path / 'a' / 'a.txt'}, now "
        f"file:{tmp_path / 'c' / 'c.txt'}): one run's records would mix two datasets. Point dataset.root at the "
        f"checkpoint's data, or train on from its weights in a new run: hydra.run.dir=NEW "
        f"init_from={tmp_path / 'last.pt'}")


def test_an_image_folder_is_fingerprinted_by_its_files_not_its_place(tmp_path):
    import shutil

    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from adaptive_sparse.training.data import hold_out_validation, load_cifar10

    root = tmp_path / "a"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    cfg = {"download": False, "search_roots": [], "cache_dir": str(tmp_path / "cache")}

    def images(folder):
        return load_cifar10(OmegaConf.create({**cfg, "root": str(folder)}))

    def load(folder) -> dict:
        return images(folder).train.fingerprint

    shutil.copytree(root, tmp_path / "b")
    first, copy = load(root), load(tmp_path / "b")
    assert first["files"] == copy["files"] and first["source"] != copy["source"]
    assert first["images"] == "4 train, 4 test" and first["classes"] == 2
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "b" / "train" / "dog" / "1.png")  # another image, another size
    assert load(tmp_path / "b")["files"] != first["files"]
    assert hold_out_validation(images(root), 1).train.fingerprint == first  # dataset.val_size keeps it


def test_init_from_on_other_data_is_allowed_and_said(tmp_path, caplog):
    import logging

    model = torch.nn.Linear(2, 2)
    path = tmp_path / "last.pt"
    trained_on = {"source": "file:/a/corpus.txt", "sha256": "1" * 64, "characters": 600, "vocabulary": 13}
    torch.save({**_minimal_checkpoint(), "model": model.state_dict(), "data": trained_on}, path)
    log = logging.getLogger("train")
    with caplog.at_level(logging.INFO, logger="train"):
        load_initial_weights(model, path, log, data={**trained_on, "source": "file:/b/corpus.txt"})
        assert "other data" not in caplog.text  # the same corpus, moved
        load_initial_weights(model, path, log, data={**trained_on, "sha256": "2" * 64})
    assert caplog.records[-1].getMessage() == (
        f"init_from {path} was trained on other data (sha256: checkpoint 111111111111..., now 222222222222...; "
        "source: checkpoint file:/a/corpus.txt, now file:/a/corpus.txt): its weights start this run's")


@pytest.mark.slow
def test_a_resume_on_a_letter_shifted_corpus_is_refused_and_init_from_on_it_is_allowed(tmp_path):
    from conftest import cyclic_text

    run = [*tiny_char_lm(tmp_path), "training.batch_size=16", "gate=none"]
    assert run_train(tmp_path / "run", *run).returncode == 0
    shifted = tmp_path / "shifted" / "corpus.txt"
    shifted.parent.mkdir()
    shifted.write_text(cyclic_text(6000).translate({c: c + 1 for c in range(97, 110)}))
    refused = run_train(tmp_path / "run", *run, "resume=true", f"dataset.root={shifted}")
    assert refused.returncode == 1 and "Traceback" not in refused.stdout + refused.stderr
    assert f"resuming {tmp_path / 'run'}/checkpoints/last.pt on other training data (sha256: checkpoint " in refused.stdout
    assert f"source: checkpoint file:{tmp_path / 'corpus.txt'}, now file:{shifted})" in refused.stdout
    started = run_train(tmp_path / "new", *run, f"dataset.root={shifted}",
                        f"init_from={tmp_path / 'run' / 'checkpoints' / 'last.pt'}")
    assert started.returncode == 0, started.stderr[-2000:]


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
