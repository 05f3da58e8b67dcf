"""A model's state in compact form: every masked weight as its live values plus its mask packed to 1 bit a
weight (``numpy.packbits`` order), every other entry as it is. The learner keeps each task's snapshot in this
form; ``deploy/snapshot.py`` writes it to a file."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import SnapshotError


def pack(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state with every masked weight stored as live values + packed mask bits."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if name in masks:
            m = masks[name].cpu()
            out[f"{name}::values"] = t[m].clone()
            out[f"{name}::mask"] = torch.from_numpy(np.packbits(m.numpy().ravel()))
        else:
            out[name] = t.clone()
    return out


def unpack(tensors: dict[str, torch.Tensor], model: nn.Module, where: str = "snapshot") -> nn.Module:
    """Load packed tensors into ``model`` (built from the same spec), masks baked into weights."""
    state = {}
    for name, ref in model.state_dict().items():
        if f"{name}::values" in tensors:
            bits = tensors.get(f"{name}::mask")
            if bits is None:
                raise SnapshotError(f"{where}: {name} has values but no mask")
            mask = np.unpackbits(bits.numpy(), count=ref.numel()).astype(bool)
            values = tensors[f"{name}::values"]
            if int(mask.sum()) != values.numel():
                raise SnapshotError(f"{where}: {name} mask has {int(mask.sum())} live weights, "
                                    f"values has {values.numel()}")
            w = torch.zeros(ref.numel(), dtype=ref.dtype)
            w[torch.from_numpy(mask)] = values.to(ref.dtype)
            state[name] = w.view_as(ref)
        elif name in tensors:
            if tensors[name].shape != ref.shape:
                raise SnapshotError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, "
                                    f"the model expects {tuple(ref.shape)}")
            state[name] = tensors[name]
        else:
            raise SnapshotError(f"{where}: {name} is missing; was the snapshot made for another model?")
    model.load_state_dict(state)
    return model


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a packed state."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's state as it is (dense)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
