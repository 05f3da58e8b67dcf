"""The replay buffer: fixed-size arrays allocated once from a byte budget, never grown,
and the two rules that decide what it keeps after each chunk (parts of a method):

* :class:`IdsBuffer`: class-balanced quotas, within a class the lowest-scoring (most typical)
  samples plus a random ``spread`` share (IDS at buffer level, ``ids.select_for_buffer``). A buffered sample's
  score is refreshed whenever it is replayed (from the update's own forward, at no extra cost),
  so old samples do not compete with stale losses from when they were inserted;
* :class:`ReservoirBuffer`: reservoir sampling, every sample seen kept with equal probability.

Inputs are kept in the stream's storage dtype (uint8 images stay uint8), or, under latent replay,
as the frozen prefix's output (``latent.py``), with labels, task
ids, the logits at insertion (for DER++) and the insertion score (for IDS). On a GPU, a
:class:`DeviceCopy` of what replay reads lets a replay batch be gathered there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..device.budget import FLOAT_BYTES
from ..device.transfer import to_device
from . import ids, latent
from .parts import Part

if TYPE_CHECKING:
    from .context import Context
    from .step import Batch, ChunkRecord

ARRAYS = ("x", "y", "task", "logits", "score", "qparams")

# Per buffered sample besides its input: label (int16), task id (int16), insertion score (float32).
LABEL_BYTES, TASK_BYTES, SCORE_BYTES, LOGIT_BYTES = 2, 2, 4, 4


def buffer_bytes_per_sample(input_shape: tuple[int, ...], dtype: str | np.dtype, num_classes: int,
                            qparams: int = 0) -> int:
    """Bytes one buffered sample costs: input (or latent) as stored, label, task, score, DER++ logits, and
    ``qparams`` float32 quantisation parameters (uint8 latents)."""
    x_bytes = math.prod(input_shape) * np.dtype(dtype).itemsize
    return x_bytes + LABEL_BYTES + TASK_BYTES + SCORE_BYTES + LOGIT_BYTES * num_classes + FLOAT_BYTES * qparams


def buffer_capacity(budget_bytes: int, input_shape: tuple[int, ...], dtype: str | np.dtype,
                    num_classes: int, qparams: int = 0) -> int:
    """Largest number of samples whose storage fits in ``budget_bytes``."""
    return budget_bytes // buffer_bytes_per_sample(input_shape, dtype, num_classes, qparams)


@dataclass(frozen=True)
class BufferLayout:
    """What one buffered sample's input is: the image as the stream stores it, or a latent at the frozen prefix's
    output (``latent``: ``fp16`` or ``uint8``, see ``learn/latent.py``)."""

    shape: tuple[int, ...]
    dtype: str
    qparams: int = 0
    latent: str | None = None

    def bytes_per_sample(self, num_classes: int) -> int:
        return buffer_bytes_per_sample(self.shape, self.dtype, num_classes, self.qparams)


@dataclass
class ReplayBuffer:
    x: np.ndarray
    y: np.ndarray
    task: np.ndarray
    logits: np.ndarray
    score: np.ndarray
    qparams: np.ndarray   # (capacity, k) float32 per-sample quantisation parameters of uint8 latents; k = 0 otherwise
    size: int = 0
    seen: int = 0  # samples offered so far (reservoir sampling needs it)
    changed: list[np.ndarray] | None = field(default=None, repr=False)  # slots written since a DeviceCopy synced

    def mark(self, slots: np.ndarray) -> None:
        """Note written slots for a :class:`DeviceCopy` (only once one tracks this buffer)."""
        if self.changed is not None:
            self.changed.append(slots)

    @property
    def capacity(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in ARRAYS)

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k)[: self.size].copy() for k in ARRAYS}, "size": self.size, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        if n > self.capacity:
            raise ValueError(f"{n} buffered samples do not fit a buffer of {self.capacity}")
        for k in ARRAYS:
            getattr(self, k)[:n] = state[k]
        self.size, self.seen = n, int(state["seen"])
        self.mark(np.arange(n))


def new_buffer(budget_bytes: int, input_shape: tuple[int, ...], dtype: str, num_classes: int,
               qparams: int = 0) -> ReplayBuffer:
    """Allocate the largest buffer whose arrays fit in ``budget_bytes`` (see :func:`buffer_capacity`); inputs
    of ``input_shape`` in ``dtype`` (images, or latents with ``qparams`` parameters each)."""
    cap = buffer_capacity(budget_bytes, input_shape, dtype, num_classes, qparams)
    buf = ReplayBuffer(x=np.zeros((cap, *input_shape), dtype=dtype), y=np.zeros(cap, np.int16),
                       task=np.zeros(cap, np.int16), logits=np.zeros((cap, num_classes), np.float32),
                       score=np.zeros(cap, np.float32), qparams=np.zeros((cap, qparams), np.float32))
    assert buf.nbytes == cap * buffer_bytes_per_sample(input_shape, dtype, num_classes, qparams)
    return buf


def _write(buf: ReplayBuffer, slots: np.ndarray, x, y, task: int, logits, score, src: np.ndarray,
           q: np.ndarray | None) -> None:
    buf.x[slots], buf.y[slots], buf.task[slots] = x[src], y[src], task
    buf.logits[slots], buf.score[slots] = logits[src], score[src]
    if q is not None:
        buf.qparams[slots] = q[src]
    buf.mark(slots)


def offer_ids(buf: ReplayBuffer, x: np.ndarray, y: np.ndarray, task: int, logits: np.ndarray,
              score: np.ndarray, spread: float, rng: np.random.Generator, prefer: str = "low",
              q: np.ndarray | None = None) -> None:
    """Merge a chunk into the buffer: class-balanced quotas over all classes seen, IDS rule per class
    (``q``: the samples' quantisation parameters, for uint8 latents)."""
    buf.seen += len(y)
    if buf.capacity == 0:
        return
    n = buf.size
    all_y = np.concatenate([buf.y[:n].astype(np.int64), y])
    all_score = np.concatenate([buf.score[:n], score])
    classes, counts = np.unique(all_y, return_counts=True)
    quotas = ids.balanced_quotas(dict(zip(classes.tolist(), counts.tolist())), buf.capacity)
    keep = ids.select_for_buffer(all_score, all_y, quotas, spread, rng, prefer)
    old, new = keep[keep < n], keep[keep >= n] - n
    # Compact the kept old samples to the front, then append the new ones.
    for name in ARRAYS:
        arr = getattr(buf, name)
        arr[: len(old)] = arr[old]
    buf.mark(np.flatnonzero(old != np.arange(len(old))))
    slots = np.arange(len(old), len(old) + len(new))
    _write(buf, slots, x, y, task, logits, score, new, q)
    buf.size = len(keep)


def offer_reservoir(buf: ReplayBuffer, x: np.ndarray, y: np.ndarray, task: int, logits: np.ndarray,
                    score: np.ndarray, rng: np.random.Generator, q: np.ndarray | None = None) -> None:
    """Reservoir sampling (the baseline): every sample seen so far is kept with equal probability."""
    for i in range(len(y)):
        if buf.size < buf.capacity:
            slot = buf.size
            buf.size += 1
        else:
            j = int(rng.integers(0, buf.seen + 1))
            slot = j if j < buf.capacity else -1
        buf.seen += 1
        if slot >= 0:
            _write(buf, np.array([slot]), x, y, task, logits, score, np.array([i]), q)


@dataclass
class DeviceCopy:
    """What replay reads of a buffer (inputs as stored, labels, logits, quantisation parameters), kept on the
    training device.

    The rows the buffer wrote since the last :meth:`sync` are copied over once, at the next
    draw, so a replay batch is a gather on the device rather than a host copy per step.
    """

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    qparams: torch.Tensor

    @classmethod
    def of(cls, buf: ReplayBuffer, device: torch.device) -> DeviceCopy:
        """An empty copy of ``buf``'s shape on ``device``; everything buffered so far is copied at the first sync."""
        buf.changed = [np.arange(buf.size)]
        return cls(*(torch.zeros(a.shape, dtype=torch.from_numpy(a[:0]).dtype, device=device)
                     for a in (buf.x, buf.y, buf.logits, buf.qparams)))

    def sync(self, buf: ReplayBuffer) -> None:
        """Copy the rows ``buf`` wrote since the last sync."""
        if not buf.changed:
            return
        rows = np.unique(np.concatenate(buf.changed))
        buf.changed.clear()
        if rows.size:
            at = to_device(rows, self.x.device)
            for t, a in ((self.x, buf.x), (self.y, buf.y), (self.logits, buf.logits), (self.qparams, buf.qparams)):
                t[at] = to_device(a[rows], t.device)

    def gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``: (inputs as stored, labels as int64, logits, quantisation parameters)."""
        at = to_device(idx, self.x.device)
        return self.x[at], self.y[at].long(), self.logits[at], self.qparams[at]


def sample(buf: ReplayBuffer, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` buffered samples drawn without replacement (fewer if the buffer is smaller)."""
    return rng.choice(buf.size, size=min(n, buf.size), replace=False)


@dataclass
class BufferStore:
    """The replay buffer as parts reach it: its arrays, the device copy replay gathers from (on a GPU), and the
    encoding of a chunk's samples into what it keeps (images as stored, or latents) and back into what the
    trainable part takes."""

    buffer: ReplayBuffer
    layout: BufferLayout
    device: torch.device
    train_inputs: Callable[[np.ndarray | torch.Tensor], torch.Tensor]  # stored images -> the trainable part's input
    device_copy: DeviceCopy | None = None

    def rows(self, x: np.ndarray, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """What the buffer keeps of chunk samples ``x`` (``z`` = ``train_inputs(x)``): (inputs, parameters)."""
        if self.layout.latent is None:
            return x, np.zeros((len(x), 0), np.float32)
        return latent.encode(z, self.layout.latent)

    def inputs(self, x: np.ndarray | torch.Tensor, qparams: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Buffered inputs -> what the trainable part takes (latents decoded, images through the frozen prefix)."""
        if self.layout.latent is None:
            return self.train_inputs(x)
        return latent.decode(to_device(x, self.device), to_device(qparams, self.device), self.layout.latent)


def _chunk_arrays(chunk: ChunkRecord) -> tuple[np.ndarray, np.ndarray]:
    return chunk.logits.cpu().numpy(), chunk.scores.cpu().numpy()


@dataclass
class IdsBuffer(Part):
    """After each chunk, merge it into the buffer by the IDS rule."""

    spread: float = 0.25  # share of each class quota filled at random
    prefer: str = "low"   # keep the lowest scores (most typical samples) or the highest (hardest)
    refreshed: list[tuple[np.ndarray, torch.Tensor]] = field(init=False, default_factory=list, repr=False)
    score: str = field(init=False, default="loss")  # the step selection's score, handed when the method is built

    def __post_init__(self) -> None:
        if self.prefer not in ("low", "high"):
            raise ValueError(f"IdsBuffer prefer must be 'low' or 'high', got {self.prefer!r}")

    def after_update(self, ctx: Context, batch: Batch) -> None:
        if batch.replay_out is not None:  # kept on the device until the chunk ends (no sync per step)
            self.refreshed.append((batch.replay_index, ids.sample_scores(batch.replay_out, batch.replay_y,
                                                                        self.score)))

    def after_chunk(self, ctx: Context, chunk: ChunkRecord) -> None:
        buf = ctx.store.buffer
        if self.refreshed:  # one copy from the device; a sample replayed twice keeps its latest score
            buf.score[np.concatenate([i for i, _ in self.refreshed])] = torch.cat(
                [s for _, s in self.refreshed]).cpu().numpy()
        self.refreshed = []
        x, q = ctx.store.rows(chunk.x, chunk.inputs)
        offer_ids(ctx.store.buffer, x, chunk.y, chunk.task, *_chunk_arrays(chunk), self.spread,
                  ctx.rngs.buffer, self.prefer, q)


@dataclass
class ReservoirBuffer(Part):
    """After each chunk, offer its samples to the buffer by reservoir sampling."""

    def after_chunk(self, ctx: Context, chunk: ChunkRecord) -> None:
        x, q = ctx.store.rows(chunk.x, chunk.inputs)
        offer_reservoir(ctx.store.buffer, x, chunk.y, chunk.task, *_chunk_arrays(chunk), ctx.rngs.buffer, q)
