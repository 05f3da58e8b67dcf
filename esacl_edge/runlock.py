"""One job per run folder: an OS file lock on ``RUN/.lock``, released by the kernel when the holder
exits, however it exits (a ``kill -9`` leaves no stale lock behind)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import EsaclError

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked
    fcntl = None

LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _lock(fd: int, path: Path, run_dir: Path) -> None:
    """Take the lock on ``fd`` without waiting; one error naming the holder when it is taken."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise EsaclError(f"{run_dir}: in use by another esacl-edge job ({_holder(path)}); wait for it to end or "
                         "stop it, or choose another --run") from None
    except OSError as exc:  # e.g. a file system without locks
        raise EsaclError(f"{run_dir}: cannot lock the run folder ({exc.strerror or exc})") from None
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        same = False
    if not same:  # a job that was just ending removed the lock file after we opened it
        raise EsaclError(f"{run_dir}: another esacl-edge job was just ending here; run the command again")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the ``with`` block; a second job gets one error naming the holder.

    The folder is created to hold the lock; if this job created it and wrote nothing else into it,
    it is removed again on the way out.
    """
    created = not run_dir.exists()
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise EsaclError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc}); choose another --run "
                         "or fix its permissions") from None
    try:
        _lock(fd, path, run_dir)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                    path.unlink()
                    run_dir.rmdir()
    finally:
        os.close(fd)
