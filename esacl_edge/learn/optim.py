"""Step 3: the optimizer. Plain SGD, or SAM as a wrapper around it.

Both build the torch SGD optimizer and compute the gradients the update applies:

* :class:`Sgd`: one forward and backward pass at θ;
* :class:`Sam`: on every ``every``-th step, an ascent pass at θ on the selected samples only
  (the replay batch stays out of it; its forward leaves BatchNorm statistics alone), the
  perturbation ε = ρ·(g⊙m)/‖g⊙m‖ added to the live weights only (m: the pruning masks), the
  full pass at θ+ε, then θ restored; the update applies the gradient from θ+ε at θ (under fp16
  loss scaling the ascent gradients are unscaled before the norm: ``precision.py``). The other
  steps are plain SGD steps, which halves SAM's extra cost at ``every=2`` (as RST does at random).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..device.budget import FLOAT_BYTES
from .forward import norm_stats_untouched
from .parts import Part

if TYPE_CHECKING:
    from .context import Context
    from .step import Batch

Closure = Callable[["Batch"], tuple[torch.Tensor, torch.Tensor]]  # batch -> (loss, selected samples' logits)


@dataclass
class Sgd(Part):
    """SGD with momentum (Nesterov's, if asked) and weight decay; gradients from one pass. With
    ``clip_norm``, the update's gradients are scaled down to that total L2 norm when above it."""

    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm!r}")

    def build(self, params: Iterable[nn.Parameter], fused: bool = False) -> torch.optim.SGD:
        """The torch optimizer; ``fused`` for loss scaling (the fused kernel skips an overflowed step on the device)."""
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.nesterov, fused=fused or None)

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        return {"optimizer_state": n_params * FLOAT_BYTES if self.momentum > 0 else 0}

    def gradients(self, ctx: Context, batch: Batch, closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill ``.grad`` with the gradient of ``closure(batch)``'s loss; returns (loss, selected samples' logits)."""
        ctx.optimizer.zero_grad(set_to_none=True)
        loss, out = closure(batch)
        ctx.precision.backward(loss)
        ctx.cost.train_pass(batch.n_train)
        return loss, out

    def clip(self, ctx: Context) -> None:
        """Scale the update's gradients down to ``clip_norm`` (on the device, without waiting for it)."""
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), self.clip_norm, foreach=True)


@dataclass
class Sam(Part):
    """Sharpness-aware minimisation around ``base``, restricted to live weights."""

    rho: float = 0.05
    every: int = 2       # SAM on every every-th step, plain SGD on the others (1: every step)
    base: Sgd = field(default_factory=Sgd)
    steps: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"Sam every must be >= 1 (SAM on every every-th step), got {self.every}")

    def build(self, params: Iterable[nn.Parameter], fused: bool = False) -> torch.optim.SGD:
        return self.base.build(params, fused)

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        return {**self.base.memory_terms(n_params, n_prunable), "sam_perturbation": n_params * FLOAT_BYTES}

    def clip(self, ctx: Context) -> None:
        self.base.clip(ctx)

    def gradients(self, ctx: Context, batch: Batch, closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps += 1
        if (self.steps - 1) % self.every:
            return self.base.gradients(ctx, batch, closure)
        current = dataclasses.replace(batch, replay_x=None, replay_y=None, replay_logits=None)
        with norm_stats_untouched(ctx.model):
            _, out = self.base.gradients(ctx, current, closure)
        finite = ctx.precision.unscale_ascent([p.grad for p in ctx.model.parameters() if p.grad is not None])
        eps = perturb(ctx.model, ctx.masks, self.rho, finite)
        try:
            loss, _ = self.base.gradients(ctx, batch, closure)
        finally:
            restore(ctx.model, eps)
        return loss, out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))


@torch.no_grad()
def perturb(model: nn.Module, masks: dict[str, torch.Tensor], rho: float,
            finite: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SAM ascent on live weights: add ε in place and return it (for :func:`restore`); ε = 0 where
    ``finite`` (the ascent gradients' overflow flag under fp16 loss scaling) is False."""
    grads = {name: p.grad * masks[name] if name in masks else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))
    scale = rho / (norm + 1e-12) if finite is None else finite * rho / (norm + 1e-12)
    params = dict(model.named_parameters())
    eps = {name: g * scale for name, g in grads.items()}
    torch._foreach_add_([params[n] for n in eps], list(eps.values()))
    return eps


@torch.no_grad()
def restore(model: nn.Module, eps: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    torch._foreach_sub_([params[n] for n in eps], list(eps.values()))
