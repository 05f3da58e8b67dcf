"""The file encodings of the export variants beyond plain float32: sparse initializers and static INT8.

* ``sparse``: pruned weights stored as ONNX sparse initializers (live values plus linear indices
  in the smallest integer type that holds them); onnxruntime densifies them at load, so outputs
  match the dense file. Strict ``onnx.checker`` wants int64 indices and rejects the smaller ones;
  onnxruntime reads int8/16/32/64.
* ``int8``: static QDQ quantization by onnxruntime (per-channel weights), calibrated on the
  replay-buffer samples kept with the snapshot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .parity import nchw_array


def _index_dtype(numel: int) -> np.dtype:
    for dtype in (np.int8, np.int16, np.int32):
        if numel - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def sparsify_initializers(proto) -> int:
    """Move every float weight that is cheaper sparse than dense into ``sparse_initializer``."""
    from onnx import helper, numpy_helper

    moved, keep = 0, []
    for init in proto.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.ndim < 2:
            keep.append(init)
            continue
        idx = np.flatnonzero(w)
        dtype = _index_dtype(w.size)
        if idx.size * (4 + dtype.itemsize) >= w.nbytes:
            keep.append(init)
            continue
        values = numpy_helper.from_array(w.ravel()[idx], init.name)
        indices = numpy_helper.from_array(idx.astype(dtype), f"{init.name}.indices")
        proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(w.shape)))
        moved += 1
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    return moved


class _Calibration:
    """onnxruntime CalibrationDataReader over NCHW float32 batches."""

    def __init__(self, name: str, x_nchw: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{name: x_nchw[i:i + batch]} for i in range(0, len(x_nchw), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(dense_path: Path, out_path: Path, calibration_nhwc: np.ndarray) -> None:
    """Static INT8 (QDQ, per-channel weights) with onnxruntime, calibrated on ``calibration_nhwc``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dense_path.with_name(dense_path.name + ".pre.onnx")
    try:
        quant_pre_process(str(dense_path), str(prepared))
        quantize_static(str(prepared), str(out_path), _Calibration("input", nchw_array(calibration_nhwc)),
                        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
    finally:
        prepared.unlink(missing_ok=True)
