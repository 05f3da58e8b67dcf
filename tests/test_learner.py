import numpy as np
import pytest

from esacl_edge import EsaclError, StreamingLearner
from esacl_edge.data.stream import iter_chunks, load_test


def test_streaming_api_learns_and_separates_class_il_from_task_il(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile.replace(passes_per_chunk=8), 10, (8, 8, 1),
                               sparsity=0.5, input_dtype="uint8", normalization=tiny_stream.normalization,
                               buffer_bytes=2240)
    for chunk in iter_chunks(tiny_stream):
        if chunk.task > 1:
            break
        learner.observe(chunk.x, chunk.y, chunk.task)  # tasks switch without explicit begin/end
    learner.end_task()
    assert sorted(learner.snapshots) == [0, 1]
    assert learner.task_classes == {0: [0, 1], 1: [2, 3]}
    x, y = load_test(tiny_stream, 0)
    acc = learner.evaluate(x, y, task=0)
    assert 0.0 <= acc["class_il"] <= acc["task_il"] <= 1.0
    assert acc["task_il"] >= 0.8  # two-class digits is easy when only the task's classes compete
    pred = learner.predict(x, task=0)
    assert set(np.unique(pred)) <= {0, 1}
    assert np.mean(pred == y) == pytest.approx(acc["task_il"])
    assert learner.buffer.size == 20 and set(learner.buffer.y[:20].tolist()) == {0, 1, 2, 3}


def test_finetune_stays_dense_and_keeps_no_buffer(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method="finetune", input_dtype="uint8")
    chunk = next(iter_chunks(tiny_stream))
    learner.observe(chunk.x, chunk.y, 0)
    learner.end_task()
    assert learner.sparsity() < 0.01 and learner.buffer.capacity == 0
    assert learner.samples_trained == 2 * len(chunk.y)  # no IDS selection: every sample, every pass


def test_ids_trains_on_half_of_each_minibatch(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8")
    chunk = next(iter_chunks(tiny_stream))  # 24 samples, batch 16 -> batches of 16 and 8
    learner.observe(chunk.x, chunk.y, 0)
    assert learner.samples_trained == 2 * (8 + 4)


def test_bad_inputs(fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1))
    with pytest.raises(EsaclError, match=r"inputs must have shape \(N, 8, 8, 1\)"):
        learner.observe(np.zeros((2, 8, 8, 3)), np.array([0, 1]), 0)
    with pytest.raises(EsaclError, match="labels must be in 0..3"):
        learner.observe(np.zeros((2, 8, 8, 1)), np.array([0, 9]), 0)
    with pytest.raises(EsaclError, match="sparsity must be in"):
        StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), sparsity=1.0)
    with pytest.raises(EsaclError, match="unknown method 'sgd'"):
        StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), method="sgd")
