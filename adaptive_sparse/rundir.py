"""One run per run directory: an advisory lock held for as long as the run lives.

Two runs writing one `hydra.run.dir` mix their `metrics.jsonl`, checkpoints and summaries into
something that reads like one run. `train.py` therefore takes an exclusive `flock` on
RUN_DIR/.lock before it writes anything of its own (and, when `hydra.run.dir` is on the command
line, before Hydra writes its `.hydra/` files). The kernel releases the lock when the process
ends, however it ends (an exception, SIGKILL, a node reboot), so a crashed run never leaves its
directory locked; a second run into a locked directory is refused with the holder named. Under
torchrun rank 0 alone holds it. `flock` works on local disks and on NFSv4 (and lustre mounted
with `flock`); elsewhere it locks nothing, as the message on such file systems cannot tell.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run directory -> this process's locked descriptor


class RunDirLocked(RuntimeError):
    """Another live process holds this run directory."""


def lock_run_dir(run_dir: str | os.PathLike) -> bool:
    """Take the run directory's lock (creating the directory); True if this call took it, False
    if this process already held it. Raises RunDirLocked, naming the holder, if another does."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return False
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


def lock_from_argv(argv: list[str]) -> None:
    """Before Hydra writes `.hydra/` and `train.log`: lock `hydra.run.dir=...` if the command line
    names one (a single run, on rank 0). The lock is then held until the process exits."""
    if any(a in ("-m", "--multirun") for a in argv) or not is_rank_zero():
        return
    named = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if named:
        value = named[-1]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # Hydra's quoting
            value = value[1:-1]
        lock_run_dir(value)


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Temporary files of a save that a kill interrupted (`.NAME.*.tmp` beside their target, see
    checkpointing._atomic_write); safe to delete once the directory's lock is held."""
    run_dir = Path(run_dir)
    stale = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
             for p in folder.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
