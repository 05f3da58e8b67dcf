"""Are two benches' runs identical? Compares each run's results.json between two bench folders.

Run a bench twice on the same stream with the same options (say before and after a change) and
compare: every run present in both is checked on the accuracy matrices, the accuracies and
forgetting, the training FLOPs and samples trained, the sparsity (overall and per layer), the
memory plan and the prune events, to the last digit (times and measured memory are left out).
Prints one row per run and writes ``--json``; exits 1 when any run differs or is missing.

    python benchmarks/compare_runs.py BEFORE_BENCH AFTER_BENCH --json identity.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("acc_matrix_class_il", "acc_matrix_task_il", "final_acc_class_il", "final_acc_task_il",
        "learning_acc_class_il", "forgetting_class_il", "bwt_class_il", "train_flops", "train_macs",
        "samples_trained", "samples_learned", "sparsity", "target_sparsity", "layer_sparsity", "model_bytes_sparse",
        "buffer_capacity", "buffer_size", "batch_size", "memory_terms", "prune_events", "complete")


def runs(bench: Path) -> dict[str, dict]:
    """results.json of every run in ``bench/runs``, by run folder name."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted((bench / "runs").glob("*/results.json"))}
    if not found:
        sys.exit(f"{bench}: no runs/*/results.json; give a bench output folder (its --out)")
    return found


def compare(before: dict[str, dict], after: dict[str, dict]) -> list[dict]:
    """One row per run: its method, seed, final Class-IL in each, and the keys that differ."""
    rows = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            rows.append({"run": name, "missing_in": "before" if a is None else "after", "differs": []})
            continue
        rows.append({"run": name, "method": a["method"], "seed": a["seed"],
                     "class_il_before": a["final_acc_class_il"], "class_il_after": b["final_acc_class_il"],
                     "train_flops": b["train_flops"], "sparsity": b["sparsity"],
                     "differs": [k for k in KEYS if a.get(k) != b.get(k)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="bench output folder (its --out)")
    p.add_argument("after", type=Path, help="bench output folder of the same bench, run again")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    rows = compare(runs(args.before), runs(args.after))
    print(f"{'run':<34} {'Class-IL before':>15} {'after':>8} {'GFLOPs':>9} {'sparsity':>8}  result")
    for r in rows:
        if "missing_in" in r:
            print(f"{r['run']:<34} {'':>15} {'':>8} {'':>9} {'':>8}  missing in {r['missing_in']}")
            continue
        verdict = "identical" if not r["differs"] else "DIFFERS: " + ", ".join(r["differs"])
        print(f"{r['run']:<34} {100 * r['class_il_before']:>15.2f} {100 * r['class_il_after']:>8.2f} "
              f"{r['train_flops'] / 1e9:>9.2f} {r['sparsity']:>8.4f}  {verdict}")
    bad = [r for r in rows if r["differs"] or "missing_in" in r]
    print(f"{len(rows) - len(bad)} of {len(rows)} runs identical")
    if args.json:
        args.json.write_text(json.dumps({"before": str(args.before), "after": str(args.after), "keys": KEYS,
                                         "runs": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
