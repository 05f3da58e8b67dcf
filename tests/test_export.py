import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import load_test
from esacl_edge.deploy.parity import parity
from esacl_edge.errors import EsaclError, ExportError
from esacl_edge.runner import feed


@pytest.fixture(scope="module")
def learned(tiny_stream, fast_profile):
    """A learner that went through three tasks of the tiny stream at 80% sparsity."""
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), sparsity=0.8, input_dtype="uint8",
                               normalization=tiny_stream.normalization, buffer_bytes=4000)
    for chunk, _ in feed(learner, tiny_stream):
        if chunk.task == 2 and chunk.index == chunk.n_chunks - 1:
            return learner


def _run(path, x_nhwc):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.ascontiguousarray(x_nhwc.astype(np.float32).transpose(0, 3, 1, 2))})[0]


def test_export_is_one_file_with_masks_baked_and_dynamic_batch(learned, tiny_stream, tmp_path):
    out = tmp_path / "m.onnx"
    report = learned.export_onnx(2, out, variant="dense")
    assert report["max_abs_diff"] <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.json"]  # no external data, no temp file left
    proto = onnx.load(str(out))
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    # Masks are baked in: the conv/linear weights themselves hold the zeros, no mask tensors.
    weights = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.dims and len(i.dims) in (2, 4)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.size for w in weights)
    assert zeros / total == pytest.approx(learned.sparsity(), abs=0.01)
    assert not any(i.data_type == onnx.TensorProto.BOOL for i in proto.graph.initializer)
    # Dynamic batch: any batch size runs and agrees with PyTorch.
    x, y = load_test(tiny_stream, 1)
    model = learned.snapshot_model(2)
    for n in (1, 3, len(x)):
        with torch.no_grad():
            want = model(torch.from_numpy(x[:n].astype(np.float32)).permute(0, 3, 1, 2)).numpy()
        assert np.abs(_run(out, x[:n]) - want).max() <= 1e-4


def test_snapshot_of_task_n_exports_task_n_not_the_latest(learned, tiny_stream, tmp_path):
    x, _ = load_test(tiny_stream, 0)
    learned.export_onnx(0, tmp_path / "t0.onnx")
    learned.export_onnx(2, tmp_path / "t2.onnx")
    out0, out2 = _run(tmp_path / "t0.onnx", x), _run(tmp_path / "t2.onnx", x)
    assert np.abs(out0 - out2).max() > 1e-2
    with torch.no_grad():
        t0 = learned.snapshot_model(0)(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)).numpy()
        live = learned.logits(x).numpy()
    assert np.abs(out0 - t0).max() <= 1e-4
    assert np.abs(out2 - live).max() <= 1e-4  # the last task's snapshot is the live model


def test_export_errors(learned, tmp_path):
    with pytest.raises(EsaclError, match="no snapshot for task 7"):
        learned.export_onnx(7, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        learned.export_onnx(0, tmp_path / "missing" / "x.onnx")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ExportError, match="does not exist"):
        learned.export_onnx(0, tmp_path / "a_file" / "x.onnx")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing half-written


def test_unwritable_folder(learned, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ExportError, match="not writable"):
        learned.export_onnx(0, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_parity_check_catches_a_wrong_file(learned, tmp_path):
    learned.export_onnx(0, tmp_path / "t0.onnx")
    x = np.random.default_rng(0).uniform(0, 16, (4, 8, 8, 1)).astype(np.float32)
    assert parity(tmp_path / "t0.onnx", learned.snapshot_model(0), x) <= 1e-4
    assert parity(tmp_path / "t0.onnx", learned.snapshot_model(2), x) > 1e-3
