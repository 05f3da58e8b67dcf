"""Named method settings. A method is a set of choices in one training loop, not a subclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import EsaclError


@dataclass(frozen=True)
class MethodConfig:
    """Every knob of the EsaCL step; baselines switch parts off."""

    name: str
    rho: float = 0.05               # SAM radius; 0 = plain SGD step (one backward pass)
    keep_frac: float = 0.5          # IDS gamma: fraction of each minibatch that is trained on
    ids_score: str = "loss"         # per-sample informativeness: "loss" or "margin"
    buffer: str = "ids"             # "ids", "reservoir" or "none"
    buffer_spread: float = 0.25     # share of each class quota the buffer fills at random
    replay_ratio: float = 1.0       # replay batch size / minibatch size
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
    ewc_lambda: float = 0.0         # online EWC penalty weight (0 = off)
    ewc_gamma: float = 1.0          # online EWC decay of older tasks' Fisher
    joint: bool = False             # upper bound: keep all data, train offline at each task end
    importance_lambda: float = 0.5  # SparCL importance |w| + lambda |grad|
    mask_update_every: int = 0      # SparCL TDM: prune-and-regrow every k chunks (0 = off)
    mask_update_frac: float = 0.1   # share of live weights that move at a mask update
    grad_keep: float = 1.0          # SparCL DGM: share of live weights whose gradients apply
    ddr_frac: float = 0.0           # SparCL DDR: share of a chunk dropped after ddr_after of its passes
    ddr_after: float = 0.5

    def replace(self, **changes) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


_SPARCL = MethodConfig(
    "sparcl", rho=0.0, keep_frac=1.0, buffer="reservoir", prune_score="sparcl", importance_lambda=0.5,
    mask_update_every=2, mask_update_frac=0.1, grad_keep=0.8, ddr_frac=0.3, ddr_after=0.5, regrow_frac=0.05)

METHODS: dict[str, MethodConfig] = {
    "esacl": MethodConfig("esacl"),
    # Ablations: each switches off one part of EsaCL.
    "esacl-noids": MethodConfig("esacl-noids", keep_frac=1.0),
    "esacl-nosam": MethodConfig("esacl-nosam", rho=0.0),
    "esacl-magnitude": MethodConfig("esacl-magnitude", prune_score="magnitude"),
    "esacl-reservoir": MethodConfig("esacl-reservoir", buffer="reservoir"),
    # Dense baselines: plain SGD steps on whole minibatches.
    "finetune": MethodConfig("finetune", rho=0.0, keep_frac=1.0, buffer="none", sparse=False),
    "ewc": MethodConfig("ewc", rho=0.0, keep_frac=1.0, buffer="none", sparse=False, ewc_lambda=10.0),
    "er": MethodConfig("er", rho=0.0, keep_frac=1.0, buffer="reservoir", sparse=False, alpha=0.0, beta=1.0),
    "derpp": MethodConfig("derpp", rho=0.0, keep_frac=1.0, buffer="reservoir", sparse=False),
    "joint": MethodConfig("joint", rho=0.0, keep_frac=1.0, buffer="none", sparse=False, joint=True),
    # SparCL-style sparse baselines (hyperparameters from SparCL's released script where it has them).
    "sparcl": _SPARCL,
    "sparcl-er": _SPARCL.replace(name="sparcl-er", alpha=0.0, beta=1.0),
    "sparcl-ewc": _SPARCL.replace(name="sparcl-ewc", buffer="none", ewc_lambda=10.0),
}


def get_method(name: str) -> MethodConfig:
    try:
        return METHODS[name]
    except KeyError:
        raise EsaclError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
