"""Safe saving: a file is either the old version or the complete new one, never half of each."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch


def _atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, "w", lambda handle: handle.write(text))
