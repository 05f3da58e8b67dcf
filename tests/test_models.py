import pytest
import torch

from esacl_edge.errors import EsaclError
from esacl_edge.metrics import backward_transfer, final_accuracy, forgetting
from esacl_edge.models import build_model, prunable_parameters


@pytest.mark.parametrize("name,shape", [("small_cnn", (8, 8, 1)), ("small_cnn", (28, 28, 1)),
                                        ("resnet18_reduced", (32, 32, 3))])
def test_backbones_map_inputs_to_logits(name, shape):
    model = build_model(name, shape, 10)
    out = model(torch.zeros(3, shape[2], shape[0], shape[1]))
    assert out.shape == (3, 10)
    prunable = prunable_parameters(model)
    assert all(n.endswith(".weight") and p.dim() in (2, 4) for n, p in prunable.items())
    assert any("classifier" in n for n in prunable)
    n_bn = sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (name == "resnet18_reduced") == (n_bn > 0)


def test_reduced_resnet18_size():
    # nf=20 ResNet-18 of the continual-learning literature: about 1.1 M parameters.
    model = build_model("resnet18_reduced", (32, 32, 3), 10)
    n = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < n < 1.2e6


def test_normalize_is_inside_the_model():
    model = build_model("small_cnn", (8, 8, 1), 2, {"scale": 0.5, "mean": [1.0], "std": [2.0]})
    x = torch.full((1, 1, 8, 8), 4.0)
    assert torch.allclose(model[0](x), torch.full_like(x, 0.5))


def test_unknown_model():
    with pytest.raises(EsaclError, match="unknown model 'vgg'"):
        build_model("vgg", (8, 8, 1), 2)


def test_metrics_by_hand():
    r = [[0.9], [0.6, 0.8], [0.5, 0.7, 1.0]]
    assert final_accuracy(r) == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert forgetting(r) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert backward_transfer(r) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert forgetting([[0.9]]) == 0.0
