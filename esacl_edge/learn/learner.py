"""StreamingLearner: learns chunk by chunk with EsaCL (masked SAM + SDP + IDS + DER++ replay).

The training step (:meth:`StreamingLearner._step`) follows the method spec in order:
IDS step selection, masked SAM ascent, descent, pruning statistics. After each chunk the
buffer takes its IDS share of the chunk and SDP prunes along the cubic schedule.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.snapshot import ModelSpec, dense_bytes, pack, packed_bytes, unpack
from ..device.budget import plan
from ..device.profiles import Profile, load_profile
from ..device.selection import autocast_dtype, select_device
from ..errors import EsaclError
from ..models import layer_sparsity, prunable_parameters
from . import buffer as rb
from . import ewc, ids, sdp, sparcl
from .cost import CostMeter, layer_forward_flops
from .methods import MethodConfig, get_method

CALIBRATION_SAMPLES = 256


@dataclass
class TaskProgress:
    """Where the learner is within the current task."""

    task: int = -1
    n_chunks: int | None = None
    chunks_done: int = 0
    steps: int = 0
    start_density: float = 1.0
    fixed_classes: bool = False  # classes given at begin_task: other labels (blurry chunks) do not join the task


@contextlib.contextmanager
def _frozen_norm_stats(model: nn.Module):
    """Keep BatchNorm running statistics out of the perturbed (second) SAM pass."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom


class StreamingLearner:
    """Learn classification tasks from streaming chunks with a sparse model and a small buffer.

    Args:
        model: backbone name (``small_cnn`` or ``resnet18_reduced``).
        profile: device profile name, YAML path, or a loaded :class:`Profile`.
        num_classes: classes over all tasks (one shared head; Task-IL masks it per task).
        input_shape: one sample as stored, ``(H, W, C)``.
        method: ``esacl`` (default) or ``finetune``; or a :class:`MethodConfig`.
        sparsity: target fraction of zero prunable weights; default: the profile's.
        buffer_bytes: replay buffer budget; default: the profile's.
        input_dtype: storage dtype of inputs (``uint8`` or ``float32``), kept in the buffer.
        normalization: ``{"scale", "mean", "std"}`` applied inside the model.
    """

    def __init__(self, model: str = "small_cnn", profile: str | Path | Profile = "cpu", num_classes: int = 10,
                 input_shape: tuple[int, int, int] = (8, 8, 1), *, method: str | MethodConfig = "esacl",
                 sparsity: float | None = None, buffer_bytes: int | None = None, input_dtype: str = "float32",
                 normalization: dict | None = None, seed: int = 0, class_names: list[str] | None = None,
                 pattern: str | None = None) -> None:
        profile = profile if isinstance(profile, Profile) else load_profile(profile)
        self.cfg = method if isinstance(method, MethodConfig) else get_method(method)
        if sparsity is not None and not 0.0 <= sparsity < 1.0:
            raise EsaclError(f"sparsity must be in [0, 1), got {sparsity}")
        if buffer_bytes is not None and buffer_bytes < 0:
            raise EsaclError(f"buffer budget must be >= 0 bytes, got {buffer_bytes}")
        if not profile.training_supported:
            raise EsaclError(f"profile {profile.name} ({profile.source}) does not support training: "
                             f"{profile.description}")
        # The budgets decide sparsity, buffer capacity and batch size, before anything is trained.
        self.plan = plan(profile, model, tuple(input_shape), num_classes, self.cfg, input_dtype, sparsity, buffer_bytes)
        try:
            self.pattern = sdp.parse_pattern(pattern)
        except ValueError as exc:
            raise EsaclError(str(exc)) from None
        self.profile = profile.replace(batch_size=self.plan.batch_size)
        self.target_sparsity = self.plan.target_sparsity
        self.seed = seed
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.device = select_device(self.profile)
        self.amp_dtype = autocast_dtype(self.profile, self.device)
        self.spec = ModelSpec(model, tuple(input_shape), num_classes, dict(normalization or {}), input_dtype,
                              class_names)
        self.model = self.spec.build().to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay)
        self.sdp = sdp.init_state(self.model, self.cfg.stat_decay)
        self.buffer = rb.new_buffer(self.plan.buffer_bytes, tuple(input_shape), input_dtype, num_classes)
        self.ewc = ewc.EwcState()
        self.grad_masks: dict[str, torch.Tensor] | None = None  # SparCL gradient masking
        self.joint_data: list[tuple[np.ndarray, np.ndarray]] = []  # only for the joint upper bound
        self.cost = CostMeter(layer_forward_flops(self.model, self.spec.input_shape))
        self.progress = TaskProgress()
        self.task_classes: dict[int, list[int]] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.calibration: dict[int, np.ndarray] = {}  # buffer samples kept with each snapshot (INT8 export)
        self.prune_events: list[dict] = []
        self.samples_trained = 0

    # ------------------------------------------------------------------ data helpers
    def _tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored NHWC samples -> float32 NCHW on the training device."""
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        if t.ndim != 4 or tuple(t.shape[1:]) != tuple(self.spec.input_shape):
            raise EsaclError(f"inputs must have shape (N, {', '.join(map(str, self.spec.input_shape))}), "
                             f"got {tuple(t.shape)}")
        return t.to(self.device, torch.float32).permute(0, 3, 1, 2).contiguous()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def density(self) -> float:
        return sdp.density(self.sdp) if self.cfg.sparse else 1.0

    # ------------------------------------------------------------------ task boundaries
    def begin_task(self, task: int, n_chunks: int | None = None, classes: list[int] | None = None) -> None:
        """Start ``task``; ``n_chunks`` (if known) sets the pruning schedule's length."""
        if task in self.task_classes and task != self.progress.task:
            raise EsaclError(f"task {task} was already learned; tasks must arrive in order")
        if self.progress.task >= 0 and task != self.progress.task:
            self.end_task()
        self.progress = TaskProgress(task=task, n_chunks=n_chunks, start_density=self.density,
                                     fixed_classes=bool(classes))
        self.task_classes[task] = sorted(classes) if classes else []

    def end_task(self) -> dict[str, torch.Tensor]:
        """Finish the current task: reach the target sparsity exactly, then snapshot the model."""
        task = self.progress.task
        if task < 0:
            raise EsaclError("end_task() called before any task was observed")
        if self.cfg.joint:
            self._train_joint()
        if self.cfg.sparse:
            self._prune(1.0 - self.target_sparsity)
        if self.cfg.ewc_lambda > 0:
            ewc.consolidate(self.model, self.ewc, self.cfg.ewc_gamma)
        self.snapshots[task] = pack(self.model, self.sdp.masks if self.cfg.sparse else {})
        if self.buffer.size:
            # Own generator: drawing calibration samples must not change the training run.
            pick = rb.sample(self.buffer, CALIBRATION_SAMPLES, np.random.default_rng([self.seed, task]))
            self.calibration[task] = self.buffer.x[pick].copy()
        self.progress = TaskProgress(task=-1)
        return self.snapshots[task]

    # ------------------------------------------------------------------ learning
    def observe(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, task: int) -> dict:
        """Learn one chunk of task ``task`` (passes and batch size from the profile)."""
        if task != self.progress.task:
            self.begin_task(task)
        y_np = np.asarray(y.cpu() if torch.is_tensor(y) else y).astype(np.int64)
        if y_np.min() < 0 or y_np.max() >= self.spec.num_classes:
            raise EsaclError(f"labels must be in 0..{self.spec.num_classes - 1}, got {y_np.min()}..{y_np.max()}")
        if not self.progress.fixed_classes:
            self.task_classes[task] = sorted(set(self.task_classes[task]) | set(np.unique(y_np).tolist()))
        x_np = np.asarray(x.cpu() if torch.is_tensor(x) else x)
        if self.cfg.joint:  # the upper bound keeps everything and trains at the task's end
            self.joint_data.append((x_np.copy(), y_np))
            self.progress.chunks_done += 1
            return {"loss": float("nan"), "density": self.density}
        xt, yt = self._tensor(x_np), torch.as_tensor(y_np, device=self.device)
        n, bs, passes = len(yt), self.profile.batch_size, self.profile.passes_per_chunk
        logits_rec = np.zeros((n, self.spec.num_classes), np.float32)
        score_rec = np.zeros(n, np.float32)
        tracker = sparcl.ForgettingTracker.new(n) if self.cfg.ddr_frac > 0 else None
        active = np.arange(n)
        losses = []
        self.model.train()
        for p in range(passes):
            if tracker is not None and p == int(self.cfg.ddr_after * passes):
                active = tracker.keep(active, self.cfg.ddr_frac)
            order = torch.as_tensor(self.rng.permutation(active), device=self.device)
            # Equal-sized minibatches of at most batch_size: no tiny remainder batch.
            for idx in torch.tensor_split(order, math.ceil(len(order) / bs)):
                loss, logits, scores = self._step(xt[idx], yt[idx])
                losses.append(loss)
                idx_np = idx.cpu().numpy()
                logits_rec[idx_np], score_rec[idx_np] = logits, scores
                if tracker is not None:
                    tracker.update(idx_np, logits.argmax(1) == y_np[idx_np])
        self._offer(x_np, y_np, task, logits_rec, score_rec)
        self.progress.chunks_done += 1
        if self.cfg.sparse:
            self._prune_on_schedule(xt, yt)
            last_chunk = self.progress.chunks_done == self.progress.n_chunks
            if self.cfg.mask_update_every and self.progress.chunks_done % self.cfg.mask_update_every == 0 \
                    and not last_chunk:  # weights regrown now would stay zero in the snapshot
                sparcl.update_masks(self.model, self.sdp, self.cfg.importance_lambda, self.cfg.mask_update_frac,
                                    self.optimizer)
                self._masks_changed()
        return {"loss": float(np.mean(losses)), "density": self.density}

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, np.ndarray, np.ndarray]:
        """One EsaCL step. Returns the loss and, for every sample of ``xb``, its logits and IDS score."""
        cfg, model = self.cfg, self.model
        # 1. IDS, step level: score the minibatch without gradients, keep the critical instances.
        if cfg.keep_frac < 1.0:
            with torch.no_grad(), self._autocast():
                logits = model(xb).float()
            self.cost.forward(len(yb))
            scores = ids.sample_scores(logits, yb, cfg.ids_score)
            keep = ids.select_step(scores, yb, cfg.keep_frac)
        else:
            logits = scores = keep = None
        xk, yk = (xb, yb) if keep is None else (xb[keep], yb[keep])
        replay = self._replay_batch(round(cfg.replay_ratio * len(yb)))
        # 2. Ascent: gradient at theta*m, perturbation epsilon on live weights only.
        n_train = len(yk) + (0 if replay is None else len(replay[1]))
        self.optimizer.zero_grad(set_to_none=True)
        loss, out_cur = self._loss(xk, yk, replay)
        loss.backward()
        self.cost.train_pass(n_train)
        if logits is None:  # no scoring pass: record from the training forward
            logits = out_cur.detach().float()
            scores = ids.sample_scores(logits, yb, cfg.ids_score)
        if cfg.sparse and (cfg.mask_update_every or (self.progress.task > 0 and self.progress.steps < cfg.regrow_steps)):
            sdp.record_grad_abs(model, self.sdp)
        if cfg.rho > 0:
            eps = sdp.perturb(model, self.sdp, cfg.rho)
            # 3. Descent: gradient at the perturbed point, applied at theta to live weights.
            self.optimizer.zero_grad(set_to_none=True)
            with _frozen_norm_stats(model):
                loss, _ = self._loss(xk, yk, replay)
                loss.backward()
            self.cost.train_pass(n_train)
            sdp.restore(model, eps)
        if cfg.sparse:
            sdp.mask_grads(model, self.sdp)
            # 4. Pruning statistics at the perturbed point.
            sdp.accumulate(model, self.sdp)
            if self.grad_masks is not None:
                sdp.mask_grads(model, self.sdp, self.grad_masks)
        if cfg.ewc_lambda > 0:
            ewc.accumulate(model, self.ewc)
        self.optimizer.step()
        self.progress.steps += 1
        self.samples_trained += len(yk)
        if self.progress.task > 0 and self.progress.steps == cfg.regrow_steps and cfg.sparse:
            self._regrow()
        return float(loss.detach()), logits.cpu().numpy(), scores.cpu().numpy()

    def _replay_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.buffer.size == 0:
            return None
        idx = rb.sample(self.buffer, n, self.rng)
        return (self._tensor(self.buffer.x[idx]), torch.as_tensor(self.buffer.y[idx].astype(np.int64),
                device=self.device), torch.as_tensor(self.buffer.logits[idx], device=self.device))

    def _loss(self, x: torch.Tensor, y: torch.Tensor, replay) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on current samples + DER++ (alpha * logit MSE + beta * CE) on replay."""
        with self._autocast():
            out = self.model(x if replay is None else torch.cat([x, replay[0]])).float()
        cur = out[: len(y)]
        loss = F.cross_entropy(cur, y)
        if replay is not None:
            old, (_, ry, rlogits) = out[len(y):], replay
            if self.cfg.alpha:
                loss = loss + self.cfg.alpha * F.mse_loss(old, rlogits)
            loss = loss + self.cfg.beta * F.cross_entropy(old, ry)
        if self.cfg.ewc_lambda > 0:
            loss = loss + self.cfg.ewc_lambda * ewc.penalty(self.model, self.ewc)
        return loss, cur

    def _offer(self, x: np.ndarray, y: np.ndarray, task: int, logits: np.ndarray, scores: np.ndarray) -> None:
        if self.cfg.buffer == "ids":
            rb.offer_ids(self.buffer, x, y, task, logits, scores, self.cfg.buffer_spread, self.rng)
        elif self.cfg.buffer == "reservoir":
            rb.offer_reservoir(self.buffer, x, y, task, logits, scores, self.rng)

    # ------------------------------------------------------------------ SDP schedule
    def _prune(self, target_density: float) -> int:
        score = sdp.scores(self.model, self.sdp, self.cfg.prune_score, self.cfg.importance_lambda)
        removed = sdp.prune_to(self.model, self.sdp, target_density, score, self.optimizer, pattern=self.pattern)
        if removed:
            self._masks_changed()
        return removed

    def _masks_changed(self) -> None:
        """Refresh what depends on the masks: SparCL's gradient masks and the FLOP densities."""
        if self.cfg.grad_keep < 1.0:
            self.grad_masks = sparcl.gradient_masks(self.model, self.sdp, self.cfg.importance_lambda,
                                                    self.cfg.grad_keep)
        weight = {n: float(m.float().mean()) for n, m in self.sdp.masks.items()}
        grad = {n: float(m.float().mean()) for n, m in self.grad_masks.items()} if self.grad_masks else None
        self.cost.set_density(weight, grad)

    def _train_joint(self) -> None:
        """Joint upper bound: ``passes_per_chunk`` epochs over all data seen so far (plain SGD)."""
        x_all = np.concatenate([x for x, _ in self.joint_data])
        y_all = np.concatenate([y for _, y in self.joint_data])
        xt, yt = self._tensor(x_all), torch.as_tensor(y_all, device=self.device)
        self.model.train()
        for _ in range(self.profile.passes_per_chunk):
            order = torch.as_tensor(self.rng.permutation(len(yt)), device=self.device)
            for idx in torch.tensor_split(order, math.ceil(len(order) / self.profile.batch_size)):
                self._step(xt[idx], yt[idx])

    def _prune_on_schedule(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """After a chunk: prune to the cubic schedule's density (no fine-tuning afterwards)."""
        prog, target = self.progress, 1.0 - self.target_sparsity
        if prog.n_chunks is not None:
            total = max(1, math.ceil(self.cfg.prune_until * prog.n_chunks))
            want = sdp.cubic_density(prog.start_density, target, prog.chunks_done, total)
        else:
            cur = self.density
            want = cur - self.cfg.gap_per_chunk * (cur - target)
        if round(want * sdp.size(self.sdp)) >= sdp.live(self.sdp):
            return
        before = self.density
        acc_before = self._accuracy(x, y)
        removed = self._prune(want)
        self.prune_events.append({"task": prog.task, "chunk": prog.chunks_done - 1, "density_before": before,
                                  "density_after": self.density, "removed": removed,
                                  "chunk_acc_before": acc_before, "chunk_acc_after": self._accuracy(x, y)})

    def _regrow(self) -> None:
        grown = sdp.regrow(self.model, self.sdp, self.cfg.regrow_frac, self.optimizer)
        self._masks_changed()
        # The schedule for this task starts from the regrown density.
        self.progress.start_density = self.density
        if grown:
            self.prune_events.append({"task": self.progress.task, "chunk": self.progress.chunks_done,
                                      "regrown": grown, "density_after": self.density})

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _logits(self, x: np.ndarray | torch.Tensor, model: nn.Module | None = None, batch: int = 512) -> torch.Tensor:
        model = model or self.model
        was_training = model.training
        model.eval()
        xt = self._tensor(x)
        out = torch.cat([model(xt[i:i + batch]).float() for i in range(0, len(xt), batch)])
        model.train(was_training)
        return out

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            acc = (self.model(x).argmax(1) == y).float().mean().item()
            self.model.train(was)
        return acc

    def predict(self, x: np.ndarray | torch.Tensor, task: int | None = None) -> np.ndarray:
        """Predicted classes; with ``task``, only that task's classes compete (Task-IL)."""
        logits = self._logits(x)
        if task is not None:
            logits = self._restrict(logits, task)
        return logits.argmax(1).cpu().numpy()

    def _restrict(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        classes = self.task_classes.get(task)
        if not classes:
            raise EsaclError(f"task {task} has not been observed")
        masked = torch.full_like(logits, float("-inf"))
        masked[:, classes] = logits[:, classes]
        return masked

    def evaluate(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, task: int,
                 model: nn.Module | None = None) -> dict[str, float]:
        """Class-IL (all classes compete) and Task-IL (the task's classes compete) accuracy."""
        logits = self._logits(x, model)
        yt = torch.as_tensor(np.asarray(y), device=logits.device)
        return {"class_il": (logits.argmax(1) == yt).float().mean().item(),
                "task_il": (self._restrict(logits, task).argmax(1) == yt).float().mean().item()}

    # ------------------------------------------------------------------ snapshots and export
    def snapshot_model(self, task: int) -> nn.Module:
        """The model as it was at the end of ``task`` (rebuilt from its packed snapshot)."""
        if task not in self.snapshots:
            have = ", ".join(map(str, sorted(self.snapshots))) or "none"
            raise EsaclError(f"no snapshot for task {task} (tasks count from 0; finished tasks: {have})")
        return unpack(self.snapshots[task], self.spec.build()).eval()

    def export_onnx(self, task: int, path: str | Path, variant: str = "sparse", opset: int | None = None,
                    test: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """Export the model of ``task`` to one ONNX file (+ sidecar JSON), checked against PyTorch.

        ``variant``: ``sparse`` (default), ``dense``, ``structured`` or ``int8``; ``test`` (x, y)
        adds accuracy before and after export to the report.
        """
        from ..deploy.export import export_variant

        meta = {"task": task, "task_classes": [self.task_classes[t] for t in sorted(self.task_classes) if t <= task],
                "pattern": None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}",
                "providers": list(self.profile.providers)}
        return export_variant(self.snapshot_model(task), self.spec, path, variant, meta,
                              calibration=self.calibration.get(task), opset=opset or self.profile.opset, test=test)

    def save_state(self, folder: str | Path) -> Path:
        """Save everything needed to continue later (see :mod:`esacl_edge.checkpoint`), crash-safely."""
        from .. import checkpoint

        return checkpoint.save(folder, self)

    def load_state(self, folder: str | Path) -> bool:
        """Continue from the latest state saved in ``folder`` by a learner built with the same settings.

        Returns False (and changes nothing) when ``folder`` holds no saved state.
        """
        from .. import checkpoint

        return checkpoint.load(folder, self) is not None

    def model_bytes(self) -> dict[str, int]:
        """Bytes of the model as dense float32 and in the compact snapshot encoding."""
        return {"dense": dense_bytes(self.model),
                "sparse": packed_bytes(pack(self.model, self.sdp.masks if self.cfg.sparse else {}))}

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of exactly-zero weights per prunable layer."""
        return layer_sparsity(self.model)

    def sparsity(self) -> float:
        """Fraction of exactly-zero prunable weights in the live model."""
        params = prunable_parameters(self.model)
        return sum(int((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())
