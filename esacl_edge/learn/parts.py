"""The hooks a part of a method may fill in, in the order the learner calls them.

A method (``methods.py``) is a composition of parts; the training step (``step.py``) calls
every part's hooks at fixed points, so a new variant is a new part, not a new flag in the
loop. Each hook defaults to doing nothing. Parts that hold state return it from
``state_dict()`` as plain tensors, numpy arrays and JSON values, keyed by short names.

Every hook receives the :class:`context.Context` (the learner's resources a part may use), not
the learner.

Order within a chunk::

    begin_chunk -> per pass: active_samples -> per minibatch:
        [select] -> loss terms -> [optimizer] -> after_backward -> (SGD update) -> after_update
    -> after_chunk
and at task boundaries ``begin_task`` / ``end_task``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .context import Context
    from .step import Batch, ChunkRecord


class Part:
    """Base of every part: no-op hooks (one level of inheritance, no deeper)."""

    def bind(self, ctx: Context) -> None:
        """Allocate state for the context's model (called once, when the learner is built)."""

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        """Bytes of training state this part adds (the budget arithmetic sums them)."""
        return {}

    def begin_task(self, ctx: Context) -> None: ...

    def begin_chunk(self, ctx: Context, n: int) -> None: ...

    def active_samples(self, ctx: Context, pass_index: int, active: torch.Tensor) -> torch.Tensor:
        """Which chunk samples the next pass trains on (all by default)."""
        return active

    def loss(self, ctx: Context, batch: Batch, out: torch.Tensor) -> torch.Tensor | None:
        """This part's loss term for the forward output ``out`` of ``batch`` (None: no term)."""
        return None

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        """Read or mask the gradients the update is about to apply."""

    def after_update(self, ctx: Context, batch: Batch) -> None: ...

    def masks_changed(self, ctx: Context) -> None:
        """The pruning masks changed (pruned, regrown or moved): refresh what depends on them."""

    def after_chunk(self, ctx: Context, chunk: ChunkRecord) -> None: ...

    def end_task(self, ctx: Context) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
