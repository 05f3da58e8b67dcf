"""Online EWC (Schwarz et al., 2018): a quadratic penalty anchoring weights that mattered before.

Streaming version: the Fisher diagonal of a task is the mean of the squared minibatch
gradients of the task's loss seen during the task (no data is kept for a separate pass);
the penalty's own gradient λ·F·(θ − θ*) is taken out first, so the Fisher measures the data
and not the anchor. At the task's end F <- gamma * F + F_task and the anchor moves to the
current weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..device.budget import FLOAT_BYTES
from .parts import Part
from .precision import gated

if TYPE_CHECKING:
    from .context import Context
    from .step import Batch



@dataclass
class EwcState:
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    task_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    task_steps: int = 0


@torch.no_grad()
def accumulate(model: nn.Module, state: EwcState, lam: float = 0.0,
               masks: dict[str, torch.Tensor] | None = None, finite: torch.Tensor | None = None) -> None:
    """Add this step's squared data gradient: ``.grad`` minus the penalty's gradient ``lam·F·(θ − θ*)``,
    zero where ``masks`` (pruning masks) say the weight is pruned, or where the step overflowed (``finite``)."""
    masks = masks or {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if lam and name in state.fisher:
            g = g - lam * state.fisher[name] * (p - state.anchor[name])
        if name in masks:
            g = g * masks[name]
        state.task_sq.setdefault(name, torch.zeros_like(p)).add_(gated([g * g], finite)[0])
    state.task_steps += 1


@torch.no_grad()
def consolidate(model: nn.Module, state: EwcState, gamma: float = 1.0) -> None:
    """End of task: fold this task's Fisher into the running one and anchor at the current weights."""
    for name, p in model.named_parameters():
        task = state.task_sq.get(name, torch.zeros_like(p)) / max(state.task_steps, 1)
        state.fisher[name] = gamma * state.fisher.get(name, torch.zeros_like(p)) + task
        state.anchor[name] = p.detach().clone()
    state.task_sq, state.task_steps = {}, 0


def penalty(model: nn.Module, state: EwcState) -> torch.Tensor | float:
    """sum_i F_i (theta_i - theta*_i)^2 / 2 (zero before the first task ends)."""
    if not state.fisher:
        return 0.0
    return sum((state.fisher[n] * (p - state.anchor[n]) ** 2).sum() for n, p in model.named_parameters()) / 2


@dataclass
class EwcPenalty(Part):
    """The penalty as a loss term, its Fisher from each step's gradients, consolidation at a task's end."""

    lam: float = 10.0
    gamma: float = 1.0
    state: EwcState = field(default_factory=EwcState)

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        return {"ewc_state": 3 * n_params * FLOAT_BYTES}

    def loss(self, ctx: Context, batch: Batch, out: torch.Tensor) -> torch.Tensor | None:
        return self.lam * penalty(ctx.model, self.state) if self.state.fisher else None

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        accumulate(ctx.model, self.state, self.lam, ctx.masks, ctx.precision.grads_finite)

    def end_task(self, ctx: Context) -> None:
        consolidate(ctx.model, self.state, self.gamma)

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"fisher": dict(s.fisher), "anchor": dict(s.anchor), "task_sq": dict(s.task_sq),
                "task_steps": s.task_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = EwcState(dict(state["fisher"]), dict(state["anchor"]), dict(state["task_sq"]),
                              int(state["task_steps"]))
