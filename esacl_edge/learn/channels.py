"""Channel-level SDP: whole channels pruned, so a pruned network is a narrower dense one.

Unstructured masks save counted FLOPs but no time on dense kernels. Here the unit of pruning
is a *channel group*: an output channel (or unit) of a producer layer together with the input
slice of the one layer that reads it. A dead channel's producer row and consumer columns are
both masked, so the network computes what the same network without that channel computes
(the producer's bias or BatchNorm shift reaches nothing), and it can be rebuilt narrower.

* the groups (:func:`channel_groups`): the small CNN's conv2 channels (read by fc1 through the
  flatten) and fc1 units (read by the classifier); each reduced ResNet-18 block's inner channels
  (conv1 -> conv2). Channels on a residual path and the stem stay whole;
* a channel's score is the sum of its weights' scores (``sdp.scores``: |theta| for EsaCL, the L1
  norm of its incoming and outgoing weights). Dead channels are not regrown: nothing flows
  through a dead channel, so it has no gradient to choose it by, and reviving channels at
  random with fresh incoming weights lost on Split CIFAR-100 (docs/method.md); the
  layers outside every group regrow weight by weight at a task start as in EsaCL;
* the allocation is ``sdp.layer_budgets``'s: a producer keeps the share of channels that gives it
  its layer's density d, given how many of its own input channels are alive; the layers outside
  every group are pruned weight by weight within their budgets. With ``exponent``
  e < 1 a producer keeps the share d^e of its channels instead (e = 0.5: the square root), and
  weights are pruned one by one within the live channels down to d: a mixed network, part of
  whose FLOPs fall physically;
* :func:`set_live` tells the modules that own the groups which channels are alive, and their
  forward runs only those (``models.SmallCNN``, ``models.BasicBlock``): the weights keep their
  full shapes, so masks, optimizer state, snapshots and resumption are those of any sparse run,
  while the convolutions run at the narrower width and time falls with the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import BasicBlock, SmallCNN, prunable_parameters
from . import sdp


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels of ``producer`` (dim 0), read by ``consumer``'s input (dim 1), ``spatial`` columns each."""

    producer: str
    consumer: str
    spatial: int = 1


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The channel groups of ``model`` in forward order; ValueError for a backbone without them."""
    groups = []
    for prefix, mod in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(mod, SmallCNN):
            spatial = mod.fc1.in_features // mod.conv2.out_channels
            groups += [ChannelGroup(f"{p}conv2.weight", f"{p}fc1.weight", spatial),
                       ChannelGroup(f"{p}fc1.weight", f"{p}classifier.weight")]
        elif isinstance(mod, BasicBlock):
            groups.append(ChannelGroup(f"{p}conv1.weight", f"{p}conv2.weight"))
    prunable = prunable_parameters(model)
    groups = [g for g in groups if g.producer in prunable and g.consumer in prunable]
    if not groups:
        raise ValueError("channel pruning needs small_cnn or resnet18_reduced with trainable blocks; this model has "
                         "no channel group")
    return groups


def set_live(model: nn.Module, groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> None:
    """Let the module owning each group run only its live channels (all alive: the plain forward)."""
    for g in groups:
        *path, layer, _ = g.producer.split(".")
        module, on = model.get_submodule(".".join(path)), alive(masks, g)
        if on.all():
            module.live.pop(layer, None)
        else:
            module.live[layer] = on.nonzero().flatten()


def _per_channel(values: dict[str, torch.Tensor], g: ChannelGroup) -> torch.Tensor:
    """Sum of ``values`` over each channel's producer row and consumer columns."""
    return values[g.producer].flatten(1).sum(1) + _columns(values, g).sum((0, 2))


def alive(masks: dict[str, torch.Tensor], g: ChannelGroup) -> torch.Tensor:
    """Which of the group's channels are alive: a live weight in their producer row or consumer columns (a
    channel whose row is all pruned still feeds its consumer a constant)."""
    return masks[g.producer].flatten(1).any(1) | _columns(masks, g).any(2).any(0)


def _columns(values: dict[str, torch.Tensor], g: ChannelGroup) -> torch.Tensor:
    """The consumer's ``values`` as (its outputs, the group's channels, the columns of each channel)."""
    c = values[g.consumer]
    return c.reshape(c.shape[0], c.shape[1] // g.spatial, -1)


def _structure(masks: dict[str, torch.Tensor], groups: list[ChannelGroup],
               channels: dict[ChannelGroup, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where the layers in a group may have live weights: live rows x live columns, from the channels alive."""
    out = {}
    for g in groups:
        row = masks[g.producer].new_ones(masks[g.producer].shape)
        out[g.producer] = out.get(g.producer, row) & channels[g].view(-1, *[1] * (row.dim() - 1))
        m = masks[g.consumer]
        cols = channels[g].repeat_interleave(g.spatial).view(1, -1, *[1] * (m.dim() - 2))
        out[g.consumer] = out.get(g.consumer, m.new_ones(m.shape)) & cols
    return out


def _choose(groups: list[ChannelGroup], masks: dict[str, torch.Tensor], density: float, allocation: str,
            dense_classifier: bool, score: dict[ChannelGroup, torch.Tensor],
            exponent: float) -> dict[ChannelGroup, torch.Tensor]:
    """The channels each group keeps at overall ``density``: the best-scored of its live channels, as many
    as its producer's layer budget gives (that share to the power ``exponent``)."""
    budgets = sdp.layer_budgets(masks, density, allocation, dense_classifier)
    if budgets is None:
        raise ValueError("channel pruning ranks within layer budgets; the global allocation has none")
    in_share: dict[str, float] = {}
    chosen = {}
    for g in groups:
        now = alive(masks, g)
        want = (budgets[g.producer] / masks[g.producer].numel() / in_share.get(g.producer, 1.0)) ** exponent
        k = max(1, min(round(want * len(now)), int(now.sum())))
        keep = torch.zeros_like(now)
        keep[torch.topk(torch.where(now, score[g], -torch.inf), k).indices] = True
        chosen[g] = keep
        in_share[g.consumer] = k / len(now)
    return chosen


@torch.no_grad()
def _apply(model: nn.Module, state: sdp.SdpState, groups: list[ChannelGroup],
           chosen: dict[ChannelGroup, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> int:
    """Keep only the ``chosen`` channels: a channel that dies loses every weight in its row and columns (set
    to zero, with their optimizer state), the others keep theirs. Returns how many weights were removed."""
    params, removed = prunable_parameters(model), 0
    for name, keep in _structure(state.masks, groups, chosen).items():
        died = state.masks[name] & ~keep
        removed += int(died.sum())
        state.masks[name] &= keep
        params[name][died] = 0
        if name in state.a:
            state.a[name][died] = 0
            state.f[name][died] = 0
        sdp.zero_optimizer_state(optimizer, params[name], died)
    return removed


def prune(model: nn.Module, state: sdp.SdpState, groups: list[ChannelGroup], target_density: float,
          score: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None,
          allocation: str = "uniform", dense_classifier: bool = True, exponent: float = 1.0) -> int:
    """Prune whole channels, lowest summed score first, then weight by weight (the layers outside every
    group; with ``exponent`` < 1 within the live channels too) towards ``target_density``; returns how
    many weights were removed."""
    chosen = _choose(groups, state.masks, target_density, allocation, dense_classifier,
                     {g: _per_channel(score, g) for g in groups}, exponent)
    removed = _apply(model, state, groups, chosen, optimizer)
    return removed + sdp.prune_to(model, state, target_density, score, optimizer, allocation=allocation,
                                  dense_classifier=dense_classifier,
                                  layers=None if exponent < 1 else outside(state.masks, groups))


def outside(masks: dict[str, torch.Tensor], groups: list[ChannelGroup]) -> list[str]:
    """The prunable layers in no group."""
    inside = {name for g in groups for name in (g.producer, g.consumer)}
    return [n for n in masks if n not in inside]
