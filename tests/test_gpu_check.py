"""benchmarks/gpu_check.py: its CPU smoke run, its refusal without CUDA, and (marked cuda) the GPU check itself."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import MIN_PROCESS_BYTES

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
TINY = ["--tasks", "2", "--per-class", "10", "--test-per-class", "5", "--passes", "1"]


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True)


def check_row(row: dict, precision: str, max_skipped: int = 0) -> None:
    """A finished run of ``precision`` with plausible numbers and an exported model that matches PyTorch;
    at most ``max_skipped`` fp16 steps skipped for overflow."""
    assert "error" not in row, row["error"]
    assert row["precision"] == precision and row["precision_used"] == precision
    assert math.isfinite(row["final_acc_class_il"]) and 0.0 <= row["final_acc_class_il"] <= 1.0
    assert row["samples_per_second"] == pytest.approx(row["samples_learned"] / row["train_seconds"])
    assert 0 < row["seconds_per_chunk_median"] <= row["train_seconds"]
    assert row["overflow_skipped_steps"] <= max_skipped
    assert row["peak_over_budget"] == pytest.approx(row["peak_memory_bytes"] / row["memory_budget_bytes"])
    assert row["peak_memory_bytes"] >= (MIN_PROCESS_BYTES if row["device"] == "cpu" else 1)
    assert "error" not in row["export"], row["export"]["error"]
    assert row["export"]["max_abs_diff"] < 1e-3


def test_cpu_only_smoke_run(tmp_path):
    done = gpu_check(tmp_path, "--cpu-only", "--methods", "derpp", "--precisions", "fp32,bf16",
                     "--chunk-size", "24", *TINY)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["stream"]["tasks"] == 2
    rows = {(r["role"], r["method"], r["precision"], r["device"]): r for r in report["runs"]}
    assert set(rows) == {("target", "derpp", "fp32", "cpu"), ("target", "derpp", "bf16", "cpu")}  # fp32: the reference
    for (_, _, precision, _), row in rows.items():
        check_row(row, precision)
        assert row["host_syncs_per_step"] is None and row["host_syncs_reason"]
        assert row["export"]["cuda_provider"] is None or "CUDAExecutionProvider" in report["onnxruntime_providers"]
    assert [(r["precision"], r["speedup_vs_cpu_fp32"] > 0) for r in report["ratios"]] == [("fp32", True),
                                                                                        ("bf16", True)]
    assert report["ratios"][0]["speedup_vs_cpu_fp32"] == 1.0
    assert "Class-IL %" in done.stdout and "derpp" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path):
    done = gpu_check(tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_check: error: CUDA is not available here (torch.cuda.is_available() "
                                   "is False); run on a machine with an NVIDIA GPU, or pass --cpu-only for a "
                                   "CPU smoke run")
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
def test_gpu_check_on_cuda(tmp_path):
    # Chunks of 25: task 0 is two full chunks, so the sync check trains on task 1's first with a buffer.
    done = gpu_check(tmp_path, "--chunk-size", "25", *TINY)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is True and report["gpu"]
    targets = [r for r in report["runs"] if r["role"] == "target"]
    assert {(r["method"], r["precision"]) for r in targets} == {(m, p) for m in ("esacl", "derpp")
                                                               for p in ("fp32", "fp16", "bf16")}
    for row in targets:
        if row["precision"] == "bf16" and not report["bf16_supported"]:
            continue  # trains in fp16 instead, with a warning
        # fp16's loss scale starts at 2**16 and may back off over a few skipped steps first.
        check_row(row, row["precision"], max_skipped=5 if row["precision"] == "fp16" else 0)
        assert row["device"].startswith("cuda")
        assert row["host_syncs_per_step"] <= 1, row["host_sync_sites"]
        if row["export"]["cuda_provider"] is not None:
            assert row["export"]["cuda_provider_max_abs_diff"] < 1e-3
    assert all(r["speedup_vs_cpu_fp32"] for r in report["ratios"])
