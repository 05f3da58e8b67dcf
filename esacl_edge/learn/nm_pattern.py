"""N:M sparsity: at most N live weights in every M consecutive input channels (the pattern sparse tensor
cores run, e.g. 2:4), kept by the pruning step when a pattern is asked for."""

from __future__ import annotations

import math

import torch


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): at most N live weights in every M consecutive input channels."""
    if pattern is None:
        return None
    n, _, m = pattern.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"pattern must be N:M with 0 < N < M, like 2:4; got {pattern!r}")
    return int(n), int(m)


def pattern_excess(score: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Live weights beyond the N best of each group of M consecutive input channels (dim 1).

    Layers whose input channels are not a multiple of M are left alone (TensorRT skips them too).
    """
    if mask.dim() < 2 or mask.shape[1] % m:
        return torch.zeros_like(mask)
    s = torch.where(mask, score.float(), torch.full_like(score, -math.inf, dtype=torch.float32)).movedim(1, -1)
    grouped = s.reshape(*s.shape[:-1], s.shape[-1] // m, m)
    rank = grouped.argsort(dim=-1, descending=True).argsort(dim=-1)
    excess = (rank >= n).reshape(s.shape).movedim(-1, 1)
    return excess & mask
