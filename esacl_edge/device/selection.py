"""Pick the torch device a profile asks for, falling back with one clear warning."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from .profiles import Profile


def detect_jetson(root: str | Path = "/") -> str | None:
    """The board name if this is an NVIDIA Jetson (from the files L4T boards carry), else None."""
    root = Path(root)
    model = root / "proc/device-tree/model"
    if model.is_file():
        name = model.read_bytes().rstrip(b"\0").decode("utf-8", errors="replace").strip()
        if "jetson" in name.lower():
            return name
    release = root / "etc/nv_tegra_release"
    if release.is_file():
        first = release.read_text(encoding="utf-8", errors="replace").splitlines()
        return f"NVIDIA Jetson ({first[0].strip('# ').strip()})" if first else "NVIDIA Jetson"
    return None


def select_device(profile: Profile, cuda_available: Callable[[], bool] | None = None,
                  jetson: Callable[[], str | None] = detect_jetson) -> torch.device:
    """CUDA when the profile asks for it and it is there (``torch.cuda.is_available`` unless
    ``cuda_available`` is given); otherwise the CPU, with one warning that says so."""
    device = torch.device("cpu")
    if profile.device == "cuda":
        if (cuda_available or torch.cuda.is_available)():
            device = torch.device("cuda")
        else:
            board = jetson()
            hint = (f" This is a {board}: install NVIDIA's PyTorch wheel for your JetPack to train on its GPU."
                    if board else "")
            precision = f", where {profile.precision} becomes fp32" if profile.precision != "fp32" else ""
            warnings.warn(f"profile {profile.name}: CUDA is not available, so this runs on the CPU{precision}."
                          f"{hint}", RuntimeWarning, stacklevel=2)
    return device


def apply_threads(profile: Profile, cores: int | None = None) -> int:
    """Use the profile's CPU thread count for this process (a process-wide setting: the CLI's to make); more
    threads than the cores this process may run on (``cores``, default: its CPU affinity) are capped there,
    with a warning. Returns the thread count in use."""
    if profile.threads > 0:
        cores = cores or usable_cores()
        threads = profile.threads
        if threads > cores:
            warnings.warn(f"{profile.source or 'profile ' + profile.name}: training.threads = {threads}, but this "
                          f"process may run on {cores} cores; using {cores} (more threads than cores only wait "
                          "for each other)", RuntimeWarning, stacklevel=2)
            threads = cores
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def autocast_dtype(profile: Profile, device: torch.device,
                   bf16_supported: Callable[[], bool] | None = None) -> torch.dtype | None:
    """The mixed-precision dtype for training on ``device``, or None for full fp32.

    A profile's precision applies on the device it names: a CUDA profile that fell back to the CPU
    trains in fp32. bf16 on a GPU without it (``torch.cuda.is_bf16_supported``, or
    ``bf16_supported`` if given; compute capability below 8.0) becomes fp16, with loss scaling,
    and one warning.
    """
    if profile.precision == "fp32" or device.type != profile.device:
        return None
    if profile.precision == "fp16":
        return torch.float16
    if device.type == "cuda" and not (bf16_supported or torch.cuda.is_bf16_supported)():
        warnings.warn(f"profile {profile.name}: this GPU has no bf16 support, so it trains in fp16 with loss "
                      "scaling instead", RuntimeWarning, stacklevel=2)
        return torch.float16
    return torch.bfloat16
