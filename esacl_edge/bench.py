"""``esacl-edge bench``: several methods on one stream and the same seeds, interleaved, in one table.

Each run is a separate ``esacl-edge learn`` process, so its measured peak memory is its own.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .data.build import make_stream
from .data.stream import read_manifest
from .device.profiles import Profile, to_yaml
from .errors import EsaclError
from .files import atomic_write, read_json, write_json
from .learn.methods import get_method
from .models import check_input


def parse_method(spec: str, default_sparsity: float) -> tuple[str, str, float]:
    """``esacl`` or ``esacl@0.75`` -> (label, method, sparsity); dense methods get sparsity 0."""
    name, _, sp = spec.partition("@")
    method = get_method(name)
    try:
        sparsity = float(sp) if sp else default_sparsity
    except ValueError:
        raise EsaclError(f"--methods: {spec!r}: sparsity after '@' must be a number") from None
    if not method.sparse:
        return name, name, 0.0
    if not 0.0 <= sparsity < 1.0:
        where = f"--methods: {spec!r}: sparsity after '@'" if sp else "--sparsity"
        raise EsaclError(f"{where} must be in [0, 1), got {sparsity:g}")
    return f"{name}@{sparsity:g}", name, sparsity


def plan_runs(methods: list[str], sparsity: float, seeds: int,
              buffer_bytes: int | None = None) -> list[tuple[str, str, float]]:
    """Check a bench's settings before anything is made; (label, method, sparsity) per entry."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise EsaclError(f"--seeds must be an integer >= 1 (seeds 0..N-1), got {seeds!r}")
    if buffer_bytes is not None and buffer_bytes < 0:
        raise EsaclError(f"--buffer-bytes must be >= 0, got {buffer_bytes}")
    specs = [parse_method(m, sparsity) for m in methods]
    labels = [label for label, _, _ in specs]
    if len(set(labels)) != len(labels):
        raise EsaclError(f"--methods lists the same run twice: {', '.join(labels)}")
    return specs


def _dataset_key(dataset: str) -> str:
    """``dataset`` with the path of ``npz:``/``folder:`` made absolute, to compare across working folders."""
    kind, sep, path = dataset.partition(":")
    return f"{kind}:{Path(path).resolve()}" if sep and kind in ("npz", "folder") else dataset


def bench_stream(stream: str | Path, dataset: str, *, root: str | Path | None = None, **options) -> Path:
    """Make ``stream`` from ``dataset`` (seed 0, make-stream ``options``), recording the options beside it
    in ``STREAM-options.json``; a stream already there is reused only if it was made with the same ones."""
    stream = Path(stream)
    record = stream.parent / f"{stream.name}-options.json"
    wanted = {"dataset": _dataset_key(dataset), "root": str(Path(root).resolve()) if root is not None else None,
              "seed": 0, **options}
    if not (stream / "manifest.json").exists():
        make_stream(dataset, stream, seed=0, root=root, **options)
        write_json(record, wanted)
        return stream
    if not record.is_file():
        raise EsaclError(f"{stream}: holds a stream without {record.name}, the record of the options it was made "
                         f"with; pass --stream {stream} to use it, or choose another --out")
    made = read_json(record, EsaclError)
    made = made if isinstance(made, dict) else {}
    if made != wanted:
        diff = "; ".join(f"--{k.replace('_', '-')}: made with {made.get(k, 'unknown')}, asked {v}"
                         for k, v in wanted.items() if made.get(k, "unknown") != v)
        raise EsaclError(f"{stream}: was made with other options ({diff}); choose another --out, remove {stream}, "
                         f"or pass --stream {stream} to use it as it is")
    return stream


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "esacl_edge": __version__}


METRICS = ("final_acc_class_il", "final_acc_task_il", "forgetting_class_il", "bwt_class_il", "learning_acc_class_il",
           "learning_acc_task_il", "train_seconds", "samples_per_second", "train_flops", "train_macs",
           "peak_memory_bytes", "model_bytes_sparse", "model_bytes_dense", "buffer_bytes", "sparsity",
           "samples_trained")
COLUMNS = [("final_acc_class_il", "Class-IL %", 100, 1), ("final_acc_task_il", "Task-IL %", 100, 1),
           ("learning_acc_task_il", "Learned %", 100, 1), ("forgetting_class_il", "Forget %", 100, 1),
           ("train_flops", "GFLOPs", 1e-9, 1), ("train_seconds", "Time s", 1, 1),
           ("samples_per_second", "Samples/s", 1, 1), ("peak_memory_bytes", "Peak MB", 2 ** -20, 0)]


def _stats(vals: list[float]) -> dict:
    """Mean and std of the values that exist (a diverged run has none); NaN when none does."""
    a = np.array(vals, dtype=float)
    a = a[~np.isnan(a)]
    return {"mean": float(a.mean()) if len(a) else float("nan"), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def summarize(runs: list[dict], labels: list[str]) -> list[dict]:
    """Mean and std per label over seeds; FLOP and time ratios to the first label, and the per-seed
    (paired) Class-IL difference to it."""
    rows = []
    by_seed = {(r["label"], r["seed"]): r for r in runs}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        row: dict = {"label": label, "seeds": len(mine), "diverged": sum(bool(r.get("diverged")) for r in mine)}
        for key in METRICS:
            row[key] = _stats([r[key] if r.get(key) is not None else np.nan for r in mine])
        rows.append(row)
    ref = rows[0]
    for row in rows:
        row["flops_ratio_to_first"] = row["train_flops"]["mean"] / max(ref["train_flops"]["mean"], 1e-30)
        row["time_ratio_to_first"] = row["train_seconds"]["mean"] / max(ref["train_seconds"]["mean"], 1e-30)
        seeds = sorted(s for label, s in by_seed if label == row["label"] and (ref["label"], s) in by_seed
                       and by_seed[(label, s)].get("final_acc_class_il") is not None
                       and by_seed[(ref["label"], s)].get("final_acc_class_il") is not None)
        diffs = [by_seed[(row["label"], s)]["final_acc_class_il"] - by_seed[(ref["label"], s)]["final_acc_class_il"]
                 for s in seeds]
        row["class_il_minus_first"] = {**_stats(diffs), "per_seed": diffs}
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'method':<20}" + "".join(f"{title:>17}" for _, title, _, _ in COLUMNS)
            + f"{'FLOPs x':>9}{'time x':>8}{'CIL - 1st (per seed)':>34}")
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = "".join(f"{row[k]['mean'] * s:>10.{d}f}" + (f" ±{row[k]['std'] * s:<6.{d}f}" if row["seeds"] > 1
                                                          else " " * 8) for k, _, s, d in COLUMNS)
        paired = " ".join(f"{100 * d:+.1f}" for d in row["class_il_minus_first"]["per_seed"])
        label = row["label"] + (f" ({row['diverged']} diverged)" if row.get("diverged") else "")
        lines.append(f"{label:<20}{cells}{row['flops_ratio_to_first']:>9.3f}{row['time_ratio_to_first']:>8.2f}"
                     f"{paired:>34}")
    return "\n".join(lines)


def _learn_in_subprocess(stream: Path, profile_path: Path, run_dir: Path, name: str, sparsity: float, seed: int,
                         options: dict) -> dict:
    cmd = [sys.executable, "-m", "esacl_edge.cli", "learn", "--stream", str(stream), "--profile", str(profile_path),
           "--run", str(run_dir), "--method", name, "--sparsity", repr(sparsity), "--seed", str(seed),
           "--overwrite", "--quiet"]
    for key, value in options.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("esacl-edge: error: ")
        if "training diverged" in last:  # a result of the method, not a failure of the bench
            return {"seed": seed, "method": name, "diverged": last}
        raise EsaclError(f"run {name} seed {seed} failed: {last}")
    return json.loads((run_dir / "results.json").read_text())


def _finished_run(run_dir: Path, name: str, sparsity: float, seed: int, stream: Path, profile_text: str,
                  options: dict) -> dict | None:
    """The results of a completed run in ``run_dir`` made with these settings, None if it did not finish;
    an error if it finished with other settings (reusing it would mix two benches)."""
    try:
        r = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not r.get("complete"):
        return None
    # Every learn option is in the run's settings; an unset model or buffer means the default it resolved to.
    wanted = {"method": name, "seed": seed, "sparsity": sparsity,
              **{k: v for k, v in options.items() if v is not None or k not in ("model", "buffer_bytes")}}
    settings = r.get("settings", {})
    differ = [k for k, v in wanted.items() if settings.get(k) != v]
    differ += [k for k, v in (("stream", str(stream.resolve())), ("esacl_edge_version", __version__))
               if r.get(k) != v]
    if not (run_dir / "profile.yaml").is_file() or (run_dir / "profile.yaml").read_text() != profile_text:
        differ.append("profile")
    if differ:
        raise EsaclError(f"{run_dir / 'results.json'}: cannot resume, this run was made with another "
                         f"{', '.join(differ)}; use a new --out")
    return {**r, "reused": True}


def bench(stream: str | Path, methods: list[str], profile: Profile, out: str | Path, sparsity: float = 0.9,
          seeds: int = 3, buffer_bytes: int | None = None, model: str | None = None, anytime: bool = False,
          plots: bool = True, init: str | Path | None = None, freeze_until: str | None = None,
          latent_replay: str | None = None, lr: float | None = None, resume: bool = False) -> dict:
    """Run every method for every seed (seed-major, so methods share machine conditions); ``init``,
    ``freeze_until``, ``latent_replay`` and ``lr`` as for ``learn``, the same for every method.

    With ``resume``, runs that an interrupted bench into the same ``out`` completed with these settings are
    kept (see :func:`_finished_run`) and marked ``"reused": true``; only the rest are run."""
    specs = plan_runs(methods, sparsity, seeds, buffer_bytes)
    labels = [label for label, _, _ in specs]
    out, stream = Path(out), Path(stream)
    manifest = read_manifest(stream)
    if model is not None:
        check_input(model, manifest.input_shape, manifest.num_classes)
    options = {"buffer_bytes": buffer_bytes, "model": model, "anytime": anytime, "lr": lr,
               "init": init and str(Path(init).resolve()), "freeze_until": freeze_until, "latent_replay": latent_replay}
    profile_path = out / "profile.yaml"
    text = to_yaml(profile)
    atomic_write(profile_path, lambda f: f.write(text.encode()))
    runs = []
    bar = tqdm(total=seeds * len(specs), desc="bench", unit="run")
    for seed in range(seeds):
        for label, name, sp in specs:
            bar.set_postfix(method=label, seed=seed)
            run_dir = out / "runs" / f"{label.replace('@', '_')}_seed{seed}"
            r = (resume and _finished_run(run_dir, name, sp, seed, stream, text, options)) \
                or _learn_in_subprocess(stream, profile_path, run_dir, name, sp, seed, options)
            r.pop("prune_events", None)
            runs.append({"label": label, **r})
            bar.update(1)
    bar.close()
    report = {"machine": machine(), "profile": profile.name, "stream": str(stream.resolve()),
              "buffer_bytes": buffer_bytes, "sparsity": sparsity, "seeds": seeds, "model": model, "lr": lr,
              "init": options["init"], "freeze_until": freeze_until,
              "latent_replay": latent_replay,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summarize(runs, labels), "runs": runs}
    write_json(out / "bench.json", report)
    if plots:
        report["plots"] = [str(p) for p in plot_report(report, out)]
    return report


from .plots import plot_report  # noqa: E402  (matplotlib is imported lazily inside)
