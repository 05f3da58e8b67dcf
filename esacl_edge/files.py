"""Safe file I/O: atomic writes (a file appears complete under its name, or not at all) and
reads that never unpickle objects, failing with one error that names the file."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
import zipfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def umask() -> int:
    """The process umask: from ``/proc/self/status`` where there is one (reading it changes nothing),
    else by setting it and putting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_beside(path: Path, suffix: str) -> tuple[int, str]:
    """A temp file beside ``path`` (for an atomic rename), with the mode a plain ``open`` would give it.

    ``mkstemp`` creates files owner-only; a service user on the device must be able to read what
    esacl-edge writes whenever the umask allows it.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temp file in the target folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make renames and new files in ``folder`` survive a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_npz(path: str | Path, compress: bool = True, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: (np.savez_compressed if compress else np.savez)(f, **arrays))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save a flat dict of plain tensors, loadable with ``torch.load(..., weights_only=True)``."""
    atomic_write(path, lambda f: torch.save(tensors, f))


def read_json(path: Path, error: type[Exception]) -> Any:
    """Parse a JSON file; bad text raises ``error`` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None


def load_problem(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one plain sentence."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        return ("it holds Python objects beyond tensors, which loading would have to unpickle (refused); "
                "save a dict of tensors, e.g. model.state_dict()")
    if isinstance(exc, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError)) or "zip archive" in text:
        return "truncated or corrupt (not a complete PyTorch file)"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.split(". ")[0].rstrip(".")


def read_tensors(path: Path, error: type[Exception], what: str, content: bytes | None = None
                 ) -> dict[str, torch.Tensor]:
    """Load a flat dict of tensors with ``weights_only=True`` (from ``content``, the file's bytes already read,
    if given); anything else raises ``error`` naming the file."""
    try:
        with warnings.catch_warnings():  # the refusal below is the message; no unpickler chatter
            warnings.simplefilter("ignore")
            tensors = torch.load(path if content is None else io.BytesIO(content), map_location="cpu",
                                 weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise error(f"{path}: not a readable {what}: {load_problem(exc)}") from None
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        raise error(f"{path}: must hold a flat dict of tensors")
    return tensors
