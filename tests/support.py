"""Helpers the tests share (not tests themselves): chunk files written by hand, the device-side runner run
without torch, and the keys every results.json has."""

import subprocess
import sys
from pathlib import Path

import numpy as np


def write_chunk(path, x, y, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, **extra)


RUNNER = Path(__file__).resolve().parent.parent / "export" / "run_onnx.py"


def run_without_torch(tmp_path, *args):
    """export/run_onnx.py in a Python where torch cannot be imported (as on a device)."""
    fake = tmp_path / "notorch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('no torch on this device')\n")
    env = {"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True, env=env)


RESULT_KEYS = {"acc_matrix_class_il", "acc_matrix_task_il", "final_acc_class_il", "final_acc_task_il",
               "forgetting_class_il", "sparsity", "model_bytes_dense", "model_bytes_sparse", "train_seconds",
               "method", "profile", "seed", "peak_memory_bytes", "samples_learned", "samples_per_second",
               "samples_trained", "train_flops", "train_macs"}

# A process that has run torch holds at least this much: a peak below it is in the wrong unit.
MIN_PROCESS_BYTES = 50 * 2 ** 20
