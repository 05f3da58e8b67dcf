"""The learner's state after a chunk, as explicit data in files, saved crash-safely.

The learner and its parts return their state as nested dicts (``state_dict()``); this module
stores any such dict without knowing its fields. A checkpoint is a folder of three files:

* ``state.pt``: the tensor leaves, flat, keyed by their path (``model/conv1.weight``), loaded
  with ``torch.load(..., weights_only=True)``;
* ``state.npz``: the numpy-array leaves (the replay buffer, the joint baseline's data),
  loaded with ``allow_pickle=False``;
* ``state.json``: every other leaf in its place, plus the schema and whatever the caller adds
  under ``extra`` (the runner records the chunks consumed).

Task snapshots are not copied in: the state names them and their SHA-256, and the learner
reads them from the run's ``snapshots/`` folder.

Saving never overwrites the last good checkpoint: ``DIR/ckpt-NNNNNN/`` is written and
fsynced first, then the one-line ``DIR/LATEST`` is replaced atomically to point at it, then
folders older than the previous one are removed. A crash at any moment leaves ``LATEST``
naming a complete one. When the latest one does not read (a damaged disk, a file changed by
hand, ``LATEST`` itself unreadable), loading falls back to the previous one, with a warning
naming both.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import CheckpointError, CheckpointVersionError
from .files import (
    fsync_dir,
    read_json,
    read_tensors,
    write_json,
    write_npz,
    write_tensors,
)

SCHEMA = 2
LATEST = "LATEST"
_FILES = ("state.json", "state.pt", "state.npz")


def split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict[str, Any]]:
    """Nested state -> (tensors by path, arrays by path, the JSON rest with the same nesting)."""
    tensors: dict[str, torch.Tensor] = {}
    arrays: dict[str, np.ndarray] = {}

    def walk(node: dict, prefix: str) -> dict:
        rest = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if torch.is_tensor(value):
                tensors[path] = value.detach().cpu().clone()
            elif isinstance(value, np.ndarray):
                arrays[path] = value
            elif isinstance(value, dict):
                rest[key] = walk(value, path + "/")
            else:
                rest[key] = value
        return rest

    return tensors, arrays, walk(state, "")


def join(tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`split`."""
    state = json.loads(json.dumps(rest))
    for path, value in [*tensors.items(), *arrays.items()]:
        *parents, leaf = path.split("/")
        node = state
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return state


def _numbered(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("ckpt-*") if p.is_dir())


def save(folder: str | Path, state: dict[str, Any], extra: dict | None = None) -> Path:
    """Write ``state`` (plus ``extra`` JSON) as the new latest checkpoint in ``folder``.

    On failure (a full disk, say) the previous checkpoint stays the latest and nothing
    partial is left behind.
    """
    folder = Path(folder)
    tensors, arrays, rest = split(state)
    meta = {"schema": SCHEMA, "esacl_edge_version": __version__, **rest, "extra": extra or {}}
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
    for old in existing[:-1]:  # the previous one stays, to fall back to
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
    """Load one checkpoint folder safely (no pickled objects): (tensors, arrays, JSON); one error naming the bad file."""
    path = Path(path)
    meta_path, pt, npz = (path / f for f in _FILES)
    for f in (meta_path, pt, npz):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
    meta = read_json(meta_path, CheckpointError)
    schema = meta.get("schema") if isinstance(meta, dict) else None
    if type(schema) is int and schema > SCHEMA:
        raise CheckpointVersionError(f"{meta_path}: written by a newer esacl-edge ({meta.get('esacl_edge_version')}, "
                                     f"state schema {schema}); this version reads schema {SCHEMA}: upgrade esacl-edge")
    if type(schema) is int and schema < SCHEMA:
        raise CheckpointVersionError(f"{meta_path}: a learner state of schema {schema}, written by esacl-edge "
                                     f"{meta.get('esacl_edge_version')}; this version reads schema {SCHEMA} only: "
                                     "finish that run with the version that started it, or start afresh (--overwrite)")
    if schema != SCHEMA or "spec" not in meta:
        raise CheckpointError(f"{meta_path}: not an esacl-edge learner state (schema {schema!r})")
    tensors = read_tensors(pt, CheckpointError, "state file")
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{npz}: not a readable state file: {exc}") from None
    return tensors, arrays, meta


def load(folder: str | Path) -> tuple[dict[str, Any], dict, Path] | None:
    """The latest checkpoint in ``folder`` that reads, as (nested state, extra, its path); None when nothing was
    saved. A latest one that does not read falls back to the previous one, with a warning."""
    folder = Path(folder)
    numbered = _numbered(folder) if folder.is_dir() else []
    if not (folder / LATEST).is_file() and not numbered:
        return None
    problems, candidates = [], []
    try:
        first = latest(folder)
        candidates = [first] if first is not None else []
    except CheckpointError as exc:
        problems.append(str(exc))
    newest = candidates[0].name if candidates else None
    candidates += [p for p in reversed(numbered) if p.name != newest and (newest is None or p.name < newest)]
    for path in candidates:
        try:
            tensors, arrays, meta = read(path)
        except CheckpointVersionError:
            raise  # another version's state: an earlier checkpoint would not be the run's state either
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        extra = meta.pop("extra", {}) or {}
        if problems:
            consumed = extra.get("consumed") if isinstance(extra, dict) else None
            since = (f", saved after chunk {len(consumed)} ({consumed[-1].get('chunk')})"
                     if isinstance(consumed, list) and consumed and isinstance(consumed[-1], dict) else "")
            warnings.warn(f"{problems[0]}; resuming from the saved state {path} instead{since}", RuntimeWarning,
                          stacklevel=2)
        return join(tensors, arrays, meta), extra, path
    if not problems:
        return None
    raise CheckpointError(problems[0] + ("" if len(problems) == 1 else "; the previous saved state does not read "
                                         "either"))
