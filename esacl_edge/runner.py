"""The ``learn`` job: consume a chunk stream in order, evaluate after every task, snapshot, report."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from . import __version__
from .errors import EsaclError
from .files import write_json
from .learner import StreamingLearner
from .memory import peak_memory_bytes
from .metrics import backward_transfer, final_accuracy, forgetting
from .methods import MethodConfig
from .profiles import Profile, load_profile
from .snapshot import save_snapshot
from .stream import Chunk, Manifest, iter_chunks, load_test, read_manifest


def default_model(input_shape: tuple[int, int, int]) -> str:
    """Reduced ResNet-18 for colour images of 32x32 and up, the small CNN otherwise."""
    h, w, c = input_shape
    return "resnet18_reduced" if c == 3 and min(h, w) >= 32 else "small_cnn"


def feed(learner: StreamingLearner, manifest: Manifest) -> Iterator[tuple[Chunk, dict]]:
    """Learn the stream in order, tasks delimited by the manifest; yield each chunk once learned."""
    for chunk in iter_chunks(manifest):
        if chunk.index == 0:
            learner.begin_task(chunk.task, chunk.n_chunks, list(manifest.tasks[chunk.task].classes))
        info = learner.observe(chunk.x, chunk.y, chunk.task)
        if chunk.index == chunk.n_chunks - 1:
            learner.end_task()
        yield chunk, info


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory unless asked to replace the old one."""
    if (run_dir / "results.json").exists() or (run_dir / "snapshots").exists():
        if not overwrite:
            raise EsaclError(f"{run_dir}: already holds a run; pass --overwrite or choose another --run")
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
        (run_dir / "results.json").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def learn(stream_dir: str | Path, profile: str | Path | Profile = "cpu", run_dir: str | Path = "esacl-run",
          method: str | MethodConfig = "esacl", sparsity: float | None = None, seed: int = 0, model: str | None = None,
          buffer_bytes: int | None = None, overwrite: bool = False, progress: bool = True,
          anytime: bool = False, pattern: str | None = None) -> dict:
    """Learn the stream chunk by chunk; write per-task snapshots and ``results.json`` to ``run_dir``.

    With ``anytime``, also evaluate on every task seen so far after every chunk.
    """
    manifest = read_manifest(stream_dir)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    tests = [load_test(manifest, t) for t in range(len(manifest.tasks))]  # fail early on a bad test split
    # The learner checks the profile's budgets, so a run that cannot fit stops before touching run_dir.
    learner = StreamingLearner(model or default_model(manifest.input_shape), prof, manifest.num_classes,
                               manifest.input_shape, method=method, sparsity=sparsity, buffer_bytes=buffer_bytes,
                               input_dtype=manifest.dtype, normalization=manifest.normalization, seed=seed,
                               class_names=list(manifest.class_names) if manifest.class_names else None,
                               pattern=pattern)
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, overwrite)
    acc_c: list[list[float]] = []
    acc_t: list[list[float]] = []
    anytime_c: list[float] = []
    train_seconds = 0.0
    total = sum(len(t.chunks) for t in manifest.tasks)
    bar = tqdm(total=total, desc="learn", unit="chunk", disable=not progress)
    chunks = feed(learner, manifest)
    while True:
        start = time.perf_counter()  # train time includes reading and validating the chunk
        step = next(chunks, None)
        if step is None:
            break
        chunk, info = step
        train_seconds += time.perf_counter() - start
        last = chunk.index == chunk.n_chunks - 1
        bar.update(1)
        bar.set_postfix(task=chunk.task, loss=f"{info['loss']:.3f}", density=f"{learner.density:.3f}")
        if anytime:
            seen = [learner.evaluate(*tests[j], task=j)["class_il"] for j in range(chunk.task + 1)]
            anytime_c.append(sum(seen) / len(seen))
        if last:
            row = [learner.evaluate(*tests[j], task=j) for j in range(chunk.task + 1)]
            acc_c.append([r["class_il"] for r in row])
            acc_t.append([r["task_il"] for r in row])
            save_snapshot(run_dir, chunk.task, learner.snapshots[chunk.task], learner.spec,
                          [learner.task_classes[t] for t in sorted(learner.task_classes)], learner.sparsity(),
                          learner.calibration.get(chunk.task),
                          {"pattern": pattern, "stream": str(Path(stream_dir).resolve()), "profile": prof.name})
    bar.close()
    sizes = learner.model_bytes()
    peak = peak_memory_bytes(learner.device)
    if peak > learner.plan.memory_budget_bytes:
        warnings.warn(f"profile {prof.name}: measured peak memory {peak:,} B exceeds "
                      f"budgets.training_peak_bytes = {learner.plan.memory_budget_bytes:,} B", RuntimeWarning,
                      stacklevel=2)
    results = {
        "acc_matrix_class_il": acc_c, "acc_matrix_task_il": acc_t,
        "final_acc_class_il": final_accuracy(acc_c), "final_acc_task_il": final_accuracy(acc_t),
        "forgetting_class_il": forgetting(acc_c), "forgetting_task_il": forgetting(acc_t),
        "bwt_class_il": backward_transfer(acc_c), "bwt_task_il": backward_transfer(acc_t),
        "sparsity": learner.sparsity(), "target_sparsity": learner.target_sparsity,
        "model_bytes_dense": sizes["dense"], "model_bytes_sparse": sizes["sparse"],
        "buffer_capacity": learner.buffer.capacity, "buffer_size": learner.buffer.size,
        "buffer_bytes": learner.buffer.nbytes, "train_seconds": train_seconds,
        "samples_trained": learner.samples_trained, "train_flops": learner.cost.flops,
        "train_macs": learner.cost.macs, "dense_forward_flops_per_sample": learner.cost.dense_forward_flops,
        "peak_memory_bytes": peak, "memory_peak_bytes": peak, "memory_budget_bytes": learner.plan.memory_budget_bytes,
        "memory_estimate_bytes": learner.plan.memory_estimate_bytes, "memory_terms": learner.plan.memory_terms,
        "batch_size": learner.plan.batch_size, "sparsity_from": learner.plan.sparsity_from,
        "layer_sparsity": learner.layer_sparsity(),
        "method": learner.cfg.name, "profile": prof.name,
        "model": learner.spec.model, "device": str(learner.device), "seed": seed,
        "stream": str(Path(stream_dir).resolve()), "tasks": len(manifest.tasks), "chunks": total,
        "pattern": pattern, "prune_events": learner.prune_events, "esacl_edge_version": __version__,
    }
    if anytime:
        results["anytime_acc_class_il"] = anytime_c
    write_json(run_dir / "results.json", results)
    return results
