"""The protocol suite: the stream shapes people run, each a bench of the same methods, one scoreboard.

Members (``MEMBERS``), all built from the data folder (``--data``: ``cifar100.npz``, ``mnist.npz``,
``fashion_mnist.npz``), every stream in class order:

* ``c100-10x10``: Split CIFAR-100, 10 tasks x 10 classes, 100 train / 50 test images a class, 3 passes,
  replay buffer 6,960,000 bytes (the stream the 0.8-0.13 defaults were tuned on);
* ``c100-5x2-a``, ``-b``, ``-c``: 5 tasks x 2 classes of three disjoint sets of 10 CIFAR-100 classes
  (``C5X2_CLASSES``), 300 / 100 a class, 3 passes, a buffer of 500 samples;
* ``c100-online``: online Split CIFAR-100 (the protocol of Avalanche's reproducible baselines): 20 tasks
  x 5 classes, every training image (400 a class) seen once, minibatches of 10 new samples (replay adds
  as many again), a buffer of 10,000 samples, SGD learning rate 0.1 without momentum;
* ``pretrained``: ``pretrain`` on classes 0-49 (400 a class, 5 epochs), then 5 tasks of classes 50-99
  (100 / 50 a class, 2 passes, buffer 1,744,000 bytes) from those weights;
* ``mnist``, ``fmnist``: Split-MNIST and Split-FashionMNIST, 5 tasks x 2 classes, 150 / 200 a class,
  the ``cpu`` profile's passes, buffer 166,400 bytes.

Every member runs ``esacl-edge bench`` into ``OUT/MEMBER`` (reduced ResNet-18 on the colour streams,
the small CNN on the grey ones, sparse methods at 90%); ``--resume`` keeps every run already finished
with the same settings. The scoreboard reads each member's ``bench.json``: per member and method,
Class-IL mean and std over seeds, the per-seed (paired) differences to ``derpp`` and ``sparcl``,
learned (the diagonal) and forgetting, FLOPs and time as ratios to ``derpp``, samples per second; then
the suite average of each method over the members it ran on. It prints the scoreboard and writes
``OUT/scoreboard.json``; a partial suite gives a partial scoreboard (``--scoreboard-only`` prints it
without running anything).

    python benchmarks/suite.py --data ../shared/data --out suite --resume
    python benchmarks/suite.py --data ../shared/data --out suite --members c100-online --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_METHODS = "derpp,esacl,esacl-channels-sqrt,er,er-ace,sparcl,finetune"
REFERENCES = ("derpp", "sparcl")  # paired differences are taken to these
# Three disjoint sets of 10 CIFAR-100 classes (label numbers in the npz's order) for the 5 x 2 members.
C5X2_CLASSES = {"a": list(range(0, 10)), "b": list(range(10, 20)), "c": list(range(20, 30))}


@dataclass(frozen=True)
class Member:
    """One stream of the suite and how the bench runs on it."""

    name: str
    data: str                        # file in the data folder
    stream: dict                     # make-stream options
    passes: int | None = None        # None: the profile's
    batch_size: int | None = None
    buffer_bytes: int | None = None
    buffer_samples: int | None = None  # the buffer given in samples, turned into bytes for the stream
    lr: float | None = None
    seeds: int = 3                   # 3 where a run takes under ~10 minutes on a 2-core CPU, else 2
    pretrain: dict = field(default_factory=dict)  # pretrain options; empty: learn from scratch


MEMBERS: dict[str, Member] = {m.name: m for m in [
    Member("c100-10x10", "cifar100.npz", {"tasks": 10, "per_class": 100, "test_per_class": 50}, passes=3,
           buffer_bytes=6_960_000),
    *(Member(f"c100-5x2-{key}", "cifar100.npz", {"tasks": 5, "classes": classes, "per_class": 300,
                                                  "test_per_class": 100}, passes=3, buffer_samples=500)
      for key, classes in C5X2_CLASSES.items()),
    Member("c100-online", "cifar100.npz", {"tasks": 20, "per_class": 400, "test_per_class": 100, "chunk_size": 50},
           passes=1, batch_size=10, buffer_samples=10_000, lr=0.1, seeds=2),
    Member("pretrained", "cifar100.npz", {"tasks": 5, "classes": list(range(50, 100)), "per_class": 100,
                                          "test_per_class": 50}, passes=2, buffer_bytes=1_744_000,
           pretrain={"classes": list(range(0, 50)), "per_class": 400, "epochs": 5}),
    Member("mnist", "mnist.npz", {"tasks": 5, "per_class": 150, "test_per_class": 200}, buffer_bytes=166_400),
    Member("fmnist", "fashion_mnist.npz", {"tasks": 5, "per_class": 150, "test_per_class": 200},
           buffer_bytes=166_400),
]}


def build_stream(member: Member, data: Path, out: Path) -> Path:
    """The member's stream in ``out/stream`` (made once; a stream made with other options is refused by make-stream)."""
    from esacl_edge.data.build import make_stream

    stream = out / "stream"
    if not (stream / "manifest.json").is_file():
        options = {"chunk_size": 64, "seed": 0, **member.stream}
        make_stream(f"npz:{data / member.data}", stream, **options)
    return stream


def buffer_bytes(member: Member, stream: Path) -> int | None:
    """The member's buffer budget in bytes (``buffer_samples`` at this stream's bytes per sample)."""
    if member.buffer_samples is None:
        return member.buffer_bytes
    from esacl_edge.data.stream import read_manifest
    from esacl_edge.learn.buffer import buffer_bytes_per_sample

    m = read_manifest(stream)
    return member.buffer_samples * buffer_bytes_per_sample(m.input_shape, m.dtype, m.num_classes)


def pretrained_weights(member: Member, data: Path, out: Path) -> Path | None:
    """The member's starting weights (pretrained once into ``out/weights.pth``), or None."""
    if not member.pretrain:
        return None
    from esacl_edge.pretrain import pretrain

    weights = out / "weights.pth"
    if not weights.is_file():
        pretrain(f"npz:{data / member.data}", "resnet18_reduced", weights, classes=member.pretrain["classes"],
                 per_class=member.pretrain["per_class"], epochs=member.pretrain["epochs"])
    return weights


def run_member(member: Member, data: Path, out: Path, methods: list[str], seeds: int | None, resume: bool) -> dict:
    """Bench ``methods`` on the member's stream into ``out``."""
    from esacl_edge.bench import bench
    from esacl_edge.device.profiles import load_profile
    from esacl_edge.runner import default_model
    from esacl_edge.data.stream import read_manifest

    out.mkdir(parents=True, exist_ok=True)
    stream = build_stream(member, data, out)
    changes = {k: v for k, v in (("passes_per_chunk", member.passes), ("batch_size", member.batch_size)) if v}
    profile = load_profile("cpu").replace(**changes)
    model = default_model(read_manifest(stream).input_shape)
    return bench(stream, methods, profile, out, sparsity=0.9, seeds=seeds or member.seeds,
                 buffer_bytes=buffer_bytes(member, stream), model=model, lr=member.lr,
                 init=pretrained_weights(member, data, out), resume=resume)


# ---------------------------------------------------------------------------------------------- scoreboard
def _mean_std(values: list[float]) -> dict:
    a = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    return {"mean": float(a.mean()) if len(a) else None, "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": int(len(a))}


def member_rows(report: dict) -> list[dict]:
    """One scoreboard row per method of one member's bench report."""
    runs = [r for r in report["runs"] if not r.get("diverged")]
    labels = list(dict.fromkeys(r["label"] for r in report["runs"]))
    by = {(r["label"], r["seed"]): r for r in runs}
    ref = {name: next((label for label in labels if label.split("@")[0] == name), None) for name in REFERENCES}
    means = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        means[label] = {key: _mean_std([r.get(key) for r in mine])["mean"]
                        for key in ("train_flops", "train_seconds")}
    rows = []
    for label in labels:
        mine = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        row = {"method": label, "seeds": len(mine),
               "diverged": sum(r["label"] == label and bool(r.get("diverged")) for r in report["runs"]),
               "class_il": {**_mean_std([r["final_acc_class_il"] for r in mine]),
                            "per_seed": [r["final_acc_class_il"] for r in mine], "seed_ids": [r["seed"] for r in mine]},
               "learned": _mean_std([r.get("learning_acc_class_il") for r in mine]),
               "forgetting": _mean_std([r.get("forgetting_class_il") for r in mine]),
               "samples_per_second": _mean_std([r.get("samples_per_second") for r in mine])}
        for name, other in ref.items():
            if other is None:
                continue
            seeds = sorted(s for lab, s in by if lab == label and (other, s) in by)
            diffs = [by[(label, s)]["final_acc_class_il"] - by[(other, s)]["final_acc_class_il"] for s in seeds]
            row[f"minus_{name}"] = {**_mean_std(diffs), "per_seed": diffs}
        if ref["derpp"] is not None:
            for key, name in (("train_flops", "flops_x_derpp"), ("train_seconds", "time_x_derpp")):
                base, mine_mean = means[ref["derpp"]][key], means[label][key]
                row[name] = mine_mean / base if base and mine_mean is not None else None
        rows.append(row)
    return rows


def scoreboard(out: Path, members: list[str]) -> dict:
    """Every member's rows that has a bench.json, and the suite average of each method over the members it
    ran on (means of the member means; paired differences averaged the same way)."""
    board = {}
    for name in members:
        path = out / name / "bench.json"
        if path.is_file():
            board[name] = member_rows(json.loads(path.read_text()))
    average: dict[str, dict] = {}
    for rows in board.values():
        for row in rows:
            acc = average.setdefault(row["method"], {"members": 0, "class_il": [], "minus_derpp": [],
                                                     "minus_sparcl": []})
            acc["members"] += 1
            acc["class_il"].append(row["class_il"]["mean"])
            for key in ("minus_derpp", "minus_sparcl"):
                if key in row:
                    acc[key].append(row[key]["mean"])
    suite = {method: {"members": acc["members"], **{key: _mean_std(acc[key])["mean"] for key in
                                                     ("class_il", "minus_derpp", "minus_sparcl")}}
             for method, acc in average.items()}
    return {"members": board, "suite_average": suite}


def _pct(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}")


def format_scoreboard(board: dict) -> str:
    lines = [f"{'member':<14}{'method':<24}{'Class-IL %':>14}{'- DER++':>9}{'- SparCL':>10}{'learned':>9}"
             f"{'forget':>8}{'FLOPs x':>9}{'time x':>8}{'samples/s':>11}  per-seed - DER++"]
    for member, rows in board["members"].items():
        for row in rows:
            c = row["class_il"]
            d, s = row.get("minus_derpp"), row.get("minus_sparcl")
            per_seed = " ".join(_pct(v, True) for v in d["per_seed"]) if d else ""
            flops, time_x = row.get("flops_x_derpp"), row.get("time_x_derpp")
            lines.append(f"{member:<14}{row['method']:<24}{_pct(c['mean']) + ' ±' + _pct(c['std']):>14}"
                         f"{_pct(d and d['mean'], True):>9}{_pct(s and s['mean'], True):>10}"
                         f"{_pct(row['learned']['mean']):>9}{_pct(row['forgetting']['mean']):>8}"
                         f"{'-' if flops is None else f'{flops:.3f}':>9}{'-' if time_x is None else f'{time_x:.2f}':>8}"
                         f"{row['samples_per_second']['mean'] or 0:>11.1f}  {per_seed}")
    lines.append("")
    lines.append(f"{'suite average':<14}{'method':<24}{'members':>8}{'Class-IL %':>12}{'- DER++':>9}{'- SparCL':>10}")
    for method, row in board["suite_average"].items():
        lines.append(f"{'':<14}{method:<24}{row['members']:>8}{_pct(row['class_il']):>12}"
                     f"{_pct(row['minus_derpp'], True):>9}{_pct(row['minus_sparcl'], True):>10}")
    return "\n".join(lines)


def format_markdown(board: dict) -> str:
    """The scoreboard as Markdown: one table per member, then the suite average."""
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = []
    for member, rows in board["members"].items():
        lines += [f"**{member}**", "",
                  "| method | Class-IL % (per seed) | − DER++ (mean; per seed) | − SparCL | learned % | forgetting % "
                  "| FLOPs × DER++ | time × DER++ | samples/s |", "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            c, d, s = row["class_il"], row.get("minus_derpp"), row.get("minus_sparcl")
            seeds = ", ".join(_pct(v) for v in c.get("per_seed", []))
            diverged = f"; {row['diverged']} diverged" if row.get("diverged") else ""
            versus = "—" if not d or row["method"] == "derpp" else \
                f"{_pct(d['mean'], True)}; {', '.join(_pct(v, True) for v in d['per_seed'])}"
            versus_s = "—" if not s or row["method"].startswith("sparcl") else _pct(s["mean"], True)
            lines.append(f"| {row['method']} | {_pct(c['mean'])} ± {_pct(c['std'])} ({seeds}{diverged}) | {versus} "
                         f"| {versus_s} | {_pct(row['learned']['mean'])} | {_pct(row['forgetting']['mean'])} "
                         f"| {num(row.get('flops_x_derpp'), '.3f')} | {num(row.get('time_x_derpp'), '.2f')} "
                         f"| {num(row['samples_per_second']['mean'], '.1f')} |")
        lines.append("")
    lines += ["**suite average** (means of the member means)", "",
              "| method | members | Class-IL % | − DER++ | − SparCL |", "|---|---|---|---|---|"]
    for method, row in board["suite_average"].items():
        lines.append(f"| {method} | {row['members']} | {_pct(row['class_il'])} | {_pct(row['minus_derpp'], True)} "
                     f"| {_pct(row['minus_sparcl'], True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the protocol suite and print its scoreboard.")
    parser.add_argument("--data", required=True, help="folder with cifar100.npz, mnist.npz, fashion_mnist.npz")
    parser.add_argument("--out", default="suite")
    parser.add_argument("--members", default=",".join(MEMBERS), help=f"comma-separated (default: all: "
                        f"{', '.join(MEMBERS)})")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default: {DEFAULT_METHODS})")
    parser.add_argument("--seeds", type=int, help="seeds for every member instead of each member's own")
    parser.add_argument("--resume", action="store_true", help="keep the runs already finished with these settings")
    parser.add_argument("--scoreboard-only", action="store_true", help="print the scoreboard of what has run")
    parser.add_argument("--markdown", action="store_true", help="print the scoreboard as Markdown tables")
    args = parser.parse_args(argv)
    members = args.members.split(",")
    unknown = [m for m in members if m not in MEMBERS]
    if unknown:
        parser.error(f"unknown members {', '.join(unknown)}; choose from {', '.join(MEMBERS)}")
    out, data = Path(args.out), Path(args.data)
    if not args.scoreboard_only:
        for name in members:
            print(f"== {name}", flush=True)
            run_member(MEMBERS[name], data, out / name, args.methods.split(","), args.seeds, args.resume)
            board = scoreboard(out, members)  # a partial scoreboard after every member
            (out / "scoreboard.json").write_text(json.dumps(board, indent=2))
    board = scoreboard(out, members)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoreboard.json").write_text(json.dumps(board, indent=2))
    print(format_markdown(board) if args.markdown else format_scoreboard(board))
    print(f"wrote {out / 'scoreboard.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
