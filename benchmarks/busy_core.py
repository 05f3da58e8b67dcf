"""Learning beside a busy core: how the CPU thread policy degrades when another process computes.

A device learns beside its camera pipeline, which keeps cores busy. This runs the same short
``learn`` (reduced ResNet-18, EsaCL, colour photographs) in a fresh process for each thread
policy, once on an otherwise idle machine and once beside a busy-looping process per core given
by ``--busy`` (1 by default: one core of the machine taken), and prints the training time of
each, its ratio to the idle run of the same policy and to the best policy beside the busy core.

Policies: ``threads 0`` (PyTorch's default, one thread per core), ``threads 1``, ``threads N``
with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of spinning while they wait).

    python benchmarks/busy_core.py --data ../shared/data/cifar100.npz --out busy-core --repeats 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from esacl_edge.device.profiles import load_profile, to_yaml

PER_CLASS = 192  # 4 classes x 192 images, 12 chunks of 64, one pass: about 10 s of training on 2 idle cores

POLICIES = {
    "default (threads 0)": ({"threads": 0}, {}),
    "threads 1": ({"threads": 1}, {}),
    "threads = cores, OMP passive": ({"threads": 0}, {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def _spin() -> None:
    while True:
        pass


def make_stream(data: str, out: Path) -> Path:
    stream = out / "stream"
    if not (stream / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "esacl_edge.cli", "make-stream", "--dataset", f"npz:{data}", "--out",
                        str(stream), "--classes", "0-3", "--tasks", "2", "--per-class", str(PER_CLASS),
                        "--test-per-class", "20", "--chunk-size", "64", "--seed", "0"], check=True, capture_output=True)
    return stream


def profile(out: Path, name: str, threads: int) -> Path:
    path = out / f"{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '').replace('=', '')}.yaml"
    data = yaml.safe_load(to_yaml(load_profile("cpu")))
    data["name"] = "busy-core"
    data["training"].update(threads=threads, passes_per_chunk=1, batch_size=32)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def learn_seconds(stream: Path, prof: Path, run: Path, env: dict) -> float:
    cmd = [sys.executable, "-m", "esacl_edge.cli", "learn", "--stream", str(stream), "--run", str(run), "--profile",
           str(prof), "--model", "resnet18_reduced", "--overwrite", "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env})
    return json.loads((run / "results.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an npz data set of colour images (cifar100.npz)")
    parser.add_argument("--out", default="busy-core")
    parser.add_argument("--busy", type=int, default=1, help="busy-looping processes beside the run (default 1)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = make_stream(args.data, out)
    rows = []
    for load in ("idle", "busy"):
        busy = args.busy if load == "busy" else 0
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        time.sleep(0.5)
        try:
            for name, (fields, env) in POLICIES.items():
                prof = profile(out, name, fields["threads"])
                times = [learn_seconds(stream, prof, out / "run", env) for _ in range(args.repeats)]
                rows.append({"policy": name, "load": load, "seconds": times, "median": statistics.median(times)})
                each = ", ".join(f"{t:.1f}" for t in times)
                print(f"{load:<5} {name:<30} {statistics.median(times):8.1f} s  ({each})", flush=True)
        finally:
            for p in spinners:
                p.terminate()
    idle = {r["policy"]: r["median"] for r in rows if r["load"] == "idle"}
    best_busy = min(r["median"] for r in rows if r["load"] == "busy")
    print(f"\n{'policy':<30}{'idle s':>9}{'busy s':>9}{'busy/idle':>11}{'busy/best busy':>16}")
    for name in POLICIES:
        busy = next(r["median"] for r in rows if r["load"] == "busy" and r["policy"] == name)
        print(f"{name:<30}{idle[name]:>9.1f}{busy:>9.1f}{busy / idle[name]:>11.2f}{busy / best_busy:>16.2f}")
    report = {"cores": len(os.sched_getaffinity(0)), "busy_processes": args.busy, "repeats": args.repeats,
              "rows": rows}
    (out / "busy_core.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'busy_core.json'}")


if __name__ == "__main__":
    main()
