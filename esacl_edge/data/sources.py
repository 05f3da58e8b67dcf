"""Data-set readers for digits, npz, CIFAR and the MNIST family, and the types all readers share.

Every reader returns a :class:`Source` of uint8 NHWC arrays; every problem with the user's
files is one :class:`StreamError` that names the folder or file and what is wrong. Nothing is
downloaded unless ``download`` is asked for. Image folders and Tiny-ImageNet are read by
:mod:`esacl_edge.data.images`; :func:`esacl_edge.data.build.read_source` picks a reader by name.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import StreamError
from .npz import read_npz

FOLDER_TEST_FRACTION = 0.2


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


@dataclass(frozen=True)
class ReadOptions:
    """How to read a source: where, whether to download, and the image geometry wanted.

    ``per_class``/``test_per_class`` let file-per-image sources decode only the files kept;
    ``seed`` picks them (and splits folders without train/test subfolders).
    """

    root: Path | None = None
    download: bool = False
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    test_fraction: float = FOLDER_TEST_FRACTION
    per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0


def pick_per_class(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``limit`` randomly chosen items per label (all when None), in order."""
    if limit is None:
        return np.arange(len(labels))
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:limit] for c in np.unique(labels)])
    return np.sort(keep)


# ---------------------------------------------------------------------------------------- bundled, npz
def load_digits_source(seed: int = 0, test_fraction: float = 0.2) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return Source("digits", x_tr, y_tr, x_te, y_te, 10, 1.0 / 16.0, [str(i) for i in range(10)])


def _channels_first(shape: tuple[int, ...]) -> bool:
    """(N, C, H, W) with a usual channel count in front and an image side last, as PyTorch stores images."""
    return len(shape) == 4 and shape[1] in (1, 3, 4) and shape[3] > 4


def load_npz_source(path: str | Path) -> Source:
    """A file with uint8 arrays ``x_train, y_train, x_test, y_test`` (optional ``class_names``).

    Images are NHWC, or NHW for one channel; channels-first (NCHW) arrays are refused, not guessed.
    """
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"{path}: dataset file not found")
    arrays = read_npz(path, ("x_train", "y_train", "x_test", "y_test"), optional=("class_names",))
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if _channels_first(x.shape):
            raise StreamError(f"{path}: x_{split} has shape {x.shape}, channels first (NCHW); store it as NHWC "
                              f"(N, H, W, C), e.g. x_{split}.transpose(0, 2, 3, 1)")
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise StreamError(f"{path}: x_{split} must be uint8 NHWC (or NHW for one channel), got {x.dtype} "
                              f"with shape {x.shape}")
        if x.ndim == 3:
            arrays[f"x_{split}"] = x[..., None]
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise StreamError(f"{path}: y_{split} must be 1-D integer labels, one per image")
    y_all = np.concatenate([arrays["y_train"], arrays["y_test"]])
    if y_all.min() < 0:
        raise StreamError(f"{path}: labels must be >= 0")
    num_classes = int(y_all.max()) + 1
    return Source(path.stem, arrays["x_train"], arrays["y_train"].astype(np.int64), arrays["x_test"],
                  arrays["y_test"].astype(np.int64), num_classes, 1.0 / 255.0, names)


# ---------------------------------------------------------------------------------------- CIFAR
def _cifar_class(fine: bool):
    """torchvision's CIFAR class with the file checks reduced to presence (md5 only when downloading).

    The official archive is still verified by its checksum when downloaded; files already on disk
    are accepted if they parse, so re-packed or subset batches in the official format work too.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR100 if fine else CIFAR10

    class Cifar(base):
        train_list: ClassVar = [[name, None] for name, _ in base.train_list]
        test_list: ClassVar = [[name, None] for name, _ in base.test_list]
        meta: ClassVar = {**base.meta, "md5": None}

    return Cifar


def load_cifar_source(root: Path, fine: bool = False, download: bool = False) -> Source:
    """CIFAR-10 (``fine=False``) or CIFAR-100 fine labels from ``root/cifar-10(0)-batches-py`` or -python.

    The batches are Python pickles: they are read only from the ``root`` the caller names.
    """
    cls = _cifar_class(fine)
    name = "cifar100" if fine else "cifar10"
    root = Path(root)
    if not (root / cls.base_folder).is_dir() and (root / cls.meta["filename"]).is_file():
        root = root.parent  # the user named the batches folder itself
    folder = root / cls.base_folder
    if download:
        _download(lambda: cls(str(root), train=True, download=True), root, name)
    if not folder.is_dir():
        raise StreamError(f"{folder} not found under {root}: expected the official python batches of "
                          f"{name}; pass --download to fetch them")
    files = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in files if not (folder / n).is_file()]
    if missing:
        raise StreamError(f"{folder}: missing {', '.join(missing)} of the official {name} python batches")
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except Exception as exc:  # noqa: BLE001 - torchvision raises many kinds; find and name the bad file
        raise StreamError(_bad_pickle(folder, files, "labels" if not fine else "fine_labels", exc)) from None
    xs, ys = [], []
    for split in (train, test):
        x, y = np.asarray(split.data, np.uint8), np.asarray(split.targets, np.int64)
        if len(x) != len(y):
            raise StreamError(f"{folder}: the {'train' if split.train else 'test'} batches hold {len(x)} images "
                              f"but {len(y)} labels")
        xs.append(np.ascontiguousarray(x))
        ys.append(y)
    classes = [str(c) for c in train.classes]
    _check_labels(folder, np.concatenate(ys), len(classes))
    return Source(name, xs[0], ys[0], xs[1], ys[1], len(classes), 1.0 / 255.0, classes)


def _bad_pickle(folder: Path, files: list[str], label_key: str, exc: Exception) -> str:
    """Say which batch file cannot be read as an official CIFAR batch (only called after a failure)."""
    for n in files:
        try:
            with open(folder / n, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as err:  # noqa: BLE001
            return f"{folder / n}: not a readable CIFAR python batch (truncated or corrupt): {type(err).__name__}"
        meta = n in ("batches.meta", "meta")
        key = ("label_names", "fine_label_names") if meta else ("data", label_key)
        if not isinstance(entry, dict) or not (any if meta else all)(k in entry for k in key):
            return f"{folder / n}: not a CIFAR python batch (expected a dict with {' / '.join(key)})"
        if not meta and np.shape(entry["data"])[-1:] != (3072,):
            return f"{folder / n}: 'data' must be uint8 rows of 3072 values (32x32x3)"
    return f"{folder}: cannot read the CIFAR python batches: {type(exc).__name__}: {exc}"


def _check_labels(where: Path, y: np.ndarray, num_classes: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise StreamError(f"{where}: labels must be within 0..{num_classes - 1}, found {y.min()}..{y.max()}")


def _download(fetch, root: Path, name: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except Exception as exc:  # noqa: BLE001 - network and archive errors of any kind
        raise StreamError(f"{root}: downloading {name} failed: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------- MNIST family
_IDX = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
_MNIST = {"mnist": ("MNIST", "mnist", [str(i) for i in range(10)]),
          "fashion-mnist": ("FashionMNIST", "fashion-mnist",
                            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot"])}


def _idx_folder(root: Path, name: str) -> Path | None:
    """Where the four idx files are: torchvision's ``ROOT/MNIST/raw``, a Debian-style ``ROOT/fashion-mnist``,
    or ``ROOT`` itself (e.g. ``/usr/share/datasets/fashion-mnist``)."""
    tv, debian, _ = _MNIST[name]
    for folder in (root / tv / "raw", root / debian, root):
        if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in _IDX.values()):
            return folder
    return None


def _read_idx(path: Path, labels: bool) -> np.ndarray:
    """An idx file (plain or ``.gz``) through torchvision's reader; errors name the file."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    read = read_label_file if labels else read_image_file
    try:
        if path.suffix != ".gz":
            return read(str(path)).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return read(str(plain)).numpy()
    except (AssertionError, RuntimeError, ValueError, KeyError, IndexError, OSError, EOFError) as exc:
        what = "idx1 label" if labels else "idx3 image"
        raise StreamError(f"{path}: not a readable {what} file (truncated or corrupt): "
                          f"{type(exc).__name__} {exc}".rstrip()) from None


def load_mnist_source(root: Path, name: str = "mnist", download: bool = False) -> Source:
    """MNIST or Fashion-MNIST idx files, gzipped or not, in torchvision's or Debian's layout."""
    from torchvision.datasets import MNIST, FashionMNIST

    tv, debian, classes = _MNIST[name]
    root = Path(root)
    if download:
        cls = MNIST if name == "mnist" else FashionMNIST
        _download(lambda: cls(str(root), train=True, download=True), root, name)
    folder = _idx_folder(root, name)
    if folder is None:
        raise StreamError(f"{root}: no {name} idx files ({', '.join(_IDX.values())}, optionally .gz) in "
                          f"{root / tv / 'raw'}, {root / debian} or {root}; pass --download to fetch them")
    arrays = {}
    for key, stem in _IDX.items():
        path = folder / stem if (folder / stem).is_file() else folder / f"{stem}.gz"
        arrays[key] = (_read_idx(path, key.startswith("y")), path)
    for split in ("train", "test"):
        (x, xp), (y, yp) = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise StreamError(f"{xp}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise StreamError(f"{yp}: holds {len(y)} labels for the {len(x)} images of {xp.name}")
        _check_labels(yp, y, 10)
    (xtr, _), (ytr, _), (xte, _), (yte, _) = (arrays[k] for k in _IDX)
    return Source(name, xtr[..., None], ytr.astype(np.int64), xte[..., None], yte.astype(np.int64), 10,
                  1.0 / 255.0, classes)
