"""Data sources that ``make-stream`` turns into chunk streams: bundled digits and ``npz:PATH``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StreamError
from .stream import Manifest, read_npz, write_stream


@dataclass
class Source:
    """A labelled train/test split of NHWC images."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float
    class_names: list[str] | None = None


def load_digits_source(seed: int = 0, test_fraction: float = 0.2) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return Source("digits", x_tr, y_tr, x_te, y_te, 10, 1.0 / 16.0, [str(i) for i in range(10)])


def load_npz_source(path: str | Path) -> Source:
    """A file with uint8 NHWC arrays ``x_train, y_train, x_test, y_test`` (optional ``class_names``)."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"{path}: dataset file not found")
    arrays = read_npz(path, ("x_train", "y_train", "x_test", "y_test"), optional=("class_names",))
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise StreamError(f"{path}: x_{split} must be uint8 NHWC, got {x.dtype} with shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise StreamError(f"{path}: y_{split} must be 1-D integer labels, one per image")
    y_all = np.concatenate([arrays["y_train"], arrays["y_test"]])
    if y_all.min() < 0:
        raise StreamError(f"{path}: labels must be >= 0")
    num_classes = int(y_all.max()) + 1
    return Source(path.stem, arrays["x_train"], arrays["y_train"].astype(np.int64), arrays["x_test"],
                  arrays["y_test"].astype(np.int64), num_classes, 1.0 / 255.0, names)


def load_source(dataset: str, seed: int = 0) -> Source:
    """Resolve ``digits`` or ``npz:PATH``."""
    if dataset == "digits":
        return load_digits_source(seed)
    if dataset.startswith("npz:"):
        return load_npz_source(dataset[4:])
    raise StreamError(f"unknown dataset {dataset!r}: use 'digits' or 'npz:PATH'")


def subsample_per_class(x: np.ndarray, y: np.ndarray, per_class: int | None,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``per_class`` randomly chosen samples of each class (all when None)."""
    if per_class is None:
        return x, y
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])
    keep.sort()
    return x[keep], y[keep]


def split_classes(classes: list[int], tasks: int) -> list[list[int]]:
    """Cut the class order into ``tasks`` consecutive groups of (nearly) equal size."""
    if not 1 <= tasks <= len(classes):
        raise StreamError(f"--tasks must be between 1 and the number of classes ({len(classes)}), got {tasks}")
    return [part.tolist() for part in np.array_split(np.asarray(classes), tasks)]


def make_stream(dataset: str, out: str | Path, tasks: int = 5, chunk_size: int = 64, seed: int = 0,
                per_class: int | None = None, test_per_class: int | None = None,
                class_order: list[int] | None = None) -> Manifest:
    """Write ``dataset`` as a class-incremental chunk stream of ``tasks`` tasks under ``out``."""
    src = load_source(dataset, seed)
    rng = np.random.default_rng(seed)
    x_tr, y_tr = subsample_per_class(src.x_train, src.y_train, per_class, rng)
    x_te, y_te = subsample_per_class(src.x_test, src.y_test, test_per_class, rng)
    order = class_order if class_order is not None else list(range(src.num_classes))
    if sorted(order) != list(range(src.num_classes)):
        raise StreamError(f"class order must list each of the {src.num_classes} classes once, got {order}")
    scaled = x_tr.astype(np.float64) * src.scale
    channels = tuple(range(3))
    normalization = {"scale": src.scale, "mean": scaled.mean(axis=channels).round(6).tolist(),
                     "std": np.maximum(scaled.std(axis=channels), 1e-6).round(6).tolist()}
    return write_stream(out, name=src.name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                        task_classes=split_classes(order, tasks), num_classes=src.num_classes,
                        chunk_size=chunk_size, seed=seed, class_names=src.class_names,
                        normalization=normalization)
