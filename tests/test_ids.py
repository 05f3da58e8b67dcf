import math

import numpy as np
import pytest
import torch

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks
from esacl_edge.learn.buffer import buffer_bytes_per_sample, buffer_capacity
from esacl_edge.learn import buffer as rb
from esacl_edge.learn import ids
from esacl_edge.learn.methods import get_method
from esacl_edge.learn.replay import Replay


def test_step_selection_keeps_top_scores_per_class_and_balances():
    y = torch.tensor([0] * 6 + [1] * 6)
    scores = torch.tensor([5, 1, 4, 0, 3, 2, 10, 11, 9, 8, 7, 6], dtype=torch.float32)
    keep = ids.select_step(scores, y, 0.5, 2)
    assert len(keep) == 6
    assert sorted(keep.tolist()) == [0, 2, 4, 6, 7, 8]  # top 3 of class 0 and top 3 of class 1


def test_step_selection_gives_slack_of_rare_classes_to_others():
    y = torch.tensor([0] * 9 + [1])
    scores = torch.arange(10, dtype=torch.float32)
    keep = ids.select_step(scores, y, 0.5, 2)
    assert len(keep) == 5
    assert 9 in keep.tolist()  # the single class-1 sample is kept
    assert sorted(keep.tolist()) == [5, 6, 7, 8, 9]


def test_step_selection_keep_all():
    y = torch.tensor([0, 1, 1])
    assert sorted(ids.select_step(torch.zeros(3), y, 1.0, 2).tolist()) == [0, 1, 2]


def _per_class_reference(scores, y, keep_frac):
    """The selection spelled out with host-side loops: balanced quotas, then each class's top scores,
    class by class in the quotas' order."""
    keep = max(1, math.ceil(keep_frac * len(y)))
    classes, counts = np.unique(y.numpy(), return_counts=True)
    quotas = ids.balanced_quotas(dict(zip(classes.tolist(), counts.tolist())), keep)
    picked = []
    for cls, q in quotas.items():
        idx = np.flatnonzero(y.numpy() == cls)
        picked += idx[np.argsort(-scores.numpy()[idx])[:q]].tolist()
    return picked


def test_step_selection_matches_quotas_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        n_classes, n = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(2, 70, (1,), generator=g))
        p = torch.rand(n_classes, generator=g) ** 3   # skewed class sizes
        y = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
        scores, frac = torch.rand(n, generator=g), float(torch.rand(1, generator=g))
        keep = ids.select_step(scores, y, frac, n_classes).tolist()
        if len(keep) < n:   # (all kept: in minibatch order)
            assert keep == _per_class_reference(scores, y, frac)   # the same samples, in the same order


def test_margin_score_orders_by_confidence():
    logits = torch.tensor([[5.0, 0.0], [0.5, 0.0], [0.0, 3.0]])
    s = ids.sample_scores(logits, torch.tensor([0, 0, 0]), "margin")
    assert s[0] < s[1] < s[2]


@pytest.mark.parametrize("counts,total,want", [
    ({0: 10, 1: 10, 2: 10}, 10, {0: 4, 1: 3, 2: 3}),
    ({0: 1, 1: 100}, 10, {0: 1, 1: 9}),
    ({0: 2, 1: 3}, 10, {0: 2, 1: 3}),
])
def test_balanced_quotas(counts, total, want):
    got = ids.balanced_quotas(counts, total)
    assert sum(got.values()) == min(total, sum(counts.values()))
    assert sorted(got.values()) == sorted(want.values())
    assert all(got[c] <= counts[c] for c in counts)


def _offer(buf, rng, classes, n, task, spread=0.0, prefer="low"):
    y = rng.choice(classes, n)
    x = rng.integers(0, 255, (n, 4, 4, 1), dtype=np.uint8)
    score = rng.random(n).astype(np.float32)
    logits = rng.standard_normal((n, 6)).astype(np.float32)
    rb.offer_ids(buf, x, y, task, logits, score, spread, rng, prefer)
    return x, y, score, logits


def test_buffer_capacity_comes_from_the_byte_budget():
    per = buffer_bytes_per_sample((4, 4, 1), "uint8", 6)
    assert per == 16 + 2 + 2 + 4 + 4 * 6
    assert buffer_capacity(10 * per + per - 1, (4, 4, 1), "uint8", 6) == 10
    buf = rb.new_buffer(10 * per + per - 1, (4, 4, 1), "uint8", 6)
    assert buf.capacity == 10 and buf.nbytes == 10 * per
    assert buf.x.dtype == np.uint8


def test_buffer_never_exceeds_budget_and_stays_class_balanced():
    rng = np.random.default_rng(0)
    budget = 3000
    buf = rb.new_buffer(budget, (4, 4, 1), "uint8", 6)
    offered = np.zeros(6, int)
    for task in range(3):
        for _ in range(4):
            _, y, _, _ = _offer(buf, rng, [2 * task, 2 * task + 1], int(rng.integers(5, 40)), task, spread=0.25)
            offered += np.bincount(y, minlength=6)
            assert buf.nbytes <= budget and buf.size <= buf.capacity
            # Balanced: a class holds fewer than the largest share only if it kept all it was offered.
            counts = np.bincount(buf.y[: buf.size], minlength=6)
            short = counts < counts.max() - 1
            assert np.array_equal(counts[short], offered[short])
    assert buf.size == buf.capacity
    assert set(np.unique(buf.task[: buf.size])) == {0, 1, 2}


@pytest.mark.parametrize("prefer", ["low", "high"])
def test_ids_buffer_keeps_the_preferred_scores_with_stored_data_intact(prefer):
    rng = np.random.default_rng(1)
    per = buffer_bytes_per_sample((4, 4, 1), "uint8", 6)
    buf = rb.new_buffer(8 * per, (4, 4, 1), "uint8", 6)
    x, y, score, logits = _offer(buf, rng, [0, 1], 40, task=0, spread=0.0, prefer=prefer)
    for c in (0, 1):
        ranked = np.sort(score[y == c])
        top = ranked[:4] if prefer == "low" else ranked[-4:]
        kept = buf.score[: buf.size][buf.y[: buf.size] == c]
        assert np.allclose(np.sort(kept), top)
    # Every stored row is an exact copy of one offered sample (x, logits and score together).
    for i in range(buf.size):
        j = int(np.flatnonzero(score == buf.score[i])[0])
        assert np.array_equal(buf.x[i], x[j]) and np.array_equal(buf.logits[i], logits[j]) and buf.y[i] == y[j]


def test_ids_spread_fills_part_of_each_quota_at_random():
    rng = np.random.default_rng(2)
    per = buffer_bytes_per_sample((4, 4, 1), "uint8", 6)
    buf = rb.new_buffer(20 * per, (4, 4, 1), "uint8", 6)
    y = np.repeat([0, 1], 100)
    score = np.tile(np.arange(100, dtype=np.float32), 2)
    x = np.zeros((200, 4, 4, 1), np.uint8)
    rb.offer_ids(buf, x, y, 0, np.zeros((200, 6), np.float32), score, 0.5, rng)
    for c in (0, 1):
        kept = np.sort(buf.score[: buf.size][buf.y[: buf.size] == c])
        assert len(kept) == 10
        assert np.array_equal(kept[:5], np.arange(5))  # the lowest-scoring half of the quota
        assert kept[5:].min() >= 5  # the rest at random from above them


def test_reservoir_keeps_a_uniform_sample():
    """Every one of 200 offered samples ends in a 20-slot buffer with probability 1/10.

    Tolerances come from the sampling distribution, not a guess: over T trials the count of
    first-half samples kept has mean 10 T and variance T * 20 * 1/4 * 180/199 (hypergeometric),
    so a buffer biased 57/43 (or even 53/47) towards either half fails the first check, and the
    chi-square over 10 position bins catches any other unevenness.
    """
    rng = np.random.default_rng(3)
    per = buffer_bytes_per_sample((1, 1, 1), "uint8", 2)
    trials, n, cap = 400, 200, 20
    hits = np.zeros(n)
    score = np.arange(n, dtype=np.float32)
    for _ in range(trials):
        buf = rb.new_buffer(cap * per, (1, 1, 1), "uint8", 2)
        rb.offer_reservoir(buf, np.zeros((n, 1, 1, 1), np.uint8), np.zeros(n, int), 0,
                           np.zeros((n, 2), np.float32), score, rng)
        assert buf.size == cap and buf.seen == n
        kept = buf.score[: buf.size].astype(int)
        assert len(set(kept.tolist())) == cap  # no sample twice
        hits[kept] += 1
    first = hits[: n // 2].sum()
    sd = np.sqrt(trials * cap * 0.25 * (n - cap) / (n - 1))
    assert abs(first - trials * cap / 2) < 4 * sd, (first / hits.sum(), 4 * sd / hits.sum())
    bins = hits.reshape(10, -1).sum(1)
    expected = trials * cap / 10
    chi2 = float(((bins - expected) ** 2 / expected).sum())
    assert chi2 < 33.7, (chi2, bins)  # 9 degrees of freedom, p = 1e-4


def test_replayed_samples_get_their_scores_refreshed(tiny_stream, fast_profile):
    # 20 buffered samples, replay batches of 16 of them per step (two per new sample trained): every one is
    # replayed during the chunk.
    method = get_method("esacl-idsbuffer").replace(replay=Replay(alpha=0.3, beta=1.0, ratio=2.0))
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method=method, input_dtype="uint8",
                               buffer_bytes=2240, normalization=tiny_stream.normalization)
    chunks = list(iter_chunks(tiny_stream))
    learner.observe(chunks[0].x, chunks[0].y, 0)
    buf = learner.buffer
    assert buf.size == 20
    old_x = buf.x[: buf.size].copy()
    buf.score[: buf.size] = 1e6  # stale scores that a refresh must replace
    learner.observe(chunks[2].x, chunks[2].y, 1)
    still = [i for i in range(buf.size) if any(np.array_equal(buf.x[i], x) for x in old_x)]
    assert still, "task 0's classes keep their share of the buffer"
    assert (buf.score[still] < 1e6).all() and (buf.score[still] >= 0).all()
