"""SDP, sharpness-aware directional pruning.

The arithmetic behind the pruning part (``pruning.py``), in the order a step uses it (the
masked SAM ascent itself is in ``optim.py``):

* :func:`mask_grads`: the descent gradient is applied to live weights only, so pruned
  weights (zero, with zero momentum) stay exactly zero.
* :func:`scores`: lowest pruned first. EsaCL's is |theta_i|; the directional score
  is |Delta_i|, where removing weight i moves theta by -theta_i e_i and the second-order loss
  change is Delta_i = -a_i + 0.5 * theta_i^2 * f_i;
* :func:`accumulate`: the directional score's running averages a = E[theta * g~] and
  f = E[g~^2] of the gradient the update applies (at the perturbed point on SAM steps).
* :func:`layer_budgets`: how many live weights each layer keeps at a given density (the
  allocation); :func:`prune_to` ranks within those budgets, or globally without them.
* :func:`prune_to`, :func:`regrow`, :func:`cubic_density`: when and how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import prunable_parameters
from .nm_pattern import pattern_excess
from .precision import gated

SCORE_KINDS = ("directional", "magnitude", "sparcl")
ALLOCATIONS = ("uniform", "erk", "global")


@dataclass
class SdpState:
    """Masks and pruning statistics, keyed by prunable parameter name."""

    masks: dict[str, torch.Tensor]
    a: dict[str, torch.Tensor]
    f: dict[str, torch.Tensor]
    grad_abs: dict[str, torch.Tensor] = field(default_factory=dict)  # regrowth evidence at a task start
    updates: int = 0
    decay: float = 0.9


def init_state(model: nn.Module, decay: float = 0.9, statistics: bool = True) -> SdpState:
    """All-live masks; the running statistics only where the score reads them (``statistics``)."""
    params = prunable_parameters(model)
    stats = params if statistics else {}
    return SdpState(masks={n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()},
                    a={n: torch.zeros_like(p) for n, p in stats.items()},
                    f={n: torch.zeros_like(p) for n, p in stats.items()}, decay=decay)


def size(state: SdpState) -> int:
    """Number of prunable weights."""
    return sum(m.numel() for m in state.masks.values())


def live(state: SdpState) -> int:
    """Number of prunable weights that are not pruned."""
    return sum(int(m.sum()) for m in state.masks.values())


def density(state: SdpState) -> float:
    return live(state) / size(state)


@torch.no_grad()
def mask_grads(model: nn.Module, state: SdpState, masks: dict[str, torch.Tensor] | None = None) -> None:
    """Zero the gradients outside ``masks`` (default: the weight masks; float masks multiply fastest)."""
    masks = state.masks if masks is None else masks
    pairs = [(p.grad, masks[n]) for n, p in prunable_parameters(model).items() if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m if m.dtype == g.dtype else m.to(g.dtype) for g, m in pairs])


@torch.no_grad()
def accumulate(model: nn.Module, state: SdpState, finite: torch.Tensor | None = None) -> None:
    """Update the running averages of theta*g~ and g~^2 from the current (descent) gradients; a step whose
    gradients overflowed (``finite`` False, fp16 loss scaling) leaves them as they are."""
    d = state.decay
    named = [(n, p) for n, p in prunable_parameters(model).items() if p.grad is not None]
    if named:
        a, f = [state.a[n] for n, _ in named], [state.f[n] for n, _ in named]
        params, grads = [p.detach() for _, p in named], gated([p.grad for _, p in named], finite)
        decay = d if finite is None else torch.where(finite, d, 1.0)
        torch._foreach_mul_(a, decay)
        torch._foreach_addcmul_(a, params, grads, value=1 - d)
        torch._foreach_mul_(f, decay)
        torch._foreach_addcmul_(f, grads, grads, value=1 - d)
    state.updates += 1


@torch.no_grad()
def record_grad_abs(model: nn.Module, state: SdpState, finite: torch.Tensor | None = None) -> None:
    """Sum |grad| of every prunable weight, pruned ones included (evidence for regrowth; an overflowed
    step adds nothing)."""
    for name, p in prunable_parameters(model).items():
        if p.grad is not None:
            acc = state.grad_abs.setdefault(name, torch.zeros_like(p))
            acc.add_(gated([p.grad.abs()], finite)[0])


@torch.no_grad()
def scores(model: nn.Module, state: SdpState, kind: str = "directional", lam: float = 0.5) -> dict[str, torch.Tensor]:
    """Pruning scores per prunable weight; lower means safer to remove.

    ``directional`` is |Delta|; ``magnitude`` is |theta| (EsaCL's: under
    SAM the loss is flat, so within a layer the cost of removing theta_i grows with theta_i^2); ``sparcl`` is SparCL's
    importance |theta| + lam * |grad| (|grad| as the root of the running mean of g^2).
    """
    params = prunable_parameters(model)
    bias = 1 - state.decay ** max(state.updates, 1)  # EMA bias correction
    if kind == "magnitude":
        return {n: p.abs() for n, p in params.items()}
    if kind == "sparcl":
        return {n: p.abs() + lam * torch.sqrt(state.f[n] / bias) for n, p in params.items()}
    if kind != "directional":
        raise ValueError(f"unknown pruning score {kind!r}; choose one of {', '.join(SCORE_KINDS)}")
    return {n: (-state.a[n] / bias + 0.5 * p * p * state.f[n] / bias).abs() for n, p in params.items()}


def layer_budgets(masks: dict[str, torch.Tensor], density: float, allocation: str = "uniform",
                  dense_classifier: bool = True) -> dict[str, int] | None:
    """Live weights each layer keeps at overall ``density`` (None for ``global``: one ranking decides).

    ``uniform``: every layer at ``density``, so the FLOP density equals the weight density
    (a global ranking keeps the FLOP-heavy early convolutions far denser). ``erk``:
    Erdős–Rényi-kernel, density proportional to (sum of a layer's dimensions) / (its size),
    which favours small layers. The first layer stays dense (its few weights see every input
    pixel: 540 weights of 1.1M, 1% of the FLOPs, in the reduced ResNet-18), where the budget has
    room for it (behind a frozen prefix the first trainable layer can hold half the trainable
    weights). Depthwise kernels (one input channel per filter) stay dense: at 90% sparsity a 3x3
    one would keep less than one tap and switch its channel off (3.7% of MobileNetV3-Small's
    weights). The last layer, the classifier, stays dense with ``dense_classifier`` (every class
    keeps all its features: 16,000 weights and 0.03% of the FLOPs of the reduced ResNet-18 at 100
    classes) where the dense layers with it take at most half of the budget (MobileNetV3-Small's
    102,400-weight head would take two thirds of it at 90% and starve every other layer);
    layers that would exceed 1 are kept dense too, and the rest scaled up.
    """
    if allocation == "global":
        return None
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    sizes = {n: m.numel() for n, m in masks.items()}
    weight = {n: (sum(m.shape) / m.numel() if allocation == "erk" else 1.0) for n, m in masks.items()}
    names = list(masks)
    want, dense = density * sum(sizes.values()), set()
    if sizes[names[0]] < want:  # the first layer (the stem) stays dense, where the budget has room for it
        dense.add(names[0])
    dense |= {n for n, m in masks.items() if m.dim() == 4 and m.shape[1] == 1}  # depthwise kernels
    if dense_classifier and sum(sizes[n] for n in dense) + sizes[names[-1]] <= want / 2:
        dense.add(names[-1])
    while True:  # scale the free layers to the remaining budget; cap at 1 and repeat
        free = [n for n in sizes if n not in dense]
        scale = (want - sum(sizes[n] for n in dense)) / max(sum(weight[n] * sizes[n] for n in free), 1e-12)
        capped = {n for n in free if scale * weight[n] > 1}
        if not capped:
            break
        dense |= capped
    share = {n: float(sizes[n]) if n in dense else scale * weight[n] * sizes[n] for n in sizes}
    budgets = {n: math.floor(v) for n, v in share.items()}
    # Largest remainders take the leftover weights, so the budgets sum to round(density * size).
    short = int(round(want)) - sum(budgets.values())
    for n in sorted(share, key=lambda n: budgets[n] - share[n])[:max(short, 0)]:
        budgets[n] += 1
    return budgets


def zero_optimizer_state(optimizer: torch.optim.Optimizer | None, p: torch.Tensor, where: torch.Tensor) -> None:
    """Zero ``optimizer``'s per-weight state (momentum) of ``p`` where ``where`` is True."""
    if optimizer is None:
        return
    for value in optimizer.state.get(p, {}).values():
        if torch.is_tensor(value) and value.shape == p.shape:
            value[where] = 0


@torch.no_grad()
def prune_to(model: nn.Module, state: SdpState, target_density: float, score: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer | None = None, min_live_per_layer: int = 1,
             pattern: tuple[int, int] | None = None, allocation: str = "global", dense_classifier: bool = True,
             layers: list[str] | None = None) -> int:
    """Prune the lowest-scoring live weights until ``round(target_density * d)`` prunable weights
    are live. Returns how many were removed.

    With ``allocation="global"`` one ranking over all layers decides; otherwise each layer is
    ranked within its budget from :func:`layer_budgets` (``dense_classifier`` passed on; a layer already under its budget, after
    a regrowth, loses nothing). Every layer keeps at least ``min_live_per_layer`` weights so no
    layer is cut off. With ``pattern`` (N, M), weights that break N-live-in-M go first, even
    past the target. With ``layers`` (per-layer budgets only), only those layers are pruned.
    Pruned weights and their optimizer state are set to zero.
    """
    params = prunable_parameters(model)
    keep = max(int(round(target_density * size(state))), min_live_per_layer * len(params))
    budgets = layer_budgets(state.masks, keep / size(state), allocation, dense_classifier)
    remove, forced = {}, 0
    for name, m in state.masks.items():
        s = score[name].flatten().clone().float()
        s[~m.flatten()] = math.inf  # already pruned
        # Protect each layer's best min_live_per_layer weights.
        live_idx = torch.nonzero(m.flatten()).squeeze(1)
        if live_idx.numel():
            best = live_idx[torch.argsort(s[live_idx], descending=True)[:min_live_per_layer]]
            s[best] = math.inf
        n_forced = 0
        if pattern is not None:
            excess = pattern_excess(score[name], m, *pattern).flatten()
            s[excess] = -math.inf
            n_forced = int(excess.sum())
            forced += n_forced
        remove[name] = s
        if budgets is not None:
            n = min(max(int(m.sum()) - max(budgets[name], min_live_per_layer), n_forced), live_idx.numel())
            remove[name] = _lowest(s, n if layers is None or name in layers else 0)
    if budgets is None:
        if layers is not None:
            raise ValueError("pruning only some layers needs per-layer budgets, not the global allocation")
        n_remove = max(live(state) - keep, forced)
        if n_remove <= 0:
            return 0
        flat = _lowest(torch.cat(list(remove.values())), n_remove)
        remove = dict(zip(remove, torch.split(flat, [m.numel() for m in state.masks.values()])))
    n_removed = 0
    for name, m in state.masks.items():
        r = remove[name].view_as(m)
        n_removed += int(r.sum())
        m &= ~r
        params[name][r] = 0
        if name in state.a:
            state.a[name][r] = 0
            state.f[name][r] = 0
        zero_optimizer_state(optimizer, params[name], r)
    return n_removed


def _lowest(scores: torch.Tensor, n: int, largest: bool = False) -> torch.Tensor:
    """Boolean mask of the ``n`` lowest (``largest``: highest) entries of ``scores``."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    if n > 0:
        out[torch.topk(scores, n, largest=largest).indices] = True
    return out


def _highest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the ``n`` highest entries of ``scores``."""
    return _lowest(scores, n, largest=True)


@torch.no_grad()
def regrow(model: nn.Module, state: SdpState, fraction: float,
           optimizer: torch.optim.Optimizer | None = None, allocation: str = "global",
           dense_classifier: bool = True, layers: list[str] | None = None) -> int:
    """Revive ``fraction`` of all prunable weights where the recorded |grad| is largest.

    With ``allocation="global"`` one ranking over all layers decides where; otherwise each layer
    grows to its :func:`layer_budgets` share of the regrown density, ranked within the layer, so
    the regrown model keeps the allocation (and the FLOPs) that pruning gave it. Revived weights
    start at zero (with zero optimizer state), so the function the model computes is unchanged
    at the moment of regrowth. With ``layers`` (per-layer budgets only), only those layers grow.
    """
    n_grow = min(int(round(fraction * size(state))), size(state) - live(state))
    if n_grow <= 0 or not state.grad_abs:
        state.grad_abs = {}
        return 0
    names = list(state.masks)
    evidence = {n: torch.where(state.masks[n], -math.inf, state.grad_abs.get(
        n, torch.zeros_like(state.masks[n], dtype=torch.float32))).flatten() for n in names}
    budgets = layer_budgets(state.masks, (live(state) + n_grow) / size(state), allocation, dense_classifier)
    if budgets is None:
        if layers is not None:
            raise ValueError("regrowing only some layers needs per-layer budgets, not the global allocation")
        flat = _highest(torch.cat([evidence[n] for n in names]), n_grow)
        grow = dict(zip(names, torch.split(flat, [state.masks[n].numel() for n in names])))
    else:
        grow = {n: _highest(evidence[n], max(budgets[n] - int(state.masks[n].sum()), 0)
                            if layers is None or n in layers else 0) for n in names}
    params, n_grown = prunable_parameters(model), 0
    for n in names:
        m = state.masks[n]
        g = grow[n].view_as(m)
        n_grown += int(g.sum())
        m |= g
        params[n][g] = 0
        zero_optimizer_state(optimizer, params[n], g)
    state.grad_abs = {}
    return n_grown


def cubic_density(start: float, target: float, step: int, total_steps: int) -> float:
    """Cubic schedule (Zhu & Gupta): density after ``step`` of ``total_steps`` pruning steps."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return target + (start - target) * (1 - t) ** 3
