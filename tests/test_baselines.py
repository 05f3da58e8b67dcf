import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.learn import ewc, sdp, sparcl
from esacl_edge.learn.methods import METHODS
from esacl_edge.runner import learn


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_the_stream_and_reports_costs(method, tiny_stream, fast_profile, tmp_path):
    r = learn(tiny_stream.root, fast_profile.replace(passes_per_chunk=1), tmp_path / "run", method=method,
              sparsity=0.8, buffer_bytes=2240, progress=False)
    cfg = METHODS[method]()
    assert r["method"] == method
    if cfg.sparse:  # SparCL's regrown weights that never received a gradient stay zero: sparsity >= target
        assert 0.8 - 1e-4 <= r["sparsity"] <= (0.8 + 1e-4 if not cfg.sparsity_extras else 0.85)
    else:
        assert r["sparsity"] < 0.01
    assert r["train_flops"] > 0 and r["train_macs"] == r["train_flops"] / 2
    assert r["peak_memory_bytes"] > 0
    assert (r["buffer_capacity"] > 0) == cfg.keeps_buffer
    assert 0.0 <= r["final_acc_class_il"] <= r["final_acc_task_il"] <= 1.0


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
