"""The joint upper bound: keep every sample of the task so far, train offline at each task's end.

Chunks are not trained on as they arrive; at a task's end, ``passes_per_chunk`` epochs of plain
steps run over everything seen so far, through the same step as every other method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .parts import Part

if TYPE_CHECKING:
    from .context import Context
    from .step import ChunkRecord


@dataclass
class Joint(Part):
    x: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)

    def active_samples(self, ctx: Context, pass_index: int, active: torch.Tensor) -> torch.Tensor:
        return active[:0]  # nothing is trained while the task streams in

    def after_chunk(self, ctx: Context, chunk: ChunkRecord) -> None:
        self.x.append(chunk.x.copy())
        self.y.append(np.asarray(chunk.y))

    def end_task(self, ctx: Context) -> None:
        if self.x:
            ctx.train_offline(np.concatenate(self.x), np.concatenate(self.y))

    def state_dict(self) -> dict[str, Any]:
        if not self.x:
            return {}
        return {"x": np.concatenate(self.x), "y": np.concatenate(self.y)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.y = ([state["x"]], [state["y"]]) if "x" in state else ([], [])
