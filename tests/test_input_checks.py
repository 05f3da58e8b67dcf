"""Bad input to make-stream, manifests, models, profiles and bench: one error line, nothing left behind."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from esacl_edge import models
from esacl_edge.bench import bench, format_table, summarize
from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.data.images import parse_image_size
from esacl_edge.data.stream import load_chunk, read_manifest
from esacl_edge.device.profiles import load_profile, to_yaml
from esacl_edge.errors import EsaclError, ProfileError, StreamError

from tests import formats
from tests.support import write_chunk


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("esacl-edge: error: ") and "\n" not in err, err
    assert err.count("esacl-edge: error: ") == 1, err
    return err


def write_npz(path, x_train, x_test=None, y_train=None, y_test=None):
    x_test = x_train if x_test is None else x_test
    y_train = np.arange(len(x_train)) % 4 if y_train is None else y_train
    y_test = np.arange(len(x_test)) % 4 if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def images(*shape):
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------- npz layouts
def test_npz_channels_first_is_refused_naming_file_array_and_shape(tmp_path, capsys):
    data = write_npz(tmp_path / "nchw.npz", images(16, 1, 12, 12))
    out = tmp_path / "s"
    assert main(["make-stream", "--dataset", data, "--out", str(out), "--tasks", "2"]) == 2
    err = one_error_line(capsys)
    assert f"{tmp_path / 'nchw.npz'}: x_train has shape (16, 1, 12, 12), channels first (NCHW)" in err
    assert "transpose(0, 2, 3, 1)" in err
    assert not out.exists()
    with pytest.raises(StreamError, match=r"x_test has shape \(16, 3, 12, 12\), channels first"):
        make_stream(write_npz(tmp_path / "t.npz", images(16, 12, 12, 3), images(16, 3, 12, 12)), out, tasks=2)


def test_npz_images_without_channel_axis_are_one_channel(tmp_path):
    x = images(16, 12, 12)
    m = make_stream(write_npz(tmp_path / "nhw.npz", x), tmp_path / "s", tasks=2, chunk_size=4)
    assert m.input_shape == (12, 12, 1)
    chunk = load_chunk(m, 0, 0)
    assert chunk.x.shape[1:] == (12, 12, 1)


def test_npz_train_and_test_images_of_different_sizes_are_refused(tmp_path):
    data = write_npz(tmp_path / "d.npz", images(16, 12, 12, 1), images(16, 10, 10, 1))
    with pytest.raises(StreamError, match=r"test images are \(10, 10, 1\) but training images are \(12, 12, 1\)"):
        make_stream(data, tmp_path / "s", tasks=2)
    assert not (tmp_path / "s").exists()
    assert make_stream(data, tmp_path / "s", tasks=2, image_size="8").input_shape == (8, 8, 1)


def test_npz_with_a_huge_label_is_refused_before_anything_is_made(tmp_path):
    y = np.arange(16) % 4
    y[0] = 200_000
    data = write_npz(tmp_path / "d.npz", images(16, 8, 8, 1), y_train=y)
    with pytest.raises(StreamError, match=r"number of classes .* from 2 to 100,000, got 200001"):
        make_stream(data, tmp_path / "s", tasks=2)
    assert not (tmp_path / "s").exists()


def test_channels_of_other_images_are_not_converted(tmp_path):
    data = write_npz(tmp_path / "rgba.npz", images(16, 8, 8, 4))
    with pytest.raises(StreamError, match="--channels 1: the images have 4 channels"):
        make_stream(data, tmp_path / "s", tasks=2, channels=1)


def test_image_size_is_limited_to_what_a_manifest_accepts():
    assert parse_image_size("1024") == (1024, 1024)
    with pytest.raises(StreamError, match=r"--image-size must be N or HxW with sizes 1\.\.1024"):
        parse_image_size("2048")


@pytest.fixture
def small_stream(tmp_path):
    return make_stream("digits", tmp_path / "stream", tasks=2, chunk_size=10, per_class=5, test_per_class=3)


@pytest.mark.parametrize("layout,hint", [
    (lambda x: x.transpose(0, 3, 1, 2), r"channels-first, NCHW: store it as NHWC, x\.transpose\(0, 2, 3, 1\)"),
    (lambda x: x[..., 0], r"no channel axis: store x\[\.\.\., None\]"),
])
def test_chunk_in_another_layout_says_which(small_stream, layout, hint):
    path = small_stream.path(small_stream.tasks[0].chunks[0])
    with np.load(path) as d:
        x, y = d["x"], d["y"]
    write_chunk(path, layout(x), y)
    with pytest.raises(StreamError, match=rf"{path}: x has shape .*, expected \(N, 8, 8, 1\) \(x (is|has) {hint}"):
        load_chunk(small_stream, 0, 0)


# ------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", ["-3", "12345678901234567890", str(2 ** 32)])
def test_make_stream_seed_out_of_range_is_one_line(tmp_path, capsys, seed):
    out = tmp_path / "s"
    assert main(["make-stream", "--dataset", "digits", "--out", str(out), "--seed", seed]) == 2
    assert f"--seed must be an integer from 0 to 4294967295, got {seed}" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("seed", [-1, 2 ** 64, 1.5, True])
def test_make_stream_api_checks_the_seed(tmp_path, seed):
    with pytest.raises(StreamError, match="--seed must be an integer from 0 to 4294967295"):
        make_stream("npz:unused.npz", tmp_path / "s", seed=seed)
    make_stream("digits", tmp_path / "s", tasks=2, per_class=3, test_per_class=2, seed=2 ** 32 - 1)


# ------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("edit,expected", [
    ({"input_shape": [4096, 4096, 1]}, r"input_shape 4096x4096x1 is out of range: at most 1024 pixels a side"),
    ({"input_shape": [8, 8, 64]}, r"input_shape 8x8x64 is out of range: .* 16 channels"),
    ({"num_classes": 1_000_000_000, "class_names": None}, r"num_classes must be .* got 1000000000$"),
    ({"num_classes": 1e9}, r"num_classes must be an integer from 2 to 100,000, got 1000000000\.0"),
    ({"normalization": {"scale": "x"}}, r"normalization\.scale must be a positive number, got 'x'"),
    ({"normalization": {"std": [0]}}, r"normalization\.std must list one finite positive number per channel"),
    ({"normalization": {"mean": ["a"]}}, r"normalization\.mean must list one finite number per channel"),
    ({"normalization": {"scale": 10 ** 400}}, r"normalization\.scale must be a positive number"),
])
def test_manifest_values_out_of_range_are_refused(small_stream, edit, expected):
    path = small_stream.root / "manifest.json"
    raw = json.loads(path.read_text())
    raw.update(edit)
    path.write_text(json.dumps(raw))
    with pytest.raises(StreamError, match=expected) as err:
        read_manifest(small_stream.root)
    assert str(err.value).startswith(f"{path}: ")


def test_learn_on_an_absurd_manifest_is_one_line(small_stream, tmp_path, capsys):
    path = small_stream.root / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "input_shape": [4096, 4096, 1]}))
    run = tmp_path / "run"
    assert main(["learn", "--stream", str(small_stream.root), "--run", str(run), "--quiet"]) == 2
    assert f"{path}: input_shape 4096x4096x1 is out of range" in one_error_line(capsys)
    assert not run.exists()


# ------------------------------------------------------------------------------- models
def test_resnet_on_digits_is_refused_by_learn_and_profiles_check(small_stream, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["learn", "--stream", str(small_stream.root), "--run", str(run), "--model", "resnet18_reduced",
                 "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "model resnet18_reduced: input 8x8 is too small (needs at least 9x9)" in err and "small_cnn" in err
    assert not run.exists()
    assert main(["profiles", "check", "cpu", "--model", "resnet18_reduced", "--input-shape", "8,8,1"]) == 2
    assert one_error_line(capsys) == err
    model = models.build_model("resnet18_reduced", (9, 9, 1), 2).train()  # the smallest trains on one sample
    assert model(torch.zeros(1, 1, 9, 9)).shape == (1, 2)


@pytest.mark.parametrize("shape,classes,expected", [
    ((8, 8, 0), 10, r"model small_cnn: input shape must be \[H, W, C\] with positive sizes"),
    ((8, 8, 1), -3, r"model small_cnn: number of classes must be an integer from 2"),
    ((3, 8, 1), 10, r"input 3x8 is too small \(needs at least 4x4\); resize the images"),
])
def test_build_model_refuses_before_allocating(shape, classes, expected):
    with pytest.raises(EsaclError, match=expected):
        models.build_model("small_cnn", shape, classes)


def test_weights_that_do_not_fit_in_memory_are_one_error(monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(models, "SmallCNN", no_memory)
    with pytest.raises(EsaclError, match="model small_cnn: cannot allocate its weights for input 1024x1024x1"):
        models.build_model("small_cnn", (1024, 1024, 1), 10)


# ------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("args,expected", [
    (["--input-shape", "0,28,1"], "--input-shape must be [H, W, C] with positive sizes, got [0, 28, 1]"),
    (["--input-shape", "28,-2,1"], "--input-shape must be [H, W, C] with positive sizes, got [28, -2, 1]"),
    (["--input-shape", "8,8,0"], "--input-shape must be [H, W, C] with positive sizes, got [8, 8, 0]"),
    (["--input-shape", "5000,28,1"], ("--input-shape 5000x28x1 is out of range: at most 1024 pixels a side and 16 "
                                      "channels")),
    (["--num-classes", "-3"], "--num-classes must be an integer from 2 to 100,000, got -3"),
    (["--num-classes", "0"], "--num-classes must be an integer from 2 to 100,000, got 0"),
])
def test_profiles_check_validates_sizes_before_building(capsys, monkeypatch, args, expected):
    def must_not_build(*a, **kw):
        raise AssertionError("built a model from unchecked sizes")
    monkeypatch.setattr("esacl_edge.learn.plan.build_model", must_not_build)
    assert main(["profiles", "check", "cpu", *args]) == 2
    assert one_error_line(capsys) == f"esacl-edge: error: {expected}"


def test_profile_that_is_not_utf8_is_one_line(tmp_path, small_stream, capsys):
    path = tmp_path / "latin1.yaml"
    text = to_yaml(load_profile("cpu").replace(description="cafe")).replace("cafe", "caf\u00e9")
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ProfileError, match=rf"{path}: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load_profile(path)
    run = tmp_path / "run"
    assert main(["learn", "--stream", str(small_stream.root), "--run", str(run), "--profile", str(path)]) == 2
    assert f"{path}: not UTF-8 text" in one_error_line(capsys)
    assert not run.exists()


# ------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("args,expected", [
    (["--seeds", "0"], "--seeds must be an integer >= 1 (seeds 0..N-1), got 0"),
    (["--methods", "finetune,esacl@1.5"], "--methods: 'esacl@1.5': sparsity after '@' must be in [0, 1), got 1.5"),
    (["--methods", "esacl", "--sparsity", "-0.1"], "--sparsity must be in [0, 1), got -0.1"),
    (["--passes", "0"], "--passes must be >= 1, got 0"),
    (["--buffer-bytes", "-1"], "--buffer-bytes must be >= 0, got -1"),
])
def test_bench_checks_everything_before_making_anything(tmp_path, capsys, args, expected):
    out = tmp_path / "bench"
    assert main(["bench", "--dataset", "digits", "--out", str(out), *args]) == 2
    assert one_error_line(capsys) == f"esacl-edge: error: {expected}"
    assert not out.exists()


def test_bench_api_refuses_no_seeds(small_stream, fast_profile, tmp_path):
    with pytest.raises(EsaclError, match="--seeds must be an integer >= 1"):
        bench(small_stream.root, ["finetune"], fast_profile, tmp_path / "out", seeds=0)
    with pytest.raises(StreamError, match="manifest not found"):
        bench(tmp_path / "nowhere", ["finetune"], fast_profile, tmp_path / "out", seeds=1)
    with pytest.raises(EsaclError, match="model resnet18_reduced: input 8x8 is too small"):
        bench(small_stream.root, ["finetune"], fast_profile, tmp_path / "out", seeds=1, model="resnet18_reduced")
    assert not (tmp_path / "out").exists()
    from esacl_edge.bench import plan_runs

    assert plan_runs(["esacl@0.5", "derpp"], 0.9, 1) == [("esacl@0.5", "esacl", 0.5), ("derpp", "derpp", 0.0)]


def test_a_failed_run_is_reported_with_one_error_prefix(small_stream, fast_profile, tmp_path):
    tight = fast_profile.replace(training_peak_bytes=1000)  # no batch fits: learn stops before training
    with pytest.raises(EsaclError) as err:
        bench(small_stream.root, ["finetune"], tight, tmp_path / "out", seeds=1, plots=False)
    assert str(err.value).startswith("run finetune seed 0 failed: ") and \
        "profile.yaml (profile cpu): budgets.training_peak_bytes" in str(err.value)
    assert "esacl-edge: error" not in str(err.value)


def _run(label, seed, acc):
    from esacl_edge.bench import METRICS
    return {"label": label, "seed": seed, **{k: 1.0 for k in METRICS}, "final_acc_class_il": acc}


def test_table_shows_no_std_for_a_single_seed():
    one = format_table(summarize([_run("esacl@0.9", 0, 0.5), _run("finetune", 0, 0.25)], ["esacl@0.9", "finetune"]))
    assert "±" not in one and "50.0" in one and "25.0" in one
    two = format_table(summarize([_run("esacl@0.9", 0, 0.5), _run("esacl@0.9", 1, 0.7)], ["esacl@0.9"]))
    assert "±14.1" in two
    assert len(one.splitlines()[2]) == len(two.splitlines()[2])  # the columns stay aligned


def test_bench_refuses_a_stream_made_with_other_options(tmp_path, capsys):
    out = tmp_path / "bench"
    make_stream("digits", out / "stream", tasks=2, per_class=5, test_per_class=3)  # by hand: no record
    argv = ["bench", "--dataset", "digits", "--tasks", "2", "--per-class", "5", "--test-per-class", "3",
            "--out", str(out)]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert f"{out / 'stream'}: holds a stream without stream-options.json" in err
    assert sorted(p.name for p in out.iterdir()) == ["stream"]


def test_bench_stream_is_reused_only_with_the_same_options(tmp_path, monkeypatch):
    from esacl_edge.bench import bench_stream

    stream = tmp_path / "bench" / "stream"
    opts = {"tasks": 2, "chunk_size": 10, "per_class": 5, "test_per_class": 3}
    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", x_train=images(16, 8, 8, 1), y_train=np.arange(16) % 4, x_test=images(8, 8, 8, 1),
             y_test=np.arange(8) % 4)
    assert bench_stream(stream, "npz:d.npz", **opts) == stream
    record = json.loads((tmp_path / "bench" / "stream-options.json").read_text())
    assert record == {"dataset": f"npz:{tmp_path / 'd.npz'}", "root": None, "seed": 0, **opts}
    before = (stream / "manifest.json").read_bytes()
    monkeypatch.chdir(tmp_path / "bench")
    assert bench_stream(stream, f"npz:{tmp_path / 'd.npz'}", **opts) == stream  # the same file, named otherwise
    assert (stream / "manifest.json").read_bytes() == before
    with pytest.raises(EsaclError, match=rf"{stream}: was made with other options \(--tasks: made with 2, "
                                         rf"asked 4; --per-class: made with 5, asked 4\); choose another --out"):
        bench_stream(stream, f"npz:{tmp_path / 'd.npz'}", **{**opts, "tasks": 4, "per_class": 4})


def test_bench_passes_root_to_make_stream(tmp_path, capsys):
    from esacl_edge.bench import bench_stream

    root = tmp_path / "cifar"
    x = images(20, 32, 32, 3)
    y = np.arange(20) % 10
    formats.write_cifar(root, x, y, x, y, [f"c{i}" for i in range(10)])
    m = read_manifest(bench_stream(tmp_path / "b" / "stream", "cifar10", root=root, tasks=2, chunk_size=10,
                                   per_class=None, test_per_class=None))
    assert m.name == "cifar10" and m.input_shape == (32, 32, 3)
    out = tmp_path / "b2"
    assert main(["bench", "--dataset", "cifar10", "--root", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "cifar-10-batches-py not found under" in one_error_line(capsys)
    assert not out.exists()


def test_make_stream_refuses_images_no_backbone_takes_and_says_how_it_split_the_classes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x_train=rng.integers(0, 255, (40, 1, 1, 1), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=rng.integers(0, 255, (8, 1, 1, 1), dtype=np.uint8), y_test=np.arange(8) % 4)
    assert main(["make-stream", "--dataset", f"npz:{tiny}", "--out", str(tmp_path / "s"), "--tasks", "2"]) == 2
    err = capsys.readouterr().err
    assert "images of 1x1 pixels are smaller than any backbone takes (at least 4x4); --image-size" in err
    assert not (tmp_path / "s").exists()
    assert main(["make-stream", "--dataset", "digits", "--out", str(tmp_path / "d"), "--tasks", "3",
                 "--per-class", "5", "--test-per-class", "2"]) == 0
    assert "3 tasks of 4, 3, 3 classes" in capsys.readouterr().out
    help_text = subprocess.run([sys.executable, "-m", "esacl_edge.cli", "make-stream", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "split evenly" not in help_text and "4, 3, 3" in help_text


def test_a_run_that_diverges_on_its_first_chunk_says_to_run_again_not_to_overwrite(tiny_stream, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["learn", "--stream", str(tiny_stream.root), "--run", str(run), "--passes", "3", "--quiet"]
    assert main([*common, "--lr", "1e30", "--method", "finetune"]) == 2
    err = one_error_line(capsys)
    assert "nothing was saved: fix the cause (a lower --lr, say), then run the command again" in err
    assert "--overwrite" not in err
    assert main([*common, "--method", "finetune"]) == 0  # without the cause, and no --overwrite
