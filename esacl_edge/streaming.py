"""StreamingLearner, the public learner: :class:`learn.learner.Learner` plus what reaches files: each task's
snapshot written to a run folder, the learner's state saved and resumed crash-safely beside them, and any
task's model exported to ONNX."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .deploy import snapshot as snap
from .deploy.export import export_variant
from .deploy.metadata import export_meta
from .errors import CheckpointError, EsaclError
from .learn import persistence
from .learn.learner import Learner


class StreamingLearner(Learner):
    """Learn classification tasks from streaming chunks with a sparse model and a small buffer.

    The arguments are :class:`learn.learner.Learner`'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.snapshot_files: dict[int, str] = {}  # SHA-256 of each snapshot written to snapshot_folder
        self.snapshot_folder: Path | None = None

    # ------------------------------------------------------------------ snapshots and export
    def write_snapshot(self, folder: str | Path, task: int, extra: dict | None = None) -> None:
        """Write ``task``'s snapshot (and its calibration samples) to ``folder/snapshots/``."""
        folder = Path(folder).resolve()
        if folder != self.snapshot_folder:
            self.snapshot_folder, self.snapshot_files = folder, {}
        self.snapshot_files[task] = snap.save_snapshot(
            folder, task, self.snapshots[task], self.spec, [self.task_classes[t] for t in sorted(self.task_classes)],
            self.sparsity(), self.calibration.get(task), extra)

    def export_onnx(self, task: int, path: str | Path, variant: str = "sparse", opset: int | None = None,
                    test: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """Export the model of ``task`` to one ONNX file (+ sidecar JSON), checked against PyTorch.

        ``variant``: ``sparse`` (default), ``dense``, ``structured`` or ``int8``; ``test`` (x, y)
        adds accuracy before and after export to the report.
        """
        meta = export_meta(task, [self.task_classes[t] for t in sorted(self.task_classes) if t <= task],
                           None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}", self.profile.providers)
        return export_variant(self.snapshot_model(task), self.spec, path, variant, meta,
                              calibration=self.calibration.get(task), opset=opset or self.profile.opset, test=test)

    # ------------------------------------------------------------------ state on disk
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here, as tensors, arrays and JSON; snapshots by file hash."""
        missing = sorted(set(self.snapshots) - set(self.snapshot_files))
        if missing:
            raise EsaclError(f"snapshots of tasks {missing} are not written yet (write_snapshot)")
        return {**super().state_dict(), "snapshots": {str(t): h for t, h in self.snapshot_files.items()}}

    def load_state_dict(self, state: dict[str, Any], folder: str | Path, where: str) -> None:  # type: ignore[override]
        """Put the learner (built with the same settings) into ``state``; snapshots are read from ``folder``."""
        persistence.check_setup(self, state, where)   # before any snapshot file is read
        files = {int(t): h for t, h in state["snapshots"].items()}
        snapshots, calibration = snap.read_snapshots(folder, files)
        super().load_state_dict(state, snapshots, calibration, where)
        self.snapshot_folder, self.snapshot_files = Path(folder).resolve(), files

    def save_state(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Save the state crash-safely in ``folder/state`` (finished tasks' snapshots in ``folder/snapshots``)."""
        if Path(folder).resolve() != self.snapshot_folder:
            self.snapshot_files = {}
        try:
            for task in sorted(set(self.snapshots) - set(self.snapshot_files)):
                self.write_snapshot(folder, task)
        except OSError as exc:
            raise CheckpointError(f"{folder}: cannot save the task snapshots ({exc.strerror or exc}); "
                                  "the previous saved state is kept") from None
        return checkpoint.save(Path(folder) / "state", self.state_dict(), extra)

    def load_state(self, folder: str | Path, check: Callable[[dict], None] | None = None) -> bool:
        """Continue from the latest state saved in ``folder`` by a learner built with the same settings.

        Returns False (changing nothing) when ``folder`` holds no saved state. ``check(extra)`` gets
        the extra JSON saved with the state before anything is restored, to read it or refuse it.
        """
        found = checkpoint.load(Path(folder) / "state")
        if found is None:
            return False
        state, extra, path = found
        if check is not None:
            check(extra)
        try:
            self.load_state_dict(state, Path(folder), str(path))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: incomplete or inconsistent learner state ({type(exc).__name__}: {exc})") \
                from None
        return True


__all__ = ["StreamingLearner"]
