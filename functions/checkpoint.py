"""Atomic checkpoints: a run's file is either the previous complete one or the new complete one, never half."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from functions.errors import UserError

CHECKPOINT_NAME = "checkpoint_last.pt"
_TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary files a save of `path` writes (hidden, so they never look like checkpoints)."""
    return f".{path.name}."


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=_TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


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


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files a save of `path` left behind when its process was killed before the rename."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{_temporary_prefix(path)}*{_TEMPORARY_SUFFIX}"))


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the leftovers of killed saves of `path` (never the checkpoint itself); return what was removed."""
    removed = stale_temporaries(path)
    for leftover in removed:
        leftover.unlink(missing_ok=True)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on CPU; a missing, truncated or foreign file is one clear error and is left untouched."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); "
                        "delete it to start over, or pass another --output_dir") from None
    if not isinstance(state, dict) or "format" not in state:
        raise UserError(f"{path} is not a checkpoint of this project; delete it or pass another --output_dir")
    return state
