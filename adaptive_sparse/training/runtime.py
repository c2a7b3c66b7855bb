"""Checks that run before any data loads, plus the few run-level settings (device, seeds)."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from adaptive_sparse.training.checkpoint import locate_checkpoint
from adaptive_sparse.training.data import DATASETS
from adaptive_sparse.training.distributed import Distributed, setup_distributed
from adaptive_sparse.training.lifecycle import ConfigError, remove_stale_temp_files

log = logging.getLogger("train")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _is_integer(value) -> bool:
    """An int, not a bool (YAML's true is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate_config(cfg: DictConfig) -> None:
    """Refuse out-of-range values by key name before any data or model is built."""
    for key, rate in (("gate.target_rate", cfg.gate.get("target_rate")), ("budget", cfg.budget)):
        _require(rate is None or (isinstance(rate, (int, float)) and 0 < rate <= 1), key, rate, "a fraction in (0, 1]")
    _require(_is_integer(cfg.seed), "seed", cfg.seed, "an integer")
    t = cfg.training
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every_epochs"):
        _require(isinstance(t[key], int) and t[key] >= 1, f"training.{key}", t[key], "an integer >= 1")
    floor = cfg.gate.get("min_selected")
    _require(floor is None or (isinstance(floor, int) and 0 <= floor <= t.batch_size), "gate.min_selected", floor,
             f"an integer from 0 to training.batch_size ({t.batch_size}); above it every sample of every batch trains")
    _require(t.limit_train_batches is None or (isinstance(t.limit_train_batches, int)
                                               and t.limit_train_batches >= 1),
             "training.limit_train_batches", t.limit_train_batches, "null or an integer >= 1")
    _require(t.get("scheduler_interval", "epoch") in ("epoch", "batch"), "training.scheduler_interval",
             t.get("scheduler_interval"), "epoch or batch")
    samples = t.get("train_eval_samples", 0)
    _require(_is_integer(samples) and samples >= 0,
             "training.train_eval_samples", samples, "an integer >= 0")
    fraction = t.get("last_epoch_fraction", 1.0)
    _require(isinstance(fraction, (int, float)) and 0 < fraction <= 1, "training.last_epoch_fraction", fraction,
             "a number in (0, 1]")
    lead_in = t.get("schedule_lead_in_epochs", 0)
    _require(_is_integer(lead_in) and lead_in >= 0,
             "training.schedule_lead_in_epochs", lead_in, "an integer >= 0")
    _require(t.get("pack_remainder", "train") in ("train", "carry"), "training.pack_remainder",
             t.get("pack_remainder"), "train or carry")
    _require(t.get("loss_reduction", "mean") in ("mean", "sum"), "training.loss_reduction",
             t.get("loss_reduction"), "mean or sum")
    smoothing = t.get("label_smoothing", 0.0)
    _require(isinstance(smoothing, (int, float)) and 0 <= smoothing < 1, "training.label_smoothing", smoothing,
             "a number in [0, 1)")
    _require(t.precision in PRECISIONS, "training.precision", t.precision, f"one of {', '.join(PRECISIONS)}")
    _require(cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
             "device", cfg.device, "auto, cpu, cuda or cuda:N")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA device is available; use device=cpu or auto")
    _require(cfg.wandb.mode in ("offline", "online", "disabled"), "wandb.mode", cfg.wandb.mode,
             "one of offline, online, disabled")
    resume = cfg.get("resume", False)
    _require(isinstance(resume, bool) or resume == "auto", "resume", resume, "true, false or auto")
    init_from = cfg.get("init_from")
    if init_from and not Path(os.path.expanduser(str(init_from))).is_file():
        raise ConfigError(f"init_from={str(init_from)!r} is not a file: pass a run's checkpoints/last.pt")
    every = cfg.checkpoint.every_epochs
    _require(isinstance(every, int) and every >= 0, "checkpoint.every_epochs", every, "an integer >= 0")
    _require(cfg.distributed.backend in ("auto", "gloo", "nccl"), "distributed.backend",
             cfg.distributed.backend, "one of auto, gloo, nccl")
    for key in ("inject_nan_at_step", "signal_at_step"):
        step = cfg.debug.get(key)
        _require(step is None or (isinstance(step, int) and step >= 1), f"debug.{key}", step, "null or an integer >= 1")
    _require(cfg.dataset.name in _dataset_names(), "dataset.name", cfg.dataset.name,
             f"one of {sorted(_dataset_names())}")
    if cfg.dataset.get("root") and not cfg.dataset.get("download", False):
        root = Path(os.path.expanduser(str(cfg.dataset.root)))
        if not root.exists():
            raise ConfigError(f"dataset.root={str(root)!r} does not exist and dataset.download=false")


def refuse_unread_additions(overrides: list[str], cfg: DictConfig, conf_dir: Path) -> None:
    """A `+key=value` override adds a key; unless the key goes to a constructor (a node with a
    `_target_`, which refuses arguments it does not take) or selects a config group, no code
    reads it: most likely a misspelling, refused with the closest existing keys."""
    import difflib

    for override in overrides:
        if not override.startswith("+") or override.startswith("++") or "=" not in override:
            continue
        key = override[1:].split("=", 1)[0]
        if (conf_dir / key.replace(".", "/")).is_dir():  # +experiment=NAME: a group
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and "_target_" in parent:
            continue
        siblings = [str(k) for k in parent.keys() if str(k) != name] if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(name, siblings, n=2)
        hint = f"; did you mean {' or '.join(f'{parent_key}.{c}'.lstrip('.') for c in close)}?" if close else ""
        raise ConfigError(f"{override} adds a key that nothing reads{hint}")


def _dataset_names() -> set[str]:
    return set(DATASETS)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU multiplies bf16 natively (AVX512_BF16 or AMX): there bf16 autocast
    runs convolutions and matmuls ~2x faster than fp32. Elsewhere torch emulates bf16 by
    converting to fp32, which is slower than fp32 itself. Reads /proc/cpuinfo's flags (Linux);
    without it (macOS, Windows) the answer is False, so `auto` stays with fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def has_native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 natively (a CUDA GPU that supports it, or a CPU with
    AVX512_BF16 or AMX). summary.json records it: machines sharing a CPU name differ in it (an
    AMD EPYC with avx512_bf16 and one without have both run here), and with it in speed."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """`training.precision=auto`: bf16 autocast where the device has native bf16, fp32
    elsewhere; an explicit fp32, bf16 or fp16 is kept as asked."""
    if name != "auto":
        return name
    return "bf16" if has_native_bf16(device) else "fp32"


def threads_per_job(launcher: Mapping[str, Any], cpu_count: int | None = None) -> int | None:
    """Torch threads for one job of a sweep, from the launcher's config; None: torch's default.

    Parallel jobs that each start one thread per core oversubscribe the machine. joblib runs
    n_jobs jobs at once (-1: one per core, -2: all but one, as joblib counts), so each gets
    its share of the cores; submitit (local or SLURM) gives each job cpus_per_task cores.
    """
    cpu_count = cpu_count or os.cpu_count() or 1
    n_jobs = launcher.get("n_jobs")
    if n_jobs:
        running = n_jobs if n_jobs > 0 else max(1, cpu_count + 1 + n_jobs)
        return max(1, cpu_count // running)
    return launcher.get("cpus_per_task") or None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


@dataclass
class HydraRun:
    """What a run takes from Hydra, handed to `train` as an argument (no global state read inside):
    the chosen option of each config group, the command line's overrides, the launcher's config
    and, for W&B's sweep identity, Hydra's own config node (None outside Hydra)."""
    choices: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    launcher: dict[str, Any] = field(default_factory=dict)
    config: DictConfig | None = None

    @classmethod
    def of(cls, hydra_cfg: DictConfig) -> "HydraRun":
        """From a Hydra config node: HydraConfig.get() in an app, or a composed config's `hydra`."""
        launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True) if "launcher" in hydra_cfg else {}
        return cls(dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task), launcher, hydra_cfg)


@dataclass
class Run:
    """Where and how this process trains."""
    device: torch.device
    dist: Distributed
    precision: str
    checkpoint_path: Path
    resuming: bool


def setup_run(cfg: DictConfig, run_dir: Path, hydra: HydraRun, conf_dir: Path) -> Run:
    """Refuse a bad config, then set the process up: torchrun, device, threads, seeds, precision,
    and whether this run directory's checkpoint is resumed."""
    validate_config(cfg)
    refuse_unread_additions(hydra.overrides, cfg, conf_dir)
    remove_stale_temp_files(run_dir)  # of a save a kill interrupted; the directory's lock is ours
    # refuses a missing checkpoint (resume=true) or overwriting one (false); auto: whichever applies
    checkpoint_path, resuming = locate_checkpoint(run_dir, cfg.resume)
    dist = setup_distributed(cfg.distributed.backend, cfg.device)  # inactive without torchrun
    device = dist.device or resolve_device(cfg.device)
    # parallel sweep jobs share the cores: training.num_threads, else the launcher's share
    num_threads = cfg.training.num_threads or threads_per_job(hydra.launcher)
    if num_threads:
        torch.set_num_threads(num_threads)
    seed_everything(cfg.seed, cfg.deterministic)
    torch.set_flush_denormal(cfg.training.flush_denormal)  # no-op where unsupported
    precision = resolve_precision(cfg.training.precision, device)  # auto: bf16 where the hardware has it
    if precision == "fp16" and device.type == "cpu":
        log.warning("training.precision=fp16 on a CPU runs emulated fp16 arithmetic: it trains (with a "
                    "gradient scaler) but far slower than fp32 or bf16 (20 batches: 62 s against ~1 s here)")
    return Run(device, dist, precision, checkpoint_path, resuming)
