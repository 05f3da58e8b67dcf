"""Ablations and reference variants: the methods of ``methods.py`` with one part changed, run by ``bench`` to
reproduce BENCHMARKS.md and kept so that runs saved under their names resume. Their descriptions, torch-free
for the command line, are ``names.ABLATION_DESCRIPTIONS`` (same keys, same order)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .buffer import IdsBuffer
from .calibration import BiasCalibration
from .ewc import EwcPenalty
from .methods import Method, derpp, esacl, sparcl
from .optim import Sam, Sgd
from .pruning import Pruning
from .replay import Replay
from .select import AllSamples


def _esacl_pruning(name: str, **changes) -> Method:
    """EsaCL with its pruning part's settings changed."""
    return esacl(name, pruning=dataclasses.replace(esacl().pruning, **changes))


ABLATIONS: dict[str, Callable[[], Method]] = {
    "esacl-noids": lambda: esacl("esacl-noids", select=AllSamples()),
    "esacl-nosam": lambda: esacl("esacl-nosam", optimizer=Sgd()),
    "esacl-allclasses": lambda: esacl("esacl-allclasses", current_classes="all"),
    "esacl-present": lambda: esacl("esacl-present", all_classes_share=0.0),
    "esacl-sam2": lambda: esacl("esacl-sam2", optimizer=Sam(rho=0.05, every=2)),
    "esacl-nocalib": lambda: esacl("esacl-nocalib", calibration=None),
    "esacl-replay1": lambda: esacl("esacl-replay1", replay=Replay(alpha=0.3, beta=1.0, ratio=1.0)),
    "esacl-replay2": lambda: esacl("esacl-replay2", replay=Replay(alpha=0.3, beta=1.0, ratio=2.0)),
    "esacl-warmup": lambda: esacl("esacl-warmup", pruning=Pruning(score="magnitude", warmup=0.5, regrow_steps=4)),
    "esacl-directional": lambda: esacl("esacl-directional", pruning=Pruning(score="directional")),
    "esacl-idsbuffer": lambda: esacl("esacl-idsbuffer", buffer=IdsBuffer(spread=0.25)),
    "esacl-erk": lambda: _esacl_pruning("esacl-erk", allocation="erk"),
    "esacl-global": lambda: _esacl_pruning("esacl-global", allocation="global"),
    "esacl-layerregrow": lambda: _esacl_pruning("esacl-layerregrow", regrow_within_layers=True),
    "esacl-early": lambda: _esacl_pruning("esacl-early", first_until=0.6),
    "esacl-layerregrow-early": lambda: _esacl_pruning("esacl-layerregrow-early", regrow_within_layers=True,
                                                      first_until=0.6),
    "esacl-channels": lambda: _esacl_pruning("esacl-channels", structure="channel"),
    "esacl-channels-sqrt": lambda: _esacl_pruning("esacl-channels-sqrt", structure="channel", channel_exponent=0.5),
    "derpp-ace": lambda: derpp("derpp-ace", current_classes="present"),
    "derpp-calib": lambda: derpp("derpp-calib", calibration=BiasCalibration()),
    "sparcl-er": lambda: sparcl("sparcl-er", replay=Replay(alpha=0.0, beta=1.0)),
    "sparcl-ewc": lambda: sparcl("sparcl-ewc", replay=None, buffer=None, penalty=EwcPenalty(lam=10.0)),
    "sparcl-ace": lambda: sparcl("sparcl-ace", current_classes="present"),
    # Deprecated names of esacl itself.
    "esacl-magnitude": lambda: esacl("esacl-magnitude"),
    "esacl-reservoir": lambda: esacl("esacl-reservoir"),
}
