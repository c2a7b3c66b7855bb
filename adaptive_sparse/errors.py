"""A person's mistake reads as one or two lines; a bug keeps its traceback.

User errors (a config value, a dataset, a checkpoint, a resume refusal, a locked run directory,
a full disk, a non-finite loss) are logged through the `train` logger, so they reach the console
and `train.log`, and the run exits with status 1 without a traceback. Any other exception is a
bug and propagates with its traceback, as do user errors with `HYDRA_FULL_ERROR=1`. In a
multirun the job fails through Hydra (which lists it) so the sweep's other jobs still run.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from hydra.errors import InstantiationException

from adaptive_sparse.checkpointing import CheckpointError, DiskFullError
from adaptive_sparse.config import ConfigError
from adaptive_sparse.data import DatasetError
from adaptive_sparse.rundir import RunDirLocked
from adaptive_sparse.step import NonFiniteLossError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, DiskFullError, RunDirLocked, NonFiniteLossError)


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
