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

from configs import (
    RUNTIME_OPTIONS,
    build_parser,
    given_options,
    run_options,
    save_resolved_config,
    saved_options_problem,
    unused_options,
)
from functions.core.checkpoint import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    check_checkpoint_layout,
    load_checkpoint,
    remove_stale_temporaries,
)
from functions.core.distributed import (
    Runtime,
    all_reduce_max_flag,
    broadcast_object,
    check_clients_per_rank,
    planned_world_size,
    run_agreed,
    setup_runtime,
    shutdown_runtime,
)
from functions.core.errors import UserError
from functions.core.files import RunFolderLock
from functions.core.logs import logger, setup_logging
from functions.data.loaders import pool_size_of
from functions.evaluation.context import Evaluation
from functions.methods.registry import method_class
from functions.sfl.overhead import describe
from functions.train.evaluations import FINAL_EVALUATIONS
from functions.train.resume_checks import check_same_method
from functions.train.stopping import StopSignal
from functions.train.trainer import Trainer


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
    # From here to the end no stop signal goes unanswered: in training it ends the step and saves, elsewhere it
    # stops at once and says what was saved.
    stop = StopSignal(announce=runtime.is_main)
    stop.outside_training("before training started; nothing new was saved (run the same command again)")
    try:
        with stop:
            return _run_on(runtime, args, evaluations, stop)
    finally:
        shutdown_runtime(runtime)


def starting_state(args: argparse.Namespace, runtime: Runtime, checkpoint_path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a new run), decided by rank 0 and the same on every rank.

    Ranks that see the file read it themselves (a shared file system); when some do not (nodes with their own
    disks), rank 0 sends its copy. A refusal is raised on every rank, so no rank is left waiting for the others.
    """
    problem: str | None = None
    if runtime.is_main:
        best_path = checkpoint_path.with_name(BEST_CHECKPOINT_NAME)
        if not args.resume and checkpoint_path.exists():
            problem = f"{checkpoint_path} exists: add --resume to continue that run, or choose a new --output_dir"
        elif not args.resume and best_path.exists():
            # A run writes its best after its last, so a best without a last is another run's: this run would
            # report it as its own best epoch (--eval_protocol mocosfl).
            problem = (f"{best_path} is left from an earlier run (no {CHECKPOINT_NAME} beside it); a new run writes "
                       "its own: remove it, or choose a new --output_dir")
        elif args.resume and not checkpoint_path.exists():
            problem = f"--resume: no {CHECKPOINT_NAME} in {checkpoint_path.parent}; run without --resume to start"
    if not runtime.is_distributed:
        if problem:
            raise UserError(problem)
        return load_checkpoint(checkpoint_path) if args.resume else None
    problem = broadcast_object(problem, 0, runtime.device)
    if problem:
        raise UserError(problem)
    return read_on_every_rank(checkpoint_path, runtime) if args.resume else None


def read_on_every_rank(checkpoint_path: Path, runtime: Runtime) -> dict[str, Any]:
    """A checkpoint that rank 0 can read, on every rank (under torchrun, sent by rank 0 to ranks that cannot see the
    file); a refusal is raised on every rank."""
    if not runtime.is_distributed or not all_reduce_max_flag(not checkpoint_path.exists(), runtime.device):
        return load_checkpoint(checkpoint_path)
    problem: str | None = None
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


def _run_on(runtime: Runtime, args: argparse.Namespace, evaluations: Sequence[Evaluation],
            stop: StopSignal) -> dict[str, Any]:
    """run() once the process knows its rank and device."""
    if args.eval_only:
        stop.outside_training(f"during --eval_only; {args.checkpoint} is unchanged")
        return evaluate_checkpoint(args, runtime, evaluations)
    output_dir = run_agreed(lambda: prepare_output_dir(args.output_dir))
    lock = run_agreed(lambda: lock_run_folder(output_dir, runtime))  # one run per folder
    setup_logging(output_dir, runtime.is_main)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state = starting_state(args, runtime, checkpoint_path)  # a bad file is refused before anything changes
    if state is not None:
        check_checkpoint_layout(state, str(checkpoint_path))
        check_same_method(state, args.method, checkpoint_path)
    unused = unused_options(args)
    if unused:
        logger.warning(f"{', '.join('--' + name for name in unused)}: no effect on {args.method} (options of the "
                       "seed's other method, accepted for its command lines)")
    if runtime.is_main:
        for leftover in [*remove_stale_temporaries(checkpoint_path),
                         *remove_stale_temporaries(checkpoint_path.with_name(BEST_CHECKPOINT_NAME))]:
            logger.info(f"removed {leftover.name}, left by a save that was killed before it completed")
    run_agreed(lambda: save_resolved_config(args, output_dir / "config.yaml") if runtime.is_main else None)
    trainer = Trainer(args, runtime, output_dir, evaluations, stop=stop)
    try:
        logger.info(f"{args.method}: {args.num_client} clients, {trainer.steps_per_epoch} steps per epoch, "
                    f"device {runtime.device}, data {trainer.data.loaders.backend}, output {output_dir}")
        logger.info(describe(trainer.overhead))
        if state is not None:
            trainer.load_state_dict(state, source=str(checkpoint_path))
            logger.info(f"resumed from {checkpoint_path} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        trainer.train()
        entry = method_class(args.method).entry_script
        stop.outside_training(f"during the final evaluation; training is complete and saved in {checkpoint_path} "
                              f"(step {trainer.global_step}); evaluate it with: python {entry} --eval_only "
                              f"--checkpoint {checkpoint_path}")
        results = final_results(trainer, output_dir, runtime)
        trainer.save_checkpoint()
    finally:
        trainer.close()
        lock.release()
    return results


def final_results(trainer: Trainer, output_dir: Path, runtime: Runtime) -> dict[str, Any]:
    """The final evaluation of a finished run: of its last model, or under --eval_protocol mocosfl of the epoch with
    the best kNN accuracy (checkpoint_best.pt), as MocoSFL evaluates."""
    best_path = output_dir / BEST_CHECKPOINT_NAME
    if trainer.args.eval_protocol != "mocosfl":
        return trainer.final_evaluation()
    if not all_reduce_max_flag(not best_path.exists() if runtime.is_main else False, runtime.device):
        best = read_on_every_rank(best_path, runtime)
        check_checkpoint_layout(best, str(best_path))
        logger.info(f"--eval_protocol mocosfl: evaluating {best_path} (epoch {best['epoch']}, the best kNN accuracy)")
        with trainer.weights_of(best, str(best_path)):
            return trainer.final_evaluation(model=BEST_CHECKPOINT_NAME)
    logger.warning(f"--eval_protocol mocosfl: no {BEST_CHECKPOINT_NAME} (no complete epoch was monitored); "
                   "evaluating the last model")
    return trainer.final_evaluation()


def lock_run_folder(output_dir: Path, runtime: Runtime) -> RunFolderLock:
    """Rank 0 locks the run folder for the whole run (a second run on it is refused); other ranks hold nothing."""
    lock = RunFolderLock(output_dir)
    if runtime.is_main:
        lock.acquire()
    return lock


def evaluate_checkpoint(args: argparse.Namespace, runtime: Runtime,
                        evaluations: Sequence[Evaluation] = FINAL_EVALUATIONS) -> dict[str, Any]:
    """--eval_only: rebuild the run a checkpoint came from and run the final evaluation on it.

    The run's training options come from the checkpoint; the options of running and evaluating it (--data_dir,
    --device, --knn_k, --linear_epochs, ...) from this command when it sets them, else from the run. The results go
    to --output_dir, or without it to an eval_only folder beside the checkpoint.
    """
    state = load_checkpoint(args.checkpoint)
    check_checkpoint_layout(state, args.checkpoint, "pass a checkpoint written by a training run")
    method = state["args"].get("method", args.method)
    check_same_method(state, method, args.checkpoint)
    problem = saved_options_problem(state["args"], method)
    if problem:
        raise UserError(f"{args.checkpoint} is not a checkpoint this project wrote ({problem}); pass a checkpoint "
                        "written by a training run")
    # Options newer than the file take the defaults of the checkpoint's own method.
    saved = argparse.Namespace(**{**run_options(build_parser(method).parse_args([])), **state["args"]})
    given = given_options(args)
    for key in (RUNTIME_OPTIONS & given) - {"config", "resume", "checkpoint", "eval_only"}:
        setattr(saved, key, getattr(args, key))
    if "output_dir" not in given:
        saved.output_dir = str(Path(args.checkpoint).resolve().parent / "eval_only")
    saved.eval_only, saved.checkpoint, saved.resume = True, args.checkpoint, False
    output_dir = run_agreed(lambda: prepare_output_dir(saved.output_dir))
    lock = run_agreed(lambda: lock_run_folder(output_dir, runtime))
    setup_logging(output_dir, runtime.is_main)
    trainer = Trainer(saved, runtime, output_dir, evaluations)
    try:
        trainer.load_state_dict(state, check_signature=False, source=str(args.checkpoint))
        name = Path(args.checkpoint).name
        if saved.eval_protocol == "mocosfl" and name != BEST_CHECKPOINT_NAME:
            logger.warning(f"--eval_protocol mocosfl: MocoSFL evaluates the best kNN epoch; {name} is evaluated as "
                           f"given (pass the run's {BEST_CHECKPOINT_NAME} for MocoSFL's figures)")
        return trainer.final_evaluation(model=name)
    finally:
        trainer.close()
        lock.release()
