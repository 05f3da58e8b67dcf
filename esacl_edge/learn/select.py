"""Step 1 of the training step: which samples of a minibatch are trained on.

* :class:`AllSamples`: every sample (the baselines, and EsaCL without IDS step selection);
* :class:`IdsSelect`: IDS at step level: the top ⌈γ·|b|⌉ samples by score, class-balanced,
  train. On a chunk's first pass a forward pass without gradients scores each sample (in train
  mode, BatchNorm statistics untouched); later passes reuse each sample's score from its last
  step (the trained samples' from their training forward), so they cost no scoring forward.

Both give each sample an informativeness score (its loss, or minus its logit margin), which
the IDS buffer uses when the chunk is offered to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import ids
from .forward import norm_stats_untouched, restrict
from .parts import Part

if TYPE_CHECKING:
    from .context import Context

Selection = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
Prior = tuple[torch.Tensor, torch.Tensor] | None   # the minibatch's (logits, scores) from the previous pass


@dataclass
class AllSamples(Part):
    """Train on the whole minibatch."""

    score: str = "loss"

    def select(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, prior: Prior = None,
               present: torch.Tensor | None = None) -> Selection:
        """(positions to train on or None for all, and the whole minibatch's logits and scores if known)."""
        return None, None, None


@dataclass
class IdsSelect(Part):
    """Train on the ⌈keep·|b|⌉ highest-scoring samples of each minibatch, class-balanced."""

    keep: float = 0.5
    score: str = "loss"
    rescore_every_pass: bool = False   # a scoring forward on every pass, not only the first

    def select(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, prior: Prior = None,
               present: torch.Tensor | None = None) -> Selection:
        if prior is not None and not self.rescore_every_pass:
            logits, scores = prior
        else:
            with torch.no_grad(), norm_stats_untouched(ctx.model), ctx.precision.autocast():
                logits = ctx.trainable(x).float()
            ctx.cost.forward(len(y))
            scores = ids.sample_scores(restrict(logits, present), y, self.score)
        return ids.select_step(scores, y, self.keep, ctx.num_classes), logits, scores
