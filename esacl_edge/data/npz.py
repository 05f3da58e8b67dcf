"""Reading ``.npz`` files and their bytes safely: no pickled objects, one clear error naming the file."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import StreamError


def read_npz(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
             content: bytes | None = None) -> dict[str, np.ndarray]:
    """Load named arrays with ``allow_pickle=False``; any problem is one StreamError naming the file.

    ``content``: the file's bytes, when the caller has already read them (to hash them).
    """
    where = str(path)
    if content is None:
        content = read_file(path, "file")
    if not content.startswith(b"PK"):
        raise StreamError(f"{where}: not a readable .npz file (no zip archive header: truncated, corrupt or another "
                          "format)")
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as data:
            missing = [k for k in required if k not in data.files]
            if missing:
                raise StreamError(f"{where}: must hold arrays {', '.join(map(repr, required))}; "
                                  f"missing {', '.join(map(repr, missing))}")
            return {k: data[k] for k in required + optional if k in data.files}
    except StreamError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise StreamError(f"{where}: holds a pickled object array; only plain numeric arrays are accepted") from None
        raise StreamError(f"{where}: not a readable .npz file: {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise StreamError(f"{where}: not a readable .npz file (truncated or corrupt): {exc}") from None


def read_file(path: Path, what: str = "chunk file") -> bytes:
    """A file's bytes, or one StreamError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StreamError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise StreamError(f"{path}: cannot read {what}: {exc.strerror}") from None


def sha256_of(path: Path) -> str | None:
    """Hex SHA-256 of a file's bytes (None when it is gone)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
