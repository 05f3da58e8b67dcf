"""Export and deployment: the opset asked for is the file's, the run's own profile is the default,
diverged weights and mismatched streams are refused, the file runs without its sidecar, and
``eval`` measures any snapshot on any stream."""

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.deploy.parity import parity
from esacl_edge.deploy.snapshot import load_snapshot
from esacl_edge.device.profiles import load_profile, to_yaml
from esacl_edge.errors import ExportError
from esacl_edge.runner import learn

from tests.support import RUNNER, run_without_torch

PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_stream):
    """A run of the tiny stream learned with a custom YAML profile: opset 17, CUDA provider first."""
    root = tmp_path_factory.mktemp("exportfix")
    profile = root / "mydev.yaml"
    profile.write_text(to_yaml(load_profile("cpu").replace(name="mydev", batch_size=16, passes_per_chunk=1,
                                                           buffer_bytes=4480, opset=17, providers=tuple(PROVIDERS))))
    learn(tiny_stream.root, profile=profile, run_dir=root / "run", sparsity=0.8, progress=False)
    return {"root": root, "run": root / "run", "stream": tiny_stream.root}


def _opset(path):
    return {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]


def _export(case, out, *args):
    return main(["export", "--task", "4", str(out), "--run", str(case["run"]), *map(str, args)])


def _one_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("esacl-edge: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("variant", ["sparse", "dense"])
@pytest.mark.parametrize("opset", range(13, 19))
def test_the_file_has_the_opset_asked_for(case, tmp_path, capfd, opset, variant):
    out = tmp_path / "m.onnx"
    assert _export(case, out, "--opset", opset, "--variant", variant) == 0
    captured = capfd.readouterr()
    assert captured.err == ""  # no exporter or version-converter traceback
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert _opset(out) == side["opset"] == opset and f"opset {opset})" in captured.out
    assert side["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("variant", ["structured", "int8"])
def test_structured_and_int8_honour_the_jetson_nano_opset(case, tmp_path, capfd, variant):
    out = tmp_path / "m.onnx"
    assert _export(case, out, "--profile", "jetson_nano", "--variant", variant) == 0
    err = capfd.readouterr().err  # no exporter traceback; the structured variant of this run removes nothing
    assert all(line.startswith("esacl-edge: warning: ") and "removed no unit or channel" in line
               for line in err.splitlines()) and (variant == "structured") == bool(err)
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert _opset(out) == side["opset"] == load_profile("jetson_nano").opset == 13
    assert side["providers"] == list(load_profile("jetson_nano").providers)
    assert {o.domain for o in onnx.load(str(out)).opset_import} <= {"", "com.microsoft"}


def test_an_opset_the_variant_cannot_have_is_one_error(case, tmp_path, capsys):
    for args in (("--opset", 30), ("--opset", 12, "--variant", "int8")):
        assert _export(case, tmp_path / "m.onnx", *args) == 2
        assert "choose an opset from" in _one_error(capsys)
    assert not list(tmp_path.iterdir())


def test_export_defaults_to_the_profile_the_run_learned_with(case, tmp_path):
    assert load_profile(case["run"] / "profile.yaml").providers == tuple(PROVIDERS)
    assert _export(case, tmp_path / "m.onnx") == 0
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["opset"] == _opset(tmp_path / "m.onnx") == 17 and side["providers"] == PROVIDERS
    assert _export(case, tmp_path / "c.onnx", "--profile", "cpu") == 0  # --profile still wins
    assert json.loads((tmp_path / "c.onnx.json").read_text())["providers"] == ["CPUExecutionProvider"]


def test_a_run_without_its_profile_copy_falls_back_to_the_named_profile(case, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(case["run"], run)
    (run / "profile.yaml").unlink()
    meta = json.loads((run / "snapshots" / "task_4.json").read_text())
    (run / "snapshots" / "task_4.json").write_text(json.dumps({**meta, "profile": "jetson_nano"}))
    assert main(["export", "--task", "4", str(tmp_path / "m.onnx"), "--run", str(run)]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["opset"] == _opset(tmp_path / "m.onnx") == 13


def _diverged_run(case, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(case["run"], run)
    pt = run / "snapshots" / "task_4.pt"
    tensors = torch.load(pt, weights_only=True)
    torch.save({k: torch.full_like(t, float("nan")) if t.is_floating_point() else t for k, t in tensors.items()}, pt)
    _rerecord(run, 4)  # as if the learner had written these weights
    return run


def _rerecord(run, task):
    """Record the snapshot file's current SHA-256 in its task_N.json."""
    import hashlib

    meta_path = run / "snapshots" / f"task_{task}.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256((run / "snapshots" / f"task_{task}.pt").read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("opset", [17, 18])
def test_nan_weights_fail_the_parity_check(case, tmp_path, capsys, opset):
    run = _diverged_run(case, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "--task", "4", str(out / "m.onnx"), "--run", str(run), "--opset", str(opset)]) == 2
    err = _one_error(capsys)
    assert err.startswith(f"esacl-edge: error: {out / 'm.onnx'}: ") and "NaN" in err
    assert not list(out.iterdir())  # nothing left behind


def test_parity_of_non_finite_outputs_is_an_error(case, tmp_path):
    from esacl_edge.deploy.parity import max_abs_diff

    model, meta = load_snapshot(case["run"], 0)
    main(["export", "--task", "0", str(tmp_path / "m.onnx"), "--run", str(case["run"])])
    x = np.zeros((2, *meta["spec"].input_shape), np.float32)
    assert parity(tmp_path / "m.onnx", model, x) <= 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("inf"))
    with pytest.raises(ExportError, match="NaN or infinite"):
        parity(tmp_path / "m.onnx", model, x)
    with pytest.raises(ExportError, match="onnxruntime outputs NaN"):
        max_abs_diff(np.array([[np.nan, 0.0]]), np.zeros((1, 2)))


def test_parity_is_judged_relative_to_the_logits_once_they_exceed_one(case, tmp_path):
    """float32 rounding grows with the values computed: logits in the thousands differ between onnxruntime
    and PyTorch by more than 1e-4 with a correct export, which passes; another model still fails by far."""
    from esacl_edge.deploy.export import export_onnx
    from esacl_edge.deploy.parity import parity_limit
    from esacl_edge.models import classifier_name

    assert parity_limit(0.5) == parity_limit(1.0) == 1e-4 and parity_limit(300.0) == pytest.approx(0.03)
    model, meta = load_snapshot(case["run"], 4)
    with torch.no_grad():
        for p in model.get_submodule(classifier_name(model)).parameters():
            p.mul_(1e4)
    report = export_onnx(model, meta["spec"], tmp_path / "big.onnx")
    assert 1e-4 < report["max_abs_diff"] <= report["parity_limit"]
    other, _ = load_snapshot(case["run"], 0)
    x = np.random.default_rng(0).uniform(0, 1, (4, *meta["spec"].input_shape)).astype(np.float32)
    assert parity(tmp_path / "big.onnx", other, x) > 100 * report["parity_limit"]


@pytest.fixture(scope="module")
def other_streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("others")
    return {"fewer tasks": make_stream("digits", root / "two", tasks=2, chunk_size=24, per_class=5,
                                       test_per_class=3).root,
            "input shape": make_stream("digits", root / "big", tasks=5, chunk_size=24, per_class=5,
                                       test_per_class=3, image_size="16").root}


@pytest.mark.parametrize("command", ["export", "eval"])
@pytest.mark.parametrize("mismatch,words", [("fewer tasks", "has 2 tasks"), ("input shape", "(16, 16, 1)")])
def test_a_stream_that_does_not_fit_is_one_error(case, other_streams, tmp_path, capsys, command, mismatch, words):
    stream = other_streams[mismatch]
    args = ["export", "--task", "4", str(tmp_path / "m.onnx")] if command == "export" else ["eval"]
    assert main([*args, "--run", str(case["run"]), "--stream", str(stream)]) == 2
    err = _one_error(capsys)
    assert err.startswith(f"esacl-edge: error: {stream}: ") and words in err
    assert not list(tmp_path.iterdir())


def test_export_into_an_existing_folder_is_one_error_without_temp_names(case, tmp_path, capsys):
    target = tmp_path / "adir"
    target.mkdir()
    assert main(["export", "--task", "0", str(target), "--run", str(case["run"])]) == 2
    err = _one_error(capsys)
    assert err.startswith(f"esacl-edge: error: {target}: is a folder") and ".final" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["adir"] and not list(target.iterdir())


def test_missing_run_and_task_are_one_error(case, tmp_path, capsys):
    for run, words in ((tmp_path / "nope", "run directory not found"), (case["run"], "no snapshot for task 9")):
        assert main(["export", "--task", "9", str(tmp_path / "m.onnx"), "--run", str(run)]) == 2
        assert words in _one_error(capsys)
        assert main(["eval", "--task", "9", "--run", str(run)]) == 2
        assert words in _one_error(capsys)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ the device runner

@pytest.mark.parametrize("option,value", [("--batch", 0), ("--batch", -5), ("--repeat", 0), ("--random", 0)])
def test_device_runner_refuses_counts_below_one(case, tmp_path, option, value):
    main(["export", "--task", "0", str(tmp_path / "m.onnx"), "--run", str(case["run"])])
    args = ["--random", "4"] if option != "--random" else []
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", *args, option, value)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"argument {option}: must be an integer >= 1" in done.stderr


def test_the_model_file_runs_without_its_sidecar(case, tiny_stream, tmp_path):
    from esacl_edge.data.stream import load_test

    assert main(["export", "--task", "4", str(tmp_path / "m.onnx"), "--run", str(case["run"])]) == 0
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    (tmp_path / "m.onnx.json").unlink()
    parts = [load_test(tiny_stream, t) for t in range(5)]
    np.savez(tmp_path / "d.npz", x=np.concatenate([x for x, _ in parts]), y=np.concatenate([y for _, y in parts]))
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--npz", tmp_path / "d.npz", "--json", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == pytest.approx(side["accuracy_onnx"])
    spec = importlib.util.spec_from_file_location("run_onnx", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    info = runner.load_info(tmp_path / "m.onnx")
    assert info["providers"] == PROVIDERS and info["classes"] == side["classes"] == list(range(10))
    assert info["input"] == side["input"] and info["class_names"] == side["class_names"]


def test_device_runner_warns_about_labels_the_model_never_learned(case, tiny_stream, tmp_path):
    from PIL import Image

    from esacl_edge.data.stream import load_test

    assert main(["export", "--task", "1", str(tmp_path / "m.onnx"), "--run", str(case["run"])]) == 0
    learned = json.loads((tmp_path / "m.onnx.json").read_text())["classes"]
    (x0, y0), (x2, y2) = load_test(tiny_stream, 0), load_test(tiny_stream, 2)
    np.savez(tmp_path / "known.npz", x=x0, y=y0)
    np.savez(tmp_path / "all.npz", x=np.concatenate([x0, x2]), y=np.concatenate([y0, y2]))
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--npz", tmp_path / "known.npz")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    unknown = sorted(set(y2.tolist()) - set(learned))
    assert unknown
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--npz", tmp_path / "all.npz")
    assert done.returncode == 0 and done.stderr.count("\n") == 1
    assert f"warning: labels include classes {unknown} that the model never learned" in done.stderr
    folder = tmp_path / "imgs" / str(unknown[0])
    folder.mkdir(parents=True)
    Image.fromarray(x2[0, :, :, 0]).save(folder / "a.png")
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--images", tmp_path / "imgs")
    assert done.returncode == 0 and f"classes [{unknown[0]}] that the model never learned" in done.stderr


# ------------------------------------------------------------------ the output file

def test_an_output_that_is_not_a_regular_file_is_refused(case, tmp_path, capsys):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    assert _export(case, fifo) == 2
    assert f"{fifo}: exists and is not a regular file" in _one_error(capsys)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "pipe.onnx.json").exists()
    if Path("/dev/full").exists():
        assert _export(case, "/dev/full") == 2
        assert "/dev/full: exists and is not a regular file" in _one_error(capsys)
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and not Path("/dev/full.json").exists()
    side = tmp_path / "m.onnx.json"
    os.mkfifo(side)  # the sidecar's name too
    assert _export(case, tmp_path / "m.onnx") == 2
    assert f"{side}: exists and is not a regular file" in _one_error(capsys)
    assert not (tmp_path / "m.onnx").exists()


def _export_process(case, out, env=None):
    return subprocess.Popen([sys.executable, "-m", "esacl_edge.cli", "export", "--task", "4", str(out), "--run",
                             str(case["run"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_exports_to_one_file_share_no_temporary_names(case, tmp_path):
    out = tmp_path / "same.onnx"
    procs = [_export_process(case, out) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.onnx", "same.onnx.json"]
    side = json.loads((tmp_path / "same.onnx.json").read_text())
    assert side["model_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert onnx.load(str(out)).graph.output[0].name == "logits"


def test_a_killed_export_leaves_nothing_in_the_target_folder(case, tmp_path):
    system_tmp, target = tmp_path / "tmp", tmp_path / "out"
    system_tmp.mkdir()
    target.mkdir()
    proc = _export_process(case, target / "m.onnx", env={**os.environ, "TMPDIR": str(system_tmp)})
    deadline = time.monotonic() + 120
    while not any(system_tmp.glob("esacl-export-*/*")):  # killed while it writes its intermediate files
        assert proc.poll() is None and time.monotonic() < deadline, "the export wrote no intermediate file"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert list(target.iterdir()) == []


def test_the_runner_ignores_a_sidecar_of_another_model(case, tmp_path):
    assert main(["export", "--task", "1", str(tmp_path / "m.onnx"), "--run", str(case["run"])]) == 0
    assert main(["export", "--task", "4", str(tmp_path / "t4.onnx"), "--run", str(case["run"])]) == 0
    shutil.copy(tmp_path / "t4.onnx", tmp_path / "m.onnx")  # a crash after the model, before its sidecar
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--random", 4, "--json", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    assert "m.onnx.json: describes another model file (its SHA-256 differs from m.onnx's); ignored" in done.stderr
    info = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location("run_onnx", RUNNER))
    spec.loader.exec_module(info)
    assert info.load_info(tmp_path / "m.onnx")["classes"] == list(range(10))  # task 4's own metadata


def test_structured_reports_what_it_removed_and_warns_when_nothing(case, tiny_stream, tmp_path, capsys):
    assert _export(case, tmp_path / "s.onnx", "--variant", "structured") == 0
    out = capsys.readouterr().out
    side = json.loads((tmp_path / "s.onnx.json").read_text())
    want = {k: side["structure"]["before"][k] - side["structure"]["after"][k] for k in side["structure"]["before"]}
    assert side["removed"] == want
    assert "structured: removed " in out
    dense_run = tmp_path / "dense"
    learn(tiny_stream.root, profile=load_profile("cpu").replace(passes_per_chunk=1, batch_size=16), run_dir=dense_run,
          method="finetune", progress=False)
    assert main(["export", "--task", "4", str(tmp_path / "d.onnx"), "--run", str(dense_run), "--variant",
                 "structured"]) == 0
    captured = capsys.readouterr()
    assert "structured: removed nothing" in captured.out
    assert "removed no unit or channel" in captured.err and captured.err.count("\n") == 1
    assert not any(json.loads((tmp_path / "d.onnx.json").read_text())["removed"].values())


def test_runner_refuses_an_empty_npz_and_unknown_providers(case, tmp_path):
    assert main(["export", "--task", "4", str(tmp_path / "m.onnx"), "--run", str(case["run"])]) == 0
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 8, 8, 1), np.float32), y=np.zeros(0, np.int64))
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--npz", tmp_path / "empty.npz")
    assert done.returncode == 2 and done.stderr.strip() == f"run_onnx: error: {tmp_path / 'empty.npz'}: x holds no samples"
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--random", 2, "--providers", "Foo")
    assert done.returncode == 2 and "--providers: unknown execution provider Foo" in done.stderr
    done = run_without_torch(tmp_path, tmp_path / "m.onnx", "--random", 2, "--providers",
                             "MIGraphXExecutionProvider,CPUExecutionProvider")
    assert done.returncode == 0 and "lacks MIGraphXExecutionProvider; skipped" in done.stderr


def test_the_runner_is_an_installed_command_without_torch(case, tmp_path):
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts") if e.name == "esacl-edge-run"] == \
        ["esacl_edge.run_onnx:main"]
    assert main(["export", "--task", "4", str(tmp_path / "m.onnx"), "--run", str(case["run"])]) == 0
    fake = tmp_path / "notorch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no torch on this device')\n")
    done = subprocess.run([sys.executable, "-m", "esacl_edge.run_onnx", str(tmp_path / "m.onnx"), "--random", "3"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "latency per batch" in done.stdout, done.stderr


# ------------------------------------------------------------------ snapshot integrity

def _flip_bytes(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("recorded", ["task json", "saved state"])
def test_a_corrupted_snapshot_is_refused_by_export_and_eval(case, tmp_path, capsys, recorded):
    run = tmp_path / "run"
    shutil.copytree(case["run"], run)
    pt = run / "snapshots" / "task_4.pt"
    if recorded == "saved state":  # a run whose task_N.json records no hash: the learner state's is checked
        meta = json.loads((run / "snapshots" / "task_4.json").read_text())
        meta.pop("sha256", None)
        (run / "snapshots" / "task_4.json").write_text(json.dumps(meta))
    _flip_bytes(pt)
    out = tmp_path / "m.onnx"
    assert main(["export", "--task", "4", str(out), "--run", str(run)]) == 2
    err = _one_error(capsys)
    assert f"{pt}: corrupted or replaced: its SHA-256 differs" in err
    assert ("task_4.json" if recorded == "task json" else "the run's saved state") in err
    assert not out.exists() and not (tmp_path / "m.onnx.json").exists()
    assert main(["eval", "--run", str(run), "--task", "4"]) == 2
    assert f"{pt}: corrupted or replaced" in _one_error(capsys)
    assert main(["eval", "--run", str(run), "--task", "3"]) == 0  # the other snapshots are intact


def test_corrupted_or_deleted_calibration_samples_are_named(case, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(case["run"], run)
    calib = run / "snapshots" / "task_4_calib.npz"
    _flip_bytes(calib, 8)
    assert _export({"run": run}, tmp_path / "m.onnx", "--variant", "int8") == 2
    assert f"{calib}: corrupted or replaced" in _one_error(capsys)
    calib.unlink()
    assert _export({"run": run}, tmp_path / "m.onnx", "--variant", "int8") == 2
    err = _one_error(capsys)
    assert f"{calib}: missing; task 4's snapshot was written with these calibration samples" in err
    assert "no replay buffer" not in err


@pytest.mark.parametrize("edit,words", [(lambda spec: {**spec, "colour": 1}, "unknown keys colour"),
                                        (lambda spec: {k: v for k, v in spec.items() if k != "model"},
                                         "missing keys model"),
                                        (lambda spec: [1, 2], "must be a mapping")])
def test_a_snapshot_spec_that_describes_no_model_is_one_error(case, tmp_path, capsys, edit, words):
    run = tmp_path / "run"
    shutil.copytree(case["run"], run)
    meta_path = run / "snapshots" / "task_4.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "spec": edit(meta["spec"])}))
    assert main(["eval", "--run", str(run)]) == 2
    err = _one_error(capsys)
    assert f"{meta_path}: field 'spec'" in err and words in err


def test_eval_and_export_warn_about_classes_the_snapshot_never_learned(case, tmp_path, capsys):
    reversed_order = make_stream("digits", tmp_path / "rev", tasks=5, chunk_size=24, per_class=5, test_per_class=3,
                                 class_order=list(range(9, -1, -1))).root
    assert main(["eval", "--run", str(case["run"]), "--task", "1", "--stream", str(reversed_order),
                 "--json", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert "holds 4 classes that the snapshot of task 1 never learned (6, 7, 8, 9)" in err and err.count("\n") == 1
    assert json.loads((tmp_path / "e.json").read_text())["unlearned_classes"] == [6, 7, 8, 9]
    assert main(["export", "--task", "1", str(tmp_path / "m.onnx"), "--run", str(case["run"]), "--stream",
                 str(reversed_order)]) == 0
    assert "snapshot of task 1 never learned (6, 7, 8, 9)" in capsys.readouterr().err
    assert main(["eval", "--run", str(case["run"]), "--task", "1"]) == 0  # the run's own stream: all learned
    assert "never learned" not in capsys.readouterr().err


# ------------------------------------------------------------------ eval

def test_eval_of_the_last_snapshot_matches_what_learn_measured(case, tmp_path, capsys):
    assert main(["eval", "--run", str(case["run"]), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    results = json.loads((case["run"] / "results.json").read_text())
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["task"] == 4 and [r["task"] for r in report["tasks"]] == list(range(5))
    assert [r["class_il"] for r in report["tasks"]] == pytest.approx(results["acc_matrix_class_il"][-1])
    assert [r["task_il"] for r in report["tasks"]] == pytest.approx(results["acc_matrix_task_il"][-1])
    assert report["mean_class_il"] == pytest.approx(results["final_acc_class_il"])
    assert report["mean_task_il"] == pytest.approx(results["final_acc_task_il"])
    assert all(f"T{t} " in out for t in range(5)) and f"{100 * report['mean_class_il']:.2f}" in out
    assert "(mean over tasks; each task weighs the same)" in out  # export's accuracy is pooled, and says so


def test_export_warns_when_the_file_exceeds_the_profiles_model_budget(case, tmp_path, capsys):
    profile = tmp_path / "small.yaml"
    profile.write_text(to_yaml(load_profile("cpu").replace(name="small", model_bytes=20_000, target_sparsity=0.8)))
    assert _export(case, tmp_path / "m.onnx", "--profile", profile) == 0
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    err = capsys.readouterr().err
    assert f"the sparse file takes {side['bytes']:,} B, more than profile small's budgets.model_bytes = 20,000 B, " \
           "which bounds the model snapshot (live weights + 1-bit masks" in err
    assert _export(case, tmp_path / "n.onnx") == 0 and "model_bytes" not in capsys.readouterr().err


def test_eval_of_an_earlier_task_on_another_copy_of_the_stream(case, tmp_path, capsys):
    stream = tmp_path / "moved"
    shutil.copytree(case["stream"], stream)
    assert main(["eval", "--run", str(case["run"]), "--task", "1", "--stream", str(stream),
                 "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    results = json.loads((case["run"] / "results.json").read_text())
    assert report["stream"] == str(stream) and len(report["tasks"]) == 2
    assert [r["class_il"] for r in report["tasks"]] == pytest.approx(results["acc_matrix_class_il"][1])
    assert [r["task_il"] for r in report["tasks"]] == pytest.approx(results["acc_matrix_task_il"][1])


def test_eval_errors_are_one_line(case, tmp_path, capsys):
    assert main(["eval", "--run", str(case["run"]), "--stream", str(tmp_path / "none")]) == 2
    assert "manifest not found" in _one_error(capsys)
    assert main(["eval", "--run", str(case["run"]), "--json", str(tmp_path)]) == 2
    assert "is a folder" in _one_error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--run", str(empty)]) == 2
    assert "no task snapshots" in _one_error(capsys)
