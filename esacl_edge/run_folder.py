"""The run folder of a learn job: what it writes there (:class:`RunFolder`), and ``RUN_DIR/profile.yaml``, a copy
of the device profile the run learned with (the default for its export)."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import chunk_log
from .device.profiles import Profile, load_profile, profile_names, to_yaml
from .errors import EsaclError
from .files import atomic_write
from .plots import RUN_PLOTS

if TYPE_CHECKING:
    from .streaming import StreamingLearner

PROFILE_FILE = "profile.yaml"


def write_run_profile(run_dir: str | Path, profile: Profile) -> None:
    """Keep a copy of the device profile in the run folder."""
    text = to_yaml(profile).encode("utf-8")
    atomic_write(Path(run_dir) / PROFILE_FILE, lambda f: f.write(text))


def run_profile(run_dir: str | Path, meta: dict) -> Profile:
    """The profile a run learned with: its copy in the run, else the shipped profile the snapshot
    names, else ``cpu``."""
    copy = Path(run_dir) / PROFILE_FILE
    if copy.is_file():
        return load_profile(copy)
    return load_profile(meta.get("profile") if meta.get("profile") in profile_names() else "cpu")


class RunFolder:
    """A learn job's writes to its run folder: created (or, with ``overwrite``, cleared) only once there is
    something to write; every write failure one error naming the folder and what was being written."""

    def __init__(self, path: Path, overwrite: bool, resumed_at: int, profile: Profile) -> None:
        self.path, self.overwrite, self.resumed_at, self.profile = path, overwrite, resumed_at, profile
        self.log = path / chunk_log.FILE_NAME
        self.prepared = False

    def prepare(self) -> None:
        """Create (or clear) the folder, trim the chunk log to the saved state, keep the profile."""
        if self.prepared:
            return
        try:
            if self.overwrite:
                for name in ("snapshots", "state"):
                    if (self.path / name).exists():
                        shutil.rmtree(self.path / name)
                for name in ("results.json", chunk_log.FILE_NAME, *RUN_PLOTS):
                    (self.path / name).unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
            chunk_log.trim(self.log, self.resumed_at)
            write_run_profile(self.path, self.profile)  # export's default profile
        except OSError as exc:
            raise EsaclError(f"{self.path}: cannot write the run folder ({exc.strerror or exc})") from None
        self.prepared = True

    def write(self, what: str, fn: Callable[..., object], *args: object) -> None:
        """``fn(*args)``, which writes ``what`` into the folder."""
        self.prepare()
        try:
            fn(*args)
        except OSError as exc:
            raise EsaclError(f"{self.path}: cannot write {what} ({exc.strerror or exc})") from None

    def save(self, learner: StreamingLearner, record: dict, line: dict | None = None) -> None:
        """Append a learned chunk's ``line`` to the chunk log, then save the learner's state with ``record`` (a line
        whose state a crash lost is dropped on resume: see ``chunk_log.trim``)."""
        self.prepare()
        size = self.log.stat().st_size if self.log.exists() else 0
        if line is not None:
            self.write("the chunk log", chunk_log.append, self.log, line)
        try:
            learner.save_state(self.path, record)
        except BaseException:
            with contextlib.suppress(OSError):  # leave the log as the last saved state knows it
                os.truncate(self.log, size)
            raise

    def write_plots(self, results: dict) -> None:
        """The run's accuracy-matrix and sparsity plots (a plotting failure only warns: the results stand)."""
        try:
            from .plots import write_run_plots

            write_run_plots(results, self.path)
        except Exception as exc:  # matplotlib raises many types; the run itself is done
            warnings.warn(f"{self.path}: plots not written ({exc})", RuntimeWarning, stacklevel=2)
