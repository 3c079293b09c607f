"""Starting, resuming and evaluating a run: the run folder and the checkpoint to continue (or to evaluate).

`run(args)` is what the entry scripts call: it joins torchrun's process group when there is one, builds the
Trainer of the method the options name, trains (or resumes, or only evaluates) and returns the final results.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from configs import save_resolved_config
from functions.checkpoint import CHECKPOINT_NAME, load_checkpoint, remove_stale_temporaries
from functions.distributed import (Runtime, all_reduce_max_flag, broadcast_object, check_clients_per_rank,
                                   planned_world_size, run_agreed, setup_runtime, shutdown_runtime)
from functions.errors import UserError
from functions.evaluation import FINAL_EVALUATIONS, Evaluation
from functions.loaders import pool_size_of
from functions.logs import logger, setup_logging
from functions.simulator import Trainer


def prepare_output_dir(path: str) -> Path:
    """The run folder, created if needed and checked to be writable (one line when it is not)."""
    output_dir = Path(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write_test.{os.getpid()}"  # one per process: ranks probe the same folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output_dir {path} is not writable ({error.strerror}); choose another folder") from None
    return output_dir


def run(args: argparse.Namespace, evaluations: Sequence[Evaluation] = FINAL_EVALUATIONS) -> dict[str, Any]:
    """Train (or resume, or only evaluate) one run and return its final results (every rank, under torchrun)."""
    world_size = planned_world_size()
    if world_size > 1:  # before joining the process group: a run that cannot be split fails at once, on every rank
        check_clients_per_rank(pool_size_of(args.num_client, args.client_sample_ratio), args.num_client,
                               args.client_sample_ratio, world_size)
    runtime = setup_runtime(args.device)
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)  # off by default: reproducible convolutions
    try:
        return _run_on(runtime, args, evaluations)
    finally:
        shutdown_runtime(runtime)


def starting_state(args: argparse.Namespace, runtime: Runtime, checkpoint_path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a new run), decided by rank 0 and the same on every rank.

    Ranks that see the file read it themselves (a shared file system); when some do not (nodes with their own
    disks), rank 0 sends its copy. A refusal is raised on every rank, so no rank is left waiting for the others.
    """
    problem: str | None = None
    if runtime.is_main:
        if not args.resume and checkpoint_path.exists():
            problem = f"{checkpoint_path} exists: add --resume to continue that run, or choose a new --output_dir"
        elif args.resume and not checkpoint_path.exists():
            problem = f"--resume: no {CHECKPOINT_NAME} in {checkpoint_path.parent}; run without --resume to start"
    if not runtime.is_distributed:
        if problem:
            raise UserError(problem)
        return load_checkpoint(checkpoint_path) if args.resume else None
    problem = broadcast_object(problem, 0, runtime.device)
    if problem:
        raise UserError(problem)
    if not args.resume:
        return None
    if not all_reduce_max_flag(not checkpoint_path.exists(), runtime.device):
        return load_checkpoint(checkpoint_path)
    state: dict[str, Any] | None = None
    if runtime.is_main:
        try:
            state = load_checkpoint(checkpoint_path)
        except UserError as error:
            problem = str(error)
    problem, state = broadcast_object((problem, state), 0, runtime.device)
    if problem:
        raise UserError(problem)
    return state


def _run_on(runtime: Runtime, args: argparse.Namespace, evaluations: Sequence[Evaluation]) -> dict[str, Any]:
    """run() once the process knows its rank and device."""
    if args.eval_only:
        return evaluate_checkpoint(args, runtime, evaluations)
    output_dir = run_agreed(lambda: prepare_output_dir(args.output_dir))
    setup_logging(output_dir, runtime.is_main)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state = starting_state(args, runtime, checkpoint_path)  # a bad file is refused before anything changes
    if runtime.is_main:
        for leftover in remove_stale_temporaries(checkpoint_path):
            logger.info(f"removed {leftover.name}, left by a save that was killed before it completed")
    run_agreed(lambda: save_resolved_config(args, output_dir / "config.yaml") if runtime.is_main else None)
    trainer = Trainer(args, runtime, output_dir, evaluations)
    try:
        logger.info(f"{args.method}: {args.num_client} clients, {trainer.steps_per_epoch} steps per epoch, "
                    f"device {runtime.device}, data {trainer.data.loaders.backend}, output {output_dir}")
        if state is not None:
            trainer.load_state_dict(state, source=str(checkpoint_path))
            logger.info(f"resumed from {checkpoint_path} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        # While training, SIGTERM/SIGINT end the current step, save the checkpoint and exit with the resume command.
        # Outside it (data loading, final evaluation) they act as usual: there is nothing new to save.
        with trainer.stop:
            trainer.train()
        results = trainer.final_evaluation()
        trainer.save_checkpoint()
    finally:
        trainer.close()
    return results


def evaluate_checkpoint(args: argparse.Namespace, runtime: Runtime,
                        evaluations: Sequence[Evaluation] = FINAL_EVALUATIONS) -> dict[str, Any]:
    """--eval_only: rebuild the run a checkpoint came from and run the final evaluation on it."""
    state = load_checkpoint(args.checkpoint)
    if not isinstance(state.get("args"), dict):
        raise UserError(f"{args.checkpoint} is incomplete (no args); pass a checkpoint_last.pt written by a training run")
    saved = argparse.Namespace(**state["args"])
    saved.data_dir, saved.device, saved.num_workers = args.data_dir, args.device, args.num_workers
    saved.linear_epochs, saved.skip_linear, saved.eval_batch_size = args.linear_epochs, args.skip_linear, args.eval_batch_size
    output_dir = prepare_output_dir(str(Path(args.checkpoint).resolve().parent / "eval_only"))
    setup_logging(output_dir, runtime.is_main)
    trainer = Trainer(saved, runtime, output_dir, evaluations)
    trainer.load_state_dict(state, check_signature=False, source=str(args.checkpoint))
    try:
        return trainer.final_evaluation()
    finally:
        trainer.close()
