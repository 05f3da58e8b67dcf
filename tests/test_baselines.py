import math

import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.data.stream import iter_chunks
from esacl_edge.learn import ewc, sdp, sparcl
from esacl_edge.learn.ablations import ABLATIONS
from esacl_edge.learn.methods import METHODS, get_method
from esacl_edge.learn.optim import Sgd
from esacl_edge.learn.select import IdsSelect
from esacl_edge.runner import learn
from tests.support import MIN_PROCESS_BYTES

PASSES = 8  # enough for every method to learn the tiny stream's 2-class tasks


@pytest.fixture(scope="module")
def run_method(tiny_stream, fast_profile, tmp_path_factory):
    """results.json of each method on the tiny stream (8 passes, 80% sparsity, 20-sample buffer), run once."""
    done: dict[str, dict] = {}

    def run(method: str) -> dict:
        if method not in done:
            done[method] = learn(tiny_stream.root, fast_profile.replace(passes_per_chunk=PASSES),
                                 tmp_path_factory.mktemp(method) / "run", method=method, sparsity=0.8,
                                 buffer_bytes=2240, progress=False)
        return done[method]

    return run


def _chunk_sizes(stream):
    return [len(c.y) for c in iter_chunks(stream)]


# The product's methods in the default run; every ablation with -m slow.
EVERY_METHOD = [*METHODS, *(pytest.param(name, marks=pytest.mark.slow) for name in ABLATIONS)]


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_runs_the_stream_and_reports_costs(method, tiny_stream, run_method):
    r = run_method(method)
    cfg = get_method(method)
    sizes = _chunk_sizes(tiny_stream)  # 5 tasks x chunks of 24 and 16 samples
    n, batch, f = sum(sizes), 16, r["dense_forward_flops_per_sample"]
    assert r["method"] == method and r["complete"]
    if cfg.sparse and cfg.pruning.structure == "channel":  # whole channels: the target to within a channel
        assert abs(r["sparsity"] - 0.8) <= 0.02
    elif cfg.sparse:  # SparCL's regrown weights that never received a gradient stay zero: sparsity >= target
        assert 0.8 - 1e-4 <= r["sparsity"] <= (0.8 + 1e-4 if not cfg.sparsity_extras else 0.85)
    else:
        assert r["sparsity"] == 0.0
    assert r["buffer_capacity"] == (2240 // 112 if cfg.keeps_buffer else 0)  # 112 B per 8x8 uint8 sample
    assert r["buffer_size"] == r["buffer_capacity"]

    # Every sample of the stream is learned once; the samples trained follow from the method's parts.
    assert r["samples_learned"] == n == 200
    if method == "joint":  # all data seen so far, PASSES epochs at each task's end
        per_task = [sum(sizes[2 * t: 2 * t + 2]) for t in range(5)]
        assert r["samples_trained"] == PASSES * sum(sum(per_task[: t + 1]) for t in range(5))
    elif isinstance(cfg.select, IdsSelect):  # the top half of every minibatch
        batches = [b for s in sizes for b in _split(s, batch)]
        assert r["samples_trained"] == PASSES * sum(math.ceil(0.5 * b) for b in batches)
    elif cfg.data is not None:  # SparCL's data removal drops up to 30% of a chunk half way through its passes
        assert PASSES * n * (1 - 0.5 * 0.3) <= r["samples_trained"] < PASSES * n
    else:
        assert r["samples_trained"] == PASSES * n

    # FLOPs, exactly where the method is dense: a step costs 3 dense forwards per sample through it.
    assert r["train_flops"] > 0 and r["train_macs"] == r["train_flops"] / 2
    if not cfg.sparse and cfg.replay is None:  # finetune, ewc, joint
        assert r["train_flops"] == 3 * f * r["samples_trained"]
    elif not cfg.sparse:  # er, derpp: from the second chunk on, each step replays as many buffered samples;
        # a calibrating method also forwards the (full) buffer once at each of the 5 task ends
        replayed = r["samples_trained"] - PASSES * sizes[0]
        calibrated = 5 * r["buffer_capacity"] if cfg.calibration is not None else 0
        assert r["train_flops"] == 3 * f * (r["samples_trained"] + replayed) + f * calibrated
    assert r["peak_memory_bytes"] >= MIN_PROCESS_BYTES

    # It learned: every task's Task-IL accuracy (chance 0.5 on 2-class tasks; a model that learns nothing
    # predicts one class per task) went well above chance; Class-IL is never above Task-IL.
    acc_t, acc_c = r["acc_matrix_task_il"], r["acc_matrix_class_il"]
    best_t = [max(row[j] for row in acc_t[j:]) for j in range(5)]
    assert sum(best_t) / 5 >= 0.65, acc_t
    assert all(c <= t for rc, rt in zip(acc_c, acc_t) for c, t in zip(rc, rt))
    if cfg.replay is None and method != "joint":  # no replay: the last task overwrites the others in Class-IL
        assert r["forgetting_class_il"] >= 0.5 and r["final_acc_class_il"] <= 0.3, acc_c
    else:  # replay (or joint training) keeps earlier tasks alive
        # Over the classes present only, new samples do not push old classes down: on this tiny stream
        # SparCL-style's newest task is then under-predicted in Class-IL (0.30 here; chance 0.10).
        least = 0.25 if method == "sparcl-ace" else 0.35
        assert r["final_acc_task_il"] >= 0.75 and r["final_acc_class_il"] >= least, (acc_t, acc_c)


def test_replay_forgets_less_than_finetuning(run_method):
    finetune, ewc_, derpp, joint = (run_method(m) for m in ("finetune", "ewc", "derpp", "joint"))
    for dense in (finetune, ewc_):
        assert dense["forgetting_class_il"] >= derpp["forgetting_class_il"] + 0.3
        assert derpp["final_acc_class_il"] >= dense["final_acc_class_il"] + 0.3
    assert joint["final_acc_class_il"] >= 0.85 and joint["forgetting_class_il"] <= 0.1


def _split(n, batch):
    """Minibatch sizes of an n-sample pass (``forward.minibatches``: equal splits of at most ``batch``)."""
    k = math.ceil(n / batch)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def test_joint_trains_only_at_task_end_on_everything_seen(tiny_stream, fast_profile):
    from esacl_edge.data.stream import iter_chunks

    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method="joint", input_dtype="uint8")
    chunks = list(iter_chunks(tiny_stream))[:4]  # tasks 0 and 1
    before = [p.detach().clone() for p in learner.model.parameters()]
    learner.observe(chunks[0].x, chunks[0].y, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    learner.observe(chunks[1].x, chunks[1].y, 0)
    learner.end_task()
    seen = len(chunks[0].y) + len(chunks[1].y)
    assert learner.samples_trained == seen * fast_profile.passes_per_chunk
    learner.observe(chunks[2].x, chunks[2].y, 1)
    learner.observe(chunks[3].x, chunks[3].y, 1)
    learner.end_task()
    seen2 = seen + len(chunks[2].y) + len(chunks[3].y)
    assert learner.samples_trained == (seen + seen2) * fast_profile.passes_per_chunk


def test_ewc_penalty_anchors_to_the_consolidated_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    state = ewc.EwcState()
    assert ewc.penalty(model, state) == 0.0
    model(torch.randn(4, 3)).pow(2).sum().backward()
    ewc.accumulate(model, state)
    ewc.consolidate(model, state)
    assert float(ewc.penalty(model, state).detach()) == 0.0  # at the anchor
    with torch.no_grad():
        model.weight.add_(1.0)
    expected = 0.5 * (state.fisher["weight"] * 1.0).sum()
    assert float(ewc.penalty(model, state).detach()) == pytest.approx(float(expected))
    assert state.task_steps == 0 and not state.task_sq


def test_forgetting_tracker_drops_never_forgotten_learned_samples():
    t = sparcl.ForgettingTracker.new(6)
    t.update(torch.arange(6), torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.bool))
    t.update(torch.arange(6), torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool))  # sample 1 forgotten once
    t.update(torch.arange(6), torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool))
    assert t.events.tolist() == [0, 1, 0, 0, 0, 0]
    kept = t.keep(torch.arange(6), 0.5)
    # Drops 3 learned samples with no forgetting events (0, 2, 4); never-learned 3 and forgotten 1 stay.
    assert kept.tolist() == [1, 3, 5]


def test_sparcl_mask_update_keeps_density_and_gradient_masks_free_regrown_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 4))
    state = sdp.init_state(model)
    sdp.prune_to(model, state, 0.3, sdp.scores(model, state, "magnitude"))
    live = sdp.live(state)
    model(torch.randn(8, 20)).pow(2).sum().backward()
    sdp.record_grad_abs(model, state)
    moved = sparcl.update_masks(model, state, lam=0.5, frac=0.1)
    assert moved == round(0.1 * live) and sdp.live(state) == live
    gm = sparcl.gradient_masks(model, state, lam=0.5, keep=0.5)
    for name, m in state.masks.items():
        assert not (gm[name] & ~m).any()  # never outside the weight mask
        w = dict(model.named_parameters())[name]
        assert gm[name][m & (w == 0)].all()  # regrown (still zero) weights can learn
    assert sum(int(g.sum()) for g in gm.values()) < live


@pytest.mark.parametrize("method, untouched", [("er-ace", True), ("er", False)])
def test_er_ace_new_samples_leave_the_classes_they_do_not_hold_alone(tiny_stream, fast_profile, method, untouched):
    """ER-ACE: a new sample's cross-entropy competes over the classes in its minibatch only, so (with nothing
    replayed yet) the classifier's rows of the other classes get no gradient; plain ER pushes them down."""
    chunk = next(iter_chunks(tiny_stream))  # classes 0 and 1
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method=method, input_dtype="uint8",
                               normalization=tiny_stream.normalization)
    head = learner.model[1].classifier
    before = head.bias.detach().clone(), head.weight.detach().clone()
    learner.observe(chunk.x, chunk.y, 0)
    absent = [c for c in range(10) if c not in set(chunk.y.tolist())]
    same = torch.equal(head.bias[absent], before[0][absent]) and torch.equal(head.weight[absent], before[1][absent])
    assert same == untouched


def _weights(learner):
    return torch.cat([p.detach().flatten().clone() for p in learner.model.parameters()])


@pytest.mark.parametrize("clip", [1e-3, None])
def test_a_clipping_optimizer_bounds_every_update(tiny_stream, fast_profile, clip):
    """With ``clip_norm`` the step scales the gradients it applies (after the parts masked them) to that
    norm, so k steps at learning rate lr move the weights by at most k * lr * clip_norm in L2."""
    chunk = next(iter_chunks(tiny_stream))  # 24 samples: 2 steps a pass at batch 16, 2 passes
    method = get_method("derpp").replace(optimizer=Sgd(lr=0.1, clip_norm=clip))
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method=method, input_dtype="uint8",
                               normalization=tiny_stream.normalization)
    before = _weights(learner)
    learner.observe(chunk.x, chunk.y, 0)
    moved = float((_weights(learner) - before).norm())
    assert (moved <= 4 * 0.1 * 1e-3 * (1 + 1e-4)) == (clip is not None), moved


def test_the_derpp_baselines_clip_their_updates_and_sparcl_prunes_from_the_first_chunk(tiny_stream, run_method):
    assert get_method("derpp").optimizer.clip_norm == get_method("sparcl").optimizer.clip_norm == 20.0
    assert get_method("er").optimizer.clip_norm is None
    # SparCL-style follows its cubic schedule from the first chunk (no dense warm-up on the first task).
    events = [e for e in run_method("sparcl")["prune_events"] if e["task"] == 0 and "removed" in e]
    assert events[0]["chunk"] == 0 and events[0]["density_after"] < 0.5, events
