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


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the ``with`` block; a second job gets one error naming the holder.

    The folder is created to hold the lock; if it was created here and nothing else was written
    into it, it is removed again on the way out.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise EsaclError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc}); choose another --run "
                         "or fix its permissions") from None
    path = run_dir / LOCK_NAME
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EsaclError(f"{run_dir}: in use by another esacl-edge job ({_holder(path)}); wait for it to "
                                 "end or stop it, or choose another --run") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        os.close(fd)
