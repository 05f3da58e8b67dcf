"""The learner's state as data: its ``state_dict`` (the learner's own fields plus every part's) and the
checks and restoring that loading it takes. Writing it to disk beside the task snapshots it refers to is
``streaming.py``'s."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from . import migrate
from .state import TaskProgress, check_same_setup, to_device

if TYPE_CHECKING:
    from .learner import Learner


def state_dict(learner: Learner) -> dict[str, Any]:
    """Everything needed to continue exactly here, as tensors, arrays and JSON, except the task snapshots."""
    opt = learner.optimizer.state_dict()["state"]
    return {"spec": asdict(learner.spec), "method": learner.method.name, "seed": learner.seed,
            "target_sparsity": learner.target_sparsity, "buffer_capacity": learner.buffer.capacity,
            "pattern": learner.pattern and list(learner.pattern),
            "model": learner.model.state_dict(), "optimizer": {str(i): dict(s) for i, s in opt.items()},
            "progress": asdict(learner.progress), "task_classes": {str(t): c for t, c in learner.task_classes.items()},
            "samples_trained": learner.samples_trained,
            "rngs": learner.rngs.state_dict(), "cost": learner.cost.state_dict(), "buffer": learner.buffer.state_dict(),
            "precision": learner.precision.state_dict(),
            "parts": {name: part.state_dict() for name, part in learner.method.named_parts()}}


def check_setup(learner: Learner, state: dict[str, Any], where: str) -> None:
    """Refuse a state saved by a learner built with other settings, naming the difference."""
    check_same_setup(state, learner.spec, {"method": learner.method.name, "buffer_capacity": learner.buffer.capacity,
                                        "seed": learner.seed, "target_sparsity": learner.target_sparsity,
                                        "pattern": learner.pattern and list(learner.pattern)}, where)


def load_state_dict(learner: Learner, state: dict[str, Any], where: str) -> None:
    """Put the learner (built with the same settings) into ``state`` (of any saved format), its task snapshots
    aside."""
    state = migrate.upgrade(state)
    check_setup(learner, state, where)
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
    learner.precision.load_state_dict(state["precision"])
    learner.progress = TaskProgress(**state["progress"])
    learner.task_classes = {int(t): list(c) for t, c in state["task_classes"].items()}
    learner.samples_trained = state["samples_trained"]
