"""Per-task snapshots: live weights plus bit-packed masks as plain tensors, metadata as JSON.

``RUN_DIR/snapshots/task_N.pt`` holds a flat dict of tensors (loaded with
``weights_only=True``): for a pruned weight ``W``, ``W::values`` (its live entries in order)
and ``W::mask`` (its mask, 1 bit per weight, ``numpy.packbits`` order); every other entry of
the model's state dict as it is. ``task_N.json`` says how to rebuild the model.
``RUN_DIR/profile.yaml`` is a copy of the device profile the run learned with, the default
for its export.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..device.profiles import Profile, load_profile, profile_names, to_yaml
from ..errors import CheckpointError, SnapshotError
from ..files import atomic_write, read_json, read_tensors, write_json, write_npz
from ..models import build_model

SCHEMA = 1
PROFILE_FILE = "profile.yaml"


@dataclass
class ModelSpec:
    """What it takes to rebuild a model: backbone, input as stored, classes, normalisation."""

    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    normalization: dict = field(default_factory=dict)
    dtype: str = "float32"
    class_names: list[str] | None = None
    freeze_until: str | None = None

    def build(self) -> nn.Sequential:
        return build_model(self.model, tuple(self.input_shape), self.num_classes, self.normalization,
                           self.freeze_until)


def pack(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state with every masked weight stored as live values + packed mask bits."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if name in masks:
            m = masks[name].cpu()
            out[f"{name}::values"] = t[m].clone()
            out[f"{name}::mask"] = torch.from_numpy(np.packbits(m.numpy().ravel()))
        else:
            out[name] = t.clone()
    return out


def unpack(tensors: dict[str, torch.Tensor], model: nn.Module, where: str = "snapshot") -> nn.Module:
    """Load packed tensors into ``model`` (built from the same spec), masks baked into weights."""
    state = {}
    for name, ref in model.state_dict().items():
        if f"{name}::values" in tensors:
            bits = tensors.get(f"{name}::mask")
            if bits is None:
                raise SnapshotError(f"{where}: {name} has values but no mask")
            mask = np.unpackbits(bits.numpy(), count=ref.numel()).astype(bool)
            values = tensors[f"{name}::values"]
            if int(mask.sum()) != values.numel():
                raise SnapshotError(f"{where}: {name} mask has {int(mask.sum())} live weights, "
                                    f"values has {values.numel()}")
            w = torch.zeros(ref.numel(), dtype=ref.dtype)
            w[torch.from_numpy(mask)] = values.to(ref.dtype)
            state[name] = w.view_as(ref)
        elif name in tensors:
            if tensors[name].shape != ref.shape:
                raise SnapshotError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, "
                                    f"the model expects {tuple(ref.shape)}")
            state[name] = tensors[name]
        else:
            raise SnapshotError(f"{where}: {name} is missing; was the snapshot made for another model?")
    model.load_state_dict(state)
    return model


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
    from ..data.stream import read_npz

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


def dense_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def write_run_profile(run_dir: str | Path, profile: Profile) -> None:
    """Keep a copy of the device profile in the run folder."""
    text = to_yaml(profile).encode("utf-8")
    atomic_write(Path(run_dir) / PROFILE_FILE, lambda f: f.write(text))


def run_profile(run_dir: str | Path, meta: dict) -> Profile:
    """The profile a run learned with: its copy in the run, else the shipped profile the snapshot
    names (runs written before the copy was kept), else ``cpu``."""
    copy = Path(run_dir) / PROFILE_FILE
    if copy.is_file():
        return load_profile(copy)
    return load_profile(meta.get("profile") if meta.get("profile") in profile_names() else "cpu")
