"""Host-to-device copies that do not make the host wait for the GPU.

A host tensor bound for a GPU is staged in pinned (page-locked) memory and copied with
``non_blocking``, so the copy is queued behind the work already on the device instead of
waiting for it (PyTorch keeps the pinned block alive until the copy has run). On the CPU
this is the tensor itself.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (dtype unchanged) on ``device``, copied without a host-device sync."""
    t = x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
