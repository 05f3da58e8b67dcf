"""Mixed precision (CPU autocast, fp16 loss scaling), the step without host syncs, and the buffer's
device copy: the GPU path's logic, exercised on the CPU."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from esacl_edge import StreamingLearner
from esacl_edge.cli import main
from esacl_edge.data.stream import iter_chunks
from esacl_edge.learn.plan import plan
from esacl_edge.device.profiles import load_profile
from esacl_edge.device.selection import autocast_dtype
from esacl_edge.learn import buffer as rb
from esacl_edge.learn.methods import get_method
from esacl_edge.learn.precision import MixedPrecision
from esacl_edge.learn.step import mean_loss, train_step


def _learner(tiny_stream, profile, method="esacl", **kw):
    return StreamingLearner("small_cnn", profile, 10, (8, 8, 1), method=method, sparsity=0.5, input_dtype="uint8",
                            normalization=tiny_stream.normalization, buffer_bytes=2240, **kw)


def _learn(learner, tiny_stream, tasks=2):
    for chunk in iter_chunks(tiny_stream):
        if chunk.task >= tasks:
            break
        learner.observe(chunk.x, chunk.y, chunk.task, n_chunks=2)


# ---------------------------------------------------------------------- precision choice
def test_precision_applies_on_the_device_the_profile_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    orin, desktop = load_profile("jetson_orin"), load_profile("cuda_desktop")
    assert orin.precision == "bf16" and desktop.precision == "bf16"
    assert autocast_dtype(orin, cuda, bf16_supported=lambda: True) == torch.bfloat16
    assert autocast_dtype(orin, cpu) is None                       # the CPU fallback trains in fp32
    assert autocast_dtype(orin.replace(precision="fp16"), cuda) == torch.float16
    with pytest.warns(RuntimeWarning, match="no bf16 support, so it trains in fp16 with loss scaling"):
        assert autocast_dtype(desktop, cuda, bf16_supported=lambda: False) == torch.float16
    cpu_profile = load_profile("cpu")
    assert autocast_dtype(cpu_profile, cpu) is None
    assert autocast_dtype(cpu_profile.replace(precision="bf16"), cpu) == torch.bfloat16  # asked for on the CPU


def test_loss_scaling_only_for_fp16():
    cpu = torch.device("cpu")
    assert MixedPrecision(cpu, torch.float16).scales_loss
    assert not MixedPrecision(cpu, torch.bfloat16).scales_loss and not MixedPrecision(cpu, None).scales_loss


# ---------------------------------------------------------------------- CPU autocast
def _separable(n, seed):
    """8x8 uint8 images whose class says which half is bright (learned to 100% in a few steps)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    bright = np.where(y[:, None] == 0, np.arange(8)[None] < 4, np.arange(8)[None] >= 4)
    return (rng.integers(0, 96, (n, 8, 8, 1)) + 128 * bright[:, :, None, None]).astype(np.uint8), y


def _learn_separable(precision, method, seed=0):
    profile = load_profile("cpu").replace(passes_per_chunk=2, batch_size=16, precision=precision)
    learner = StreamingLearner("small_cnn", profile, 2, (8, 8, 1), method=method, sparsity=0.5, input_dtype="uint8",
                               normalization={"scale": 1 / 255}, buffer_bytes=2240, seed=seed)
    seen = []
    learner.model[1].conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x, y = _separable(192, seed)
    for i in range(3):
        learner.observe(x[64 * i: 64 * (i + 1)], y[64 * i: 64 * (i + 1)], 0, n_chunks=3)
    trained_in = set(seen)   # evaluation, after this, runs in fp32
    return learner, learner.evaluate(*_separable(100, seed + 1), task=0)["class_il"], trained_in


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_trains_under_cpu_autocast_and_keeps_fp32_state(precision, dtype):
    learner, acc, seen = _learn_separable(precision, "esacl")   # IDS, SAM, replay and pruning under autocast
    assert learner.precision.name == precision and seen == {dtype}
    assert acc == 1.0
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert all(a.dtype == torch.float32 for a in learner.method.pruning.state.grad_abs.values())
    assert learner.buffer.logits.dtype == np.float32
    assert learner.precision.counts()["overflow_skipped_steps"] <= 2  # GradScaler's first scale may overflow once


# ---------------------------------------------------------------------- fp16 overflow
def test_an_fp16_overflow_skips_the_step_and_corrupts_nothing(tiny_stream, fast_profile, tmp_path):
    learner = _learner(tiny_stream, fast_profile.replace(precision="fp16", passes_per_chunk=1),
                       method="esacl-directional")  # the directional score keeps statistics to protect
    chunks = list(iter_chunks(tiny_stream))
    learner.observe(chunks[0].x, chunks[0].y, 0, n_chunks=2)
    assert learner.precision.counts()["overflow_skipped_steps"] == 0
    # A loss scale of 2^127 overflows every gradient: each step is skipped and the scale halves.
    learner.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    weights = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    stats = {n: (a.clone(), learner.method.pruning.state.f[n].clone())
             for n, a in learner.method.pruning.state.a.items()}
    sam = learner.method.optimizer
    before = sam.steps
    info = learner.observe(chunks[1].x, chunks[1].y, 0, n_chunks=2)
    steps = sam.steps - before
    assert steps >= 1 and np.isfinite(info["loss"])
    counts = learner.precision.counts()
    assert counts["overflow_skipped_steps"] == steps
    assert counts["unperturbed_sam_steps"] == sum((k - 1) % sam.every == 0 for k in range(before + 1, sam.steps + 1))
    assert learner.precision.scaler.get_scale() == 2.0 ** (127 - steps)
    masks = learner.masks
    for n, p in learner.model.named_parameters():   # no update; pruning may only have zeroed weights
        if n == "1.classifier.bias":   # the task's end calibrated it on the buffer (calibration.py)
            continue
        kept = masks[n] if n in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[kept], weights[n][kept]), n
        assert torch.isfinite(p).all()
    for n, (a, f) in stats.items():   # the statistics of live weights are untouched (pruned ones are zeroed)
        kept, state = masks[n], learner.method.pruning.state
        assert torch.equal(state.a[n][kept], a[kept]) and torch.equal(state.f[n][kept], f[kept]), n
    # The counts and the scaler travel with the saved state.
    learner.write_snapshot(tmp_path, 0)
    learner.save_state(tmp_path)
    again = _learner(tiny_stream, fast_profile.replace(precision="fp16", passes_per_chunk=1),
                     method="esacl-directional")
    assert again.load_state(tmp_path)
    assert again.precision.counts()["overflow_skipped_steps"] == steps
    assert again.precision.scaler.get_scale() == 2.0 ** (127 - steps)


def test_a_skipped_fp16_step_does_not_count_in_the_chunk_loss():
    losses = [torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(3.0)]
    assert mean_loss(losses, finite_only=True) == 2.0       # fp16: the overflowed step was skipped
    assert mean_loss(losses) == float("inf")                 # fp32/bf16: a non-finite loss is divergence
    assert np.isnan(mean_loss([torch.tensor(float("nan"))], finite_only=True)) and np.isnan(mean_loss([]))


def test_an_ascent_overflow_leaves_the_sam_step_unperturbed():
    torch.manual_seed(0)
    precision = MixedPrecision(torch.device("cpu"), torch.float16)
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([float("nan"), 2.0])]
    finite = precision.unscale_ascent(grads)
    assert not finite and all(torch.isfinite(g).all() for g in grads)
    assert precision.counts()["unperturbed_sam_steps"] == 1
    fine = [torch.tensor([3.0, 4.0]) * 2.0 ** 16]
    assert precision.unscale_ascent(fine) and torch.allclose(fine[0], torch.tensor([3.0, 4.0]))


# ---------------------------------------------------------------------- no host sync per step
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero", "argwhere",
           "unique", "unique_consecutive", "bincount", "masked_select", "nonzero_static"}


class HostSyncs(TorchFunctionMode):
    """Records the tensor operations that make a host wait for a GPU (values read on the host, outputs
    whose size depends on the data, boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING or (name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
                torch.is_tensor(a) and a.dtype == torch.bool
                for a in (args[1] if isinstance(args[1], (tuple, list)) else (args[1],)))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,precision", [("esacl", "fp32"), ("esacl", "fp16"), ("esacl-directional", "bf16"),
                                              ("derpp", "fp32"), ("sparcl", "fp32")])
def test_a_training_step_never_waits_for_the_device(tiny_stream, fast_profile, method, precision):
    learner = _learner(tiny_stream, fast_profile.replace(precision=precision), method=method)
    chunks = list(iter_chunks(tiny_stream))
    learner.observe(chunks[0].x, chunks[0].y, 0, n_chunks=2)   # the buffer holds samples: replay is drawn
    assert learner.buffer.size > 0
    x, y = learner.to_device(chunks[1].x), torch.as_tensor(chunks[1].y)
    idx = torch.arange(16)
    with HostSyncs() as syncs:
        for _ in range(3):   # SAM and plain steps alternate; IDS scores and selects on the device
            train_step(learner.ctx, learner.method, x[idx], y[idx], idx)
    assert syncs.calls == []


def test_the_host_sync_detector_sees_the_old_selection():
    with HostSyncs() as syncs:   # a selection that reads the scores on the host each step
        y = torch.tensor([0, 1, 1])
        classes, counts = torch.unique(y, return_counts=True)
        dict(zip(classes.tolist(), counts.tolist()))
        torch.nonzero(y == 1)
        y[y > 0]
    assert syncs.calls == ["unique", "tolist", "tolist", "nonzero", "__getitem__"]


# ---------------------------------------------------------------------- the buffer on the device
@pytest.mark.parametrize("method", ["derpp", "esacl-idsbuffer"])
def test_replay_from_the_device_copy_is_the_same_run(tiny_stream, fast_profile, method):
    plain, mirrored = (_learner(tiny_stream, fast_profile, method=method) for _ in range(2))
    mirrored.buffer_copy = rb.DeviceCopy.of(mirrored.buffer, torch.device("cpu"))
    for learner in (plain, mirrored):
        _learn(learner, tiny_stream, tasks=3)
    for (n, p), q in zip(plain.model.named_parameters(), mirrored.model.parameters()):
        assert torch.equal(p, q), n
    copy, buf = mirrored.buffer_copy, mirrored.buffer
    copy.sync(buf)
    n = buf.size
    assert torch.equal(copy.x[:n], torch.from_numpy(buf.x[:n])) and torch.equal(copy.y[:n], torch.from_numpy(buf.y[:n]))
    assert torch.equal(copy.logits[:n], torch.from_numpy(buf.logits[:n]))
    assert buf.changed == [] and plain.buffer.changed is None   # nothing tracked without a copy


def test_the_budget_keeps_a_device_copy_of_the_buffer_only_where_it_fits():
    method = get_method("derpp")
    desktop = load_profile("cuda_desktop")
    pl = plan(desktop, "small_cnn", (28, 28, 1), 10, method)
    assert pl.buffer_on_device and "buffer_device_copy" not in pl.memory_terms  # discrete GPU: the term is the copy
    orin = load_profile("jetson_orin").replace(model_bytes=None, target_sparsity=0.9)
    pl = plan(orin, "small_cnn", (28, 28, 1), 10, method)
    assert pl.buffer_on_device and pl.memory_terms["buffer_device_copy"] == pl.buffer_bytes  # unified: a second copy
    tight = orin.replace(training_peak_bytes=pl.memory_estimate_bytes - pl.buffer_bytes // 2)
    pl = plan(tight, "small_cnn", (28, 28, 1), 10, method)
    assert not pl.buffer_on_device and "buffer_device_copy" not in pl.memory_terms
    assert not plan(load_profile("cpu"), "small_cnn", (28, 28, 1), 10, method).buffer_on_device


# ---------------------------------------------------------------------- the CLI
def test_learn_precision_flag_is_recorded_and_resumes_only_alike(tiny_stream, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["learn", "--stream", str(tiny_stream.root), "--run", str(run), "--method", "derpp", "--passes", "1",
            "--quiet"]
    assert main(args + ["--precision", "bf16"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["precision"] == "bf16" and results["settings"]["precision"] == "bf16"
    assert results["overflow_skipped_steps"] == 0 and results["unperturbed_sam_steps"] == 0
    assert "in bf16" in capsys.readouterr().out
    assert main(args + ["--precision", "fp16"]) == 2
    assert "precision 'bf16' -> 'fp16'" in capsys.readouterr().err


def test_device_override_trains_in_fp32_unless_told(tiny_stream, tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["learn", "--profile", "jetson_orin", "--device", "cpu", "--stream", str(tiny_stream.root),
                     "--run", str(run), "--method", "finetune", "--passes", "1", "--quiet"]) == 0
    assert json.loads((run / "results.json").read_text())["precision"] == "fp32"


def test_fp16_steps_use_the_fused_update(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile.replace(precision="fp16"))
    assert learner.optimizer.defaults["fused"]
    assert not _learner(tiny_stream, fast_profile).optimizer.defaults["fused"]
