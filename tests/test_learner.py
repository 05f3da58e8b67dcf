import numpy as np
import pytest
import torch

from esacl_edge import EsaclError, StreamingLearner
from esacl_edge.data.stream import iter_chunks, load_test
from esacl_edge.learn import sdp
from esacl_edge.learn.forward import present_classes
from esacl_edge.learn.methods import get_method
from esacl_edge.learn.step import current_loss
from esacl_edge.models import prunable_parameters


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
    acc1 = learner.evaluate(*load_test(tiny_stream, 1), task=1)
    assert 0.0 <= acc1["class_il"] <= acc1["task_il"] <= 1.0
    # IDS trains on the top half of each minibatch: chunks of 24 (2 x 12) and 16, 8 passes, 2 tasks.
    assert learner.samples_trained == 8 * 2 * (6 + 6 + 8)
    assert learner.sparsity() == pytest.approx(0.5, abs=1e-4)  # each task ends on the target exactly
    pred = learner.predict(x, task=0)
    assert set(np.unique(pred)) <= {0, 1}
    assert np.mean(pred == y) == pytest.approx(acc["task_il"])
    assert learner.buffer.size == 20 and set(learner.buffer.y[:20].tolist()) == {0, 1, 2, 3}


def test_finetune_stays_dense_and_keeps_no_buffer(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method="finetune", input_dtype="uint8")
    chunk = next(iter_chunks(tiny_stream))
    learner.observe(chunk.x, chunk.y, 0)
    learner.end_task()
    assert learner.sparsity() == 0.0 and learner.density == 1.0 and learner.masks == {}
    assert learner.buffer.capacity == 0 and learner.prune_events == []
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


def _first_task_densities(tiny_stream, profile, method, n_chunks=8):
    learner = StreamingLearner("small_cnn", profile, 10, (8, 8, 1), method=method, sparsity=0.8, input_dtype="uint8",
                               normalization=tiny_stream.normalization)
    total = sum(m.numel() for m in learner.masks.values())
    assert learner.masks and all(bool(m.all()) for m in learner.masks.values())
    assert learner.sparsity() == 0.0 and learner.density == 1.0 and learner.prune_events == []
    chunks = [c for c in iter_chunks(tiny_stream) if c.task == 0]
    learner.begin_task(0, n_chunks=n_chunks)
    densities = []
    for i in range(n_chunks):
        learner.observe(chunks[i % 2].x, chunks[i % 2].y, 0)
        densities.append(learner.density)
        assert learner.sparsity() == pytest.approx(1 - learner.density, abs=1 / total)
    return learner, densities, total


def test_esacl_prunes_the_first_task_on_a_cubic_schedule_from_its_first_chunk(tiny_stream, fast_profile):
    learner, densities, total = _first_task_densities(tiny_stream, fast_profile, "esacl")
    # The magnitude ranking needs no statistics to mature: the cubic schedule runs over all 8 chunks.
    assert densities == pytest.approx([sdp.cubic_density(1.0, 0.2, k, 8) for k in range(1, 9)], abs=1 / total)
    assert [e["chunk"] for e in learner.prune_events] == list(range(8))


def test_the_warmup_ablation_keeps_the_first_half_of_the_first_task_dense(tiny_stream, fast_profile):
    learner, densities, total = _first_task_densities(tiny_stream, fast_profile, "esacl-warmup")
    assert densities[:4] == [1.0] * 4  # warm-up: the first ceil(0.5 * 8) = 4 chunks stay dense
    want = [sdp.cubic_density(1.0, 0.2, k, 4) for k in (1, 2, 3, 4)]  # then cubic to the target by the task's end
    assert densities[4:] == pytest.approx(want, abs=1 / total)
    assert [e["chunk"] for e in learner.prune_events] == [4, 5, 6, 7]


def test_the_early_ablation_reaches_the_target_after_60_percent_of_the_first_task(tiny_stream, fast_profile):
    learner, densities, total = _first_task_densities(tiny_stream, fast_profile, "esacl-early")
    want = [sdp.cubic_density(1.0, 0.2, k, 5) for k in range(1, 6)]  # cubic over ceil(0.6 * 8) = 5 chunks
    assert densities[:5] == pytest.approx(want, abs=1 / total)
    assert densities[5:] == pytest.approx([0.2] * 3, abs=1 / total)  # then at the target, nothing more pruned
    assert [e["chunk"] for e in learner.prune_events] == list(range(5))


def test_a_first_task_of_unknown_length_is_pruned_at_its_end(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), sparsity=0.8, input_dtype="uint8",
                               normalization=tiny_stream.normalization)
    total = sum(m.numel() for m in learner.masks.values())
    chunks = list(iter_chunks(tiny_stream))  # 2 chunks per task
    for c in chunks[:2]:
        learner.observe(c.x, c.y, 0)
        assert learner.density == 1.0
    learner.observe(chunks[2].x, chunks[2].y, 1)  # a chunk of task 1 ends task 0
    zeros = sum(int((p == 0).sum()) for p in prunable_parameters(learner.snapshot_model(0)).values())
    assert zeros / total == pytest.approx(0.8, abs=2 / total)


def test_observe_with_a_known_length_ends_the_task_by_itself(tiny_stream, fast_profile):
    learner = StreamingLearner("small_cnn", fast_profile.replace(passes_per_chunk=1), 10, (8, 8, 1), sparsity=0.8,
                               input_dtype="uint8", normalization=tiny_stream.normalization)
    ended: list[int] = []
    learner.on_task_end.append(ended.append)
    chunks = list(iter_chunks(tiny_stream))  # 2 chunks per task
    learner.observe(chunks[0].x, chunks[0].y, 0, n_chunks=2)
    assert ended == [] and learner.snapshots == {} and learner.progress.task == 0
    learner.observe(chunks[1].x, chunks[1].y, 0, n_chunks=2)
    assert ended == [0] and list(learner.snapshots) == [0] and learner.progress.task == -1
    snapshot = learner.snapshots[0]
    weights = {k: v.clone() for k, v in learner.model.state_dict().items()}
    assert learner.end_task() is snapshot  # the task is over: no second end, no error
    assert ended == [0] and list(learner.snapshots) == [0]
    assert all(torch.equal(v, weights[k]) for k, v in learner.model.state_dict().items())
    # Without a known length a task stays open until the next task begins, or end_task() closes it.
    learner.observe(chunks[2].x, chunks[2].y, 1)
    learner.observe(chunks[3].x, chunks[3].y, 1)
    assert ended == [0] and learner.progress.task == 1
    learner.observe(chunks[4].x, chunks[4].y, 2)
    assert ended == [0, 1] and sorted(learner.snapshots) == [0, 1] and learner.progress.task == 2
    last = learner.end_task()
    assert ended == [0, 1, 2] and learner.end_task() is last and ended == [0, 1, 2]


def test_the_current_loss_mixes_present_and_all_class_cross_entropy():
    """(1 − s)·CE over the present classes + s·CE over all: an absent class's logit gets s times the
    all-class gradient (none at s = 0), and s = 1 is plain cross-entropy."""
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 1, 0, 1, 0])
    present = present_classes(y, 5)
    grads = {}
    for s in (0.0, 0.25, 1.0):
        z = logits.clone().requires_grad_()
        current_loss(z, y, present, s).backward()
        grads[s] = z.grad
    z = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(z, y).backward()
    assert torch.all(grads[0.0][:, 2:] == 0) and torch.allclose(grads[1.0], z.grad)
    assert torch.allclose(grads[0.25][:, 2:], 0.25 * z.grad[:, 2:])
    assert torch.allclose(grads[0.25], 0.75 * grads[0.0] + 0.25 * z.grad)
    assert torch.equal(current_loss(logits, y, None, 0.25), torch.nn.functional.cross_entropy(logits, y))
    assert get_method("esacl").all_classes_share == 0.25 and get_method("esacl-present").all_classes_share == 0.0
    with pytest.raises(ValueError, match="all_classes_share"):
        get_method("esacl").replace(all_classes_share=1.5)


@pytest.mark.parametrize("method,present_only", [("esacl-present", True), ("derpp-ace", True), ("esacl", False),
                                                  ("esacl-allclasses", False), ("derpp", False)])
def test_the_current_cross_entropy_competes_over_the_classes_in_the_minibatch(fast_profile, digits_norm, method,
                                                                                  present_only):
    """The present-class loss on new samples pushes down no class they do not show (ER-ACE's asymmetric
    cross-entropy): without replay, the head's rows of absent classes do not move at all; with EsaCL's share
    of cross-entropy over all classes, or over all classes only, they do."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 48)  # classes 0 and 1 of 4
    x = (rng.integers(0, 17, (48, 8, 8, 1)) // 2 + y[:, None, None, None] * 4).astype(np.uint8)
    learner = StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), method=method, sparsity=0.5, buffer_bytes=0,
                               input_dtype="uint8", normalization=digits_norm)
    head = learner.model[1].classifier
    before = head.weight.detach().clone(), head.bias.detach().clone()
    learner.observe(x, y, 0)  # a first task of unknown length: nothing is pruned yet
    for p, p0 in zip((head.weight, head.bias), before):
        assert not torch.equal(p[:2], p0[:2])  # the present classes learn
        assert torch.equal(p[2:], p0[2:]) == present_only
