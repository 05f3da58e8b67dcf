"""Bias calibration at a task's end: per-class offsets of the classifier's bias, fitted on the buffer.

The present-class cross-entropy (``Method.current_classes="present"``, ER-ACE's) never lets a
new sample's logits compete with the old classes'; only the replayed samples' cross-entropy
sets new against old, and it pushes the new classes down. So at a task's end the newest
classes are under-predicted (Split-MNIST, 0.8: the last task at 65–85% Class-IL where dense
DER++ has 93–97%). At the end of every task this part fits one additive offset per seen
class on a class-balanced sample of the buffer (reservoir and IDS buffers are balanced in
expectation), minimising the cross-entropy over the seen classes in eval mode (what the
snapshot predicts with) plus a small L2 pull towards 0, and adds the offsets to the
classifier's bias. The buffer's stored logits move by the same offsets, so DER++'s logit
matching keeps the correction instead of pulling it back. The snapshot, and every export
of it, carries the calibrated bias. The idea is BiC's (Wu et al., 2019) with its two
parameters per task replaced by one per class and its held-out split by the buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..models import classifier_name
from .forward import infer_logits
from .buffer import sample
from .parts import Part

if TYPE_CHECKING:
    from .context import Context


def fit_offsets(logits: torch.Tensor, y: torch.Tensor, l2: float, iterations: int = 100) -> torch.Tensor:
    """Per-class offsets b minimising mean CE(logits + b, y) + ``l2``·|b|², each within ±log C (C classes).

    The bound is the largest prior shift there is (from uniform to one class): on samples the
    model already separates, the cross-entropy keeps falling as offsets grow, and an unbounded
    fit on a few buffered samples would learn offsets of tens of logits that do not carry over
    to new data. b = log C·tanh(u), fitted by L-BFGS in float64 (deterministic).
    """
    logits, y = logits.detach().double().cpu(), y.cpu()
    bound = math.log(max(logits.shape[1], 2))
    u = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        b = bound * torch.tanh(u)
        loss = F.cross_entropy(logits + b, y) + l2 * b.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (bound * torch.tanh(u)).detach().float()


@dataclass
class BiasCalibration(Part):
    """At each task's end, fit per-class offsets of the classifier's bias on up to ``samples`` buffered samples."""

    samples: int = 1000   # buffered samples the offsets are fitted on (a random subset where the buffer holds more)
    l2: float = 1e-3      # pull of the offsets towards 0 (classes with few samples move little)

    def end_task(self, ctx: Context) -> None:
        buf = ctx.store.buffer
        classifier = ctx.trainable.get_submodule(classifier_name(ctx.trainable))
        if buf.size == 0 or classifier.bias is None:
            return
        rng = np.random.default_rng([ctx.seed, ctx.progress.task, 0xB1A5])
        pick = np.sort(sample(buf, self.samples, rng))
        with ctx.precision.autocast():   # a training-time forward, in the training precision
            logits = infer_logits(ctx.trainable, ctx.store.inputs(buf.x[pick], buf.qparams[pick]))
        ctx.cost.forward(len(pick))
        y = torch.as_tensor(buf.y[pick].astype(np.int64))
        seen = np.unique(y.numpy())   # the classes the fit sees; the others keep their bias
        index = torch.as_tensor(np.searchsorted(seen, y.numpy()))
        offsets = fit_offsets(logits[:, seen], index, self.l2)
        with torch.no_grad():
            classifier.bias[torch.as_tensor(seen, device=classifier.bias.device)] += offsets.to(classifier.bias.device)
        buf.logits[: buf.size, seen] += offsets.numpy()
        buf.mark(np.arange(buf.size))
