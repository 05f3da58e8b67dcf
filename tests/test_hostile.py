"""Hostile and broken input: each case gives one error line naming the file and the cause, and
leaves the run folder exactly as it was (same files, same bytes).

Every case starts from a run that has learned task 0 of a small stream and is about to
learn task 1, so a bad chunk is met while real state is at stake.
"""

import errno
import hashlib
import json
import pickle
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

from esacl_edge import checkpoint
from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.device.profiles import load_profile, to_yaml

from tests.support import write_chunk

NEXT = "task1/chunk0000.npz"  # the first chunk the resumed run will read


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-task digits stream and a run folder that has finished task 0 (tasks 1-2 not yet in the manifest)."""
    root = tmp_path_factory.mktemp("hostile")
    stream = root / "stream"
    make_stream("digits", stream, tasks=3, chunk_size=20, seed=0, per_class=10, test_per_class=5)
    profile = root / "tiny.yaml"
    profile.write_text(to_yaml(load_profile("cpu").replace(name="tiny", batch_size=8, passes_per_chunk=1,
                                                           buffer_bytes=2240)))
    full = json.loads((stream / "manifest.json").read_text())
    first = {**full, "tasks": full["tasks"][:1]}
    (stream / "manifest.json").write_text(json.dumps(first))
    assert main(["learn", "--stream", str(stream), "--run", str(root / "run"), "--profile", str(profile),
                 "--quiet"]) == 0
    (stream / "manifest.json").write_text(json.dumps(full))
    return root


def tree(folder):
    """Every file under ``folder`` with its content hash (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_edit(fn):
    def apply(case):
        path = case["stream"] / "manifest.json"
        m = json.loads(path.read_text())
        fn(m)
        path.write_text(json.dumps(m))
    return apply


def chunk_file(case):
    return case["stream"] / NEXT


def replace_chunk(**arrays):
    return lambda case: write_chunk(chunk_file(case), **arrays)


def ok_x(n=4):
    return np.zeros((n, 8, 8, 1), np.uint8)


def truncate(case):
    data = chunk_file(case).read_bytes()
    chunk_file(case).write_bytes(data[: len(data) // 2])


def garbage(case):
    chunk_file(case).write_bytes(b"\x00\x01not a zip at all" * 10)


def pickled(case):
    write_chunk(chunk_file(case), x=np.array([{"evil": 1}], dtype=object), y=np.array([2]))


def as_float_stream(nan_value):
    """Float32 storage (where NaN/Inf can occur) needs a fresh run: the saved one stores uint8."""
    def apply(case):
        case["run"] = case["root"] / "fresh-run"
        m = json.loads((case["stream"] / "manifest.json").read_text())
        m["dtype"] = "float32"
        (case["stream"] / "manifest.json").write_text(json.dumps(m))
        for task in m["tasks"]:
            for rel in task["chunks"] + [task["test"]]:
                with np.load(case["stream"] / rel) as d:
                    x, y = d["x"].astype(np.float32), d["y"]
                if rel == "task0/chunk0000.npz":
                    x[0, 0, 0, 0] = nan_value
                write_chunk(case["stream"] / rel, x=x, y=y)
    return apply


def profile_text(edit):
    def apply(case):
        case["profile"].write_text(edit(case["profile"].read_text()))
    return apply


def state_json(edit):
    def apply(case):
        path = checkpoint.latest(case["run"] / "state") / "state.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    return apply


def state_pt(write):
    """Break state.pt of every saved checkpoint (the latest and the previous one it would fall back to)."""
    def apply(case):
        for folder in sorted((case["run"] / "state").glob("ckpt-*")):
            write(folder / "state.pt")
    return apply


class Evil:
    def __reduce__(self):
        return (print, ("this would run foreign code",))


def evil_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"model/w": Evil()}, f)


def zip_without_y(case):
    with zipfile.ZipFile(chunk_file(case), "w") as z:
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array(f, ok_x())


def move_tasks(case):
    shutil.rmtree(case["stream"] / "task1")


def disk_full(case, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_npz", full)


# (id, how to break things, expected file named in the error, expected cause)
CASES = [
    ("truncated-npz", truncate, NEXT, r"not a readable \.npz file \(truncated or corrupt\)"),
    ("corrupt-npz", garbage, NEXT, r"not a readable \.npz file"),
    ("pickled-object-array", pickled, NEXT, r"holds a pickled object array; only plain numeric arrays"),
    ("nan-input", as_float_stream(np.nan), "task0/chunk0000.npz", r"x contains NaN or Inf"),
    ("inf-input", as_float_stream(np.inf), "task0/chunk0000.npz", r"x contains NaN or Inf"),
    ("label-out-of-range", replace_chunk(x=ok_x(), y=np.array([4, 5, 4, 99])), NEXT,
     r"labels \[99\] are not classes of this task \[4, 5, 6\]"),
    ("label-negative", replace_chunk(x=ok_x(), y=np.array([4, 5, 4, -1])), NEXT, r"labels \[-1\] are not classes"),
    ("label-wrong-dtype", replace_chunk(x=ok_x(), y=np.array([2.0, 3.0, 2.0, 3.0])), NEXT,
     r"y must be a 1-D integer array, got float64"),
    ("label-2d", replace_chunk(x=ok_x(), y=np.array([[2], [3], [2], [3]])), NEXT, r"y must be a 1-D integer array"),
    ("shape-mismatch", replace_chunk(x=np.zeros((4, 9, 9, 1), np.uint8), y=np.array([2, 3, 2, 3])), NEXT,
     r"x has shape \(4, 9, 9, 1\), expected \(N, 8, 8, 1\)"),
    ("dtype-mismatch", replace_chunk(x=ok_x().astype(np.float32), y=np.array([2, 3, 2, 3])), NEXT,
     r"x has dtype float32, the manifest says uint8"),
    ("length-mismatch", replace_chunk(x=ok_x(), y=np.array([2, 3])), NEXT, r"x has 4 samples but y has 2"),
    ("empty-chunk", replace_chunk(x=ok_x(0), y=np.zeros(0, np.int64)), NEXT, r"the chunk is empty"),
    ("missing-array", zip_without_y, NEXT, r"must hold arrays 'x', 'y'; missing 'y'"),
    ("classes-not-declared", replace_chunk(x=ok_x(), y=np.array([4, 5, 7, 8])), NEXT,
     r"labels \[7, 8\] are not classes of this task \[4, 5, 6\]"),
    ("missing-chunk-file", lambda case: chunk_file(case).unlink(), NEXT, r"chunk file not found"),
    ("path-outside-stream", manifest_edit(lambda m: m["tasks"][1]["chunks"].insert(0, "../../etc/passwd")),
     "manifest.json", r"tasks\[1\]: chunk '\.\./\.\./etc/passwd' points outside the stream directory"),
    ("absolute-path", manifest_edit(lambda m: m["tasks"][1].update(test="/etc/passwd")),
     "manifest.json", r"tasks\[1\]: test '/etc/passwd' points outside the stream directory"),
    ("duplicate-chunk", manifest_edit(lambda m: m["tasks"][2]["chunks"].append(m["tasks"][1]["chunks"][0])),
     "manifest.json", r"tasks\[2\]: chunk 'task1/chunk0000\.npz' is listed twice in the stream"),
    ("task-class-out-of-range", manifest_edit(lambda m: m["tasks"][2].update(classes=[4, 12])),
     "manifest.json", r"tasks\[2\]: classes must be non-empty and within 0\.\.9, got \[4, 12\]"),
    ("manifest-not-json", lambda case: (case["stream"] / "manifest.json").write_text("{ not json"),
     "manifest.json", r"not valid JSON"),
    ("manifest-newer-version", manifest_edit(lambda m: m.update(version=7)), "manifest.json",
     r"unsupported version 7 \(this esacl-edge reads 1\)"),
    ("manifest-missing", lambda case: (case["stream"] / "manifest.json").unlink(), "manifest.json",
     r"manifest not found"),
    ("missing-test-split", lambda case: (case["stream"] / "test" / "task2.npz").unlink(), "test/task2.npz",
     r"test file of task 2 not found"),
    ("yaml-malformed", profile_text(lambda t: t + "\n  : [unclosed\n"), "tiny.yaml", r"not valid YAML"),
    ("yaml-unknown-field", profile_text(lambda t: t.replace("  batch_size: 8", "  batch_size: 8\n  batchsize: 9")),
     "tiny.yaml", r"training\.batchsize"),
    ("yaml-negative-budget", profile_text(lambda t: t.replace("buffer_bytes: 2240", "buffer_bytes: -5")),
     "tiny.yaml", r"budgets\.buffer_bytes'?: must be"),
    ("checkpoint-of-another-model", state_json(lambda m: m["spec"].update(num_classes=20)), "state",
     r"saved for another model setup: num_classes 20 was saved, this run has 10$"),
    ("checkpoint-other-normalization", state_json(lambda m: m["spec"]["normalization"].update(scale=1.0)), "state",
     r"saved for another model setup: normalization \{'scale': 1.0.* was saved, this run has \{'scale': 0.0625"),
    ("checkpoint-newer-schema", state_json(lambda m: m.update(schema=3)), "state.json",
     r"written by a newer esacl-edge .*schema 3.*reads schema 2: upgrade esacl-edge"),
    ("checkpoint-pickled-object", state_pt(evil_pickle), "state.pt",
     r"not a readable state file.*; the previous saved state does not read either"),
    ("checkpoint-truncated", state_pt(lambda p: p.write_bytes(p.read_bytes()[:100])), "state.pt",
     r"not a readable state file: truncated or corrupt.*; the previous saved state does not read either"),
    ("checkpoint-pointer-dangling", lambda case: ((case["run"] / "state" / "LATEST").write_text(
        '{"checkpoint": "ckpt-999999"}'), state_pt(lambda p: p.write_bytes(b""))(case)), "LATEST",
     r"names checkpoint 'ckpt-999999', which does not exist"),
    ("checkpoint-weights-wrong-shape", state_pt(lambda p: torch.save(
        {k: (v[:1] if k.startswith("model/") and v.ndim else v)
         for k, v in torch.load(p, weights_only=True).items()}, p)), "state", r"weights do not fit this model"),
    ("disk-full-while-saving", disk_full, "state", r"cannot save the learner state \(the disk is full\); "
     r"the previous saved state is kept"),
    ("run-folder-is-a-file", lambda case: case.update(run=case["root"] / "a-file") or
     (case["root"] / "a-file").write_text("x"), "a-file", r"is a file, not a run folder"),
]


@pytest.mark.parametrize("name,breaks,names,cause", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_error_and_changes_nothing(base, tmp_path, capsys, monkeypatch,
                                                              name, breaks, names, cause):
    shutil.copytree(base / "stream", tmp_path / "stream")
    shutil.copytree(base / "run", tmp_path / "run")
    shutil.copy(base / "tiny.yaml", tmp_path / "tiny.yaml")
    case = {"root": tmp_path, "stream": tmp_path / "stream", "run": tmp_path / "run", "profile": tmp_path / "tiny.yaml"}
    if breaks is disk_full:
        breaks(case, monkeypatch)
    else:
        breaks(case)
    before = tree(case["run"])
    code = main(["learn", "--stream", str(case["stream"]), "--run", str(case["run"]), "--profile",
                 str(case["profile"]), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and err.startswith("esacl-edge: error: "), err
    assert names in err.split(": error: ")[1].split(": ")[0] or names in err, err  # the file comes first
    assert re.search(cause, err), err
    assert tree(case["run"]) == before
    assert "this would run foreign code" not in capsys.readouterr().out


def test_export_to_an_unwritable_path_is_one_error_and_writes_nothing(base, tmp_path, capsys):
    (tmp_path / "not-a-folder").write_text("x")
    target = tmp_path / "not-a-folder" / "model.onnx"
    before = tree(base / "run")
    assert main(["export", "--task", "0", str(target), "--run", str(base / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"esacl-edge: error: {target}: ") and "\n" not in err
    assert tree(base / "run") == before and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_export_of_a_snapshot_from_another_model_is_refused(base, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    meta = json.loads((run / "snapshots" / "task_0.json").read_text())
    meta["spec"]["num_classes"] = 12
    (run / "snapshots" / "task_0.json").write_text(json.dumps(meta))
    assert main(["export", "--task", "0", str(tmp_path / "m.onnx"), "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"esacl-edge: error: {run / 'snapshots' / 'task_0.pt'}: ") and "shape" in err
    assert not (tmp_path / "m.onnx").exists()
