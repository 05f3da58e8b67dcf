"""Declared vs measured peak memory of `esacl-edge learn` under several profiles, each in its own process.

    python benchmarks/memory_budget.py --stream STREAM_DIR --profiles cpu,benchmarks/tight_cpu.yaml --out mem.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", required=True)
    parser.add_argument("--profiles", default="cpu,benchmarks/tight_cpu.yaml")
    parser.add_argument("--method", default="esacl")
    parser.add_argument("--out", default="memory_budget.json")
    args = parser.parse_args()
    rows = []
    for profile in args.profiles.split(","):
        with tempfile.TemporaryDirectory() as run:
            done = subprocess.run([sys.executable, "-W", "default", "-m", "esacl_edge.cli", "learn", "--stream",
                                   args.stream, "--profile", profile, "--run", run, "--method", args.method,
                                   "--quiet"], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{profile}: {done.stderr.strip().splitlines()[-1]}")
            r = json.loads((Path(run) / "results.json").read_text())
        warned = "exceeds budgets.training_peak_bytes" in done.stderr
        rows.append({"profile": profile, "batch_size": r["batch_size"], "buffer_capacity": r["buffer_capacity"],
                     "memory_budget_bytes": r["memory_budget_bytes"], "memory_estimate_bytes": r["memory_estimate_bytes"],
                     "peak_memory_bytes": r["peak_memory_bytes"], "warned": warned,
                     "final_acc_class_il": r["final_acc_class_il"], "train_seconds": r["train_seconds"]})
    print("| profile | batch | buffer samples | budget MiB | estimate MiB | measured MiB | measured/estimate | "
          "warned | Class-IL % |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = 2 ** 20
        print(f"| {r['profile']} | {r['batch_size']} | {r['buffer_capacity']:,} | {r['memory_budget_bytes'] / mib:,.0f} | "
              f"{r['memory_estimate_bytes'] / mib:,.0f} | {r['peak_memory_bytes'] / mib:,.0f} | "
              f"{r['peak_memory_bytes'] / r['memory_estimate_bytes']:.2f} | {'yes' if r['warned'] else 'no'} | "
              f"{100 * r['final_acc_class_il']:.1f} |")
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
