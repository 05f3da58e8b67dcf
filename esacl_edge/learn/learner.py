"""The learner: learns classification tasks chunk by chunk with a sparse model and a small buffer.

The learner owns the model, the optimizer, the buffer, the generators and the task driver;
what a method does lives in its parts (``methods.py``), run by the step in ``step.py``. Its
per-task snapshots are kept in memory (``packing.py``); writing them, saving the learner's state
and exporting are the public :class:`esacl_edge.StreamingLearner`'s (``streaming.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..device.profiles import Profile, load_profile
from ..device.selection import autocast_dtype, select_device
from ..device.transfer import to_device
from ..errors import EsaclError
from ..models import ModelSpec, layer_sparsity, prunable_parameters, split_model
from ..weights import load_init
from . import buffer as rb
from . import persistence
from .checks import check_diverged, check_inputs, check_labels, check_settings, check_shape, warn_if_no_replay
from .context import Context
from .cost import CostMeter, forward_flops, layer_forward_flops
from .forward import accuracies, infer_logits, nchw, task_logits
from .methods import Method, get_method
from .nm_pattern import parse_pattern
from .packing import dense_bytes, pack, packed_bytes, unpack
from .plan import plan
from .precision import MixedPrecision
from .state import Generators, TaskProgress
from .step import run_passes, train_chunk

CALIBRATION_SAMPLES = 256


class Learner:
    """Learn classification tasks from streaming chunks with a sparse model and a small buffer.

    Args:
        model: backbone name (``names.MODEL_NAMES``: ``small_cnn``, ``resnet18_reduced``, torchvision's networks).
        profile: device profile name, YAML path, or a loaded :class:`Profile`.
        num_classes: classes over all tasks (one shared head; Task-IL masks it per task).
        input_shape: one sample as stored, ``(H, W, C)``.
        method: a name from ``methods.METHODS`` (default ``esacl``) or ``ablations.ABLATIONS``, or a :class:`Method`.
        sparsity: target fraction of zero prunable weights; default: the profile's.
        buffer_bytes: replay buffer budget; default: the profile's.
        input_dtype: storage dtype of inputs (``uint8`` or ``float32``), kept in the buffer.
        normalization: ``{"scale", "mean", "std"}`` applied inside the model.
        seed: seeds the model's initialisation and the learner's generators (nothing global).
        init: a weights file to start from (``weights.load_init``: torchvision's ImageNet weights, a
            ``pretrain`` output, a snapshot); the classifier is re-initialised when its shape differs.
        freeze_until: a stage of the backbone (``models.stage_names``); the layers up to it run in
            inference mode without gradients, are not pruned, and are charged forward FLOPs only.
        latent_replay: with ``freeze_until``, the buffer keeps the prefix's output in this form
            (``fp16`` or ``uint8``, ``latent.py``) instead of images.
    """

    def __init__(self, model: str = "small_cnn", profile: str | Path | Profile = "cpu", num_classes: int = 10,
                 input_shape: tuple[int, int, int] = (8, 8, 1), *, method: str | Method = "esacl",
                 sparsity: float | None = None, buffer_bytes: int | None = None, input_dtype: str = "float32",
                 normalization: dict | None = None, seed: int = 0, class_names: list[str] | None = None,
                 pattern: str | None = None, init: str | Path | None = None, freeze_until: str | None = None,
                 latent_replay: str | None = None) -> None:
        profile = profile if isinstance(profile, Profile) else load_profile(profile)
        # A Method's parts hold state once bound: each learner gets its own copy.
        self.method = copy.deepcopy(method) if isinstance(method, Method) else get_method(method)
        self.method.wire()
        check_settings(profile, sparsity, buffer_bytes, seed, input_dtype, freeze_until, latent_replay)
        # The budgets decide sparsity, buffer capacity and batch size, before anything is trained.
        self.plan = plan(profile, model, tuple(input_shape), num_classes, self.method, input_dtype, sparsity,
                         buffer_bytes, freeze_until, latent_replay)
        try:
            self.pattern = parse_pattern(pattern)
        except ValueError as exc:
            raise EsaclError(str(exc)) from None
        self.profile = profile.replace(batch_size=self.plan.batch_size)
        self.target_sparsity = self.plan.target_sparsity
        self.seed = seed
        self.rngs = Generators.from_seed(seed)
        self.device = select_device(self.profile)
        self.precision = MixedPrecision(self.device, autocast_dtype(self.profile, self.device))
        self.spec = ModelSpec(model, tuple(input_shape), num_classes, dict(normalization or {}), input_dtype,
                              class_names, freeze_until)
        with torch.random.fork_rng(devices=[]):  # initialisation draws from the learner's torch generator
            torch.set_rng_state(self.rngs.torch.get_state())
            self.model = self.spec.build()
            self.rngs.torch.set_state(torch.get_rng_state())
        self.init = load_init(self.model, init, model) if init is not None else None
        self.model.to(self.device)
        # Training runs through ``trainable`` on what ``train_inputs`` gives: the frozen prefix's output, if any.
        self.frozen, self.trainable = (split_model(self.model, freeze_until) if freeze_until is not None
                                       else (None, self.model))
        self.layout = self.plan.buffer_layout
        self.last_chunk: np.ndarray | None = None  # calibration images when the buffer keeps latents
        self.optimizer = self.method.optimizer.build(self.model.parameters(), fused=self.precision.scales_loss)
        self.buffer = rb.new_buffer(self.plan.buffer_bytes, self.layout.shape, self.layout.dtype, num_classes,
                                    self.layout.qparams)
        buffer_copy = (rb.DeviceCopy.of(self.buffer, self.device)
                       if self.plan.buffer_on_device and self.device.type == "cuda" else None)
        warn_if_no_replay(self.method, profile.buffer_bytes if buffer_bytes is None else buffer_bytes,
                          self.layout.bytes_per_sample(num_classes))
        self.cost = CostMeter(layer_forward_flops(self.model, self.spec.input_shape),
                              frozen_flops=forward_flops(self.frozen, self.spec.input_shape) if self.frozen else 0)
        self.task_classes: dict[int, list[int]] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.calibration: dict[int, np.ndarray] = {}  # buffer samples kept with each snapshot (INT8 export)
        self.on_task_end: list[Callable[[int], None]] = []  # called with the task just finished
        # What the parts may use: the resources above, not the learner.
        store = rb.BufferStore(self.buffer, self.layout, self.device, self.train_inputs, buffer_copy)
        self.ctx = Context(self.model, self.trainable, self.optimizer, self.precision, self.cost, self.device,
                           self.rngs, num_classes, self.target_sparsity, self.pattern, self.profile.passes_per_chunk,
                           self.profile.batch_size, seed, self.method.name, store, self.train_inputs,
                           on_masks_changed=lambda: self.masks_changed(), train_offline=self._train_offline)
        for part in self.method.parts:
            part.bind(self.ctx)
        if self.method.pruning is not None:
            self.ctx.masks = self.method.pruning.state.masks

    # What the parts change as they learn lives in the context; the learner reads and sets it there.
    buffer_copy = property(lambda self: self.ctx.store.device_copy,
                           lambda self, value: setattr(self.ctx.store, "device_copy", value),
                           doc="The buffer's copy replay gathers from on a GPU (None: replay reads the host arrays).")
    progress = property(lambda self: self.ctx.progress, lambda self, value: setattr(self.ctx, "progress", value),
                        doc="Where the learner is within the current task (a TaskProgress).")
    samples_trained = property(lambda self: self.ctx.samples_trained,
                               lambda self, value: setattr(self.ctx, "samples_trained", value),
                               doc="Samples trained on so far (each time it is trained).")

    # ------------------------------------------------------------------ inputs
    def to_device(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored NHWC samples -> float32 NCHW on the training device (copied in the stored dtype, then
        converted there)."""
        check_shape(tuple(x.shape), self.spec.input_shape)
        return nchw(x, self.device)

    def train_inputs(self, x: np.ndarray | torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Stored samples -> what ``trainable`` takes: the inputs on the device, through the frozen prefix if any
        (inference mode, no gradients; charged as its forward FLOPs)."""
        xt = self.to_device(x)
        if self.frozen is None:
            return xt
        self.frozen.eval()
        with torch.no_grad(), self.precision.autocast():
            z = torch.cat([self.frozen(xt[i:i + batch]).float() for i in range(0, len(xt), batch)])
        self.cost.frozen_forward(len(xt))
        return z

    def _train_offline(self, x: np.ndarray, y: np.ndarray) -> None:
        """Train the method's passes on stored samples ``(x, y)`` at once, no sample dropped (the joint bound)."""
        run_passes(self.ctx, self.method, self.train_inputs(x), to_device(y, self.device), filter_samples=False)

    def _inputs(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return check_inputs(x, self.spec.input_shape, self.spec.dtype)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The pruning masks by prunable weight name (empty for a dense method)."""
        return self.method.pruning.state.masks if self.method.pruning is not None else {}

    @property
    def density(self) -> float:
        return self.method.pruning.density if self.method.pruning is not None else 1.0

    @property
    def prune_events(self) -> list[dict]:
        return self.method.pruning.events if self.method.pruning is not None else []

    def masks_changed(self) -> None:
        """Refresh what depends on the masks: the FLOP densities, then every part's derived state."""
        self.cost.set_density({n: float(m.float().mean()) for n, m in self.masks.items()})
        for part in self.method.parts:
            part.masks_changed(self.ctx)

    # ------------------------------------------------------------------ the task driver
    def begin_task(self, task: int, n_chunks: int | None = None, classes: list[int] | None = None) -> None:
        """Start ``task`` (ending the open one); ``n_chunks``, if known, sets the pruning schedule's length
        and ends the task after its last chunk."""
        if task in self.snapshots or (task in self.task_classes and task != self.progress.task):
            raise EsaclError(f"task {task} was already learned; tasks must arrive in order")
        if self.progress.task >= 0 and task != self.progress.task:
            self.end_task()
        self.progress = TaskProgress(task=task, n_chunks=n_chunks, fixed_classes=bool(classes),
                                     first_task=not self.snapshots)
        self.task_classes[task] = sorted(classes) if classes else []
        for part in self.method.parts:
            part.begin_task(self.ctx)

    def end_task(self) -> dict[str, torch.Tensor]:
        """Finish the current task (its parts' end-of-task work, e.g. the last pruning), then snapshot the model."""
        task = self.progress.task
        if task < 0:
            if self.snapshots:  # already ended after its last chunk
                return self.snapshots[max(self.snapshots)]
            raise EsaclError("end_task() called before any task was observed")
        for part in self.method.parts:
            part.end_task(self.ctx)
        check_diverged(self.model, None, self.progress.task, "at the end")  # parts may train there (joint)
        self.snapshots[task] = pack(self.model, self.masks)
        if self.layout.latent is not None:  # the buffer holds no images: the task's last chunk calibrates
            if self.last_chunk is not None:
                self.calibration[task] = self.last_chunk[:CALIBRATION_SAMPLES].copy()
        elif self.buffer.size:
            # Own generator: drawing calibration samples must not change the training run.
            pick = rb.sample(self.buffer, CALIBRATION_SAMPLES, np.random.default_rng([self.seed, task]))
            self.calibration[task] = self.buffer.x[pick].copy()
        self.progress = TaskProgress(task=-1, first_task=False)
        for callback in self.on_task_end:
            callback(task)
        return self.snapshots[task]

    def observe(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, task: int,
                n_chunks: int | None = None, classes: list[int] | None = None) -> dict:
        """Learn one chunk of ``task`` (passes and batch size from the profile).

        A chunk of a new task begins it (``n_chunks`` and ``classes`` as in :meth:`begin_task`);
        a task of known length ends after its last chunk.
        """
        x_np = np.asarray(self._inputs(x.cpu() if torch.is_tensor(x) else np.asarray(x)))
        y_np = check_labels(y, len(x_np), self.spec.num_classes)
        if task != self.progress.task:
            self.begin_task(task, n_chunks, classes)
        if not self.progress.fixed_classes:
            self.task_classes[task] = sorted(set(self.task_classes[task]) | set(np.unique(y_np).tolist()))
        trained = self.samples_trained
        if self.layout.latent is not None:
            self.last_chunk = x_np
        loss = train_chunk(self.ctx, self.method, x_np, y_np, task)
        check_diverged(self.model, loss if self.samples_trained > trained else None, self.progress.task, "on this chunk")
        info = {"loss": loss, "density": self.density}
        if self.progress.chunks_done == self.progress.n_chunks:
            self.end_task()
        return info

    # ------------------------------------------------------------------ inference
    def logits(self, x: np.ndarray | torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Float32 logits of stored samples ``x`` (eval mode)."""
        return infer_logits(model or self.model, self.to_device(self._inputs(x)))

    def predict(self, x: np.ndarray | torch.Tensor, task: int | None = None) -> np.ndarray:
        """Predicted classes; with ``task``, only that task's classes compete (Task-IL)."""
        logits = self.logits(x)
        if task is not None:
            logits = task_logits(logits, self._classes(task))
        return logits.argmax(1).cpu().numpy()

    def _classes(self, task: int) -> list[int]:
        """The classes of an observed ``task``."""
        classes = self.task_classes.get(task)
        if not classes:
            raise EsaclError(f"task {task} has not been observed")
        return classes

    def evaluate(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, task: int,
                 model: nn.Module | None = None) -> dict[str, float]:
        """Class-IL (all classes compete) and Task-IL (the task's classes compete) accuracy."""
        yt = torch.as_tensor(check_labels(y, len(x), self.spec.num_classes), device=self.device)
        return accuracies(self.logits(x, model), yt, self._classes(task))

    # ------------------------------------------------------------------ snapshots and export
    def snapshot_model(self, task: int) -> nn.Module:
        """The model as it was at the end of ``task`` (rebuilt from its packed snapshot)."""
        if task not in self.snapshots:
            have = ", ".join(map(str, sorted(self.snapshots))) or "none"
            raise EsaclError(f"no snapshot for task {task} (tasks count from 0; finished tasks: {have})")
        return unpack(self.snapshots[task], self.spec.build()).eval()

    # ------------------------------------------------------------------ state (see persistence.py)
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here, as tensors, arrays and JSON, except the snapshots."""
        return persistence.state_dict(self)

    def load_state_dict(self, state: dict[str, Any], snapshots: dict[int, dict[str, torch.Tensor]],
                        calibration: dict[int, np.ndarray], where: str) -> None:
        """Put the learner (built with the same settings) into ``state`` with these task ``snapshots`` and their
        ``calibration`` samples."""
        persistence.load_state_dict(self, state, where)
        self.snapshots, self.calibration = snapshots, calibration

    # ------------------------------------------------------------------ sizes
    def model_bytes(self) -> dict[str, int]:
        """Bytes of the model as dense float32 and in the compact snapshot encoding."""
        return {"dense": dense_bytes(self.model), "sparse": packed_bytes(pack(self.model, self.masks))}

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights per prunable layer."""
        return layer_sparsity(self.model)

    def sparsity(self) -> float:
        """Fraction of exactly-zero prunable weights in the live model."""
        params = prunable_parameters(self.model)
        return sum(int((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())
