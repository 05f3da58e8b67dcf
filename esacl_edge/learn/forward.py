"""Forward passes besides the training one, minibatches, and inference: one place for each.

BatchNorm running statistics move once per training step, in the step's own forward,
whatever the method does on top: the extra train-mode forwards (IDS scoring, SAM's
ascent pass) run inside :func:`norm_stats_untouched`, and accuracy probes and inference
run in eval mode through :func:`infer_logits`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..device.transfer import to_device

# Normalisation layers that keep running statistics.
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def norm_stats_untouched(model: nn.Module) -> Iterator[None]:
    """Inside, normalisation layers use batch statistics in train mode but update no running statistic
    (``running_mean``, ``running_var`` and ``num_batches_tracked`` stay as they are)."""
    norms = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def minibatches(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Split ``order`` into equal-sized minibatches of at most ``batch_size`` (no tiny remainder batch)."""
    return torch.tensor_split(order, math.ceil(len(order) / batch_size)) if len(order) else ()


def nchw(x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stored samples (NHWC, any dtype) -> float32 NCHW on ``device``, copied in the stored dtype and converted
    there."""
    return to_device(x, torch.device(device)).to(torch.float32).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def infer_logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Float32 logits of ``x`` (NCHW, on the model's device) in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])
    finally:
        model.train(was_training)


def task_logits(logits: torch.Tensor, classes: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``logits`` where only ``classes`` compete (the others -inf): Task-IL prediction."""
    masked = torch.full_like(logits, float("-inf"))
    masked[:, list(classes)] = logits[:, list(classes)]
    return masked


def present_classes(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean mask of the classes that occur in ``y``."""
    return torch.zeros(num_classes, dtype=torch.bool, device=y.device).index_fill_(0, y, True)


def restrict(logits: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the classes outside ``classes`` (a boolean mask; None: all) left out of the softmax."""
    return logits if classes is None else logits.masked_fill(~classes, float("-inf"))


def accuracies(logits: torch.Tensor, y: torch.Tensor, classes: list[int] | tuple[int, ...]) -> dict[str, float]:
    """Class-IL (all classes compete) and Task-IL (only the task's ``classes`` compete) accuracy."""
    return {"class_il": (logits.argmax(1) == y).float().mean().item(),
            "task_il": (task_logits(logits, classes).argmax(1) == y).float().mean().item()}
