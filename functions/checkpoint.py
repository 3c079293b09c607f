"""Atomic checkpoints: a run's file is either the previous complete one or the new complete one, never half."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from functions.errors import UserError

CHECKPOINT_NAME = "checkpoint_last.pt"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on CPU; a missing, truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); "
                        "delete it to start over, or pass another --output_dir") from None
    if not isinstance(state, dict) or "format" not in state:
        raise UserError(f"{path} is not a checkpoint of this project")
    return state
