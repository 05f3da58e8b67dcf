"""Crash-safe resume: exactly-once chunks, identical results, signals, changed chunks, following a stream."""

import copy
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from esacl_edge import StreamingLearner, checkpoint
from esacl_edge.cli import main
from esacl_edge.data.stream import iter_chunks
from esacl_edge.errors import CheckpointError
from esacl_edge.runner import learn

from tests.support import write_chunk


def _learn(stream, run, profile, **kw):
    return learn(stream.root, profile=profile, run_dir=run, sparsity=0.8, buffer_bytes=2240, progress=False, **kw)


def _snapshot_tensors(run, task):
    return torch.load(run / "snapshots" / f"task_{task}.pt", weights_only=True)


class Crash(BaseException):
    """Stands in for a power loss (not caught by anything in esacl-edge)."""


@pytest.mark.parametrize("when", ["after_commit", "before_commit"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny_stream, fast_profile, tmp_path, monkeypatch, when):
    ref = _learn(tiny_stream, tmp_path / "ref", fast_profile)
    real_save, real_write_json = checkpoint.save, checkpoint.write_json
    calls = []

    def crashing_save(folder, learner, extra=None):
        calls.append(1)
        if len(calls) == 4 and when == "before_commit":  # chunk 4 is written but LATEST still names chunk 3
            monkeypatch.setattr(checkpoint, "write_json", lambda path, data: (_ for _ in ()).throw(Crash()))
        out = real_save(folder, learner, extra)
        if len(calls) == 4:
            raise Crash()
        return out

    monkeypatch.setattr(checkpoint, "save", crashing_save)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        _learn(tiny_stream, run, fast_profile)
    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.setattr(checkpoint, "write_json", real_write_json)
    state = checkpoint.read(checkpoint.latest(run / "state"))[2]
    assert len(state["extra"]["consumed"]) == (4 if when == "after_commit" else 3)
    assert len(list((run / "state").glob("ckpt-*"))) == (2 if when == "after_commit" else 3)  # + the previous

    r = _learn(tiny_stream, run, fast_profile)
    assert r["complete"] and r["resumed_at_chunk"] == len(state["extra"]["consumed"])
    consumed = [c["chunk"] for c in r["consumed_chunks"]]
    assert consumed == [c for t in tiny_stream.tasks for c in t.chunks]  # each once, in order
    assert r["acc_matrix_class_il"] == ref["acc_matrix_class_il"]
    assert r["samples_trained"] == ref["samples_trained"] and r["train_flops"] == ref["train_flops"]
    for task in range(5):
        a, b = _snapshot_tensors(run, task), _snapshot_tensors(tmp_path / "ref", task)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (run / "state").iterdir()] != [] and len(list((run / "state").glob("ckpt-*"))) == 2


def test_learner_state_round_trip_continues_identically(tiny_stream, fast_profile, tmp_path):
    chunks = list(iter_chunks(tiny_stream))[:4]

    def fresh():
        return StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), sparsity=0.8, buffer_bytes=2240,
                                input_dtype="uint8", normalization=tiny_stream.normalization, seed=3)

    a = fresh()
    for c in chunks[:3]:
        a.observe(c.x, c.y, c.task)
    a.save_state(tmp_path / "state")
    b = fresh()
    assert b.load_state(tmp_path / "state") is True
    assert fresh().load_state(tmp_path / "nothing-here") is False
    for learner in (a, b):
        learner.observe(chunks[3].x, chunks[3].y, chunks[3].task)
        learner.end_task()
    assert a.snapshots.keys() == b.snapshots.keys() == {0, 1}
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert np.array_equal(a.buffer.x[: a.buffer.size], b.buffer.x[: b.buffer.size])
    assert a.prune_events == b.prune_events and a.samples_trained == b.samples_trained


def test_disk_full_while_saving_keeps_the_previous_state(tiny_stream, fast_profile, tmp_path, monkeypatch):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8")
    chunk = next(iter_chunks(tiny_stream))
    learner.observe(chunk.x, chunk.y, 0)
    first = learner.save_state(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_npz", full)
    learner.observe(chunk.x, chunk.y, 0)
    with pytest.raises(CheckpointError, match=r"state: cannot save the learner state \(the disk is full\); "
                                              r"the previous saved state is kept"):
        learner.save_state(tmp_path)
    assert checkpoint.latest(tmp_path / "state") == first
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["LATEST", first.name]


def test_a_chunk_changed_after_learning_is_reported_not_relearned(tiny_stream, fast_profile, tmp_path):
    import shutil

    stream = tmp_path / "stream"
    shutil.copytree(tiny_stream.root, stream)
    from esacl_edge.data.stream import read_manifest

    manifest = read_manifest(stream)
    first = _learn(manifest, tmp_path / "run", fast_profile)
    x = np.zeros((5, 8, 8, 1), np.uint8)
    write_chunk(stream / manifest.tasks[0].chunks[1], x, np.zeros(5, np.int64))
    with pytest.warns(RuntimeWarning, match=r"chunk0001.npz: changed since it was learned \(sha256 [0-9a-f]{12}"):
        again = _learn(manifest, tmp_path / "run", fast_profile)
    assert again["chunks_consumed"] == first["chunks_consumed"] == 10
    assert again["reported_chunks"] == [{"chunk": manifest.tasks[0].chunks[1], "reason": "changed"}]
    assert again["acc_matrix_class_il"] == first["acc_matrix_class_il"]


def _copy_stream(tiny_stream, folder):
    import shutil

    shutil.copytree(tiny_stream.root, folder)
    return folder


def _edit_manifest(stream, edit):
    path = stream / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_path_aliases_of_one_chunk_are_one_chunk(tiny_stream, fast_profile, tmp_path):
    from esacl_edge.data.stream import read_manifest
    from esacl_edge.errors import StreamError

    stream = _copy_stream(tiny_stream, tmp_path / "stream")
    first = tiny_stream.tasks[0].chunks[0]
    _edit_manifest(stream, lambda m: m["tasks"][0]["chunks"].append(f"./{first}"))
    with pytest.raises(StreamError, match=rf"chunk '{first}' is listed twice in the stream"):
        read_manifest(stream)
    _edit_manifest(stream, lambda m: m["tasks"][0]["chunks"].__setitem__(-1, "task0/../task0//" + first[6:]))
    with pytest.raises(StreamError, match="listed twice"):
        read_manifest(stream)
    (stream / "alias.npz").symlink_to(stream / first)  # another name, the same file
    _edit_manifest(stream, lambda m: m["tasks"][0]["chunks"].__setitem__(-1, "alias.npz"))
    with pytest.raises(StreamError, match=rf"chunk '(alias.npz|{first})' is listed twice in the stream \(as "):
        read_manifest(stream)


def test_a_copy_of_a_learned_chunk_is_reported_not_learned_again(tiny_stream, fast_profile, tmp_path):
    import shutil

    from esacl_edge.data.stream import read_manifest

    stream = _copy_stream(tiny_stream, tmp_path / "stream")
    first = tiny_stream.tasks[0].chunks[0]
    shutil.copy(stream / first, stream / "task0" / "copy.npz")  # the same bytes under another name
    _edit_manifest(stream, lambda m: m["tasks"][0]["chunks"].append("task0/copy.npz"))
    with pytest.warns(RuntimeWarning, match=rf"copy.npz: has the same bytes as {first}, learned already"):
        r = _learn(read_manifest(stream), tmp_path / "run", fast_profile)
    assert r["chunks_consumed"] == 10 and r["samples_learned"] == sum(len(c.y) for c in iter_chunks(tiny_stream))
    assert r["reported_chunks"] == [{"chunk": "task0/copy.npz", "reason": "duplicate"}]


def test_a_finished_run_refuses_another_stream_but_follows_its_own_moved(tiny_stream, fast_profile, tmp_path):
    from esacl_edge.data.build import make_stream
    from esacl_edge.errors import EsaclError

    run = tmp_path / "run"
    first = _learn(tiny_stream, run, fast_profile)
    other = make_stream("digits", tmp_path / "other", tasks=5, chunk_size=24, seed=1, per_class=20,
                        test_per_class=10)
    before = (run / "results.json").read_text()
    with pytest.raises(EsaclError, match=rf"{run}: was learned from the stream {tiny_stream.root}; {other.root} is "
                                         r"not that stream moved \(10 of the 10 chunks learned are missing or differ"):
        _learn(other, run, fast_profile)
    assert (run / "results.json").read_text() == before
    moved = _copy_stream(tiny_stream, tmp_path / "moved")
    from esacl_edge.data.stream import read_manifest

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same stream moved: nothing to report
        again = _learn(read_manifest(moved), run, fast_profile)
    assert again["acc_matrix_class_il"] == first["acc_matrix_class_il"] and again["chunks_consumed"] == 10
    assert json.loads((run / "results.json").read_text())["stream"] == str(moved.resolve())


@pytest.mark.parametrize("damage", ["state.pt", "state.json", "LATEST"])
def test_a_damaged_latest_state_falls_back_to_the_previous_one(tiny_stream, fast_profile, tmp_path, damage):
    ref = _learn(tiny_stream, tmp_path / "ref", fast_profile)
    run = tmp_path / "run"
    _learn(tiny_stream, run, fast_profile)
    latest = checkpoint.latest(run / "state")
    (latest / damage if damage != "LATEST" else run / "state" / "LATEST").write_bytes(b"\x00garbage")
    # A damaged pointer: the newest complete checkpoint; a damaged checkpoint: the one before it.
    used = sorted((run / "state").glob("ckpt-*"))[-1 if damage == "LATEST" else 0]
    consumed = checkpoint.read(used)[2]["extra"]["consumed"]
    with pytest.warns(RuntimeWarning, match=rf"; resuming from the saved state {used} instead, saved after "
                                            rf"chunk {len(consumed)} \({consumed[-1]['chunk']}\)"):
        again = _learn(tiny_stream, run, fast_profile, overwrite=False)
    assert again["resumed_at_chunk"] == len(consumed) == (10 if damage == "LATEST" else 9) and again["complete"]
    assert [c["chunk"] for c in again["consumed_chunks"]] == [c for t in tiny_stream.tasks for c in t.chunks]
    assert again["acc_matrix_class_il"] == ref["acc_matrix_class_il"]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _profile(tmp_path, passes):
    from esacl_edge.device.profiles import load_profile, to_yaml

    path = tmp_path / "p.yaml"
    path.write_text(to_yaml(load_profile("cpu").replace(name="test", batch_size=8, passes_per_chunk=passes)))
    return path


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_current_chunk_and_the_same_command_resumes(tiny_stream, tmp_path, sig):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "esacl_edge.cli", "learn", "--stream", str(tiny_stream.root), "--run", str(run),
           "--profile", str(_profile(tmp_path, 3)), "--quiet", "--sparsity", "0.8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert _wait_for(lambda: (run / "state" / "LATEST").exists())
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name} after" in err and "Traceback" not in err
    r = json.loads((run / "results.json").read_text())
    assert not r["complete"] and r["stopped_by"] == sig.name and 1 <= r["chunks_consumed"] < 10
    state = checkpoint.read(checkpoint.latest(run / "state"))[2]
    assert len(state["extra"]["consumed"]) == r["chunks_consumed"]

    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed {run} after {r['chunks_consumed']} chunks" in done.stdout
    final = json.loads((run / "results.json").read_text())
    names = [c["chunk"] for c in final["consumed_chunks"]]
    assert final["complete"] and len(names) == len(set(names)) == 10


def test_follow_learns_chunks_dropped_into_a_folder(tiny_stream, tmp_path):
    import shutil

    stream = tmp_path / "stream"
    shutil.copytree(tiny_stream.root, stream)
    manifest = json.loads((stream / "manifest.json").read_text())
    manifest["tasks"] = manifest["tasks"][:2]
    dropped = manifest["tasks"][1]["chunks"]
    manifest["tasks"][1]["chunks"] = []
    manifest["tasks"][1]["chunk_dir"] = "incoming"
    (stream / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "esacl_edge.cli", "learn", "--stream", str(stream), "--run", str(run),
           "--profile", str(_profile(tmp_path, 1)), "--quiet", "--follow", "--poll", "0.2", "--max-idle", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())

    def consumed():
        try:
            latest = checkpoint.latest(run / "state")
            return [] if latest is None else checkpoint.read(latest)[2]["extra"]["consumed"]
        except CheckpointError:   # the running job replaced that checkpoint while we read it: poll again
            return []

    assert _wait_for(lambda: len(consumed()) == 2)  # task 0 learned, task 1 not started: it has no chunks yet
    assert not (run / "snapshots" / "task_0.pt").exists()  # task 0 stays open until task 1 begins
    (stream / "incoming").mkdir()
    (stream / "incoming" / ".partial.npz").write_bytes(b"being written")  # hidden: not a chunk yet
    for i, rel in enumerate(dropped):
        os.replace(shutil.copy(stream / rel, stream / "incoming" / f".c{i}.tmp"), stream / "incoming" / f"c{i}.npz")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    r = json.loads((run / "results.json").read_text())
    assert [c["chunk"] for c in r["consumed_chunks"]] == manifest["tasks"][0]["chunks"] + ["incoming/c0.npz",
                                                                                         "incoming/c1.npz"]
    assert r["complete"] and [len(row) for row in r["acc_matrix_class_il"]] == [1, 2]


def test_cli_resume_with_other_settings_is_refused(tiny_stream, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["learn", "--stream", str(tiny_stream.root), "--run", str(run), "--quiet", "--profile",
              str(_profile(tmp_path, 1))]
    assert main([*common, "--method", "finetune"]) == 0
    capsys.readouterr()
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings (method 'finetune' -> 'esacl')" in err


def _state_learner(stream, profile):
    return StreamingLearner("small_cnn", profile, 10, (8, 8, 1), sparsity=0.8, buffer_bytes=2240,
                            input_dtype="uint8", normalization=stream.normalization, seed=3)


def _saved_after_task_0(stream, profile, folder):
    """A learner that finished task 0 (by itself: the task's length was known) and is inside task 1, saved."""
    learner = _state_learner(stream, profile)
    for c in list(iter_chunks(stream))[:3]:
        learner.observe(c.x, c.y, c.task, n_chunks=2)
    assert sorted(learner.snapshots) == [0] and learner.progress.task == 1
    return learner, learner.save_state(folder)


def test_saved_state_refers_to_the_snapshots_instead_of_copying_them(tiny_stream, fast_profile, tmp_path):
    import hashlib

    a, path = _saved_after_task_0(tiny_stream, fast_profile, tmp_path)
    tensors = torch.load(path / "state.pt", weights_only=True)
    assert "model/1.conv1.weight" in tensors
    assert [k for k in tensors if "snapshot" in k] == []
    pt = tmp_path / "snapshots" / "task_0.pt"
    meta = json.loads((path / "state.json").read_text())
    assert meta["snapshots"] == {"0": hashlib.sha256(pt.read_bytes()).hexdigest()}
    b = _state_learner(tiny_stream, fast_profile)
    assert b.load_state(tmp_path) is True
    assert b.snapshots.keys() == {0} and b.snapshots[0].keys() == a.snapshots[0].keys()
    assert all(torch.equal(b.snapshots[0][k], v) for k, v in a.snapshots[0].items())
    # The snapshot is read from the run's snapshots/ folder: without it the state cannot be resumed.
    pt.rename(tmp_path / "task_0.pt.moved")
    with pytest.raises(CheckpointError, match=re.escape(f"{pt}: the saved state needs this snapshot")):
        _state_learner(tiny_stream, fast_profile).load_state(tmp_path)


def test_a_snapshot_changed_after_the_state_was_saved_is_refused_by_name(tiny_stream, fast_profile, tmp_path):
    _saved_after_task_0(tiny_stream, fast_profile, tmp_path)
    pt = tmp_path / "snapshots" / "task_0.pt"
    tensors = torch.load(pt, weights_only=True)
    key = next(k for k in tensors if k.endswith("::values"))
    tensors[key] = tensors[key] + 1.0
    torch.save(tensors, pt)  # a well-formed snapshot file, just not the one the state was saved with
    with pytest.raises(CheckpointError, match=re.escape(f"{pt}: differs from the snapshot")):
        _state_learner(tiny_stream, fast_profile).load_state(tmp_path)


def test_a_schema_1_state_is_refused_with_what_to_do(tiny_stream, fast_profile, tmp_path):
    _, path = _saved_after_task_0(tiny_stream, fast_profile, tmp_path)
    meta_path = path / "state.json"
    meta = json.loads(meta_path.read_text())
    assert meta["schema"] == checkpoint.SCHEMA == 2
    meta["schema"] = 1
    meta_path.write_text(json.dumps(meta))
    learner = _state_learner(tiny_stream, fast_profile)
    with pytest.raises(CheckpointError) as info:
        learner.load_state(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{meta_path}: ") and "schema 1" in msg
    assert "finish that run with the version that started it" in msg and "--overwrite" in msg
    assert learner.progress.task == -1 and learner.samples_trained == 0  # nothing was restored


def test_a_state_of_the_earlier_format_resumes_as_the_current_one(tiny_stream, fast_profile):
    """States without the loss scale ("precision") or the buffer's "qparams" load through learn.migrate."""
    chunks = list(iter_chunks(tiny_stream))
    a = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8", buffer_bytes=2240)
    for chunk in chunks[:2]:  # within the first task: no snapshot to write
        a.observe(chunk.x, chunk.y, chunk.task)
    state = copy.deepcopy(a.state_dict())  # as read back from disk: no tensor shared with a
    assert state["buffer"]["qparams"].shape == (a.buffer.size, 0) and "precision" in state
    old = {k: v for k, v in state.items() if k != "precision"}
    old["buffer"] = {k: v for k, v in state["buffer"].items() if k != "qparams"}
    b = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8", buffer_bytes=2240)
    b.load_state_dict(old, Path("."), "old state")
    assert "qparams" not in old["buffer"] and "precision" not in old  # the saved dict is left as it was
    for chunk in chunks[2:4]:
        a.observe(chunk.x, chunk.y, chunk.task)
        b.observe(chunk.x, chunk.y, chunk.task)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert np.array_equal(a.buffer.logits[: a.buffer.size], b.buffer.logits[: b.buffer.size])


def test_a_state_saved_in_a_later_task_without_first_task_resumes_as_a_later_task(tiny_stream, fast_profile,
                                                                                 tmp_path):
    """learn.migrate derives "first_task" from the tasks the state has seen: in task 1 the schedule of a later
    task goes on (tasks of unknown length: a later task prunes a share of the gap each chunk, the first none)."""
    chunks = list(iter_chunks(tiny_stream))
    a = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8", buffer_bytes=2240,
                         sparsity=0.8)
    for chunk in chunks[:3]:   # task 0, then task 1's first chunk (ending task 0)
        a.observe(chunk.x, chunk.y, chunk.task)
    a.save_state(tmp_path)
    state = copy.deepcopy(a.state_dict())
    assert state["progress"]["task"] == 1 and state["progress"]["first_task"] is False
    del state["progress"]["first_task"]
    b = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8", buffer_bytes=2240,
                         sparsity=0.8)
    b.load_state_dict(state, tmp_path, "old state")
    assert b.progress.first_task is False
    a.observe(chunks[3].x, chunks[3].y, 1)
    b.observe(chunks[3].x, chunks[3].y, 1)
    assert a.prune_events == b.prune_events and a.prune_events[-1]["task"] == 1
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_logits_carry_no_autograd_graph(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8")
    chunk = next(iter(iter_chunks(tiny_stream)))
    assert not learner.logits(chunk.x).requires_grad
    assert learner.predict(chunk.x).shape == (len(chunk.x),)
