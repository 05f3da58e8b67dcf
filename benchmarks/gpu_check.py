"""Check the whole GPU training pipeline in one command: stream, learn per method and precision, export, JSON.

What it checks, each `esacl-edge learn` in its own process (so the CUDA allocator peak is per run):

1. `esacl-edge make-stream` writes OUT/stream (default: scikit-learn's bundled digits, so it runs offline).
2. For each --methods x --precisions: `esacl-edge learn --device cuda --precision P` into
   OUT/runs/METHOD-P-cuda, then the same methods once on the CPU in fp32 (OUT/runs/METHOD-fp32-cpu),
   the reference for the speed-up and the accuracy difference (with --cpu-only, the fp32 row is it).
3. From each run's results.json and metrics.jsonl: accuracy, samples/s, seconds per chunk (mean, median,
   median without the first chunk), peak memory against the profile's budget, the precision actually
   used, fp16 steps skipped for overflow and SAM steps left unperturbed.
4. `esacl-edge export` of the last task to OUT/onnx/NAME.onnx (parity with PyTorch on onnxruntime's CPU
   provider); where onnxruntime has the CUDAExecutionProvider, the file also runs on it and is compared
   with the CPU provider on the test inputs (max abs diff, top-1 agreement).
5. Host syncs per training step, in this process: a learner on the stream's first chunks, then
   `train_step` under `torch.cuda.set_sync_debug_mode("warn")`, counting the sync warnings.
6. OUT/gpu_check.json (written atomically) and a table. Exit status 1 if any run, export or sync check
   failed (the others still run), 2 on a usage error or without CUDA.

    python benchmarks/gpu_check.py --out gpu-check                                  # CUDA desktop, digits
    python benchmarks/gpu_check.py --profile jetson_orin --out gpu-check            # on a Jetson
    python benchmarks/gpu_check.py --dataset npz:/data/cifar100.npz --tasks 10 --per-class 100 \\
        --test-per-class 50 --model resnet18_reduced --passes 3 --out gpu-check-c100
    python benchmarks/gpu_check.py --cpu-only --out gpu-check-cpu                   # CPU smoke run (CI)

With --cpu-only the target rows run on the CPU in each precision (CPU autocast), the sync check is
skipped and the JSON says "cuda": false. OUT belongs to this script: its stream, runs and onnx
folders are replaced on every run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from esacl_edge import __version__
from esacl_edge.cli import export_task
from esacl_edge.data.stream import Manifest, iter_chunks, load_test, read_manifest
from esacl_edge.deploy.parity import max_abs_diff, onnx_logits, sample_inputs
from esacl_edge.errors import EsaclError
from esacl_edge.files import write_json
from esacl_edge.names import ABLATION_NAMES, METHOD_NAMES, MODEL_NAMES

PRECISIONS = ("fp32", "fp16", "bf16")
NO_CUDA = ("CUDA is not available here (torch.cuda.is_available() is False); run on a machine with an NVIDIA "
           "GPU, or pass --cpu-only for a CPU smoke run")
TAIL_CHARS = 2000  # of a failed command's stderr, kept in its row
SYNC_SITES = 5     # most frequent source lines of host syncs, kept per row
MIB = 2 ** -20


def _names(parser: argparse.ArgumentParser, option: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """Comma-separated names, each one of ``allowed`` (one usage error otherwise)."""
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        parser.error(f"{option}: {'unknown ' + ', '.join(bad) if bad else 'no names given'}; "
                     f"choose from {', '.join(allowed)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --methods and --precisions split and checked."""
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check", help="output folder (default: %(default)s)")
    p.add_argument("--dataset", default="digits", help="a make-stream data set: digits, npz:PATH, cifar100, ... "
                   "(default: %(default)s)")
    p.add_argument("--root", help="folder holding the data set (cifar10, cifar100, mnist, ...)")
    p.add_argument("--profile", default="cuda_desktop", help="device profile name or YAML (default: %(default)s)")
    p.add_argument("--model", choices=MODEL_NAMES, help="backbone (default: by input shape)")
    p.add_argument("--methods", default="esacl,derpp", help="comma-separated methods (default: %(default)s)")
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="comma-separated, of fp32, fp16, bf16 "
                   "(default: %(default)s)")
    p.add_argument("--tasks", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--per-class", type=int, help="training samples per class (default: all)")
    p.add_argument("--test-per-class", type=int, help="test samples per class (default: all)")
    p.add_argument("--chunk-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--passes", type=int, help="passes per chunk (default: the profile's)")
    p.add_argument("--seed", type=int, default=0, help="stream and learner seed (default: %(default)s)")
    p.add_argument("--sync-steps", type=int, default=10, help="training steps the host-sync count averages over "
                   "(default: %(default)s)")
    p.add_argument("--cpu-only", action="store_true", help="smoke run: the target rows on the CPU, no CUDA needed")
    args = p.parse_args(argv)
    args.methods = _names(p, "--methods", args.methods, METHOD_NAMES + ABLATION_NAMES)
    args.precisions = _names(p, "--precisions", args.precisions, PRECISIONS)
    if args.sync_steps < 1:
        p.error("--sync-steps must be >= 1")
    return args


def cli(*argv: str) -> subprocess.CompletedProcess:
    """``esacl-edge ARGV`` in a fresh Python process, output captured."""
    return subprocess.run([sys.executable, "-m", "esacl_edge.cli", *argv], capture_output=True, text=True)


def tail(done: subprocess.CompletedProcess) -> str:
    """The end of a failed command's stderr (stdout if it wrote nothing there)."""
    return (done.stderr.strip() or done.stdout.strip())[-TAIL_CHARS:]


def cuda_info(cpu_only: bool) -> dict:
    """Torch, CUDA and onnxruntime as this machine has them."""
    available = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": available and not cpu_only, "cuda_available": available,
            "gpu": torch.cuda.get_device_name() if available else None,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if available else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if available else None,
            "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
            "esacl_edge": __version__}


def make_stream(args: argparse.Namespace, folder: Path) -> Manifest:
    """``esacl-edge make-stream`` into ``folder`` (replacing an earlier one); raises EsaclError if it fails."""
    if folder.exists():
        shutil.rmtree(folder)
    argv = ["make-stream", "--dataset", args.dataset, "--out", str(folder), "--tasks", str(args.tasks),
            "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)]
    for option, value in (("--per-class", args.per_class), ("--test-per-class", args.test_per_class),
                          ("--root", args.root)):
        if value is not None:
            argv += [option, str(value)]
    done = cli(*argv)
    if done.returncode != 0:
        raise EsaclError(f"make-stream failed: {tail(done)}")
    return read_manifest(folder)


def stream_info(args: argparse.Namespace, manifest: Manifest) -> dict:
    """The stream as the JSON reports it."""
    return {"path": str(manifest.root), "dataset": args.dataset, "name": manifest.name,
            "input_shape": list(manifest.input_shape), "dtype": manifest.dtype, "num_classes": manifest.num_classes,
            "tasks": len(manifest.tasks), "chunks": sum(len(t.chunks) for t in manifest.tasks),
            "chunk_size": args.chunk_size, "per_class": args.per_class, "test_per_class": args.test_per_class}


def chunk_seconds(metrics: Path) -> dict:
    """Seconds per learned chunk from ``RUN/metrics.jsonl``: mean, median, median without the first (warm-up)."""
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text(encoding="utf-8").splitlines() if line]
    return {"chunks_timed": len(seconds),
            "seconds_per_chunk_mean": statistics.fmean(seconds) if seconds else None,
            "seconds_per_chunk_median": statistics.median(seconds) if seconds else None,
            "seconds_per_chunk_median_after_first": statistics.median(seconds[1:]) if len(seconds) > 1 else None}


RESULT_KEYS = ("final_acc_class_il", "final_acc_task_il", "train_seconds", "samples_per_second", "samples_learned",
               "peak_memory_bytes", "memory_budget_bytes", "memory_estimate_bytes", "overflow_skipped_steps",
               "unperturbed_sam_steps", "batch_size", "chunks_consumed", "tasks")


def learn(args: argparse.Namespace, stream: Path, run: Path, method: str, precision: str, device: str) -> dict:
    """One ``esacl-edge learn`` process; its row (with ``error`` when it failed)."""
    argv = ["learn", "--profile", args.profile, "--stream", str(stream), "--run", str(run), "--method", method,
            "--device", device, "--precision", precision, "--seed", str(args.seed), "--quiet", "--overwrite"]
    if args.passes is not None:
        argv += ["--passes", str(args.passes)]
    if args.model is not None:
        argv += ["--model", args.model]
    done = cli(*argv)
    row = {"method": method, "precision": precision, "device": device, "run": str(run),
           "warnings": [line.removeprefix("esacl-edge: warning: ") for line in done.stderr.splitlines()
                        if line.startswith("esacl-edge: warning: ")]}
    if done.returncode != 0:
        row["error"] = f"learn exited with status {done.returncode}: {tail(done)}"
        return row
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    row.update({k: results.get(k) for k in RESULT_KEYS}, device=results["device"],
               precision_used=results["precision"], **chunk_seconds(run / "metrics.jsonl"))
    budget = row["memory_budget_bytes"]
    row["peak_over_budget"] = row["peak_memory_bytes"] / budget if budget else None
    return row


def test_inputs(manifest: Manifest, run: Path, task: int) -> np.ndarray:
    """Stored (NHWC) test inputs of tasks 0..``task``; random ones in the stream's range where there are none."""
    parts = [load_test(manifest, t)[0] for t in range(task + 1) if manifest.tasks[t].test]
    if parts:
        return np.concatenate(parts)
    from esacl_edge.deploy.snapshot import load_snapshot

    return sample_inputs(load_snapshot(run, task)[1]["spec"], n=64)


def cuda_provider(path: Path, x_nhwc: np.ndarray, batch: int = 256) -> dict:
    """The exported file on onnxruntime's CUDA provider against its CPU provider (null with a reason where the
    CUDA provider is missing)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"cuda_provider": None, "cuda_provider_reason": "onnxruntime has no CUDAExecutionProvider here "
                f"(providers: {', '.join(ort.get_available_providers())})"}
    loaded = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"]).get_providers()
    if "CUDAExecutionProvider" not in loaded:
        return {"cuda_provider": None, "cuda_provider_reason": "the CUDAExecutionProvider did not load "
                f"(session providers: {', '.join(loaded)})"}
    got = onnx_logits(path, x_nhwc, batch, providers=("CUDAExecutionProvider",))
    want = onnx_logits(path, x_nhwc, batch)
    return {"cuda_provider": {"providers": loaded, "samples": len(x_nhwc)},
            "cuda_provider_max_abs_diff": max_abs_diff(got, want),
            "cuda_provider_top1_agreement": float((got.argmax(1) == want.argmax(1)).mean())}


EXPORT_KEYS = ("path", "variant", "opset", "task", "bytes", "gzip_bytes", "max_abs_diff", "accuracy_torch",
               "accuracy_onnx")


def export(manifest: Manifest, run: Path, path: Path) -> dict:
    """Export the run's last task (parity checked on the CPU provider), then compare the CUDA provider."""
    task = len(manifest.tasks) - 1
    try:
        report = export_task(run, task, path)
        return {**{k: report.get(k) for k in EXPORT_KEYS}, **cuda_provider(path, test_inputs(manifest, run, task))}
    except Exception as exc:  # export and onnxruntime raise many types; the check goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def host_syncs(args: argparse.Namespace, manifest: Manifest, method: str, precision: str) -> dict:
    """Host syncs per ``train_step`` on CUDA: a learner on the stream's first two chunks (so the replay buffer
    holds samples), one warm-up step, then ``--sync-steps`` steps on the next chunk's minibatches under
    ``torch.cuda.set_sync_debug_mode("warn")``."""
    from esacl_edge import StreamingLearner
    from esacl_edge.device.profiles import load_profile
    from esacl_edge.device.transfer import to_device
    from esacl_edge.learn.forward import minibatches
    from esacl_edge.learn.step import train_step
    from esacl_edge.runner import default_model

    profile = load_profile(args.profile).replace(device="cuda", precision=precision)
    if args.passes is not None:
        profile = profile.replace(passes_per_chunk=args.passes)
    learner = StreamingLearner(args.model or default_model(manifest.input_shape), profile, manifest.num_classes,
                               manifest.input_shape, method=method, input_dtype=manifest.dtype,
                               normalization=manifest.normalization, seed=args.seed)
    chunks = list(islice(iter_chunks(manifest), 3))
    for c in chunks[:-1][:2]:
        learner.observe(c.x, c.y, c.task, c.n_chunks, list(manifest.tasks[c.task].classes))
    c = chunks[-1]
    if c.task != learner.progress.task:
        learner.begin_task(c.task, c.n_chunks, list(manifest.tasks[c.task].classes))
    xt, yt = learner.to_device(c.x), to_device(c.y, learner.device)
    for part in learner.method.parts:
        part.begin_chunk(learner.ctx, len(c.y))
    learner.model.train()
    order = to_device(learner.rngs.order.permutation(len(c.y)), learner.device)
    batches = minibatches(order, learner.profile.batch_size)
    train_step(learner.ctx, learner.method, xt[batches[0]], yt[batches[0]], batches[0])  # warm-up: lazy initialisation
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(args.sync_steps):
                idx = batches[step % len(batches)]
                train_step(learner.ctx, learner.method, xt[idx], yt[idx], idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"host_syncs_per_step": len(syncs) / args.sync_steps, "host_sync_steps": args.sync_steps,
            "host_sync_sites": dict(sites.most_common(SYNC_SITES)), "buffer_size_at_sync_check": learner.buffer.size}


def ratios(rows: list[dict]) -> list[dict]:
    """Each target row against the CPU fp32 run of the same method: speed-up and accuracy difference."""
    ref = {r["method"]: r for r in rows if r["device"] == "cpu" and r["precision"] == "fp32" and "error" not in r}
    out = []
    for r in rows:
        if r["role"] != "target":
            continue
        c = ref.get(r["method"])
        ok = c is not None and "error" not in r
        out.append({"method": r["method"], "precision": r["precision"], "device": r["device"],
                    "speedup_vs_cpu_fp32": r["samples_per_second"] / c["samples_per_second"]
                    if ok and r.get("samples_per_second") and c.get("samples_per_second") else None,
                    "acc_class_il_diff_vs_cpu_fp32": r["final_acc_class_il"] - c["final_acc_class_il"]
                    if ok and r.get("final_acc_class_il") is not None and c.get("final_acc_class_il") is not None
                    else None,
                    "acc_task_il_diff_vs_cpu_fp32": r["final_acc_task_il"] - c["final_acc_task_il"]
                    if ok and r.get("final_acc_task_il") is not None and c.get("final_acc_task_il") is not None
                    else None})
    return out


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(rows: list[dict], speedups: list[dict]) -> None:
    """A compact table of the rows, the CPU fp32 reference runs last."""
    speedup = {(s["method"], s["precision"]): s["speedup_vs_cpu_fp32"] for s in speedups}
    head = ("method", "precision", "device", "Class-IL %", "samples/s", "s/chunk", "peak MB / budget MB",
            "skipped", "syncs/step", "vs CPU fp32")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append((r["method"], r["precision"], r["device"], "FAILED", *[""] * 6))
            continue
        s_chunk = r["seconds_per_chunk_median_after_first"] or r["seconds_per_chunk_median"]
        memory = f"{_fmt(r['peak_memory_bytes'], ',.0f', MIB)} / {_fmt(r['memory_budget_bytes'], ',.0f', MIB)}"
        ratio = speedup.get((r["method"], r["precision"]))
        lines.append((r["method"], r.get("precision_used", r["precision"]), r["device"],
                      _fmt(r["final_acc_class_il"], ".1f", 100), _fmt(r["samples_per_second"], ",.0f"),
                      _fmt(s_chunk, ".3f"), memory, str(r["overflow_skipped_steps"]),
                      _fmt(r.get("host_syncs_per_step"), ".1f"),
                      "ref" if r["role"] == "cpu_reference" else _fmt(ratio, ".2f") + ("x" if ratio else "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for r in rows:
        if "error" in r:
            print(f"{r['method']} {r['precision']} {r['device']}: {r['error'].splitlines()[-1]}", file=sys.stderr)
        elif "error" in r["export"]:
            print(f"{r['method']} {r['precision']} {r['device']}: export: {r['export']['error']}", file=sys.stderr)
        elif r.get("host_syncs_error"):
            print(f"{r['method']} {r['precision']}: sync check: {r['host_syncs_error']}", file=sys.stderr)


def failed(row: dict) -> bool:
    """Whether the row's learn, export or sync check failed."""
    return "error" in row or "error" in row.get("export", {}) or bool(row.get("host_syncs_error"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = cuda_info(args.cpu_only)
    if not info["cuda_available"] and not args.cpu_only:
        print(f"gpu_check: error: {NO_CUDA}", file=sys.stderr)
        return 2
    target = "cuda" if info["cuda"] else "cpu"
    out = Path(args.out)
    for name in ("runs", "onnx"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "onnx").mkdir(parents=True)
    try:
        manifest = make_stream(args, out / "stream")
    except EsaclError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 1
    plan = [("target", m, p, target) for m in args.methods for p in args.precisions]
    if target == "cuda" or "fp32" not in args.precisions:   # on the CPU, the fp32 target row is the reference
        plan += [("cpu_reference", m, "fp32", "cpu") for m in args.methods]
    rows = []
    for role, method, precision, device in plan:
        name = f"{method}-{precision}-{device}"
        print(f"learn {name} ...", flush=True)
        row = {"role": role, **learn(args, out / "stream", out / "runs" / name, method, precision, device)}
        row["export"] = {} if "error" in row else export(manifest, out / "runs" / name, out / "onnx" / f"{name}.onnx")
        row["host_syncs_per_step"] = None
        if role == "target" and not info["cuda"]:
            row["host_syncs_reason"] = "needs CUDA"
        elif role == "cpu_reference":
            row["host_syncs_reason"] = "CPU run"
        rows.append(row)
    for row in rows:  # in this process, after every learn, so no learn shares its GPU
        if row["role"] == "target" and info["cuda"]:
            print(f"host syncs {row['method']} {row['precision']} ...", flush=True)
            try:
                row.update(host_syncs(args, manifest, row["method"], row["precision"]))
            except Exception as exc:  # the learner raises many types; the other rows still count
                row["host_syncs_error"] = f"{type(exc).__name__}: {exc}"
    speedups = ratios(rows)
    report = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
              **info, "profile": args.profile, "model": args.model, "passes": args.passes, "seed": args.seed,
              "stream": stream_info(args, manifest), "runs": rows, "ratios": speedups,
              "failed": sum(map(failed, rows))}
    write_json(out / "gpu_check.json", report)
    print_table(rows, speedups)
    print(f"wrote {out / 'gpu_check.json'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
