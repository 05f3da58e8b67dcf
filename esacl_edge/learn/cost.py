"""Training cost accounting: FLOPs by the RigL convention, for every method alike.

Per-layer dense forward FLOPs come from ``torch.utils.flop_counter`` on one sample. A
sparse layer's forward costs its dense FLOPs x its weight density; a backward pass costs
two forwards: the input-gradient half at the weight density, the weight-gradient half at
the gradient density (lower than the weight density only under gradient masking). A step
whose dense gradient is read (regrowth evidence, SparCL's mask updates) computes the
weight-gradient half dense, and is charged so (:meth:`CostMeter.dense_weight_grads`). A frozen
prefix costs its dense forward each time a sample goes through it, and nothing else.
FLOPs = 2 x MACs. Evaluation is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import prunable_parameters


def _count(module: nn.Module, input_shape: tuple[int, int, int]) -> FlopCounterMode:
    """FLOPs of one sample (H, W, C) through ``module`` in eval mode, without gradients (mode restored)."""
    h, w, c = input_shape
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, c, h, w, device=device))
    module.train(was_training)
    return counter


def layer_forward_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Dense forward FLOPs of one sample, per prunable weight (keyed like ``prunable_parameters``)."""
    counts = {name: sum(ops.values()) for name, ops in _count(model, input_shape).get_flop_counts().items()}
    root = type(model).__name__
    return {name: int(counts.get(f"{root}.{name[: -len('.weight')]}", 0)) for name in prunable_parameters(model)}


def forward_flops(module: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Dense forward FLOPs of one sample (H, W, C) through ``module`` (e.g. a frozen prefix)."""
    return int(_count(module, input_shape).get_total_flops())


@dataclass
class CostMeter:
    """Accumulates training FLOPs as passes happen."""

    layer_flops: dict[str, int]
    frozen_flops: int = 0   # one sample's forward through the frozen prefix (no backward, never pruned)
    weight_density: dict[str, float] = field(default_factory=dict)
    grad_density: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0

    def set_density(self, weight: dict[str, float], grad: dict[str, float] | None = None) -> None:
        self.weight_density = dict(weight)
        self.grad_density = dict(grad if grad is not None else weight)

    def set_grad_density(self, grad: dict[str, float]) -> None:
        self.grad_density = dict(grad)

    def _forward(self) -> float:
        return sum(f * self.weight_density.get(n, 1.0) for n, f in self.layer_flops.items())

    def _weight_grad(self) -> float:
        return sum(f * self.grad_density.get(n, 1.0) for n, f in self.layer_flops.items())

    def forward(self, samples: int) -> None:
        """A forward pass without gradients (e.g. IDS scoring)."""
        self.flops += samples * self._forward()

    def frozen_forward(self, samples: int) -> None:
        """A forward pass through the frozen prefix."""
        self.flops += samples * self.frozen_flops

    def train_pass(self, samples: int) -> None:
        """Forward + backward (input gradients at weight density, weight gradients at gradient density)."""
        self.flops += samples * (2 * self._forward() + self._weight_grad())

    def dense_weight_grads(self, samples: int) -> None:
        """The last backward pass's weight gradients were read dense: charge the difference to dense."""
        self.flops += samples * (self.dense_forward_flops - self._weight_grad())

    def state_dict(self) -> dict:
        return {"flops": self.flops, "weight_density": self.weight_density, "grad_density": self.grad_density}

    def load_state_dict(self, state: dict) -> None:
        self.flops = float(state["flops"])
        self.set_density(state["weight_density"], state["grad_density"])

    @property
    def macs(self) -> float:
        return self.flops / 2

    @property
    def dense_forward_flops(self) -> int:
        return sum(self.layer_flops.values())
