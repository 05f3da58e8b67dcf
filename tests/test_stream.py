import json
import shutil

import numpy as np
import pytest

from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.data.stream import iter_chunks, read_manifest
from esacl_edge.data.write import write_stream
from esacl_edge.errors import StreamError

from tests.support import write_chunk


@pytest.fixture
def stream(tmp_path, tiny_stream):
    """A private copy of the tiny stream that a test may break."""
    dst = tmp_path / "stream"
    shutil.copytree(tiny_stream.root, dst)
    return read_manifest(dst)


def test_make_stream_digits_layout(tiny_stream):
    m = tiny_stream
    assert m.input_shape == (8, 8, 1) and m.dtype == "uint8" and m.num_classes == 10
    assert [t.classes for t in m.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    chunks = list(iter_chunks(m))
    assert [c.task for c in chunks] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [len(c.y) for c in chunks[:2]] == [24, 16]  # 40 samples per task, chunks of 24
    for c in chunks:
        assert set(np.unique(c.y)) <= set(m.tasks[c.task].classes)
    assert m.normalization["scale"] == pytest.approx(1 / 16)
    assert m.class_names == tuple(str(i) for i in range(10))


def test_make_stream_is_deterministic_under_seed(tmp_path):
    a = make_stream("digits", tmp_path / "a", tasks=2, chunk_size=50, seed=3, per_class=10)
    b = make_stream("digits", tmp_path / "b", tasks=2, chunk_size=50, seed=3, per_class=10)
    for ca, cb in zip(iter_chunks(a), iter_chunks(b)):
        assert np.array_equal(ca.x, cb.x) and np.array_equal(ca.y, cb.y)


def test_make_stream_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (60, 28, 28, 1), dtype=np.uint8),
             y_train=np.repeat(np.arange(4), 15), x_test=rng.integers(0, 255, (20, 28, 28, 1), dtype=np.uint8),
             y_test=np.repeat(np.arange(4), 5))
    m = make_stream(f"npz:{tmp_path / 'd.npz'}", tmp_path / "s", tasks=2, chunk_size=16)
    assert m.input_shape == (28, 28, 1) and m.num_classes == 4 and len(m.tasks) == 2
    assert [len(t.chunks) for t in m.tasks] == [2, 2]
    assert m.normalization["scale"] == pytest.approx(1 / 255)


def test_stream_written_by_numpy_alone_is_readable(tmp_path):
    """The documented format, written without esacl-edge."""
    root = tmp_path / "s"
    rng = np.random.default_rng(0)
    for t in range(2):
        for c in range(2):
            write_chunk(root / f"t{t}_{c}.npz", rng.random((5, 3, 3, 2), dtype=np.float32),
                        np.array([2 * t, 2 * t + 1, 2 * t, 2 * t, 2 * t + 1]))
        write_chunk(root / f"test{t}.npz", rng.random((4, 3, 3, 2), dtype=np.float32),
                    np.array([2 * t, 2 * t + 1] * 2))
    (root / "manifest.json").write_text(json.dumps({
        "format": "esacl-stream", "version": 1, "input_shape": [3, 3, 2], "dtype": "float32",
        "num_classes": 4, "tasks": [{"classes": [2 * t, 2 * t + 1], "chunks": [f"t{t}_0.npz", f"t{t}_1.npz"],
                                     "test": f"test{t}.npz"} for t in range(2)]}))
    m = read_manifest(root)
    assert len(list(iter_chunks(m))) == 4 and m.class_names is None


BAD_CHUNKS = {
    "wrong shape": (lambda: (np.zeros((4, 7, 8, 1), np.uint8), np.zeros(4, np.int64)), "has shape (4, 7, 8, 1)"),
    "wrong dtype": (lambda: (np.zeros((4, 8, 8, 1), np.float64), np.zeros(4, np.int64)), "dtype float64"),
    "labels out of range": (lambda: (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 1, 12])),
                            "labels [12] are not classes of this task"),
    "labels of another task": (lambda: (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 1, 3])),
                               "labels [3] are not classes"),
    "float labels": (lambda: (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.float32)), "integer array"),
    "length mismatch": (lambda: (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3, np.int64)), "4 samples but y has 3"),
    "empty": (lambda: (np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64)), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_malformed_chunk_gives_one_clear_error_naming_the_file(stream, case):
    make, expected = BAD_CHUNKS[case]
    target = stream.path(stream.tasks[0].chunks[1])
    write_chunk(target, *make())
    with pytest.raises(StreamError) as err:
        list(iter_chunks(stream))
    assert str(target) in str(err.value) and expected in str(err.value)


def test_missing_chunk_file(stream):
    target = stream.path(stream.tasks[1].chunks[0])
    target.unlink()
    with pytest.raises(StreamError, match="chunk file not found") as err:
        list(iter_chunks(stream))
    assert str(target) in str(err.value)


def test_pickled_object_array_is_refused(stream):
    target = stream.path(stream.tasks[0].chunks[0])
    write_chunk(target, np.array([{"evil": 1}] * 4, dtype=object), np.zeros(4, np.int64))
    with pytest.raises(StreamError, match="pickled object array") as err:
        list(iter_chunks(stream))
    assert str(target) in str(err.value)


def test_truncated_chunk(stream):
    target = stream.path(stream.tasks[0].chunks[0])
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(StreamError, match="not a readable .npz") as err:
        list(iter_chunks(stream))
    assert str(target) in str(err.value)


def test_nan_inputs_in_float_stream(tmp_path):
    x = np.zeros((4, 2, 2, 1), np.float32)
    m = write_stream(tmp_path / "s", name="f", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x,
                     y_test=np.array([0, 1, 0, 1]), task_classes=[[0, 1]], num_classes=2)
    bad = m.path(m.tasks[0].chunks[0])
    x[1, 0, 0, 0] = np.nan
    write_chunk(bad, x, np.array([0, 1, 0, 1]))
    with pytest.raises(StreamError, match="NaN or Inf"):
        list(iter_chunks(m))


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m.update(input_shape=[8, 8]), "input_shape must be [H, W, C]"),
    (lambda m: m.update(dtype="int32"), "dtype must be one of"),
    (lambda m: m["tasks"][0].update(chunks=["../../etc/passwd"]), "points outside the stream directory"),
    (lambda m: m["tasks"][0].update(classes=[0, 11]), "within 0..9"),
    (lambda m: m["tasks"][1].update(chunks=m["tasks"][0]["chunks"]), "listed twice"),
    (lambda m: m.update(format="other"), "not an esacl-stream manifest"),
    (lambda m: m.update(version=99), "unsupported version 99"),
])
def test_bad_manifest(stream, edit, expected):
    path = stream.root / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(StreamError, match=expected.replace("[", r"\[").replace("]", r"\]")) as err:
        read_manifest(stream.root)
    assert str(path) in str(err.value)


def test_cli_learn_reports_bad_chunk_on_one_line(stream, tmp_path, capsys):
    target = stream.path(stream.tasks[0].chunks[0])
    write_chunk(target, np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64))
    code = main(["learn", "--stream", str(stream.root), "--run", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("esacl-edge: error:") and str(target) in err
    assert "Traceback" not in err
