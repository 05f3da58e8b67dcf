"""``results.json``: what a learn job reports (keys documented in the README; add, never rename)."""

from __future__ import annotations

import signal
import warnings
from dataclasses import dataclass, field

from . import __version__
from .data.stream import Manifest
from .device.memory import peak_memory_bytes
from .device.profiles import Profile
from .streaming import StreamingLearner
from .metrics import backward_transfer, final_accuracy, forgetting, learning_accuracy


@dataclass
class RunRecord:
    """What the job adds to the learner's state: settings, chunks consumed (with hashes), accuracies."""

    settings: dict
    consumed: list[dict] = field(default_factory=list)
    acc_c: list[list[float]] = field(default_factory=list)
    acc_t: list[list[float]] = field(default_factory=list)
    anytime_c: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    samples_learned: int = 0  # chunk samples consumed (each once, whatever the passes)
    reported: list[dict] = field(default_factory=list)  # chunks changed after learning, or added too late


def build_results(learner: StreamingLearner, rec: RunRecord, manifest: Manifest, prof: Profile,
                  stopped_by: int | None, resumed_at: int) -> dict:
    """``results.json`` of a learn job (warns when the measured peak memory exceeds the profile's budget)."""
    acc_c, acc_t = rec.acc_c, rec.acc_t
    sizes = learner.model_bytes()
    peak = peak_memory_bytes(learner.device)
    if peak > learner.plan.memory_budget_bytes:
        warnings.warn(f"profile {prof.name}: measured peak memory {peak:,} B exceeds "
                      f"budgets.training_peak_bytes = {learner.plan.memory_budget_bytes:,} B", RuntimeWarning,
                      stacklevel=3)
    results = {
        "complete": stopped_by is None and learner.progress.task < 0 and len(acc_c) == len(manifest.tasks),
        "stopped_by": None if stopped_by is None else signal.Signals(stopped_by).name,
        "acc_matrix_class_il": acc_c, "acc_matrix_task_il": acc_t,
        "final_acc_class_il": final_accuracy(acc_c) if acc_c else None,
        "final_acc_task_il": final_accuracy(acc_t) if acc_t else None,
        "forgetting_class_il": forgetting(acc_c) if acc_c else None,
        "forgetting_task_il": forgetting(acc_t) if acc_t else None,
        "bwt_class_il": backward_transfer(acc_c) if acc_c else None,
        "bwt_task_il": backward_transfer(acc_t) if acc_t else None,
        "learning_acc_class_il": learning_accuracy(acc_c) if acc_c else None,
        "learning_acc_task_il": learning_accuracy(acc_t) if acc_t else None,
        "sparsity": learner.sparsity(), "target_sparsity": learner.target_sparsity,
        "model_bytes_dense": sizes["dense"], "model_bytes_sparse": sizes["sparse"],
        "buffer_capacity": learner.buffer.capacity, "buffer_size": learner.buffer.size,
        "buffer_bytes": learner.buffer.nbytes, "train_seconds": rec.train_seconds,
        "samples_learned": rec.samples_learned,
        "samples_per_second": rec.samples_learned / rec.train_seconds if rec.train_seconds else None,
        "samples_trained": learner.samples_trained, "train_flops": learner.cost.flops,
        "train_macs": learner.cost.macs, "dense_forward_flops_per_sample": learner.cost.dense_forward_flops,
        "peak_memory_bytes": peak, "memory_budget_bytes": learner.plan.memory_budget_bytes,
        "memory_estimate_bytes": learner.plan.memory_estimate_bytes, "memory_terms": learner.plan.memory_terms,
        "batch_size": learner.plan.batch_size, "sparsity_from": learner.plan.sparsity_from,
        "layer_sparsity": learner.layer_sparsity(),
        "method": learner.method.name, "profile": prof.name,
        "model": learner.spec.model, "device": str(learner.device), "precision": learner.precision.name,
        **learner.precision.counts(), "seed": rec.settings["seed"],
        "stream": rec.settings["stream"], "tasks": len(manifest.tasks),
        "untested_tasks": [t for t, task in enumerate(manifest.tasks) if not task.test],
        "settings": {k: v for k, v in rec.settings.items() if k != "stream"},
        "chunks": sum(len(t.chunks) for t in manifest.tasks),
        "chunks_consumed": len(rec.consumed), "resumed_at_chunk": resumed_at,
        "consumed_chunks": rec.consumed, "reported_chunks": rec.reported,
        "pattern": rec.settings["pattern"], "prune_events": learner.prune_events, "esacl_edge_version": __version__,
        "init": learner.init, "freeze_until": learner.spec.freeze_until, "latent_replay": learner.layout.latent,
        "buffer_sample_bytes": learner.layout.bytes_per_sample(learner.spec.num_classes),
        "trainable_params": learner.plan.trainable_params,
    }
    if rec.settings["anytime"]:
        results["anytime_acc_class_il"] = rec.anytime_c
    return results
