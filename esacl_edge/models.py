"""Backbones: a small CNN for 8x8 and 28x28 inputs and the reduced ResNet-18 for 32x32 colour.

Every model starts with a fixed :class:`Normalize` layer, so a snapshot or an ONNX file takes
inputs in the units the stream stores (for example raw 0..255 pixels as float32, NCHW).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.stream import classes_problem, shape_problem
from .errors import EsaclError
from .names import MODEL_NAMES

# Smallest H and W per backbone: two 2x2 poolings; three stride-2 stages that must leave more than
# 1x1 for BatchNorm to train on a single sample.
MIN_SIDE = {"small_cnn": 4, "resnet18_reduced": 9}


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


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks with max-pooling, then a 2-layer MLP head.

    Sized for 8x8 (digits) and 28x28 (MNIST family) inputs; any H, W >= 4 works.
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 width_mult: int = 1) -> None:
        super().__init__()
        c1, c2, hidden = 32 * width_mult, 64 * width_mult, 128 * width_mult
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (height // 4) * (width // 4), hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.classifier(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
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
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """ResNet-18 with width nf=20 (GEM, DER, SparCL): [2, 2, 2, 2] basic blocks, 3x3 stem."""

    def __init__(self, in_channels: int, num_classes: int, nf: int = 20) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, in_planes = [], nf
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, nf * mult, s))
                in_planes = nf * mult
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.classifier = nn.Linear(nf * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def check_input(name: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Refuse a backbone name, input shape (H, W, C) or class count that cannot make a model."""
    if name not in MODEL_NAMES:
        raise EsaclError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if problem := shape_problem(tuple(input_shape)):
        raise EsaclError(f"model {name}: input shape {problem}")
    if problem := classes_problem(num_classes):
        raise EsaclError(f"model {name}: number of classes {problem}")
    h, w, _ = input_shape
    low = MIN_SIDE[name]
    if min(h, w) < low:
        fits_small = min(h, w) >= MIN_SIDE["small_cnn"]
        hint = "choose small_cnn (--model small_cnn)" if fits_small else "resize the images (make-stream --image-size)"
        raise EsaclError(f"model {name}: input {h}x{w} is too small (needs at least {low}x{low}); {hint}")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                normalization: dict | None = None) -> nn.Sequential:
    """Build backbone ``name`` for ``input_shape`` = (H, W, C) as the stream stores it.

    The result is ``Sequential(Normalize, backbone)`` and takes float32 NCHW input.
    """
    check_input(name, input_shape, num_classes)
    h, w, c = input_shape
    try:
        net: nn.Module = SmallCNN(c, h, w, num_classes) if name == "small_cnn" else ReducedResNet18(c, num_classes)
    except (RuntimeError, MemoryError) as exc:  # the weights do not fit in memory
        raise EsaclError(f"model {name}: cannot allocate its weights for input {h}x{w}x{c} and {num_classes} "
                         f"classes ({type(exc).__name__}); use smaller images (make-stream --image-size)") from None
    norm = normalization or {}
    return nn.Sequential(Normalize(c, norm.get("scale", 1.0), norm.get("mean"), norm.get("std")), net)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of every conv and linear layer, classifier included; biases and norms stay dense."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    return out


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights per prunable layer."""
    return {n: float((p == 0).float().mean()) for n, p in prunable_parameters(model).items()}
