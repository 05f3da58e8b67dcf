"""Per-task snapshots: live weights plus bit-packed masks as plain tensors, metadata as JSON.

``RUN_DIR/snapshots/task_N.pt`` holds a flat dict of tensors (loaded with
``weights_only=True``): for a pruned weight ``W``, ``W::values`` (its live entries in order)
and ``W::mask`` (its mask, 1 bit per weight, ``numpy.packbits`` order); every other entry of
the model's state dict as it is. ``task_N.json`` says how to rebuild the model, and records the
SHA-256 of the tensor file and of the calibration samples ``task_N_calib.npz``: every reader
checks the bytes it loads against it and refuses a file that changed.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint
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
    digest, calib_digest = hashlib.sha256(data).hexdigest(), None
    if calibration is not None:
        calib = calibration_path(run_dir, task)
        write_npz(calib, x=calibration)
        calib_digest = hashlib.sha256(calib.read_bytes()).hexdigest()
    write_json(meta, {"schema": SCHEMA, "task": task, "spec": asdict(spec), "task_classes": task_classes,
                      "sparsity": sparsity, "bytes": packed_bytes(tensors), **(extra or {}),
                      "sha256": digest, "calibration_sha256": calib_digest})
    return digest


def calibration_path(run_dir: str | Path, task: int) -> Path:
    return Path(run_dir) / "snapshots" / f"task_{task}_calib.npz"


def _verified(path: Path, digest: str | None, error: type[Exception], recorded_in: str) -> bytes:
    """The file's bytes, refused (``error`` naming it) when they differ from the SHA-256 ``digest`` recorded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror})") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise error(f"{path}: corrupted or replaced: its SHA-256 differs from the one {recorded_in} recorded when it "
                    "was written; restore the file, or learn the run again")
    return data


def _state_digest(run_dir: Path, task: int) -> str | None:
    """The SHA-256 the run's saved learner state records for ``task``'s snapshot (runs whose task_N.json has
    none), or None."""
    try:
        ckpt = checkpoint.latest(run_dir / "state")
        if ckpt is None:
            return None
        digest = read_json(ckpt / "state.json", CheckpointError).get("snapshots", {}).get(str(task))
    except (CheckpointError, OSError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


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
        snapshots[task] = read_tensors(pt, CheckpointError, "snapshot", data)
        calib = load_calibration(run_dir, task)
        if calib is not None:
            calibration[task] = calib
    return snapshots, calibration


def load_calibration(run_dir: str | Path, task: int) -> np.ndarray | None:
    """The calibration samples written with ``task``'s snapshot (None when it has none), checked against the
    SHA-256 its task_N.json recorded."""
    path = calibration_path(run_dir, task)
    meta_path = snapshot_paths(run_dir, task)[1]
    meta = read_json(meta_path, SnapshotError) if meta_path.is_file() else {}
    digest = meta.get("calibration_sha256") if isinstance(meta, dict) else None
    if not path.is_file():
        if digest is not None:
            raise SnapshotError(f"{path}: missing; task {task}'s snapshot was written with these calibration "
                                "samples (restore the file, or learn the run again)")
        return None
    from ..data.npz import read_npz

    return read_npz(path, ("x",), content=_verified(path, digest, SnapshotError, meta_path.name))["x"]


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
    digest, recorded_in = meta.get("sha256"), meta_path.name
    if digest is None:
        digest, recorded_in = _state_digest(Path(run_dir), task), "the run's saved state"
    tensors = read_tensors(pt, SnapshotError, "snapshot", _verified(pt, digest, SnapshotError, recorded_in))
    spec = _spec(meta["spec"], meta_path)
    model = unpack(tensors, spec.build(), str(pt))
    model.eval()
    meta["spec"] = spec
    return model, meta


def _spec(raw: object, where: Path) -> ModelSpec:
    """The snapshot's ``spec`` as a ModelSpec; one error naming the file and the fields that do not fit."""
    known = {f.name for f in fields(ModelSpec)}
    required = {f.name for f in fields(ModelSpec) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(raw, dict):
        raise SnapshotError(f"{where}: field 'spec' must be a mapping, got {type(raw).__name__}")
    unknown, missing = sorted(set(raw) - known), sorted(required - set(raw))
    if unknown or missing:
        raise SnapshotError(f"{where}: field 'spec' does not describe a model: "
                            + "; ".join(([f"unknown keys {', '.join(unknown)}"] if unknown else [])
                                        + ([f"missing keys {', '.join(missing)}"] if missing else [])))
    try:
        return ModelSpec(**raw)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"{where}: field 'spec' does not describe a model: {exc}") from None
