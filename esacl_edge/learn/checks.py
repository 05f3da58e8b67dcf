"""What the learner checks of what it is given and of what it learned: samples and labels through the public
API (one clear error each), and divergence after a chunk or a task's end."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..device.profiles import Profile
from ..errors import DivergenceError, EsaclError
from . import latent

if TYPE_CHECKING:
    from .methods import Method

# A chunk's mean loss above this has diverged: cross-entropy at chance is ln(classes) (< 21 for a
# billion classes), and the replay terms are of the same order for any model that still learns.
DIVERGED_LOSS = 1e6
INPUT_DTYPES = ("uint8", "float32")


def check_shape(shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
    """Samples are (N, H, W, C) with (H, W, C) = ``input_shape``."""
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise EsaclError(f"inputs must have shape (N, {', '.join(map(str, input_shape))}), got {shape}")


def check_inputs(x: np.ndarray | torch.Tensor, input_shape: tuple[int, ...], stored_dtype: str
                 ) -> np.ndarray | torch.Tensor:
    """Samples given to the public API: their shape, non-empty, the stored dtype, finite."""
    check_shape(tuple(x.shape), input_shape)
    if len(x) == 0:
        raise EsaclError("inputs are empty: give at least one sample")
    dtype = str(x.dtype).removeprefix("torch.")
    if stored_dtype == "uint8" and dtype != "uint8":
        raise EsaclError(f"inputs have dtype {dtype}; this learner stores uint8 samples (values 0..255): "
                         "convert them with x.astype(numpy.uint8) if that is what they are")
    if "float" in dtype and not bool((torch.isfinite(x) if torch.is_tensor(x) else np.isfinite(x)).all()):
        raise EsaclError("inputs contain NaN or Inf")
    return x


def check_labels(y: np.ndarray | torch.Tensor, n: int, num_classes: int) -> np.ndarray:
    """Labels as int64, one per sample, each a class of the learner."""
    y_np = np.asarray(y.cpu() if torch.is_tensor(y) else y)
    if y_np.ndim != 1 or len(y_np) != n or not (np.issubdtype(y_np.dtype, np.integer) or y_np.size == 0):
        raise EsaclError(f"labels must be a 1-D integer array with one label per sample ({n}), got "
                         f"{y_np.dtype} with shape {tuple(y_np.shape)}")
    if n == 0:
        raise EsaclError("inputs are empty: give at least one sample")
    if y_np.min() < 0 or y_np.max() >= num_classes:
        raise EsaclError(f"labels must be in 0..{num_classes - 1}, got {y_np.min()}..{y_np.max()}")
    return y_np.astype(np.int64)


def check_diverged(model: nn.Module, loss: float | None, task: int, where: str) -> None:
    """Stop on a non-finite or exploding loss (None: no loss to judge), or non-finite weights: nothing
    learned after that is usable."""
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    finite = bool(torch.stack([torch.isfinite(t).all() for t in state]).all())
    bad_loss = loss is not None and not loss <= DIVERGED_LOSS
    if finite and not bad_loss:
        return
    what = f"the loss reached {loss:.3g}" if bad_loss else "the weights became NaN or Inf"
    reason = (f"training diverged {where} of task {task}: {what} (check the inputs' scale, "
              "i.e. the stream's normalization, or lower the learning rate)")
    raise DivergenceError(f"{reason}; the model is unusable now: restore a saved state (load_state)", reason)


def check_settings(profile: Profile, sparsity: float | None, buffer_bytes: int | None, seed: int, input_dtype: str,
                   freeze_until: str | None, latent_replay: str | None) -> None:
    """A learner's settings, each refused with one clear error before anything is built."""
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise EsaclError(f"sparsity must be in [0, 1), got {sparsity}")
    if buffer_bytes is not None and buffer_bytes < 0:
        raise EsaclError(f"buffer budget must be >= 0 bytes, got {buffer_bytes}")
    if type(seed) is not int or not 0 <= seed < 2 ** 32:
        raise EsaclError(f"seed must be an integer in 0..{2 ** 32 - 1}, got {seed!r}")
    if input_dtype not in INPUT_DTYPES:
        raise EsaclError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if latent_replay is not None and latent_replay not in latent.FORMS:
        raise EsaclError(f"latent replay must be one of {', '.join(latent.FORMS)}, got {latent_replay!r}")
    if latent_replay is not None and freeze_until is None:
        raise EsaclError("latent replay stores the activations of a frozen prefix: give --freeze-until LAYER too")
    if not profile.training_supported:
        raise EsaclError(f"profile {profile.name} ({profile.source}) does not support training: "
                         f"{profile.description}")


def warn_if_no_replay(method: Method, requested: int, per_sample: int) -> None:
    """Warn when a replay method's buffer budget (bytes) is too small for one sample."""
    if method.keeps_buffer and 0 < requested < per_sample:
        warnings.warn(f"a replay buffer of {requested:,} bytes holds no sample (one takes {per_sample:,} bytes): "
                      f"{method.name} runs without replay", RuntimeWarning, stacklevel=3)
