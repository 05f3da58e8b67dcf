#!/usr/bin/env python3
"""Run an esacl-edge ONNX artifact on a device with numpy and onnxruntime only (no PyTorch).

    esacl-edge-run MODEL.onnx --npz data.npz              # arrays x (N, H, W, C) [and y]
    esacl-edge-run MODEL.onnx --images DIR                # image files, or DIR/<class>/ files (needs Pillow)
    esacl-edge-run MODEL.onnx --random 64                 # latency only

(``python run_onnx.py ...`` where this one file was copied to a device without the package.)

The model file carries what this needs (input shape, classes and their names, execution
providers in preference order) in its metadata. A file without that metadata is described by
its sidecar MODEL.onnx.json; a sidecar that names another model's SHA-256 (the model was
replaced after it was written) is ignored with a warning. Unavailable providers are skipped
with a warning and the CPU provider is always last. Prints predictions, accuracy when labels
are known (with a warning when they include classes the model never learned), and latency
percentiles. This module imports nothing from esacl-edge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".gif", ".webp"}
METADATA_KEY = "esacl_edge"  # the model's metadata_props entry written by esacl-edge export


def fail(message: str) -> None:
    print(f"run_onnx: error: {message}", file=sys.stderr)
    sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def warn(message: str) -> None:
    print(f"run_onnx: warning: {message}", file=sys.stderr)


def load_info(model: Path) -> dict:
    """What esacl-edge export recorded about the model: the file's own metadata, else its sidecar."""
    path = model.with_name(model.name + ".json")
    sidecar = None
    if path.is_file():
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            warn(f"{path}: not valid JSON ({exc}); reading the model's own metadata")
        if isinstance(sidecar, dict) and sidecar.get("model_sha256") not in (None, _sha256(model)):
            warn(f"{path}: describes another model file (its SHA-256 differs from {model.name}'s); ignored")
            sidecar = None
    try:
        meta = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as exc:  # onnxruntime raises its own exception types
        fail(f"{model}: onnxruntime cannot load it: {str(exc).splitlines()[0]}")
    text = meta.custom_metadata_map.get(METADATA_KEY)
    if text is None:
        if isinstance(sidecar, dict):
            return sidecar
        fail(f"{model}: carries no esacl-edge metadata and has no matching sidecar {path.name} "
             "(export it with esacl-edge)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{model}: its esacl-edge metadata is not valid JSON: {exc}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def providers_for(info: dict, wanted: list[str] | None, cache: Path) -> list:
    """The model's (or the user's) providers that this onnxruntime has, CPU last, with TensorRT options."""
    available = set(ort.get_available_providers())
    if wanted:
        unknown = [name for name in wanted if name not in ort.get_all_providers()]
        if unknown:
            fail(f"--providers: unknown execution provider {', '.join(unknown)}; onnxruntime knows "
                 f"{', '.join(ort.get_all_providers())} (this build has {', '.join(ort.get_available_providers())})")
        missing = [name for name in wanted if name not in available]
        if missing:
            warn(f"--providers: this onnxruntime build lacks {', '.join(missing)}; skipped")
    chosen = []
    for name in wanted or info.get("providers") or ["CPUExecutionProvider"]:
        if name not in available or name == "CPUExecutionProvider":
            continue
        if name == "TensorrtExecutionProvider":
            cache.mkdir(parents=True, exist_ok=True)
            chosen.append((name, {"trt_fp16_enable": True, "trt_sparsity_enable": info.get("pattern") == "2:4",
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
            x, y = data[x_key], (data[y_key] if y_key in data.files else None)
    except ValueError as exc:
        fail(f"{path}: {'holds a pickled object array' if 'allow_pickle' in str(exc) else exc}")
    except OSError as exc:
        fail(f"{path}: not a readable .npz file: {exc}")
    if x.ndim >= 1 and x.shape[0] == 0:
        fail(f"{path}: {x_key} holds no samples")
    return x, y


def load_images(folder: Path, info: dict) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Images in ``folder`` (unlabelled) or in ``folder/<class>/`` (class index or name)."""
    try:
        from PIL import Image
    except ImportError:
        fail("--images needs Pillow (pip install pillow); or convert the images to an .npz with x, y")
    h, w, c = info["input"]["stored_shape"]
    names = info.get("class_names") or []
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
            labels.append(info["classes"][names.index(parent)])
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
    for stream in (sys.stdout, sys.stderr):  # a non-ASCII path under an ASCII locale prints escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = argparse.ArgumentParser(description="Run an esacl-edge ONNX model with onnxruntime.")
    parser.add_argument("model", type=Path)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", type=Path, help="arrays x (N, H, W, C) as stored, optional y")
    src.add_argument("--images", type=Path, help="folder of images, or of class folders")
    src.add_argument("--random", type=positive_int, help="N random inputs (latency only)")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--repeat", type=positive_int, default=1, help="passes over the data for latency (default 1)")
    parser.add_argument("--providers", help="comma-separated, overrides the model's order")
    parser.add_argument("--show", type=int, default=10, help="predictions to print (default 10)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    if not args.model.is_file():
        fail(f"{args.model}: model file not found")
    info = load_info(args.model)
    h, w, c = info["input"]["stored_shape"]
    names: list[str] = []
    if args.npz:
        x, y = load_npz(args.npz)
    elif args.images:
        x, y, names = load_images(args.images, info)
    else:
        x = np.random.default_rng(0).uniform(0, 255, (args.random, h, w, c)).astype(np.float32)
        y = None
    if x.ndim != 4 or tuple(x.shape[1:]) != (h, w, c):
        fail(f"inputs have shape {tuple(x.shape)}, the model expects (N, {h}, {w}, {c})")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        fail(f"{args.npz}: y must hold one integer label per sample of x, got {y.dtype} {tuple(y.shape)}")
    learned = info.get("classes") or []
    unknown = sorted(set(np.unique(y).tolist()) - set(learned)) if y is not None and learned else []
    if unknown:
        print(f"run_onnx: warning: labels include classes {unknown} that the model never learned (it learned "
              f"{learned}); their samples count as errors", file=sys.stderr)
    x = np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2))

    providers = providers_for(info, args.providers.split(",") if args.providers else None,
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
    class_names = info.get("class_names") or []
    classes = info.get("classes") or []
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
        try:
            args.json.write_text(json.dumps(summary, indent=2))
        except OSError as exc:
            fail(f"{args.json}: cannot write the summary ({exc.strerror or exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
