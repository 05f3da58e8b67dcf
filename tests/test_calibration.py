import math

import numpy as np
import pytest
import torch

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks
from esacl_edge.learn.calibration import BiasCalibration, fit_offsets
from esacl_edge.learn.methods import get_method


def test_fit_offsets_undoes_a_class_bias_within_log_c():
    """Class 5's logits are 1.5 lower than they should be: the fitted offset lifts it by about that much
    relative to the others, accuracy recovers, and no offset leaves ±log 6."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(6).repeat(100)
    logits = torch.randn(600, 6, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 6)
    logits[:, 5] -= 1.5
    b = fit_offsets(logits, y, l2=1e-3)
    assert b.shape == (6,)
    assert 1.0 <= float(b[5] - b[:5].mean()) <= 2.0
    before, after = (float(((logits + d).argmax(1) == y).float().mean()) for d in (0.0, b))
    assert after >= before + 0.05
    assert b.abs().max() <= math.log(6) + 1e-6
    assert torch.equal(fit_offsets(logits, y, l2=1e-3), b)   # deterministic


def test_offsets_stay_bounded_on_samples_the_logits_already_separate():
    """Where one class's offset alone separates the buffer, the cross-entropy falls without end as it grows;
    the fit stops at log C instead of learning tens of logits that new data would not share."""
    y = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[30.0, 0.0], [28.0, 0.0], [25.0, 0.0], [26.0, 0.0]])  # class 0 far too high
    b = fit_offsets(logits, y, l2=1e-3)
    assert b.abs().max() <= math.log(2) + 1e-6 and float(b[1] - b[0]) > 1.0


def _learner(fast_profile, digits_norm, method="esacl"):
    return StreamingLearner("small_cnn", fast_profile, 6, (8, 8, 1), method=method, sparsity=0.5, buffer_bytes=40 * 112,
                            input_dtype="uint8", normalization=digits_norm)


def test_calibration_lifts_underpredicted_classes_and_shifts_the_stored_logits(fast_profile, digits_norm):
    learner = _learner(fast_profile, digits_norm)
    rng = np.random.default_rng(0)
    buf, n = learner.buffer, 40
    buf.y[:n] = np.arange(n) % 4   # classes 0-3 buffered; 4 and 5 not yet seen
    buf.x[:n] = (rng.integers(0, 9, (n, 8, 8, 1)) + buf.y[:n, None, None, None] * 40).astype(np.uint8)
    buf.logits[:n] = rng.normal(size=(n, 6))
    buf.size = n
    head = learner.model[1].classifier
    with torch.no_grad():   # a head that separates the classes, but with classes 2 and 3 pushed far down
        head.bias.copy_(torch.tensor([0.0, 0.0, -3.0, -3.0, 0.0, 0.0]))
    bias, stored = head.bias.detach().clone(), buf.logits[:n].copy()
    y = torch.as_tensor(buf.y[:n].astype(np.int64))
    loss = lambda: float(torch.nn.functional.cross_entropy(learner.logits(buf.x[:n])[:, :4], y))  # seen classes
    loss_before = loss()
    learner.begin_task(0)
    BiasCalibration().end_task(learner.ctx)
    moved = (head.bias.detach() - bias).numpy()
    assert moved[2:4].min() > moved[:2].max() + 1.0   # the under-predicted classes rise against the others
    assert np.all(moved[4:] == 0.0)                    # classes the buffer does not hold keep their bias
    np.testing.assert_allclose(buf.logits[:n] - stored, np.broadcast_to(moved, (n, 6)), atol=1e-5)
    assert loss() < loss_before - 0.5
    assert learner.cost.flops == pytest.approx(n * learner.cost._forward())   # one eval forward of the sample


def test_esacl_calibrates_only_the_classifier_bias_at_a_task_end(tiny_stream, fast_profile, digits_norm):
    """With and without calibration, task 0 trains identically (it draws on no shared generator); at its
    end only the seen classes' classifier bias differs, and the snapshot holds the calibrated one."""
    models = {}
    for name in ("esacl", "esacl-nocalib"):
        learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method=name, sparsity=0.5,
                                   buffer_bytes=2240, input_dtype="uint8", normalization=tiny_stream.normalization)
        for chunk in iter_chunks(tiny_stream):
            if chunk.task > 0:
                break
            learner.observe(chunk.x, chunk.y, chunk.task)
        learner.end_task()
        models[name] = learner.snapshot_model(0).state_dict()
    assert get_method("esacl").calibration is not None and get_method("esacl-nocalib").calibration is None
    calibrated, plain = models["esacl"], models["esacl-nocalib"]
    bias = "1.classifier.bias"
    assert all(torch.equal(calibrated[k], plain[k]) for k in plain if k != bias)
    moved = calibrated[bias] - plain[bias]
    assert moved[:2].abs().max() > 0 and torch.all(moved[2:] == 0)   # task 0 holds classes 0 and 1
