"""The GPU path on a real GPU: mixed precision, a step without host syncs, the buffer's device copy,
and export parity on onnxruntime's CUDA provider. Skipped where CUDA is not available."""

import numpy as np
import pytest
import torch

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks, load_test
from esacl_edge.deploy.parity import onnx_logits
from esacl_edge.device.profiles import load_profile
from esacl_edge.learn.step import train_step

pytestmark = pytest.mark.cuda


def _learner(tiny_stream, precision, method="esacl"):
    profile = load_profile("cuda_desktop").replace(passes_per_chunk=4, batch_size=16, precision=precision)
    return StreamingLearner("small_cnn", profile, 10, (8, 8, 1), method=method, sparsity=0.5, input_dtype="uint8",
                            normalization=tiny_stream.normalization, buffer_bytes=2240)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_learns_on_the_gpu_in_each_precision(tiny_stream, precision):
    learner = _learner(tiny_stream, precision, method="derpp")
    assert learner.device.type == "cuda" and learner.buffer_copy is not None
    for chunk in iter_chunks(tiny_stream):
        if chunk.task > 1:
            break
        learner.observe(chunk.x, chunk.y, chunk.task, n_chunks=2)
    assert learner.precision.name == precision
    assert learner.evaluate(*load_test(tiny_stream, 0), task=0)["task_il"] >= 0.5
    assert all(torch.isfinite(p).all() for p in learner.model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_gpu_step_makes_no_host_sync(tiny_stream, precision):
    learner = _learner(tiny_stream, precision)
    chunks = list(iter_chunks(tiny_stream))
    learner.observe(chunks[0].x, chunks[0].y, 0, n_chunks=2)
    x, y = learner.to_device(chunks[1].x), torch.as_tensor(chunks[1].y).to("cuda")
    idx = torch.arange(16, device="cuda")
    train_step(learner.ctx, learner.method, x[idx], y[idx], idx)   # warm-up: the device copy of the buffer syncs here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            train_step(learner.ctx, learner.method, x[idx], y[idx], idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_export_parity_on_the_cuda_provider(tiny_stream, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    learner = _learner(tiny_stream, "bf16", method="derpp")
    for chunk in iter_chunks(tiny_stream):
        if chunk.task > 0:
            break
        learner.observe(chunk.x, chunk.y, 0, n_chunks=2)
    path = tmp_path / "m.onnx"
    report = learner.export_onnx(0, path)
    assert report["max_abs_diff"] < 1e-3
    x, _ = load_test(tiny_stream, 0)
    got = onnx_logits(path, x, providers=("CUDAExecutionProvider",))
    assert np.abs(got - onnx_logits(path, x)).max() < 1e-3
