import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from esacl_edge import StreamingLearner
from esacl_edge.cli import main
from esacl_edge.data.stream import load_test
from esacl_edge.deploy.encoders import sparsify_initializers
from esacl_edge.errors import ExportError
from esacl_edge.models import prunable_parameters
from esacl_edge.runner import feed

from tests.support import run_without_torch



@pytest.fixture(scope="module")
def learned(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), sparsity=0.9, input_dtype="uint8",
                               normalization=tiny_stream.normalization, buffer_bytes=4480, pattern="2:4",
                               class_names=list(tiny_stream.class_names))
    for _ in feed(learner, tiny_stream):
        pass
    return learner


@pytest.fixture(scope="module")
def test_data(tiny_stream):
    parts = [load_test(tiny_stream, t) for t in range(5)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2))})[0]


def test_sparse_default_is_3x_smaller_with_the_same_outputs(learned, test_data, tmp_path):
    dense = learned.export_onnx(4, tmp_path / "d.onnx", variant="dense")
    sparse = learned.export_onnx(4, tmp_path / "s.onnx")
    assert sparse["variant"] == "sparse" and dense["bytes"] >= 3 * sparse["bytes"]
    x, _ = test_data
    assert np.abs(_logits(tmp_path / "s.onnx", x) - _logits(tmp_path / "d.onnx", x)).max() <= 1e-4
    proto = onnx.load(str(tmp_path / "s.onnx"))
    index_types = {onnx.helper.tensor_dtype_to_np_dtype(sp.indices.data_type) for sp in proto.graph.sparse_initializer}
    assert np.dtype(np.int16) in index_types  # smallest type that holds the indices (conv2 has 18,432 weights)
    assert np.dtype(np.int64) not in index_types


def test_sparsify_keeps_dense_tensors_dense():
    w = np.ones((4, 4), np.float32)
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[onnx.numpy_helper.from_array(w, "w")])
    proto = onnx.helper.make_model(graph)
    assert sparsify_initializers(proto) == 0 and len(proto.graph.initializer) == 1


def test_structured_variant_is_smaller_and_exact(learned, test_data, tmp_path):
    r = learned.export_onnx(4, tmp_path / "st.onnx", variant="structured", test=test_data)
    before, after = r["structure"]["before"], r["structure"]["after"]
    assert sum(after.values()) < sum(before.values())
    assert r["max_abs_diff"] <= 1e-4 and r["accuracy_onnx"] == r["accuracy_torch"]


def test_int8_variant_is_calibrated_on_the_buffer_and_reports_accuracy(learned, test_data, tmp_path):
    r = learned.export_onnx(4, tmp_path / "q.onnx", variant="int8", test=test_data)
    assert r["top1_agreement"] >= 0.9
    assert abs(r["accuracy_onnx"] - r["accuracy_torch"]) <= 0.1
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    learned_no_calib = learned.calibration.pop(3)
    try:
        with pytest.raises(ExportError, match="needs calibration samples"):
            learned.export_onnx(3, tmp_path / "q3.onnx", variant="int8")
    finally:
        learned.calibration[3] = learned_no_calib


def test_2_4_pattern_holds_in_the_exported_weights(learned, tmp_path):
    learned.export_onnx(4, tmp_path / "p.onnx", variant="dense")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    checked = 0
    for name, p in prunable_parameters(learned.model).items():
        w = weights[name]
        assert w.shape == tuple(p.shape)
        if w.shape[1] % 4:
            continue  # conv1 has one input channel: TensorRT leaves it dense too
        groups = np.moveaxis(w, 1, -1).reshape(-1, 4)
        assert ((groups != 0).sum(1) <= 2).all(), name
        checked += 1
    assert checked == 3
    assert learned.sparsity() >= 0.9 - 1e-4


def test_sidecar_describes_the_artifact(learned, tiny_stream, tmp_path):
    learned.export_onnx(2, tmp_path / "m.onnx")
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["task"] == 2 and side["classes"] == [0, 1, 2, 3, 4, 5]
    assert side["class_names"] == ["0", "1", "2", "3", "4", "5"]
    assert side["input"]["shape"] == [-1, 1, 8, 8] and side["input"]["stored_dtype"] == "uint8"
    assert side["input"]["normalization_in_graph"] == tiny_stream.normalization
    assert side["pattern"] == "2:4" and side["opset"] == 18 and side["providers"] == ["CPUExecutionProvider"]
    assert side["bytes"] == (tmp_path / "m.onnx").stat().st_size and side["gzip_bytes"] > 0
    assert set(side["versions"]) >= {"esacl_edge", "torch", "onnx", "onnxruntime"}
    assert set(side["layer_sparsity"]) == set(prunable_parameters(learned.model))


def test_device_runner_needs_no_torch(learned, test_data, tmp_path):
    report = learned.export_onnx(4, tmp_path / "m.onnx", test=test_data)
    x, y = test_data
    np.savez(tmp_path / "d.npz", x=x, y=y)
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--npz", tmp_path / "d.npz", "--json", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["accuracy"] == pytest.approx(report["accuracy_onnx"])
    assert summary["providers"] == ["CPUExecutionProvider"] and summary["latency_ms"]["p50"] > 0
    assert "accuracy" in done.stdout and "p99" in done.stdout


def test_device_runner_reads_image_folders(learned, test_data, tmp_path):
    from PIL import Image

    learned.export_onnx(1, tmp_path / "m.onnx")
    x, y = test_data
    for i in range(8):
        folder = tmp_path / "imgs" / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(folder / f"{i}.png")
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--images", tmp_path / "imgs", "--json",
                              tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    want = (_logits(tmp_path / "m.onnx", x[:8]).argmax(1) == y[:8]).mean()
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == pytest.approx(want)


def test_device_runner_errors_are_one_line(tmp_path, learned):
    learned.export_onnx(0, tmp_path / "m.onnx")
    (tmp_path / "m.onnx.json").unlink()
    proto = onnx.load(str(tmp_path / "m.onnx"))
    del proto.metadata_props[:]  # neither the sidecar nor the metadata in the file
    onnx.save(proto, str(tmp_path / "m.onnx"))
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--random", "4")
    assert done.returncode == 2 and "carries no esacl-edge metadata and has no matching sidecar" in done.stderr and done.stderr.count("\n") == 1


def test_cli_export_variants_from_a_run(tmp_path, tiny_stream, capsys):
    run = tmp_path / "run"
    assert main(["learn", "--stream", str(tiny_stream.root), "--run", str(run), "--buffer-bytes", "4480",
                 "--quiet"]) == 0
    assert (run / "snapshots" / "task_4_calib.npz").is_file()
    for variant in ("int8", "structured"):
        assert main(["export", "--task", "4", str(tmp_path / f"{variant}.onnx"), "--run", str(run),
                     "--variant", variant]) == 0
        out = capsys.readouterr().out
        assert f"({variant}," in out and "accuracy over all test samples of tasks 0..4 pooled" in out
