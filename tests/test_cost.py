import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks
from esacl_edge.device.memory import peak_memory_bytes, peak_rss_bytes
from esacl_edge.learn.cost import CostMeter, layer_forward_flops
from esacl_edge.learn.methods import esacl
from esacl_edge.learn.pruning import Pruning
from esacl_edge.models import build_model


def test_layer_flops_match_a_hand_count_on_a_small_conv_net():
    # conv 3x3, 2 -> 4 channels, padding 1 on 6x5 input; then linear 4*6*5 -> 3.
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 5, 3))
    flops = layer_forward_flops(net, (6, 5, 2))
    conv_macs = 6 * 5 * 4 * 2 * 3 * 3  # output positions x out channels x in channels x kernel
    linear_macs = 4 * 6 * 5 * 3
    assert flops == {"0.weight": 2 * conv_macs, "2.weight": 2 * linear_macs}


def test_small_cnn_flops_by_hand():
    flops = layer_forward_flops(build_model("small_cnn", (8, 8, 1), 10), (8, 8, 1))
    assert flops["1.conv1.weight"] == 2 * 8 * 8 * 32 * 1 * 9
    assert flops["1.conv2.weight"] == 2 * 4 * 4 * 64 * 32 * 9
    assert flops["1.fc1.weight"] == 2 * 64 * 2 * 2 * 128
    assert flops["1.classifier.weight"] == 2 * 128 * 10


def test_rigl_convention():
    meter = CostMeter({"a": 100, "b": 50})
    meter.train_pass(2)
    assert meter.flops == 2 * 3 * 150  # backward = two forwards
    meter.set_density({"a": 0.1, "b": 0.5})
    meter.flops = 0
    meter.forward(1)
    assert meter.flops == pytest.approx(100 * 0.1 + 50 * 0.5)
    meter.set_density({"a": 0.1, "b": 0.5}, grad={"a": 0.05, "b": 0.5})
    meter.flops = 0
    meter.train_pass(1)
    assert meter.flops == pytest.approx(2 * 35 + 100 * 0.05 + 25)
    assert meter.macs == meter.flops / 2


def test_finetune_cost_is_three_dense_forwards_per_trained_sample(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method="finetune", input_dtype="uint8")
    chunk = next(iter_chunks(tiny_stream))
    learner.observe(chunk.x, chunk.y, 0)
    assert learner.cost.flops == 3 * learner.cost.dense_forward_flops * len(chunk.y) * fast_profile.passes_per_chunk


def _step(fw, kept, replay=0, sam=False, fg=None):
    """FLOPs of one EsaCL update: forward + backward on the kept samples and the replay batch (weight
    gradients at ``fg``, default ``fw``), plus on a SAM step the ascent pass on the kept samples only."""
    fg = fw if fg is None else fg
    return (kept + replay) * (2 * fw + fg) + (kept * 3 * fw if sam else 0)


def test_esacl_cost_scores_on_the_first_pass_and_runs_sam_on_every_4th_step(tiny_stream, fast_profile):
    # The warm-up keeps the model dense for these two chunks, so every pass costs the dense forward.
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method="esacl-warmup", input_dtype="uint8",
                               buffer_bytes=0)
    assert learner.method.optimizer.every == 4
    chunk = next(iter_chunks(tiny_stream))  # 24 samples: minibatches of 12 and 12, IDS keeps 6 of each
    learner.begin_task(0, n_chunks=10)
    learner.observe(chunk.x, chunk.y, 0)
    f = learner.cost.dense_forward_flops
    # Scoring forward of all 24 on the first pass only; 4 steps, SAM on the 1st only.
    want = 24 * f + _step(f, 6, sam=True) + 3 * _step(f, 6)
    assert fast_profile.passes_per_chunk == 2 and learner.cost.flops == pytest.approx(want)
    learner.method.select.rescore_every_pass = True  # a scoring forward on every pass
    before = learner.cost.flops
    learner.observe(chunk.x, chunk.y, 0)
    assert learner.cost.flops - before == pytest.approx(want + 24 * f)


def _weighted(learner, densities):
    """Forward FLOPs of one sample with each prunable layer at the given density."""
    return sum(f * densities.get(n, 1.0) for n, f in learner.cost.layer_flops.items())


def _density(masks):
    return {n: float(m.float().mean()) for n, m in masks.items()}


def _learner(tiny_stream, profile, method="esacl", **kw):
    return StreamingLearner("small_cnn", profile, 10, (8, 8, 1), method=method, input_dtype="uint8",
                            normalization=tiny_stream.normalization, **kw)


def test_replay_samples_are_charged_with_the_step(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile, "derpp", buffer_bytes=2240)  # 20 buffered samples
    chunks = list(iter_chunks(tiny_stream))
    f, passes = learner.cost.dense_forward_flops, fast_profile.passes_per_chunk
    learner.observe(chunks[0].x, chunks[0].y, 0)  # empty buffer: no replay
    assert learner.cost.flops == 3 * f * len(chunks[0].y) * passes
    assert learner.buffer.size == 20
    before, trained = learner.cost.flops, learner.samples_trained
    learner.observe(chunks[1].x, chunks[1].y, 0)  # 16 samples, one minibatch, plus 16 replayed, per pass
    assert learner.samples_trained - trained == 16 * passes  # replayed samples are not "trained samples"...
    assert learner.cost.flops - before == 3 * f * (16 + 16) * passes  # ...but they go through the passes


def test_a_pruned_model_is_charged_at_its_layer_densities(tiny_stream, fast_profile):
    method = esacl(pruning=Pruning(allocation="global", warmup=0.0))  # layers at uneven densities
    learner = _learner(tiny_stream, fast_profile, method, sparsity=0.8, buffer_bytes=0)
    chunks = list(iter_chunks(tiny_stream))
    learner.begin_task(0, n_chunks=10)
    learner.observe(chunks[0].x, chunks[0].y, 0)  # dense (4 steps), then the schedule's first pruning step
    dens = _density(learner.masks)
    assert 0.5 < learner.density < 0.9 and len(set(dens.values())) > 1  # layers pruned unevenly
    fw, before = _weighted(learner, dens), learner.cost.flops
    learner.observe(chunks[1].x, chunks[1].y, 0)  # 16 samples, one minibatch: IDS trains the top 8
    assert learner.cost.flops - before == pytest.approx(16 * fw + _step(fw, 8, sam=True) + _step(fw, 8), rel=1e-12)
    # A global ranking keeps the FLOP-heavy convolutions denser than the weights overall.
    assert learner.density < fw / learner.cost.dense_forward_flops < 1


def test_uniform_allocation_prunes_every_layer_but_the_stem_and_the_classifier_alike(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile, sparsity=0.8, buffer_bytes=0)
    chunks = list(iter_chunks(tiny_stream))
    for c in chunks[:2]:
        learner.observe(c.x, c.y, 0, n_chunks=2)
    total = sum(m.numel() for m in learner.masks.values())
    assert learner.density == pytest.approx(0.2, abs=1 / total)
    (stem, d_stem), *rest, (head, d_head) = _density(learner.masks).items()
    assert stem == "1.conv1.weight" and d_stem == 1.0  # the first layer stays dense
    assert head == "1.classifier.weight" and d_head == 1.0  # and the classifier
    dense = learner.masks[stem].numel() + learner.masks[head].numel()
    d_rest = (0.2 * total - dense) / (total - dense)
    for name, d in rest:
        assert d == pytest.approx(d_rest, abs=1 / learner.masks[name].numel()), name
    # So the FLOPs of a forward fall with the weights, up to the stem's and the classifier's shares.
    f = learner.cost.layer_flops
    dense_flops = f[stem] + f[head]
    want = (dense_flops + d_rest * (learner.cost.dense_forward_flops - dense_flops)) / learner.cost.dense_forward_flops
    flop_density = _weighted(learner, _density(learner.masks)) / learner.cost.dense_forward_flops
    assert flop_density == pytest.approx(want, rel=1e-2)


def test_esacl_with_a_buffer_and_a_pruned_model(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile, sparsity=0.8, buffer_bytes=2240)
    chunks = list(iter_chunks(tiny_stream))
    for c in chunks[:2]:
        learner.observe(c.x, c.y, 0, n_chunks=2)
    assert learner.buffer.size == 20 and learner.density == pytest.approx(0.2, abs=1e-3)
    learner.method.pruning.regrow_frac = 0.0  # keep the masks fixed through the next chunk
    fw, before = _weighted(learner, _density(learner.masks)), learner.cost.flops
    learner.observe(chunks[3].x, chunks[3].y, 1, n_chunks=2)
    # 16 samples, one minibatch per pass: scored once; the top 8 with a replay batch of 12 (1.5 per new sample
    # trained); steps 7 and 8 of the run, neither a SAM step (SAM on steps 1, 5, 9...).
    f_dense = learner.cost.dense_forward_flops
    # Step 7 of the run is task 1's regrowth window: its weight gradients are read dense.
    want = 16 * fw + _step(fw, 8, 12, fg=f_dense) + _step(fw, 8, 12)
    assert learner.cost.flops - before == pytest.approx(want, rel=1e-12)


def test_regrowth_reads_one_steps_dense_weight_gradients_and_is_charged_dense(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile, sparsity=0.8, buffer_bytes=0)
    chunks = list(iter_chunks(tiny_stream))  # chunks of 24 and 16 per task
    f_dense = learner.cost.dense_forward_flops
    for c in chunks[:2]:
        learner.observe(c.x, c.y, 0, n_chunks=2)
    assert learner.density == pytest.approx(0.2, abs=1e-4)
    assert learner.method.pruning.regrow_steps == 1  # the first step of a task decides the regrowth (RigL: one batch)
    changed = []
    masks_changed = learner.masks_changed
    learner.masks_changed = lambda: (masks_changed(), changed.append(_density(learner.masks)))
    fw, before = _weighted(learner, _density(learner.masks)), learner.cost.flops
    learner.observe(chunks[2].x, chunks[2].y, 1, n_chunks=2)
    assert any("regrown" in e for e in learner.prune_events)
    fw_grown = _weighted(learner, changed[0])  # after the regrowth (the chunk's end then prunes again)
    assert fw_grown > fw
    # Two minibatches of 12, each scored on the first pass, their top 6 trained (steps 7-10 of the run, SAM on
    # step 9); only the first step's weight gradient is read dense, before the regrowth that it decides.
    want = (12 * fw + _step(fw, 6, fg=f_dense) + 12 * fw_grown + _step(fw_grown, 6)
            + _step(fw_grown, 6, sam=True) + _step(fw_grown, 6))
    assert learner.cost.flops - before == pytest.approx(want, rel=1e-12)


def test_sparcl_reads_dense_weight_gradients_every_step_and_is_charged_dense(tiny_stream, fast_profile):
    profile = fast_profile.replace(passes_per_chunk=1)
    learner = _learner(tiny_stream, profile, "sparcl", sparsity=0.8, buffer_bytes=0)
    learner.method.pruning.warmup = 0.0  # prune after the first chunk
    chunks = list(iter_chunks(tiny_stream))
    learner.begin_task(0, n_chunks=10)
    learner.observe(chunks[0].x, chunks[0].y, 0)
    assert learner.cost.flops == 3 * learner.cost.dense_forward_flops * len(chunks[0].y)  # dense so far
    gradient_masks = learner.method.sparsity_extras[1].masks
    fw, fg = _weighted(learner, _density(learner.masks)), _weighted(learner, _density(gradient_masks))
    f_dense = learner.cost.dense_forward_flops
    assert fg < fw < 0.9 * f_dense  # pruned, and gradient masking on top
    before, trained = learner.cost.flops, learner.samples_trained
    learner.observe(chunks[1].x, chunks[1].y, 0)
    n = learner.samples_trained - trained
    assert n == len(chunks[1].y)
    # Forward and input gradients at the weight density; weight gradients read dense on every step.
    assert learner.cost.flops - before == pytest.approx(n * (2 * fw + f_dense), rel=1e-12)


def test_peak_memory_is_measured():
    assert peak_memory_bytes(torch.device("cpu")) == peak_rss_bytes() > 50 * 2 ** 20
