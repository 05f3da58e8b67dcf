"""Starting weights: a local state-dict file (``--init``), or torchvision's ImageNet weights fetched on request.

A weights file is a flat dict of tensors, read with ``weights_only=True``. Accepted key layouts:

* the backbone's own keys, as torchvision writes them (``conv1.weight``, ``features.0.0.weight``)
  and as ``esacl-edge pretrain`` writes them;
* a whole esacl-edge model (``1.conv1.weight``; the ``0.*`` normalisation constants are ignored:
  inputs are normalised with the stream's own statistics), e.g. a task snapshot, whose pruned
  weights (``W::values`` + ``W::mask``) are unpacked;
* either of those under a ``state_dict`` or ``model`` key (common checkpoint wrappers).

The classifier is kept when its shape matches and re-initialised otherwise (a new label space);
any other missing, unexpected or mis-shaped key is one error naming the file and the first keys.
Nothing is downloaded unless asked (:func:`download_weights`).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EsaclError
from .files import load_problem
from .models import classifier_name
from .names import TORCHVISION_MODELS

SHOWN_KEYS = 5


def _first(keys: list[str]) -> str:
    more = f" (and {len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` in weights file ``path`` (see the module docstring for the layouts)."""
    path = Path(path)
    if not path.is_file():
        raise EsaclError(f"{path}: weights file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise EsaclError(f"{path}: not a weights file esacl-edge can read: {load_problem(exc)}") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise EsaclError(f"{path}: not a state dict (a dict of named tensors); got {type(obj).__name__}")
    return _unpack_pruned(obj, path)


def _unpack_pruned(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Snapshot encoding (``W::values`` + ``W::mask``) back to dense tensors of unknown shape: flat, for now."""
    out = {k: v for k, v in tensors.items() if "::" not in k}
    for key in (k for k in tensors if k.endswith("::values")):
        name = key[: -len("::values")]
        bits = tensors.get(f"{name}::mask")
        if bits is None:
            raise EsaclError(f"{path}: {name} has values but no mask")
        mask = torch.from_numpy(np.unpackbits(bits.numpy()).astype(bool))
        values = tensors[key]
        flat = torch.zeros(len(mask), dtype=values.dtype)
        live = torch.nonzero(mask).flatten()[: values.numel()]
        flat[live] = values
        out[name] = flat  # padded to a multiple of 8: reshaped against the model in load_init
    return out


def backbone_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a whole esacl-edge model (``0.*`` normalisation, ``1.*`` backbone) as backbone keys."""
    if any(k.startswith("1.") for k in tensors) and all(k.startswith(("0.", "1.")) for k in tensors):
        return {k[2:]: v for k, v in tensors.items() if k.startswith("1.")}
    return tensors


def load_init(model: nn.Sequential, path: str | Path, name: str) -> dict:
    """Load weights file ``path`` into ``model``, backbone ``name`` as ``Sequential(Normalize, backbone)``.

    Returns what was done: ``{"file", "tensors", "classifier": "loaded" | "re-initialised"}``.
    """
    path = Path(path)
    given = backbone_keys(read_weights(path))
    net = model[1]
    want = net.state_dict()
    head = classifier_name(net)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    missing = [k for k in want if k not in given and k not in head_keys]
    unexpected = [k for k in given if k not in want]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    state, shapes = {}, []
    for k, v in given.items():
        if k not in want:
            continue
        ref = want[k]
        if v.dim() == 1 and ref.dim() != 1 and ref.numel() <= v.numel() < ref.numel() + 8:
            v = v[: ref.numel()].view_as(ref)  # an unpacked pruned weight
        if tuple(v.shape) != tuple(ref.shape):
            if k not in head_keys:
                shapes.append(f"{k} {tuple(v.shape)} (the model has {tuple(ref.shape)})")
            continue
        state[k] = v.to(ref.dtype)
    if shapes:
        problems.append(f"shape mismatches {_first(shapes)}")
    if problems:
        raise EsaclError(f"{path}: does not fit the {name} backbone: {'; '.join(problems)}")
    kept_head = head_keys <= set(state)
    if not kept_head:
        for k in head_keys:
            state.pop(k, None)
    net.load_state_dict(state, strict=False)
    return {"file": str(path), "tensors": len(state), "classifier": "loaded" if kept_head else "re-initialised"}


def download_weights(name: str, progress: bool = True) -> Path:
    """Fetch torchvision's default ImageNet weights of ``name`` into torch's hub cache (``$TORCH_HOME``, by
    default ``~/.cache/torch/hub/checkpoints``), checking their hash; returns the file. Opt-in only."""
    if name not in TORCHVISION_MODELS:
        raise EsaclError(f"--download-weights: {name} has no published weights; choose one of "
                         f"{', '.join(TORCHVISION_MODELS)}, or make a starting point with esacl-edge pretrain")
    from torch.hub import get_dir, load_state_dict_from_url
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    try:
        load_state_dict_from_url(weights.url, progress=progress, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise EsaclError(f"--download-weights: cannot fetch {weights.url} ({exc}); on a device without internet, "
                         "copy the file over and pass --init FILE") from None
    return Path(get_dir()) / "checkpoints" / Path(weights.url).name
