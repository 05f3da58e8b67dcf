"""The chunk stream format: a manifest plus ``.npz`` chunk files, readable with numpy alone.

This module reads and validates a stream; :mod:`esacl_edge.data.write` writes one.

Layout of a stream directory::

    manifest.json
    task0/chunk0000.npz ...      # arrays x (N, H, W, C) and y (N,)
    test/task0.npz ...           # the task's test split, same arrays

``manifest.json``::

    {"format": "esacl-stream", "version": 1, "name": "digits",
     "input_shape": [H, W, C], "dtype": "uint8" | "float32", "num_classes": 10,
     "class_names": ["0", ...] | null,
     "normalization": {"scale": 0.0625, "mean": [m_c...], "std": [s_c...]},
     "tasks": [{"classes": [0, 1], "chunks": ["task0/chunk0000.npz", ...],
                "test": "test/task0.npz"}, ...]}

Paths in the manifest are relative to the stream directory and may not leave it.

A task may also name a drop folder, ``"chunk_dir": "incoming/task3"``: every ``*.npz`` file
in it whose name does not start with a dot is a chunk of the task, after the listed ones,
in name order. A producer writes ``.name.npz.tmp`` and renames it when complete. Under
``learn --follow`` a task stays open for new chunks until a later task has a chunk or the
task says ``"complete": true``.

A task may also list ``"blurry_classes": [...]``: classes of neighbouring tasks whose samples
appear in its chunks (a blurry task boundary, see :mod:`esacl_edge.data.blurry`). Chunk labels
must be in ``classes`` or ``blurry_classes``; the test split holds ``classes`` only. Without the
field a task's chunks hold only its ``classes``.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import StreamError
from ..files import read_json
from .npz import read_file, read_npz

FORMAT = "esacl-stream"
VERSION = 1
DTYPES = ("uint8", "float32")
# Sanity limits of a sample and a label space: beyond them a backbone cannot be built on an edge device.
MAX_SIDE = 1024
MIN_MODEL_SIDE = 4  # the smallest side any backbone takes (small_cnn halves each side twice)
MAX_CHANNELS = 16
MAX_CLASSES = 100_000


def shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` cannot be one sample's (H, W, C), or None when it can."""
    if len(shape) != 3 or not all(type(v) is int or isinstance(v, np.integer) for v in shape):
        return f"must be [H, W, C], three integers, got {list(shape)}"
    h, w, c = (int(v) for v in shape)
    if min(h, w, c) < 1:
        return f"must be [H, W, C] with positive sizes, got {[h, w, c]}"
    if max(h, w) > MAX_SIDE or c > MAX_CHANNELS:
        return f"{h}x{w}x{c} is out of range: at most {MAX_SIDE} pixels a side and {MAX_CHANNELS} channels"
    return None


def classes_problem(num_classes) -> str | None:
    """Why ``num_classes`` cannot be a stream's number of classes, or None when it can."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or not 2 <= num_classes <= MAX_CLASSES:
        got = int(num_classes) if isinstance(num_classes, np.integer) else num_classes
        return f"must be an integer from 2 to {MAX_CLASSES:,}, got {got!r}"
    return None


@dataclass(frozen=True)
class Task:
    classes: tuple[int, ...]
    chunks: tuple[str, ...]
    test: str | None
    blurry_classes: tuple[int, ...] = ()  # other tasks' classes that may also appear in the chunks
    complete: bool = False  # no more chunks will come (matters only when following a live stream)

    @property
    def chunk_classes(self) -> tuple[int, ...]:
        """Labels a chunk of this task may hold."""
        return self.classes + self.blurry_classes


@dataclass(frozen=True)
class Manifest:
    root: Path
    name: str
    input_shape: tuple[int, int, int]
    dtype: str
    num_classes: int
    tasks: tuple[Task, ...]
    class_names: tuple[str, ...] | None = None
    normalization: dict = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.root / rel


def _finite(value, positive: bool = False) -> bool:
    """A JSON number (not a bool) that is finite, and > 0 if ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300:
        return False
    return math.isfinite(value) and (value > 0 or not positive)


def _int_list(value, where: str, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise StreamError(f"{where}: {what} must be a list of integers, got {value!r}")
    return value


def _rel_path(value, root: Path, where: str, what: str) -> str:
    """``value`` as the stream names it: a relative path inside ``root``, normalised (``./a//b`` -> ``a/b``)."""
    if not isinstance(value, str) or not value:
        raise StreamError(f"{where}: {what} must be a relative file path, got {value!r}")
    resolved = (root / value).resolve()
    if Path(value).is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise StreamError(f"{where}: {what} {value!r} points outside the stream directory")
    return posixpath.normpath(value)


def _dropped(root: Path, chunk_dir: str) -> list[str]:
    """Chunk files in a drop folder, in name order; hidden (still being written) files are not chunks."""
    folder = root / chunk_dir
    if not folder.is_dir():
        return []
    return sorted(f"{chunk_dir.rstrip('/')}/{p.name}" for p in folder.glob("*.npz") if not p.name.startswith("."))


def read_manifest(stream_dir: str | Path) -> Manifest:
    """Read and validate ``stream_dir/manifest.json``; chunk files are checked when loaded."""
    root = Path(stream_dir)
    mpath = root / "manifest.json"
    where = str(mpath)
    if not mpath.is_file():
        raise StreamError(f"{where}: manifest not found (is {root} a chunk stream directory?)")
    raw = read_json(mpath, StreamError)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StreamError(f"{where}: not an {FORMAT} manifest (field 'format' must be {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise StreamError(f"{where}: unsupported version {raw.get('version')!r} (this esacl-edge reads {VERSION})")
    shape = _int_list(raw.get("input_shape"), where, "input_shape")
    if problem := shape_problem(tuple(shape)):
        raise StreamError(f"{where}: input_shape {problem}")
    dtype = raw.get("dtype")
    if dtype not in DTYPES:
        raise StreamError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    num_classes = raw.get("num_classes")
    if problem := classes_problem(num_classes):
        raise StreamError(f"{where}: num_classes {problem}")
    names = raw.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes):
        raise StreamError(f"{where}: class_names must be null or a list of {num_classes} names")
    norm = raw.get("normalization") or {}
    if not isinstance(norm, dict) or set(norm) - {"scale", "mean", "std"}:
        raise StreamError(f"{where}: normalization must be a mapping with scale, mean, std")
    for key in ("mean", "std"):
        if key in norm and (not isinstance(norm[key], list) or len(norm[key]) != shape[2]
                            or not all(_finite(v, positive=key == "std") for v in norm[key])):
            what = "positive number" if key == "std" else "number"
            raise StreamError(f"{where}: normalization.{key} must list one finite {what} per channel ({shape[2]}), "
                              f"got {norm[key]!r}")
    if "scale" in norm and not _finite(norm["scale"], positive=True):
        raise StreamError(f"{where}: normalization.scale must be a positive number, got {norm['scale']!r}")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise StreamError(f"{where}: tasks must be a non-empty list")
    tasks, seen_chunks, seen_classes = [], {}, set()
    for i, t in enumerate(tasks_raw):
        tw = f"{where}: tasks[{i}]"
        if not isinstance(t, dict):
            raise StreamError(f"{tw} must be a mapping with classes, chunks, test")
        classes = _int_list(t.get("classes"), tw, "classes")
        if not classes or any(c < 0 or c >= num_classes for c in classes):
            raise StreamError(f"{tw}: classes must be non-empty and within 0..{num_classes - 1}, got {classes}")
        chunks = t.get("chunks", [])
        chunk_dir = t.get("chunk_dir")
        if not isinstance(chunks, list) or not (chunks or chunk_dir is not None):
            raise StreamError(f"{tw}: chunks must be a non-empty list of files (or give a chunk_dir)")
        chunks = [_rel_path(c, root, tw, "chunk") for c in chunks]
        if chunk_dir is not None:
            chunks += [c for c in _dropped(root, _rel_path(chunk_dir, root, tw, "chunk_dir")) if c not in chunks]
        complete = t.get("complete", False)
        if not isinstance(complete, bool):
            raise StreamError(f"{tw}: complete must be true or false, got {complete!r}")
        for c in chunks:
            file = (root / c).resolve()  # names that differ but are one file (a link, say) are one chunk
            if file in seen_chunks:
                alias = "" if seen_chunks[file] == c else f" (as {seen_chunks[file]!r} too: the same file)"
                raise StreamError(f"{tw}: chunk {c!r} is listed twice in the stream{alias}")
            seen_chunks[file] = c
        test = t.get("test")
        if test is not None:
            test = _rel_path(test, root, tw, "test")
        blurry = _int_list(t.get("blurry_classes", []), tw, "blurry_classes")
        if any(c < 0 or c >= num_classes or c in classes for c in blurry):
            raise StreamError(f"{tw}: blurry_classes must be within 0..{num_classes - 1} and not among the "
                              f"task's classes {classes}, got {blurry}")
        seen_classes.update(classes)
        tasks.append(Task(tuple(classes), tuple(chunks), test, tuple(blurry), complete))
    return Manifest(root=root, name=str(raw.get("name", root.name)), input_shape=tuple(shape), dtype=dtype,
                    num_classes=num_classes, tasks=tuple(tasks),
                    class_names=tuple(map(str, names)) if names else None, normalization=norm)


def load_arrays(path: Path, manifest: Manifest, classes: tuple[int, ...],
                content: bytes | None = None, what: str = "chunk file") -> tuple[np.ndarray, np.ndarray]:
    """Load one chunk or test file (``what``) and check it against the manifest; errors name the file."""
    where = str(path)
    if content is None and not path.is_file():
        raise StreamError(f"{where}: {what} not found")
    arrays = read_npz(path, ("x", "y"), content=content)
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.dtype(manifest.dtype):
        raise StreamError(f"{where}: x has dtype {x.dtype}, the manifest says {manifest.dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != manifest.input_shape:
        h, w, c = manifest.input_shape
        hint = ""
        if x.ndim == 4 and tuple(x.shape[1:]) == (c, h, w) and c != h:
            hint = " (x is channels-first, NCHW: store it as NHWC, x.transpose(0, 2, 3, 1))"
        elif x.ndim == 3 and tuple(x.shape[1:]) == (h, w) and c == 1:
            hint = " (x has no channel axis: store x[..., None])"
        raise StreamError(f"{where}: x has shape {tuple(x.shape)}, expected (N, {h}, {w}, {c}){hint}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise StreamError(f"{where}: y must be a 1-D integer array, got {y.dtype} with shape {tuple(y.shape)}")
    if len(x) != len(y):
        raise StreamError(f"{where}: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise StreamError(f"{where}: the chunk is empty")
    bad = np.setdiff1d(np.unique(y), np.asarray(classes))
    if bad.size:
        raise StreamError(f"{where}: labels {bad.tolist()} are not classes of this task {list(classes)}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise StreamError(f"{where}: x contains NaN or Inf")
    return x, y.astype(np.int64)


@dataclass(frozen=True)
class Chunk:
    task: int
    index: int
    n_chunks: int
    path: Path
    x: np.ndarray
    y: np.ndarray
    sha256: str = ""  # of the file's bytes, as learned


def load_chunk(manifest: Manifest, task: int, index: int) -> Chunk:
    """Read, hash and validate chunk ``index`` of ``task`` (the bytes hashed are the bytes learned)."""
    t = manifest.tasks[task]
    path = manifest.path(t.chunks[index])
    content = read_file(path)
    x, y = load_arrays(path, manifest, t.chunk_classes, content)
    return Chunk(task, index, len(t.chunks), path, x, y, hashlib.sha256(content).hexdigest())


def iter_chunks(manifest: Manifest) -> Iterator[Chunk]:
    """Yield the chunks in stream order, each loaded and validated only when it is reached."""
    for t, task in enumerate(manifest.tasks):
        for i in range(len(task.chunks)):
            yield load_chunk(manifest, t, i)


def load_test(manifest: Manifest, task: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the test split of ``task``."""
    t = manifest.tasks[task]
    if t.test is None:
        raise StreamError(f"{manifest.root / 'manifest.json'}: task {task} has no test split")
    return load_arrays(manifest.path(t.test), manifest, t.classes, what=f"test file of task {task}")
