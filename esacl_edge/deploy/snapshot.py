"""Per-task snapshots: live weights plus bit-packed masks as plain tensors, metadata as JSON.

``RUN_DIR/snapshots/task_N.pt`` holds a flat dict of tensors (loaded with
``weights_only=True``): for a pruned weight ``W``, ``W::values`` (its live entries in order)
and ``W::mask`` (its mask, 1 bit per weight, ``numpy.packbits`` order); every other entry of
the model's state dict as it is. ``task_N.json`` says how to rebuild the model.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, SnapshotError
from ..files import atomic_write, read_json, read_tensors, write_json, write_npz
from ..learn.packing import packed_bytes, unpack
from ..models import ModelSpec

SCHEMA = 1


def snapshot_paths(run_dir: str | Path, task: int) -> tuple[Path, Path]:
    base = Path(run_dir) / "snapshots"
    return base / f"task_{task}.pt", base / f"task_{task}.json"


def save_snapshot(run_dir: str | Path, task: int, tensors: dict[str, torch.Tensor], spec: ModelSpec,
                  task_classes: list[list[int]], sparsity: float, calibration: np.ndarray | None = None,
                  extra: dict | None = None) -> str:
    """Write the task's tensors, its calibration samples (buffer inputs as stored), then its metadata.

    Returns the SHA-256 of the tensor file, by which a learner state refers to it.
    """
    pt, meta = snapshot_paths(run_dir, task)
    buf = io.BytesIO()
    torch.save(tensors, buf)
    data = buf.getvalue()
    atomic_write(pt, lambda f: f.write(data))
    if calibration is not None:
        write_npz(pt.with_name(f"task_{task}_calib.npz"), x=calibration)
    write_json(meta, {"schema": SCHEMA, "task": task, "spec": asdict(spec), "task_classes": task_classes,
                      "sparsity": sparsity, "bytes": packed_bytes(tensors), **(extra or {})})
    return hashlib.sha256(data).hexdigest()


def read_snapshots(run_dir: str | Path, hashes: dict[int, str]
                   ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, np.ndarray]]:
    """The packed tensors and calibration samples of the tasks in ``hashes``, each file checked against
    the SHA-256 a learner state recorded for it."""
    snapshots, calibration = {}, {}
    for task, digest in sorted(hashes.items()):
        pt = snapshot_paths(run_dir, task)[0]
        try:
            data = pt.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{pt}: the saved state needs this snapshot ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{pt}: differs from the snapshot the saved state was written with")
        snapshots[task] = read_tensors(pt, CheckpointError, "snapshot")
        calib = load_calibration(run_dir, task)
        if calib is not None:
            calibration[task] = calib
    return snapshots, calibration


def load_calibration(run_dir: str | Path, task: int) -> np.ndarray | None:
    path = Path(run_dir) / "snapshots" / f"task_{task}_calib.npz"
    if not path.is_file():
        return None
    from ..data.npz import read_npz

    return read_npz(path, ("x",))["x"]


def available_tasks(run_dir: str | Path) -> list[int]:
    folder = Path(run_dir) / "snapshots"
    return sorted(int(p.stem[5:]) for p in folder.glob("task_*.json") if p.stem[5:].isdigit())


def load_snapshot(run_dir: str | Path, task: int) -> tuple[nn.Module, dict]:
    """Rebuild the model as it was at the end of ``task``; returns (model in eval mode, metadata)."""
    pt, meta_path = snapshot_paths(run_dir, task)
    if not Path(run_dir).is_dir():
        raise SnapshotError(f"{run_dir}: run directory not found")
    if not meta_path.is_file() or not pt.is_file():
        have = available_tasks(run_dir)
        raise SnapshotError(f"{run_dir}: no snapshot for task {task} (tasks count from 0; this run has "
                            f"{', '.join(map(str, have)) if have else 'none'})")
    meta = read_json(meta_path, SnapshotError)
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA or "spec" not in meta:
        raise SnapshotError(f"{meta_path}: unsupported snapshot schema {meta.get('schema') if isinstance(meta, dict) else None!r}"
                            f" (this esacl-edge reads {SCHEMA})")
    tensors = read_tensors(pt, SnapshotError, "snapshot")
    spec = ModelSpec(**meta["spec"])
    model = unpack(tensors, spec.build(), str(pt))
    model.eval()
    meta["spec"] = spec
    return model, meta
