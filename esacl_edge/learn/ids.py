"""IDS, intelligent data selection: which samples a step trains on and which the buffer keeps.

Two rules, both driven by a per-sample informativeness score:

* step level: of a minibatch b keep the ceil(gamma * |b|) highest-scoring samples (the ones the
  model gets most wrong), class-balanced where the batch allows; only they are trained on;
* buffer level: per class, keep the lowest-scoring (most typical) candidates, except a
  ``spread`` share of the quota drawn at random from the rest, for diversity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SCORES = ("loss", "margin")


def sample_scores(logits: torch.Tensor, y: torch.Tensor, kind: str = "loss") -> torch.Tensor:
    """Informativeness of each sample: its cross-entropy, or minus its logit margin."""
    if kind == "loss":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "margin":
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return other - true
    raise ValueError(f"unknown IDS score {kind!r}; choose one of {', '.join(SCORES)}")


def balanced_quotas(counts: dict[int, int], total: int) -> dict[int, int]:
    """Split ``total`` slots over classes as evenly as their available ``counts`` allow.

    Classes with fewer samples than an even share give their slack to the others.
    """
    quotas: dict[int, int] = {}
    remaining = min(total, sum(counts.values()))
    items = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
    for i, (cls, n) in enumerate(items):
        share = -(-remaining // (len(items) - i))
        quotas[cls] = min(n, share)
        remaining -= quotas[cls]
    return quotas


def select_step(scores: torch.Tensor, y: torch.Tensor, keep_frac: float, num_classes: int) -> torch.Tensor:
    """Indices of the critical instances: top scores per class, ceil(keep_frac * n) in all, split over
    the batch's classes as :func:`balanced_quotas` splits them.

    Device ops only (no host sync): samples are ranked within their class by score, then taken
    round by round (every class's best, then every class's second...), a round's classes in
    the order of their sizes, then labels, which is the order in which the quotas give the
    rounding slack. They are returned class by class in that order, best first, as the
    per-class loop over the quotas returned them. ``num_classes`` bounds the labels.
    """
    n = len(y)
    keep = max(1, math.ceil(keep_frac * n))
    if keep >= n:
        return torch.arange(n, device=y.device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=y.device).scatter_add_(0, y, torch.ones_like(y))
    by_score = torch.argsort(scores, descending=True, stable=True)
    by_class = by_score[torch.argsort(y[by_score], stable=True)]   # grouped by class, best first
    first = torch.cumsum(counts, 0) - counts                         # where each class's group starts
    rank = torch.empty_like(y)
    rank[by_class] = torch.arange(n, device=y.device) - first[y[by_class]]
    group = counts[y] * num_classes + y                               # the class's place in a round
    picked = torch.topk(rank * (n + 1) * num_classes + group, keep, largest=False).indices
    return picked[torch.argsort(group[picked] * (n + 1) + rank[picked])]


def select_for_buffer(scores: np.ndarray, y: np.ndarray, quotas: dict[int, int], spread: float,
                      rng: np.random.Generator, prefer: str = "low") -> np.ndarray:
    """Indices to keep: per class, the ``(1 - spread)`` of its quota with the lowest scores (the most
    typical samples; ``prefer="high"``: the hardest), the rest at random."""
    keep = []
    for cls, q in quotas.items():
        idx = np.flatnonzero(y == cls)
        if q <= 0 or idx.size == 0:
            continue
        order = idx[np.argsort(-scores[idx] if prefer == "high" else scores[idx], kind="stable")]
        n_top = q - int(round(spread * q))
        rest = order[n_top:]
        keep.append(order[:n_top])
        keep.append(rng.choice(rest, size=min(q - n_top, rest.size), replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
