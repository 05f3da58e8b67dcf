"""Step 3: the optimizer. Plain SGD, or SAM as a wrapper around it.

Both build the torch SGD optimizer and compute the gradients the update applies:

* :class:`Sgd`: one forward and backward pass at θ;
* :class:`Sam`: an ascent pass at θ, the perturbation ε = ρ·(g⊙m)/‖g⊙m‖ added to the live
  weights only (m: the pruning masks), a second pass at θ+ε whose forward leaves BatchNorm
  statistics alone, then θ restored; the update applies the gradient from θ+ε at θ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..device.budget import FLOAT_BYTES
from .forward import norm_stats_untouched
from .parts import Part

if TYPE_CHECKING:
    from .learner import StreamingLearner
    from .step import Batch

Closure = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Sgd(Part):
    """SGD with momentum and weight decay; gradients from one pass."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        return {"optimizer_state": n_params * FLOAT_BYTES if self.momentum > 0 else 0}

    def gradients(self, learner: StreamingLearner, batch: Batch, closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill ``.grad`` with the gradient of ``closure()``'s loss; returns (loss, selected samples' logits)."""
        learner.optimizer.zero_grad(set_to_none=True)
        loss, out = closure()
        loss.backward()
        learner.cost.train_pass(batch.n_train)
        return loss, out


@dataclass
class Sam(Part):
    """Sharpness-aware minimisation around ``base``, restricted to live weights."""

    rho: float = 0.05
    base: Sgd = field(default_factory=Sgd)

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.SGD:
        return self.base.build(params)

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        return {**self.base.memory_terms(n_params, n_prunable), "sam_perturbation": n_params * FLOAT_BYTES}

    def gradients(self, learner: StreamingLearner, batch: Batch, closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
        loss, out = self.base.gradients(learner, batch, closure)
        eps = perturb(learner.model, learner.masks, self.rho)
        try:
            with norm_stats_untouched(learner.model):
                self.base.gradients(learner, batch, closure)
        finally:
            restore(learner.model, eps)
        return loss, out


@torch.no_grad()
def perturb(model: nn.Module, masks: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """SAM ascent on live weights: add ε in place and return it (for :func:`restore`)."""
    grads = {name: p.grad * masks[name] if name in masks else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
    scale = rho / (norm + 1e-12)
    params = dict(model.named_parameters())
    eps = {name: g * scale for name, g in grads.items()}
    torch._foreach_add_([params[n] for n in eps], list(eps.values()))
    return eps


@torch.no_grad()
def restore(model: nn.Module, eps: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    torch._foreach_sub_([params[n] for n in eps], list(eps.values()))
