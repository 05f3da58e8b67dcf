"""Time ``make-stream`` and measure the stream's disk size for every data source.

Each source is written in its real on-disk format into ``--work`` first (untimed), from what is
on this machine: MNIST / Fashion-MNIST arrays (``--data``, npz files), Debian's Fashion-MNIST idx
files if installed, and the synthetic 32x32 colour set of ``synthetic_colour.py`` for the CIFAR,
Tiny-ImageNet and image-folder formats (no real colour data set is available here).

    python benchmarks/make_stream_sources.py --data /path/to/npz-folder --work /tmp/srcbench \\
        --out make_stream_sources.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic_colour

from esacl_edge.data.build import make_stream
from tests import formats

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
COLOUR_NAMES = [f"{c} {s}" for s in ("square", "disc") for c in ("red", "green", "blue", "yellow", "magenta")]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _double(x: np.ndarray) -> np.ndarray:
    """32x32 -> 64x64 by repeating pixels (Tiny-ImageNet's size)."""
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)


def prepare(data: Path, work: Path, seed: int) -> list[dict]:
    """Write each source's files (if not there yet); return the cases to time."""
    rng = np.random.default_rng(seed)
    cases = []
    mnist = data / "mnist.npz"
    if mnist.is_file():
        cases.append({"source": "npz (MNIST)", "dataset": f"npz:{mnist}", "what": "MNIST npz, 60k/10k"})
        raw = work / "mnist" / "MNIST" / "raw"
        if not raw.is_dir():
            with np.load(mnist) as d:
                formats.write_mnist(raw, d["x_train"], d["y_train"], d["x_test"], d["y_test"], gz=True)
        cases.append({"source": "mnist", "dataset": "mnist", "root": work / "mnist",
                      "what": "MNIST written as torchvision's gzipped idx files, 60k/10k"})
    if DEBIAN_FASHION.is_dir():
        cases.append({"source": "fashion-mnist", "dataset": "fashion-mnist", "root": DEBIAN_FASHION,
                      "what": "Debian dataset-fashion-mnist idx.gz, 60k/10k"})
    cifar = work / "cifar10"
    if not cifar.is_dir():
        x_tr, y_tr = synthetic_colour.make(5000, rng)
        x_te, y_te = synthetic_colour.make(1000, rng)
        formats.write_cifar(cifar, x_tr, y_tr, x_te, y_te, COLOUR_NAMES)
        fine_tr = (y_tr * 10 + rng.integers(0, 10, len(y_tr))).astype(np.int64)
        fine_te = (y_te * 10 + rng.integers(0, 10, len(y_te))).astype(np.int64)
        formats.write_cifar(work / "cifar100", x_tr, fine_tr, x_te, fine_te, [f"c{i}" for i in range(100)], fine=True)
    cases.append({"source": "cifar10", "dataset": "cifar10", "root": cifar,
                  "what": "synthetic colour 32x32 in CIFAR-10 python batches, 50k/10k"})
    cases.append({"source": "cifar100", "dataset": "cifar100", "root": work / "cifar100",
                  "what": "the same images in CIFAR-100 batches, 100 fine labels, 50k/10k"})
    tiny = work / "tiny"
    if not tiny.is_dir():
        x_tr, y_tr = synthetic_colour.make(50, rng, classes=200)
        x_te, y_te = synthetic_colour.make(10, rng, classes=200)
        formats.write_tiny_imagenet(tiny, _double(x_tr), y_tr, _double(x_te), y_te, [f"n{i:08d}" for i in range(200)])
    cases.append({"source": "tiny-imagenet", "dataset": "tiny-imagenet", "root": tiny, "image_size": "32",
                  "what": "tiny-imagenet-200 tree, 200 classes x 50 train / 10 val JPEGs of 64x64 (synthetic; "
                  "a tenth of the real train split), resized to 32"})
    folder = work / "folder"
    if not folder.is_dir():
        x, y = synthetic_colour.make(300, rng)
        sizes = rng.integers(32, 65, (len(y), 2))
        formats.write_folder(folder, x, y, COLOUR_NAMES, sizes=sizes)
    cases.append({"source": "folder", "dataset": f"folder:{folder}", "image_size": "32",
                  "what": "3,000 PNGs of 32..64 px (synthetic), 10 class folders, resized to 32, 20% test"})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with mnist.npz")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the source files and streams")
    parser.add_argument("--out", default="make_stream_sources.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in prepare(args.data, args.work, args.seed):
        out = args.work / "streams" / case["source"].split()[0]
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        m = make_stream(case["dataset"], out, tasks=5, chunk_size=64, seed=args.seed, root=case.get("root"),
                        image_size=case.get("image_size"))
        seconds = time.perf_counter() - start
        train = sum(len(t.chunks) for t in m.tasks)
        root = case.get("root") or Path(case["dataset"].split(":", 1)[1])
        rows.append({"source": case["source"], "what": case["what"], "seconds": round(seconds, 2),
                     "source_bytes": disk_bytes(root) if root.is_dir() else root.stat().st_size,
                     "stream_bytes": disk_bytes(out), "chunks": train, "input_shape": list(m.input_shape),
                     "classes": m.num_classes})
        r = rows[-1]
        print(f"{r['source']:<15}{r['seconds']:>8.1f} s{r['source_bytes'] / 2**20:>10.1f} MiB"
              f"{r['stream_bytes'] / 2**20:>10.1f} MiB {r['chunks']:>6} chunks  {tuple(r['input_shape'])}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| source | data | make-stream s | source MiB | stream MiB | chunks | input |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['what']} | {r['seconds']:.1f} | {r['source_bytes'] / 2**20:.1f} | "
              f"{r['stream_bytes'] / 2**20:.1f} | {r['chunks']:,} | {'x'.join(map(str, r['input_shape']))} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
