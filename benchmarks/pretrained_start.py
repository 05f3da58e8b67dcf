"""Class-incremental learning from a pretrained start, on real colour photographs (CIFAR-100 as an npz).

Pretrain each backbone on classes 0-49 (``esacl-edge pretrain``), then learn classes 50-99 as 5 tasks
of 10 classes, side by side and seed-major: EsaCL at 90% sparsity and dense DER++, from scratch, from
the pretrained weights, and from them with a frozen prefix and latent replay. Prints a table and
writes ``OUT/pretrained_start.json``; runs already finished in OUT are reused (delete OUT to re-time).

    python benchmarks/pretrained_start.py --data ../shared/data/cifar100.npz --out bench-pretrained
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from esacl_edge.bench import _learn_in_subprocess, _stats, machine
from esacl_edge.cli import export_task
from esacl_edge.data.build import make_stream
from esacl_edge.device.profiles import load_profile, to_yaml
from esacl_edge.files import write_json
from esacl_edge.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy import latency_ms  # noqa: E402

FREEZE = {"resnet18_reduced": "layer4.0", "mobilenet_v3_small": "features.8", "resnet18": "layer4.0",
          "mobilenet_v3_large": "features.12", "mobilenet_v2": "features.14", "efficientnet_b0": "features.6"}
KEYS = ("final_acc_class_il", "final_acc_task_il", "forgetting_class_il", "train_flops", "train_seconds",
        "samples_per_second", "peak_memory_bytes", "buffer_capacity", "buffer_sample_bytes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="cifar100.npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--out", default="bench-pretrained")
    p.add_argument("--backbones", default="resnet18_reduced,mobilenet_v3_small")
    p.add_argument("--methods", default="esacl,derpp")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pretrain-classes", default="0-49")
    p.add_argument("--learn-classes", default="50-99")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--pretrain-per-class", type=int, default=400)
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--per-class", type=int, default=100, help="training images per class in the learned stream")
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--buffer-bytes", type=int, default=1_744_000, help="500 images with 100 logits each")
    p.add_argument("--latent", default="uint8", choices=("fp16", "uint8"))
    p.add_argument("--repeats", type=int, default=200, help="onnxruntime latency repeats")
    args = p.parse_args()

    out = Path(args.out)
    stream = out / "stream"
    if not (stream / "manifest.json").exists():
        make_stream(f"npz:{args.data}", stream, tasks=args.tasks, classes=args.learn_classes,
                    per_class=args.per_class, test_per_class=args.test_per_class, seed=0)
    profile = load_profile("cpu").replace(passes_per_chunk=args.passes)
    profile_path = out / "profile.yaml"
    profile_path.write_text(to_yaml(profile))
    backbones, methods = args.backbones.split(","), args.methods.split(",")

    pretrained = {}
    for b in backbones:
        weights = out / "pretrained" / f"{b}.pth"
        if not weights.with_name(weights.name + ".json").exists():
            print(f"pretraining {b} on classes {args.pretrain_classes}", flush=True)
            pretrain(args.data, b, weights, classes=args.pretrain_classes, epochs=args.pretrain_epochs,
                     per_class=args.pretrain_per_class, profile="cpu", seed=0, progress=False)
        pretrained[b] = json.loads(weights.with_name(weights.name + ".json").read_text())

    def configs(b: str) -> list[tuple[str, dict]]:
        w = str(out / "pretrained" / f"{b}.pth")
        return [("scratch", {}), ("pretrained", {"init": w}),
                (f"pretrained+frozen {FREEZE[b]}+{args.latent} latents",
                 {"init": w, "freeze_until": FREEZE[b], "latent_replay": args.latent})]

    runs = []
    for seed in range(args.seeds):  # seed-major: every configuration sees the same machine conditions
        for b in backbones:
            for config, options in configs(b):
                for m in methods:
                    sparsity = args.sparsity if m.startswith(("esacl", "sparcl")) else 0.0
                    tag = f"{b}_{config.split('+')[0]}{'_latent' if 'latent_replay' in options else ''}_{m}_seed{seed}"
                    run_dir = out / "runs" / tag
                    if (run_dir / "results.json").exists():
                        r = json.loads((run_dir / "results.json").read_text())
                    else:
                        print(f"seed {seed}: {b} {config} {m}", flush=True)
                        r = _learn_in_subprocess(stream, profile_path, run_dir, m, sparsity, seed,
                                                 {"model": b, "buffer_bytes": args.buffer_bytes, **options})
                    runs.append({"backbone": b, "config": config, "method": m, "seed": seed, "run": str(run_dir),
                                 **{k: r.get(k) for k in KEYS}, "diverged": r.get("diverged")})

    rows = summarize(runs)
    deployment = export_models(out, runs, args.tasks - 1, args.repeats)
    report = {"machine": machine(), "command": " ".join(sys.argv), "pretrained": pretrained, "rows": rows,
              "deployment": deployment, "runs": runs}
    write_json(out / "pretrained_start.json", report)
    print(format_table(rows, deployment))
    print(f"wrote {out / 'pretrained_start.json'}")


def summarize(runs: list[dict]) -> list[dict]:
    """Mean ± std per (backbone, config, method), with paired per-seed Class-IL differences to DER++ in the same
    configuration and to the same method from scratch."""
    by = {(r["backbone"], r["config"], r["method"], r["seed"]): r for r in runs}
    groups = list(dict.fromkeys((r["backbone"], r["config"], r["method"]) for r in runs))
    rows = []
    for b, config, m in groups:
        mine = [r for r in runs if (r["backbone"], r["config"], r["method"]) == (b, config, m)]
        row = {"backbone": b, "config": config, "method": m, "seeds": len(mine)}
        for k in KEYS:
            row[k] = _stats([np.nan if r[k] is None else r[k] for r in mine])

        def paired(other: tuple) -> list[float]:
            return [by[(b, config, m, r["seed"])]["final_acc_class_il"] - by[(*other, r["seed"])]["final_acc_class_il"]
                    for r in mine if (*other, r["seed"]) in by and r["final_acc_class_il"] is not None
                    and by[(*other, r["seed"])]["final_acc_class_il"] is not None]

        row["class_il_minus_derpp"] = paired((b, config, "derpp"))
        row["class_il_minus_scratch"] = paired((b, "scratch", m))
        rows.append(row)
    for row in rows:
        ref = next((x for x in rows if (x["backbone"], x["config"], x["method"]) == (row["backbone"], "scratch", "derpp")),
                   row)
        row["flops_ratio_to_derpp_scratch"] = row["train_flops"]["mean"] / ref["train_flops"]["mean"]
    return rows


def export_models(out: Path, runs: list[dict], task: int, repeats: int) -> list[dict]:
    """Seed 0's final model of every (backbone, config, method), exported (sparse ONNX) and timed in onnxruntime."""
    rows = []
    for r in runs:
        if r["seed"] != 0 or r.get("diverged"):
            continue
        path = out / "onnx" / f"{Path(r['run']).name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        info = export_task(r["run"], task, path)
        x = np.random.default_rng(0).uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)
        rows.append({"backbone": r["backbone"], "config": r["config"], "method": r["method"], "bytes": info["bytes"],
                     "gzip_bytes": info["gzip_bytes"], "max_abs_diff": info["max_abs_diff"],
                     "latency_ms_batch1": latency_ms(path, x, repeats)})
    return rows


def format_table(rows: list[dict], deployment: list[dict]) -> str:
    def ms(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
        return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"

    lines = ["| backbone | start | method | Class-IL % | Task-IL % | forgetting (CIL) | GFLOPs | FLOPs vs DER++ scratch "
             "| time s | samples/s | peak MB | buffer samples | CIL − DER++ (per seed) | CIL − scratch (per seed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = lambda d: " ".join(f"{100 * v:+.1f}" for v in d) or "—"  # noqa: E731
        lines.append(f"| {r['backbone']} | {r['config']} | {r['method']} | {ms(r['final_acc_class_il'])} | "
                     f"{ms(r['final_acc_task_il'])} | {ms(r['forgetting_class_il'])} | "
                     f"{r['train_flops']['mean'] / 1e9:,.0f} | {r['flops_ratio_to_derpp_scratch']:.3f} | "
                     f"{ms(r['train_seconds'], 1, 0)} | {r['samples_per_second']['mean']:.1f} | "
                     f"{r['peak_memory_bytes']['mean'] / 2 ** 20:.0f} | {r['buffer_capacity']['mean']:.0f} | "
                     f"{per(r['class_il_minus_derpp']) if r['method'] != 'derpp' else '—'} | "
                     f"{per(r['class_il_minus_scratch']) if r['config'] != 'scratch' else '—'} |")
    lines += ["", "| backbone | start | method | ONNX bytes | gzipped | ORT latency ms (batch 1, CPU) | parity |",
              "|---|---|---|---|---|---|---|"]
    for d in deployment:
        lines.append(f"| {d['backbone']} | {d['config']} | {d['method']} | {d['bytes']:,} | {d['gzip_bytes']:,} | "
                     f"{d['latency_ms_batch1']:.2f} | {d['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
