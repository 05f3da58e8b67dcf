"""Blurry task boundaries: chunks around each boundary of a stream being built mix the two tasks."""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import StreamError


def blur_boundaries(chunks: list[list[np.ndarray]], n: int, rng: np.random.Generator) -> None:
    """Make task boundaries blurry: the ``n`` chunks either side of each boundary mix the two tasks.

    At the boundary of tasks t and t+1, the k-th last chunk of t and the k-th chunk of t+1
    (k = 1..n) swap a random ``(n + 1 - k) / (2n + 1)`` of their samples. Across those 2n chunks
    the share of task t+1 samples thus rises in steps of 1/(2n+1), from 1/(2n+1) to 2n/(2n+1);
    chunk sizes and the samples of each task stay the same. ``chunks`` (index arrays per task)
    is changed in place.
    """
    if n < 0:
        raise StreamError(f"--blurry must be >= 0 chunks, got {n}")
    for t, task in enumerate(chunks):
        need = n * ((t > 0) + (t < len(chunks) - 1))
        if len(task) < need:
            raise StreamError(f"--blurry {n} needs at least {need} chunks in task {t}, which has {len(task)}; "
                              "lower --blurry or --chunk-size")
    for a, b in itertools.pairwise(chunks):
        for k in range(1, n + 1):
            ca, cb = a[-k].copy(), b[k - 1].copy()
            m = round(min(len(ca), len(cb)) * (n + 1 - k) / (2 * n + 1))
            ia, ib = rng.choice(len(ca), m, replace=False), rng.choice(len(cb), m, replace=False)
            ca[ia], cb[ib] = b[k - 1][ib], a[-k][ia]
            a[-k], b[k - 1] = ca, cb
