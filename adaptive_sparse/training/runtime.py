"""Checks that run before any data loads, plus the few run-level settings (device, seeds)."""
from __future__ import annotations

import inspect
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from adaptive_sparse.training.checkpoint import locate_checkpoint
from adaptive_sparse.training.data import DATASETS
from adaptive_sparse.training.distributed import Distributed, setup_distributed
from adaptive_sparse.training.lifecycle import ConfigError, remove_stale_temp_files

log = logging.getLogger("train")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _fraction(value) -> bool:
    return isinstance(value, (int, float)) and 0 < value <= 1


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


# What a type cannot say (the schema, training/schema.py, checks types at composition): each key's
# allowed values. A key a run does not have (gate.target_rate under gate=none) reads as null.
RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("budget", _optional(_fraction), "null or a fraction in (0, 1]"),
    ("gate.target_rate", _optional(_fraction), "a fraction in (0, 1]"),
    ("training.epochs", _at_least(1), "an integer >= 1"),
    ("training.batch_size", _at_least(1), "an integer >= 1"),
    ("training.eval_batch_size", _at_least(1), "an integer >= 1"),
    ("training.eval_every_epochs", _at_least(1), "an integer >= 1"),
    ("training.limit_train_batches", _optional(_at_least(1)), "null or an integer >= 1"),
    ("training.train_eval_samples", _at_least(0), "an integer >= 0"),
    ("training.last_epoch_fraction", _fraction, "a number in (0, 1]"),
    ("training.schedule_lead_in_epochs", _at_least(0), "an integer >= 0"),
    ("training.scheduler_interval", lambda v: v in ("epoch", "batch"), "epoch or batch"),
    ("training.pack_remainder", lambda v: v in ("train", "carry"), "train or carry"),
    ("training.loss_reduction", lambda v: v in ("mean", "sum"), "mean or sum"),
    ("training.label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("training.precision", lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ("device", lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
    ("wandb.mode", lambda v: v in ("offline", "online", "disabled"), "one of offline, online, disabled"),
    ("resume", lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
    ("checkpoint.every_epochs", _at_least(0), "an integer >= 0"),
    ("distributed.backend", lambda v: v in ("auto", "gloo", "nccl"), "one of auto, gloo, nccl"),
    ("debug.inject_nan_at_step", _optional(_at_least(1)), "null or an integer >= 1"),
    ("debug.signal_at_step", _optional(_at_least(1)), "null or an integer >= 1"),
    ("dataset.name", lambda v: v in DATASETS, f"one of {sorted(DATASETS)}"),
)


def validate_config(cfg: DictConfig) -> None:
    """Refuse out-of-range values by key name before any data or model is built."""
    for key, allowed, words in RULES:
        value = OmegaConf.select(cfg, key)
        if not allowed(value):
            raise ConfigError(f"{key}={value!r} is not allowed: {words}")
    floor, batch = cfg.gate.get("min_selected"), cfg.training.batch_size
    if floor is not None and not (isinstance(floor, int) and 0 <= floor <= batch):
        raise ConfigError(f"gate.min_selected={floor!r} is not allowed: an integer from 0 to training.batch_size "
                          f"({batch}); above it every sample of every batch trains")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA device is available; use device=cpu or auto")
    if cfg.init_from and not Path(os.path.expanduser(str(cfg.init_from))).is_file():
        raise ConfigError(f"init_from={str(cfg.init_from)!r} is not a file: pass a run's checkpoints/last.pt")
    if cfg.dataset.get("root") and not cfg.dataset.get("download"):  # keys of datasets read from disk
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


# The argument each task's data gives its model (tasks.py's model_kwargs): the model must take it.
TASK_MODEL_ARGUMENT = {"classification": "num_classes", "char_lm": "vocab_size"}


def takes(target: str, argument: str) -> bool:
    """Whether the callable a `_target_` names accepts `argument` (by name or through **kwargs)."""
    parameters = inspect.signature(get_object(target)).parameters.values()
    return any(p.name == argument or p.kind == p.VAR_KEYWORD for p in parameters)


def refuse_model_for_another_task(cfg: DictConfig, choices: dict[str, str], conf_dir: Path) -> None:
    """`task=char_lm model=cnn`: refused before anything is built, naming the models the task can
    train (those of conf/model/ that take the task's argument) rather than a constructor's
    "unexpected keyword argument"."""
    task, argument = choices.get("task"), TASK_MODEL_ARGUMENT.get(choices.get("task"))
    if argument is None or takes(cfg.model._target_, argument):
        return
    fitting = [f"model={path.stem}" for path in sorted((conf_dir / "model").glob("*.yaml"))
               if takes(OmegaConf.load(path)._target_, argument)]
    raise ConfigError(f"task={task} needs {' or '.join(fitting)}: model={choices.get('model')} does not take "
                      f"{argument}, which this task's data gives the model")


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
    refuse_model_for_another_task(cfg, hydra.choices, conf_dir)
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
