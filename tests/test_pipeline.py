"""The training step's invariants across methods: BatchNorm statistics, generators, EWC's Fisher."""

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks
from esacl_edge.learn.ewc import EwcPenalty
from esacl_edge.learn.methods import get_method


def _colour_chunk(n, seed):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = (rng.integers(0, 128, (n, 32, 32, 3)) + 32 * y[:, None, None, None]).astype(np.uint8)
    return x, y


@pytest.mark.parametrize("method", ["esacl", "esacl-noids", "derpp", "sparcl"])
def test_batchnorm_statistics_move_once_per_training_step(method, fast_profile):
    """IDS scoring and SAM's ascent pass forward the model too; only the update's own forward (selected
    samples and replay batch together) may update running statistics."""
    learner = StreamingLearner("resnet18_reduced", fast_profile.replace(batch_size=4, passes_per_chunk=1), 4,
                               (32, 32, 3), method=method, sparsity=0.5, input_dtype="uint8", seed=0)
    norms = {n: m for n, m in learner.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(norms) == 20
    learner.begin_task(0, n_chunks=3)
    learner.observe(*_colour_chunk(8, 0), 0)  # 2 steps, then the buffer fills (and esacl/sparcl prune)
    learner.observe(*_colour_chunk(8, 1), 0)  # 2 steps with a replay batch
    assert learner.progress.steps == 4 and learner.buffer.size > 0
    for name, m in norms.items():
        assert int(m.num_batches_tracked) == 4, name


def _digits_learner(tiny_stream, profile, method="esacl", **kw):
    return StreamingLearner("small_cnn", profile, 10, (8, 8, 1), method=method, input_dtype="uint8",
                            normalization=tiny_stream.normalization, **kw)


def test_the_buffer_rule_does_not_change_the_minibatch_order(tiny_stream, fast_profile):
    """Each use has its own generator: the IDS buffer draws (its random share) and the reservoir draws
    differently, and neither moves the order (or replay) stream."""
    ids, reservoir = (_digits_learner(tiny_stream, fast_profile, m, sparsity=0.8, buffer_bytes=2240)
                      for m in ("esacl-idsbuffer", "esacl"))
    chunks = list(iter_chunks(tiny_stream))[:3]
    for i, c in enumerate(chunks):
        for learner in (ids, reservoir):
            learner.observe(c.x, c.y, c.task)
        assert ids.rngs.order.bit_generator.state == reservoir.rngs.order.bit_generator.state, i
        assert ids.rngs.replay.bit_generator.state == reservoir.rngs.replay.bit_generator.state, i
        if i == 0:  # the buffers were empty while the first chunk was learned: the very same steps
            a, b = ids.model.state_dict(), reservoir.model.state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)
            # ...and then the two rules kept different samples, drawing differently from their generator.
            assert ids.buffer.size == reservoir.buffer.size == 20
            assert ids.rngs.buffer.bit_generator.state != reservoir.rngs.buffer.bit_generator.state
            assert sorted(ids.buffer.score[:20].tolist()) != sorted(reservoir.buffer.score[:20].tolist())


def test_building_a_learner_leaves_threads_and_the_numpy_and_python_generators_alone(fast_profile):
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    np_state, py_state = np.random.get_state(), random.getstate()
    learner = StreamingLearner("small_cnn", fast_profile.replace(threads=other), 10, (8, 8, 1))
    assert learner.profile.threads == other and learner.device.type == "cpu"
    assert torch.get_num_threads() == threads  # a process-wide setting: the CLI's to make, not the learner's
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_building_a_learner_leaves_the_global_torch_generator_alone(fast_profile):
    state = torch.get_rng_state()
    StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_ewc_fisher_measures_the_data_loss_not_the_penalty(tiny_stream, fast_profile):
    """After task 0 is consolidated and the weights have moved from the anchor, one step of task 1 adds
    exactly the squared gradient of the cross-entropy alone to the task's Fisher sum."""
    # A strong penalty (the stock lam = 10 on this tiny run gives a penalty gradient ~1% of the data's).
    method = get_method("ewc").replace(penalty=EwcPenalty(lam=300.0))
    learner = _digits_learner(tiny_stream, fast_profile.replace(passes_per_chunk=1, batch_size=32), method)
    chunks = list(iter_chunks(tiny_stream))
    for c in chunks[:2]:
        learner.observe(c.x, c.y, 0)
    learner.end_task()
    part = learner.method.penalty
    assert part.state.fisher and part.state.task_sq == {} and part.state.task_steps == 0
    with torch.no_grad():  # move the weights well away from the anchor
        g = torch.Generator().manual_seed(0)
        for p in learner.model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    x, y = chunks[2].x, chunks[2].y  # 24 samples, one minibatch: one step
    ref = copy.deepcopy(learner.model)
    params = dict(ref.named_parameters())
    data_loss = F.cross_entropy(ref(learner.to_device(x)), torch.as_tensor(y, dtype=torch.int64))
    data_grad = dict(zip(params, torch.autograd.grad(data_loss, list(params.values()))))
    learner.observe(x, y, 1)
    assert learner.progress.steps == 1 and part.state.task_steps == 1
    assert part.state.task_sq.keys() == data_grad.keys()
    diff = data_sq = 0.0
    for name, gd in data_grad.items():
        torch.testing.assert_close(part.state.task_sq[name], gd * gd, rtol=1e-4, atol=1e-10)
        full = gd + part.lam * part.state.fisher[name] * (params[name].detach() - part.state.anchor[name])
        diff += float((full * full - gd * gd).abs().sum())
        data_sq += float((gd * gd).sum())
    assert diff > 0.2 * data_sq  # the penalty's gradient is large here: leaving it in would show
