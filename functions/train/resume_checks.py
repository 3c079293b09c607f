"""Whether a saved run may be continued by this one: the same method, the same training configuration."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from configs import given_options, training_signature
from functions.core.errors import UserError
from functions.methods.registry import METHODS


@dataclass(frozen=True)
class ResumeCheckOptions:
    """The run options a checkpoint's training configuration is compared with."""

    output_dir: str                # the run folder, named in the refusal
    signature: dict[str, Any]      # configs.training_signature: the options that define what the run computes
    given: frozenset[str]          # configs.given_options: the options the user set

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ResumeCheckOptions:
        """The group of a parsed namespace."""
        return cls(output_dir=args.output_dir, signature=training_signature(args), given=given_options(args))


def check_same_method(state: dict[str, Any], method: str, source: str | os.PathLike) -> None:
    """Refuse to continue a checkpoint of another method (this run's `method`) with this entry script, naming the
    right one."""
    saved_args = state.get("args") if isinstance(state.get("args"), dict) else {}
    saved = saved_args.get("method")
    if saved is not None and not isinstance(saved, str):
        raise UserError(f"{source} names no method ({saved!r}); pass a checkpoint written by a training run")
    if saved is not None and saved != method:
        other = METHODS.get(saved)
        how = f"resume it with {other.entry_script}" if other is not None and other.entry_script else "resume it"
        raise UserError(f"{source} is a checkpoint of method {saved!r}, not {method!r}; {how} and the same "
                        "options, or use a new --output_dir")
    own = METHODS.get(method)
    problem = own.checkpoint_problem(saved_args) if own is not None else None
    if problem:
        raise UserError(f"{source} {problem}")


def _effective_signature(signature: dict[str, Any]) -> dict[str, Any]:
    """The options that change what a run computes: under --cos the MultiStepLR options do not."""
    if signature.get("cos"):
        return {key: value for key, value in signature.items() if key not in ("milestones", "s_gamma", "c_gamma")}
    return signature


def check_same_configuration(state: dict[str, Any], options: ResumeCheckOptions, current_hash: str) -> None:
    """Refuse to resume a checkpoint made under different training options (names the first difference)."""
    saved = _effective_signature(state["signature"])
    current = _effective_signature(options.signature)
    given = options.given
    # An option newer than the checkpoint did not exist for that run: its value here applies, unless set on purpose.
    differing = [key for key in sorted(set(saved) | set(current))
                 if saved.get(key) != current.get(key) and (key in saved or key in given)]
    if differing:
        was = " ".join(f"--{key} {saved.get(key)!r}" for key in differing)
        now = " ".join(f"--{key} {current.get(key)!r}" for key in differing)
        raise UserError(f"the checkpoint in {options.output_dir} was made with {was}, this run has {now}; "
                        "use the same options, or a new --output_dir")
    if state["partition_hash"] != current_hash:
        raise UserError(f"the checkpoint in {options.output_dir} was made on a different data partition; "
                        "use the same data and partition options, or a new --output_dir")
