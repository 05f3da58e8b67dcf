"""Continual-learning metrics over an accuracy matrix R, where R[i][j] is the accuracy on
task j after learning task i (entries with j > i are not defined and are left out)."""

from __future__ import annotations

import numpy as np


def final_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one."""
    return float(np.mean(matrix[-1]))


def forgetting(matrix: list[list[float]]) -> float:
    """Mean over the earlier tasks of (best accuracy ever reached) - (final accuracy)."""
    t = len(matrix)
    if t < 2:
        return 0.0
    return float(np.mean([max(matrix[i][j] for i in range(j, t - 1)) - matrix[-1][j] for j in range(t - 1)]))


def backward_transfer(matrix: list[list[float]]) -> float:
    """Mean over the earlier tasks of (final accuracy) - (accuracy right after learning it)."""
    t = len(matrix)
    if t < 2:
        return 0.0
    return float(np.mean([matrix[-1][j] - matrix[j][j] for j in range(t - 1)]))


def learning_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy on each task right after learning it (the diagonal): how well the stream is learned."""
    return float(np.mean([matrix[i][i] for i in range(len(matrix))]))


def format_matrix(matrix: list[list[float]], title: str) -> str:
    """A printable lower-triangular table in percent."""
    t = len(matrix)
    lines = [title, "after \\ on " + "".join(f"{'T' + str(j):>8}" for j in range(t))]
    for i, row in enumerate(matrix):
        lines.append(f"{'T' + str(i):<11}" + "".join(f"{100 * v:8.1f}" for v in row))
    return "\n".join(lines)
