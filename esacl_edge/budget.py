"""Budget arithmetic: bytes of the replay buffer and of the model, dense and sparse."""

from __future__ import annotations

import math

import numpy as np

# Per buffered sample besides its input: label (int16), task id (int16), insertion score (float32).
LABEL_BYTES, TASK_BYTES, SCORE_BYTES, LOGIT_BYTES = 2, 2, 4, 4
WEIGHT_BYTES = 4  # float32


def buffer_bytes_per_sample(input_shape: tuple[int, ...], dtype: str | np.dtype, num_classes: int) -> int:
    """Bytes one buffered sample costs: input as stored, label, task, score and DER++ logits."""
    x_bytes = math.prod(input_shape) * np.dtype(dtype).itemsize
    return x_bytes + LABEL_BYTES + TASK_BYTES + SCORE_BYTES + LOGIT_BYTES * num_classes


def buffer_capacity(budget_bytes: int, input_shape: tuple[int, ...], dtype: str | np.dtype,
                    num_classes: int) -> int:
    """Largest number of samples whose storage fits in ``budget_bytes``."""
    return budget_bytes // buffer_bytes_per_sample(input_shape, dtype, num_classes)


def dense_weight_bytes(numel: int) -> int:
    return numel * WEIGHT_BYTES


def sparse_weight_bytes(numel: int, live: int) -> int:
    """A pruned tensor stored as its live values plus a 1-bit-per-weight mask (the snapshot encoding)."""
    return live * WEIGHT_BYTES + math.ceil(numel / 8)
