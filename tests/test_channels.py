"""Channel-level pruning (esacl-channels): whole channels go, so the pruned network is a narrower dense one."""

import numpy as np
import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.deploy.structured import shrink
from esacl_edge.errors import EsaclError
from esacl_edge.learn import channels, sdp
from esacl_edge.models import build_model, prunable_parameters


def _small_cnn(seed=0):
    torch.manual_seed(seed)
    return build_model("small_cnn", (8, 8, 1), 4)


def test_groups_of_the_small_cnn_and_the_reduced_resnet():
    assert channels.channel_groups(_small_cnn()) == [
        channels.ChannelGroup("1.conv2.weight", "1.fc1.weight", 4),   # 64 channels of 2x2 read by fc1
        channels.ChannelGroup("1.fc1.weight", "1.classifier.weight")]
    groups = channels.channel_groups(build_model("resnet18_reduced", (32, 32, 3), 10))
    assert len(groups) == 8   # one per basic block: its inner channels
    assert groups[0] == channels.ChannelGroup("1.layer1.0.conv1.weight", "1.layer1.0.conv2.weight")
    with pytest.raises(ValueError, match="no channel group"):
        channels.channel_groups(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))


def test_pruned_small_cnn_keeps_its_best_channels_and_computes_what_the_narrower_network_computes():
    model = _small_cnn()
    state = sdp.init_state(model, statistics=False)
    conv2 = model[1].conv2.weight
    with torch.no_grad():   # six channels far larger than the others, in weights in and out
        conv2[:6] *= 5
        model[1].fc1.weight.view(128, 64, 4)[:, :6] *= 5
    removed = channels.prune(model, state, channels.channel_groups(model), 0.1, sdp.scores(model, state, "magnitude"))
    masks = state.masks
    live = masks["1.conv2.weight"].flatten(1).any(1)
    # conv2's budget (the stem and the classifier stay dense) is 8.6% of its weights: 6 channels, the six loudest
    assert live.tolist() == [True] * 6 + [False] * 58
    assert (masks["1.conv2.weight"].flatten(1).all(1) == live).all()        # whole rows, live or dead
    fc1 = masks["1.fc1.weight"].view(128, 64, 4)
    assert not fc1[:, ~live].any()                                           # and the columns that read them
    units = fc1.flatten(1).any(1)
    assert fc1[units][:, live].all() and not fc1[~units].any()             # fc1 units whole too
    assert not masks["1.classifier.weight"][:, ~units].any() and masks["1.classifier.weight"][:, units].all()
    assert removed == sum(int((~m).sum()) for m in masks.values())
    assert sdp.density(state) == pytest.approx(0.1, abs=0.01)
    for name, p in prunable_parameters(model).items():
        assert torch.count_nonzero(p[~masks[name]]) == 0
    x = torch.rand(16, 1, 8, 8) * 16
    small, info = shrink(model)
    assert info["after"]["conv2"] == 6
    torch.testing.assert_close(small(x), model.eval()(x))


def test_pruned_resnet_block_channels_reach_nothing():
    """A dead inner channel's BatchNorm shift reaches nothing: the next conv's columns are masked too."""
    torch.manual_seed(0)
    model = build_model("resnet18_reduced", (32, 32, 3), 10).eval()
    state = sdp.init_state(model, statistics=False)
    groups = channels.channel_groups(model)
    channels.prune(model, state, groups, 0.1, sdp.scores(model, state, "magnitude"))
    x = torch.rand(4, 3, 32, 32)
    before = model(x)
    for g in groups:
        c = len(channels.alive(state.masks, g))
        assert int(channels.alive(state.masks, g).sum()) == round(0.1 * c)
        block = model.get_submodule(g.producer.rsplit(".", 2)[0])
        with torch.no_grad():
            block.bn1.bias[~channels.alive(state.masks, g)] = 7.0
    torch.testing.assert_close(model(x), before)
    assert sdp.density(state) == pytest.approx(0.1, abs=0.02)
    small, info = shrink(model)   # the structured export rebuilds each block with its live channels only
    assert info["after"] == {k: round(0.1 * v) for k, v in info["before"].items()}
    assert sum(p.numel() for p in small.parameters()) < 0.25 * sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(small(x), before)


def test_channels_at_the_square_root_of_the_density_and_single_weights_within_them():
    torch.manual_seed(0)
    model = build_model("resnet18_reduced", (32, 32, 3), 10)
    state = sdp.init_state(model, statistics=False)
    groups = channels.channel_groups(model)
    channels.prune(model, state, groups, 0.1, sdp.scores(model, state, "magnitude"), exponent=0.5)
    budgets = sdp.layer_budgets(state.masks, 0.1, "uniform")
    for g in groups:
        on, m = channels.alive(state.masks, g), state.masks[g.producer]
        assert int(on.sum()) == round((budgets[g.producer] / m.numel()) ** 0.5 * len(on))
        assert int(m.sum()) == budgets[g.producer] and int(state.masks[g.consumer].sum()) == budgets[g.consumer]
        assert not m[~on].any() and not state.masks[g.consumer][:, ~on].any()
    assert sdp.density(state) == pytest.approx(0.1, abs=1e-4)


@pytest.mark.parametrize("exponent", [1.0, 0.5])
@pytest.mark.parametrize("name, shape", [("small_cnn", (8, 8, 1)), ("resnet18_reduced", (32, 32, 3))])
def test_the_forward_at_live_width_computes_what_the_masked_network_computes(name, shape, exponent):
    """Training runs only the live channels; outputs, gradients of live weights and BatchNorm statistics
    are those of the full-width masked network."""
    import copy

    torch.manual_seed(0)
    narrow = build_model(name, shape, 10)
    state = sdp.init_state(narrow, statistics=False)
    groups = channels.channel_groups(narrow)
    channels.prune(narrow, state, groups, 0.1, sdp.scores(narrow, state, "magnitude"), exponent=exponent)
    masked = copy.deepcopy(narrow)
    channels.set_live(narrow, groups, state.masks)
    assert all(m.live for m in narrow.modules() if hasattr(m, "live"))   # every group runs narrower
    assert not any(m.live for m in masked.modules() if hasattr(m, "live"))
    h, w, c = shape
    x, y = torch.rand(6, c, h, w) * 16, torch.randint(0, 10, (6,))
    for model in (narrow, masked):
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
    torch.testing.assert_close(narrow(x), masked(x))
    for (n, a), b in zip(narrow.named_parameters(), masked.parameters()):
        m = state.masks.get(n, torch.ones_like(a, dtype=torch.bool))
        torch.testing.assert_close(a.grad * m, b.grad * m, msg=n)
    inner_bn = {g.producer.replace("conv1.weight", "bn1"): g for g in groups}
    for (n, a), b in zip(narrow.named_buffers(), masked.buffers()):
        g = inner_bn.get(n.rsplit(".", 1)[0])
        if g is not None and "running" in n:   # a dead channel's statistics stay as they were
            a, b = a[channels.alive(state.masks, g)], b[channels.alive(state.masks, g)]
        torch.testing.assert_close(a, b, msg=n)
    torch.testing.assert_close(narrow.eval()(x), masked.eval()(x))


def _learn(method, profile, norm):
    learner = StreamingLearner("small_cnn", profile, 4, (8, 8, 1), method=method, sparsity=0.9,
                               input_dtype="uint8", normalization=norm, seed=0)
    rng = np.random.default_rng(0)
    for task in range(2):
        for _ in range(2):
            y = rng.integers(2 * task, 2 * task + 2, 40)
            x = (rng.integers(0, 17, (40, 8, 8, 1)) // 2 + y[:, None, None, None] * 2).astype(np.uint8)
            learner.observe(x, y, task, n_chunks=2)
    return learner


def test_esacl_channels_learns_a_stream_with_whole_channels_at_their_live_width(fast_profile, digits_norm):
    learner = _learn("esacl-channels", fast_profile, digits_norm)
    conv2 = learner.masks["1.conv2.weight"].flatten(1)
    assert (conv2.all(1) | ~conv2.any(1)).all()
    assert int(conv2.any(1).sum()) == 6
    assert learner.sparsity() == pytest.approx(0.9, abs=0.01)
    assert not any("regrown" in e for e in learner.prune_events)   # no channel comes back at a task start
    assert learner.cost.weight_density["1.conv2.weight"] == pytest.approx(6 / 64)
    assert learner.model[1].live["conv2"].tolist() == conv2.any(1).nonzero().flatten().tolist()


def test_esacl_channels_sqrt_keeps_the_square_root_of_the_channels_and_prunes_weights_within(fast_profile,
                                                                                             digits_norm):
    learner = _learn("esacl-channels-sqrt", fast_profile, digits_norm)
    conv2 = learner.masks["1.conv2.weight"]
    share = sdp.layer_budgets(learner.masks, 0.1, "uniform")["1.conv2.weight"] / conv2.numel()
    assert int(conv2.flatten(1).any(1).sum()) == round(share ** 0.5 * 64)
    assert int(conv2.sum()) == pytest.approx(share * conv2.numel(), abs=1)
    assert learner.sparsity() == pytest.approx(0.9, abs=0.01)


def test_esacl_channels_refuses_what_it_cannot_prune_by_channel(fast_profile):
    with pytest.raises(EsaclError, match="no N:M --pattern"):
        StreamingLearner("small_cnn", fast_profile, 4, (8, 8, 1), method="esacl-channels", pattern="2:4")
    with pytest.raises(EsaclError, match="esacl-channels: channel pruning needs small_cnn or resnet18_reduced"):
        StreamingLearner("mobilenet_v3_small", fast_profile, 4, (32, 32, 3), method="esacl-channels")
