"""Saved learner states of earlier formats, brought to the current one in one step before anything is loaded.

The current format is ``persistence.state_dict``'s. Earlier formats lack:

* ``precision`` (the loss scale of fp16 training): an fp32 run's state has nothing to restore;
* the buffer's ``qparams`` (quantisation parameters of uint8 latents): a buffer of images keeps none,
  i.e. an array of shape (size, 0);
* the task progress's ``first_task``: the current task is the first when no other task appears in
  ``task_classes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` in the current format (a new dict; ``state`` itself is left as it is)."""
    state = {**state, "precision": state.get("precision", {})}
    buffer = state.get("buffer")
    if isinstance(buffer, dict) and "qparams" not in buffer and "size" in buffer:
        state["buffer"] = {**buffer, "qparams": np.zeros((int(buffer["size"]), 0), np.float32)}
    progress = state.get("progress")
    if isinstance(progress, dict) and "first_task" not in progress:
        others = [t for t in state.get("task_classes", {}) if int(t) != progress.get("task")]
        state["progress"] = {**progress, "first_task": not others}
    return state
