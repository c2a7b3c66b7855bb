"""One run per run directory: an advisory lock held for as long as the run lives.

Two runs writing one `hydra.run.dir` mix their `metrics.jsonl`, checkpoints and summaries into
something that reads like one run. `train.py` therefore takes an exclusive `flock` on
RUN_DIR/.lock before Hydra writes its `.hydra/` files and `train.log` (`lock_from_argv`). Without
`hydra.run.dir` on the command line the config's default, `outputs/DATE/TIME`, is made there
first, a fresh directory for each run: Hydra's name has one-second resolution, and runs started in
the same second (array jobs, scripted launches) would share it. The kernel releases the lock when
the process ends, however it ends (an exception, SIGKILL, a node reboot), so a crashed run never leaves its
directory locked; a second run into a locked directory is refused with the holder named. Under
torchrun rank 0 alone holds it. `flock` works on local disks and on NFSv4 (and lustre mounted
with `flock`); elsewhere it locks nothing, as the message on such file systems cannot tell.

Preemption that saves: SIGTERM (SLURM, submitit, a cluster's eviction) and Ctrl-C finish the
current batch, write a checkpoint that resumes exactly where the run stopped, and exit.

The handler only raises a flag; the training loop looks at it after every loader batch (all
ranks together under torchrun, so every rank stops after the same batch and joins the same
checkpoint). A second Ctrl-C while the checkpoint is being written stops at once.

A person's mistake reads as one or two lines; a bug keeps its traceback.

User errors (a config value, a dataset, a checkpoint, a resume refusal, a locked run directory,
a full disk, a non-finite loss) are logged through the `train` logger, so they reach the console
and `train.log`, and the run exits with status 1 without a traceback. Any other exception is a
bug and propagates with its traceback, as do user errors with `HYDRA_FULL_ERROR=1`. In a
multirun the job fails through Hydra (which lists it) so the sweep's other jobs still run.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import signal
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from torch import nn

from adaptive_sparse.training.checkpoint import CheckpointError
from adaptive_sparse.training.data import DatasetError
from adaptive_sparse.training.io import DiskFullError
from adaptive_sparse.training.step import NonFiniteLossError


class ConfigError(ValueError):
    """A config value out of range; the message names the key and what is allowed."""


LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run directory -> this process's locked descriptor


class RunDirError(RuntimeError):
    """A run directory this run cannot have: another run holds it, or it cannot be written."""


class RunDirLocked(RunDirError):
    """Another live process holds this run directory."""


@contextlib.contextmanager
def _writing(run_dir: Path) -> Iterator[None]:
    """An OSError making or locking the run directory (a read-only file system, another user's
    folder) as one line naming it."""
    try:
        yield
    except OSError as err:
        raise RunDirError(f"cannot write the run directory {run_dir} ({err.strerror or err}); choose a "
                          "writable hydra.run.dir (nothing was written)") from None


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take the run directory's lock (creating the directory); True if this call took it, False
    if this process already held it. Raises RunDirLocked, naming the holder, if another does, and
    RunDirError if the directory cannot be written."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return False
    with _writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise RunDirLocked(f"{run_dir} is in use by another run ({holder}); wait for it to end, or choose "
                           "another hydra.run.dir (nothing was written)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    _held[run_dir] = fd
    return True


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def is_rank_zero() -> bool:
    """Rank 0 of torchrun, or a single process (torch.distributed is not set up yet at start-up)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock for a block, on rank 0 (re-entrant: a lock this process already holds stays held)."""
    took = is_rank_zero() and lock_run_dir(run_dir)
    try:
        yield
    finally:
        if took:
            unlock_run_dir(run_dir)


_NOW = re.compile(r"\$\{now:([^}]*)\}")  # Hydra's `${now:FORMAT}` resolver: datetime.now().strftime(FORMAT)


def configured_run_dir(config_file: Path) -> str | None:
    """The config file's `hydra.run.dir`, unresolved (`outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}`)."""
    config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    return config.get("hydra", {}).get("run", {}).get("dir")


def fresh_run_dir(pattern: str, now: datetime | None = None) -> Path | None:
    """The default run directory `pattern` resolved at `now`, made by this call and so this run's
    alone: a name already taken (a run started in the same second) becomes NAME_1, NAME_2, ...
    None when the pattern holds more than `${now:...}` (left to Hydra)."""
    when = now or datetime.now()
    resolved = _NOW.sub(lambda match: when.strftime(match.group(1)), pattern)
    if "${" in resolved:
        return None
    base = Path(resolved)
    with _writing(base):
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            candidate = base.with_name(f"{base.name}_{n}") if n else base
            try:
                candidate.mkdir()  # atomic: of two runs making one name, exactly one succeeds
                return candidate
            except FileExistsError:
                continue


NO_RUN_FLAGS = {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc",
                "--shell-completion", "-m", "--multirun"}  # Hydra runs no single job: nothing to lock
RUN_FLAGS = {"-r", "--run"}


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting
        return value[1:-1]
    return value


def lock_from_argv(argv: list[str], default_dir: str | None = None) -> list[str]:
    """Before Hydra writes `.hydra/` and `train.log` (a single run, on rank 0): lock the directory
    `hydra.run.dir=...` names, or else a fresh one made from the config's pattern `default_dir`
    (fresh_run_dir), then named on the returned command line for Hydra. Another config
    (--config-name, ...) keeps Hydra's own default. The lock is held until the process exits."""
    flags = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    if flags & NO_RUN_FLAGS or "hydra.mode=MULTIRUN" in argv or not is_rank_zero():
        return argv
    named = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if named:
        lock_run_dir(_unquoted(named[-1]))
        return argv
    run_dir = fresh_run_dir(default_dir) if default_dir and not flags - RUN_FLAGS else None
    if run_dir is None:
        return argv
    lock_run_dir(run_dir)
    return [*argv, f"hydra.run.dir={run_dir}"]


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Temporary files of a save that a kill interrupted (`.NAME.*.tmp` beside their target, see
    checkpointing._atomic_write); safe to delete once the directory's lock is held."""
    run_dir = Path(run_dir)
    stale = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
             for p in folder.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for a run's lifetime (`with StopRequest() as stop:`); `signal` is the first stop
    signal received, or None."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signal = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: stop now (exit 130)

    def requested(self, ranks) -> bool:
        """Whether to stop after this batch: here, or under torchrun on any rank."""
        mine = float(self.signal or 0)
        agreed = ranks.all_reduce_max(mine)
        if agreed and self.signal is None:
            self.signal = int(agreed)
        return bool(agreed)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "none"

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or 0)  # the shell's convention for a death by signal


USER_ERRORS = (ConfigError, DatasetError, CheckpointError, DiskFullError, RunDirError, NonFiniteLossError)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of a user error; None for anything else (a bug)."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    cause = err.__cause__
    if isinstance(err, InstantiationException) and isinstance(cause, (ValueError, TypeError)):
        target = str(err).split("'")[1] if "'" in str(err) else "a config object"
        return f"{cause} (building {target})"  # a gate, model or attention refusing a value
    return None


def checkpoint_note(path: Path) -> str:
    """What a failed run leaves to resume from."""
    if not path.is_file():
        return "no checkpoint was written yet"
    return f"{path} is untouched: resume=true continues from it"


@contextlib.contextmanager
def user_errors_reported(log: logging.Logger, multirun: bool = False,
                         checkpoint: Path | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        message = user_error_message(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, NonFiniteLossError) and checkpoint is not None:
            message = f"{message}; {checkpoint_note(checkpoint)}"
        log.error("%s", message)
        if multirun:
            raise
        raise SystemExit(1) from None


# --------------------------------------------------------------------------- test-only faults

def signal_at_step(model: nn.Module, at_step: int | None, signum: int = 15) -> None:
    """Test-only (`debug.signal_at_step`): the `at_step`-th training forward sends this process
    a real SIGTERM, as a cluster's preemption would (None: never)."""
    if at_step is None:
        return
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == at_step:
                os.kill(os.getpid(), signum)

    model.register_forward_hook(hook)


def inject_nan_at_step(model: nn.Module, at_step: int | None) -> None:
    """Test-only fault injection (`debug.inject_nan_at_step`): the `at_step`-th training forward
    (train mode with autograd on; scoring and evaluation forwards do not count) returns NaN logits."""
    if at_step is None:
        return
    forwards = 0

    def poison(module: nn.Module, inputs, output: torch.Tensor):
        nonlocal forwards
        if not (module.training and torch.is_grad_enabled()):
            return None
        forwards += 1
        return output * float("nan") if forwards == at_step else None

    model.register_forward_hook(poison)
