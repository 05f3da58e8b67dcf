"""``make-stream``: read a data set by name and write it as a class-incremental chunk stream.

The readers live in :mod:`esacl_edge.data.sources` and :mod:`esacl_edge.data.images`; this module
picks one (:func:`read_source`), orders and groups the classes into tasks, subsamples, measures
the normalisation and writes the stream (:mod:`esacl_edge.data.write`) atomically.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import StreamError
from ..files import umask
from .images import (
    load_folder_source,
    load_tiny_imagenet_source,
    parse_image_size,
    shape_images,
)
from .sources import (
    ReadOptions,
    Source,
    load_cifar_source,
    load_digits_source,
    load_mnist_source,
    load_npz_source,
    pick_per_class,
)
from .stream import MIN_MODEL_SIDE, Manifest, classes_problem, read_manifest, shape_problem
from .write import write_stream

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOADABLE = ("cifar10", "cifar100", "mnist", "fashion-mnist")
NEEDS_ROOT = DOWNLOADABLE + ("tiny-imagenet",)
NAMES = ("digits", "npz:PATH", "folder:PATH") + NEEDS_ROOT
MAX_SEED = 2 ** 32 - 1  # numpy's legacy seeding and scikit-learn's random_state take 0..2**32-1


def read_source(dataset: str, opts: ReadOptions = ReadOptions()) -> Source:
    """Read ``dataset`` (see :data:`NAMES`) and apply the requested channels and image size."""
    if opts.download and dataset not in DOWNLOADABLE:
        raise StreamError(f"--download is available for {', '.join(DOWNLOADABLE)}, not {dataset!r}")
    if dataset in NEEDS_ROOT and opts.root is None:
        hint = (f" (Debian's dataset-fashion-mnist package installs it in {DEBIAN_FASHION_MNIST})"
                if dataset == "fashion-mnist" else "")
        raise StreamError(f"{dataset} needs --root DIR, the folder that holds it{hint}")
    if dataset in ("cifar10", "cifar100"):
        src = load_cifar_source(opts.root, dataset == "cifar100", opts.download)
    elif dataset in ("mnist", "fashion-mnist"):
        src = load_mnist_source(opts.root, dataset, opts.download)
    elif dataset == "tiny-imagenet":
        return load_tiny_imagenet_source(opts.root, opts)
    elif dataset.startswith("folder:"):
        return load_folder_source(dataset[7:], opts)
    elif dataset == "digits":
        src = load_digits_source(opts.seed)
    elif dataset.startswith("npz:"):
        src = load_npz_source(dataset[4:])
    else:
        raise StreamError(f"unknown dataset {dataset!r}: use one of {', '.join(NAMES)}")
    src.x_train, src.x_test = shape_images(src.x_train, opts), shape_images(src.x_test, opts)
    return src


def subsample_per_class(x: np.ndarray, y: np.ndarray, per_class: int | None,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``per_class`` randomly chosen samples of each class (all when None)."""
    if per_class is None:
        return x, y
    keep = pick_per_class(y, per_class, rng)
    return x[keep], y[keep]


def split_classes(classes: list[int], tasks: int) -> list[list[int]]:
    """Cut the class order into ``tasks`` consecutive groups of (nearly) equal size."""
    if not 1 <= tasks <= len(classes):
        raise StreamError(f"--tasks must be between 1 and the number of classes ({len(classes)}), got {tasks}")
    return [part.tolist() for part in np.array_split(np.asarray(classes), tasks)]


def parse_classes(spec: str | list[int], num_classes: int) -> list[int]:
    """``--classes``: ``"50-99"``, ``"0,3,7"``, a mix (``"0-9,20"``) or a list; sorted, each in 0..K-1."""
    if isinstance(spec, str):
        out: set[int] = set()
        try:
            for part in filter(None, (p.strip() for p in spec.split(","))):
                lo, _, hi = part.partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise StreamError(f"--classes must be class numbers and ranges such as 50-99 or 0,3,7; got {spec!r}") from None
    else:
        out = {int(c) for c in spec}
    if not out or min(out) < 0 or max(out) >= num_classes:
        raise StreamError(f"--classes must name classes in 0..{num_classes - 1}, got {spec!r}")
    return sorted(out)


def resolve_class_order(class_order: list[int] | str | None, classes: list[int], seed: int) -> list[int]:
    """``None``: ``classes`` in order; ``"random"``: a permutation drawn with ``seed``; or an explicit list of
    every one of ``classes``."""
    if class_order is None:
        return list(classes)
    if isinstance(class_order, str):
        if class_order != "random":
            raise StreamError(f"class order must be 'random' or a list of classes, got {class_order!r}")
        return np.asarray(classes)[np.random.default_rng([seed, 2]).permutation(len(classes))].tolist()
    order = [int(c) for c in class_order]
    if sorted(order) != sorted(classes):
        raise StreamError(f"class order must list each of the {len(classes)} classes once, got {order}")
    return order


def measure_normalization(x: np.ndarray, scale: float) -> dict:
    """Per-channel mean and std of ``x * scale``, accumulated in float64 without a float copy of ``x``."""
    flat = x.reshape(-1, x.shape[-1])
    total, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 20):
        part = flat[start:start + (1 << 20)].astype(np.float64)
        total += part.sum(axis=0)
        squares += np.square(part).sum(axis=0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(squares / len(flat) - mean ** 2, 0.0))
    return {"scale": scale, "mean": (mean * scale).round(6).tolist(),
            "std": np.maximum(std * scale, 1e-6).round(6).tolist()}


def check_seed(seed: int) -> None:
    """Refuse a seed that numpy and scikit-learn cannot take."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise StreamError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")


def check_source(dataset: str, src: Source) -> None:
    """Refuse images and label spaces that no stream can hold, before anything is written."""
    shape = src.x_train.shape[1:]
    if problem := shape_problem(shape):
        raise StreamError(f"{dataset}: images of shape {shape}: {problem}; --image-size resizes them")
    if min(shape[:2]) < MIN_MODEL_SIDE:
        raise StreamError(f"{dataset}: images of {shape[0]}x{shape[1]} pixels are smaller than any backbone takes "
                          f"(at least {MIN_MODEL_SIDE}x{MIN_MODEL_SIDE}); --image-size resizes them")
    if src.x_test.shape[1:] != shape:
        raise StreamError(f"{dataset}: test images are {src.x_test.shape[1:]} but training images are {shape}; "
                          "both must have one (H, W, C), or pass --image-size")
    if problem := classes_problem(src.num_classes):
        raise StreamError(f"{dataset}: the number of classes (highest label + 1) {problem}")


def _fresh_output(out: Path) -> None:
    if (out / "manifest.json").exists():
        raise StreamError(f"{out}: already holds a stream (manifest.json); choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StreamError(f"{out}: exists and is not an empty folder; choose another --out")


def make_stream(dataset: str, out: str | Path, tasks: int = 5, chunk_size: int = 64, seed: int = 0,
                per_class: int | None = None, test_per_class: int | None = None,
                class_order: list[int] | str | None = None, *, classes_per_task: int | None = None,
                blurry: int = 0, root: str | Path | None = None, download: bool = False,
                image_size: str | tuple[int, int] | None = None, channels: int | None = None,
                test_fraction: float = 0.2, classes: str | list[int] | None = None) -> Manifest:
    """Write ``dataset`` as a class-incremental chunk stream under ``out``.

    Classes (in ``class_order``) are cut into ``tasks`` groups, or groups of ``classes_per_task``.
    ``per_class``/``test_per_class`` subsample each class with ``seed``; ``classes`` keeps a subset (labels keep
    their numbers, the label space stays the source's). The stream is written to a
    temporary folder beside ``out`` and renamed at the end, so a failure leaves no partial ``out``.
    """
    out = Path(out)
    check_seed(seed)
    _fresh_output(out)
    if chunk_size < 1:
        raise StreamError(f"chunk size must be >= 1, got {chunk_size}")
    for flag, value in (("--per-class", per_class), ("--test-per-class", test_per_class)):
        if value is not None and value < 1:
            raise StreamError(f"{flag} must be >= 1, got {value}")
    if channels not in (None, 1, 3):
        raise StreamError(f"--channels must be 1 or 3, got {channels}")
    size = parse_image_size(image_size) if isinstance(image_size, str) else image_size
    opts = ReadOptions(root=Path(root) if root is not None else None, download=download, image_size=size,
                       channels=channels, test_fraction=test_fraction, per_class=per_class,
                       test_per_class=test_per_class, seed=seed)
    src = read_source(dataset, opts)
    check_source(dataset, src)
    kept = parse_classes(classes, src.num_classes) if classes is not None else list(range(src.num_classes))
    order = resolve_class_order(class_order, kept, seed)
    if len(kept) < src.num_classes:
        train_in, test_in = np.isin(src.y_train, kept), np.isin(src.y_test, kept)
        src.x_train, src.y_train = src.x_train[train_in], src.y_train[train_in]
        src.x_test, src.y_test = src.x_test[test_in], src.y_test[test_in]
    if classes_per_task is not None:
        if classes_per_task < 1 or len(kept) % classes_per_task:
            raise StreamError(f"--classes-per-task must divide the {len(kept)} classes, got {classes_per_task}")
        tasks = len(kept) // classes_per_task
    task_classes = split_classes(order, tasks)
    rng = np.random.default_rng(seed)
    x_tr, y_tr = subsample_per_class(src.x_train, src.y_train, per_class, rng)
    x_te, y_te = subsample_per_class(src.x_test, src.y_test, test_per_class, rng)
    for t, group in enumerate(task_classes):
        if not np.isin(y_te, group).any():
            raise StreamError(f"{dataset}: task {t} (classes {group}) has no test samples")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise StreamError(f"{out}: cannot create the stream folder: {exc.strerror}") from None
    try:
        write_stream(tmp, name=src.name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                     task_classes=task_classes, num_classes=src.num_classes, chunk_size=chunk_size, seed=seed,
                     class_names=src.class_names, normalization=measure_normalization(x_tr, src.scale), blurry=blurry)
        _fresh_output(out)
        if out.exists():
            out.rmdir()
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the stream gets the usual mode
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_manifest(out)
