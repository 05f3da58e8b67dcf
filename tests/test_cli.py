import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from esacl_edge.cli import main
from esacl_edge.data.stream import load_test, read_manifest
from esacl_edge.device.budget import stored_model_bytes
from esacl_edge.device.profiles import load_profile, to_yaml
from esacl_edge.models import build_model
from tests.support import MIN_PROCESS_BYTES, RESULT_KEYS


@pytest.fixture
def profile_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(load_profile("cpu").replace(name="tiny", batch_size=16, passes_per_chunk=10,
                                                        buffer_bytes=4480, target_sparsity=0.8)))
    return path


def test_cli_end_to_end_on_a_tiny_stream(tmp_path, profile_file, capsys):
    stream, run = tmp_path / "stream", tmp_path / "run"
    assert main(["make-stream", "--dataset", "digits", "--out", str(stream), "--tasks", "5", "--chunk-size", "16",
                 "--per-class", "12", "--test-per-class", "8"]) == 0
    assert main(["learn", "--profile", str(profile_file), "--stream", str(stream), "--run", str(run),
                 "--seed", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Class-IL accuracy" in printed and "final accuracy" in printed
    r = json.loads((run / "results.json").read_text())
    assert RESULT_KEYS <= set(r)
    assert r["profile"] == "tiny" and r["method"] == "esacl" and r["seed"] == 1
    assert r["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert [len(row) for row in r["acc_matrix_class_il"]] == [1, 2, 3, 4, 5]
    assert r["final_acc_class_il"] == pytest.approx(np.mean(r["acc_matrix_class_il"][-1]))
    assert all(a >= c for a, c in zip(r["acc_matrix_task_il"][-1], r["acc_matrix_class_il"][-1]))
    assert r["model_bytes_sparse"] < r["model_bytes_dense"] / 3
    assert r["model_bytes_sparse"] == stored_model_bytes(build_model("small_cnn", (8, 8, 1), 10), 0.8)
    assert r["buffer_size"] == r["buffer_capacity"] == 4480 // 112 and r["buffer_bytes"] == 4480
    # It learned: Task-IL (chance 0.5 on 2-class tasks) well above chance after the last task.
    assert r["final_acc_task_il"] >= 0.7, r["acc_matrix_task_il"]
    # Throughput and cost: 5 tasks of 24 samples (chunks of 16 and 8, one minibatch each), each learned once;
    # IDS trains the top half of every minibatch in each of the 10 passes.
    assert r["samples_learned"] == 120 and r["samples_trained"] == 10 * 5 * (8 + 4)
    assert r["samples_per_second"] == pytest.approx(120 / r["train_seconds"])
    assert r["peak_memory_bytes"] >= MIN_PROCESS_BYTES and "memory_peak_bytes" not in r
    assert r["train_macs"] == r["train_flops"] / 2
    # At least the scoring forward of every sample and two dense-or-sparser SAM passes of the kept half.
    f = r["dense_forward_flops_per_sample"]
    assert 10 * 120 * 0.2 * f < r["train_flops"] < 10 * (120 * f + 2 * 3 * 60 * f)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == sorted(
        f"task_{t}{ext}" for t in range(5) for ext in (".json", ".pt", "_calib.npz"))

    # Export task 1 and check it classifies task 1's test data as the run measured right after task 1.
    out = tmp_path / "t1.onnx"
    assert main(["export", "--task", "1", str(out), "--run", str(run)]) == 0
    assert "max abs diff" in capsys.readouterr().out
    x, y = load_test(read_manifest(stream), 1)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x.astype(np.float32).transpose(0, 3, 1, 2).copy()})[0]
    assert (logits.argmax(1) == y).mean() == pytest.approx(r["acc_matrix_class_il"][1][1], abs=1e-6)

    # The same command again resumes a finished run: nothing is learned twice.
    before = (run / "snapshots" / "task_4.pt").read_bytes()
    assert main(["learn", "--profile", str(profile_file), "--stream", str(stream), "--run", str(run),
                 "--seed", "1", "--quiet"]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["chunks_consumed"] == r["chunks_consumed"] == r["chunks"] == 10
    assert again["acc_matrix_class_il"] == r["acc_matrix_class_il"]
    assert (run / "snapshots" / "task_4.pt").read_bytes() == before
    # Other settings on the same run folder are refused, unless asked to overwrite.
    assert main(["learn", "--profile", str(profile_file), "--stream", str(stream), "--run", str(run), "--quiet"]) == 2
    assert "holds a run with other settings (seed 1 -> 0)" in capsys.readouterr().err


def test_cli_export_of_missing_task(tmp_path, capsys):
    (tmp_path / "run" / "snapshots").mkdir(parents=True)
    assert main(["export", "--task", "3", str(tmp_path / "m.onnx"), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no snapshot for task 3" in err and "tasks count from 0" in err


def test_cli_bad_profile_is_one_line(tmp_path, tiny_stream, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(to_yaml(load_profile("cpu")).replace("batch_size: 32", "batch_size: -4"))
    assert main(["learn", "--profile", str(bad), "--stream", str(tiny_stream.root), "--run", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"esacl-edge: error: {bad}: field 'training.batch_size': must be an integer >= 1, got -4"
    assert not (tmp_path / "r").exists()


def test_console_script_help_says_tasks_count_from_zero():
    out = subprocess.run([sys.executable, "-m", "esacl_edge.cli", "export", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "counting from 0" in out


def test_a_non_ascii_run_path_under_an_ascii_terminal_prints_escaped(tmp_path, tiny_stream):
    import os

    run = tmp_path / "rün"
    done = subprocess.run([sys.executable, "-m", "esacl_edge.cli", "learn", "--stream", str(tiny_stream.root),
                           "--run", str(run), "--passes", "1", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"}, encoding="ascii", errors="strict")
    assert done.returncode == 0, done.stderr
    assert "r\\xfcn" in done.stdout and (run / "results.json").is_file()
