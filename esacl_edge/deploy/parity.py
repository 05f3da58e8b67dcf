"""Does an exported file compute what the PyTorch model computes? Logits of stored (NHWC) samples from
onnxruntime and from PyTorch, and the float variants' parity check.

A float file passes when onnxruntime's logits differ from PyTorch's by at most 1e-4 times the
largest logit, or 1e-4 where no logit exceeds 1 (:func:`parity_limit`). Outputs that are NaN or
infinite fail the check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..learn.forward import nchw
from ..models import ModelSpec

PARITY_TOLERANCE = 1e-4


def nchw_array(x: np.ndarray) -> np.ndarray:
    """Stored samples (NHWC) as the float32 NCHW array an exported file takes."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2))


def sample_inputs(spec: ModelSpec, n: int = 8, seed: int = 0) -> np.ndarray:
    """Random inputs in the stream's value range, NHWC as stored."""
    rng = np.random.default_rng(seed)
    high = 1.0 / float(spec.normalization.get("scale", 1.0))
    return rng.uniform(0.0, high, size=(n, *spec.input_shape)).astype(np.float32)


def max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Max |got - want|; raises :class:`ExportError` when either holds NaN or infinity, which no
    difference can vouch for."""
    if not np.isfinite(want).all():
        raise ExportError("the PyTorch snapshot outputs NaN or infinite logits (its weights have diverged); "
                          "export the snapshot of an earlier task")
    if not np.isfinite(got).all():
        raise ExportError("onnxruntime outputs NaN or infinite logits where PyTorch does not")
    return float(np.abs(got - want).max())


def parity(path: str | Path, model: nn.Module, x_nhwc: np.ndarray) -> float:
    """Max |onnxruntime - PyTorch| over the outputs for ``x_nhwc``, one batch and one sample.

    Raises :class:`ExportError` (without the file name) when either output is not finite.
    """
    return parity_and_scale(path, model, x_nhwc)[0]


def parity_and_scale(path: str | Path, model: nn.Module, x_nhwc: np.ndarray) -> tuple[float, float]:
    """(:func:`parity`, the largest |PyTorch logit|): the difference and the scale it is judged against."""
    session = _session(path)
    name = session.get_inputs()[0].name
    x = nchw_array(x_nhwc)
    worst = scale = 0.0
    for batch in (x, x[:1]):
        got = session.run(None, {name: batch})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(batch)).numpy()
        worst = max(worst, max_abs_diff(got, want))
        scale = max(scale, float(np.abs(want).max()))
    return worst, scale


def parity_limit(scale: float, tolerance: float = PARITY_TOLERANCE) -> float:
    """The largest accepted difference: ``tolerance`` absolute for logits up to 1 in size, relative to the
    largest logit above that (float32 rounding grows with the values a deep network computes)."""
    return tolerance * max(1.0, scale)


def check_parity(path: str | Path, model: nn.Module, x_nhwc: np.ndarray, what: str = "onnxruntime output",
                 tolerance: float = PARITY_TOLERANCE) -> tuple[float, float]:
    """(:func:`parity`, :func:`parity_limit`) of the file at ``path``; raises :class:`ExportError` past the limit."""
    diff, scale = parity_and_scale(path, model, x_nhwc)
    limit = parity_limit(scale, tolerance)
    if not diff <= limit:
        raise ExportError(f"{what} differs from PyTorch by {diff:.3g} (> {limit:.3g}, {tolerance:g} × the largest "
                          f"logit {scale:.3g})")
    return diff, limit


def _session(model: str | Path | bytes, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: they reach the user as our one-line error
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=list(providers))


def onnx_logits(model: str | Path | bytes, x_nhwc: np.ndarray, batch: int = 256,
                providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> np.ndarray:
    """Logits of stored samples from an exported file (its path or bytes) on onnxruntime (the CPU provider by
    default)."""
    session = _session(model, providers)
    x = nchw_array(x_nhwc)
    return np.concatenate([session.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def torch_logits(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(x_nhwc)).numpy()
