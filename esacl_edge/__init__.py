"""esacl-edge: on-device continual learning of sparse models (EsaCL: SDP + IDS)."""

from __future__ import annotations

import importlib

from .errors import EsaclError

__version__ = "0.13.0"

# Imported on first use, so that the command line starts without loading torch.
_LAZY = {"StreamingLearner": ".streaming", "Profile": ".device.profiles", "load_profile": ".device.profiles"}

__all__ = ["StreamingLearner", "Profile", "load_profile", "EsaclError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
