import pytest
import torch

from esacl_edge.data.build import make_stream
from esacl_edge.device.profiles import load_profile


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_stream(tmp_path_factory):
    """Split-Digits with 20 training and 10 test images per class: 5 tasks of 2 chunks."""
    out = tmp_path_factory.mktemp("stream") / "digits"
    return make_stream("digits", out, tasks=5, chunk_size=24, seed=0, per_class=20, test_per_class=10)


@pytest.fixture(scope="session")
def fast_profile():
    return load_profile("cpu").replace(passes_per_chunk=2, batch_size=16)


@pytest.fixture
def digits_norm():
    return {"scale": 1 / 16, "mean": [0.3], "std": [0.4]}
