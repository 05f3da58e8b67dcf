"""Replay loss terms: DER++ (Buzzega et al., 2020) and ER, on a batch drawn from the buffer.

A replay batch of ``ratio`` × the new samples the step trains (the whole minibatch, or the
samples IDS selected: EsaCL replays three buffered samples for every two new ones)
is drawn once per step (the same batch in both SAM passes; on a GPU gathered from the
buffer's device copy where the budget allows it) and forwarded together with them. DER++ adds
α·MSE(logits, logits stored at insertion) + β·CE(labels); ER is DER++ with α = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..device.transfer import to_device
from .buffer import sample
from .parts import Part

if TYPE_CHECKING:
    from .context import Context
    from .step import Batch


@dataclass
class Replay(Part):
    alpha: float = 0.3   # logit matching
    beta: float = 1.0    # cross-entropy on replayed labels
    ratio: float = 1.0   # replay batch size / new samples trained in the step

    def draw(self, ctx: Context, batch: Batch, n_new: int) -> None:
        """Attach ``ratio`` × ``n_new`` buffered samples to ``batch`` (none while the buffer is empty)."""
        buf, device_copy = ctx.store.buffer, ctx.store.device_copy
        if buf.size == 0:
            return
        idx = sample(buf, round(self.ratio * n_new), ctx.rngs.replay)
        batch.replay_index = idx
        if device_copy is not None:  # gathered on the device
            device_copy.sync(buf)
            x, y, logits, q = device_copy.gather(idx)
        else:
            x, y, logits, q = buf.x[idx], to_device(buf.y[idx].astype(np.int64), ctx.device), \
                to_device(buf.logits[idx], ctx.device), buf.qparams[idx]
        batch.replay_x, batch.replay_y, batch.replay_logits = ctx.store.inputs(x, q), y, logits

    def loss(self, ctx: Context, batch: Batch, out: torch.Tensor) -> torch.Tensor | None:
        if batch.replay_y is None:
            return None
        old = out[len(batch.y):]
        batch.replay_out = old.detach()
        term = self.beta * F.cross_entropy(old, batch.replay_y)
        if self.alpha:
            term = term + self.alpha * F.mse_loss(old, batch.replay_logits)
        return term
