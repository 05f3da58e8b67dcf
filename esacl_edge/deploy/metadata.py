"""What an exported model file says about itself: the deployment information a device needs (in the
file's ``metadata_props`` and in the sidecar ``MODEL.onnx.json``), and the opsets it declares."""

from __future__ import annotations

import json
from pathlib import Path

from ..models import ModelSpec

METADATA_KEY = "esacl_edge"  # metadata_props entry: what the device runner needs, as JSON


def file_opset(proto) -> int | None:
    """The default-domain opset a model file declares."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_meta(task: int, task_classes: list[list[int]], pattern: str | None, providers: tuple[str, ...]) -> dict:
    """What an export records of the run besides the model: the task, the classes of tasks 0..``task``, the
    N:M pattern of the pruned weights and the profile's execution providers."""
    return {"task": task, "task_classes": [list(c) for c in task_classes[: task + 1]], "pattern": pattern,
            "providers": list(providers)}


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


def drop_unused_domains(proto) -> None:
    """Remove opset imports no node uses (onnxruntime's quantizer adds several that older runtimes reject)."""
    used = {n.domain for n in proto.graph.node} | {"", "ai.onnx"} | {f.domain for f in proto.functions} \
        | {n.domain for f in proto.functions for n in f.node}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)


def set_metadata(proto, info: dict) -> None:
    """Put ``info`` as JSON into the file's ``metadata_props[METADATA_KEY]`` (replacing an earlier entry)."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(info))


def sidecar_path(path: str | Path) -> Path:
    """``MODEL.onnx.json``: the report written beside a model file."""
    path = Path(path)
    return path.with_name(path.name + ".json")
