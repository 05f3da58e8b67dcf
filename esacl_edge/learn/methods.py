"""Every method as a composition of parts, read in one place.

A method fills the slots of one fixed training step (``step.py``): which samples to train on,
the loss terms beside cross-entropy, the optimizer, the sparsity parts, what the buffer keeps,
what a task's end calibrates, and whether chunks are trained as they arrive. A new variant is a new part or
a new line here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import EsaclError
from ..names import METHOD_NAMES
from .buffer import IdsBuffer, ReservoirBuffer
from .calibration import BiasCalibration
from .ewc import EwcPenalty
from .joint import Joint
from .optim import Sam, Sgd
from .parts import Part
from .pruning import Pruning
from .replay import Replay
from .select import AllSamples, IdsSelect
from .sparcl import DataRemoval, GradientMasks, MaskUpdates


# Which logits the current samples' cross-entropy competes over: every class, or only the classes present
# in the minibatch (the asymmetric cross-entropy of ER-ACE, Caccia et al., 2022: old classes' logits are
# pushed down by replay alone, not by every new sample).
CURRENT_CLASSES = ("all", "present")


@dataclass
class Method:
    """The parts of one method. Hooks run in the order of :attr:`parts`: select, replay, optimizer, data,
    buffer, pruning, calibration, penalty, sparsity extras (so EWC reads masked gradients before SparCL's
    gradient masks, and a task's end calibrates the pruned model and anchors EWC after the last pruning)."""

    name: str
    select: AllSamples | IdsSelect = field(default_factory=AllSamples)
    replay: Replay | None = None
    penalty: EwcPenalty | None = None
    optimizer: Sgd | Sam = field(default_factory=Sgd)
    data: DataRemoval | Joint | None = None
    buffer: IdsBuffer | ReservoirBuffer | None = None
    pruning: Pruning | None = None
    calibration: BiasCalibration | None = None
    sparsity_extras: tuple[Part, ...] = ()   # after the pruning part: SparCL's mask updates, gradient masks
    current_classes: str = "all"   # the current samples' cross-entropy: over "all" classes, or those "present"
    all_classes_share: float = 0.0   # with "present": the share of that cross-entropy taken over all classes

    def __post_init__(self) -> None:
        if self.current_classes not in CURRENT_CLASSES:
            raise ValueError(f"current_classes must be one of {', '.join(CURRENT_CLASSES)}, got {self.current_classes!r}")
        if not 0.0 <= self.all_classes_share <= 1.0:
            raise ValueError(f"all_classes_share must be in [0, 1], got {self.all_classes_share!r}")

    def named_parts(self) -> list[tuple[str, Part]]:
        """(slot, part) for every part present, in the order hooks run in."""
        slots = [(name, getattr(self, name)) for name in
                 ("select", "replay", "optimizer", "data", "buffer", "pruning", "calibration", "penalty")]
        slots += [(f"sparsity_extras.{i}", p) for i, p in enumerate(self.sparsity_extras)]
        return [(name, part) for name, part in slots if part is not None]

    @property
    def parts(self) -> list[Part]:
        return [part for _, part in self.named_parts()]

    @property
    def sparse(self) -> bool:
        return self.pruning is not None

    @property
    def keeps_buffer(self) -> bool:
        return self.buffer is not None

    @property
    def replayed_per_minibatch_sample(self) -> float:
        """Buffered samples a step replays per minibatch sample: the replay ratio times the share it trains."""
        if self.replay is None:
            return 0.0
        return self.replay.ratio * (self.select.keep if isinstance(self.select, IdsSelect) else 1.0)

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        """Training-state bytes by term, summed over the parts (terms a method lacks are 0)."""
        terms = dict.fromkeys(("optimizer_state", "sam_perturbation", "masks_and_pruning_stats", "ewc_state"), 0)
        for part in self.parts:
            terms.update(part.memory_terms(n_params, n_prunable))
        return terms

    def replace(self, **changes) -> Method:
        return dataclasses.replace(self, **changes)


def esacl(name: str = "esacl", **changes) -> Method:
    """EsaCL = IDS step selection + SAM(ρ) on every 4th step (since 0.10) + DER++ + SDP pruning + a reservoir buffer.

    DER++ replays 1.5 buffered samples per new sample trained (since 0.11; 0.10 replayed a whole minibatch, 2 per
    new sample, DER++ itself replays 1).

    The current samples' cross-entropy competes over the classes present in the minibatch (since 0.8) for
    three quarters and over all classes for a quarter (since 0.12), each task's end calibrates the
    classifier's bias on the buffer against the bias that loss leaves (0.9),
    SDP ranks weights by magnitude within each layer's budget (since 0.5; the directional score lost on
    colour photographs) and follows its cubic schedule from the first chunk, regrowing at a task start
    from one step's dense gradient (since 0.8), and the buffer is reservoir (since 0.3; the IDS buffer
    lost at equal bytes): docs/method.md.
    """
    return Method(name, select=IdsSelect(keep=0.5), replay=Replay(alpha=0.3, beta=1.0, ratio=1.5),
                  optimizer=Sam(rho=0.05, every=4), buffer=ReservoirBuffer(),
                  pruning=Pruning(score="magnitude", warmup=0.0, regrow_steps=1),
                  calibration=BiasCalibration(), current_classes="present", all_classes_share=0.25
                  ).replace(**changes)


def sparcl(name: str = "sparcl", **changes) -> Method:
    """SparCL-style (hyperparameters from SparCL's released script where it has them): TDM masks on the
    importance score, DGM gradient masks, DDR data removal, DER++ replay on a reservoir buffer."""
    return Method(name, replay=Replay(alpha=0.3, beta=1.0), data=DataRemoval(frac=0.3, after=0.5),
                  buffer=ReservoirBuffer(),
                  pruning=Pruning(score="sparcl", allocation="global", grads_every_step=True),
                  sparsity_extras=(MaskUpdates(every=2, frac=0.1), GradientMasks(keep=0.8))).replace(**changes)


# The names and their descriptions are listed, torch-free, in ``esacl_edge.names``; the keys here are the same.
METHODS: dict[str, Callable[[], Method]] = {
    "esacl": esacl,
    # Ablations: each switches off one part of EsaCL.
    "esacl-noids": lambda: esacl("esacl-noids", select=AllSamples()),
    "esacl-nosam": lambda: esacl("esacl-nosam", optimizer=Sgd()),
    "esacl-allclasses": lambda: esacl("esacl-allclasses", current_classes="all"),
    "esacl-present": lambda: esacl("esacl-present", all_classes_share=0.0),
    "esacl-sam2": lambda: esacl("esacl-sam2", optimizer=Sam(rho=0.05, every=2)),
    "esacl-nocalib": lambda: esacl("esacl-nocalib", calibration=None),
    "esacl-replay1": lambda: esacl("esacl-replay1", replay=Replay(alpha=0.3, beta=1.0, ratio=1.0)),
    "esacl-replay2": lambda: esacl("esacl-replay2", replay=Replay(alpha=0.3, beta=1.0, ratio=2.0)),
    "esacl-warmup": lambda: esacl("esacl-warmup", pruning=Pruning(score="magnitude", warmup=0.5, regrow_steps=4)),
    "esacl-directional": lambda: esacl("esacl-directional", pruning=Pruning(score="directional")),  # + its warm-up
    "esacl-magnitude": lambda: esacl("esacl-magnitude"),  # esacl since 0.5
    "esacl-reservoir": lambda: esacl("esacl-reservoir", buffer=ReservoirBuffer()),  # the default since 0.3
    "esacl-idsbuffer": lambda: esacl("esacl-idsbuffer", buffer=IdsBuffer(spread=0.25)),
    "esacl-erk": lambda: esacl("esacl-erk", pruning=dataclasses.replace(esacl().pruning, allocation="erk")),
    "esacl-global": lambda: esacl("esacl-global", pruning=dataclasses.replace(esacl().pruning, allocation="global")),
    "esacl-layerregrow": lambda: esacl("esacl-layerregrow", pruning=dataclasses.replace(
        esacl().pruning, regrow_within_layers=True)),
    "esacl-early": lambda: esacl("esacl-early", pruning=dataclasses.replace(esacl().pruning, first_until=0.6)),
    "esacl-layerregrow-early": lambda: esacl("esacl-layerregrow-early", pruning=dataclasses.replace(
        esacl().pruning, regrow_within_layers=True, first_until=0.6)),
    "esacl-channels": lambda: esacl("esacl-channels", pruning=dataclasses.replace(
        esacl().pruning, structure="channel")),
    "esacl-channels-sqrt": lambda: esacl("esacl-channels-sqrt", pruning=dataclasses.replace(
        esacl().pruning, structure="channel", channel_exponent=0.5)),
    # Dense baselines: plain SGD steps on whole minibatches.
    "finetune": lambda: Method("finetune"),
    "ewc": lambda: Method("ewc", penalty=EwcPenalty(lam=10.0)),
    "er": lambda: Method("er", replay=Replay(alpha=0.0, beta=1.0), buffer=ReservoirBuffer()),
    "derpp": lambda: Method("derpp", replay=Replay(alpha=0.3, beta=1.0), buffer=ReservoirBuffer()),
    "derpp-ace": lambda: Method("derpp-ace", replay=Replay(alpha=0.3, beta=1.0), buffer=ReservoirBuffer(),
                                current_classes="present"),
    "derpp-calib": lambda: Method("derpp-calib", replay=Replay(alpha=0.3, beta=1.0), buffer=ReservoirBuffer(),
                                  calibration=BiasCalibration()),
    "joint": lambda: Method("joint", data=Joint()),
    # SparCL-style sparse baselines.
    "sparcl": sparcl,
    "sparcl-er": lambda: sparcl("sparcl-er", replay=Replay(alpha=0.0, beta=1.0)),
    "sparcl-ewc": lambda: sparcl("sparcl-ewc", replay=None, buffer=None, penalty=EwcPenalty(lam=10.0)),
    "sparcl-ace": lambda: sparcl("sparcl-ace", current_classes="present"),
}


def get_method(name: str) -> Method:
    """A fresh :class:`Method` (its parts hold no state yet)."""
    try:
        return METHODS[name]()
    except KeyError:
        raise EsaclError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}") from None


def with_lr(method: Method, lr: float) -> Method:
    """``method`` with its SGD learning rate set to ``lr`` (SAM's base optimizer for SAM methods)."""
    opt = method.optimizer
    if isinstance(opt, Sam):
        return method.replace(optimizer=dataclasses.replace(opt, base=dataclasses.replace(opt.base, lr=lr)))
    return method.replace(optimizer=dataclasses.replace(opt, lr=lr))
