"""Continual-learning metrics over an accuracy matrix R, where R[i][j] is the accuracy on
task j after learning task i (entries with j > i are not defined and are left out).

A task without a test split has ``None`` in its column; every metric leaves such tasks out
(and is ``None`` when no task is left)."""

from __future__ import annotations

import numpy as np

Matrix = list[list[float | None]]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _tested(matrix: Matrix) -> list[int]:
    return [j for j, v in enumerate(matrix[-1]) if v is not None]


def final_accuracy(matrix: Matrix) -> float | None:
    """Mean accuracy over all tasks after the last one."""
    return _mean([v for v in matrix[-1] if v is not None])


def forgetting(matrix: Matrix) -> float | None:
    """Mean over the earlier tasks of (best accuracy ever reached) - (final accuracy)."""
    t = len(matrix)
    if t < 2:
        return 0.0
    best = {j: [matrix[i][j] for i in range(j, t - 1) if matrix[i][j] is not None] for j in _tested(matrix) if j < t - 1}
    return _mean([max(seen) - matrix[-1][j] for j, seen in best.items() if seen])


def backward_transfer(matrix: Matrix) -> float | None:
    """Mean over the earlier tasks of (final accuracy) - (accuracy right after learning it)."""
    t = len(matrix)
    if t < 2:
        return 0.0
    return _mean([matrix[-1][j] - matrix[j][j] for j in _tested(matrix) if j < t - 1 and matrix[j][j] is not None])


def learning_accuracy(matrix: Matrix) -> float | None:
    """Mean accuracy on each task right after learning it (the diagonal): how well the stream is learned."""
    return _mean([matrix[i][i] for i in range(len(matrix)) if matrix[i][i] is not None])


def format_matrix(matrix: list[list[float]], title: str) -> str:
    """A printable lower-triangular table in percent."""
    t = len(matrix)
    lines = [title, "after \\ on " + "".join(f"{'T' + str(j):>8}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"{'T' + str(i):<11}" + "".join(f"{'-':>8}" if v is None else f"{100 * v:8.1f}" for v in row))
    return "\n".join(lines)
