"""Files written whole or not at all: a reader finds the previous complete file or the new one, never half of one."""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from functions.core.errors import UserError

TEMPORARY_SUFFIX = ".tmp"


def temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary files a write of `path` makes (hidden, so they never look like results)."""
    return f".{path.name}."


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Let `write` fill a temporary file in the same folder, flush it to disk, then rename it over `path`.

    A failing file system (full disk, removed folder) is one clear error; the previous file stays as it was. With
    `durable` False the data is not forced to disk (files rewritten every step, checked when read): the rename still
    makes the file whole or absent for any reader, only a power cut may leave it damaged.
    """
    path = Path(path)
    try:
        temporary = path.parent / f"{temporary_prefix(path)}{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
        # os.open rather than mkstemp: the file gets the umask's permissions (mkstemp's are owner-only).
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as stream:
                _write_reporting_os_errors(write, stream)
                stream.flush()
                if durable:
                    os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error}); the previous {path.name}, if any, "
                        "is unchanged") from None
    if durable:
        _fsync_folder(path.parent)


def _write_reporting_os_errors(write: Callable[[BinaryIO], object], stream: BinaryIO) -> None:
    """Run `write`; a file-system failure it reports as another exception (torch.save turns a failed write into a
    RuntimeError whose context is the OSError) comes out as that OSError."""
    try:
        write(stream)
    except RuntimeError as error:
        reason = error.__cause__ or error.__context__
        if isinstance(reason, OSError):
            raise reason from None
        raise


def open_run_file(path: str | os.PathLike, flags: int) -> int:
    """os.open of a file the run writes in place (its lock, output.log) that refuses to follow a symbolic link:
    a link planted in a run folder must not make the run write elsewhere."""
    path = Path(path)
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as error:
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; a run writes only its own files there: remove the link or "
                            "choose another --output_dir") from None
        raise UserError(f"cannot write {path} ({error.strerror or error}); choose another --output_dir") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """write_atomic for UTF-8 text."""
    data = text.encode("utf-8")
    write_atomic(path, lambda stream: stream.write(data))


def root_like_folder(path: str) -> str | None:
    """What `path` is when it names the file system's root or the user's home folder (after `~` and symbolic links
    are resolved), else None."""
    expanded = Path(os.path.expanduser(path))
    try:
        resolved = expanded.resolve()
    except (OSError, RuntimeError):  # a loop of symbolic links: it names neither
        return None
    if resolved == Path(resolved.anchor):
        return "the file system's root"
    try:
        home = Path.home().resolve()
    except (OSError, RuntimeError, KeyError):  # no home folder known for this user
        return None
    return "your home folder" if resolved == home else None


def check_output_folder(option: str, path: str, contents: str) -> None:
    """Refuse an empty folder name, the file system's root and the user's home as the folder that `contents` (the
    run, the sweep) is written into: its files and subfolders would be spread among the user's own."""
    if not path.strip():
        raise UserError(f"{option} is empty: it would write {contents} into the current folder; name a folder")
    kind = root_like_folder(path)
    if kind is not None:
        raise UserError(f"{option} {path} is {kind}: {contents} would spread its files there; name a folder of its "
                        f"own inside it (e.g. {option} {Path(path) / 'runs'})")


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


class RunFolderLock:
    """An exclusive lock on a run folder, held while a run (or an evaluation) writes into it.

    The lock is the operating system's (flock on `.lock` in the folder), so it goes away with the process, however
    it ends: there is never a stale lock to remove. On systems without flock, or file systems that refuse it,
    runs are not locked.
    """

    FILE_NAME = ".lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.FILE_NAME
        self._handle: int | None = None

    def acquire(self) -> None:
        """Take the lock; a UserError naming the process that holds it when another run does."""
        try:
            import fcntl
        except ImportError:
            return
        handle = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(handle)
            raise UserError(f"{self.path.parent} is in use by a run that is still going ({holder}); wait for it to "
                            "end, or choose another --output_dir") from None
        except OSError:
            os.close(handle)  # no locking on this file system
            return
        os.ftruncate(handle, 0)
        os.write(handle, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._handle = handle

    def release(self) -> None:
        """Give the lock up (also done by the operating system when the process ends)."""
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None
