"""The learner's complete state after a chunk, as explicit data in files, saved crash-safely.

A checkpoint is a folder of three files:

* ``state.pt``: a flat dict of plain tensors (``torch.load(..., weights_only=True)``): model
  weights and norm statistics, optimizer buffers, SDP masks and statistics, EWC terms,
  SparCL gradient masks, finished-task snapshots, and the torch RNG state;
* ``state.npz``: numpy arrays (``allow_pickle=False``): the replay buffer, calibration
  samples, the joint baseline's data;
* ``state.json``: everything else: schema, model spec, counters, task progress, the numpy
  RNG state, and whatever the caller adds (the runner records the chunks consumed).

Saving never overwrites the last good checkpoint: ``DIR/ckpt-NNNNNN/`` is written and
fsynced first, then the one-line ``DIR/LATEST`` is replaced atomically to point at it, then
older folders are removed. A crash at any moment leaves ``LATEST`` naming a complete one.
"""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import __version__
from .deploy.snapshot import ModelSpec
from .errors import CheckpointError
from .files import (
    fsync_dir,
    read_json,
    read_tensors,
    write_json,
    write_npz,
    write_tensors,
)
from .learn.learner import TaskProgress

if TYPE_CHECKING:
    from .learn.learner import StreamingLearner

SCHEMA = 1
LATEST = "LATEST"


def _flat(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v.detach().cpu().clone() for k, v in tensors.items()}


def _group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    head = f"{prefix}/"
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def learner_state(learner: StreamingLearner) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict]:
    """Everything :func:`restore` needs to continue exactly where ``learner`` is, as tensors, arrays, JSON."""
    opt_state = learner.optimizer.state_dict()["state"]
    tensors = {
        **_flat("model", learner.model.state_dict()),
        **{f"optim/{i}/{k}": v.detach().cpu().clone() for i, s in opt_state.items() for k, v in s.items()
           if torch.is_tensor(v)},
        **_flat("sdp.masks", learner.sdp.masks), **_flat("sdp.a", learner.sdp.a), **_flat("sdp.f", learner.sdp.f),
        **_flat("sdp.grad_abs", learner.sdp.grad_abs),
        **_flat("ewc.fisher", learner.ewc.fisher), **_flat("ewc.anchor", learner.ewc.anchor),
        **_flat("ewc.task_sq", learner.ewc.task_sq),
        **_flat("grad_masks", learner.grad_masks or {}),
        "rng/torch": torch.get_rng_state(),
    }
    for task, snap in learner.snapshots.items():
        tensors.update(_flat(f"snapshot.{task}", snap))
    if learner.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(learner.device)
    buf = learner.buffer
    arrays = {f"buffer_{k}": getattr(buf, k)[: buf.size] for k in ("x", "y", "task", "logits", "score")}
    arrays.update({f"calibration_{t}": x for t, x in learner.calibration.items()})
    if learner.joint_data:
        arrays["joint_x"] = np.concatenate([x for x, _ in learner.joint_data])
        arrays["joint_y"] = np.concatenate([y for _, y in learner.joint_data])
    meta = {
        "schema": SCHEMA, "esacl_edge_version": __version__, "spec": asdict(learner.spec),
        "method": learner.cfg.name, "seed": learner.seed, "target_sparsity": learner.target_sparsity,
        "buffer_capacity": buf.capacity, "buffer_size": buf.size, "buffer_seen": buf.seen,
        "optim_params": sorted(opt_state), "progress": asdict(learner.progress),
        "task_classes": {str(t): c for t, c in learner.task_classes.items()},
        "prune_events": learner.prune_events, "samples_trained": learner.samples_trained,
        "cost": {"flops": learner.cost.flops, "weight_density": learner.cost.weight_density,
                 "grad_density": learner.cost.grad_density},
        "sdp": {"updates": learner.sdp.updates, "decay": learner.sdp.decay},
        "snapshots": sorted(learner.snapshots), "ewc_task_steps": learner.ewc.task_steps,
        "grad_masks": learner.grad_masks is not None,
        "numpy_rng": learner.rng.bit_generator.state,
    }
    return tensors, arrays, meta


def restore(learner: StreamingLearner, tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray],
            meta: dict, where: str = "checkpoint") -> None:
    """Put ``learner`` (built with the same settings) into the saved state; errors name ``where``."""
    spec = ModelSpec(**{**meta["spec"], "input_shape": tuple(meta["spec"]["input_shape"])})
    if spec != learner.spec:
        raise CheckpointError(f"{where}: saved for model {spec.model} with input {list(spec.input_shape)} "
                              f"{spec.dtype} and {spec.num_classes} classes; this run has {learner.spec.model} with "
                              f"input {list(learner.spec.input_shape)} {learner.spec.dtype} and "
                              f"{learner.spec.num_classes} classes")
    for key, have in (("method", learner.cfg.name), ("buffer_capacity", learner.buffer.capacity)):
        if meta[key] != have:
            raise CheckpointError(f"{where}: saved with {key} {meta[key]!r}; this run has {have!r}")
    dev = learner.device
    try:
        learner.model.load_state_dict(_group(tensors, "model"))
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit this model: {str(exc).splitlines()[0]}") from None
    opt = learner.optimizer.state_dict()
    opt["state"] = {i: {k[len(f"optim/{i}/"):]: v for k, v in tensors.items() if k.startswith(f"optim/{i}/")}
                    for i in meta["optim_params"]}
    learner.optimizer.load_state_dict(opt)
    params = set(learner.sdp.masks)
    for name in ("masks", "a", "f"):
        group = _group(tensors, f"sdp.{name}")
        if set(group) != params:
            raise CheckpointError(f"{where}: SDP {name} do not match this model's prunable layers")
        getattr(learner.sdp, name).update({k: v.to(dev) for k, v in group.items()})
    learner.sdp.grad_abs = {k: v.to(dev) for k, v in _group(tensors, "sdp.grad_abs").items()}
    learner.sdp.updates, learner.sdp.decay = meta["sdp"]["updates"], meta["sdp"]["decay"]
    learner.ewc.fisher = {k: v.to(dev) for k, v in _group(tensors, "ewc.fisher").items()}
    learner.ewc.anchor = {k: v.to(dev) for k, v in _group(tensors, "ewc.anchor").items()}
    learner.ewc.task_sq = {k: v.to(dev) for k, v in _group(tensors, "ewc.task_sq").items()}
    learner.ewc.task_steps = meta["ewc_task_steps"]
    learner.grad_masks = ({k: v.to(dev) for k, v in _group(tensors, "grad_masks").items()}
                          if meta["grad_masks"] else None)
    learner.task_classes = {int(t): list(c) for t, c in meta["task_classes"].items()}
    learner.snapshots = {t: _group(tensors, f"snapshot.{t}") for t in meta["snapshots"]}
    learner.calibration = {int(k[len("calibration_"):]): v for k, v in arrays.items() if k.startswith("calibration_")}
    buf, n = learner.buffer, meta["buffer_size"]
    for k in ("x", "y", "task", "logits", "score"):
        getattr(buf, k)[:n] = arrays[f"buffer_{k}"]
    buf.size, buf.seen = n, meta["buffer_seen"]
    learner.joint_data = [(arrays["joint_x"], arrays["joint_y"])] if "joint_x" in arrays else []
    learner.progress = TaskProgress(**meta["progress"])
    learner.prune_events = list(meta["prune_events"])
    learner.samples_trained = meta["samples_trained"]
    learner.cost.flops = meta["cost"]["flops"]
    learner.cost.set_density(meta["cost"]["weight_density"], meta["cost"]["grad_density"])
    learner.rng.bit_generator.state = meta["numpy_rng"]
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and dev.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], dev)


def _numbered(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("ckpt-*") if p.is_dir())


def save(folder: str | Path, learner: StreamingLearner, extra: dict | None = None) -> Path:
    """Write the learner's state (plus ``extra`` JSON) as the new latest checkpoint in ``folder``.

    On failure (a full disk, say) the previous checkpoint stays the latest and nothing
    partial is left behind.
    """
    folder = Path(folder)
    tensors, arrays, meta = learner_state(learner)
    meta["extra"] = extra or {}
    existing = _numbered(folder) if folder.is_dir() else []
    number = int(existing[-1].name[5:]) + 1 if existing else 0
    target = folder / f"ckpt-{number:06d}"
    try:
        target.mkdir(parents=True)
        write_tensors(target / "state.pt", tensors)
        write_npz(target / "state.npz", compress=False, **arrays)
        write_json(target / "state.json", meta)
        fsync_dir(target)
        write_json(folder / LATEST, {"checkpoint": target.name})
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(f"{folder}: cannot save the learner state ({reason}); "
                              f"the previous saved state is kept") from None
    for old in existing:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest(folder: str | Path) -> Path | None:
    """The folder of the latest complete checkpoint, or None when nothing was saved yet."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer}: not a valid checkpoint pointer ({exc})") from None
    if not isinstance(name, str) or not name.startswith("ckpt-") or "/" in name or not (Path(folder) / name).is_dir():
        raise CheckpointError(f"{pointer}: names checkpoint {name!r}, which does not exist")
    return Path(folder) / name


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict]:
    """Load one checkpoint folder safely (no pickled objects); one error naming the bad file."""
    path = Path(path)
    meta_path, pt, npz = path / "state.json", path / "state.pt", path / "state.npz"
    for f in (meta_path, pt, npz):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
    meta = read_json(meta_path, CheckpointError)
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if type(schema) is int and schema > SCHEMA:
        raise CheckpointError(f"{meta_path}: written by a newer esacl-edge ({meta.get('esacl_edge_version')}, state "
                              f"schema {schema}); this version reads schema {SCHEMA}: upgrade esacl-edge")
    if schema != SCHEMA or "spec" not in meta:
        raise CheckpointError(f"{meta_path}: not an esacl-edge learner state (schema {schema!r})")
    tensors = read_tensors(pt, CheckpointError, "state file")
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{npz}: not a readable state file: {exc}") from None
    return tensors, arrays, meta


def load(folder: str | Path, learner: StreamingLearner, check: Callable[[dict], None] | None = None) -> dict | None:
    """Restore the latest checkpoint in ``folder`` into ``learner``; returns its ``extra`` (None if none).

    ``check(extra)`` runs before anything is restored, to refuse a state saved by another job.
    """
    path = latest(folder)
    if path is None:
        return None
    tensors, arrays, meta = read(path)
    if check is not None:
        check(meta.get("extra") or {})
    try:
        restore(learner, tensors, arrays, meta, str(path))
        return dict(meta["extra"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or inconsistent learner state ({type(exc).__name__}: {exc})") \
            from None

