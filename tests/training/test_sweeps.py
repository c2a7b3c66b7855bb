"""Sweeps: per-job threads, W&B group and tags, and tiny multiruns through joblib and submitit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY
from hydra.types import RunMode

from adaptive_sparse.training.records import job_tags, parse_overrides, sweep_group_name, wandb_identity
from adaptive_sparse.training.runtime import threads_per_job

EXCLUDED = ["dataset.root", "wandb.mode"]


@pytest.mark.parametrize("launcher, cpus, threads", [
    ({"n_jobs": 2}, 8, 4),           # joblib: 2 jobs share 8 cores
    ({"n_jobs": 3}, 8, 2),           # 8 // 3
    ({"n_jobs": 4}, 2, 1),           # more jobs than cores: still one thread each
    ({"n_jobs": -1}, 8, 1),          # joblib -1: one job per core
    ({"n_jobs": -2}, 8, 1),          # joblib -2: 7 jobs, 8 // 7
    ({"n_jobs": -5}, 8, 2),          # joblib -5: 4 jobs
    ({"cpus_per_task": 6}, 8, 6),    # submitit: the job's allocation
    ({}, 8, None),                   # basic launcher: torch's default
])
def test_threads_per_job(launcher: dict, cpus: int, threads: int | None):
    assert threads_per_job(launcher, cpu_count=cpus) == threads


def test_job_tags_are_the_overrides_minus_excluded_keys():
    lines = ["gate=none", "seed=1", "+experiment=seed_report", "dataset.root=../shared/data/cifar10"]
    assert parse_overrides(lines)["experiment"] == "seed_report"
    assert job_tags(lines, EXCLUDED) == ["gate=none", "seed=1", "experiment=seed_report"]
    long_tag = job_tags(["training.optimizer._target_=" + "x" * 80], EXCLUDED)[0]
    assert len(long_tag) == 64 and long_tag.endswith("~")


def test_sweep_group_name_is_the_last_two_parts_of_the_sweep_dir():
    assert sweep_group_name("/tmp/multirun/2026-11-24/10-30-00") == "2026-11-24_10-30-00"
    assert sweep_group_name("/tmp/multirun/gates") == "multirun_gates"


def _hydra(mode: RunMode) -> SimpleNamespace:
    return SimpleNamespace(
        mode=mode, sweep=SimpleNamespace(dir="/tmp/multirun/2026-11-24/10-30-00"),
        job=SimpleNamespace(config=SimpleNamespace(override_dirname=SimpleNamespace(exclude_keys=EXCLUDED))),
        overrides=SimpleNamespace(task=["gate=none", "seed=1", "dataset.root=/data"]),
        runtime=SimpleNamespace(output_dir="/tmp/multirun/2026-11-24/10-30-00/3_gate=none,seed=1"))


def test_wandb_identity_in_a_multirun_joins_the_sweep_group():
    identity = wandb_identity({"group": None, "tags": ["preset"], "name": None}, _hydra(RunMode.MULTIRUN))
    assert identity == {"group": "2026-11-24_10-30-00", "tags": ["preset", "gate=none", "seed=1"],
                        "name": "3_gate=none,seed=1"}


def test_wandb_identity_keeps_what_the_config_sets():
    wandb_cfg = {"group": "mine", "tags": [], "name": "run"}
    assert wandb_identity(wandb_cfg, _hydra(RunMode.MULTIRUN))["group"] == "mine"
    assert wandb_identity(wandb_cfg, _hydra(RunMode.MULTIRUN))["name"] == "run"
    assert wandb_identity({"group": None, "tags": [], "name": None}, _hydra(RunMode.RUN)) == \
        {"group": None, "tags": [], "name": None}


def run_multirun(sweep_dir: Path, *overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def summaries(sweep_dir: Path) -> dict[str, dict]:
    """{sub-directory name: summary.json} of the sweep's jobs."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


@pytest.mark.slow
def test_preset_sweep_through_joblib(tmp_path: Path):
    # baseline_comparison's gate sweep, one seed, two jobs at a time
    result = run_multirun(tmp_path, "hydra/launcher=parallel", "+study=baseline_comparison",
                          "hydra.sweeper.params.seed=0", *TINY, "training.limit_train_batches=4")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = summaries(tmp_path)
    # sub-directories named from the overrides, sorted as Hydra sorts them, wandb.mode left out
    assert sorted(runs) == [
        f"{i}_+study=baseline_comparison,dataset.num_test=256,dataset.num_train=512,"
        f"dataset=synthetic,gate={g},seed=0,training.epochs=1,training.eval_batch_size=256,"
        "training.limit_train_batches=4" for i, g in enumerate(["none", "random", "sundew"])]
    assert [s["gate"] for s in runs.values()] == ["none", "random", "sundew"]
    assert {s["num_threads"] for s in runs.values()} == {max(1, os.cpu_count() // 2)}
    assert {s["wandb_group"] for s in runs.values()} == {sweep_group_name(tmp_path)}


@pytest.mark.slow
def test_submitit_local_executor(tmp_path: Path):
    result = run_multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=2",
                          "hydra.launcher.cpus_per_task=1", "gate=none,random", *TINY,
                          "training.limit_train_batches=4")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = summaries(tmp_path)
    assert sorted(runs) == sorted(
        f"{i}_dataset.num_test=256,dataset.num_train=512,dataset=synthetic,gate={g},"
        "training.epochs=1,training.eval_batch_size=256,training.limit_train_batches=4"
        for i, g in enumerate(["none", "random"]))
    assert [s["num_threads"] for s in runs.values()] == [1, 1]
    assert (tmp_path / ".submitit").is_dir()


@pytest.mark.slow
def test_a_sweep_resumes_each_job_in_its_own_directory(tmp_path: Path):
    """`-m ... resume=true` must land in the same sub-directories as the first pass: resume and
    training.num_threads stay out of the names (the job numbers are the sweep's own)."""
    first = run_multirun(tmp_path, "gate=none,random", *TINY, "training.limit_train_batches=2")
    assert first.returncode == 0, first.stderr[-3000:]
    names = sorted(p.parent.name for p in tmp_path.glob("*/summary.json"))
    again = run_multirun(tmp_path, "gate=none,random", *TINY, "training.limit_train_batches=2",
                         "resume=true", "training.num_threads=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/summary.json")) == names
    assert all("resumed from" in (tmp_path / name / "train.log").read_text() for name in names)
