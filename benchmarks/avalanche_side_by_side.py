"""esacl-edge's replay baselines beside Avalanche 0.6's on one stream and one model.

Optional, and in its own virtual environment: Avalanche is not a dependency of esacl-edge.

    python -m venv .venv-avalanche && . .venv-avalanche/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 avalanche-lib==0.6.0 && pip install -e .
    python benchmarks/avalanche_side_by_side.py --data ../shared/data --out avalanche --seeds 3

The stream is an online one in the protocol of Avalanche's reproducible baselines
(``experiments/split_cifar100/online_replay.py``): tasks in class order, every training image
seen once, minibatches of 10 new samples plus 10 replayed, SGD at lr 0.1 without
momentum, no augmentation. ``--member c100-online-10`` (the default) is CIFAR-100's classes 0-9 in
5 tasks of 2, 400 train / 100 test a class, a buffer of 1,000 samples; ``--member c100-online`` is
the suite's member (20 tasks of 5 classes, a buffer of 10,000). Both libraries train esacl-edge's
``resnet18_reduced`` (the same initialisation for a seed) on the same samples:

* esacl-edge: ``er``, ``er-ace`` and ``derpp`` through ``bench`` (reservoir buffer, replay batch as
  large as the new samples, chunks of 50 learned one by one, one pass), and ``er`` at half the
  learning rate: our replay loss is CE(new) + CE(replayed), twice the published ER's one
  cross-entropy over the concatenated batch, so ``er`` at lr/2 takes the published ER's steps;
* Avalanche: ``Naive`` + ``ReplayPlugin`` with a class-balanced buffer (its online replay baseline),
  ``ER_ACE`` and ``DER`` (α 0.3, β 1, as our ``derpp``), each task split into online experiences of
  10 samples.

It prints one table (final Class-IL over every class of the stream, per seed and mean ± std, training
seconds and samples/s) and writes ``OUT/side_by_side.json``; ``--resume`` keeps finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from suite import MEMBERS, Member, build_stream, buffer_bytes, run_member

SIDE_MEMBER = Member("c100-online-10", "cifar100.npz",
                     {"tasks": 5, "classes": list(range(10)), "per_class": 400, "test_per_class": 100,
                      "chunk_size": 50}, passes=1, batch_size=10, buffer_samples=1_000, lr=0.1)
OURS = ("er", "er-ace", "derpp")
THEIRS = ("avalanche-replay", "avalanche-er-ace", "avalanche-der")


def _task_arrays(stream: Path):
    """Each task's training samples in stream order, the test samples of every task, and the manifest."""
    from esacl_edge.data.stream import iter_chunks, load_test, read_manifest

    manifest = read_manifest(stream)
    tasks: dict[int, list] = {}
    for chunk in iter_chunks(manifest):
        tasks.setdefault(chunk.task, []).append((chunk.x, chunk.y))
    train = [(np.concatenate([x for x, _ in c]), np.concatenate([y for _, y in c])) for _, c in sorted(tasks.items())]
    tests = [load_test(manifest, t) for t in sorted(tasks)]
    test = (np.concatenate([x for x, _ in tests]), np.concatenate([y for _, y in tests]))
    return train, test, manifest


def _nchw(x: np.ndarray):
    import torch

    return torch.as_tensor(x).permute(0, 3, 1, 2).float()   # the model normalises inside (its first layer)


def _avalanche_run(strategy: str, member: Member, stream: Path, seed: int, threads: int) -> dict:
    """One Avalanche run; returns Class-IL at the end and the training time."""
    import torch

    warnings.filterwarnings("ignore", message="no QP solver")   # Avalanche's optional solvers, unused here
    warnings.filterwarnings("ignore", message="No loggers specified")   # accuracy is measured here, at the end
    from avalanche.benchmarks import benchmark_from_datasets, split_online_stream
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer
    from avalanche.training.supervised import DER, ER_ACE, Naive

    from esacl_edge.learn.state import Generators
    from esacl_edge.models import build_model

    torch.set_num_threads(threads)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    train, (x_test, y_test), manifest = _task_arrays(stream)
    datasets = [tensor_dataset(_nchw(x), torch.as_tensor(y, dtype=torch.long), task_labels=0) for x, y in train]
    scenario = benchmark_from_datasets(train=datasets)
    with torch.random.fork_rng(devices=[]):   # the initialisation esacl-edge's learner draws for this seed
        torch.set_rng_state(Generators.from_seed(seed).torch.get_state())
        model = build_model("resnet18_reduced", tuple(manifest.input_shape), manifest.num_classes,
                            manifest.normalization)
    optimizer = torch.optim.SGD(model.parameters(), lr=member.lr)
    mem, b = member.buffer_samples, member.batch_size
    common = dict(model=model, optimizer=optimizer, train_mb_size=b, train_epochs=1, eval_mb_size=256,
                  device="cpu", evaluator=EvaluationPlugin(loggers=[]))
    if strategy == "avalanche-replay":
        cl = Naive(**common, plugins=[ReplayPlugin(mem, batch_size_mem=b,
                                                   storage_policy=ClassBalancedBuffer(mem, adaptive_size=True))])
    elif strategy == "avalanche-er-ace":
        cl = ER_ACE(**common, mem_size=mem, batch_size_mem=b)
    else:
        cl = DER(**common, mem_size=mem, batch_size_mem=b, alpha=0.3, beta=1.0)
    online = split_online_stream(scenario.train_stream, experience_size=b, shuffle=True, seed=seed,
                                 access_task_boundaries=False)
    start = time.perf_counter()
    with warnings.catch_warnings():   # Avalanche re-enables its deprecation warnings on every experience
        warnings.showwarning = lambda *args, **kwargs: None
        for experience in online:
            cl.train(experience, eval_streams=[], num_workers=0, drop_last=False)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(_nchw(x_test[i: i + 512])).argmax(1) for i in range(0, len(y_test), 512)])
    learned = sum(len(y) for _, y in train)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"final_acc_class_il": float((pred.numpy() == y_test).mean()), "weights_finite": finite,
            "train_seconds": seconds,
            "samples_learned": learned, "samples_per_second": learned / seconds}


def _rows(ours: dict, theirs: dict[str, list[dict]]) -> list[dict]:
    """One row per library and method: Class-IL per seed (diverged runs counted apart), time, samples/s."""
    rows = []
    runs = {m: [r for r in ours["runs"] if r["label"] == m] for m in OURS}
    for library, by_method in (("esacl-edge", runs), ("Avalanche 0.6", theirs)):
        for method, all_runs in by_method.items():
            # A diverged run: ours stop with no accuracy, Avalanche's go on with weights that are not finite.
            rs = [r for r in all_runs if r.get("final_acc_class_il") is not None and r.get("weights_finite", True)]
            if not rs:
                rows.append({"library": library, "method": method, "class_il": [], "diverged": len(all_runs),
                             "mean": None, "std": None, "train_seconds": None, "samples_per_second": None})
                continue
            acc = [100 * r["final_acc_class_il"] for r in rs]
            rows.append({"library": library, "method": method, "class_il": acc, "diverged": len(all_runs) - len(rs),
                         "mean": statistics.fmean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
                         "samples_per_second": statistics.fmean(r["samples_per_second"] for r in rs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder with cifar100.npz")
    parser.add_argument("--out", default="avalanche")
    parser.add_argument("--member", default=SIDE_MEMBER.name, choices=[SIDE_MEMBER.name, "c100-online"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for Avalanche's runs (as ours use)")
    parser.add_argument("--resume", action="store_true", help="keep the runs finished into the same --out")
    args = parser.parse_args(argv)
    member = SIDE_MEMBER if args.member == SIDE_MEMBER.name else MEMBERS[args.member]
    out = Path(args.out)
    ours_dir = out / "esacl-edge"
    ours_dir.mkdir(parents=True, exist_ok=True)
    stream = build_stream(member, Path(args.data), ours_dir)
    half = dataclasses.replace(member, lr=member.lr / 2)   # our er taking the published ER's steps
    theirs: dict[str, list[dict]] = {s: [] for s in THEIRS}
    for seed in range(args.seeds):   # seed-major, so both libraries share the machine's conditions
        # Ours for this seed: the bench of seeds 0..seed keeps the earlier seeds' finished runs.
        keep = args.resume or seed > 0
        ours = run_member(member, Path(args.data), ours_dir, list(OURS), seed + 1, keep)
        ours_half = run_member(half, Path(args.data), out / "esacl-edge-half-lr", ["er"], seed + 1, keep)
        for strategy in THEIRS:
            path = out / "avalanche" / f"{strategy}_seed{seed}.json"
            if args.resume and path.is_file():
                r = json.loads(path.read_text())
            else:
                r = _avalanche_run(strategy, member, stream, seed, args.threads)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(r, indent=1))
            theirs[strategy].append(r)
            print(f"{strategy} seed {seed}: Class-IL {100 * r['final_acc_class_il']:.1f}%, "
                  f"{r['train_seconds']:.0f} s", flush=True)
    rows = _rows(ours, theirs)
    rows[1:1] = [{**row, "method": f"er at lr {half.lr:g} (the published ER's step)"}
                 for row in _rows(ours_half, {}) if row["method"] == "er"]
    report = {"member": member.name, "stream": str(stream.resolve()), "seeds": args.seeds,
              "buffer_samples": member.buffer_samples, "buffer_bytes": buffer_bytes(member, stream),
              "batch_size": member.batch_size, "lr": member.lr, "rows": rows}
    (out / "side_by_side.json").write_text(json.dumps(report, indent=1))
    print("| library | method | Class-IL % (seeds) | mean ± std | train s | samples/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        seeds = ", ".join(f"{a:.1f}" for a in r["class_il"]) + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        if r["mean"] is None:
            print(f"| {r['library']} | {r['method']} | {seeds} | — | — | — |")
            continue
        print(f"| {r['library']} | {r['method']} | {seeds} | {r['mean']:.1f} ± {r['std']:.1f} | "
              f"{r['train_seconds']:.0f} | {r['samples_per_second']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
