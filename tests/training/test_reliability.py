"""Nothing silently wrong, nothing lost: one run per directory, data checked for what it is,
one-line errors, readable files, and preemption that saves (docs/reliability.md)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, ROOT, TINY, compose_config, read_run, run_train, tiny_char_lm
from omegaconf import OmegaConf
from PIL import Image

from adaptive_sparse.attention.sparse import SparseAttention
from adaptive_sparse.gating.gates import RandomGate
from adaptive_sparse.training.checkpoint import CheckpointError, refuse_changed_config
from adaptive_sparse.training.data import CIFAR10_CLASSES, DatasetError, load_cifar10
from adaptive_sparse.training.io import FILE_MODE, DiskFullError, _atomic_write, atomic_write_text
from adaptive_sparse.training.lifecycle import (
    ConfigError,
    RunDirError,
    RunDirLocked,
    configured_run_dir,
    fresh_run_dir,
    lock_from_argv,
    lock_run_dir,
    remove_stale_temp_files,
    unlock_run_dir,
)
from adaptive_sparse.training.runtime import refuse_model_for_another_task, refuse_unread_additions

# --------------------------------------------------------------------------- one run per directory

def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 60.0, contains: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and contains in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared (with {contains!r})")


@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_is_refused_and_the_first_stays_whole(tmp_path):
    run_dir = tmp_path / "run"
    first = _start(run_dir, *TINY, "dataset.num_train=2048", "training.epochs=3", "seed=0")
    _wait_for(run_dir / ".lock", contains="pid")
    second = run_train(run_dir, *TINY, "seed=1")
    first.communicate(timeout=300)
    assert second.returncode == 1 and "is in use by another run" in second.stderr
    assert "Traceback" not in second.stderr and first.returncode == 0
    records, summary = read_run(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3] and summary["seed"] == 0
    assert "seed=1" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # the second wrote nothing


@pytest.mark.slow
def test_the_lock_dies_with_its_process(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom adaptive_sparse.training.lifecycle import "
                               f"lock_run_dir\nlock_run_dir({str(run_dir)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirLocked, match="in use by another run .pid"):
        lock_run_dir(run_dir)
    holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
    holder.wait()
    assert lock_run_dir(run_dir) is True and lock_run_dir(run_dir) is False  # taken; then re-entrant
    unlock_run_dir(run_dir)


def test_runs_started_in_the_same_second_get_default_directories_of_their_own(tmp_path, monkeypatch):
    """Hydra's default `outputs/DATE/TIME` has one-second resolution: two runs resolving it at the
    same moment are each given a directory made for them alone, before Hydra writes anything."""
    monkeypatch.chdir(tmp_path)
    pattern = configured_run_dir(CONF_DIR / "config.yaml")
    assert pattern == "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"
    now = datetime(2026, 12, 1, 13, 21, 47)
    first, second = fresh_run_dir(pattern, now), fresh_run_dir(pattern, now)
    assert [str(first), str(second)] == ["outputs/2026-12-01/13-21-47", "outputs/2026-12-01/13-21-47_1"]
    assert first.is_dir() and second.is_dir() and not any(first.iterdir())
    assert fresh_run_dir("outputs/${hydra.job.name}", now) is None  # more than ${now:...}: Hydra's to resolve


def test_the_default_run_directory_is_locked_and_handed_to_hydra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pattern = configured_run_dir(CONF_DIR / "config.yaml")
    argv = lock_from_argv(["train.py", "seed=0"], pattern)
    again = lock_from_argv(["train.py", "seed=1"], pattern)  # the same second, most likely: another directory
    made = [Path(a[-1].split("=", 1)[1]) for a in (argv, again)]
    try:
        assert argv[:2] == ["train.py", "seed=0"] and argv[-1].startswith("hydra.run.dir=outputs/")
        assert made[0] != made[1] and (made[0] / ".lock").read_text().startswith(f"pid {os.getpid()}")
    finally:
        for run_dir in made:
            unlock_run_dir(run_dir)
    for untouched in (["train.py", "-m", "seed=0,1"], ["train.py", "--cfg", "job"], ["train.py", "--help"],
                      ["train.py", "--config-name", "other"]):  # sweeps, no run, another config: Hydra's own
        assert lock_from_argv(untouched, pattern) == untouched
    assert sorted((tmp_path / "outputs").glob("*/*")) == sorted(tmp_path / d for d in made)


@pytest.mark.slow
def test_two_runs_started_together_without_a_run_dir_keep_their_own_files(tmp_path):
    settings = [*TINY, "training.num_threads=1"]
    runs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *settings, f"seed={seed}"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for run in runs:
        run.communicate(timeout=300)
        assert run.returncode == 0
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").rglob("summary.json"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:  # each directory's config and summary are one run's
        seed = json.loads((run_dir / "summary.json").read_text())["seed"]
        assert f"seed={seed}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert (run_dir / "train.log").read_text().count("final val_acc") == 1


def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch):
    read_only = tmp_path / "mnt"
    original = Path.mkdir

    def mkdir(self, *args, **kwargs):  # a read-only mount: tests run as root, whom chmod does not stop
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(RunDirError, match=r"cannot write the run directory .*mnt/run \(Read-only file system\); "
                                          "choose a writable hydra.run.dir"):
        lock_run_dir(read_only / "run")
    refused = run_train(read_only / "run", *TINY)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    line = (f"error: cannot write the run directory {read_only / 'run'} (Read-only file system); choose a "
            "writable hydra.run.dir (nothing was written)")
    assert refused.stderr.strip().splitlines() == [line]


def test_temporary_files_of_an_interrupted_save_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.pt.abc123.tmp", tmp_path / ".summary.json.x.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"whole")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


# --------------------------------------------------------------------------- data checked

def _folder(root: Path, classes, per_class: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _cfg(root: Path, tmp_path: Path, **extra) -> OmegaConf:
    return OmegaConf.create({"name": "cifar10", "root": str(root), "download": False, "search_roots": [],
                             "cache_dir": str(tmp_path / "cache"), **extra})


def test_a_missing_class_folder_is_refused_by_name(tmp_path):
    root = _folder(tmp_path / "data", CIFAR10_CLASSES)
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    (root / "train" / "cat").rmdir()
    with pytest.raises(DatasetError, match=r"only in test/: \['cat'\]"):
        load_cifar10(_cfg(root, tmp_path))
    (root / "test" / "cat" / "0.png").unlink(), (root / "test" / "cat" / "1.png").unlink(), (root / "test" / "cat").rmdir()
    with pytest.raises(DatasetError, match=r"missing \['cat'\]"):  # gone from both: 9 classes, not CIFAR-10's
        load_cifar10(_cfg(root, tmp_path, classes=list(CIFAR10_CLASSES)))


def test_counts_are_checked_against_the_config(tmp_path):
    root = _folder(tmp_path / "data", CIFAR10_CLASSES)
    with pytest.raises(DatasetError, match="20 training and 20 test images, expected 50000 and 10000"):
        load_cifar10(_cfg(root, tmp_path, classes=list(CIFAR10_CLASSES), expected_counts=[50000, 10000]))
    assert len(load_cifar10(_cfg(root, tmp_path, expected_counts=[20, 20])).train) == 20


def test_the_cache_is_rebuilt_when_a_file_changes_in_place(tmp_path):
    root = _folder(tmp_path / "data", ("a", "b"))
    cfg = _cfg(root, tmp_path)
    before = load_cifar10(cfg).train.images[0].clone()
    image = root / "train" / "a" / "0.png"
    stat = image.stat()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)  # same name, same folder
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even within the folder's mtime
    after = load_cifar10(cfg).train.images[0]
    assert not torch.equal(before, after) and int(after.max()) == 0


def test_a_root_that_is_a_file_or_missing_says_so_and_creates_nothing(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DatasetError, match="is a file; expected a folder"):
        load_cifar10(_cfg(a_file, tmp_path))
    from torchvision.datasets import CIFAR10

    def no_network(self):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(CIFAR10, "download", no_network)
    missing = tmp_path / "typo" / "cifar10"
    with pytest.raises(DatasetError, match=r"does not exist, and downloading CIFAR-10 into it failed \(<urlopen"):
        load_cifar10(_cfg(missing, tmp_path, download=True))
    assert not (tmp_path / "typo").exists()


# --------------------------------------------------------------------------- errors a person can read

def test_a_gate_that_needs_a_target_rate_refuses_null():
    with pytest.raises(ValueError, match=r"RandomGate: target_rate=None is not allowed: a fraction in \(0, 1\]"):
        RandomGate(8, None)


def test_a_task_with_a_model_it_cannot_train_names_the_models_it_needs():
    cfg = compose_config(["task=char_lm", "model=cnn"], with_hydra=True)
    with pytest.raises(ConfigError, match="task=char_lm needs model=gpt: model=cnn does not take vocab_size"):
        refuse_model_for_another_task(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)
    cfg = compose_config(["model=gpt"], with_hydra=True)
    with pytest.raises(ConfigError, match="task=classification needs model=cnn or model=fastnet or model=vit"):
        refuse_model_for_another_task(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)
    for fitting in (["task=char_lm", "model=gpt"], ["model=vit"], ["model=fastnet"]):
        cfg = compose_config(fitting, with_hydra=True)
        refuse_model_for_another_task(cfg, dict(cfg.hydra.runtime.choices), CONF_DIR)


@pytest.mark.slow
def test_a_task_model_mismatch_is_refused_before_anything_is_built(tmp_path):
    text_without_model = [o for o in tiny_char_lm(tmp_path) if not o.startswith("model")]
    refused = run_train(tmp_path / "run", *text_without_model, "model=cnn")
    assert refused.returncode == 1 and "Traceback" not in refused.stdout + refused.stderr
    assert "task=char_lm needs model=gpt" in refused.stdout and not (tmp_path / "cache").exists()  # no data read


def test_a_misspelt_added_key_is_refused_with_the_closest_key():
    cfg = compose_config(["+training.epoch=3"])
    with pytest.raises(ConfigError, match=r"\+training.epoch=3 adds a key that nothing reads; did you mean training.epochs\?"):
        refuse_unread_additions(["+training.epoch=3"], cfg, CONF_DIR)
    # a group, and a key for a constructor (which refuses what it does not take), pass
    refuse_unread_additions(["+study=convergence", "+gate.extra=1"], compose_config(["+gate.extra=1"]), CONF_DIR)


def test_top_k_covering_the_sequence_warns_once():
    layer = SparseAttention(32, 2, top_k=16, local_window=0, global_tokens=0)
    with pytest.warns(UserWarning, match="attention.top_k=16 >= the 8 tokens"):
        layer(torch.randn(1, 8, 32))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(1, 8, 32))  # said once


def test_a_full_disk_names_itself_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on device writing {target} .the previous version is intact"):
        _atomic_write(target, "w", full)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_extending_a_finished_run_is_refused_with_the_way_forward(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match=f"init_from={path} training.epochs=N"):
        refuse_changed_config(path, {"training.epochs": 1}, {"training.epochs": 2})


def test_saved_files_are_readable_by_the_group_like_any_other(tmp_path):
    atomic_write_text("{}", tmp_path / "summary.json")
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == FILE_MODE
    os.umask(current := os.umask(0))
    assert FILE_MODE == 0o666 & ~current


@pytest.mark.slow
def test_a_user_error_is_one_line_in_the_console_and_train_log(tmp_path):
    refused = run_train(tmp_path / "a", *TINY, "gate.scoring=nope")
    assert refused.returncode == 1
    assert "Traceback" not in refused.stdout + refused.stderr
    line = "SundewGate: scoring='nope' is not allowed: one of ('forward', 'memory', 'proxy')"
    assert line in refused.stdout and line in (tmp_path / "a" / "train.log").read_text()


def test_only_user_errors_lose_their_traceback(monkeypatch, caplog):
    import logging

    from adaptive_sparse.training.lifecycle import user_errors_reported

    log = logging.getLogger("train")
    with pytest.raises(SystemExit) as stopped, user_errors_reported(log):
        raise ConfigError("gate.target_rate=2 is not allowed")
    assert stopped.value.code == 1 and caplog.records[-1].getMessage() == "gate.target_rate=2 is not allowed"
    with pytest.raises(ZeroDivisionError), user_errors_reported(log):  # a bug: raised as it is
        1 / 0
    with pytest.raises(ConfigError), user_errors_reported(log, multirun=True):  # Hydra lists the failed job
        raise ConfigError("x")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), user_errors_reported(log):
        raise ConfigError("x")


def test_the_command_line_lock_reads_hydra_quoting(tmp_path, monkeypatch):
    from adaptive_sparse.training.lifecycle import lock_from_argv

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "queue" / "run a"
    lock_from_argv(["train.py", f"hydra.run.dir='{run_dir}'"])  # as scripts/run_queue.py passes it
    try:
        assert (run_dir / ".lock").is_file() and [p.name for p in tmp_path.iterdir()] == ["queue"]
    finally:
        unlock_run_dir(run_dir)


# --------------------------------------------------------------------------- preemption that saves

def _same_records(a: list[dict], b: list[dict]) -> None:
    """Every non-timing figure of every epoch equal (NaN equal to NaN)."""
    timing = {"samples_per_s", "energy_kwh"}
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in x:
            if "time" in key or key in timing:
                continue
            same = x[key] == y[key] or (isinstance(x[key], float) and x[key] != x[key] and y[key] != y[key])
            assert same, (x["epoch"], key, x[key], y[key])


@pytest.mark.slow
def test_sigterm_inside_an_epoch_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """A real SIGTERM at the 8th training forward (epoch 2 of 3: about 6 packed steps an epoch), on the language model with the
    per-epoch phase, selecting before loading, packed: the rest of the epoch's draws, the waiting
    samples and the partial tallies all come back."""
    run = [*tiny_char_lm(tmp_path), "task.random_phase=true", "training.batch_size=16", "training.epochs=3",
           "gate=sundew_memory", "gate.target_rate=0.5", "gate.pack=true"]
    assert run_train(tmp_path / "whole", *run).returncode == 0
    cut = run_train(tmp_path / "cut", *run, "debug.signal_at_step=8")
    assert cut.returncode == 143, cut.stderr[-2000:]
    assert "SIGTERM: stopped in epoch 2 after step" in cut.stdout
    assert f"run the same command with hydra.run.dir={tmp_path / 'cut'} resume=true" in cut.stdout
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    resumed = run_train(tmp_path / "cut", *run, "resume=true")
    assert resumed.returncode == 0 and "and part of epoch 2" in resumed.stdout, resumed.stderr[-2000:]
    _same_records(read_run(tmp_path / "whole")[0], read_run(tmp_path / "cut")[0])
    # the cut epoch's time keeps the part before the signal (its steps lie inside the epoch)
    cut_epoch = read_run(tmp_path / "cut")[0][1]
    assert cut_epoch["epoch_time_s"] >= cut_epoch["train_step_time_s"] > 0


@pytest.mark.slow
def test_ctrl_c_from_outside_saves_and_the_run_resumes(tmp_path):
    """SIGINT from outside, whenever it lands (here: once epoch 1's line is written); that the
    resumed records equal an uninterrupted run's is the SIGTERM test's to show."""
    run = [*TINY, "dataset.num_train=4096", "training.epochs=2", "gate=random", "gate.target_rate=0.5",
           "dataset.augment=true"]
    process = _start(tmp_path / "cut", *run)
    _wait_for(tmp_path / "cut" / "metrics.jsonl", contains='"epoch": 1')
    process.send_signal(signal.SIGINT)  # in epoch 2 (about a second long), wherever it lands
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "SIGINT: stopped" in out and "Traceback" not in out + err
    resumed = run_train(tmp_path / "cut", *run, "resume=true")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    records, summary = read_run(tmp_path / "cut")
    assert [r["epoch"] for r in records] == [1, 2] and summary["samples_seen"] == 2 * 4096


@pytest.mark.slow
def test_torchrun_stopped_by_a_signal_says_how_to_resume_last_on_stderr_and_in_train_log(tmp_path):
    """torchrun prints ~40 lines of its own for ranks that exit non-zero; the resume line goes to
    stderr once the process group is torn down, the last line any rank prints, as well as to the
    log (console and train.log, once: rank 0's)."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", f"hydra.run.dir={run_dir}", "training.num_threads=1", *TINY,
                             "training.epochs=2", "debug.signal_at_step=3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    line = (f"SIGTERM: stopped in epoch 1 after step 3; saved {run_dir}/checkpoints/last.pt: run the same command "
            f"with hydra.run.dir={run_dir} resume=true to continue exactly")
    stderr = result.stderr.splitlines()
    assert stderr.count(line) == 1 and "[train]" not in "\n".join(stderr[stderr.index(line):])
    assert (run_dir / "train.log").read_text().count(line) == 1 and line in result.stdout


def test_a_checkpoint_inside_an_epoch_keeps_the_time_of_the_phases_still_running():
    from adaptive_sparse.training.metering import PhaseTimer

    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("epoch"):
        with timer.phase("train_step"):
            time.sleep(0.05)
        inside = timer.elapsed()  # the epoch phase is open: its 0.05 s so far count
    assert inside["epoch"] >= inside["train_step"] >= 0.05
    assert timer.elapsed() == dict(timer.seconds) and timer.seconds["epoch"] >= inside["epoch"]
