"""Mixed precision: the autocast dtype a step runs in, and fp16's dynamic loss scaling through SAM.

* fp32: no autocast. bf16: autocast, no loss scaling (bf16 has fp32's exponent range, so
  gradients neither underflow nor overflow).
* fp16: autocast with dynamic loss scaling (``torch.amp.GradScaler``): each backward pass
  runs on the scaled loss, so small gradients do not underflow to zero, and

  - SAM's ascent gradients are unscaled before the perturbation's norm; if they are not
    finite the perturbation is zero, so that step applies the plain gradient at θ
    (``unperturbed_sam_steps``);
  - the update's gradients are unscaled before any part reads them (SDP statistics,
    regrowth evidence, EWC's Fisher); if they are not finite, those reads and the SGD update
    are skipped and the scale backs off (``overflow_skipped_steps``).

Nothing here waits for the device: the overflow flags are device tensors that the parts and
the fused SGD kernel read where they are, and the counts come back once per chunk. The
model's weights, their gradients, the SDP statistics and the buffer's logits stay float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

@dataclass
class MixedPrecision:
    """How one learner's steps run: ``dtype`` (None: fp32) on ``device``, with a loss scaler for fp16."""

    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)
    grads_finite: torch.Tensor | None = field(init=False, default=None)  # this step's update gradients (fp16)
    _counts: torch.Tensor | None = field(init=False, default=None)        # (skipped, unperturbed) on the device
    _host_counts: list[int] = field(init=False, default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        if self.dtype == torch.float16:
            # GradScaler's defaults: 2^16 at first, halved on an overflow, doubled after 2000 finite steps.
            self.scaler = torch.amp.GradScaler(self.device.type)
            self._counts = torch.zeros(2, dtype=torch.int64, device=self.device)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    @property
    def scales_loss(self) -> bool:
        return self.scaler is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the training dtype (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass on the loss, scaled under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    @torch.no_grad()
    def unscale_ascent(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Unscale SAM's ascent gradients in place; returns whether they are finite (None: not scaled).

        Non-finite entries are zeroed, so a perturbation built from them and the returned flag is zero.
        """
        if self.scaler is None or not grads:
            return None
        inv = self.scaler.scale(torch.ones((), device=self.device)).reciprocal()
        torch._foreach_mul_(grads, inv)
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        self._counts[1] += ~finite
        return finite

    @torch.no_grad()
    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale the update's gradients in place and flag whether they are finite (``grads_finite``)."""
        if self.scaler is None:
            return
        self.scaler.unscale_(optimizer)
        # Checked after unscaling: the scaler's own check (before it) agrees while the scale is at least 1.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grads_finite = (torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads
                             else torch.ones((), dtype=torch.bool, device=self.device))
        self._counts[0] += ~self.grads_finite

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The SGD update; under fp16 skipped when the gradients overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)   # the fused kernel reads the overflow flag on the device
        self.scaler.update()
        self.grads_finite = None

    def counts(self) -> dict[str, int]:
        """Steps skipped for overflow and SAM steps left unperturbed, so far (one read from the device)."""
        if self._counts is not None:
            skipped, unperturbed = self._counts.tolist()
            self._host_counts = [self._host_counts[0] + skipped, self._host_counts[1] + unperturbed]
            self._counts.zero_()
        return {"overflow_skipped_steps": self._host_counts[0], "unperturbed_sam_steps": self._host_counts[1]}

    def state_dict(self) -> dict[str, Any]:
        return {**self.counts(), "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._host_counts = [int(state.get("overflow_skipped_steps", 0)), int(state.get("unperturbed_sam_steps", 0))]
        if self._counts is not None:
            self._counts.zero_()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def gated(grads: list[torch.Tensor], finite: torch.Tensor | None) -> list[torch.Tensor]:
    """``grads`` for a statistic to read: as they are, or zero where this step overflowed (no host sync)."""
    if finite is None:
        return grads
    return [torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device)) for g in grads]
