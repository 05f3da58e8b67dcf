"""The pruning part: SDP's masks, statistics and schedule (and the same machinery for SparCL).

* after the backward pass: record |grad| where regrowth will need it (a dense-gradient read,
  charged dense), mask the gradients to live weights, and, for the scores that read them
  (directional, SparCL's), update the running statistics while a pruning is still ahead
  (once at the target, nothing is collected); the magnitude score keeps none;
* after the first ``regrow_steps`` steps of every task but the first: regrow at zero, where
  |grad| is largest over all layers (EsaCL) or within each layer's budget (``regrow_within_layers``);
* after each chunk: prune to the schedule's density (no fine-tuning afterwards). The first
  task trains dense for its first ``warmup`` share of chunks (EsaCL: none, the
  magnitude score needs no statistics; the directional score's mean needs a trained model),
  then follows a cubic schedule to the target by ``first_until`` of its chunks (EsaCL: its end);
  a later task prunes its regrown weights by ``prune_until`` of its chunks;
* at the end of a task: prune to the target.

Each layer keeps its share of live weights (``allocation``, see ``sdp.layer_budgets``); the first
and the last (the classifier) stay dense. With ``structure="channel"`` whole channels are pruned
(``channels.py``), so the pruned network is a narrower dense one.

The arithmetic (scores, prune/regrow, the schedule) is in ``sdp.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..device.budget import FLOAT_BYTES
from ..errors import EsaclError
from . import channels, sdp
from .parts import Part

if TYPE_CHECKING:
    from .context import Context
    from .step import Batch, ChunkRecord



STRUCTURES = ("weight", "channel")


@dataclass
class Pruning(Part):
    score: str = "directional"       # "directional", "magnitude" (EsaCL's) or "sparcl"
    allocation: str = "uniform"      # live weights per layer: "uniform", "erk" or "global" (one ranking)
    structure: str = "weight"        # what is pruned: single "weight"s or whole "channel"s
    channel_exponent: float = 1.0    # "channel": density d keeps d**e of the channels (e < 1: weights within)
    dense_classifier: bool = True    # per-layer budgets keep the last layer dense, like the first
    importance_lambda: float = 0.5   # SparCL importance |w| + lambda |grad|
    warmup: float = 0.5              # share of the first task's chunks trained dense
    prune_until: float = 0.6         # a later task's schedule ends after this fraction of its chunks
    first_until: float = 1.0         # the first task's schedule ends after this fraction of its chunks
    regrow_within_layers: bool = False   # regrowth ranks |grad| within each layer's budget, not over all layers
    gap_per_chunk: float = 0.3       # unknown task length: close this share of the gap per chunk
    regrow_frac: float = 0.05        # of all prunable weights, revived at each new task
    regrow_steps: int = 4            # steps of a new task whose |grad| decides the regrowth
    stat_decay: float = 0.9          # running-average decay of the statistics
    grads_every_step: bool = False   # record |grad| on every step (SparCL's mask updates need it)
    state: sdp.SdpState = field(init=False, repr=False)
    start_density: float = field(init=False, default=1.0)
    events: list[dict] = field(init=False, default_factory=list)
    live: int = field(init=False, default=0)          # live prunable weights, kept current
    density: float = field(init=False, default=1.0)   # their share of the prunable weights
    float_masks: dict = field(init=False, default_factory=dict, repr=False)  # for the gradient product
    groups: list = field(init=False, default_factory=list, repr=False)  # channel groups (structure "channel")
    model: Any = field(init=False, default=None, repr=False)  # whose channel groups run at their live width

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown pruning structure {self.structure!r}; choose one of {', '.join(STRUCTURES)}")
        if self.structure == "channel" and self.allocation == "global":
            raise ValueError("channel pruning ranks within layer budgets; choose the uniform or erk allocation")
        if not 0.0 < self.channel_exponent <= 1.0:
            raise ValueError(f"channel_exponent must be in (0, 1], got {self.channel_exponent!r}")
        if self.score not in sdp.SCORE_KINDS:
            raise ValueError(f"unknown pruning score {self.score!r}; choose one of {', '.join(sdp.SCORE_KINDS)}")
        if self.allocation not in sdp.ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(sdp.ALLOCATIONS)}")

    @property
    def keeps_statistics(self) -> bool:
        """The running averages a and f are kept only for the scores that read them."""
        return self.score != "magnitude"

    def bind(self, ctx: Context) -> None:
        self.state = sdp.init_state(ctx.model, self.stat_decay, statistics=self.keeps_statistics)
        if self.structure == "channel":
            if ctx.pattern is not None:
                raise EsaclError(f"{ctx.method_name} prunes whole channels; it takes no N:M --pattern")
            try:
                self.groups = channels.channel_groups(ctx.model)
            except ValueError as exc:
                raise EsaclError(f"{ctx.method_name}: {exc}") from None
            self.model = ctx.model
        self._refresh()

    def memory_terms(self, n_params: int, n_prunable: int) -> dict[str, int]:
        # A bool mask, the regrowth evidence (float |grad|) and, where kept, the statistics a and f.
        floats = 3 if self.keeps_statistics else 1
        return {"masks_and_pruning_stats": n_prunable * (1 + floats * FLOAT_BYTES)}

    def masks_changed(self, ctx: Context) -> None:
        self._refresh()

    def _refresh(self) -> None:
        self.live = sdp.live(self.state)
        self.density = self.live / sdp.size(self.state)
        self.float_masks = {n: m.float() for n, m in self.state.masks.items()}
        if self.groups:
            channels.set_live(self.model, self.groups, self.state.masks)

    def _in_regrow_window(self, ctx: Context) -> bool:
        return not ctx.progress.first_task and ctx.progress.steps < self.regrow_steps

    def _pruning_ahead(self, ctx: Context) -> bool:
        """Statistics are needed: this task still prunes (more weights live than the target keeps)."""
        keep = round((1.0 - ctx.target_sparsity) * sdp.size(self.state))
        return self.live > keep or self._in_regrow_window(ctx)

    def _window(self, ctx: Context) -> tuple[int, int]:
        """The chunks (first, last) of the current task over which the schedule prunes."""
        n = ctx.progress.n_chunks
        if ctx.progress.first_task:   # the first task: dense warm-up, then to the target by its end
            return math.ceil(self.warmup * n), max(1, math.ceil(self.first_until * n))
        return 0, max(1, math.ceil(self.prune_until * n))

    # ------------------------------------------------------------------ hooks
    def begin_task(self, ctx: Context) -> None:
        self.start_density = self.density
        if not self.grads_every_step:  # regrowth evidence comes from this task's first steps only
            self.state.grad_abs = {}

    def after_backward(self, ctx: Context, batch: Batch) -> None:
        if self.grads_every_step or self._in_regrow_window(ctx):
            sdp.record_grad_abs(ctx.model, self.state, ctx.precision.grads_finite)
            ctx.cost.dense_weight_grads(batch.n_train)
        sdp.mask_grads(ctx.model, self.state, self.float_masks)
        if self.keeps_statistics and (self.grads_every_step or self._pruning_ahead(ctx)):
            sdp.accumulate(ctx.model, self.state, ctx.precision.grads_finite)

    def after_update(self, ctx: Context, batch: Batch) -> None:
        if not ctx.progress.first_task and ctx.progress.steps == self.regrow_steps:
            if self.groups:   # whole channels are not regrown, the layers outside them are (channels.py)
                grown = sdp.regrow(ctx.model, self.state, self.regrow_frac, ctx.optimizer, self.allocation,
                                   self.dense_classifier, layers=channels.outside(self.state.masks, self.groups))
            else:
                grown = sdp.regrow(ctx.model, self.state, self.regrow_frac, ctx.optimizer,
                                   self.allocation if self.regrow_within_layers else "global", self.dense_classifier)
            ctx.masks_changed()
            self.start_density = self.density  # this task's schedule starts from the regrown density
            if grown:
                self.events.append({"task": ctx.progress.task, "chunk": ctx.progress.chunks_done,
                                    "regrown": grown, "density_after": self.density})

    def after_chunk(self, ctx: Context, chunk: ChunkRecord) -> None:
        prog, target = ctx.progress, 1.0 - ctx.target_sparsity
        if prog.n_chunks is not None:
            first, last = self._window(ctx)
            if prog.chunks_done <= first:
                return
            want = sdp.cubic_density(self.start_density, target, prog.chunks_done - first, last - first)
        elif not ctx.progress.first_task:
            want = self.density - self.gap_per_chunk * (self.density - target)
        else:   # the first task of unknown length is pruned at its end, once it has been learned
            return
        if round(want * sdp.size(self.state)) >= self.live:
            return
        before = self.density
        removed = self.prune(ctx, want)
        self.events.append({"task": prog.task, "chunk": prog.chunks_done - 1, "density_before": before,
                            "density_after": self.density, "removed": removed})

    def end_task(self, ctx: Context) -> None:
        self.prune(ctx, 1.0 - ctx.target_sparsity)

    def prune(self, ctx: Context, target_density: float) -> int:
        """Prune the lowest-scoring live weights (or whole channels) down to ``target_density``; returns how many
        were removed."""
        score = sdp.scores(ctx.model, self.state, self.score, self.importance_lambda)
        if self.groups:
            removed = channels.prune(ctx.model, self.state, self.groups, target_density, score,
                                     ctx.optimizer, allocation=self.allocation,
                                     dense_classifier=self.dense_classifier, exponent=self.channel_exponent)
        else:
            removed = sdp.prune_to(ctx.model, self.state, target_density, score, ctx.optimizer,
                                   pattern=ctx.pattern, allocation=self.allocation,
                                   dense_classifier=self.dense_classifier)
        if removed:
            ctx.masks_changed()
        return removed

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"masks": dict(s.masks), "a": dict(s.a), "f": dict(s.f), "grad_abs": dict(s.grad_abs),
                "updates": s.updates, "start_density": self.start_density, "events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.state
        for name in ("masks", "a", "f") if self.keeps_statistics else ("masks",):
            if set(state[name]) != set(s.masks):
                raise ValueError(f"pruning {name} do not match this model's prunable layers")
            getattr(s, name).update({k: v.to(s.masks[k].device) for k, v in state[name].items()})
        s.grad_abs = {k: v.to(s.masks[k].device) for k, v in state.get("grad_abs", {}).items()}
        s.updates, self.start_density = int(state["updates"]), float(state["start_density"])
        self.events = list(state["events"])
        self._refresh()
