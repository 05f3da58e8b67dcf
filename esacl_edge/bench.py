"""``esacl-edge bench``: several methods on one stream and the same seeds, interleaved, in one table."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import EsaclError
from .files import write_json
from .methods import get_method
from .profiles import Profile
from .runner import learn


def parse_method(spec: str, default_sparsity: float) -> tuple[str, str, float]:
    """``esacl`` or ``esacl@0.75`` -> (label, method, sparsity)."""
    name, _, sp = spec.partition("@")
    get_method(name)
    try:
        sparsity = float(sp) if sp else default_sparsity
    except ValueError:
        raise EsaclError(f"--methods: {spec!r}: sparsity after '@' must be a number") from None
    if not get_method(name).sparse:
        sparsity = 0.0
    return spec if sp else (f"{name}@{sparsity:g}" if get_method(name).sparse else name), name, sparsity


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "esacl_edge": __version__}


COLUMNS = [("final_acc_class_il", "Class-IL %", 100), ("final_acc_task_il", "Task-IL %", 100),
           ("forgetting_class_il", "Forget %", 100), ("train_seconds", "Time s", 1),
           ("model_bytes_sparse", "Model KB", 1e-3)]


def summarize(runs: list[dict], labels: list[str]) -> list[dict]:
    """Mean and std per method label over seeds, plus ratios to the first label."""
    rows = []
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        row = {"label": label, "seeds": len(mine)}
        for key, _, _ in COLUMNS + [("model_bytes_dense", "", 1), ("sparsity", "", 1), ("samples_trained", "", 1)]:
            vals = np.array([r[key] for r in mine], dtype=float)
            row[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        rows.append(row)
    ref = rows[0]
    for row in rows:
        row["time_ratio_to_first"] = row["train_seconds"]["mean"] / ref["train_seconds"]["mean"]
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<20}" + "".join(f"{title:>16}" for _, title, _ in COLUMNS) + f"{'time x':>9}"
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = "".join(f"{row[k]['mean'] * s:>9.1f} ± {row[k]['std'] * s:<4.1f}" for k, _, s in COLUMNS)
        lines.append(f"{row['label']:<20}{cells}{row['time_ratio_to_first']:>9.2f}")
    return "\n".join(lines)


def bench(stream: str | Path, methods: list[str], profile: Profile, out: str | Path, sparsity: float = 0.9,
          seeds: int = 3, buffer_bytes: int | None = None, model: str | None = None) -> dict:
    """Run every method for every seed (seed-major, so methods share machine conditions)."""
    specs = [parse_method(m, sparsity) for m in methods]
    labels = [label for label, _, _ in specs]
    if len(set(labels)) != len(labels):
        raise EsaclError(f"--methods lists the same run twice: {', '.join(labels)}")
    out = Path(out)
    runs = []
    bar = tqdm(total=seeds * len(specs), desc="bench", unit="run")
    for seed in range(seeds):
        for label, name, sp in specs:
            bar.set_postfix(method=label, seed=seed)
            run_dir = out / "runs" / f"{label.replace('@', '_')}_seed{seed}"
            r = learn(stream, profile, run_dir, method=name, sparsity=sp, seed=seed, buffer_bytes=buffer_bytes,
                      model=model, overwrite=True, progress=False)
            r.pop("prune_events")
            runs.append({"label": label, **r})
            bar.update(1)
    bar.close()
    report = {"machine": machine(), "profile": profile.name, "stream": str(Path(stream).resolve()),
              "buffer_bytes": buffer_bytes, "seeds": seeds, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "summary": summarize(runs, labels), "runs": runs}
    write_json(out / "bench.json", report)
    return report
