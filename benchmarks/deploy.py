"""Deployment variants of one task's model side by side: size, onnxruntime CPU latency, accuracy.

    python benchmarks/deploy.py --run RUN_DIR --task 4 --out deploy-out [--repeats 300]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from esacl_edge.cli import export_task
from esacl_edge.errors import ExportError

VARIANTS = ("dense", "sparse", "structured", "int8")


def latency_ms(path: Path, x_nchw: np.ndarray, repeats: int) -> float:
    """Median wall time of one session.run on ``x_nchw`` after a warm-up."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, {"input": x_nchw})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"input": x_nchw})
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--task", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--stream", help="stream for test accuracy (default: the one the run recorded)")
    parser.add_argument("--min-l1", type=float, default=0.0, help="also a lossy structured variant at this --min-l1")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    variants = [(v, v, 0.0) for v in VARIANTS]
    if args.min_l1 > 0:
        variants.append((f"structured-l1-{args.min_l1:g}", "structured", args.min_l1))
    for label, variant, min_l1 in variants:
        path = out / f"task{args.task}_{label}.onnx"
        try:
            r = export_task(args.run, args.task, path, variant, stream=args.stream, min_l1=min_l1)
        except ExportError as exc:
            rows.append({"variant": label, "error": str(exc)})
            continue
        rows.append({"variant": label, "bytes": r["bytes"], "gzip_bytes": r["gzip_bytes"],
                     "accuracy_torch": r.get("accuracy_torch"), "accuracy_onnx": r.get("accuracy_onnx"),
                     "max_abs_diff": r["max_abs_diff"], "structure": r.get("structure")})
    # Latency after all exports, interleaved per batch size so the variants share machine conditions.
    h, w, c = json.loads((out / f"task{args.task}_dense.onnx.json").read_text())["input"]["stored_shape"]
    rng = np.random.default_rng(0)
    for batch in (1, 32):
        x = rng.uniform(0, 255, (batch, c, h, w)).astype(np.float32)
        for row in rows:
            if "error" not in row:
                row[f"latency_b{batch}_ms"] = latency_ms(out / f"task{args.task}_{row['variant']}.onnx", x,
                                                         args.repeats)
    dense = next(r for r in rows if r["variant"] == "dense")
    print("| variant | bytes | gzipped | vs dense | batch 1 ms | batch 32 ms | speed-up b1 / b32 | accuracy % |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | n/a: {r['error'].split(': ', 1)[-1]} | | | | | | |")
            continue
        print(f"| {r['variant']} | {r['bytes']:,} | {r['gzip_bytes']:,} | {dense['bytes'] / r['bytes']:.1f}x smaller | "
              f"{r['latency_b1_ms']:.3f} | {r['latency_b32_ms']:.3f} | "
              f"{dense['latency_b1_ms'] / r['latency_b1_ms']:.2f}x / {dense['latency_b32_ms'] / r['latency_b32_ms']:.2f}x | "
              + (f"{100 * r['accuracy_onnx']:.2f} (PyTorch {100 * r['accuracy_torch']:.2f}) |"
                 if r["accuracy_onnx"] is not None else "n/a |"))
    (out / "deploy.json").write_text(json.dumps({"run": args.run, "task": args.task, "rows": rows}, indent=2))
    print(f"wrote {out / 'deploy.json'}")


if __name__ == "__main__":
    main()
