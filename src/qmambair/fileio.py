"""Atomic file writes: every file qmambair writes (models, packed files, training checkpoints) goes through
:func:`atomic_path`, so a crash or a kill never leaves a half-written file under the final name.

A kill during a write leaves its temporary file (``.NAME.XXXX.tmp``) behind; the next write of ``NAME``
removes it. The writer holds an advisory lock (``flock``) on its temporary file, so a temporary file that can
be locked belongs to a dead writer (where ``flock`` is missing, one older than an hour counts as stale).
:func:`check_output` is the rule every command applies before writing a file a user named.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError, UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_path", "check_output", "exclusive_folder", "remove_stale_temporaries", "same_file"]

STALE_AGE_S = 3600.0  # without flock: a temporary file this old is taken as left by a killed writer


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if another process holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _temporaries(path: Path) -> list[Path]:
    """Temporary files ``atomic_path`` makes for ``path``: ``.NAME.`` + mkstemp's 8 characters + ``.tmp``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if pattern.fullmatch(n)]


def remove_stale_temporaries(path: str | os.PathLike, keep: str | os.PathLike | None = None) -> list[Path]:
    """Remove the temporary files that killed writes of ``path`` left in its folder; returns those removed.

    A temporary file still locked by a live writer is left alone (and, without ``flock``, one younger than
    ``STALE_AGE_S``); ``keep`` (the caller's own temporary file) is never touched.
    """
    path = Path(path)
    removed = []
    for tmp in _temporaries(path):
        if keep is not None and tmp == Path(keep):
            continue
        try:
            if fcntl is None:
                if time.time() - tmp.stat().st_mtime < STALE_AGE_S:
                    continue
                tmp.unlink()
            else:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    if not _try_lock(fd):
                        continue
                    tmp.unlink()
                finally:
                    os.close(fd)
        except OSError:  # vanished meanwhile, or not ours to remove
            continue
        removed.append(tmp)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; write the file there. On success the temporary file
    is fsynced, given normal permissions (0666 minus the umask) and renamed onto ``path`` (then the folder is
    fsynced, making the rename durable); on any error it is removed and ``path`` is left as it was.
    Temporary files of earlier, killed writes of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    if fcntl is None:
        os.close(fd)  # Windows cannot rename a file that is open
        fd = -1
    else:
        _try_lock(fd)  # held until fd is closed: marks the temporary file as in use
    try:
        remove_stale_temporaries(path, keep=tmp)
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    _fsync(path.parent, directory=True)


@contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Claim ``folder`` for this process while the block runs: an advisory lock on ``folder/.lock`` (made if
    missing; the holder's pid written into it). A second process claiming the same folder meanwhile gets a
    :class:`UserError` naming that pid; the lock ends with the block or the process, so a killed process
    leaves nothing to clean up. Without ``flock`` (Windows) there is no check."""
    folder = Path(folder)
    if fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{folder} is in use by another {what} (process {holder}); wait for it to "
                            "finish, stop it, or choose another folder")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (links and hard links included)."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] | list[str | os.PathLike] = (),
    option: str = "output",
    suffixes: tuple[str, ...] = (),
) -> Path:
    """The rule for a file a command is asked to write: never one of its ``inputs``; an existing file only
    with ``overwrite``; a folder never; its suffix one of ``suffixes`` (when given: else a ``UsageError``).
    A :class:`UserError` naming ``option`` otherwise."""
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {p}: the file name must end in {' or '.join(suffixes)}")
    for source in inputs:
        if same_file(p, source):
            raise UserError(f"{option} {p} is an input of this command ({source}); choose another file")
    if p.is_dir():
        raise UserError(f"{option} {p} is a folder; give a file name")
    if p.exists() and not overwrite:
        raise UserError(f"{option} {p} exists; pass --overwrite to replace it")
    return p
