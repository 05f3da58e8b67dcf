"""What the learn job guards against and reports: divergence, a second job on the run folder, file
modes, empty drop folders, tasks without a test split, chunks still being written, the per-chunk
log, overrides of the profile, and bad learner input through the API."""

import json
import os
import re
import stat
import subprocess
import sys
import warnings
import numpy as np
import pytest

from esacl_edge import StreamingLearner, runner
from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.device.profiles import load_profile, to_yaml
from esacl_edge.errors import DivergenceError, EsaclError
from esacl_edge.plots import RUN_PLOTS
from esacl_edge.runlock import LOCK_NAME, run_lock

from tests.support import write_chunk


@pytest.fixture
def stream(tmp_path):
    """3 tasks of 2 digits, 2 chunks each."""
    return make_stream("digits", tmp_path / "stream", tasks=3, chunk_size=20, seed=0, per_class=20,
                       test_per_class=5)


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(load_profile("cpu").replace(name="tiny", batch_size=8, passes_per_chunk=1,
                                                        buffer_bytes=2240)))
    return path


def learn(stream_root, run, profile, *extra):
    return main(["learn", "--stream", str(stream_root), "--run", str(run), "--profile", str(profile), "--quiet",
                 *map(str, extra)])


def edit_manifest(root, fn):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("esacl-edge: error: "), err
    return err


# ---------------------------------------------------------------- divergence
def loud_stream(root):
    """Float32 pixels x 1e4 with no normalization: training on it explodes."""
    make_stream("digits", root, tasks=2, chunk_size=20, seed=0, per_class=20, test_per_class=5)
    m = json.loads((root / "manifest.json").read_text())
    for task in m["tasks"]:
        for rel in [*task["chunks"], task["test"]]:
            with np.load(root / rel) as d:
                write_chunk(root / rel, d["x"].astype(np.float32) * 1e4, d["y"])
    m.update(dtype="float32", normalization={})
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_a_diverging_stream_stops_with_one_error_and_keeps_the_state_before_it(tmp_path, capsys, profile):
    root = loud_stream(tmp_path / "loud")
    run = tmp_path / "run"
    assert learn(root, run, profile, "--lr", 0.5) == 2
    err = one_error(capsys)
    assert "training diverged" in err and "task0/chunk0000.npz" in err, err
    assert not (run / "results.json").exists()
    assert not (run / "state").exists()  # the first chunk diverged: there was no state before it
    assert "nothing was saved" in err


def test_bench_reports_a_diverged_run_and_goes_on(tmp_path, capsys):
    root = loud_stream(tmp_path / "loud")
    assert main(["bench", "--stream", str(root), "--methods", "finetune", "--seeds", "1", "--passes", "1",
                 "--out", str(tmp_path / "b")]) == 0
    assert "finetune (1 diverged)" in capsys.readouterr().out
    run = json.loads((tmp_path / "b" / "bench.json").read_text())["runs"][0]
    assert "training diverged" in run["diverged"] and "final_acc_class_il" not in run


def test_observe_stops_on_a_non_finite_loss_and_refuses_bad_inputs(digits_norm):
    learner = StreamingLearner("small_cnn", load_profile("cpu").replace(passes_per_chunk=1, batch_size=8),
                               num_classes=4, input_shape=(8, 8, 1), input_dtype="float32",
                               normalization=digits_norm, method="finetune")
    x = np.random.default_rng(0).uniform(0, 16, (16, 8, 8, 1)).astype(np.float32)
    y = np.arange(16) % 2
    learner.observe(x, y, 0)
    with pytest.raises(DivergenceError, match="the loss reached"):
        learner.observe(x * 1e30, y, 0)
    uint8 = StreamingLearner("small_cnn", "cpu", num_classes=4, input_shape=(8, 8, 1), input_dtype="uint8")
    with pytest.raises(EsaclError, match="dtype float64; this learner stores uint8"):
        uint8.observe(x.astype(np.float64), y, 0)
    with pytest.raises(EsaclError, match="inputs are empty"):
        uint8.observe(np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64), 0)
    with pytest.raises(EsaclError, match="inputs are empty"):
        learner.evaluate(np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int64), 0)
    with pytest.raises(EsaclError, match="NaN or Inf"):
        learner.predict(np.full((2, 8, 8, 1), np.nan, np.float32))
    with pytest.raises(EsaclError, match="one label per sample"):
        learner.evaluate(x, y[:3], 0)
    assert uint8.progress.task == -1  # nothing begun by refused input


def test_seed_out_of_range_is_one_error(stream, tmp_path, capsys, profile):
    assert learn(stream.root, tmp_path / "run", profile, "--seed", -5) == 2
    assert "seed must be an integer in 0..4294967295, got -5" in one_error(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the run folder
def test_a_second_job_on_a_locked_run_folder_is_refused_naming_the_holder(stream, tmp_path, capsys, profile):
    run = tmp_path / "run"
    with run_lock(run):
        assert learn(stream.root, run, profile) == 2
        err = one_error(capsys)
        assert f"in use by another esacl-edge job (pid {os.getpid()})" in err, err
    assert not run.exists()  # the folder made only for the lock is gone again


def test_the_lock_dies_with_its_process(stream, tmp_path, profile):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from esacl_edge.runlock import run_lock\n"
                               f"with run_lock(Path({str(run)!r})):\n print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(EsaclError, match=f"pid {holder.pid}"), run_lock(run):
        pass
    holder.kill()  # SIGKILL: no clean-up runs
    holder.wait()
    with run_lock(run):
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_an_unwritable_run_folder_is_one_error(stream, tmp_path, capsys, profile):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert learn(stream.root, blocker / "run", profile) == 2
    assert "cannot write the run folder" in one_error(capsys)


def test_files_follow_the_umask(tmp_path, profile):
    old = os.umask(0o027)
    try:
        s = make_stream("digits", tmp_path / "stream", tasks=2, chunk_size=40, seed=0, per_class=20,
                        test_per_class=5)
        assert learn(s.root, tmp_path / "run", profile) == 0
        (tmp_path / "onnx").mkdir()
        for variant in ("sparse", "dense", "structured", "int8"):
            assert main(["export", "--task", "1", str(tmp_path / "onnx" / f"{variant}.onnx"), "--run",
                         str(tmp_path / "run"), "--variant", variant]) == 0
    finally:
        os.umask(old)
    files = [p for p in [*s.root.rglob("*"), *(tmp_path / "run").rglob("*"), *(tmp_path / "onnx").rglob("*")]
             if p.is_file()]
    assert len(files) > 10
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o640}, {n: oct(m) for n, m in modes.items() if m != 0o640}


# ---------------------------------------------------------------- the stream
def test_an_empty_chunk_dir_says_which_task_waits(stream, tmp_path, capsys, profile):
    (stream.root / "incoming").mkdir()
    edit_manifest(stream.root, lambda m: m["tasks"][1].update(chunks=[], chunk_dir="incoming"))
    assert learn(stream.root, tmp_path / "run", profile) == 0
    err = capsys.readouterr().err
    assert "task 1 has no chunks yet (its chunk_dir is empty)" in err, err
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["complete"] is False and len(r["acc_matrix_class_il"]) == 1


def test_tasks_without_a_test_split_are_learned_and_left_out_of_the_metrics(stream, tmp_path, profile):
    edit_manifest(stream.root, lambda m: m["tasks"][1].pop("test"))
    assert learn(stream.root, tmp_path / "run", profile, "--anytime") == 0
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["complete"] and r["untested_tasks"] == [1]
    assert [row[1] for row in r["acc_matrix_class_il"][1:]] == [None, None]
    last = r["acc_matrix_class_il"][-1]
    assert r["final_acc_class_il"] == pytest.approx((last[0] + last[2]) / 2)
    assert None not in r["anytime_acc_class_il"]


def test_follow_waits_for_a_chunk_still_being_written(stream, tmp_path, capsys, profile, monkeypatch):
    chunk = stream.root / "task2/chunk0001.npz"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:100])  # cut short, under its final name
    edit_manifest(stream.root, lambda m: m["tasks"][2].update(complete=True))
    warn = runner.warnings.warn

    def producer_finishes(message, *args, **kwargs):  # the producer completes the file while the job waits
        warn(message, *args, **kwargs)
        if "waiting for it to be complete" in str(message):
            chunk.write_bytes(good)

    monkeypatch.setattr(runner.warnings, "warn", producer_finishes)
    assert learn(stream.root, tmp_path / "run", profile, "--follow", "--poll", 0.05, "--max-idle", 1) == 0
    err = capsys.readouterr().err
    assert "task2/chunk0001.npz" in err and "waiting for it to be complete (1 of 3)" in err, err
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["complete"] and r["chunks_consumed"] == sum(len(t.chunks) for t in stream.tasks)


def test_follow_gives_up_on_a_chunk_that_never_reads(stream, tmp_path, capsys, profile):
    (stream.root / "task2/chunk0001.npz").write_bytes(b"not a chunk")
    edit_manifest(stream.root, lambda m: m["tasks"][2].update(complete=True))
    assert learn(stream.root, tmp_path / "run", profile, "--follow", "--poll", 0.05) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert sum("waiting for it to be complete" in line for line in err) == 3
    assert err[-1].startswith("esacl-edge: error: ") and "task2/chunk0001.npz" in err[-1]
    assert (tmp_path / "run" / "state").is_dir()  # the chunks before it are saved


@pytest.mark.parametrize("option,value", [("--poll", 0), ("--poll", -1), ("--max-idle", -2)])
def test_follow_timing_options_must_be_positive(stream, tmp_path, capsys, profile, option, value):
    assert learn(stream.root, tmp_path / "run", profile, "--follow", option, value) == 2
    assert option in one_error(capsys)


# ---------------------------------------------------------------- options and the chunk log
def test_overrides_are_applied_recorded_and_pinned_on_resume(stream, tmp_path, capsys, profile):
    run = tmp_path / "run"
    edit_manifest(stream.root, lambda m: m.update(tasks=m["tasks"][:2]))
    assert learn(stream.root, run, profile, "--passes", 2, "--batch-size", 4, "--lr", 0.05, "--device", "cpu") == 0
    r = json.loads((run / "results.json").read_text())
    assert r["settings"]["passes"] == 2 and r["settings"]["lr"] == 0.05 and r["batch_size"] == 4
    assert r["samples_trained"] == r["samples_learned"] * 2 // 2  # 2 passes, IDS trains on half of each batch
    capsys.readouterr()
    assert learn(stream.root, run, profile, "--passes", 2, "--batch-size", 4, "--lr", 0.1) == 2
    assert "lr 0.05 -> 0.1" in one_error(capsys)
    assert learn(stream.root, run, profile, "--passes", 0) == 2
    assert "--passes must be >= 1, got 0" in one_error(capsys)


def test_the_chunk_log_has_one_line_per_chunk_across_a_resume(stream, tmp_path, profile):
    run = tmp_path / "run"
    full = json.loads((stream.root / "manifest.json").read_text())
    edit_manifest(stream.root, lambda m: m.update(tasks=m["tasks"][:1]))
    assert learn(stream.root, run, profile, "--anytime") == 0
    first = len(stream.tasks[0].chunks)
    with open(run / "metrics.jsonl", "a") as f:  # a line written before a crash that lost its state
        f.write(json.dumps({"chunk": first, "task": 1}) + "\n" + '{"chunk": 5, "ta')
    (stream.root / "manifest.json").write_text(json.dumps(full))
    assert learn(stream.root, run, profile, "--anytime") == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tasks = [t for t, task in enumerate(stream.tasks) for _ in task.chunks]
    assert [line["chunk"] for line in lines] == list(range(len(tasks)))
    assert [line["task"] for line in lines] == tasks
    assert all(line["samples"] == 20 and line["samples_per_second"] > 0 and 0 <= line["anytime_acc_class_il"] <= 1
               and np.isfinite(line["loss"]) for line in lines)
    assert lines[-1]["density"] == pytest.approx(0.1, abs=0.01)
    for name in RUN_PLOTS:  # learn draws the run's plots too
        assert (run / name).read_bytes().startswith(b"\x89PNG"), name


def test_a_buffer_too_small_for_one_sample_is_reported(capsys):
    with pytest.warns(RuntimeWarning, match="holds no sample .one takes 112 bytes.: esacl runs without replay"):
        StreamingLearner("small_cnn", "cpu", num_classes=10, input_shape=(8, 8, 1), input_dtype="uint8",
                         buffer_bytes=100)
    with warnings.catch_warnings():  # no buffer asked for: nothing to report
        warnings.simplefilter("error")
        StreamingLearner("small_cnn", "cpu", num_classes=10, input_shape=(8, 8, 1), input_dtype="uint8",
                         buffer_bytes=0)


def test_follow_does_not_mistake_a_bad_test_split_for_a_chunk_being_written(stream, tmp_path, capsys, profile):
    (stream.root / "test/task2.npz").write_bytes(b"not a test split")
    edit_manifest(stream.root, lambda m: m["tasks"][2].update(complete=True))
    assert learn(stream.root, tmp_path / "run", profile, "--follow", "--poll", 0.05, "--max-idle", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("waiting for it to be complete" in line for line in err), err
    assert err[-1].startswith("esacl-edge: error: ") and "test/task2.npz" in err[-1], err


def test_training_at_a_task_end_is_checked_for_divergence(monkeypatch, digits_norm):
    from esacl_edge.learn.joint import Joint

    end_task = Joint.end_task

    def exploding(self, learner):
        end_task(self, learner)
        next(learner.model.parameters()).data.fill_(float("nan"))

    monkeypatch.setattr(Joint, "end_task", exploding)
    learner = StreamingLearner("small_cnn", load_profile("cpu").replace(passes_per_chunk=1, batch_size=8),
                               num_classes=4, input_shape=(8, 8, 1), input_dtype="float32",
                               normalization=digits_norm, method="joint")
    learner.observe(np.ones((8, 8, 8, 1), np.float32), np.arange(8) % 2, 0)
    with pytest.raises(DivergenceError, match="at the end of task 0: the weights became NaN"):
        learner.end_task()
    assert 0 not in learner.snapshots


def test_metrics_leave_out_tasks_measured_only_later():
    from esacl_edge.metrics import backward_transfer, forgetting

    matrix = [[0.5], [0.4, None], [0.3, 0.6, 0.7]]  # task 1's test split arrived after task 1 ended
    assert forgetting(matrix) == pytest.approx(0.2)
    assert backward_transfer(matrix) == pytest.approx(-0.2)


def test_bench_summary_pairs_only_seeds_with_a_result():
    from esacl_edge.bench import summarize

    runs = [{"label": "a", "seed": 0, "final_acc_class_il": 0.5}, {"label": "b", "seed": 0, "final_acc_class_il": None},
            {"label": "a", "seed": 1, "final_acc_class_il": 0.4}, {"label": "b", "seed": 1, "final_acc_class_il": 0.6}]
    rows = summarize(runs, ["a", "b"])
    assert rows[1]["class_il_minus_first"]["per_seed"] == [pytest.approx(0.2)]
    assert rows[1]["final_acc_class_il"]["mean"] == pytest.approx(0.6)


def test_a_run_saved_without_the_new_settings_adopts_them_then_pins_them(stream, tmp_path, capsys, profile):
    run = tmp_path / "run"
    full = json.loads((stream.root / "manifest.json").read_text())
    edit_manifest(stream.root, lambda m: m.update(tasks=m["tasks"][:1]))
    assert learn(stream.root, run, profile) == 0
    latest = run / "state" / json.loads((run / "state" / "LATEST").read_text())["checkpoint"] / "state.json"
    saved = json.loads(latest.read_text())
    for key in ("device", "passes", "batch_size", "lr"):  # as a run saved before these settings were recorded
        del saved["extra"]["settings"][key]
    latest.write_text(json.dumps(saved))
    edit_manifest(stream.root, lambda m: m.update(tasks=full["tasks"][:2]))
    assert learn(stream.root, run, profile, "--lr", 0.05) == 0
    assert json.loads((run / "results.json").read_text())["settings"]["lr"] == 0.05
    (stream.root / "manifest.json").write_text(json.dumps(full))
    capsys.readouterr()
    assert learn(stream.root, run, profile) == 2
    assert "lr 0.05 -> None" in one_error(capsys)


def test_eval_lists_a_task_without_a_test_split(stream, tmp_path, capsys, profile):
    edit_manifest(stream.root, lambda m: m["tasks"][1].pop("test"))
    assert learn(stream.root, tmp_path / "run", profile) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"T1\s+no test split", out), out
