"""Speed of a channel-pruned snapshot rebuilt as a narrower dense network, against the dense network.

    python benchmarks/channel_speed.py --run RUN_DIR [--task N] [--batch 40] [--steps 40] --out channel-speed.json

Dense kernels do not get faster when weights are zero. A snapshot of a run pruned by whole channels
(``esacl-channels``) is rebuilt narrower by the structured export's ``shrink``, computing the same
function. This times on this machine, round-robin so that every variant sees the same machine state,
a training step (forward, backward, SGD update, on ``--batch`` samples: EsaCL trains 16 selected + 24
replayed per step) and a batch-1 forward of: the dense network, the snapshot at full shape (zeros:
what weight-level pruning runs), and the narrowed network. It prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from esacl_edge.deploy.snapshot import available_tasks, load_snapshot
from esacl_edge.deploy.structured import shrink
from esacl_edge.learn.cost import forward_flops


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a learn run folder (of esacl-channels)")
    parser.add_argument("--task", type=int, default=None, help="its snapshot to time (default: the last)")
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="channel-speed.json")
    args = parser.parse_args()
    task = max(available_tasks(args.run)) if args.task is None else args.task
    snapshot, meta = load_snapshot(args.run, task)
    spec = meta["spec"]
    h, w, c = spec.input_shape
    torch.manual_seed(0)
    variants = {"dense": spec.build(), "zeros at full shape": snapshot, "narrowed": shrink(snapshot)[0]}
    x = torch.rand(args.batch, c, h, w) * 255
    y = torch.randint(0, spec.num_classes, (args.batch,))
    with torch.no_grad():
        gap = float((variants["narrowed"].eval()(x) - snapshot.eval()(x)).abs().max())
    rows = {k: {"forward_mflops": forward_flops(m, (h, w, c)) / 1e6,
                "nonzero_params": sum(int(p.count_nonzero()) for p in m.parameters())} for k, m in variants.items()}
    optims = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in variants.items()}

    def step(k: str) -> None:
        m = variants[k].train()
        optims[k].zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        optims[k].step()

    def infer(k: str) -> None:
        with torch.no_grad():
            variants[k].eval()(x[:1])

    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in variants}
    for i in range(args.steps + 5):   # the first 5 rounds warm up
        for k in variants:
            t_train, t_infer = timed(lambda: step(k)), min(timed(lambda: infer(k)) for _ in range(5))
            if i >= 5:
                times[k]["train"].append(t_train)
                times[k]["infer"].append(t_infer)
    for k in variants:
        rows[k]["train_step_ms"] = 1e3 * float(np.median(times[k]["train"]))
        rows[k]["infer_ms"] = 1e3 * float(np.median(times[k]["infer"]))
    dense = rows["dense"]
    print(f"run {args.run}, task {task}, {spec.model}, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; narrowed vs snapshot max |logit gap| {gap:.2e}")
    print(f"{'variant':26} {'fwd MFLOPs':>11} {'nonzero params':>15} {'train step ms':>14} {'x dense':>8} "
          f"{'batch-1 fwd ms':>15} {'x dense':>8}")
    for k, r in rows.items():
        r["train_x_dense"] = r["train_step_ms"] / dense["train_step_ms"]
        r["infer_x_dense"] = r["infer_ms"] / dense["infer_ms"]
        print(f"{k:26} {r['forward_mflops']:11.2f} {r['nonzero_params']:15,} {r['train_step_ms']:14.2f} "
              f"{r['train_x_dense']:8.2f} {r['infer_ms']:15.3f} {r['infer_x_dense']:8.2f}")
    Path(args.out).write_text(json.dumps({"run": args.run, "task": task, "model": spec.model, "batch": args.batch,
                                          "steps": args.steps, "threads": torch.get_num_threads(),
                                          "max_logit_gap": gap, "variants": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
