"""SparCL-style parts (Wang et al., NeurIPS 2022) for the baseline, on the same harness as EsaCL.

* TDM, task-aware dynamic masks: importance |w| + lambda |grad| (``Pruning(score="sparcl")``);
  every few chunks, :class:`MaskUpdates` prunes the least important share of live weights and
  regrows as many pruned weights where |grad| is largest.
* DDR, dynamic data removal (:class:`DataRemoval`): count forgetting events (correct -> wrong
  between passes) per chunk sample; part way through the passes, drop the samples that were
  never forgotten.
* DGM, dynamic gradient masking (:class:`GradientMasks`): only the most important share of live
  weights is updated, so gradient sparsity is above weight sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models import prunable_parameters
from . import sdp
from .parts import Part

if TYPE_CHECKING:
    from .context import Context
    from .pruning import Pruning
    from .step import Batch, ChunkRecord


@torch.no_grad()
def update_masks(model: nn.Module, state: sdp.SdpState, lam: float, frac: float,
                 optimizer: torch.optim.Optimizer | None = None) -> int:
    """Prune-and-regrow at constant density: ``frac`` of the live weights move. Returns how many."""
    live = sdp.live(state)
    n_move = int(round(frac * live))
    if n_move <= 0 or not state.grad_abs:
        return 0
    sdp.prune_to(model, state, (live - n_move) / sdp.size(state), sdp.scores(model, state, "sparcl", lam), optimizer)
    return sdp.regrow(model, state, n_move / sdp.size(state), optimizer)


@torch.no_grad()
def gradient_masks(model: nn.Module, state: sdp.SdpState, lam: float, keep: float) -> dict[str, torch.Tensor]:
    """Per layer, the ``keep`` share of live weights with the highest importance may be updated.

    Live weights that are still exactly zero (just regrown) are always updated: their
    importance is zero until they move, so ranking alone would freeze them forever.
    """
    imp = sdp.scores(model, state, "sparcl", lam)
    params = prunable_parameters(model)
    masks = {}
    for name, m in state.masks.items():
        n_keep = int(round(keep * int(m.sum())))
        g = m & (params[name] == 0)
        if n_keep > 0:
            s = torch.where(m, imp[name], torch.full_like(imp[name], -float("inf"))).flatten()
            g.view(-1)[torch.topk(s, n_keep).indices] = True
        masks[name] = g
    return masks


@dataclass
class MaskUpdates(Part):
    """TDM: every ``every`` chunks (not on a task's last chunk, nor before the first pruning),
    ``frac`` of the live weights move."""

    every: int = 2
    frac: float = 0.1
    pruning: Pruning | None = field(init=False, default=None, repr=False)  # the method's, handed when it is built

    def after_chunk(self, ctx: Context, chunk: ChunkRecord) -> None:
        prog, pruning = ctx.progress, self.pruning
        last_chunk = prog.chunks_done == prog.n_chunks  # weights regrown now would stay zero in the snapshot
        warm_up = pruning.density >= 1.0  # nothing is pruned yet: a move would only zero weights
        if prog.chunks_done % self.every == 0 and not last_chunk and not warm_up:
            update_masks(ctx.model, pruning.state, pruning.importance_lambda, self.frac, ctx.optimizer)
            ctx.masks_changed()


@dataclass
class GradientMasks(Part):
    """DGM: after the weight masks, zero the gradients of the less important live weights."""

    keep: float = 0.8
    masks: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    pruning: Pruning | None = field(init=False, default=None, repr=False)  # the method's, handed when it is built

    def masks_changed(self, ctx: Context) -> None:
        pruning = self.pruning
        self.masks = gradient_masks(ctx.model, pruning.state, pruning.importance_lambda, self.keep)
        ctx.cost.set_grad_density({n: float(m.float().mean()) for n, m in self.masks.items()})

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        if self.masks:
            sdp.mask_grads(ctx.model, self.pruning.state, self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": dict(self.masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state["masks"])


@dataclass
class ForgettingTracker:
    """Forgetting events of the samples of one chunk across its passes (tensors on the training device)."""

    last_correct: torch.Tensor
    events: torch.Tensor
    ever_correct: torch.Tensor

    @classmethod
    def new(cls, n: int, device: torch.device | str = "cpu") -> ForgettingTracker:
        zeros = torch.zeros(n, dtype=torch.bool, device=device)
        return cls(zeros.clone(), torch.zeros(n, dtype=torch.int64, device=device), zeros.clone())

    def update(self, idx: torch.Tensor, correct: torch.Tensor) -> None:
        self.events[idx] += (self.last_correct[idx] & ~correct).long()
        self.last_correct[idx] = correct
        self.ever_correct[idx] |= correct

    def keep(self, active: torch.Tensor, frac: float) -> torch.Tensor:
        """Drop up to ``frac`` of ``active`` (CPU indices): learned samples with the fewest forgetting events."""
        events, learned = self.events.cpu(), (self.ever_correct & self.last_correct).cpu()
        removable = active[learned[active]]
        order = removable[torch.argsort(events[removable], stable=True)]
        drop = order[: int(frac * len(active))]
        return active[~torch.isin(active, drop)]


@dataclass
class DataRemoval(Part):
    """DDR: after ``after`` of the passes over a chunk, drop ``frac`` of it (never-forgotten, learned samples)."""

    frac: float = 0.3
    after: float = 0.5
    tracker: ForgettingTracker | None = field(init=False, default=None, repr=False)

    def begin_chunk(self, ctx: Context, n: int) -> None:
        self.tracker = ForgettingTracker.new(n, ctx.device)

    def active_samples(self, ctx: Context, pass_index: int, active: torch.Tensor) -> torch.Tensor:
        if pass_index == int(self.after * ctx.passes_per_chunk):
            return self.tracker.keep(active, self.frac)
        return active

    def after_update(self, ctx: Context, batch: Batch) -> None:
        self.tracker.update(batch.index, batch.logits.argmax(1) == batch.labels)
