"""The learner's state on disk: its ``state_dict`` (the learner's own fields plus every part's),
saved crash-safely by ``checkpoint.py`` beside the task snapshots it refers to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checkpoint
from ..deploy import snapshot as snap
from ..errors import CheckpointError, EsaclError
from .state import TaskProgress, check_same_setup, to_device

if TYPE_CHECKING:
    from .learner import StreamingLearner


def state_dict(learner: StreamingLearner) -> dict[str, Any]:
    """Everything needed to continue exactly here, as tensors, arrays and JSON; snapshots by file hash."""
    missing = sorted(set(learner.snapshots) - set(learner.snapshot_files))
    if missing:
        raise EsaclError(f"snapshots of tasks {missing} are not written yet (write_snapshot)")
    opt = learner.optimizer.state_dict()["state"]
    return {"spec": asdict(learner.spec), "method": learner.method.name, "seed": learner.seed,
            "target_sparsity": learner.target_sparsity, "buffer_capacity": learner.buffer.capacity,
            "pattern": learner.pattern and list(learner.pattern),
            "model": learner.model.state_dict(), "optimizer": {str(i): dict(s) for i, s in opt.items()},
            "progress": asdict(learner.progress), "task_classes": {str(t): c for t, c in learner.task_classes.items()},
            "samples_trained": learner.samples_trained, "snapshots": {str(t): h for t, h in learner.snapshot_files.items()},
            "rngs": learner.rngs.state_dict(), "cost": learner.cost.state_dict(), "buffer": learner.buffer.state_dict(),
            "precision": learner.precision.state_dict(),
            "parts": {name: part.state_dict() for name, part in learner.method.named_parts()}}


def load_state_dict(learner: StreamingLearner, state: dict[str, Any], folder: Path, where: str) -> None:
    """Put the learner (built with the same settings) into ``state``; snapshots are read from ``folder``."""
    check_same_setup(state, learner.spec, {"method": learner.method.name, "buffer_capacity": learner.buffer.capacity,
                                        "seed": learner.seed, "target_sparsity": learner.target_sparsity,
                                        "pattern": learner.pattern and list(learner.pattern)}, where)
    try:
        learner.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit this model: {str(exc).splitlines()[0]}") from None
    opt = learner.optimizer.state_dict()
    opt["state"] = {int(i): s for i, s in state["optimizer"].items()}
    learner.optimizer.load_state_dict(opt)
    for name, part in learner.method.named_parts():
        part.load_state_dict(to_device(state["parts"][name], learner.device))
    learner.buffer.load_state_dict(state["buffer"])
    learner.rngs.load_state_dict(state["rngs"])
    learner.cost.load_state_dict(state["cost"])
    learner.precision.load_state_dict(state.get("precision", {}))  # absent in states saved before 0.6
    learner.progress = TaskProgress(**state["progress"])
    learner.task_classes = {int(t): list(c) for t, c in state["task_classes"].items()}
    learner.samples_trained = state["samples_trained"]
    learner.snapshot_folder = folder.resolve()
    learner.snapshot_files = {int(t): h for t, h in state["snapshots"].items()}
    learner.snapshots, learner.calibration = snap.read_snapshots(folder, learner.snapshot_files)


def save_state(learner: StreamingLearner, folder: str | Path, extra: dict | None = None) -> Path:
    """Save the state crash-safely in ``folder/state`` (finished tasks' snapshots in ``folder/snapshots``)."""
    if Path(folder).resolve() != learner.snapshot_folder:
        learner.snapshot_files = {}
    try:
        for task in sorted(set(learner.snapshots) - set(learner.snapshot_files)):
            learner.write_snapshot(folder, task)
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot save the task snapshots ({exc.strerror or exc}); "
                              "the previous saved state is kept") from None
    return checkpoint.save(Path(folder) / "state", state_dict(learner), extra)


def load_state(learner: StreamingLearner, folder: str | Path, check: Callable[[dict], None] | None = None) -> bool:
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
        load_state_dict(learner, state, Path(folder), str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: incomplete or inconsistent learner state ({type(exc).__name__}: {exc})") \
            from None
    return True
