"""The training step and the chunk loop, in the order of the method spec.

One step on a minibatch:

1. **select** the samples to train on (IDS: the top-scored, class-balanced; or all);
2. **loss terms**: cross-entropy on them (:func:`current_loss`), plus every part's term (DER++/ER replay, EWC…);
3. **optimizer**: gradients from plain SGD's one pass, or (every ``Sam.every``-th step) SAM's ascent and
   perturbed pass;
4. **after the backward pass**: parts read or mask the gradients (SDP statistics, masks, Fisher);
5. the SGD update, then ``after_update`` (e.g. regrowth after the first steps of a task).

After the chunk's passes, ``after_chunk``: buffer offer, pruning schedule, mask updates.
Per-sample logits and scores stay on the training device for the whole chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..device.transfer import to_device
from . import ids
from .forward import minibatches, present_classes, restrict

if TYPE_CHECKING:
    from .context import Context
    from .methods import Method


@dataclass
class Batch:
    """What one step trains on: the selected samples, and a replay batch drawn once for all passes."""

    x: torch.Tensor
    y: torch.Tensor
    replay_x: torch.Tensor | None = None
    replay_y: torch.Tensor | None = None
    replay_logits: torch.Tensor | None = None
    replay_index: np.ndarray | None = None   # buffer slots of the replay batch
    replay_out: torch.Tensor | None = None   # the replay batch's logits from the update's forward
    index: torch.Tensor | None = None    # positions of the whole minibatch in the chunk
    labels: torch.Tensor | None = None   # labels of the whole minibatch
    logits: torch.Tensor | None = None   # logits of the whole minibatch (scoring or training forward)
    present: torch.Tensor | None = None  # classes the current cross-entropy competes over (None: all)

    @property
    def n_train(self) -> int:
        """Samples that go through forward and backward: the selected ones plus the replay batch."""
        return len(self.y) + (0 if self.replay_y is None else len(self.replay_y))


@dataclass
class ChunkRecord:
    """A learned chunk with each sample's logits and IDS score from its last step (for the buffer)."""

    x: np.ndarray
    y: np.ndarray
    task: int
    logits: torch.Tensor
    scores: torch.Tensor
    inputs: torch.Tensor   # what the trainable part took (``ctx.train_inputs(x)``)


def current_loss(logits: torch.Tensor, y: torch.Tensor, present: torch.Tensor | None,
                 all_classes_share: float = 0.0) -> torch.Tensor:
    """The current samples' cross-entropy: (1 − s)·CE over the ``present`` classes + s·CE over all classes.

    With ``present`` None (every class competes) it is plain cross-entropy whatever ``s``.
    """
    loss = F.cross_entropy(restrict(logits, present), y)
    if present is not None and all_classes_share:
        loss = (1.0 - all_classes_share) * loss + all_classes_share * F.cross_entropy(logits, y)
    return loss


def loss_terms(ctx: Context, method: Method, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the selected samples + every part's term; returns (loss, their logits)."""
    x = batch.x if batch.replay_x is None else torch.cat([batch.x, batch.replay_x])
    with ctx.precision.autocast():
        out = ctx.trainable(x).float()
    loss = current_loss(out[: len(batch.y)], batch.y, batch.present, method.all_classes_share)
    for part in method.parts:
        term = part.loss(ctx, batch, out)
        if term is not None:
            loss = loss + term
    return loss, out[: len(batch.y)]


def train_step(ctx: Context, method: Method, xb: torch.Tensor, yb: torch.Tensor, index: torch.Tensor,
               prior: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step on minibatch ``(xb, yb)``; ``prior``: its samples' (logits, scores) from the previous pass.

    Returns the loss and every minibatch sample's logits and score (from the scoring forward, or, when
    scores are reused, the trained samples' from this step's forward and the others' from ``prior``).
    """
    present = present_classes(yb, ctx.num_classes) if method.current_classes == "present" else None
    # 1. Select the samples to train on.
    keep, logits, scores = method.select.select(ctx, xb, yb, prior, present)
    batch = Batch(xb if keep is None else xb[keep], yb if keep is None else yb[keep], index=index, labels=yb,
                  present=present)
    if method.replay is not None:
        method.replay.draw(ctx, batch, len(batch.y))
    # 2-3. Loss terms, and the optimizer's gradients (one pass, or SAM's two).
    loss, out = method.optimizer.gradients(ctx, batch, lambda b: loss_terms(ctx, method, b))
    out = out.detach()
    if keep is None:  # every sample was trained: the training forward gives logits and scores
        logits, scores = out, ids.sample_scores(restrict(out, present), yb, method.select.score)
    elif prior is not None:  # scores reused from the previous pass: refresh the trained samples'
        logits, scores = logits.clone(), scores.clone()
        logits[keep], scores[keep] = out, ids.sample_scores(restrict(out, present), batch.y, method.select.score)
    batch.logits = logits
    # 4. After the backward pass (gradients unscaled under fp16): parts read and mask them; the
    #    optimizer clips what is left (if it clips); then the update.
    ctx.precision.unscale(ctx.optimizer)
    for part in method.parts:
        part.after_backward(ctx, batch)
    method.optimizer.clip(ctx)
    ctx.precision.step(ctx.optimizer)
    ctx.progress.steps += 1
    ctx.samples_trained += len(batch.y)
    for part in method.parts:
        part.after_update(ctx, batch)
    return loss.detach(), batch.logits, scores


def run_passes(ctx: Context, method: Method, xt: torch.Tensor, yt: torch.Tensor, record: ChunkRecord | None = None,
               filter_samples: bool = True) -> list[torch.Tensor]:
    """``passes_per_chunk`` passes over ``(xt, yt)`` in shuffled minibatches; returns the step losses.

    Parts may drop samples before a pass (``filter_samples``); ``record`` keeps each sample's
    logits and score from its last step.
    """
    active, losses = torch.arange(len(yt)), []
    ctx.trainable.train()
    for p in range(ctx.passes_per_chunk):
        if filter_samples:
            for part in method.parts:
                active = part.active_samples(ctx, p, active)
        order = to_device(ctx.rngs.order.permutation(active.numpy()), ctx.device)
        for idx in minibatches(order, ctx.batch_size):
            prior = (record.logits[idx], record.scores[idx]) if p > 0 and record is not None else None
            loss, logits, scores = train_step(ctx, method, xt[idx], yt[idx], idx, prior)
            if record is not None:
                record.logits[idx], record.scores[idx] = logits, scores
            losses.append(loss)
    return losses


def train_chunk(ctx: Context, method: Method, x: np.ndarray, y: np.ndarray, task: int) -> float:
    """Learn one chunk: its passes, then the parts' after-chunk work (buffer, pruning schedule…).

    Returns the mean step loss (:func:`mean_loss`).
    """
    xt, yt = ctx.train_inputs(x), to_device(y, ctx.device)
    n = len(y)
    record = ChunkRecord(x, y, task, torch.zeros(n, ctx.num_classes, device=ctx.device),
                         torch.zeros(n, device=ctx.device), xt)
    for part in method.parts:
        part.begin_chunk(ctx, n)
    losses = run_passes(ctx, method, xt, yt, record)
    ctx.progress.chunks_done += 1
    for part in method.parts:
        part.after_chunk(ctx, record)
    return mean_loss(losses, ctx.precision.scales_loss)


def mean_loss(losses: list[torch.Tensor], finite_only: bool = False) -> float:
    """The mean step loss, read from the device once (NaN for no step). ``finite_only``: under fp16 loss
    scaling a step whose forward overflowed was skipped, not trained on, so it does not count."""
    if not losses:
        return float("nan")
    stacked = torch.stack(losses)
    if not finite_only:
        return float(stacked.mean())
    finite = torch.isfinite(stacked)
    return float(torch.where(finite, stacked, 0.0).sum() / finite.sum())
