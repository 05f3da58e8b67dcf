#!/usr/bin/env python3
"""Run an esacl-edge ONNX artifact on a device with numpy and onnxruntime only (no PyTorch).

    python run_onnx.py MODEL.onnx --npz data.npz          # arrays x (N, H, W, C) [and y]
    python run_onnx.py MODEL.onnx --images DIR            # image files, or DIR/<class>/ files (needs Pillow)
    python run_onnx.py MODEL.onnx --random 64             # latency only

The sidecar MODEL.onnx.json (written by `esacl-edge export`) gives the input shape, class
names and the execution providers in preference order; unavailable providers are skipped
and the CPU provider is always last. Prints predictions, accuracy when labels are known,
and latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".gif", ".webp"}


def fail(message: str) -> None:
    print(f"run_onnx: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_sidecar(model: Path) -> dict:
    path = model.with_name(model.name + ".json")
    if not path.is_file():
        fail(f"{path}: sidecar not found (export with esacl-edge, which writes it next to the model)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        fail(f"{path}: not valid JSON: {exc}")


def providers_for(sidecar: dict, wanted: list[str] | None, cache: Path) -> list:
    """The sidecar's (or the user's) providers that this onnxruntime has, CPU last, with TensorRT options."""
    available = set(ort.get_available_providers())
    chosen = []
    for name in wanted or sidecar.get("providers") or ["CPUExecutionProvider"]:
        if name not in available or name == "CPUExecutionProvider":
            continue
        if name == "TensorrtExecutionProvider":
            cache.mkdir(parents=True, exist_ok=True)
            chosen.append((name, {"trt_fp16_enable": True, "trt_sparsity_enable": sidecar.get("pattern") == "2:4",
                                  "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}))
        else:
            chosen.append(name)
    return chosen + ["CPUExecutionProvider"]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            x_key = "x" if "x" in data.files else "x_test" if "x_test" in data.files else None
            if x_key is None:
                fail(f"{path}: needs an array 'x' (or 'x_test'), has {sorted(data.files)}")
            y_key = "y" if x_key == "x" else "y_test"
            return data[x_key], (data[y_key] if y_key in data.files else None)
    except ValueError as exc:
        fail(f"{path}: {'holds a pickled object array' if 'allow_pickle' in str(exc) else exc}")
    except OSError as exc:
        fail(f"{path}: not a readable .npz file: {exc}")


def load_images(folder: Path, sidecar: dict) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Images in ``folder`` (unlabelled) or in ``folder/<class>/`` (class index or name)."""
    try:
        from PIL import Image
    except ImportError:
        fail("--images needs Pillow (pip install pillow); or convert the images to an .npz with x, y")
    h, w, c = sidecar["input"]["stored_shape"]
    names = sidecar.get("class_names") or []
    files, labels = [], []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        files.append(path)
        parent = path.parent.name if path.parent != folder else None
        if parent is None:
            labels.append(-1)
        elif parent.isdigit():
            labels.append(int(parent))
        elif parent in names:
            labels.append(sidecar["classes"][names.index(parent)])
        else:
            fail(f"{path.parent}: folder name is neither a class index nor one of {names}")
    if not files:
        fail(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for path in files:
        try:
            img = Image.open(path).convert("L" if c == 1 else "RGB").resize((w, h))
        except OSError as exc:
            fail(f"{path}: not a readable image: {exc}")
        arrays.append(np.asarray(img, dtype=np.float32).reshape(h, w, c))
    y = np.array(labels) if min(labels) >= 0 else None
    return np.stack(arrays), y, [str(p) for p in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an esacl-edge ONNX model with onnxruntime.")
    parser.add_argument("model", type=Path)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", type=Path, help="arrays x (N, H, W, C) as stored, optional y")
    src.add_argument("--images", type=Path, help="folder of images, or of class folders")
    src.add_argument("--random", type=int, help="N random inputs (latency only)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1, help="passes over the data for latency (default 1)")
    parser.add_argument("--providers", help="comma-separated, overrides the sidecar's order")
    parser.add_argument("--show", type=int, default=10, help="predictions to print (default 10)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    if not args.model.is_file():
        fail(f"{args.model}: model file not found")
    sidecar = load_sidecar(args.model)
    h, w, c = sidecar["input"]["stored_shape"]
    names: list[str] = []
    if args.npz:
        x, y = load_npz(args.npz)
    elif args.images:
        x, y, names = load_images(args.images, sidecar)
    else:
        x = np.random.default_rng(0).uniform(0, 255, (args.random, h, w, c)).astype(np.float32)
        y = None
    if x.ndim != 4 or tuple(x.shape[1:]) != (h, w, c):
        fail(f"inputs have shape {tuple(x.shape)}, the model expects (N, {h}, {w}, {c})")
    x = np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2))

    providers = providers_for(sidecar, args.providers.split(",") if args.providers else None,
                              args.model.parent / "trt_cache")
    try:
        session = ort.InferenceSession(str(args.model), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        fail(f"{args.model}: onnxruntime cannot load it: {str(exc).splitlines()[0]}")
    session.run(None, {"input": x[: args.batch]})  # warm-up (and TensorRT engine build)
    latencies, logits = [], []
    for r in range(args.repeat):
        for i in range(0, len(x), args.batch):
            start = time.perf_counter()
            out = session.run(None, {"input": x[i:i + args.batch]})[0]
            latencies.append((time.perf_counter() - start) * 1e3)
            if r == 0:
                logits.append(out)
    pred = np.concatenate(logits).argmax(1)
    class_names = sidecar.get("class_names") or []
    classes = sidecar.get("classes") or []
    label = {cls: class_names[k] for k, cls in enumerate(classes)} if len(class_names) == len(classes) else {}
    for i in range(min(args.show, len(pred))):
        who = names[i] if names else f"#{i}"
        print(f"{who}: {pred[i]} {label.get(int(pred[i]), '')}".rstrip())
    summary = {"model": str(args.model), "samples": int(len(pred)), "batch": args.batch,
               "providers": session.get_providers(),
               "latency_ms": {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}}
    if y is not None:
        summary["accuracy"] = float((pred == y).mean())
        print(f"accuracy {100 * summary['accuracy']:.2f}% on {len(pred)} samples")
    lat = summary["latency_ms"]
    print(f"latency per batch of {args.batch}: p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, "
          f"p99 {lat['p99']:.3f} ms ({', '.join(summary['providers'])})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
