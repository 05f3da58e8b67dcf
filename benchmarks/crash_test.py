"""Crash test: SIGKILL a learn job at random moments, resume it each time, check exactly-once.

    python benchmarks/crash_test.py --dataset npz:PATH/mnist.npz --per-class 200 --kills 12

1. learns the stream once without interruption (the reference);
2. starts the same job on a second run folder, kills it with SIGKILL at a random moment of
   what is left, checks that the saved state and the snapshots load, and starts it again,
   until it has been killed ``--kills`` times; then lets it finish;
3. checks that every chunk was consumed exactly once and in order, and compares the final
   accuracy with the reference (same seed: it should be identical, not merely close).

Prints a table and writes ``OUT/crash_test.json``. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from esacl_edge import checkpoint
from esacl_edge.data.build import make_stream
from esacl_edge.data.stream import read_manifest
from esacl_edge.deploy.snapshot import available_tasks, load_snapshot
from esacl_edge.errors import CheckpointError


def learn_cmd(stream: Path, run: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "esacl_edge.cli", "learn", "--stream", str(stream), "--run", str(run),
            "--profile", args.profile, "--seed", str(args.seed), "--sparsity", str(args.sparsity), "--quiet"]


def consumed_now(run: Path) -> int:
    """Chunks in the latest saved state (the job must not be running: it deletes older states)."""
    latest = checkpoint.latest(run / "state") if (run / "state" / "LATEST").exists() else None
    return 0 if latest is None else len(checkpoint.read(latest)[2]["extra"]["consumed"])


def consumed_live(run: Path, last: int) -> int:
    """Like :func:`consumed_now` while the job runs: a state being replaced reads as ``last``."""
    try:
        return consumed_now(run)
    except (OSError, ValueError, KeyError, CheckpointError):
        return last


def check_loadable(run: Path) -> int:
    """Load the latest state and every snapshot (raises on anything unreadable); returns chunks consumed."""
    n = consumed_now(run)
    for task in available_tasks(run):
        load_snapshot(run, task)
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", help="digits or npz:PATH (default: %(default)s)")
    p.add_argument("--per-class", type=int, help="training samples per class")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--profile", default="cpu")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs before the job may finish (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="crash-test-out")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    stream = out / "stream"
    make_stream(args.dataset, stream, tasks=args.tasks, chunk_size=args.chunk_size, seed=0,
                per_class=args.per_class, test_per_class=args.test_per_class)
    manifest = read_manifest(stream)
    order = [c for t in manifest.tasks for c in t.chunks]

    start = time.monotonic()
    subprocess.run(learn_cmd(stream, out / "ref", args), check=True, stdout=subprocess.DEVNULL)
    per_chunk = (time.monotonic() - start) / len(order)
    ref = json.loads((out / "ref" / "results.json").read_text())

    # Each kill: wait until a random number of chunks is saved, then a random part of a chunk's time more,
    # so kills land anywhere: at start-up, mid-chunk, mid-save.
    rng = random.Random(args.seed)
    run, kills, starts = out / "crash", [], 0
    while True:
        starts += 1
        before = consumed_now(run)
        proc = subprocess.Popen(learn_cmd(stream, run, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if len(kills) < args.kills and before < len(order) - 1:
            spread = max(0, (len(order) - 1 - before) // (args.kills - len(kills)))  # room for the kills left
            target = before + rng.randint(0, spread)
            seen = before
            while proc.poll() is None and (seen := consumed_live(run, seen)) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, per_chunk))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                after = check_loadable(run)
                kills.append({"target_chunk": target, "consumed_before": before, "consumed_after": after})
                print(f"kill {len(kills):2d}: {before} -> {after} chunks saved", flush=True)
                continue
        proc.wait()
        if proc.returncode != 0:
            print(proc.stderr.read().decode(), file=sys.stderr)
            return 1
        if consumed_now(run) == len(order):
            break
    final = json.loads((run / "results.json").read_text())
    names = [c["chunk"] for c in final["consumed_chunks"]]
    checks = {
        "every chunk consumed exactly once, in order": names == order,
        "state and snapshots loadable": check_loadable(run) == len(order),
        "final accuracy equals the uninterrupted run": final["final_acc_class_il"] == ref["final_acc_class_il"],
    }
    report = {
        "command": " ".join(sys.argv), "chunks": len(order), "kills": kills, "starts": starts,
        "ref_final_acc_class_il": ref["final_acc_class_il"], "final_acc_class_il": final["final_acc_class_il"],
        "acc_difference": abs(final["final_acc_class_il"] - ref["final_acc_class_il"]), "checks": checks,
    }
    (out / "crash_test.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"{'stream chunks':<45}{len(order)}")
    print(f"{'SIGKILLs':<45}{len(kills)} ({starts} starts)")
    print(f"{'final Class-IL, uninterrupted':<45}{100 * ref['final_acc_class_il']:.2f}%")
    print(f"{'final Class-IL, killed and resumed':<45}{100 * final['final_acc_class_il']:.2f}%")
    for name, ok in checks.items():
        print(f"{name:<45}{'yes' if ok else 'NO'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
