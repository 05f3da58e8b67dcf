"""Pick the torch device a profile asks for, falling back with one clear warning."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .profiles import Profile


def select_device(profile: Profile, cuda_available: Callable[[], bool] = torch.cuda.is_available) -> torch.device:
    """CUDA when the profile asks for it and it is there; otherwise the profile's fallback (CPU)."""
    device = torch.device("cpu")
    if profile.device == "cuda":
        if cuda_available():
            device = torch.device("cuda")
        else:
            warnings.warn(f"profile {profile.name}: CUDA is not available, training on the CPU instead",
                          RuntimeWarning, stacklevel=2)
    if device.type == "cpu" and profile.threads > 0:
        torch.set_num_threads(profile.threads)
    return device


def autocast_dtype(profile: Profile, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for training on ``device``, or None for full fp32."""
    if device.type != "cuda" or profile.precision == "fp32":
        return None
    return torch.float16 if profile.precision == "fp16" else torch.bfloat16
