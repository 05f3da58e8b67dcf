"""Backbones: a small CNN for 8x8 and 28x28 inputs, the reduced ResNet-18 for 32x32 colour, and
torchvision's deployment networks (MobileNet V2/V3, ResNet-18, EfficientNet-B0).

Every model is ``Sequential(Normalize, backbone)``: a fixed :class:`Normalize` layer first, so a
snapshot or an ONNX file takes inputs in the units the stream stores (for example raw 0..255
pixels as float32, NCHW). Every backbone is itself a Sequential of stages, so it can be cut at a
stage (:func:`split_model`): a frozen prefix runs without gradients and the rest trains.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data.stream import MIN_MODEL_SIDE, classes_problem, shape_problem
from .errors import EsaclError
from .names import MODEL_NAMES, TORCHVISION_MODELS

# Smallest H and W per backbone: two 2x2 poolings; three stride-2 stages that must leave more than
# 1x1 for BatchNorm to train on a single sample.
# torchvision's networks downsample 32x: 32x32 leaves a 1x1 map.
MIN_SIDE = {"small_cnn": MIN_MODEL_SIDE, "resnet18_reduced": 9, **dict.fromkeys(TORCHVISION_MODELS, 32)}


class Normalize(nn.Module):
    """x -> (x * scale - mean) / std, per channel; constants are buffers, not parameters."""

    def __init__(self, channels: int, scale: float = 1.0, mean=None, std=None) -> None:
        super().__init__()
        mean = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("mean", mean.reshape(1, channels, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, channels, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale - self.mean) / self.std


def batch_norm_channels(bn: nn.BatchNorm2d, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``bn`` applied to ``x``, which holds only channels ``idx`` of its input: nn.BatchNorm2d's forward on
    those channels, running statistics included."""
    update = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    mean = bn.running_mean[idx] if use_running else None
    var = bn.running_var[idx] if use_running else None
    if update:
        bn.num_batches_tracked.add_(1)
    momentum = (1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum) if update else 0.0
    out = F.batch_norm(x, mean, var, bn.weight[idx], bn.bias[idx], bn.training, momentum, bn.eps)
    if update:
        with torch.no_grad():
            bn.running_mean[idx], bn.running_var[idx] = mean, var
    return out


class SmallCNN(nn.Sequential):
    """Two 3x3 conv blocks with max-pooling, then a 2-layer MLP head.

    Sized for 8x8 (digits) and 28x28 (MNIST family) inputs; any H, W >= 4 works. ``live`` may name the
    conv2 channels and fc1 units that channel pruning left (``learn/channels.py``); the forward then runs
    only those, at full-size weights, computing what the masked network computes in less time.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 width_mult: int = 1) -> None:
        c1, c2, hidden = 32 * width_mult, 64 * width_mult, 128 * width_mult
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(in_channels, c1, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2), flatten=nn.Flatten(),
            fc1=nn.Linear(c2 * (height // 4) * (width // 4), hidden), relu3=nn.ReLU(),
            classifier=nn.Linear(hidden, num_classes)))
        self.live: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.live:
            return super().forward(x)
        channels, units = self.live.get("conv2"), self.live.get("fc1")
        x = self.pool1(self.relu1(self.conv1(x)))
        w, b = self.conv2.weight, self.conv2.bias
        if channels is not None:
            w, b = w[channels], b[channels]
        x = self.flatten(self.pool2(self.relu2(F.conv2d(x, w, b, padding=self.conv2.padding))))
        w, b, head = self.fc1.weight, self.fc1.bias, self.classifier.weight
        if channels is not None:   # fc1 reads each conv2 channel through `spatial` flattened columns
            spatial = w.shape[1] // self.conv2.out_channels
            w = w[:, (channels[:, None] * spatial + torch.arange(spatial, device=w.device)).flatten()]
        if units is not None:
            w, b, head = w[units], b[units], head[:, units]
        return F.linear(self.relu3(F.linear(x, w, b)), head, self.classifier.bias)


class BasicBlock(nn.Module):
    """ResNet's basic block. ``live`` may name the inner channels that channel pruning left
    (``learn/channels.py``): the forward then runs conv1, bn1 and conv2 on those only."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.live: dict[str, torch.Tensor] = {}
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.live.get("conv1")
        if inner is None:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
        else:
            c1, c2 = self.conv1, self.conv2
            out = F.conv2d(x, c1.weight[inner], None, c1.stride, c1.padding)
            out = F.relu(batch_norm_channels(self.bn1, out, inner))
            out = self.bn2(F.conv2d(out, c2.weight[:, inner], None, c2.stride, c2.padding))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Sequential):
    """ResNet-18 with width nf=20 (GEM, DER, SparCL): [2, 2, 2, 2] basic blocks, 3x3 stem."""

    def __init__(self, in_channels: int, num_classes: int, nf: int = 20) -> None:
        stages, in_planes = OrderedDict(conv1=nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False),
                                        bn1=nn.BatchNorm2d(nf), relu=nn.ReLU()), nf
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, nf * mult, s))
                in_planes = nf * mult
            stages[f"layer{i}"] = nn.Sequential(*blocks)
        stages.update(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), classifier=nn.Linear(nf * 8, num_classes))
        super().__init__(stages)


def torchvision_backbone(name: str, num_classes: int) -> nn.Sequential:
    """torchvision's ``name`` as a Sequential of its stages, with torchvision's state-dict keys.

    The forward is the same as torchvision's (average pooling and flattening become stages), so its
    ImageNet weights load as they are; dropout (and EfficientNet's stochastic depth) is left out, so that training randomness comes only
    from the learner's seeded generators and DER++'s stored logits are those of the model.
    """
    from torchvision.models import get_model

    net = get_model(name, weights=None, num_classes=num_classes)
    for m in net.modules():
        if type(m).__name__ == "StochasticDepth":  # EfficientNet's: random like dropout
            m.p = 0.0
        if isinstance(m, nn.BatchNorm2d):  # MobileNetV3's 0.01 suits ImageNet epochs, not a few steps per task
            m.momentum = 0.1
    stages = OrderedDict()
    for child_name, child in net.named_children():
        if child_name in ("fc", "classifier"):
            stages.setdefault("avgpool", nn.AdaptiveAvgPool2d(1))  # mobilenet_v2 pools in its forward()
            stages["flatten"] = nn.Flatten()
            if isinstance(child, nn.Sequential):
                for i, m in enumerate(child):
                    if isinstance(m, nn.Dropout):
                        child[i] = nn.Identity()
        stages[child_name] = child
    return nn.Sequential(stages)


def stage_names(net: nn.Sequential) -> list[str]:
    """The points a backbone can be cut at, in forward order: its stages, and the blocks of a stage that is a
    Sequential (``layer3``, ``layer3.0``; ``features.6``)."""
    names = []
    for name, child in net.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            names += [f"{name}.{i}" for i in range(len(child))]
        names.append(name)
    return names


def _stages(net: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """The backbone as a flat list of (name, module) run one after the other."""
    out = []
    for name, child in net.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            out += [(f"{name}.{i}", m) for i, m in enumerate(child)]
        else:
            out.append((name, child))
    return out


def split_model(model: nn.Sequential, freeze_until: str) -> tuple[nn.Sequential, nn.Sequential]:
    """``Sequential(Normalize, backbone)`` cut after stage ``freeze_until``: (prefix, suffix), sharing the modules
    of ``model``; ``suffix(prefix(x)) == model(x)``."""
    norm, net = model[0], model[1]
    stages = _stages(net)
    names = [n for n, _ in stages]
    last = freeze_until if freeze_until in names else f"{freeze_until}.{len(getattr(net, freeze_until)) - 1}"
    cut = names.index(last) + 1
    return nn.Sequential(norm, *(m for _, m in stages[:cut])), nn.Sequential(*(m for _, m in stages[cut:]))


def check_freeze(name: str, net: nn.Sequential, freeze_until: str) -> None:
    """Refuse a cut point the backbone lacks, or one that leaves no trainable weight layer."""
    names = stage_names(net)
    if freeze_until not in names:
        raise EsaclError(f"model {name}: --freeze-until {freeze_until!r} is not one of its stages; choose one of "
                         f"{', '.join(names)}")
    suffix = split_model(nn.Sequential(nn.Identity(), net), freeze_until)[1]
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in suffix.modules()):
        raise EsaclError(f"model {name}: --freeze-until {freeze_until} leaves no layer to train; cut before the "
                         "classifier")


def check_input(name: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Refuse a backbone name, input shape (H, W, C) or class count that cannot make a model."""
    if name not in MODEL_NAMES:
        raise EsaclError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if problem := shape_problem(tuple(input_shape)):
        raise EsaclError(f"model {name}: input shape {problem}")
    if problem := classes_problem(num_classes):
        raise EsaclError(f"model {name}: number of classes {problem}")
    h, w, c = input_shape
    if name in TORCHVISION_MODELS and c != 3:
        raise EsaclError(f"model {name}: takes 3-channel (RGB) images, the input has {c}; make-stream --channels 3 "
                         "converts grey images")
    low = MIN_SIDE[name]
    if min(h, w) < low:
        fits_small = min(h, w) >= MIN_SIDE["small_cnn"]
        hint = "choose small_cnn (--model small_cnn)" if fits_small else "resize the images (make-stream --image-size)"
        raise EsaclError(f"model {name}: input {h}x{w} is too small (needs at least {low}x{low}); {hint}")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                normalization: dict | None = None, freeze_until: str | None = None) -> nn.Sequential:
    """Build backbone ``name`` for ``input_shape`` = (H, W, C) as the stream stores it.

    The result is ``Sequential(Normalize, backbone)`` and takes float32 NCHW input. With
    ``freeze_until``, the parameters up to that stage (:func:`stage_names`) take no gradient.
    """
    check_input(name, input_shape, num_classes)
    h, w, c = input_shape
    try:
        if name == "small_cnn":
            net: nn.Sequential = SmallCNN(c, h, w, num_classes)
        elif name == "resnet18_reduced":
            net = ReducedResNet18(c, num_classes)
        else:
            net = torchvision_backbone(name, num_classes)
    except (RuntimeError, MemoryError) as exc:  # the weights do not fit in memory
        raise EsaclError(f"model {name}: cannot allocate its weights for input {h}x{w}x{c} and {num_classes} "
                         f"classes ({type(exc).__name__}); use smaller images (make-stream --image-size)") from None
    norm = normalization or {}
    model = nn.Sequential(Normalize(c, norm.get("scale", 1.0), norm.get("mean"), norm.get("std")), net)
    if freeze_until is not None:
        check_freeze(name, net, freeze_until)
        model.requires_grad_(True)
        split_model(model, freeze_until)[0].requires_grad_(False)
    return model


def classifier_name(model: nn.Module) -> str:
    """Module path of the last linear layer (the classifier a new label space replaces)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of every trainable conv and linear layer, classifier included; biases, norms and a frozen
    prefix stay dense."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.requires_grad:
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    return out


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights per prunable layer."""
    return {n: float((p == 0).float().mean()) for n, p in prunable_parameters(model).items()}


@dataclass
class ModelSpec:
    """What it takes to rebuild a model: backbone, input as stored, classes, normalisation."""

    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    normalization: dict = field(default_factory=dict)
    dtype: str = "float32"
    class_names: list[str] | None = None
    freeze_until: str | None = None

    def build(self) -> nn.Sequential:
        return build_model(self.model, tuple(self.input_shape), self.num_classes, self.normalization,
                           self.freeze_until)
