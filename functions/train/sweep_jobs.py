"""The runs of a sweep: presets x variants x seeds, their options (checked as the entry scripts check them), their
folders OUTPUT_DIR/<preset>[_<variant>]/seed<S>/ and the files the sweep keeps there (sweep_config.yaml, console.log)."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configs import build_parser as build_run_parser
from configs import check_option_values, load_config_file, parse_args_with_config
from functions.core.checkpoint import CHECKPOINT_NAME
from functions.core.errors import UserError
from functions.core.files import write_text_atomic
from functions.methods.registry import method_class, method_names
from functions.train.sweep_job import launcher_command

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIG_NAME = "sweep_config.yaml"
CONSOLE_NAME = "console.log"
# Options the sweep sets itself for every run (or that make no sense across runs): --set and --vary refuse them.
SWEEP_OWNED_OPTIONS = {"seed": "--seeds", "output_dir": "--output_dir", "resume": "rerunning the sweep command",
                       "checkpoint": "a single run", "eval_only": "a single run", "config": "--presets"}
# A folder name part: letters, digits and these; anything else becomes "-".
FOLDER_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
VALUE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9.-]")
MAX_GROUP_NAME = 100


@dataclass(frozen=True)
class Job:
    """One run of the sweep: a preset (with a variant of options) and a seed."""

    preset: Path
    method: str
    group: str  # the preset's stem and variant: the results table's row
    options: dict[str, Any]  # the preset's values with the sweep's
    seed: int
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.group} seed {self.seed}"


def parse_value(text: str) -> Any:
    """An option value given as KEY=VALUE, read as YAML (numbers, true/false, [lists]) like a preset's."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs of --set / --vary, in order; a key the sweep sets itself, or given twice, is refused."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.lstrip("-")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} num_epoch=10")
        if key in SWEEP_OWNED_OPTIONS:
            raise UserError(f"{flag} {key}: the sweep sets {key} for each run; use {SWEEP_OWNED_OPTIONS[key]}")
        if key in values:
            raise UserError(f"{flag} gives {key} twice; give it once")
        values[key] = parse_value(value)
    return values


def check_variants(vary: dict[str, Any], common: dict[str, Any]) -> None:
    """Each --vary a non-empty list of distinct values, of an option --set does not also fix."""
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"--vary {key}: give a list of values, e.g. --vary {key}=[1,2]")
        repeated = next((value for index, value in enumerate(values) if value in values[:index]), None)
        if repeated is not None or len({json.dumps(value, sort_keys=True) for value in values}) < len(values):
            raise UserError(f"--vary {key} lists {repeated!r} twice: each variant would run (and count) twice; "
                            "list each value once")
        if key in common:
            raise UserError(f"--vary {key} and --set {key} both give {key}; keep one")


def preset_method(path: Path) -> str:
    """The method a preset is written for: the one for which none of its options is the other method's."""
    fitting = []
    for method in method_names():
        parser = build_run_parser(method)
        try:
            values = load_config_file(str(path), parser)
        except UserError:
            continue  # an option this method does not know
        foreign = {action.dest for group in parser._action_groups
                   if group.title and group.title.startswith("options of the seed") for action in group._group_actions}
        if not set(values) & foreign:
            fitting.append(method)
    if not fitting:
        raise UserError(f"preset {path} fits no method (an unknown option, or options of two methods); run it alone "
                        "with its entry script to see which option")
    return fitting[0]


def build_jobs(presets: Sequence[str], seeds: Sequence[int], common: dict[str, Any], vary: dict[str, list[Any]],
               output_dir: Path) -> list[Job]:
    """Every (preset, variant, seed) of the sweep, preset by preset, in the order given."""
    jobs: list[Job] = []
    variants = [dict(zip(vary, values)) for values in itertools.product(*vary.values())] if vary else [{}]
    stems: set[str] = set()
    for spec in presets:
        method, _, name = spec.partition(":") if spec.split(":", 1)[0] in method_names() else ("", "", spec)
        path = Path(name)
        if not path.is_file():
            raise UserError(f"preset {name} not found")
        method = method or preset_method(path)
        if path.stem in stems:
            raise UserError(f"two presets are named {path.stem}; their runs would share a folder")
        stems.add(path.stem)
        parser = build_run_parser(method)
        preset = load_config_file(str(path), parser)
        check_option_values(common, parser, f"--set (preset {path})")
        for variant in variants:
            check_option_values(variant, parser, f"--vary (preset {path})")
            options = {**preset, **common, **variant}
            # A preset written for single runs may name its seed or folder: the sweep sets both.
            options.pop("seed", None)
            options.pop("output_dir", None)
            group = group_name(path.stem, variant)
            for seed in seeds:
                jobs.append(Job(path, method, group, options, seed, output_dir / group / f"seed{seed}"))
    folders: set[Path] = set()
    for job in jobs:
        if job.folder in folders:
            raise UserError(f"two runs of the sweep would share the folder {job.folder}; give presets and variant "
                            "values that differ in letters or digits")
        folders.add(job.folder)
    return jobs


def group_name(stem: str, variant: dict[str, Any]) -> str:
    """The folder name of a preset's variant: only letters, digits, '.', '-' and '_', never hidden, never too long."""
    text = stem + "".join(f"_{key}{_compact(value)}" for key, value in variant.items())
    name = FOLDER_NAME_CHARACTERS.sub("-", text).lstrip(".") or "preset"
    if len(name) > MAX_GROUP_NAME:
        name = f"{name[:MAX_GROUP_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def _compact(value: Any) -> str:
    """A value as a short folder-name part."""
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return VALUE_NAME_CHARACTERS.sub("-", text)  # "_" too: it separates the options in the name


def job_state(job: Job) -> str:
    """done (final figures saved), resume (a checkpoint, no final figures) or start."""
    metrics = job.folder / "metrics.json"
    if metrics.is_file():
        try:
            if json.loads(metrics.read_text()).get("final"):
                return "done"
        except (OSError, ValueError):
            pass
    return "resume" if (job.folder / CHECKPOINT_NAME).is_file() else "start"


def check_run_options(job: Job) -> None:
    """The run's whole option set parsed and checked as its entry script will (one line naming the run otherwise)."""
    argv = ["--seed", str(job.seed), "--output_dir", str(job.folder)]
    try:
        parse_args_with_config(job.method, build_run_parser(job.method), dict(job.options), argv)
    except UserError as error:
        raise UserError(f"run {job.name}: {error}") from None


def saved_options(job: Job) -> dict[str, Any] | None:
    """The options a run folder was made with (its sweep_config.yaml), None when it has none yet."""
    path = job.folder / JOB_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"{path} is not a sweep config the sweep wrote ({reason}); delete {job.folder} or choose "
                        "another --output_dir") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a sweep config the sweep wrote (no option: value lines); delete {job.folder} "
                        "or choose another --output_dir")
    return values


def check_folder(job: Job) -> None:
    """A run folder made with other options (finished or not) is refused: its figures would be reported as this
    sweep's. The fix is the user's: another --output_dir, or the folder deleted to run it again."""
    saved = saved_options(job)
    if saved is None or saved == job.options:
        return
    key = next(key for key in sorted(set(saved) | set(job.options), key=str) if saved.get(key) != job.options.get(key))
    finished = "a finished run" if job_state(job) == "done" else "a run"
    raise UserError(f"{job.folder} holds {finished} made with other options ({key}: {saved.get(key)!r} there, "
                    f"{job.options.get(key)!r} now); choose another --output_dir, or delete that folder to run it "
                    "again")


def write_job_config(job: Job) -> Path:
    """The job's config file (the preset with the sweep's values); a folder made with other values is refused."""
    check_folder(job)
    make_folder(job.folder)
    path = job.folder / JOB_CONFIG_NAME
    write_text_atomic(path, f"# {job.preset} with the sweep's values (python -m functions.train.sweep)\n"
                      + yaml.safe_dump(job.options, sort_keys=True))
    return path


def make_folder(folder: Path) -> None:
    """mkdir -p, a folder that cannot be made being one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the folder {folder} ({error.strerror or error}); choose another "
                        "--output_dir") from None


def run_arguments(job: Job, config: Path) -> list[str]:
    """The entry script of one run and its options (without a launcher or --resume)."""
    entry = str(REPO_ROOT / method_class(job.method).entry_script)
    return [entry, "--config", str(config), "--seed", str(job.seed), "--output_dir", str(job.folder)]


def job_command(job: Job, config: Path, resume: bool, nproc_per_node: int) -> list[str]:
    """The command line of one run on this machine."""
    return [*launcher_command(sys.executable, 1, nproc_per_node, {}), *run_arguments(job, config),
            *(["--resume"] if resume else [])]


def open_console(job: Job) -> io.TextIOWrapper:
    """The run's console.log, to append to."""
    try:
        return open(job.folder / CONSOLE_NAME, "a", encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write {job.folder / CONSOLE_NAME} ({error.strerror or error}); choose another "
                        "--output_dir") from None
