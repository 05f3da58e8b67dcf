"""Named method settings. A method is a set of choices in one training loop, not a subclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import EsaclError


@dataclass(frozen=True)
class MethodConfig:
    """Every knob of the EsaCL step; baselines switch parts off."""

    name: str
    rho: float = 0.05               # SAM radius; 0 = plain SGD step (one backward pass)
    keep_frac: float = 0.5          # IDS gamma: fraction of each minibatch that is trained on
    ids_score: str = "loss"         # per-sample informativeness: "loss" or "margin"
    buffer: str = "ids"             # "ids", "reservoir" or "none"
    buffer_spread: float = 0.25     # share of each class quota the buffer fills at random
    alpha: float = 0.3              # DER++ logit-matching weight
    beta: float = 1.0               # DER++ replay cross-entropy weight
    sparse: bool = True             # prune to the target sparsity (False: stay dense)
    prune_score: str = "directional"  # "directional" (SDP) or "magnitude"
    prune_until: float = 0.6        # cubic schedule ends after this fraction of a task's chunks
    gap_per_chunk: float = 0.3      # unknown task length: close this share of the gap per chunk
    regrow_frac: float = 0.05       # of all prunable weights, revived at each new task
    regrow_steps: int = 4           # steps of the new task whose |grad| decides the regrowth
    stat_decay: float = 0.9         # running-average decay of the SDP statistics
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0

    def replace(self, **changes) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


METHODS: dict[str, MethodConfig] = {
    "esacl": MethodConfig("esacl"),
    # Ablations: each switches off one part of EsaCL.
    "esacl-noids": MethodConfig("esacl-noids", keep_frac=1.0),
    "esacl-nosam": MethodConfig("esacl-nosam", rho=0.0),
    "esacl-magnitude": MethodConfig("esacl-magnitude", prune_score="magnitude"),
    "esacl-reservoir": MethodConfig("esacl-reservoir", buffer="reservoir"),
    "finetune": MethodConfig("finetune", rho=0.0, keep_frac=1.0, buffer="none", sparse=False),
}


def get_method(name: str) -> MethodConfig:
    try:
        return METHODS[name]
    except KeyError:
        raise EsaclError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
