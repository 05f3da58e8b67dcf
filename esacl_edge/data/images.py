"""Image files and geometry: sizes, channels, resizing, decoding, image-folder trees and Tiny-ImageNet.

The readers here decode only the files a :class:`~esacl_edge.data.sources.ReadOptions` keeps;
every problem with the user's files is one :class:`StreamError` that names the folder or file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import StreamError
from .sources import ReadOptions, Source, pick_per_class
from .stream import MAX_SIDE


# ---------------------------------------------------------------------------------------- geometry
def parse_image_size(text: str) -> tuple[int, int]:
    """``"32"`` -> (32, 32); ``"48x64"`` -> (48, 64) as (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text or "")
    size = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else None
    if size is None or not all(1 <= s <= MAX_SIDE for s in size):
        raise StreamError(f"--image-size must be N or HxW with sizes 1..{MAX_SIDE}, got {text!r}")
    return size


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of uint8 NHWC images to ``size`` = (H, W)."""
    import torch
    import torch.nn.functional as F

    if tuple(x.shape[1:3]) == size:
        return x
    out = np.empty((len(x), *size, x.shape[3]), np.uint8)
    for start in range(0, len(x), 4096):
        t = torch.from_numpy(x[start:start + 4096]).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[start:start + 4096] = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _to_channels(x: np.ndarray, channels: int | None) -> np.ndarray:
    """Grey <-> RGB; RGB to grey with the ITU-R 601 luma weights (as PIL's ``convert("L")``)."""
    if channels is None or x.shape[3] == channels:
        return x
    if x.shape[3] not in (1, 3):
        raise StreamError(f"--channels {channels}: the images have {x.shape[3]} channels; only greyscale and RGB "
                          "are converted")
    if channels == 3:
        return np.repeat(x, 3, axis=3)
    luma = x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def shape_images(x: np.ndarray, opts: ReadOptions) -> np.ndarray:
    """Apply the requested channels and size to in-memory images."""
    x = _to_channels(x, opts.channels)
    return _resize(x, opts.image_size) if opts.image_size else x


def _decode(paths: list[Path], opts: ReadOptions) -> np.ndarray:
    """Decode image files with PIL to one uint8 NHWC array (RGB unless 1 channel is asked for); errors name the file."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if opts.channels == 1 else "RGB"
    images, first = [], None
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if opts.image_size:
                    h, w = opts.image_size
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(im, np.uint8)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            raise StreamError(f"{path}: cannot read the image: {exc}") from None
        if first is None:
            first = (path, arr.shape)
        elif arr.shape != first[1]:
            raise StreamError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {first[0]} is "
                              f"{first[1][1]}x{first[1][0]}; pass --image-size to resize all images to one size")
        images.append(arr.reshape(arr.shape[0], arr.shape[1], -1))
    return np.stack(images)


def _decode_split(files: list[Path], labels: np.ndarray, limit: int | None, opts: ReadOptions,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Decode only the files that ``limit`` per class keeps."""
    keep = pick_per_class(labels, limit, rng)
    return _decode([files[i] for i in keep], opts), labels[keep].astype(np.int64)


# ---------------------------------------------------------------------------------------- image folders
def _image_folder(path: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files, labels and class names of an ImageFolder tree (one sub-folder per class)."""
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise StreamError(f"{path}: image folder not found")
    try:
        ds = ImageFolder(str(path), loader=str)
    except (FileNotFoundError, OSError) as exc:
        raise StreamError(f"{path}: not an image folder tree (one sub-folder of images per class): {exc}") from None
    files = [Path(p) for p, _ in ds.samples]
    return files, np.asarray([c for _, c in ds.samples], np.int64), list(ds.classes)


def _split_files(labels: np.ndarray, fraction: float, rng: np.random.Generator,
                 names: list[str], where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test indices: each class keeps at least one image on either side."""
    if not 0.0 < fraction < 1.0:
        raise StreamError(f"--test-fraction must be between 0 and 1, got {fraction}")
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise StreamError(f"{where / names[c]}: class {names[c]!r} has {len(idx)} image; a train/test "
                              "split needs at least 2 per class (or give train/ and test/ sub-folders)")
        n_test = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_folder_source(path: str | Path, opts: ReadOptions) -> Source:
    """An ImageFolder tree; ``PATH/train`` + ``PATH/test`` if both exist, else a seeded stratified split."""
    path = Path(path)
    rng = np.random.default_rng([opts.seed, 1])
    if (path / "train").is_dir() and (path / "test").is_dir():
        files, labels, names = _image_folder(path / "train")
        test_files, test_labels, test_names = _image_folder(path / "test")
        unknown = sorted(set(test_names) - set(names))
        if unknown:
            raise StreamError(f"{path / 'test'}: classes {unknown} have no folder in {path / 'train'}")
        test_labels = np.asarray([names.index(test_names[c]) for c in test_labels], np.int64)
    else:
        all_files, all_labels, names = _image_folder(path)
        tr, te = _split_files(all_labels, opts.test_fraction, rng, names, path)
        files, labels = [all_files[i] for i in tr], all_labels[tr]
        test_files, test_labels = [all_files[i] for i in te], all_labels[te]
    if len(names) < 2:
        raise StreamError(f"{path}: found {len(names)} class folder; a class-incremental stream needs at least 2")
    x_tr, y_tr = _decode_split(files, labels, opts.per_class, opts, rng)
    x_te, y_te = _decode_split(test_files, test_labels, opts.test_per_class, opts, rng)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise StreamError(f"{path}: train images are {x_tr.shape[1:]} but test images {x_te.shape[1:]}; "
                          "pass --image-size")
    return Source(path.name or "folder", x_tr, y_tr, x_te, y_te, len(names), 1.0 / 255.0, names)


# ---------------------------------------------------------------------------------------- Tiny-ImageNet
def load_tiny_imagenet_source(root: str | Path, opts: ReadOptions) -> Source:
    """The official ``tiny-imagenet-200`` folder: ``train/<wnid>/images``, ``val/images`` + annotations.

    The labelled val split is the test split; class names come from ``words.txt`` when present.
    """
    root = Path(root)
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    train_dir, val_dir = base / "train", base / "val"
    annotations = val_dir / "val_annotations.txt"
    if not train_dir.is_dir() or not annotations.is_file():
        raise StreamError(f"{root}: no Tiny-ImageNet here: expected tiny-imagenet-200/train/<wnid>/images and "
                          "tiny-imagenet-200/val/val_annotations.txt")
    files, labels, wnids = _image_folder(train_dir)
    if (base / "wnids.txt").is_file():
        listed = sorted((base / "wnids.txt").read_text().split())
        if listed != wnids:
            missing = sorted(set(listed) - set(wnids))[:5]
            raise StreamError(f"{train_dir}: class folders do not match {base / 'wnids.txt'}"
                              + (f" (missing e.g. {missing})" if missing else ""))
    index = {w: i for i, w in enumerate(wnids)}
    test_files, test_labels = [], []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise StreamError(f"{annotations}:{n}: expected 'FILE<TAB>WNID...' with a known wnid, got {line[:80]!r}")
        test_files.append(val_dir / "images" / parts[0])
        test_labels.append(index[parts[1]])
    names = wnids
    if (base / "words.txt").is_file():
        words = dict(line.split("\t", 1) for line in (base / "words.txt").read_text().splitlines() if "\t" in line)
        names = [words.get(w, w).split(",")[0].strip() for w in wnids]
    rng = np.random.default_rng([opts.seed, 1])
    x_tr, y_tr = _decode_split(files, labels, opts.per_class, opts, rng)
    x_te, y_te = _decode_split(test_files, np.asarray(test_labels, np.int64), opts.test_per_class, opts, rng)
    return Source("tiny-imagenet", x_tr, y_tr, x_te, y_te, len(wnids), 1.0 / 255.0, names)
