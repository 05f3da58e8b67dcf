"""What a part of a method may use: the learner's resources, handed to every hook in place of the learner.

A part reads and changes the model through ``model`` and ``trainable``, steps through
``optimizer`` and ``precision``, charges its work to ``cost``, draws from its own stream of
``rngs``, reaches the replay buffer through ``store`` and the task through ``progress``; it
tells the others that it changed the pruning masks with :meth:`Context.masks_changed`, and the
joint bound trains on what it kept with ``train_offline``. A part
that needs a sibling (SparCL's gradient masks need the pruning part) is handed it when the
method is built (``methods.Method``), never through the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .state import Generators, TaskProgress

if TYPE_CHECKING:
    from .buffer import BufferStore
    from .cost import CostMeter
    from .precision import MixedPrecision


@dataclass
class Context:
    """The resources of one learner, as its parts see them."""

    model: nn.Sequential            # the whole model: every prunable weight is here
    trainable: nn.Module            # what a step forwards: the model past its frozen prefix, if any
    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    cost: CostMeter
    device: torch.device
    rngs: Generators
    num_classes: int
    target_sparsity: float          # 0 for a dense method
    pattern: tuple[int, int] | None  # N:M pattern of the pruned weights, if any
    passes_per_chunk: int
    batch_size: int
    seed: int
    method_name: str
    store: BufferStore
    train_inputs: Callable[[np.ndarray | torch.Tensor], torch.Tensor]  # stored samples -> what trainable takes
    on_masks_changed: Callable[[], None]
    train_offline: Callable[[np.ndarray, np.ndarray], None]  # the method's passes over stored samples at once
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # the pruning masks (empty: dense)
    progress: TaskProgress = field(default_factory=TaskProgress)
    samples_trained: int = 0

    def masks_changed(self) -> None:
        """Say that the pruning masks changed (pruned, regrown or moved): every part refreshes what depends on them."""
        self.on_masks_changed()
