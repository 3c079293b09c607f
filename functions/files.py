"""Files written whole or not at all: a reader finds the previous complete file or the new one, never half of one."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from functions.errors import UserError

TEMPORARY_SUFFIX = ".tmp"


def temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary files a write of `path` makes (hidden, so they never look like results)."""
    return f".{path.name}."


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Let `write` fill a temporary file in the same folder, flush it to disk, then rename it over `path`.

    A failing file system (full disk, removed folder) is one clear error; the previous file stays as it was.
    """
    path = Path(path)
    try:
        temporary = path.parent / f"{temporary_prefix(path)}{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
        # os.open rather than mkstemp: the file gets the umask's permissions (mkstemp's are owner-only).
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error}); the previous {path.name}, if any, "
                        "is unchanged") from None
    _fsync_folder(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """write_atomic for UTF-8 text."""
    data = text.encode("utf-8")
    write_atomic(path, lambda stream: stream.write(data))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(descriptor)
