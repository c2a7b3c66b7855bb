"""Safe saving: a file is either the old version or the complete new one, never half of each."""
from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch


class DiskFullError(OSError):
    """No space (or quota) left for a file; the previous version of it, if any, is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: group members of a shared folder can read


def _atomic_write(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temporary file beside `path`, fsync it, then rename it over `path`.
    The file gets the mode an ordinary open() would (mkstemp's 0600 would hide it from the group)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {path} "
                                f"({'the previous version is intact' if path.exists() else 'nothing was written'})") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    # serialised in memory first: torch's zip writer turns a full disk into "unexpected pos
    # N vs M"; writing the bytes ourselves surfaces the real error (ENOSPC) instead
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic_write(path, "wb", lambda handle: handle.write(buffer.getbuffer()))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    _atomic_write(path, "w", lambda handle: handle.write(text))
