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
from typing import Any, Mapping

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


def check_checkpoint_layout(state: dict[str, Any], source: str,
                            fix: str = "delete it or pass another --output_dir") -> None:
    """Refuse a checkpoint that lacks a key of its format, has a format this version does not read, or holds values
    of the wrong type."""
    known = isinstance(state["format"], int) and state["format"] in KEYS_OF_FORMAT
    missing = sorted((KEYS_OF_FORMAT[state["format"]] if known else CHECKPOINT_KEYS) - set(state))
    if missing:
        raise UserError(f"{source} is incomplete (no {', '.join(missing)}); {fix}")
    if not known:
        raise UserError(f"{source} has format {state['format']!r}, this version reads formats "
                        f"{' and '.join(str(f) for f in sorted(KEYS_OF_FORMAT))}; evaluate or resume it with the "
                        "version that wrote it")
    problem = checkpoint_value_problem(state)
    if problem:
        raise UserError(f"{source} is not a checkpoint this project wrote ({problem}); {fix}")


def is_count(value: Any) -> bool:
    """A non-negative Python int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    """A real Python number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_map(value: Any) -> bool:
    """A mapping of names to tensors (a module's state dict)."""
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items())


def _rng_problem(rng: Any) -> str | None:
    """What is wrong with a checkpoint's saved random states (as rng_state writes them), or None."""
    if not isinstance(rng, Mapping) or not {"python", "numpy", "torch", "cuda"} <= set(rng):
        return "rng is not the random states of a run"
    python, numpy_state = rng["python"], rng["numpy"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)
            and all(is_count(n) for n in python[1])):
        return "rng.python is not a Python random state"
    if not (isinstance(numpy_state, tuple) and len(numpy_state) == 5 and isinstance(numpy_state[1], np.ndarray)
            and numpy_state[1].dtype == np.uint32 and numpy_state[1].shape == (624,)
            and all(_is_number(n) for n in numpy_state[2:])):
        return "rng.numpy is not a NumPy random state"
    tensors = [rng["torch"], *(rng["cuda"] if isinstance(rng["cuda"], (list, tuple)) else [None])]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in tensors):
        return "rng.torch or rng.cuda is not a torch random state"
    return None


def _metrics_problem(metrics: Any) -> str | None:
    """What is wrong with a checkpoint's metrics (lists of [index, value], a `final` mapping), or None."""
    if not isinstance(metrics, Mapping) or not all(isinstance(key, str) for key in metrics):
        return "metrics is not a mapping of names"
    for key, value in metrics.items():
        if key in ("train_loss", "knn_acc") and not isinstance(value, list):
            return f"metrics.{key} is not a list"
        if isinstance(value, list) and not all(isinstance(entry, (list, tuple)) and len(entry) == 2
                                               and is_count(entry[0]) for entry in value):
            return f"metrics.{key} is not a list of [index, value] pairs"
        if key == "final" and not isinstance(value, Mapping):
            return "metrics.final is not a mapping"
    return None


def _clients_problem(clients: Any) -> str | None:
    """What is wrong with a checkpoint's clients (per-client models, momentum copies, optimizers), or None."""
    if not isinstance(clients, Mapping) or not isinstance(clients.get("models"), list) or not clients["models"]:
        return "clients holds no client models"
    if not all(_is_tensor_map(model) for model in [*clients["models"], *clients.get("momentum_models", [])]):
        return "clients' models are not state dicts of tensors"
    if not all(isinstance(optimizer, Mapping) for optimizer in clients.get("optimizers", [])):
        return "clients' optimizers are not optimizer states"
    return None


def checkpoint_value_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with the values of a checkpoint that has its format's keys (types, counts), or None: a file
    of this project never has any, a foreign or edited one may."""
    for key in ("args", "signature", "server_optimizer", "scaler", *(["parts"] if "parts" in state else [])):
        if not isinstance(state[key], Mapping):
            return f"{key} is not a mapping"
    if not all(isinstance(key, str) for key in state["args"]):
        return "args is not a mapping of option names"
    for key in ("epoch", "step_in_epoch", "global_step"):
        if not is_count(state[key]):
            return f"{key} is {state[key]!r}, not a count"
    if not isinstance(state["partition_hash"], str):
        return "partition_hash is not a string"
    if not _is_tensor_map(state["method"]):
        return "method is not a state dict of tensors"
    optional_counts = {"skipped_steps": state.get("skipped_steps", 0), **{
        f"client_steps[{index}]": steps for index, steps in enumerate(state.get("client_steps", []))}}
    if not isinstance(state.get("client_steps", []), list):
        return "client_steps is not a list"
    for name, value in optional_counts.items():
        if not is_count(value):
            return f"{name} is {value!r}, not a count"
    statistics = state.get("epoch_statistics", {"sums": {}, "steps": 0})
    if not (isinstance(statistics, Mapping) and isinstance(statistics.get("sums"), Mapping)
            and all(_is_number(v) for v in statistics["sums"].values()) and is_count(statistics.get("steps"))):
        return "epoch_statistics is not sums and a count of steps"
    return _clients_problem(state["clients"]) or _rng_problem(state["rng"]) or _metrics_problem(state["metrics"])


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
