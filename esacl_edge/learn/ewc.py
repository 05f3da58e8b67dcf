"""Online EWC (Schwarz et al., 2018): a quadratic penalty anchoring weights that mattered before.

Streaming version: the Fisher diagonal of a task is the mean of the squared minibatch
gradients of the current-task loss seen during the task (no data is kept for a separate
pass); at the task's end F <- gamma * F + F_task and the anchor moves to the current weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class EwcState:
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] = field(default_factory=dict)
    task_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    task_steps: int = 0


@torch.no_grad()
def accumulate(model: nn.Module, state: EwcState) -> None:
    for name, p in model.named_parameters():
        if p.grad is not None:
            state.task_sq.setdefault(name, torch.zeros_like(p)).add_(p.grad ** 2)
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
