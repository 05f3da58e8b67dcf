"""Every method as a composition of parts, read in one place.

A method fills the slots of one fixed training step (``step.py``): which samples to train on,
the loss terms beside cross-entropy, the optimizer, the sparsity parts, what the buffer keeps,
what a task's end calibrates, and whether chunks are trained as they arrive. ``METHODS`` are the
methods a user chooses; ``ablations.py`` holds the variants the benchmarks compare them with.
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
        self.wire()

    def wire(self) -> None:
        """Hand each part the siblings it depends on (rather than a part looking them up while learning); the
        learner calls it again on its own copy of the method, after any part was replaced."""
        if isinstance(self.buffer, IdsBuffer):   # it refreshes replayed samples' scores by the selection's score
            self.buffer.score = self.select.score
        for extra in self.sparsity_extras:       # SparCL's mask updates and gradient masks act on the pruning's masks
            extra.pruning = self.pruning

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
    """EsaCL = IDS step selection + SAM(ρ) on every 4th step + DER++ + SDP pruning + a reservoir buffer.

    IDS trains each step on the half of the minibatch it selects; DER++ replays 1.5 buffered samples
    per new sample trained. The current samples' cross-entropy competes over the classes present in
    the minibatch for three quarters and over all classes for a quarter, and each task's end
    calibrates the classifier's bias on the buffer. SDP ranks weights by magnitude within each
    layer's budget and follows its cubic schedule from the first chunk, regrowing at a task start
    from one step's dense gradient. The measurements behind each choice: docs/method.md.
    """
    return Method(name, select=IdsSelect(keep=0.5), replay=Replay(alpha=0.3, beta=1.0, ratio=1.5),
                  optimizer=Sam(rho=0.05, every=4), buffer=ReservoirBuffer(),
                  pruning=Pruning(score="magnitude", warmup=0.0, regrow_steps=1),
                  calibration=BiasCalibration(), current_classes="present", all_classes_share=0.25
                  ).replace(**changes)


# DER++'s logit matching has gradients that grow with the logits' distance to the stored ones, so at
# the profiles' learning rate of 0.1 a few early steps can feed on themselves until the loss is NaN;
# the dense and SparCL-style DER++ baselines clip the update's gradient norm at 20, which healthy runs
# exceed in under 2% of their steps.
DERPP_CLIP_NORM = 20.0


def derpp(name: str = "derpp", **changes) -> Method:
    """DER++ (Buzzega et al., 2020): α·MSE on stored logits + β·CE on replayed labels, a reservoir buffer."""
    return Method(name, replay=Replay(alpha=0.3, beta=1.0), buffer=ReservoirBuffer(),
                  optimizer=Sgd(clip_norm=DERPP_CLIP_NORM)).replace(**changes)


def sparcl(name: str = "sparcl", **changes) -> Method:
    """SparCL-style (hyperparameters from SparCL's released script where it has them): TDM masks on the
    importance score, DGM gradient masks, DDR data removal, DER++ replay on a reservoir buffer. Pruning
    follows the cubic schedule from the first chunk to the target after 60% of each task's chunks."""
    return Method(name, replay=Replay(alpha=0.3, beta=1.0), data=DataRemoval(frac=0.3, after=0.5),
                  buffer=ReservoirBuffer(), optimizer=Sgd(clip_norm=DERPP_CLIP_NORM),
                  pruning=Pruning(score="sparcl", allocation="global", grads_every_step=True,
                                  warmup=0.0, first_until=0.6),
                  sparsity_extras=(MaskUpdates(every=2, frac=0.1), GradientMasks(keep=0.8))).replace(**changes)


# The methods a user chooses; their descriptions, torch-free for the command line, are
# ``names.METHOD_DESCRIPTIONS`` (same keys, same order).
METHODS: dict[str, Callable[[], Method]] = {
    "esacl": esacl,
    "finetune": lambda: Method("finetune"),
    "ewc": lambda: Method("ewc", penalty=EwcPenalty(lam=10.0)),
    "er": lambda: Method("er", replay=Replay(alpha=0.0, beta=1.0), buffer=ReservoirBuffer()),
    "er-ace": lambda: Method("er-ace", replay=Replay(alpha=0.0, beta=1.0), buffer=ReservoirBuffer(),
                             current_classes="present"),
    "derpp": derpp,
    "joint": lambda: Method("joint", data=Joint()),
    "sparcl": sparcl,
}


def get_method(name: str) -> Method:
    """A fresh :class:`Method` (its parts hold no state yet): a product method, or an ablation of
    ``ablations.ABLATIONS`` (which bench runs and runs saved under it resume with)."""
    if name in METHODS:
        return METHODS[name]()
    from .ablations import ABLATIONS

    if name in ABLATIONS:
        return ABLATIONS[name]()
    raise EsaclError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)} "
                     "(or an ablation of 'esacl-edge bench --help')")


def with_lr(method: Method, lr: float) -> Method:
    """``method`` with its SGD learning rate set to ``lr`` (SAM's base optimizer for SAM methods)."""
    opt = method.optimizer
    if isinstance(opt, Sam):
        return method.replace(optimizer=dataclasses.replace(opt, base=dataclasses.replace(opt.base, lr=lr)))
    return method.replace(optimizer=dataclasses.replace(opt, lr=lr))
