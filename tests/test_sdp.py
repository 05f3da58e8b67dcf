import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.learn import sdp
from esacl_edge.learn.methods import esacl
from esacl_edge.learn.optim import Sam, Sgd, perturb, restore
from esacl_edge.learn.pruning import Pruning
from esacl_edge.models import prunable_parameters
from esacl_edge.runner import feed


def _chunk(n=48, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = (rng.integers(0, 17, (n, 8, 8, 1)) // 2 + y[:, None, None, None] * 2).astype(np.uint8)
    return x, y


def test_pruned_weights_stay_exactly_zero_through_sam_steps(fast_profile, digits_norm):
    # Momentum and weight decay are on: the optimizer state must not move pruned weights either.
    method = esacl(optimizer=Sam(rho=0.05, every=1, base=Sgd(momentum=0.9, weight_decay=5e-4)),
                   pruning=Pruning(regrow_frac=0.0))
    learner = StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), method=method, sparsity=0.5,
                               input_dtype="uint8", normalization=digits_norm, seed=0)
    learner.observe(*_chunk(), 0, n_chunks=1)  # momentum builds up, then the task's end prunes to 50%
    masks = {n: m.clone() for n, m in learner.masks.items()}
    assert learner.sparsity() == pytest.approx(0.5, abs=1e-3)
    for seed in range(1, 6):
        learner.observe(*_chunk(seed=seed), 1, n_chunks=5)
    for name, p in prunable_parameters(learner.model).items():
        assert torch.equal(learner.masks[name], masks[name])
        assert torch.count_nonzero(p[~masks[name]]) == 0, name
        assert torch.count_nonzero(p[masks[name]]) > 0.99 * masks[name].sum()


def test_perturbation_touches_live_weights_only_and_has_radius_rho():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    state = sdp.init_state(model)
    state.masks["0.weight"][:, :3] = False
    with torch.no_grad():
        model[0].weight[~state.masks["0.weight"]] = 0
    loss = model(torch.randn(8, 6)).pow(2).sum()
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = perturb(model, state.masks, rho=0.05)
    assert torch.count_nonzero(eps["0.weight"][~state.masks["0.weight"]]) == 0
    assert torch.sqrt(sum((e ** 2).sum() for e in eps.values())).item() == pytest.approx(0.05, rel=1e-5)
    assert torch.count_nonzero(model[0].weight[~state.masks["0.weight"]]) == 0
    restore(model, eps)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-7)


def test_cubic_schedule_shape():
    values = [sdp.cubic_density(1.0, 0.1, t, 3) for t in range(5)]
    assert values[0] == 1.0
    assert values[3] == values[4] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values[:3], values[1:4]))
    assert values[1] == pytest.approx(0.1 + 0.9 * (2 / 3) ** 3)


@pytest.mark.parametrize("target", [0.75, 0.9, 0.95])
def test_schedule_lands_on_target_sparsity(tiny_stream, fast_profile, target):
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), sparsity=target, input_dtype="uint8",
                               normalization=tiny_stream.normalization)
    total = sum(p.numel() for p in prunable_parameters(learner.model).values())
    densities = []
    for chunk, _ in feed(learner, tiny_stream):
        if chunk.index == chunk.n_chunks - 1:
            densities.append(learner.density)
            assert learner.sparsity() == pytest.approx(target, abs=1 / total + 1e-9)
    assert all(d == pytest.approx(1 - target, abs=1 / total) for d in densities)
    # Regrowth happened at each new task start and was pruned back.
    assert sum(1 for e in learner.prune_events if "regrown" in e) == 4


def test_directional_score_beats_magnitude_on_anisotropic_problem():
    """Linear regression with inputs of very different scales: the weights on low-variance
    inputs are large but cheap to remove; magnitude pruning removes the wrong ones."""
    torch.manual_seed(0)
    d = 8
    scales = torch.tensor([0.05, 0.05, 0.05, 0.05, 2.0, 2.0, 2.0, 2.0])
    true_w = torch.tensor([[4.0, -4.0, 3.0, -3.0, 0.3, -0.3, 0.2, -0.2]])
    x = torch.randn(2048, d) * scales
    yt = x @ true_w.T
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(true_w + 0.01 * torch.randn(1, d))
    state = sdp.init_state(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(200):
        idx = torch.randint(0, len(x), (128,))
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), yt[idx]).backward()
        eps = perturb(model, state.masks, 0.05)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), yt[idx]).backward()
        restore(model, eps)
        sdp.accumulate(model, state)
        opt.step()

    def loss_after_pruning(kind):
        m = nn.Linear(d, 1, bias=False)
        m.load_state_dict(model.state_dict())
        st = sdp.init_state(m)
        st.a, st.f, st.updates = state.a, state.f, state.updates
        sdp.prune_to(m, st, 0.5, sdp.scores(model, state, kind))
        with torch.no_grad():
            return nn.functional.mse_loss(m(x), yt).item(), st.masks["weight"].clone()

    loss_dir, mask_dir = loss_after_pruning("directional")
    loss_mag, mask_mag = loss_after_pruning("magnitude")
    assert not torch.equal(mask_dir, mask_mag)
    assert mask_dir[0, 4:].all() and not mask_dir[0, :4].any()  # keeps the high-curvature weights
    assert loss_dir < 0.25 * loss_mag


def test_prune_to_is_exact_and_keeps_every_layer_alive():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    state = sdp.init_state(model)
    score = {"0.weight": torch.ones(10, 10), "1.weight": torch.zeros(2, 10)}  # layer 1 looks useless
    removed = sdp.prune_to(model, state, 0.1, score, min_live_per_layer=1)
    assert removed == 120 - 12
    assert sum(int(m.sum()) for m in state.masks.values()) == 12
    assert int(state.masks["1.weight"].sum()) >= 1
    assert torch.count_nonzero(model[1].weight) == int(state.masks["1.weight"].sum())


def test_regrow_revives_pruned_weights_at_zero_without_changing_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 3))
    state = sdp.init_state(model)
    sdp.prune_to(model, state, 0.2, sdp.scores(model, state, "magnitude"))
    x = torch.randn(4, 20)
    out_before = model(x).detach()
    model(x).sum().backward()
    sdp.record_grad_abs(model, state)
    total = sum(m.numel() for m in state.masks.values())
    live_before = sum(int(m.sum()) for m in state.masks.values())
    grown = sdp.regrow(model, state, 0.05)
    assert grown == round(0.05 * total)
    assert sum(int(m.sum()) for m in state.masks.values()) == live_before + grown
    assert torch.allclose(model(x), out_before)


def test_regrow_within_layer_budgets_keeps_the_allocation():
    """Global regrowth follows the largest |grad| wherever it is; per-layer regrowth grows each
    layer to its share of the regrown density, so a uniform allocation stays uniform."""
    def pruned():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 50), nn.Linear(50, 40), nn.Linear(40, 30), nn.Linear(30, 3))
        state = sdp.init_state(model)
        sdp.prune_to(model, state, 0.2, sdp.scores(model, state, "magnitude"), allocation="uniform")
        state.grad_abs = {n: torch.rand_like(m, dtype=torch.float32) for n, m in state.masks.items()}
        state.grad_abs["1.weight"] += 10.0  # the middle layer's gradients dwarf the others'
        return model, state

    model, state = pruned()
    live_before = {n: int(m.sum()) for n, m in state.masks.items()}
    grown = sdp.regrow(model, state, 0.05, allocation="uniform")
    want = sdp.layer_budgets(state.masks, (sum(live_before.values()) + grown) / sdp.size(state), "uniform")
    assert grown == round(0.05 * sdp.size(state))
    assert {n: int(m.sum()) for n, m in state.masks.items()} == want
    assert live_before["2.weight"] < want["2.weight"]   # the quiet layer grows its share too

    model, state = pruned()
    sdp.regrow(model, state, 0.05)   # global: every revived weight goes to the loud layer
    assert {n: int(m.sum()) for n, m in state.masks.items() if n != "1.weight"} == \
        {n: v for n, v in live_before.items() if n != "1.weight"}


@pytest.mark.parametrize("method", ["esacl", "esacl-directional"])
def test_no_retraining_needed_and_the_pruning_score_beats_a_random_one(monkeypatch, method):
    """SDP prunes where the loss is flat, with no fine-tuning phase to hide a drop.

    At every pruning event of a 5-task Split-Digits run (90% sparsity), a copy of the model is
    pruned to the same density with a random score instead. Held-out Class-IL accuracy over the
    tasks seen so far right after each task's last event stays within 3 points of the accuracy
    before it; across the events that remove a fifth of the live weights or more it drops by at
    most 6 points on average, and on those EsaCL's score (the magnitude; esacl-directional's the directional
    score) raises the held-out loss by at most a fifth of what a random score does.
    """
    import copy

    from esacl_edge.data.build import make_stream
    from esacl_edge.data.stream import load_test

    stream = make_stream("digits", Path(tempfile.mkdtemp()) / "s", tasks=5, chunk_size=64, seed=0)
    learner = StreamingLearner("small_cnn", "cpu", 10, (8, 8, 1), method=method, sparsity=0.9, input_dtype="uint8",
                               normalization=stream.normalization, buffer_bytes=22400)
    tests = [load_test(stream, t) for t in range(5)]
    events: list[dict] = []
    real_prune = sdp.prune_to

    def measured_prune(model, state, target, score, optimizer=None, **kw):
        task = learner.progress.task

        def acc(m):  # Class-IL over every task seen so far (what replay keeps and pruning could take)
            return float(np.mean([learner.evaluate(*tests[t], task=t, model=m)["class_il"] for t in range(task + 1)]))

        def loss(m):  # held-out cross-entropy over the tasks seen so far: moves before accuracy does
            x = np.concatenate([tests[t][0] for t in range(task + 1)])
            y = torch.as_tensor(np.concatenate([tests[t][1] for t in range(task + 1)]))
            return float(torch.nn.functional.cross_entropy(learner.logits(x, m), y))

        before, loss_before, live_before = acc(model), loss(model), sdp.live(state)
        random_accs, random_losses = [], []
        for seed in range(3):  # the same pruning step with a random score, on copies
            m, st = copy.deepcopy(model), copy.deepcopy(state)
            g = torch.Generator().manual_seed(seed)
            real_prune(m, st, target, {n: torch.rand(s.shape, generator=g) for n, s in score.items()}, **kw)
            random_accs.append(acc(m))
            random_losses.append(loss(m) - loss_before)
        removed = real_prune(model, state, target, score, optimizer, **kw)
        if removed:
            events.append({"task": task, "share": removed / live_before, "before": before, "after": acc(model),
                           "random": float(np.mean(random_accs)), "dloss": loss(model) - loss_before,
                           "dloss_random": float(np.mean(random_losses))})
        return removed

    monkeypatch.setattr(sdp, "prune_to", measured_prune)
    for _ in feed(learner, stream):
        pass
    assert sorted({e["task"] for e in events}) == [0, 1, 2, 3, 4]
    last = {e["task"]: e for e in events}  # each task's last event
    for task, e in last.items():
        assert e["after"] >= e["before"] - 0.03, (task, e)
    assert np.mean([e["before"] for e in last.values()]) > 0.8  # the tasks were learned
    big = [e for e in events if e["share"] >= 0.2]  # substantial steps: a fifth of the live weights or more
    assert len(big) >= 5
    assert np.mean([e["before"] - e["after"] for e in big]) <= 0.06, big
    # The score removes what the network does not use: the held-out loss moves a fraction of what the same
    # removal at random moves it (a random score, or any score blind to what the network learned, fails this).
    assert np.mean([e["dloss_random"] - e["dloss"] for e in big]) >= 0.25, big
    assert np.mean([e["dloss"] for e in big]) <= 0.2 * np.mean([e["dloss_random"] for e in big]), big
    assert learner.sparsity() == pytest.approx(0.9, abs=1e-4)


def test_layer_budgets_sum_to_the_target_and_follow_the_allocation():
    masks = {"stem": torch.ones(8, 3, 3, 3, dtype=torch.bool), "conv": torch.ones(64, 8, 3, 3, dtype=torch.bool),
             "big": torch.ones(128, 64, 3, 3, dtype=torch.bool), "head": torch.ones(10, 128, dtype=torch.bool)}
    sizes = {n: m.numel() for n, m in masks.items()}
    total = sum(sizes.values())
    assert sdp.layer_budgets(masks, 0.1, "global") is None
    for allocation in ("uniform", "erk"):
        b = sdp.layer_budgets(masks, 0.1, allocation)
        assert sum(b.values()) == round(0.1 * total)
        assert b["stem"] == sizes["stem"] and b["head"] == sizes["head"]  # the first and last layers stay dense
        assert all(0 < b[n] <= sizes[n] for n in masks)
    uniform = sdp.layer_budgets(masks, 0.1, "uniform")
    assert uniform["conv"] / sizes["conv"] == pytest.approx(uniform["big"] / sizes["big"], abs=1 / sizes["conv"])
    assert uniform["big"] / sizes["big"] < 0.1  # the other layers pay for the dense ones
    erk = sdp.layer_budgets(masks, 0.1, "erk")
    assert erk["conv"] / sizes["conv"] > erk["big"] / sizes["big"]
    # Without dense_classifier the head is ranked like the rest; it is also pruned where keeping
    # both ends dense would not fit the budget.
    sparse_head = sdp.layer_budgets(masks, 0.1, "uniform", dense_classifier=False)
    assert sum(sparse_head.values()) == round(0.1 * total)
    shares = [sparse_head[n] / sizes[n] for n in ("conv", "big", "head")]
    assert max(shares) - min(shares) < 2 / sizes["head"]
    tight = sdp.layer_budgets(masks, 0.015, "uniform")
    assert tight["stem"] == sizes["stem"] and tight["head"] < sizes["head"]
    with pytest.raises(ValueError, match="allocation"):
        sdp.layer_budgets(masks, 0.1, "random")


def test_per_layer_pruning_ranks_within_each_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2))
    state = sdp.init_state(model)
    # Layer 1 scores all far below layer 2's: a global ranking would empty layer 1 first.
    score = {"0.weight": torch.rand(8, 4) + 100, "1.weight": torch.rand(6, 8), "2.weight": torch.rand(2, 6) + 10}
    removed = sdp.prune_to(model, state, 0.5, score, allocation="uniform")
    budgets = sdp.layer_budgets(state.masks, 0.5, "uniform")
    assert removed == sum(m.numel() for m in state.masks.values()) - sum(budgets.values())
    for name, m in state.masks.items():
        assert int(m.sum()) == budgets[name]
        kept, dropped = score[name][m], score[name][~m]
        assert dropped.numel() == 0 or dropped.max() <= kept.min()  # the lowest of each layer went


def test_sparcl_mask_updates_wait_for_the_first_pruning(tiny_stream, fast_profile):
    from esacl_edge.data.stream import iter_chunks

    import dataclasses

    from esacl_edge.learn.methods import sparcl

    # SparCL-style prunes from the first chunk; with a dense warm-up its mask updates must wait for it.
    warm = sparcl(pruning=dataclasses.replace(sparcl().pruning, warmup=0.5))
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), method=warm, sparsity=0.8,
                               input_dtype="uint8", normalization=tiny_stream.normalization)
    assert learner.method.pruning.allocation == "global"  # SparCL ranks across layers
    chunks = [c for c in iter_chunks(tiny_stream) if c.task == 0]
    learner.begin_task(0, n_chunks=8)  # warm-up: 4 dense chunks, mask updates due after chunks 2 and 4
    for i in range(4):
        learner.observe(chunks[i % 2].x, chunks[i % 2].y, 0)
    assert learner.density == 1.0
    assert all(int((p == 0).sum()) == 0 for p in prunable_parameters(learner.model).values())


def test_esacl_prunes_the_smallest_weights_of_each_layer_and_keeps_no_statistics(fast_profile):
    """EsaCL's score is the magnitude, ranked within each layer's budget (the stem and the
    classifier stay dense); it keeps no running statistics, and its training-memory estimate drops them (8 B/weight)."""
    learner = StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), sparsity=0.9, input_dtype="uint8")
    x, y = _chunk()
    learner.begin_task(0, n_chunks=4)
    learner.observe(x, y, 0)
    pruning = learner.method.pruning
    assert pruning.state.a == {} and pruning.state.f == {}
    params = prunable_parameters(learner.model)
    before = {n: p.detach().abs().clone() for n, p in params.items()}
    pruning.prune(learner.ctx, 0.3)
    budgets = sdp.layer_budgets(pruning.state.masks, 0.3, "uniform")
    names = list(pruning.state.masks)
    for name, m in pruning.state.masks.items():
        assert int(m.sum()) == budgets[name]
        if name in (names[0], names[-1]):
            assert bool(m.all())  # the stem and the classifier
            continue
        kept, dropped = before[name][m], before[name][~m]
        assert dropped.max() <= kept.min(), name  # the smallest of each layer went
        assert bool((params[name][~m] == 0).all())
    n_prunable = sum(p.numel() for p in params.values())
    magnitude = learner.method.memory_terms(1, n_prunable)["masks_and_pruning_stats"]
    directional = StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), method="esacl-directional",
                                   sparsity=0.9, input_dtype="uint8")
    assert set(directional.method.pruning.state.a) == set(params)
    assert magnitude == n_prunable * 5
    assert directional.method.memory_terms(1, n_prunable)["masks_and_pruning_stats"] == n_prunable * 13


def test_layer_budgets_keep_the_first_layer_dense_only_where_the_budget_has_room():
    """Behind a frozen prefix the first trainable layer is no small stem: keeping it dense would take the whole
    budget and leave the layers after it empty (a dead network that misses the target)."""
    masks = {"layer4.1.conv1": torch.ones(160, 160, 3, 3, dtype=torch.bool),
             "layer4.1.conv2": torch.ones(160, 160, 3, 3, dtype=torch.bool),
             "classifier": torch.ones(100, 160, dtype=torch.bool)}
    budgets = sdp.layer_budgets(masks, 0.1)
    total = sum(m.numel() for m in masks.values())
    assert sum(budgets.values()) == round(0.1 * total)
    assert budgets["classifier"] == 16000  # the head still fits, and stays dense
    assert budgets["layer4.1.conv1"] == budgets["layer4.1.conv2"] > 0.05 * 230400
    stem = {"conv1": torch.ones(20, 3, 3, 3, dtype=torch.bool), **masks}
    assert sdp.layer_budgets(stem, 0.1)["conv1"] == 540  # a real stem stays dense as before


def test_layer_budgets_keep_depthwise_kernels_and_rank_a_classifier_that_would_starve_the_rest():
    masks = {"stem": torch.ones(16, 3, 3, 3, dtype=torch.bool),
             "dw": torch.ones(64, 1, 3, 3, dtype=torch.bool),          # depthwise: one input channel per filter
             "pw": torch.ones(128, 64, 1, 1, dtype=torch.bool),
             "hidden": torch.ones(1024, 128, dtype=torch.bool),
             "classifier": torch.ones(100, 1024, dtype=torch.bool)}
    budgets = sdp.layer_budgets(masks, 0.1)
    total = sum(m.numel() for m in masks.values())
    assert sum(budgets.values()) == round(0.1 * total)
    assert budgets["dw"] == 576 and budgets["stem"] == 432
    # Dense, the 102,400-weight head alone would exceed the 24,267-weight budget: it is ranked like the rest.
    assert budgets["classifier"] < 102400 and budgets["hidden"] / 131072 == pytest.approx(
        budgets["classifier"] / 102400, abs=1e-4)
