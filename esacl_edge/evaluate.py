"""Accuracy of a task's snapshot on the test data of tasks 0..N of a stream (the ``eval`` command)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.stream import load_test, read_manifest
from .deploy.snapshot import available_tasks, load_snapshot
from .models import ModelSpec
from .errors import SnapshotError, StreamError
from .learn.forward import accuracies, infer_logits, nchw
from .metrics import final_accuracy


def stream_tests(stream: str | Path, task: int, spec: ModelSpec
                 ) -> list[tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None]:
    """``(x, y, classes)`` of the test split of each of the tasks 0..``task`` of ``stream`` (None for a
    task without one), after checking that the stream fits the snapshot's model."""
    manifest = read_manifest(stream)
    where = manifest.root
    if len(manifest.tasks) <= task:
        raise StreamError(f"{where}: has {len(manifest.tasks)} tasks (0..{len(manifest.tasks) - 1}), the snapshot "
                          f"of task {task} is measured on tasks 0..{task}; choose an earlier --task or another stream")
    if tuple(manifest.input_shape) != tuple(spec.input_shape) or manifest.dtype != spec.dtype:
        raise StreamError(f"{where}: holds {manifest.dtype} inputs of shape {tuple(manifest.input_shape)}, the "
                          f"snapshot's model takes {spec.dtype} {tuple(spec.input_shape)}; "
                          "use a stream of the same data")
    if manifest.num_classes > spec.num_classes:
        raise StreamError(f"{where}: has {manifest.num_classes} classes, the snapshot's model {spec.num_classes}; "
                          "use a stream of the same data")
    return [(*load_test(manifest, t), manifest.tasks[t].classes) if manifest.tasks[t].test else None
            for t in range(task + 1)]


def warn_unlearned(tests: list[tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None], meta: dict, stream: str | Path,
                   task: int) -> list[int]:
    """Warn (and return them) when the test data holds classes that the snapshot of ``task`` never learned:
    they count as errors in every accuracy."""
    learned = {c for classes in (meta.get("task_classes") or [])[: task + 1] for c in classes}
    seen = {int(c) for test in tests if test is not None for c in np.unique(test[1])}
    unlearned = sorted(seen - learned)
    if unlearned:
        shown = ", ".join(map(str, unlearned[:20])) + (", ..." if len(unlearned) > 20 else "")
        warnings.warn(f"{stream}: the test data of tasks 0..{task} holds {len(unlearned)} classes that the snapshot "
                      f"of task {task} never learned ({shown}); its accuracy counts them as errors", RuntimeWarning,
                      stacklevel=2)
    return unlearned


def task_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> dict[str, float]:
    """Class-IL (all classes compete) and Task-IL (only ``classes`` compete) accuracy, as the learner measures it."""
    logits = infer_logits(model, nchw(x))
    return accuracies(logits, torch.as_tensor(y), classes)


def evaluate_snapshot(run: str | Path, task: int | None = None, stream: str | Path | None = None) -> dict:
    """Accuracy of the snapshot of ``task`` (default: the run's last) on the test data of tasks
    0..``task`` of ``stream`` (default: the run's own): one row per task and the means."""
    if not Path(run).is_dir():
        raise SnapshotError(f"{run}: run directory not found")
    if task is None:
        have = available_tasks(run)
        if not have:
            raise SnapshotError(f"{run}: no task snapshots yet; a task's snapshot is written when it ends")
        task = have[-1]
    model, meta = load_snapshot(run, task)
    stream = stream or meta.get("stream")
    if not stream:
        raise SnapshotError(f"{run}: the snapshot of task {task} does not name its stream; pass --stream")
    rows, tests = [], stream_tests(stream, task, meta["spec"])
    unlearned = warn_unlearned(tests, meta, stream, task)
    for t, test in enumerate(tests):
        if test is None:  # a task without a test split is listed, not measured (as learn does)
            rows.append({"task": t, "samples": 0, "class_il": None, "task_il": None})
            continue
        x, y, classes = test
        rows.append({"task": t, "samples": len(y), **task_accuracy(model, x, y, classes)})
    if not any(r["samples"] for r in rows):
        raise StreamError(f"{Path(stream) / 'manifest.json'}: none of tasks 0..{task} has a test split")
    return {"run": str(run), "task": task, "stream": str(stream), "tasks": rows, "unlearned_classes": unlearned,
            "mean_class_il": final_accuracy([[r["class_il"] for r in rows]]),
            "mean_task_il": final_accuracy([[r["task_il"] for r in rows]])}


def format_evaluation(result: dict) -> str:
    """A printable table: one row per task, then the means, in percent."""
    lines = [f"snapshot of task {result['task']} in {result['run']}, test data of {result['stream']}",
             f"{'task':<6}{'samples':>9}{'class-IL':>10}{'task-IL':>10}"]
    for r in result["tasks"]:
        if r["class_il"] is None:
            lines.append(f"{'T' + str(r['task']):<6}{'no test split':>29}")
            continue
        lines.append(f"{'T' + str(r['task']):<6}{r['samples']:>9}"
                     f"{100 * r['class_il']:>10.2f}{100 * r['task_il']:>10.2f}")
    total = sum(r["samples"] for r in result["tasks"])
    lines.append(f"{'mean':<6}{total:>9}{100 * result['mean_class_il']:>10.2f}{100 * result['mean_task_il']:>10.2f}"
                 "  (mean over tasks; each task weighs the same)")
    return "\n".join(lines)
