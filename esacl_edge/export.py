"""ONNX export of a task's model: masks baked into the weights, one self-contained file,
dynamic batch dimension, checked against PyTorch with onnxruntime before it is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .snapshot import ModelSpec

PARITY_TOLERANCE = 1e-4


def sample_inputs(spec: ModelSpec, n: int = 8, seed: int = 0) -> np.ndarray:
    """Random inputs in the stream's value range, NHWC as stored."""
    rng = np.random.default_rng(seed)
    high = 1.0 / float(spec.normalization.get("scale", 1.0))
    return rng.uniform(0.0, high, size=(n, *spec.input_shape)).astype(np.float32)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2))


def parity(path: str | Path, model: nn.Module, x_nhwc: np.ndarray) -> float:
    """Max |onnxruntime - PyTorch| over the outputs for ``x_nhwc``, one batch and one sample."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = _nchw(x_nhwc)
    worst = 0.0
    for batch in (x, x[:1]):
        got = session.run(None, {name: batch})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(batch)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def export_onnx(model: nn.Module, spec: ModelSpec, path: str | Path, sample: np.ndarray | None = None,
                opset: int = 18, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Write ``model`` (eval mode, weights already masked) to ``path`` and verify it.

    The graph takes float32 NCHW input named ``input`` in the stream's units (normalisation
    is inside the graph) and returns ``logits``. Returns ``{"path", "bytes", "max_abs_diff"}``.
    Raises :class:`ExportError`, leaving nothing at ``path``, if writing fails or the
    onnxruntime output differs from PyTorch by more than ``tolerance``.
    """
    import onnx

    path = Path(path)
    model = model.eval().cpu()
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"{path}: folder {path.parent} is not writable")
    x = sample if sample is not None else sample_inputs(spec)
    example = torch.from_numpy(_nchw(x[:2] if len(x) >= 2 else np.concatenate([x, x])))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        batch = torch.export.Dim("batch", min=1)
        # The exporter narrates its progress on stdout; keep the user's terminal for our report.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), tmp, input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), verbose=False)
        proto = onnx.load(tmp, load_external_data=False)
        onnx.checker.check_model(proto)
        if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
            raise ExportError(f"{path}: exporter wrote external data; expected one self-contained file")
        diff = parity(tmp, model, x)
        if not diff <= tolerance:
            raise ExportError(f"{path}: onnxruntime output differs from PyTorch by {diff:.3g} (> {tolerance:g})")
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: ONNX export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff, "opset": opset}
