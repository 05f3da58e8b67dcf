import warnings

import pytest
import torch

from esacl_edge.device import autocast_dtype, select_device
from esacl_edge.errors import ProfileError
from esacl_edge.profiles import load_profile, profile_names


def test_shipped_profiles_load():
    assert {"cpu", "jetson_orin"} <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert p.name == name and 0 <= p.target_sparsity < 1 and p.buffer_bytes > 0
    orin = load_profile("jetson_orin")
    assert orin.device == "cuda" and orin.fallback == "cpu" and orin.precision == "fp16"


def test_profile_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nbuffer_bytes: 1000\ntarget_sparsity: 0.8\n")
    p = load_profile(path)
    assert (p.name, p.buffer_bytes, p.target_sparsity, p.device) == ("mine", 1000, 0.8, "cpu")


@pytest.mark.parametrize("text,field", [
    ("name: x\ntarget_sparsity: 1.5\n", "target_sparsity"),
    ("name: x\ntarget_sparsity: high\n", "target_sparsity"),
    ("name: x\nbuffer_bytes: -1\n", "buffer_bytes"),
    ("name: x\nbuffer_bytes: 1.5e6\n", "buffer_bytes"),
    ("name: x\nbatch_size: 0\n", "batch_size"),
    ("name: x\npasses_per_chunk: two\n", "passes_per_chunk"),
    ("name: x\ndevice: tpu\n", "device"),
    ("name: x\nprecision: int4\n", "precision"),
    ("name: x\nbuffer_size: 10\n", "buffer_size"),
    ("name: x\nschema_version: 7\n", "schema_version"),
    ("buffer_bytes: 10\n", "name"),
])
def test_bad_profile_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value)


def test_malformed_yaml_and_missing_profile(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML at line"):
        load_profile(path)
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(tmp_path / "nope.yaml")
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*cpu"):
        load_profile("nope")


def test_device_falls_back_to_cpu_with_one_warning():
    orin = load_profile("jetson_orin")
    with pytest.warns(RuntimeWarning, match="CUDA is not available") as record:
        assert select_device(orin, cuda_available=lambda: False) == torch.device("cpu")
    assert len(record) == 1
    assert autocast_dtype(orin, torch.device("cpu")) is None


def test_device_uses_cuda_when_present():
    orin = load_profile("jetson_orin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_device(orin, cuda_available=lambda: True) == torch.device("cuda")
    assert autocast_dtype(orin, torch.device("cuda")) == torch.float16
    assert autocast_dtype(orin.replace(precision="fp32"), torch.device("cuda")) is None
    cpu = load_profile("cpu")
    assert select_device(cpu, cuda_available=lambda: True) == torch.device("cpu")
