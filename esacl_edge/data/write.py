"""Write arrays as a chunk stream (the format is described in :mod:`esacl_edge.data.stream`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StreamError
from ..files import write_json, write_npz
from .blurry import blur_boundaries
from .stream import FORMAT, VERSION, Manifest, read_manifest


def write_stream(out: str | Path, *, name: str, x_train: np.ndarray, y_train: np.ndarray,
                 x_test: np.ndarray, y_test: np.ndarray, task_classes: list[list[int]],
                 num_classes: int, chunk_size: int = 64, seed: int = 0,
                 class_names: list[str] | None = None, normalization: dict | None = None,
                 blurry: int = 0) -> Manifest:
    """Split arrays into tasks of ``task_classes`` and write them as a chunk stream.

    Within a task the training samples are shuffled with ``seed`` and cut into chunks of
    ``chunk_size``; ``blurry`` > 0 then mixes the chunks around each task boundary
    (:func:`~esacl_edge.data.blurry.blur_boundaries`). The manifest is written last, so a
    half-written stream has none.
    """
    out = Path(out)
    if (out / "manifest.json").exists():
        raise StreamError(f"{out}: already holds a stream (manifest.json); choose another --out")
    if chunk_size < 1:
        raise StreamError(f"chunk size must be >= 1, got {chunk_size}")
    rng = np.random.default_rng(seed)
    plan = []
    for t, classes in enumerate(task_classes):
        idx = np.flatnonzero(np.isin(y_train, classes))
        if idx.size == 0:
            raise StreamError(f"{name}: task {t} (classes {classes}) has no training samples")
        idx = rng.permutation(idx)
        plan.append([idx[start:start + chunk_size] for start in range(0, len(idx), chunk_size)])
    if blurry:
        blur_boundaries(plan, blurry, rng)
    tasks = []
    for t, classes in enumerate(task_classes):
        chunks = []
        for c, part in enumerate(plan[t]):
            rel = f"task{t}/chunk{c:04d}.npz"
            write_npz(out / rel, x=x_train[part], y=y_train[part].astype(np.int64))
            chunks.append(rel)
        test_idx = np.flatnonzero(np.isin(y_test, classes))
        rel_test = f"test/task{t}.npz"
        write_npz(out / rel_test, x=x_test[test_idx], y=y_test[test_idx].astype(np.int64))
        entry = {"classes": [int(c) for c in classes], "chunks": chunks, "test": rel_test}
        extra = sorted(set(np.unique(y_train[np.concatenate(plan[t])]).tolist()) - set(classes))
        if extra:
            entry["blurry_classes"] = [int(c) for c in extra]
        tasks.append(entry)
    manifest = {
        "format": FORMAT, "version": VERSION, "name": name,
        "input_shape": [int(s) for s in x_train.shape[1:]], "dtype": str(x_train.dtype),
        "num_classes": int(num_classes), "class_names": class_names,
        "normalization": normalization or {}, "tasks": tasks,
    }
    write_json(out / "manifest.json", manifest)
    return read_manifest(out)
