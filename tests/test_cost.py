import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks
from esacl_edge.device.memory import peak_memory_bytes, peak_rss_bytes
from esacl_edge.learn.cost import CostMeter, layer_forward_flops
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


def test_esacl_cost_counts_scoring_and_both_sam_passes(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8", buffer_bytes=0)
    chunk = next(iter_chunks(tiny_stream))  # 24 samples: minibatches of 12 and 12, IDS keeps 6 of each
    learner.begin_task(0, n_chunks=10)  # long task: the first chunk is trained dense
    learner.observe(chunk.x, chunk.y, 0)
    f = learner.cost.dense_forward_flops
    per_pass = 24 * f + 2 * (3 * 12 * f)  # scoring forward of all + two SAM passes of the kept half
    assert learner.cost.flops == pytest.approx(fast_profile.passes_per_chunk * per_pass)


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
    learner = _learner(tiny_stream, fast_profile, sparsity=0.8, buffer_bytes=0)
    chunks = list(iter_chunks(tiny_stream))
    learner.begin_task(0, n_chunks=10)
    learner.observe(chunks[0].x, chunks[0].y, 0)  # dense, then the schedule's first pruning step
    dens = _density(learner.masks)
    assert 0.5 < learner.density < 0.9 and len(set(dens.values())) > 1  # layers pruned unevenly
    fw, before = _weighted(learner, dens), learner.cost.flops
    learner.observe(chunks[1].x, chunks[1].y, 0)  # 16 samples: scoring all, both SAM passes on the top 8
    per_pass = 16 * fw + 2 * 8 * 3 * fw
    assert learner.cost.flops - before == pytest.approx(fast_profile.passes_per_chunk * per_pass, rel=1e-12)
    assert fw < 0.9 * learner.cost.dense_forward_flops


def test_esacl_with_a_buffer_and_a_pruned_model(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile, sparsity=0.8, buffer_bytes=2240)
    chunks = list(iter_chunks(tiny_stream))
    learner.begin_task(0, n_chunks=10)
    learner.observe(chunks[0].x, chunks[0].y, 0)
    assert learner.buffer.size == 20 and learner.density < 0.9
    fw, before = _weighted(learner, _density(learner.masks)), learner.cost.flops
    learner.observe(chunks[1].x, chunks[1].y, 0)
    # Per pass: one minibatch of 16, scored; the top 8 and a replay batch of 16 through both SAM passes.
    per_pass = 16 * fw + 2 * (8 + 16) * 3 * fw
    assert learner.cost.flops - before == pytest.approx(fast_profile.passes_per_chunk * per_pass, rel=1e-12)


def test_regrowth_window_reads_dense_weight_gradients_and_is_charged_dense(tiny_stream, fast_profile):
    learner = _learner(tiny_stream, fast_profile, sparsity=0.8, buffer_bytes=0)
    chunks = list(iter_chunks(tiny_stream))  # chunks of 24 and 16 per task
    f_dense = learner.cost.dense_forward_flops
    for c in chunks[:2]:
        learner.observe(c.x, c.y, 0, n_chunks=2)
    assert learner.density == pytest.approx(0.2, abs=1e-4)
    regrow = learner.method.pruning.regrow_steps
    assert regrow == 2 * fast_profile.passes_per_chunk  # the first chunk of task 1 is exactly the window
    fw, before = _weighted(learner, _density(learner.masks)), learner.cost.flops
    learner.observe(chunks[2].x, chunks[2].y, 1, n_chunks=2)
    # Each step: score 12, SAM ascent on the top 6 (weight gradients at density), descent on them with the
    # dense weight gradient that regrowth reads.
    per_step = 12 * fw + 6 * 3 * fw + 6 * (2 * fw + f_dense)
    assert learner.cost.flops - before == pytest.approx(regrow * per_step, rel=1e-12)
    assert any("regrown" in e for e in learner.prune_events)
    # After the window, weight gradients are charged at the weight density again.
    fw, before = _weighted(learner, _density(learner.masks)), learner.cost.flops
    learner.observe(chunks[3].x, chunks[3].y, 1, n_chunks=2)
    assert learner.cost.flops - before == pytest.approx(fast_profile.passes_per_chunk * (16 * fw + 2 * 8 * 3 * fw),
                                                        rel=1e-12)


def test_sparcl_reads_dense_weight_gradients_every_step_and_is_charged_dense(tiny_stream, fast_profile):
    profile = fast_profile.replace(passes_per_chunk=1)
    learner = _learner(tiny_stream, profile, "sparcl", sparsity=0.8, buffer_bytes=0)
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
