import copy
import math
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
import yaml

from esacl_edge.device.budget import (
    BudgetError,
    activation_bytes_per_sample,
    sparsity_for_model_budget,
    stored_model_bytes,
)
from esacl_edge.learn.buffer import buffer_capacity
from esacl_edge.learn.plan import plan
from esacl_edge.device.profiles import load_profile, profile_names, to_yaml
from esacl_edge.device.selection import autocast_dtype, detect_jetson, select_device
from esacl_edge.errors import ProfileError
from esacl_edge.learn.methods import get_method
from esacl_edge.models import build_model

VALID = {
    "schema_version": 1, "name": "mine", "description": "test device",
    "hardware": {"memory_mb": 4096, "unified_memory": True, "gpu_compute_capability": "8.7",
                 "sparse_tensor_cores": True},
    "budgets": {"training_peak_bytes": 2 ** 31, "buffer_bytes": 10000, "model_bytes": None},
    "training": {"device": "cuda", "fallback": "cpu", "precision": "fp16", "target_sparsity": 0.8,
                 "batch_size": 32, "passes_per_chunk": 5, "threads": 2, "runtime_overhead_bytes": 0},
    "export": {"opset": 17, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
}


def _write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_every_shipped_profile_loads_and_plans_both_backbones():
    names = set(profile_names())
    assert {"cpu", "jetson_orin_nano", "jetson_orin_nx", "jetson_agx_orin", "jetson_orin", "jetson_nano",
            "cuda_desktop", "raspberry_pi5"} <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.training_peak_bytes > 0 and p.providers[-1] == "CPUExecutionProvider"
        for model, shape in (("resnet18_reduced", (32, 32, 3)), ("small_cnn", (28, 28, 1))):
            pl = plan(p, model, shape, 10, get_method("esacl"))
            assert pl.batch_size >= 1 and pl.memory_estimate_bytes <= p.training_peak_bytes
            if p.model_bytes is not None:
                assert pl.model_bytes_stored <= p.model_bytes


def test_alias_and_legacy_profiles():
    orin, nano = load_profile("jetson_orin"), load_profile("jetson_orin_nano")
    assert orin.name == "jetson_orin" and orin.memory_mb == nano.memory_mb == 8192
    assert orin.training_peak_bytes == nano.training_peak_bytes and "jetson_orin_nano" in orin.source
    legacy = load_profile("jetson_nano")
    assert not legacy.training_supported and legacy.opset <= 13 and legacy.gpu_compute_capability == "5.3"


def test_to_yaml_round_trips_every_shipped_profile(tmp_path):
    for name in profile_names():
        p = load_profile(name)
        assert load_profile(_write(tmp_path, to_yaml(p))).replace(
            source="") == p.replace(source="")


def test_profile_by_path(tmp_path):
    p = load_profile(_write(tmp_path, VALID))
    assert (p.name, p.device, p.target_sparsity, p.providers) == (
        "mine", "cuda", 0.8, ("CUDAExecutionProvider", "CPUExecutionProvider"))


def _set(path, value):
    def edit(d):
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return edit


BAD = [
    ("training.target_sparsity", 1.5), ("training.target_sparsity", "high"), ("budgets.buffer_bytes", -1),
    ("budgets.buffer_bytes", 1.5e6), ("budgets.training_peak_bytes", 0), ("budgets.model_bytes", "1MB"),
    ("training.batch_size", 0), ("training.passes_per_chunk", "two"), ("training.device", "tpu"),
    ("training.fallback", "cuda"), ("training.precision", "int4"), ("training.threads", -2),
    ("training.supported", "yes"), ("hardware.memory_mb", 0), ("hardware.unified_memory", "no"),
    ("hardware.gpu_compute_capability", 8.7), ("hardware.sparse_tensor_cores", 1), ("export.opset", 40),
    ("export.providers", ["TPUExecutionProvider"]), ("export.providers", []), ("schema_version", 0),
    ("name", ""), ("training.runtime_overhead_bytes", -1),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_malformed_profile_names_file_and_field(tmp_path, field, value):
    data = copy.deepcopy(VALID)
    _set(field, value)(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: field '{field}'") and "\n" not in msg


@pytest.mark.parametrize("edit,expected", [
    (_set("hardware.memory_mb", KeyError), "field 'hardware.memory_mb' is missing"),
    (_set("budgets", KeyError), "section 'budgets' is missing"),
    (_set("training.buffer_size", 10), "unknown field 'training.buffer_size'"),
    (_set("gpu", {}), "unknown field 'gpu'"),
    (_set("schema_version", 2), "newer than this esacl-edge reads"),
    (_set("training.target_sparsity", None), "set it, or set budgets.model_bytes"),
])
def test_structural_profile_errors(tmp_path, edit, expected):
    data = copy.deepcopy(VALID)
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=expected) as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_malformed_yaml_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ProfileError, match="not valid YAML at line"):
        load_profile(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(tmp_path / "nope.yaml")
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*cpu"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="must be a YAML mapping"):
        load_profile(_write(tmp_path, "- a\n- b\n"))


def test_model_budget_arithmetic_by_hand():
    model = build_model("small_cnn", (8, 8, 1), 10)
    # Prunable: conv1 288, conv2 18432, fc1 32768, classifier 1280 = 52768 weights.
    # Dense rest: biases 32 + 64 + 128 + 10 = 234, Normalize scale 1 + mean 1 + std 1 = 3.
    d, rest = 288 + 18432 + 32768 + 1280, 234 + 3
    masks = 36 + 2304 + 4096 + 160
    assert stored_model_bytes(model, 0.9) == 4 * (round(0.1 * d) + rest) + masks
    budget = 4 * (5000 + rest) + masks
    assert sparsity_for_model_budget(model, budget) == pytest.approx(1 - 5000 / d)
    assert sparsity_for_model_budget(model, 10 ** 7) == 0.0
    with pytest.raises(BudgetError, match="model_bytes = 1,000 B is too small"):
        sparsity_for_model_budget(model, 1000)


def test_buffer_and_activation_arithmetic_by_hand():
    assert buffer_capacity(10 * (784 + 8 + 40) + 5, (28, 28, 1), "uint8", 10) == 10
    model = build_model("small_cnn", (8, 8, 1), 10)
    # Leaf outputs of one 8x8 sample: Normalize 64, conv1 32*64, conv2 64*16, fc1 128, classifier 10,
    # plus the input (64); pooling and ReLU are functional, not modules.
    assert activation_bytes_per_sample(model, (8, 8, 1)) == 4 * (64 + 2048 + 1024 + 128 + 10 + 64)


def test_training_budget_sets_the_batch_and_refuses_when_nothing_fits(tmp_path):
    base = load_profile(_write(tmp_path, VALID)).replace(device="cpu")
    method = get_method("esacl")
    full = plan(base, "small_cnn", (28, 28, 1), 10, method)
    # A minibatch sample's activations, plus those of the 0.75 replayed per minibatch sample (1.5 per selected half).
    per_sample = math.ceil(activation_bytes_per_sample(build_model("small_cnn", (28, 28, 1), 10), (28, 28, 1)) * 1.75)
    fixed = full.memory_estimate_bytes - full.memory_terms["activations"]
    tight = base.replace(training_peak_bytes=fixed + 5 * per_sample + 7)
    pl = plan(tight, "small_cnn", (28, 28, 1), 10, method)
    assert pl.batch_size == 5 and pl.memory_estimate_bytes <= tight.training_peak_bytes
    with pytest.raises(BudgetError, match="largest is runtime") as err:
        plan(base.replace(runtime_overhead_bytes=2 ** 31), "small_cnn", (28, 28, 1), 10, method)
    assert "training_peak_bytes" in str(err.value)
    with pytest.raises(BudgetError, match=r"largest is buffer .*budgets.buffer_bytes"):
        plan(base.replace(buffer_bytes=2 ** 31), "small_cnn", (28, 28, 1), 10, method)


def test_learn_refuses_a_too_small_profile_before_training(tmp_path, tiny_stream, capsys):
    from esacl_edge.cli import main

    data = copy.deepcopy(VALID)
    data["training"].update(device="cpu", runtime_overhead_bytes=10 ** 6)
    data["budgets"]["training_peak_bytes"] = 10 ** 6
    path = _write(tmp_path, data)
    assert main(["learn", "--profile", str(path), "--stream", str(tiny_stream.root), "--run",
                 str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot hold one training batch" in err and "raise the budget" in err
    assert not (tmp_path / "run").exists()


def test_profile_that_cannot_train_is_refused(tmp_path, tiny_stream):
    from esacl_edge import EsaclError, StreamingLearner

    with pytest.raises(EsaclError, match="jetson_nano .* does not support training"):
        StreamingLearner("small_cnn", "jetson_nano", 10, (8, 8, 1))


def test_device_falls_back_to_cpu_with_one_warning():
    orin = load_profile("jetson_orin")
    with pytest.warns(RuntimeWarning, match="CUDA is not available") as record:
        assert select_device(orin, cuda_available=lambda: False, jetson=lambda: None) == torch.device("cpu")
    assert len(record) == 1 and "Jetson" not in str(record[0].message)
    with pytest.warns(RuntimeWarning, match="This is a NVIDIA Jetson Orin Nano.*NVIDIA's PyTorch wheel"):
        select_device(orin, cuda_available=lambda: False, jetson=lambda: "NVIDIA Jetson Orin Nano")
    assert autocast_dtype(orin, torch.device("cpu")) is None


def test_device_uses_cuda_when_present():
    orin = load_profile("jetson_orin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_device(orin, cuda_available=lambda: True) == torch.device("cuda")
    assert autocast_dtype(orin, torch.device("cuda"), bf16_supported=lambda: True) == torch.bfloat16
    assert autocast_dtype(load_profile("cuda_desktop"), torch.device("cuda"), bf16_supported=lambda: True) \
        == torch.bfloat16
    assert select_device(load_profile("cpu"), cuda_available=lambda: True) == torch.device("cpu")


def test_jetson_detection_from_platform_files(tmp_path):
    assert detect_jetson(tmp_path) is None
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    assert detect_jetson(tmp_path) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    assert detect_jetson(tmp_path) == "NVIDIA Jetson (R36 (release), REVISION: 4.0)"
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    assert detect_jetson(tmp_path) == "NVIDIA Jetson Orin Nano Developer Kit"


@pytest.mark.slow
def test_profiles_ship_inside_the_wheel(tmp_path):
    """A non-editable install must find the profiles: they are package data."""
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("esacl_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"esacl_edge/device_profiles/{n}.yaml" for n in profile_names()} <= names


def test_profiles_cli(capsys):
    from esacl_edge.cli import main

    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in profile_names())
    assert main(["profiles", "check", "jetson_orin", "--model", "resnet18_reduced", "--input-shape", "32,32,3"]) == 0
    out = capsys.readouterr().out
    assert "profile budgets.model_bytes" in out and "fits: yes" in out and "activations" in out
    assert main(["profiles", "show", "raspberry_pi5"]) == 0
    assert "threads                 4" in capsys.readouterr().out


def test_learn_reports_declared_and_measured_memory_and_warns_when_over(tmp_path, tiny_stream):
    from esacl_edge.runner import learn

    # The estimate fits in 64 MiB, but this test process alone is far bigger: measured > declared.
    tight = load_profile("cpu").replace(name="tight", training_peak_bytes=64 * 2 ** 20, runtime_overhead_bytes=0,
                                        passes_per_chunk=1)
    with pytest.warns(RuntimeWarning, match="measured peak memory .* exceeds budgets.training_peak_bytes"):
        r = learn(tiny_stream.root, tight, tmp_path / "run", buffer_bytes=2240, progress=False)
    assert r["memory_budget_bytes"] == 64 * 2 ** 20
    assert r["peak_memory_bytes"] > r["memory_budget_bytes"] >= r["memory_estimate_bytes"]
    assert r["buffer_capacity"] == 20 and r["batch_size"] == 32
    assert sum(r["memory_terms"].values()) == r["memory_estimate_bytes"]


def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    """A bench runs each learn job in a child process; its peak must not include the bench's own memory
    (``ru_maxrss`` would: Linux carries the parent's peak over fork and exec)."""
    child = "from esacl_edge.device.memory import peak_rss_bytes; print(peak_rss_bytes())"
    parent = ("import subprocess, sys; ballast = bytearray(2 * 2 ** 30)\n"  # 2 GiB resident in the parent
              "for i in range(0, len(ballast), 4096): ballast[i] = 1\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout)")
    peak = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert 100 * 2 ** 20 < peak < 1.5 * 2 ** 30


def test_the_headline_usage_resolves_a_shipped_profile_from_an_empty_folder(tmp_path, tiny_stream, monkeypatch,
                                                                             capsys):
    import shutil

    from esacl_edge.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_stream.root, tmp_path / "chunks")
    assert main(["learn", "--profile", "jetson_orin.yaml", "--stream", "./chunks", "--quiet"]) == 0, \
        capsys.readouterr().err
    saved = yaml.safe_load(next(tmp_path.glob("*/profile.yaml")).read_text())
    assert saved["name"] == "jetson_orin"


def test_a_yaml_name_is_a_file_here_first_then_a_shipped_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_profile("jetson_orin.yaml").name == "jetson_orin"
    assert load_profile("jetson_orin.yml").name == "jetson_orin"
    mine = copy.deepcopy(VALID)
    _write(tmp_path, mine, "jetson_orin.yaml")
    with pytest.warns(RuntimeWarning, match=r"jetson_orin.yaml: using this file, not the shipped profile"):
        assert load_profile("jetson_orin.yaml").name == "mine"
    with pytest.raises(ProfileError, match=r"nope.yaml: profile file not found \(shipped profiles: cpu, "):
        load_profile("nope.yaml")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile("sub/jetson_orin.yaml")  # a path with a folder is a file, never a shipped name


def test_budget_errors_name_the_profile_file(tmp_path):
    data = copy.deepcopy(VALID)
    data["budgets"]["training_peak_bytes"] = 10 ** 5
    path = _write(tmp_path, data)
    with pytest.raises(BudgetError, match=f"^{path} \\(profile mine\\): budgets.training_peak_bytes"):
        plan(load_profile(path), "small_cnn", (8, 8, 1), 10, get_method("esacl"))


def test_budgets_beyond_the_devices_memory_are_refused(tmp_path):
    data = copy.deepcopy(VALID)
    data["hardware"]["memory_mb"] = 1
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError, match=rf"{path}: field 'budgets.training_peak_bytes' = 2,147,483,648 B is more "
                                           r"than the device's memory \(hardware.memory_mb = 1 MB"):
        load_profile(path)


def test_more_threads_than_cores_are_capped_with_a_warning():
    from esacl_edge.device.selection import apply_threads

    before = torch.get_num_threads()
    try:
        with pytest.warns(RuntimeWarning, match=r"training.threads = 512, but this process may run on 2 cores; "
                                                r"using 2"):
            assert apply_threads(load_profile("cpu").replace(threads=512), cores=2) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert apply_threads(load_profile("cpu").replace(threads=1), cores=2) == 1
    finally:
        torch.set_num_threads(before)
