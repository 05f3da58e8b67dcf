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


def test_peak_memory_is_measured():
    assert peak_memory_bytes(torch.device("cpu")) == peak_rss_bytes() > 50 * 2 ** 20
