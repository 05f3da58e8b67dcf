"""torchvision backbones, starting weights (--init, --download-weights), pretrain, frozen prefix and latent replay."""

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from esacl_edge import StreamingLearner
from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.learn.plan import plan
from esacl_edge.device.profiles import load_profile
from esacl_edge.errors import EsaclError
from esacl_edge.learn import latent
from esacl_edge.learn.cost import forward_flops, layer_forward_flops
from esacl_edge.learn.methods import get_method
from esacl_edge.models import build_model, prunable_parameters, split_model, stage_names
from esacl_edge.names import TORCHVISION_MODELS
from esacl_edge.runner import learn
from esacl_edge.weights import load_init

SHAPE = (32, 32, 3)
NORM = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}


def colour_data(n_per_class, classes, seed=0):
    """32x32 RGB images whose class sets the dominant colour and a bright quadrant: separable by any backbone."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in classes:
        x = rng.integers(0, 90, (n_per_class, *SHAPE)).astype(np.int16)
        x[..., c % 3] += 120
        qy, qx = (c // 3) % 2 * 16, (c // 6) % 2 * 16
        x[:, qy:qy + 16, qx:qx + 16, :] += 40
        xs.append(np.clip(x, 0, 255).astype(np.uint8))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def colour_npz(tmp_path_factory):
    """A data set in the make-stream npz format: 4 classes, 48 train and 12 test images each."""
    x_tr, y_tr = colour_data(48, range(4), seed=1)
    x_te, y_te = colour_data(12, range(4), seed=2)
    path = tmp_path_factory.mktemp("npz") / "colour.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return path


@pytest.fixture(scope="module")
def colour_stream(tmp_path_factory, colour_npz):
    """The 4 classes as 2 tasks of 2 classes, 3 chunks each."""
    out = tmp_path_factory.mktemp("stream") / "colour"
    make_stream(f"npz:{colour_npz}", out, tasks=2, chunk_size=32, test_per_class=12)
    return out


@pytest.fixture(scope="module")
def new_classes_stream(tmp_path_factory, colour_npz):
    """Classes 2 and 3 only, one per task (classes 0 and 1 are left for pretraining)."""
    out = tmp_path_factory.mktemp("stream") / "new"
    make_stream(f"npz:{colour_npz}", out, tasks=2, chunk_size=24, classes="2-3", test_per_class=12)
    return out


def fast():
    return load_profile("cpu").replace(passes_per_chunk=2, batch_size=16)


@pytest.mark.parametrize("name", ["resnet18_reduced", *(pytest.param(m, marks=pytest.mark.slow) for m in TORCHVISION_MODELS)])
def test_every_backbone_learns_a_tiny_colour_stream_and_exports_with_parity(tmp_path, colour_stream, name):
    # From scratch, BatchNorm-deep networks need some dozens of steps before eval mode works; EfficientNet-B0
    # with DER++'s logit matching also needs a lower rate (it is meant to start from pretrained weights).
    lr = 0.005 if name == "efficientnet_b0" else 0.02
    r = learn(colour_stream, profile=fast().replace(passes_per_chunk=6), run_dir=tmp_path / "run", method="esacl",
              sparsity=0.5, model=name, buffer_bytes=200_000, progress=False, lr=lr)
    assert r["complete"] and r["model"] == name
    assert r["final_acc_task_il"] >= 0.75 and r["final_acc_class_il"] > 0.3  # chance: 0.5 and 0.25
    assert 0.45 <= r["sparsity"] <= 0.55  # SDP prunes depthwise, squeeze-excitation and classifier layers alike
    code = main(["export", "--run", str(tmp_path / "run"), "--task", "1", str(tmp_path / "m.onnx")])
    assert code == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    # The check is relative to the logits above 1 (EfficientNet-B0's from scratch: 2e-4 on an AVX2 CPU).
    assert meta["max_abs_diff"] <= meta["parity_limit"] and 1e-4 <= meta["parity_limit"] < 1e-2
    assert meta["variant"] == "sparse"


@pytest.mark.slow
def test_torchvision_backbone_exports_dense_and_int8_and_structured_refuses_in_one_line(tmp_path, colour_stream, capsys):
    learn(colour_stream, profile=fast(), run_dir=tmp_path / "run", method="derpp", model="mobilenet_v3_small",
          progress=False, lr=0.02)  # a buffer: its samples calibrate the INT8 export
    code = main(["export", "--run", str(tmp_path / "run"), "--task", "0", "--variant", "structured",
                 str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "structured export supports small_cnn and resnet18_reduced only" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
    for variant in ("dense", "int8"):
        assert main(["export", "--run", str(tmp_path / "run"), "--task", "0", "--variant", variant,
                     str(tmp_path / f"{variant}.onnx")]) == 0
        meta = json.loads((tmp_path / f"{variant}.onnx.json").read_text())
        assert meta["max_abs_diff"] <= 1e-4 if variant == "dense" else meta["top1_agreement"] >= 0.9


def test_esacl_channels_learns_with_the_reduced_resnet_and_exports_it_narrower(tmp_path, colour_stream):
    r = learn(colour_stream, profile=fast().replace(passes_per_chunk=6), run_dir=tmp_path / "run",
              method="esacl-channels", sparsity=0.5, model="resnet18_reduced", buffer_bytes=200_000, progress=False,
              lr=0.02)
    assert r["complete"] and r["final_acc_task_il"] >= 0.75 and r["final_acc_class_il"] > 0.3
    assert 0.45 <= r["sparsity"] <= 0.55
    assert main(["export", "--run", str(tmp_path / "run"), "--task", "1", "--variant", "structured",
                 str(tmp_path / "s.onnx")]) == 0
    meta = json.loads((tmp_path / "s.onnx.json").read_text())
    assert meta["max_abs_diff"] <= meta["parity_limit"]
    before, after = meta["structure"]["before"], meta["structure"]["after"]
    assert len(before) == 8 and all(after[k] < before[k] for k in before)   # every block runs narrower


def test_torchvision_backbones_refuse_grey_and_tiny_inputs():
    with pytest.raises(EsaclError, match="3-channel"):
        build_model("resnet18", (32, 32, 1), 10)
    with pytest.raises(EsaclError, match="at least 32x32"):
        build_model("mobilenet_v3_small", (28, 28, 3), 10)


# ---------------------------------------------------------------------------------------------- --init
def test_torchvision_weights_file_loads_and_the_classifier_is_reinitialised(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(num_classes=1000)   # the layout of resnet18-f37072fd.pth
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", SHAPE, 7)
    before = model[1].fc.weight.detach().clone()
    report = load_init(model, path, "resnet18")
    assert report["classifier"] == "re-initialised"
    got = model[1].state_dict()
    for key, value in ref.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key
    assert torch.equal(model[1].fc.weight, before) and model[1].fc.weight.shape == (7, 512)
    # The backbone computes what torchvision's network does (with the new head in place of its fc).
    ref.fc = model[1].fc
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model[1].eval()(x), ref.eval()(x), atol=1e-5)


def test_init_round_trips_through_a_snapshot_and_keeps_a_same_shaped_classifier(tmp_path, new_classes_stream):
    learn(new_classes_stream, profile=fast(), run_dir=tmp_path / "a", method="esacl", sparsity=0.7,
          model="mobilenet_v3_small", progress=False, lr=0.02)
    snapshot = tmp_path / "a" / "snapshots" / "task_1.pt"
    second = StreamingLearner("mobilenet_v3_small", fast(), 4, SHAPE, input_dtype="uint8", normalization=NORM,
                              init=snapshot, seed=5)
    assert second.init["classifier"] == "loaded"
    from esacl_edge.deploy.snapshot import load_snapshot

    model, _ = load_snapshot(tmp_path / "a", 1)
    want = model.state_dict()
    for key, value in second.model.state_dict().items():
        if key.startswith("1."):
            assert torch.equal(value, want[key]), key
    # Pruned weights come back with their zeros.
    assert second.sparsity() > 0.6


def _truncated_weights():
    buf = io.BytesIO()
    torch.save(build_model("resnet18", SHAPE, 4)[1].state_dict(), buf)
    return buf.getvalue()[: len(buf.getvalue()) // 3]


@pytest.mark.parametrize("content, message", [
    (b"not a torch file at all", "not a weights file esacl-edge can read: truncated or corrupt"),
    (_truncated_weights, "not a weights file esacl-edge can read: truncated or corrupt"),
    (None, "does not fit the resnet18 backbone: missing keys conv1.weight"),
])
def test_a_bad_weights_file_is_one_clear_error_and_nothing_is_written(tmp_path, colour_stream, capsys,
                                                                      content, message):
    path = tmp_path / "weights.pth"
    if content is None:  # a real state dict of another network
        torch.save(build_model("mobilenet_v3_small", SHAPE, 4)[1].state_dict(), path)
    else:
        path.write_bytes(content() if callable(content) else content)
    code = main(["learn", "--stream", str(colour_stream), "--run", str(tmp_path / "run"), "--model", "resnet18",
                 "--init", str(path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and message in err
    assert not (tmp_path / "run").exists()


def test_weights_that_need_pickle_are_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a pickled module, not a state dict
    with pytest.raises(EsaclError, match="holds Python objects beyond tensors, which loading would have to "
                                         r"unpickle \(refused\); save a dict of tensors") as caught:
        load_init(build_model("small_cnn", (8, 8, 1), 4), path, "small_cnn")
    assert "\x1b" not in str(caught.value)  # no terminal escapes from torch's message


def test_a_mis_shaped_layer_names_the_key(tmp_path):
    state = build_model("resnet18_reduced", SHAPE, 4)[1].state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(EsaclError, match=r"shape mismatches layer1\.0\.conv1\.weight \(3, 3, 3, 3\)"):
        load_init(build_model("resnet18_reduced", SHAPE, 4), path, "resnet18_reduced")


@pytest.mark.slow
def test_download_weights_is_opt_in_and_uses_torchvision_s_file(tmp_path, monkeypatch, colour_stream):
    import torch.hub

    fetched = []

    def fake_fetch(url, progress=True, check_hash=False, weights_only=False):
        fetched.append(url)
        target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_model("mobilenet_v3_small", SHAPE, 1000)[1].state_dict(), target)
        return {}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_fetch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert main(["learn", "--stream", str(colour_stream), "--run", str(tmp_path / "plain"), "--model",
                 "mobilenet_v3_small", "--method", "finetune", "--quiet"]) == 0
    assert fetched == []  # nothing is fetched unless asked
    assert main(["learn", "--stream", str(colour_stream), "--run", str(tmp_path / "run"), "--model",
                 "mobilenet_v3_small", "--method", "finetune", "--download-weights", "--quiet"]) == 0
    assert fetched == ["https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth"]
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["init"]["file"].endswith("mobilenet_v3_small-047dcff4.pth") and r["init"]["classifier"] == "re-initialised"
    assert main(["learn", "--stream", str(colour_stream), "--run", str(tmp_path / "r2"), "--model",
                 "resnet18_reduced", "--download-weights", "--quiet"]) == 2


# ---------------------------------------------------------------------------------------------- pretrain
def test_pretrain_writes_weights_that_learn_starts_from(tmp_path, colour_npz, new_classes_stream, capsys):
    out = tmp_path / "pre.pth"
    code = main(["pretrain", "--data", str(colour_npz), "--model", "resnet18_reduced", "--classes", "0-1",
                 "--epochs", "3", "--lr", "0.05", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.with_name("pre.pth.json").read_text())
    assert report["classes"] == [0, 1] and report["heldout"] == "test split" and report["heldout_samples"] == 24
    assert report["heldout_acc"] >= 0.9  # two separable classes
    state = torch.load(out, weights_only=True)
    assert state["classifier.weight"].shape == (2, 160)  # one output per pretrained class
    code = main(["learn", "--stream", str(new_classes_stream), "--run", str(tmp_path / "run"), "--model",
                 "resnet18_reduced", "--init", str(out), "--method", "derpp", "--quiet"])
    assert code == 0
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["init"] == {"file": str(out), "tensors": len(state) - 2, "classifier": "re-initialised"}
    assert r["settings"]["init"] == str(out.resolve())


def test_pretrain_is_seeded_by_its_own_generators(tmp_path, colour_npz):
    from esacl_edge.pretrain import pretrain

    def weights(name, seed):
        pretrain(colour_npz, "small_cnn", tmp_path / name, classes=[0, 1], epochs=1, seed=seed, progress=False)
        return torch.load(tmp_path / name, weights_only=True)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = weights("a.pth", 0), weights("b.pth", 0), weights("c.pth", 1)
    assert torch.equal(torch.get_rng_state(), before)  # nothing global is drawn from or reseeded
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same seed, the same weights
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    report = json.loads((tmp_path / "a.pth.json").read_text())
    assert report["train_gflops"] > 0 and len(report["history"]) == 1


def test_pretrain_refuses_classes_it_does_not_have(tmp_path, colour_npz):
    with pytest.raises(EsaclError, match="--classes must name classes in 0..3"):
        main_raise(["pretrain", "--data", str(colour_npz), "--model", "small_cnn", "--classes", "3-9",
                    "--out", str(tmp_path / "w.pth")])


def main_raise(argv):
    from esacl_edge.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------- frozen prefix
def test_split_model_runs_the_same_function_for_every_stage():
    for name in ("resnet18_reduced", "mobilenet_v3_small"):
        model = build_model(name, SHAPE, 4).eval()
        x = torch.rand(2, 3, 32, 32) * 255
        for stage in stage_names(model[1])[:-1]:
            prefix, suffix = split_model(model, stage)
            assert torch.allclose(suffix(prefix(x)), model(x), atol=1e-5), (name, stage)


def test_bad_freeze_points_are_clear_errors():
    with pytest.raises(EsaclError, match="not one of its stages; choose one of conv1, bn1, relu, layer1.0"):
        build_model("resnet18_reduced", SHAPE, 4, freeze_until="block9")
    with pytest.raises(EsaclError, match="leaves no layer to train"):
        build_model("resnet18_reduced", SHAPE, 4, freeze_until="classifier")
    with pytest.raises(EsaclError, match="give --freeze-until LAYER too"):
        StreamingLearner("resnet18_reduced", "cpu", 4, SHAPE, latent_replay="fp16")


@pytest.mark.parametrize("form", (None, "fp16", "uint8"))
def test_a_frozen_prefix_neither_trains_nor_prunes_nor_moves_its_norm_statistics(form):
    x, y = colour_data(24, (0, 1), seed=3)
    learner = StreamingLearner("resnet18_reduced", fast(), 4, SHAPE, input_dtype="uint8", normalization=NORM,
                               sparsity=0.8, buffer_bytes=300_000, freeze_until="layer2", latent_replay=form)
    prefix_names = [n for n, _ in learner.frozen.named_parameters()]
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    for c in range(4):
        learner.observe(x[c::4], y[c::4], task=c // 2, n_chunks=2, classes=[2 * (c // 2), 2 * (c // 2) + 1])
    after = learner.model.state_dict()
    frozen_keys = [k for k in before if k.startswith(("1.conv1", "1.bn1", "1.layer1", "1.layer2"))]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # incl. BN running stats
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("1.layer4"))
    assert prefix_names and not any(n.startswith("1.layer2") for n in prunable_parameters(learner.model))
    trainable = prunable_parameters(learner.model)
    zeros = sum(int((p == 0).sum()) for p in trainable.values()) / sum(p.numel() for p in trainable.values())
    assert zeros == pytest.approx(0.8, abs=0.01)  # the target sparsity is over the trainable part
    expected = {None: ("uint8", SHAPE), "fp16": ("float16", (40, 16, 16)), "uint8": ("uint8", (40, 16, 16))}[form]
    assert (str(learner.buffer.x.dtype), learner.buffer.x.shape[1:]) == expected
    assert learner.buffer.size > 0 and learner.calibration  # INT8 calibration images even from a latent buffer
    assert learner.calibration[1].shape[1:] == SHAPE


def test_latent_buffer_budget_holds_more_samples_per_byte():
    method = get_method("esacl")
    prof = load_profile("cpu")
    images = plan(prof, "resnet18_reduced", SHAPE, 100, method, "uint8", 0.9, 1_000_000)
    fp16 = plan(prof, "resnet18_reduced", SHAPE, 100, method, "uint8", 0.9, 1_000_000, "layer3", "fp16")
    uint8 = plan(prof, "resnet18_reduced", SHAPE, 100, method, "uint8", 0.9, 1_000_000, "layer3", "uint8")
    # layer3's output is 80x8x8 = 5120 values: 10240 B as fp16, 5120 + 8 B as uint8; an image is 3072 B.
    per = 2 + 2 + 4 + 4 * 100
    assert images.buffer_capacity == 1_000_000 // (3072 + per)
    assert fp16.buffer_capacity == 1_000_000 // (10240 + per)
    assert uint8.buffer_capacity == 1_000_000 // (5120 + 8 + per)
    assert fp16.memory_terms["gradients"] == 4 * fp16.trainable_params < images.memory_terms["gradients"]
    assert fp16.memory_terms["activations"] < images.memory_terms["activations"]


def test_uint8_latents_round_trip_within_half_a_step():
    z = torch.randn(5, 8, 4, 4) * torch.arange(1, 6).view(5, 1, 1, 1)
    q, params = latent.encode(z, "uint8")
    back = latent.decode(torch.from_numpy(q), torch.from_numpy(params), "uint8")
    step = torch.from_numpy(params[:, 1]).view(5, 1, 1, 1)
    assert q.dtype == np.uint8 and torch.all((back - z).abs() <= step / 2 + 1e-6)
    q16, p16 = latent.encode(z, "fp16")
    assert q16.dtype == np.float16 and p16.shape == (5, 0)


def test_frozen_flops_are_the_prefix_forward_and_the_rest_stay_per_layer():
    model = build_model("resnet18_reduced", SHAPE, 4)
    dense = sum(layer_forward_flops(model, SHAPE).values())
    frozen = build_model("resnet18_reduced", SHAPE, 4, freeze_until="layer3")
    prefix, _ = split_model(frozen, "layer3")
    trainable = layer_forward_flops(frozen, SHAPE)
    assert not any(n.startswith(("1.layer1", "1.layer3")) for n in trainable)
    assert forward_flops(prefix, SHAPE) + sum(trainable.values()) == dense
    learner = StreamingLearner("resnet18_reduced", fast(), 4, SHAPE, input_dtype="uint8", normalization=NORM,
                               freeze_until="layer3", latent_replay="fp16")
    learner.train_inputs(np.zeros((10, *SHAPE), np.uint8))
    assert learner.cost.flops == 10 * forward_flops(prefix, SHAPE)  # forward only, once per sample


def test_a_latent_replay_state_round_trip_continues_identically(tmp_path):
    x, y = colour_data(24, (0, 1, 2, 3), seed=4)

    def fresh():
        return StreamingLearner("resnet18_reduced", fast(), 4, SHAPE, input_dtype="uint8", normalization=NORM,
                                sparsity=0.5, buffer_bytes=100_000, freeze_until="layer3", latent_replay="uint8")

    a = fresh()
    chunks = [(x[i::4], y[i::4]) for i in range(4)]
    for cx, cy in chunks[:3]:
        a.observe(cx, cy, task=0)
    a.save_state(tmp_path / "state")
    b = fresh()
    assert b.load_state(tmp_path / "state")
    for learner in (a, b):
        learner.observe(*chunks[3], task=0)
        learner.end_task()
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.buffer.size == b.buffer.size > 0
    for name in ("x", "qparams", "logits"):
        assert np.array_equal(getattr(a.buffer, name)[: a.buffer.size], getattr(b.buffer, name)[: b.buffer.size])


def test_a_run_records_its_start_and_a_resume_must_repeat_it(tmp_path, colour_stream):
    kw = dict(profile=fast(), method="esacl", sparsity=0.5, model="resnet18_reduced", progress=False,
              freeze_until="layer3", latent_replay="uint8", buffer_bytes=100_000)
    r = learn(colour_stream, run_dir=tmp_path / "run", **kw)
    assert r["latent_replay"] == "uint8" and r["freeze_until"] == "layer3"
    assert r["buffer_sample_bytes"] == 80 * 8 * 8 + 8 + 2 + 2 + 4 + 4 * 4  # layer3: 80x8x8 uint8 latents
    assert r["buffer_capacity"] == 100_000 // r["buffer_sample_bytes"]
    with pytest.raises(EsaclError, match="latent_replay 'uint8' -> 'fp16'"):
        learn(colour_stream, run_dir=tmp_path / "run", **{**kw, "latent_replay": "fp16"})


def test_make_stream_keeps_a_class_subset_with_its_labels(tmp_path, colour_npz):
    m = make_stream(f"npz:{colour_npz}", tmp_path / "s", tasks=2, classes="1,3", chunk_size=100)
    assert m.num_classes == 4 and [list(t.classes) for t in m.tasks] == [[1], [3]]
    with pytest.raises(EsaclError, match="--classes must be class numbers"):
        make_stream(f"npz:{colour_npz}", tmp_path / "t", classes="a-b")


def test_profiles_check_derives_settings_for_a_torchvision_backbone_behind_a_frozen_prefix(capsys):
    code = main(["profiles", "check", "cpu", "--model", "mobilenet_v3_small", "--input-shape", "32,32,3",
                 "--num-classes", "100", "--freeze-until", "features.8", "--latent-replay", "uint8"])
    out = capsys.readouterr().out
    assert code == 0 and "derived for mobilenet_v3_small on 32x32x3" in out
    assert "frozen prefix     up to features.8: 1,429,836 parameters train; buffer of uint8 latents 48x2x2" in out
