"""The files of a run: written whole or not at all, the run folder's lock."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from entry_runs import FAST, cli_error
from paths import REPO_ROOT

import run_sflmoco
from functions.core import files as files_module
from functions.core.checkpoint import (
    CHECKPOINT_NAME,
)
from functions.core.errors import UserError
from functions.core.files import RunFolderLock, write_text_atomic


def test_text_files_of_a_run_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old")

    def crash(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files_module.os, "fsync", crash)
    with pytest.raises(UserError, match="cannot write .*metrics.json \\(Read-only file system\\)"):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by the group as any file the user writes


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run-folder lock of `folder` until its stdin closes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from functions.core.files import RunFolderLock; "
            "lock = RunFolderLock(sys.argv[2]); lock.acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(REPO_ROOT), str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_sflmoco.main([*FAST, "--output_dir", str(run_dir), "--max_steps", "1"])
    files_of_the_run = lambda: {path.name: path.read_bytes() for path in run_dir.iterdir()  # noqa: E731
                                if path.is_file() and path.name != RunFolderLock.FILE_NAME}
    before = files_of_the_run()
    holder = hold_lock(run_dir)
    try:
        for extra in (["--resume", "--max_steps", "2"], ["--seed", "9"]):
            code, line = cli_error(run_sflmoco.main, [*FAST, "--output_dir", str(run_dir), *extra], capsys)
            assert code == 2 and f"{run_dir} is in use by a run that is still going (pid {holder.pid}" in line
        eval_dir = tmp_path / "evaluation"
        eval_dir.mkdir()
        eval_holder = hold_lock(eval_dir)
        try:
            code, line = cli_error(run_sflmoco.main, ["--eval_only", "--checkpoint", str(run_dir / CHECKPOINT_NAME),
                                                      "--output_dir", str(eval_dir), "--skip_linear"], capsys)
            assert code == 2 and "is in use" in line
        finally:
            eval_holder.communicate("")
    finally:
        holder.communicate("")
    assert files_of_the_run() == before
    run_sflmoco.main([*FAST, "--output_dir", str(run_dir), "--resume", "--max_steps", "2"])  # free again


def test_the_lock_goes_with_the_process(tmp_path):
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    lock.release()
    holder = hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    RunFolderLock(tmp_path).acquire()  # no stale lock left by a killed run


def test_a_symlinked_lock_is_refused_and_its_target_left_alone(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (folder / RunFolderLock.FILE_NAME).symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        RunFolderLock(folder).acquire()
    assert victim.read_text() == "keep me\n"
