"""Write a learnable synthetic 32x32 colour data set (uint8 NHWC npz) for the reduced ResNet-18.

Each class is a coloured shape (square, disc or bar in one of several colours) at a random
position and size on a noisy background, so accuracy means something without downloads.

    python benchmarks/synthetic_colour.py --out colour.npz --per-class 60 --test-per-class 40
"""

from __future__ import annotations

import argparse

import numpy as np

COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [230, 200, 40], [200, 60, 200]], np.float32)


def make(n: int, rng: np.random.Generator, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(classes), n)
    x = rng.normal(110, 30, (len(y), 32, 32, 3))
    yy, xx = np.mgrid[:32, :32]
    for i, c in enumerate(y):
        colour, shape = COLOURS[c % len(COLOURS)], c // len(COLOURS)
        r = rng.integers(5, 9)
        cy, cx = rng.integers(r, 32 - r, 2)
        inside = (np.hypot(yy - cy, xx - cx) <= r) if shape else (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        x[i][inside] = colour + rng.normal(0, 15, 3)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    x_train, y_train = make(args.per_class, rng)
    x_test, y_test = make(args.test_per_class, rng)
    np.savez_compressed(args.out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    print(f"wrote {args.out}: {len(y_train)} train, {len(y_test)} test images of 32x32x3")


if __name__ == "__main__":
    main()
