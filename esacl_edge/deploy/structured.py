"""Structured export: physically remove the units and channels that a sparse snapshot no longer uses.

Exact rules (the network computes the same function afterwards). For the reduced ResNet-18: a
block's inner channel whose outgoing weights (its columns of the block's second conv) are all
zero is removed with its row of the first conv and its BatchNorm entry (``esacl-channels``
prunes whole channels so; the residual channels stay). For the small CNN:

* an fc1 unit or conv2 channel whose incoming weights are all zero outputs a constant,
  ReLU(bias); its effect on the next layer is folded into that layer's bias and it is removed;
* a unit or channel whose outgoing weights are all zero is removed (fc1 units, conv2 and conv1
  channels).

``min_l1`` (optional, lossy) also removes fc1 units and conv2 channels whose live incoming
weights have an L1 norm below that fraction of the layer's mean, folding nothing: accuracy
before and after is then reported by the export.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError
from ..models import BasicBlock, ReducedResNet18, SmallCNN


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.weight.data, layer.bias.data = weight.clone(), bias.clone()
    return layer


def _conv(old: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding)
    layer.weight.data, layer.bias.data = weight.clone(), bias.clone()
    return layer


def _narrow_block(block: BasicBlock) -> tuple[int, int]:
    """Remove the inner channels of ``block`` that its second conv no longer reads; returns (before, after)."""
    keep = block.conv2.weight.ne(0).transpose(0, 1).flatten(1).any(1)
    if not keep.any():
        keep[0] = True   # a block whose inner path is all zero still needs one channel to run
    c1, bn, c2 = block.conv1, block.bn1, block.conv2
    conv1 = nn.Conv2d(c1.in_channels, int(keep.sum()), c1.kernel_size, c1.stride, c1.padding, bias=False)
    conv1.weight.data = c1.weight[keep].clone()
    bn1 = nn.BatchNorm2d(int(keep.sum()), bn.eps, bn.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn1, name).data = getattr(bn, name)[keep].clone()
    bn1.num_batches_tracked.data = bn.num_batches_tracked.clone()
    conv2 = nn.Conv2d(int(keep.sum()), c2.out_channels, c2.kernel_size, c2.stride, c2.padding, bias=False)
    conv2.weight.data = c2.weight[:, keep].clone()
    block.conv1, block.bn1, block.conv2 = conv1, bn1, conv2
    return len(keep), int(keep.sum())


def _copy(model: nn.Sequential) -> nn.Sequential:
    """A copy that runs every channel (the live channels a training run narrowed to name full-width indices)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        getattr(m, "live", {}).clear()
    return model


@torch.no_grad()
def shrink(model: nn.Sequential, min_l1: float = 0.0) -> tuple[nn.Sequential, dict]:
    """Return a smaller copy of ``Sequential(Normalize, SmallCNN or ReducedResNet18)`` and what was removed."""
    if isinstance(model[1], ReducedResNet18):
        if min_l1:
            raise ExportError("--min-l1 applies to small_cnn; the reduced ResNet-18's structured export is exact only")
        model = _copy(model)
        before, after = {}, {}
        for name, block in model[1].named_modules():
            if isinstance(block, BasicBlock):
                before[name], after[name] = _narrow_block(block)
        return model.eval(), {"before": before, "after": after, "exact": True}
    if not isinstance(model[1], SmallCNN):
        raise ExportError("structured export supports small_cnn and resnet18_reduced only, not this backbone; use "
                          "the sparse, dense or int8 variant")
    model = _copy(model).eval()
    net: SmallCNN = model[1]
    c1, c2, fc1, cls = net.conv1, net.conv2, net.fc1, net.classifier
    spatial = fc1.in_features // c2.out_channels
    w_fc1 = fc1.weight.view(fc1.out_features, c2.out_channels, spatial)
    before = {"conv1": c1.out_channels, "conv2": c2.out_channels, "fc1": fc1.out_features}

    # fc1 units
    dead_in = (fc1.weight == 0).all(1)
    weak = fc1.weight.abs().sum(1) < min_l1 * fc1.weight.abs().sum(1).mean()
    cls_bias = cls.bias + cls.weight[:, dead_in] @ F.relu(fc1.bias[dead_in])
    keep_fc1 = ~dead_in & ~weak & ~(cls.weight == 0).all(0)
    # conv2 channels
    dead_c2 = (c2.weight == 0).flatten(1).all(1)
    weak_c2 = c2.weight.abs().flatten(1).sum(1) < min_l1 * c2.weight.abs().flatten(1).sum(1).mean()
    fc1_bias = fc1.bias + w_fc1[:, dead_c2, :].sum(2) @ F.relu(c2.bias[dead_c2])
    keep_c2 = ~dead_c2 & ~weak_c2 & ~(w_fc1 == 0).all(2).all(0)
    # conv1 channels nothing reads
    keep_c1 = ~(c2.weight[keep_c2] == 0).all(0).flatten(1).all(1)
    if not keep_fc1.any() or not keep_c2.any() or not keep_c1.any():
        raise ExportError("structured export would remove a whole layer; use the sparse or dense variant")

    net.conv1 = _conv(c1, c1.weight[keep_c1], c1.bias[keep_c1])
    net.conv2 = _conv(c2, c2.weight[keep_c2][:, keep_c1], c2.bias[keep_c2])
    new_fc1 = w_fc1[keep_fc1][:, keep_c2, :].reshape(int(keep_fc1.sum()), -1)
    net.fc1 = _linear(new_fc1, fc1_bias[keep_fc1])
    net.classifier = _linear(cls.weight[:, keep_fc1], cls_bias)
    after = {"conv1": int(keep_c1.sum()), "conv2": int(keep_c2.sum()), "fc1": int(keep_fc1.sum())}
    return model, {"before": before, "after": after, "exact": min_l1 == 0.0}
