"""Atomic checkpoints: a run's file is either the previous complete one or the new complete one, never half."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from functions.errors import UserError
from functions.files import TEMPORARY_SUFFIX, temporary_prefix, write_atomic

CHECKPOINT_NAME = "checkpoint_last.pt"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save `state` to `path` atomically: a reader sees the previous complete file or the new one."""
    write_atomic(path, lambda stream: torch.save(state, stream))


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files a save of `path` left behind when its process was killed before the rename."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{temporary_prefix(path)}*{TEMPORARY_SUFFIX}"))


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
