"""The memory plan: from a profile's byte budgets and a method's parts to concrete settings.

* Deployed-model budget -> target sparsity (``device.budget``).
* Buffer budget -> buffer capacity in samples for the stream's input shape and dtype (``buffer.py``'s
  byte format).
* Training-peak budget -> the largest batch (at most the profile's) whose estimated peak
  fits: runtime + weights + gradients + the parts' terms (optimizer state, SAM perturbation,
  masks and pruning statistics, EWC state) + activations at the batch + the buffer (and, on a GPU
  with unified memory, the buffer's device copy where it fits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..device.budget import (FLOAT_BYTES, BudgetError, activation_bytes_per_sample, prefix_output_shape,
                             sparsity_for_model_budget, stored_model_bytes)
from ..device.profiles import Profile
from ..models import build_model, prunable_parameters, split_model
from . import latent as latent_forms
from .buffer import BufferLayout

if TYPE_CHECKING:
    from .methods import Method


def buffer_layout(model: nn.Sequential, input_shape: tuple[int, int, int], input_dtype: str,
                  freeze_until: str | None, latent: str | None) -> BufferLayout:
    """The buffer's sample layout for ``model``: images, or latents at the frozen prefix's output."""
    if latent is None:
        return BufferLayout(tuple(input_shape), input_dtype)
    return BufferLayout(prefix_output_shape(model, input_shape, freeze_until), latent_forms.DTYPES[latent],
                        latent_forms.QPARAMS[latent], latent)


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


def _where(profile: Profile) -> str:
    """How an error names the profile: its file, and its name."""
    return f"{profile.source} (profile {profile.name})" if profile.source else f"profile {profile.name}"


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
        raise BudgetError(f"{_where(profile)}: the model at sparsity {target:.3f} takes {stored:,} B, over "
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
            f"{_where(profile)}: budgets.training_peak_bytes = {profile.training_peak_bytes:,} B cannot hold "
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
