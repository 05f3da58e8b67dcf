"""Write uint8 NHWC arrays in the on-disk formats ``make-stream`` reads (tests and benchmarks).

CIFAR python batches, MNIST idx files (gzipped), an image-folder tree and a Tiny-ImageNet
tree, so every source is read from files really in its format.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                names: list[str], fine: bool = False) -> Path:
    """The official python layout: 5 train batches + test batch + meta (CIFAR-10) or train/test/meta (-100)."""
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key = "fine_labels" if fine else "labels"

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, key: [int(v) for v in y], "data": rows}, f)

    if fine:
        dump("train", x_train, y_train)
        dump("test", x_test, y_test)
        meta = {"fine_label_names": names, "coarse_label_names": names[:20]}
        meta_name = "meta"
    else:
        for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5), 1):
            dump(f"data_batch_{i}", x_train[part], y_train[part])
        dump("test_batch", x_test, y_test)
        meta, meta_name = {"label_names": names}, "batches.meta"
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of uint8 data (magic 0x0000080N, big-endian sizes); gzipped if ``path`` ends in .gz."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=6) if path.suffix == ".gz" else data)


def write_mnist(folder: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                gz: bool = True) -> Path:
    """The four idx files (as torchvision keeps them in ROOT/MNIST/raw, or Debian in one folder)."""
    ext = ".gz" if gz else ""
    for stem, arr in (("train-images-idx3-ubyte", x_train[..., 0]), ("train-labels-idx1-ubyte", y_train),
                      ("t10k-images-idx3-ubyte", x_test[..., 0]), ("t10k-labels-idx1-ubyte", y_test)):
        write_idx(folder / f"{stem}{ext}", arr.astype(np.uint8))
    return folder


def write_folder(root: Path, x: np.ndarray, y: np.ndarray, names: list[str], ext: str = "png",
                 sizes: np.ndarray | None = None) -> Path:
    """One sub-folder per class; image i resized to ``sizes[i]`` (H, W) when given."""
    for i, (img, label) in enumerate(zip(x, y)):
        im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        if sizes is not None:
            im = im.resize((int(sizes[i][1]), int(sizes[i][0])), Image.Resampling.BILINEAR)
        path = root / names[label] / f"img{i:06d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    return root


def write_tiny_imagenet(root: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                        y_test: np.ndarray, wnids: list[str]) -> Path:
    """``tiny-imagenet-200`` with wnids.txt, words.txt, train/<wnid>/images and val/images + annotations."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tclass {i}, synonym\n" for i, w in enumerate(wnids)))
    for i, (img, label) in enumerate(zip(x_train, y_train)):
        w = wnids[label]
        path = base / "train" / w / "images" / f"{w}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format="JPEG", quality=90)
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, label) in enumerate(zip(x_test, y_test)):
        Image.fromarray(img).save(base / "val" / "images" / f"val_{i}.JPEG", format="JPEG", quality=90)
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t{img.shape[1] - 1}\t{img.shape[0] - 1}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return root
