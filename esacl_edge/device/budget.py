"""Budget arithmetic of a model, method-free: the bytes a model takes, stored sparse or dense, and the
activations a training forward keeps.

* Deployed-model budget -> target sparsity. A pruned weight tensor is stored as its live
  float32 values plus a 1-bit mask per weight (the snapshot encoding); everything else
  (biases, norms, the Normalize constants) is stored dense.
* Activations per sample: what one training forward keeps for backward.

The memory plan that sums a method's terms against a profile is ``learn/plan.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import EsaclError
from ..models import prunable_parameters, split_model

FLOAT_BYTES = 4


class BudgetError(EsaclError):
    """A profile's budget cannot hold what the run needs; the message says which term and what to change."""


def prefix_output_shape(model: nn.Sequential, input_shape: tuple[int, int, int], freeze_until: str) -> tuple:
    """Shape (C, H, W) of one sample's output of the frozen prefix (a latent)."""
    h, w, c = input_shape
    with torch.no_grad():
        return tuple(split_model(model, freeze_until)[0].eval()(torch.zeros(1, c, h, w)).shape[1:])


def stored_model_bytes(model: nn.Module, sparsity: float) -> int:
    """Bytes of the snapshot encoding at ``sparsity``: live values + mask bits + dense rest."""
    prunable = prunable_parameters(model)
    d = sum(p.numel() for p in prunable.values())
    names = {f"{n}" for n in prunable}
    rest = sum(t.numel() for n, t in model.state_dict().items() if n not in names)
    live = int(round((1 - sparsity) * d))
    masks = sum(math.ceil(p.numel() / 8) for p in prunable.values())
    return FLOAT_BYTES * (live + rest) + masks


def sparsity_for_model_budget(model: nn.Module, budget_bytes: int) -> float:
    """The lowest sparsity whose snapshot fits in ``budget_bytes`` (0 when the dense model fits)."""
    prunable = prunable_parameters(model)
    d = sum(p.numel() for p in prunable.values())
    dense = sum(t.numel() for t in model.state_dict().values()) * FLOAT_BYTES
    if dense <= budget_bytes:
        return 0.0
    fixed = stored_model_bytes(model, 1.0)  # masks and dense rest, no live weight
    live = (budget_bytes - fixed) // FLOAT_BYTES
    if live < len(prunable):  # every layer keeps at least one weight
        raise BudgetError(f"budgets.model_bytes = {budget_bytes:,} B is too small for this model: its masks and "
                          f"dense parameters alone take {fixed:,} B; raise it to at least "
                          f"{fixed + FLOAT_BYTES * len(prunable):,} B or choose a smaller model")
    return 1.0 - live / d


def activation_bytes_per_sample(model: nn.Module, input_shape: tuple[int, ...], channels_last: bool = True) -> int:
    """Bytes of every module output in one training forward of one sample (kept for backward); ``input_shape``
    is (H, W, C) as stored, or the module's own input shape with ``channels_last=False``."""
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if torch.is_tensor(output):
            total += output.numel() * FLOAT_BYTES

    # Layers with weights or constants (conv, norm, linear, Normalize); parameter-free stages (activations,
    # pooling, flattening) are not counted, as when they were functional calls.
    leaves = [m for m in model.modules() if not list(m.children())
              and (next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    shape = (input_shape[2], *input_shape[:2]) if channels_last else tuple(input_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total + math.prod(shape) * FLOAT_BYTES
