"""SparCL-style parts (Wang et al., NeurIPS 2022) for the baseline, on the same harness as EsaCL.

* TDM, task-aware dynamic masks: importance |w| + lambda |grad| (``sdp.scores(kind="sparcl")``);
  every few chunks, prune the least important share of live weights and regrow as many
  pruned weights where |grad| is largest; extra capacity at a task start (``sdp.regrow``).
* DDR, dynamic data removal: count forgetting events (correct -> wrong between passes)
  per chunk sample; part way through the passes, drop the samples that were never forgotten.
* DGM, dynamic gradient masking: only the most important share of live weights is updated,
  so gradient sparsity is above weight sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import sdp


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
    params = sdp.prunable_parameters(model)
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
class ForgettingTracker:
    """Forgetting events of the samples of one chunk across its passes."""

    last_correct: np.ndarray
    events: np.ndarray
    ever_correct: np.ndarray

    @classmethod
    def new(cls, n: int) -> "ForgettingTracker":
        return cls(np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, bool))

    def update(self, idx: np.ndarray, correct: np.ndarray) -> None:
        self.events[idx] += self.last_correct[idx] & ~correct
        self.last_correct[idx] = correct
        self.ever_correct[idx] |= correct

    def keep(self, active: np.ndarray, frac: float) -> np.ndarray:
        """Drop up to ``frac`` of ``active``: learned samples with the fewest forgetting events."""
        removable = active[self.ever_correct[active] & self.last_correct[active]]
        order = removable[np.argsort(self.events[removable], kind="stable")]
        drop = order[: int(frac * len(active))]
        return np.setdiff1d(active, drop)
