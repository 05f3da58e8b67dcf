"""Budget arithmetic: from a profile's byte budgets to concrete settings.

* Deployed-model budget -> target sparsity. A pruned weight tensor is stored as its live
  float32 values plus a 1-bit mask per weight (the snapshot encoding); everything else
  (biases, norms, the Normalize constants) is stored dense.
* Buffer budget -> buffer capacity in samples for the stream's input shape and dtype.
* Training-peak budget -> the largest batch (at most the profile's) whose estimated peak
  fits: runtime + weights + gradients + optimizer state + SAM perturbation + masks and
  pruning statistics + EWC state + activations at the batch + the buffer (and, on a GPU with
  unified memory, the buffer's device copy where it fits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import EsaclError
from ..models import build_model, prunable_parameters, split_model
from .profiles import Profile

if TYPE_CHECKING:
    from ..learn.methods import Method

# Per buffered sample besides its input: label (int16), task id (int16), insertion score (float32).
LABEL_BYTES, TASK_BYTES, SCORE_BYTES, LOGIT_BYTES = 2, 2, 4, 4
FLOAT_BYTES = 4


class BudgetError(EsaclError):
    """A profile's budget cannot hold what the run needs; the message says which term and what to change."""


def buffer_bytes_per_sample(input_shape: tuple[int, ...], dtype: str | np.dtype, num_classes: int,
                            qparams: int = 0) -> int:
    """Bytes one buffered sample costs: input (or latent) as stored, label, task, score, DER++ logits, and
    ``qparams`` float32 quantisation parameters (uint8 latents)."""
    x_bytes = math.prod(input_shape) * np.dtype(dtype).itemsize
    return x_bytes + LABEL_BYTES + TASK_BYTES + SCORE_BYTES + LOGIT_BYTES * num_classes + FLOAT_BYTES * qparams


def buffer_capacity(budget_bytes: int, input_shape: tuple[int, ...], dtype: str | np.dtype,
                    num_classes: int, qparams: int = 0) -> int:
    """Largest number of samples whose storage fits in ``budget_bytes``."""
    return budget_bytes // buffer_bytes_per_sample(input_shape, dtype, num_classes, qparams)


@dataclass(frozen=True)
class BufferLayout:
    """What one buffered sample's input is: the image as the stream stores it, or a latent at the frozen prefix's
    output (``latent``: ``fp16`` or ``uint8``, see ``learn/latent.py``)."""

    shape: tuple[int, ...]
    dtype: str
    qparams: int = 0
    latent: str | None = None

    def bytes_per_sample(self, num_classes: int) -> int:
        return buffer_bytes_per_sample(self.shape, self.dtype, num_classes, self.qparams)


def prefix_output_shape(model: nn.Sequential, input_shape: tuple[int, int, int], freeze_until: str) -> tuple:
    """Shape (C, H, W) of one sample's output of the frozen prefix (a latent)."""
    h, w, c = input_shape
    with torch.no_grad():
        return tuple(split_model(model, freeze_until)[0].eval()(torch.zeros(1, c, h, w)).shape[1:])


def buffer_layout(model: nn.Sequential, input_shape: tuple[int, int, int], input_dtype: str,
                  freeze_until: str | None, latent: str | None) -> BufferLayout:
    """The buffer's sample layout for ``model``: images, or latents at the frozen prefix's output."""
    if latent is None:
        return BufferLayout(tuple(input_shape), input_dtype)
    from ..learn.latent import DTYPES, QPARAMS

    return BufferLayout(prefix_output_shape(model, input_shape, freeze_until), DTYPES[latent], QPARAMS[latent], latent)


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


@dataclass
class Plan:
    """The settings a profile yields for one model and stream, with the arithmetic behind them."""

    model: str
    input_shape: tuple[int, int, int]
    target_sparsity: float
    sparsity_from: str
    model_bytes_dense: int
    model_bytes_stored: int
    buffer_capacity: int
    buffer_bytes: int
    batch_size: int
    memory_budget_bytes: int
    memory_terms: dict[str, int] = field(default_factory=dict)
    buffer_on_device: bool = False   # replay gathers from a copy of the buffer in GPU memory
    freeze_until: str | None = None  # the prefix up to this stage runs without gradients
    buffer_layout: BufferLayout | None = None
    trainable_params: int = 0

    @property
    def memory_estimate_bytes(self) -> int:
        return sum(self.memory_terms.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "memory_estimate_bytes": self.memory_estimate_bytes}


def plan(profile: Profile, model_name: str, input_shape: tuple[int, int, int], num_classes: int,
         method: Method, input_dtype: str = "uint8", sparsity: float | None = None,
         buffer_bytes: int | None = None, freeze_until: str | None = None, latent: str | None = None) -> Plan:
    """Derive sparsity, buffer capacity and batch size from ``profile``; raise BudgetError if nothing fits.

    With ``freeze_until``, gradients, optimizer and SAM state, pruning and activations count the trainable
    part only (a frozen forward keeps nothing for backward); ``latent`` sizes the buffer in latents.
    """
    with torch.random.fork_rng(devices=[]):  # a throwaway model: leave the global RNG alone
        model = build_model(model_name, input_shape, num_classes, freeze_until=freeze_until)
    layout = buffer_layout(model, input_shape, input_dtype, freeze_until, latent)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d = sum(p.numel() for p in prunable_parameters(model).values())
    if not method.sparse:
        target, source = 0.0, "method is dense"
    elif sparsity is not None:
        target, source = float(sparsity), "set for this run"
    elif profile.target_sparsity is not None:
        target, source = profile.target_sparsity, "profile training.target_sparsity"
    else:
        target, source = sparsity_for_model_budget(model, profile.model_bytes), "profile budgets.model_bytes"
    stored = stored_model_bytes(model, target) if method.sparse else n_params * FLOAT_BYTES
    if profile.model_bytes is not None and stored > profile.model_bytes:
        raise BudgetError(f"profile {profile.name}: the model at sparsity {target:.3f} takes {stored:,} B, over "
                          f"budgets.model_bytes = {profile.model_bytes:,} B; raise the sparsity or the budget")
    buf_budget = profile.buffer_bytes if buffer_bytes is None else buffer_bytes
    per_buffered = layout.bytes_per_sample(num_classes)
    capacity = buf_budget // per_buffered if method.keeps_buffer else 0
    buf_bytes = capacity * per_buffered
    fixed = {
        "runtime": profile.runtime_overhead_bytes,
        "weights": n_params * FLOAT_BYTES,
        "gradients": n_train * FLOAT_BYTES,
        **method.memory_terms(n_train, d),
        "buffer": buf_bytes,
    }
    if freeze_until is None:
        per_sample = activation_bytes_per_sample(model, input_shape)
    else:
        suffix = split_model(model, freeze_until)[1]
        per_sample = activation_bytes_per_sample(suffix, prefix_output_shape(model, input_shape, freeze_until),
                                                 channels_last=False)
    # A step forwards the minibatch (or the share it trains) and its replay batch together: an upper bound.
    per_batch_sample = math.ceil(per_sample * (1 + (method.replayed_per_minibatch_sample if capacity else 0)))
    room = profile.training_peak_bytes - sum(fixed.values())
    batch = min(profile.batch_size, room // per_batch_sample) if room > 0 else 0
    if batch < 1:
        largest = max(fixed, key=fixed.get)
        need = sum(fixed.values()) + per_batch_sample
        raise BudgetError(
            f"profile {profile.name}: budgets.training_peak_bytes = {profile.training_peak_bytes:,} B cannot hold "
            f"one training batch of {model_name}: fixed terms take {sum(fixed.values()):,} B, the largest is "
            f"{largest} ({fixed[largest]:,} B), and one sample's activations take {per_batch_sample:,} B; raise "
            f"the budget to at least {need:,} B, or shrink {largest}"
            + (" (budgets.buffer_bytes)" if largest == "buffer" else ""))
    terms = {**fixed, "activations": int(batch * per_batch_sample)}
    # On a GPU, replay gathers from a copy of the buffer in its memory. On a discrete GPU the buffer
    # term is that copy (the host arrays are outside its budget); with unified memory the copy is a
    # second one, kept only where the budget has room for it beside the rest.
    on_device = profile.device == "cuda" and capacity > 0
    if on_device and profile.unified_memory:
        on_device = profile.training_peak_bytes - sum(terms.values()) >= buf_bytes
        if on_device:
            terms["buffer_device_copy"] = buf_bytes
    return Plan(model_name, tuple(input_shape), target, source, n_params * FLOAT_BYTES, stored, capacity, buf_bytes,
                int(batch), profile.training_peak_bytes, terms, on_device, freeze_until, layout, n_train)
