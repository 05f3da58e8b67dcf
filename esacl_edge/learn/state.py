"""The learner's plain state besides the model and parts: task progress, random generators, and the
checks a saved state must pass before it is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from ..models import ModelSpec
from ..errors import CheckpointError


@dataclass
class TaskProgress:
    """Where the learner is within the current task."""

    task: int = -1
    n_chunks: int | None = None
    chunks_done: int = 0
    steps: int = 0
    fixed_classes: bool = False  # classes given at begin_task: other labels (blurry chunks) do not join the task
    first_task: bool = True      # no task has ended before this one


@dataclass
class Generators:
    """The learner's own random streams, one per use, so that changing one part leaves the others' draws alone."""

    order: np.random.Generator     # minibatch order
    replay: np.random.Generator    # replay batches
    buffer: np.random.Generator    # buffer selection
    torch: torch.Generator = field(default_factory=torch.Generator)  # torch-side random ops

    @classmethod
    def from_seed(cls, seed: int) -> Generators:
        order, replay, buffer = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        return cls(order, replay, buffer, torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k).bit_generator.state for k in ("order", "replay", "buffer")},
                "torch": self.torch.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("order", "replay", "buffer"):
            getattr(self, k).bit_generator.state = state[k]
        self.torch.set_state(state["torch"])


def to_device(state: Any, device: torch.device) -> Any:
    """``state`` with every tensor leaf moved to ``device``."""
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, dict):
        return {k: to_device(v, device) for k, v in state.items()}
    return state


def check_same_setup(state: dict[str, Any], spec: ModelSpec, settings: dict[str, Any], where: str) -> None:
    """Refuse a saved state whose model spec or ``settings`` differ from this learner's, naming both."""
    saved = ModelSpec(**{**state["spec"], "input_shape": tuple(state["spec"]["input_shape"])})
    if saved != spec:
        diff = "; ".join(f"{f.name} {getattr(saved, f.name)!r} was saved, this run has {getattr(spec, f.name)!r}"
                         for f in fields(spec) if getattr(saved, f.name) != getattr(spec, f.name))
        raise CheckpointError(f"{where}: saved for another model setup: {diff}")
    for key, have in settings.items():
        if state[key] != have:
            raise CheckpointError(f"{where}: saved with {key} {state[key]!r}; this run has {have!r}")
