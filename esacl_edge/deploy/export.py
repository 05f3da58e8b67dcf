"""ONNX export of a task's model: masks baked into the weights, one self-contained file,
dynamic batch dimension, checked against PyTorch with onnxruntime before it is kept.

Variants (:data:`ENCODERS`), each with a sidecar ``MODEL.onnx.json``: ``sparse`` (default; sparse
initializers, ``encoders.py``), ``dense`` (float32), ``structured`` (the units and channels the
snapshot no longer uses removed, ``structured.py``) and ``int8`` (static QDQ, ``encoders.py``,
judged by top-1 agreement and accuracy). The float variants pass the parity check of ``parity.py``.

Every variant declares the opset asked for (checked in the written file) and carries what the
device runner needs as JSON in ``metadata_props["esacl_edge"]``, so the file runs without its
sidecar. Outputs that are NaN or infinite fail the check.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import ExportError
from ..files import atomic_write, temp_file_beside, write_json
from ..models import ModelSpec, layer_sparsity
from .encoders import quantize_int8, sparsify_initializers
from .metadata import deployment_info, drop_unused_domains, file_opset, set_metadata, sidecar_path
from .parity import PARITY_TOLERANCE, check_parity, max_abs_diff, nchw_array, onnx_logits, sample_inputs, torch_logits

INT8_MIN_AGREEMENT = 0.9
OPSETS = range(7, 24)  # as device profiles allow
INT8_MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
DYNAMO_OPSET = 18  # the opset the torch.export-based exporter writes natively


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
    example = torch.from_numpy(nchw_array(x[:2] if len(x) >= 2 else np.concatenate([x, x])))
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
    for target in (path, sidecar_path(path)):
        if target.exists() and not target.is_dir() and not target.is_file():
            raise ExportError(f"{target}: exists and is not a regular file (a device, pipe or socket); "
                              "give the name of a file to write")
    if path.is_dir():
        raise ExportError(f"{path}: is a folder; give the model file's name, e.g. {path / 'model.onnx'}")
    if sidecar_path(path).is_dir():
        raise ExportError(f"{path}: its sidecar {sidecar_path(path)} would replace a folder; choose another name")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"{path}: folder {path.parent} is not writable")


@dataclass(frozen=True)
class Encoder:
    """How one variant is written: the model it exports, the file it makes of the float export, and how that
    file is judged against PyTorch."""

    min_opset: int
    prepare: Callable[[nn.Module, float], tuple[nn.Module, dict | None]]   # (model, min_l1) -> (model, structure)
    encode: Callable[[Path, Path, np.ndarray | None], Any]                  # (float file, tmp, calibration) -> proto
    check: Callable[[Path, nn.Module, np.ndarray, str], dict]               # (file, model, sample, what) -> report


def _as_is(model: nn.Module, min_l1: float) -> tuple[nn.Module, None]:
    return model, None


def _shrunk(model: nn.Module, min_l1: float) -> tuple[nn.Module, dict]:
    from .structured import shrink

    return shrink(model, min_l1)


def _float_file(dense: Path, tmp: Path, calibration: np.ndarray | None):
    import onnx

    return onnx.load(dense)


def _sparse_file(dense: Path, tmp: Path, calibration: np.ndarray | None):
    proto = _float_file(dense, tmp, calibration)
    sparsify_initializers(proto)
    return proto


def _int8_file(dense: Path, tmp: Path, calibration: np.ndarray | None):
    import onnx

    quantize_int8(dense, tmp, calibration)
    return onnx.load(tmp)


def _parity_report(path: Path, model: nn.Module, sample: np.ndarray, what: str) -> dict:
    diff, limit = check_parity(path, model, sample, what)
    return {"max_abs_diff": diff, "parity_limit": limit}


def _agreement_report(path: Path, model: nn.Module, sample: np.ndarray, what: str) -> dict:
    """INT8: judged by top-1 agreement with PyTorch (``what`` is the float variants' label; unused here)."""
    got, want = onnx_logits(path, sample), torch_logits(model, sample)
    report = {"max_abs_diff": max_abs_diff(got, want), "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean())}
    if report["top1_agreement"] < INT8_MIN_AGREEMENT:
        raise ExportError(f"INT8 model agrees with PyTorch on only {100 * report['top1_agreement']:.0f}% of sample "
                          "predictions")
    return report


ENCODERS: dict[str, Encoder] = {
    "sparse": Encoder(OPSETS.start, _as_is, _sparse_file, _parity_report),
    "dense": Encoder(OPSETS.start, _as_is, _float_file, _parity_report),
    "structured": Encoder(OPSETS.start, _shrunk, _float_file, _parity_report),
    "int8": Encoder(INT8_MIN_OPSET, _as_is, _int8_file, _agreement_report),
}
VARIANTS = tuple(ENCODERS)


def export_variant(model: nn.Module, spec: ModelSpec, path: str | Path, variant: str, meta: dict,
                   calibration: np.ndarray | None = None, opset: int = 18,
                   test: tuple[np.ndarray, np.ndarray] | None = None, min_l1: float = 0.0) -> dict:
    """Write ``variant`` of ``model`` to ``path`` plus ``path.json``; return the report (also in the sidecar).

    ``meta`` is :func:`export_meta`'s. The file declares ``opset`` and carries :func:`deployment_info` in its
    metadata, so it runs without the sidecar.
    """
    import onnx

    if variant not in ENCODERS:
        raise ExportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    encoder = ENCODERS[variant]
    path = Path(path)
    _check_target(path)
    model = model.eval().cpu()
    model_out, structure = encoder.prepare(model, min_l1)
    if opset not in OPSETS or opset < encoder.min_opset:
        raise ExportError(f"{path}: the {variant} variant cannot be written at opset {opset}; choose an opset "
                          f"from {encoder.min_opset} to {OPSETS.stop - 1}")
    if variant == "int8" and (calibration is None or len(calibration) == 0):
        raise ExportError(f"{path}: INT8 export needs calibration samples, and this snapshot has none "
                          "(the method kept no replay buffer)")
    info = deployment_info(spec, meta, variant, opset)
    sample = sample_inputs(spec) if test is None else test[0][:64].astype(np.float32)
    # Intermediate files live in a private folder of the system's temporary space: concurrent exports
    # never share a name, and a killed export leaves nothing in the target folder.
    with tempfile.TemporaryDirectory(prefix="esacl-export-") as work:
        dense_tmp, final_tmp = Path(work) / "dense.onnx", Path(work) / f"{variant}.onnx"
        try:
            report = _export_checked(model_out, spec, dense_tmp, sample, opset, PARITY_TOLERANCE)
            proto = encoder.encode(dense_tmp, final_tmp, calibration)
            drop_unused_domains(proto)
            set_metadata(proto, info)
            onnx.save(proto, final_tmp)
            if file_opset(proto) != opset:
                raise ExportError(f"the {variant} file declares opset {file_opset(proto)}, not the requested {opset}")
            report.update(encoder.check(final_tmp, model_out, sample, f"{variant} file"))
            raw = final_tmp.read_bytes()
        except ExportError as exc:  # name the user's file, not our temporary ones
            raise ExportError(f"{path}: {exc}") from None
        except Exception as exc:
            reason = _reason(exc).replace(str(final_tmp), path.name).replace(str(dense_tmp), path.name)
            raise ExportError(f"{path}: {variant} export failed: {reason}") from exc
    if structure is not None:
        report["removed"] = removed_units(structure)
        if not any(report["removed"].values()):
            warnings.warn(f"{path}: the structured variant removed no unit or channel (each still has a live "
                          "weight), so it is the dense model; the sparse variant stores the pruned weights compactly",
                          RuntimeWarning, stacklevel=2)
    report.update(variant=variant, bytes=len(raw), gzip_bytes=len(gzip.compress(raw, 6)), opset=opset)
    if test is not None:
        x, y = test
        report["accuracy_torch"] = float((torch_logits(model, x).argmax(1) == y).mean())
        report["accuracy_onnx"] = float((onnx_logits(raw, x).argmax(1) == y).mean())
    import onnxruntime

    sidecar = {
        **report, **info, "path": path.name, "model_sha256": hashlib.sha256(raw).hexdigest(),
        "layer_sparsity": layer_sparsity(model_out), "structure": structure,
        "versions": {"esacl_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    # The model, then its sidecar, each atomically; the sidecar names the model's SHA-256, so a reader
    # that finds a sidecar of another model (a crash between the two) knows it, and the model's own
    # metadata is complete without it.
    _check_target(path)
    atomic_write(path, lambda f: f.write(raw))
    write_json(sidecar_path(path), sidecar)
    return {**sidecar, "path": str(path)}


def removed_units(structure: dict) -> dict[str, int]:
    """Units or channels the structured variant removed, by layer (from ``shrink``'s before and after)."""
    return {name: int(structure["before"][name]) - int(structure["after"][name]) for name in structure["before"]}
