"""Checkpoints: written atomically (a run's file is the previous complete one or the new one, never half), read
with one clear line for a bad file, and checked against the run that wants to continue them."""
from __future__ import annotations

import importlib
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functions.core.errors import UserError
from functions.core.files import TEMPORARY_SUFFIX, temporary_prefix, write_atomic

CHECKPOINT_NAME = "checkpoint_last.pt"
BEST_CHECKPOINT_NAME = "checkpoint_best.pt"  # the state of the epoch with the best kNN monitor so far
CHECKPOINT_FORMAT = 2
# Keys every checkpoint of this format holds; a file without them is refused before anything is loaded. "parts":
# the state of every stateful part of the run by the part's name (the method's extra state, the FedAvg rule's, the
# defences', communication saving's).
CHECKPOINT_KEYS = frozenset({"format", "args", "signature", "partition_hash", "epoch", "step_in_epoch", "global_step",
                             "method", "parts", "clients", "server_optimizer", "scaler", "rng", "metrics"})
# Format 1 kept each stateful part under a key of its own (None when the run had no such part): its key -> the part.
FORMAT_1_PARTS = {"method_extra": "method_extra", "fedavg_state": "fedavg.divergence_aware",
                  "ressfl": "defence.ressfl", "communication": "communication"}
FORMAT_1_KEYS = (CHECKPOINT_KEYS - {"parts"}) | {"method_extra"}
KEYS_OF_FORMAT = {1: FORMAT_1_KEYS, CHECKPOINT_FORMAT: CHECKPOINT_KEYS}




class Checkpointed:
    """A stateful part of a run (a FedAvg rule, a privacy defence): the trainer saves and restores it through these
    two methods without knowing what it is; the defaults keep no state."""

    def state_dict(self) -> dict:
        """What the part keeps between steps (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

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


def _numpy_globals() -> list[Any]:
    """The numpy types a checkpoint's saved NumPy random state needs (numpy 1.x and 2.x module paths)."""
    allowed: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(getattr(importlib.import_module(module), "_reconstruct"))
        except (ImportError, AttributeError):
            continue
    return allowed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on CPU; a missing, truncated, foreign or unsafe file is one clear error, left untouched.

    Only tensors, plain Python values and the NumPy arrays of a random state are read (torch.load with
    weights_only=True and that allow-list): a file that asks to build anything else (a crafted checkpoint that
    would run code while it is read) is refused before any of it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_globals()):
            warnings.simplefilter("ignore")  # numpy's deprecated module paths, read for old files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"got <class '([\w.]+)'>", str(error))
        if found is None:  # not a pickle at all (truncated, another format)
            raise UserError(f"checkpoint {path} is corrupt or truncated (UnpicklingError); "
                            "delete it to start over, or pass another --output_dir") from None
        raise UserError(f"refused to read {path}: it asks to build {found.group(1)}, which a checkpoint of this "
                        "project never holds (a crafted or foreign file); nothing in it was run") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); "
                        "delete it to start over, or pass another --output_dir") from None
    if not isinstance(state, dict) or "format" not in state:
        raise UserError(f"{path} is not a checkpoint of this project; delete it or pass another --output_dir")
    return state


def check_checkpoint_layout(state: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint that lacks a key of its format, or has a format this version does not read."""
    known = isinstance(state["format"], int) and state["format"] in KEYS_OF_FORMAT
    missing = sorted((KEYS_OF_FORMAT[state["format"]] if known else CHECKPOINT_KEYS) - set(state))
    if missing:
        raise UserError(f"{source} is incomplete (no {', '.join(missing)}); delete it or pass another --output_dir")
    if not known:
        raise UserError(f"{source} has format {state['format']!r}, this version reads formats "
                        f"{' and '.join(str(f) for f in sorted(KEYS_OF_FORMAT))}; evaluate or resume it with the "
                        "version that wrote it")


def checkpoint_parts(state: dict[str, Any]) -> dict[str, Any]:
    """The states of a checkpoint's stateful parts by part name (format 1's own keys read as their parts)."""
    if state["format"] == 1:
        return {part: state[key] for key, part in FORMAT_1_PARTS.items() if state.get(key) is not None}
    return state["parts"]


def first_non_finite(tree: Any, name: str = "") -> str | None:
    """Name of the first floating tensor holding inf or NaN in nested dicts/lists/tuples, or None."""
    named: list[tuple[str, torch.Tensor]] = []

    def collect(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                named.append((path, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                collect(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                collect(value, f"{path}[{index}]")

    collect(tree, name)
    positions_by_device: dict[torch.device, list[int]] = {}
    for position, (_, tensor) in enumerate(named):
        positions_by_device.setdefault(tensor.device, []).append(position)
    finite = [True] * len(named)
    for positions in positions_by_device.values():  # one host transfer per device
        flags = torch.stack([named[p][1].isfinite().all() for p in positions]).cpu().tolist()
        for position, flag in zip(positions, flags):
            finite[position] = flag
    return next((path for (path, _), ok in zip(named, finite) if not ok), None)


def rng_state() -> dict[str, Any]:
    """The global random states (Python, NumPy, torch CPU and CUDA) a checkpoint keeps."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global random states saved by rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
