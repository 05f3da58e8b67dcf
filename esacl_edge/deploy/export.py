"""ONNX export of a task's model: masks baked into the weights, one self-contained file,
dynamic batch dimension, checked against PyTorch with onnxruntime before it is kept.

Variants (:func:`export_variant`), each with a sidecar ``MODEL.onnx.json``:

* ``sparse`` (default): pruned weights stored as ONNX sparse initializers (live values plus
  linear indices in the smallest integer type that holds them); onnxruntime densifies them
  at load, so outputs match the dense file. Strict ``onnx.checker`` wants int64 indices
  and rejects the smaller ones; onnxruntime reads int8/16/32/64.
* ``dense``: plain float32 initializers.
* ``structured``: units and channels the snapshot no longer uses are removed
  (:mod:`esacl_edge.structured`), a smaller dense network.
* ``int8``: static QDQ quantization by onnxruntime, calibrated on the replay-buffer samples
  kept with the snapshot; judged by top-1 agreement and accuracy, not by the float parity.

The float variants pass when onnxruntime's logits differ from PyTorch's by at most 1e-4 times
the largest logit, or 1e-4 where no logit exceeds 1 (:func:`parity_limit`).

Every variant declares the opset asked for (checked in the written file) and carries what the
device runner needs as JSON in ``metadata_props["esacl_edge"]``, so the file runs without its
sidecar. Outputs that are NaN or infinite fail the check.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import ExportError
from ..files import temp_file_beside, write_json
from ..learn.forward import nchw
from ..models import ModelSpec, layer_sparsity

PARITY_TOLERANCE = 1e-4
VARIANTS = ("sparse", "dense", "structured", "int8")
INT8_MIN_AGREEMENT = 0.9
OPSETS = range(7, 24)  # as device profiles allow
INT8_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
DYNAMO_OPSET = 18  # the opset the torch.export-based exporter writes natively
METADATA_KEY = "esacl_edge"  # metadata_props entry: what the device runner needs, as JSON


def sample_inputs(spec: ModelSpec, n: int = 8, seed: int = 0) -> np.ndarray:
    """Random inputs in the stream's value range, NHWC as stored."""
    rng = np.random.default_rng(seed)
    high = 1.0 / float(spec.normalization.get("scale", 1.0))
    return rng.uniform(0.0, high, size=(n, *spec.input_shape)).astype(np.float32)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2))


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
    x = _nchw(x_nhwc)
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


def file_opset(proto) -> int | None:
    """The default-domain opset a model file declares."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(model: nn.Module, spec: ModelSpec, path: str | Path, sample: np.ndarray | None = None,
                opset: int = 18, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Write ``model`` (eval mode, weights already masked) to ``path`` and verify it.

    The graph takes float32 NCHW input named ``input`` in the stream's units (normalisation
    is inside the graph) and returns ``logits``; the file declares ``opset``. Returns
    ``{"path", "bytes", "max_abs_diff", "parity_limit", "opset"}``. Raises :class:`ExportError`, leaving
    nothing at ``path``, if writing fails, the file has another opset, or the onnxruntime
    output differs from PyTorch by more than :func:`parity_limit` (or is not finite).
    """
    path = Path(path)
    _check_target(path)
    try:
        return _export_checked(model, spec, path, sample, opset, tolerance)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None


def _export_checked(model: nn.Module, spec: ModelSpec, path: Path, sample: np.ndarray | None, opset: int,
                    tolerance: float) -> dict:
    """:func:`export_onnx` with errors that do not name the file (the caller knows its name)."""
    import onnx

    model = model.eval().cpu()
    x = sample if sample is not None else sample_inputs(spec)
    example = torch.from_numpy(_nchw(x[:2] if len(x) >= 2 else np.concatenate([x, x])))
    fd, tmp = temp_file_beside(path, ".onnx")
    os.close(fd)
    try:
        # The exporters narrate their progress on stdout and log notices and fallbacks; keep the
        # user's terminal for our report.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet_logger("torch.onnx"), _quiet_logger("onnxscript"):
            warnings.simplefilter("ignore")
            _torch_export(model, example, tmp, opset)
        proto = onnx.load(tmp, load_external_data=False)
        if file_opset(proto) != opset:
            raise ExportError(f"the exporter wrote opset {file_opset(proto)}, not the requested {opset}; "
                              "choose another opset")
        onnx.checker.check_model(proto)
        if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
            raise ExportError("exporter wrote external data; expected one self-contained file")
        diff, limit = check_parity(tmp, model, x, tolerance=tolerance)
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export at opset {opset} failed: {_reason(exc).replace(tmp, path.name)}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff, "parity_limit": limit,
            "opset": opset}


def _torch_export(model: nn.Module, example: torch.Tensor, path: str, opset: int) -> None:
    """Export with a dynamic batch dimension in ``opset``.

    The torch.export-based exporter writes opset 18 and converts to other opsets afterwards,
    which fails below 18 for common ops (e.g. Shape-15, ReduceMean-18) and leaves the file at
    18; below it, the TorchScript exporter writes the requested opset directly.
    """
    if opset >= DYNAMO_OPSET:
        torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    else:
        torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, verbose=False)


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reason(exc: Exception) -> str:
    """The first line of an exception's message (exporter and onnxruntime errors run long)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give the model file's name, e.g. {path / 'model.onnx'}")
    if sidecar_path(path).is_dir():
        raise ExportError(f"{path}: its sidecar {sidecar_path(path)} would replace a folder; choose another name")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"{path}: folder {path.parent} is not writable")


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
        quantize_static(str(prepared), str(out_path), _Calibration("input", _nchw(calibration_nhwc)),
                        quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
    finally:
        prepared.unlink(missing_ok=True)


def _session(path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: they reach the user as our one-line error
    return ort.InferenceSession(str(path), options, providers=list(providers))


def onnx_logits(path: Path, x_nhwc: np.ndarray, batch: int = 256,
                providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> np.ndarray:
    """Logits of stored samples from the exported file on onnxruntime (the CPU provider by default)."""
    session = _session(path, providers)
    x = _nchw(x_nhwc)
    return np.concatenate([session.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def torch_logits(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(nchw(x_nhwc)).numpy()


def deployment_info(spec: ModelSpec, meta: dict, variant: str, opset: int) -> dict:
    """What a device needs to run the file: classes and their names, input and output, providers,
    pattern. It goes into the sidecar and, as JSON, into the file's ``metadata_props``."""
    h, w, c = spec.input_shape
    classes = sorted({c_ for cls in meta.get("task_classes", []) for c_ in cls})
    return {
        "variant": variant, "opset": opset, "task": meta.get("task"), "classes": classes,
        "task_classes": meta.get("task_classes"),
        "class_names": [spec.class_names[i] for i in classes] if spec.class_names else None,
        "model": spec.model, "num_classes": spec.num_classes,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": [-1, c, h, w],
                  "stored_shape": [h, w, c], "stored_dtype": spec.dtype,
                  "normalization_in_graph": spec.normalization},
        "output": {"name": "logits", "shape": [-1, spec.num_classes]},
        "pattern": meta.get("pattern"), "providers": meta.get("providers", ["CPUExecutionProvider"]),
    }


def _drop_unused_domains(proto) -> None:
    """Remove opset imports no node uses (onnxruntime's quantizer adds several that older runtimes reject)."""
    used = {n.domain for n in proto.graph.node} | {"", "ai.onnx"} | {f.domain for f in proto.functions} \
        | {n.domain for f in proto.functions for n in f.node}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)


def _set_metadata(proto, info: dict) -> None:
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(info))


def export_variant(model: nn.Module, spec: ModelSpec, path: str | Path, variant: str, meta: dict,
                   calibration: np.ndarray | None = None, opset: int = 18,
                   test: tuple[np.ndarray, np.ndarray] | None = None, min_l1: float = 0.0) -> dict:
    """Write ``variant`` of ``model`` to ``path`` plus ``path.json``; return the report (also in the sidecar).

    The file declares ``opset`` and carries :func:`deployment_info` in its metadata, so it runs
    without the sidecar.
    """
    import onnx

    from .structured import shrink

    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    path = Path(path)
    _check_target(path)
    model = model.eval().cpu()
    structure = None
    if variant == "structured":
        model_out, structure = shrink(model, min_l1)
    else:
        model_out = model
    if opset not in OPSETS or (variant == "int8" and opset < INT8_MIN_OPSET):
        low = INT8_MIN_OPSET if variant == "int8" else OPSETS.start
        raise ExportError(f"{path}: the {variant} variant cannot be written at opset {opset}; choose an opset "
                          f"from {low} to {OPSETS.stop - 1}")
    if variant == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError(f"{path}: INT8 export needs calibration samples, and this snapshot has none "
                          "(the method kept no replay buffer)")
    info = deployment_info(spec, meta, variant, opset)
    sample = sample_inputs(spec) if test is None else test[0][:64].astype(np.float32)
    dense_tmp = path.with_name(f".{path.name}.dense.onnx")
    final_tmp = path.with_name(f".{path.name}.final.onnx")
    try:
        report = _export_checked(model_out, spec, dense_tmp, sample, opset, PARITY_TOLERANCE)
        if variant == "int8":
            quantize_int8(dense_tmp, final_tmp, calibration)
            proto = onnx.load(final_tmp)
        else:
            proto = onnx.load(dense_tmp)
            if variant == "sparse":
                sparsify_initializers(proto)
        _drop_unused_domains(proto)
        _set_metadata(proto, info)
        onnx.save(proto, final_tmp)
        if file_opset(proto) != opset:
            raise ExportError(f"the {variant} file declares opset {file_opset(proto)}, not the requested {opset}")
        if variant == "int8":
            got, want = onnx_logits(final_tmp, sample), torch_logits(model, sample)
            report["max_abs_diff"] = max_abs_diff(got, want)
            report["top1_agreement"] = float((got.argmax(1) == want.argmax(1)).mean())
            if report["top1_agreement"] < INT8_MIN_AGREEMENT:
                raise ExportError(f"INT8 model agrees with PyTorch on only "
                                  f"{100 * report['top1_agreement']:.0f}% of sample predictions")
        else:
            report["max_abs_diff"], report["parity_limit"] = check_parity(final_tmp, model_out, sample,
                                                                          f"{variant} file")
        os.replace(final_tmp, path)
    except ExportError as exc:  # name the user's file, not our temporary ones
        raise ExportError(f"{path}: {exc}") from None
    except Exception as exc:
        reason = _reason(exc).replace(str(final_tmp), path.name).replace(str(dense_tmp), path.name)
        raise ExportError(f"{path}: {variant} export failed: {reason}") from exc
    finally:
        dense_tmp.unlink(missing_ok=True)
        final_tmp.unlink(missing_ok=True)
    raw = path.read_bytes()
    report.update(variant=variant, bytes=len(raw), gzip_bytes=len(gzip.compress(raw, 6)), opset=opset)
    if test is not None:
        x, y = test
        report["accuracy_torch"] = float((torch_logits(model, x).argmax(1) == y).mean())
        report["accuracy_onnx"] = float((onnx_logits(path, x).argmax(1) == y).mean())
    import onnxruntime

    sidecar = {
        **report, **info, "path": path.name,
        "layer_sparsity": layer_sparsity(model_out), "structure": structure,
        "versions": {"esacl_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    write_json(sidecar_path(path), sidecar)
    return {**sidecar, "path": str(path)}


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")
