"""The protocol suite (benchmarks/suite.py): its members' definitions, the scoreboard, a tiny run resumed."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["suite"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    yield module
    del sys.modules["suite"]


def test_the_members_are_the_protocols_the_suite_promises(suite):
    m = suite.MEMBERS
    assert list(m) == ["c100-10x10", "c100-5x2-a", "c100-5x2-b", "c100-5x2-c", "c100-online", "pretrained",
                       "mnist", "fmnist"]
    assert m["c100-10x10"].stream == {"tasks": 10, "per_class": 100, "test_per_class": 50}
    assert (m["c100-10x10"].passes, m["c100-10x10"].buffer_bytes) == (3, 6_960_000)
    sets = [m[f"c100-5x2-{k}"].stream["classes"] for k in "abc"]
    assert all(len(s) == 10 for s in sets) and len(set().union(*map(set, sets))) == 30  # disjoint
    for k in "abc":
        five = m[f"c100-5x2-{k}"]
        assert (five.stream["tasks"], five.stream["per_class"], five.stream["test_per_class"]) == (5, 300, 100)
        assert (five.passes, five.buffer_samples) == (3, 500)
    online = m["c100-online"]
    assert online.stream["tasks"] == 20 and online.stream["per_class"] == 400  # every training image, once
    assert (online.passes, online.batch_size, online.buffer_samples, online.lr) == (1, 10, 10_000, 0.1)
    assert "class_order" not in online.stream  # class order
    pre = m["pretrained"]
    assert pre.pretrain["classes"] == list(range(50)) and pre.stream["classes"] == list(range(50, 100))
    assert m["mnist"].data == "mnist.npz" and m["fmnist"].data == "fashion_mnist.npz"


def _npz(path, classes, per_class, shape, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    x = (rng.integers(0, 60, (len(y), *shape)) + (y[:, None, None, None] * 19 % 255)).clip(0, 255).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[::2], y_test=y[::2])


def test_a_buffer_in_samples_is_those_samples_bytes_on_the_stream(suite, tmp_path):
    _npz(tmp_path / "cifar100.npz", 100, 2, (32, 32, 3))
    stream = suite.build_stream(suite.MEMBERS["c100-5x2-b"], tmp_path, tmp_path / "m")
    from esacl_edge.learn.buffer import buffer_capacity

    budget = suite.buffer_bytes(suite.MEMBERS["c100-5x2-b"], stream)
    assert buffer_capacity(budget, (32, 32, 3), "uint8", 100) == 500  # exactly 500 samples of this stream
    manifest = json.loads((stream / "manifest.json").read_text())
    assert [t["classes"] for t in manifest["tasks"]] == [[10, 11], [12, 13], [14, 15], [16, 17], [18, 19]]


def _bench(runs):
    return {"runs": [{"label": label, "seed": seed, "final_acc_class_il": acc, "learning_acc_class_il": acc + 0.1,
                      "forgetting_class_il": 0.1, "samples_per_second": 100.0, "train_flops": flops,
                      "train_seconds": secs} for label, seed, acc, flops, secs in runs]}


def test_the_scoreboard_pairs_seeds_and_averages_over_members(suite, tmp_path):
    one = _bench([("derpp", 0, 0.30, 10.0, 2.0), ("derpp", 1, 0.40, 10.0, 2.0), ("sparcl@0.9", 0, 0.20, 5.0, 2.0),
                  ("sparcl@0.9", 1, 0.20, 5.0, 2.0), ("esacl@0.9", 0, 0.35, 1.0, 1.0), ("esacl@0.9", 1, 0.37, 1.0, 1.0)])
    two = _bench([("derpp", 0, 0.50, 10.0, 4.0), ("esacl@0.9", 0, 0.40, 2.0, 2.0)])
    for name, report in (("mnist", one), ("fmnist", two)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps(report))
    board = suite.scoreboard(tmp_path, ["mnist", "fmnist", "c100-online"])  # c100-online has not run
    assert list(board["members"]) == ["mnist", "fmnist"]
    esacl = next(r for r in board["members"]["mnist"] if r["method"] == "esacl@0.9")
    assert esacl["minus_derpp"]["per_seed"] == pytest.approx([0.05, -0.03])
    assert esacl["minus_sparcl"]["per_seed"] == pytest.approx([0.15, 0.17])
    assert esacl["flops_x_derpp"] == pytest.approx(0.1) and esacl["time_x_derpp"] == pytest.approx(0.5)
    avg = board["suite_average"]["esacl@0.9"]
    assert avg["members"] == 2 and avg["class_il"] == pytest.approx((0.36 + 0.40) / 2)
    assert avg["minus_derpp"] == pytest.approx((0.01 + -0.10) / 2)
    assert avg["minus_sparcl"] == pytest.approx(0.16)  # only the member that ran SparCL
    text = suite.format_scoreboard(board)
    assert "suite average" in text and "esacl@0.9" in text and "+5.0 -3.0" in text
    markdown = suite.format_markdown(board)
    assert "| esacl@0.9 | 36.0 ± 1.4 (35.0, 37.0) | +1.0; +5.0, -3.0 | +16.0 |" in markdown
    assert "| esacl@0.9 | 2 | 38.0 | -4.5 | +16.0 |" in markdown


def test_a_diverged_run_is_counted_in_its_row_not_averaged(suite, tmp_path):
    report = _bench([("derpp", 0, 0.30, 10.0, 2.0), ("derpp", 1, 0.50, 10.0, 2.0)])
    report["runs"][0].update(diverged=True, final_acc_class_il=None)
    (tmp_path / "fmnist").mkdir()
    (tmp_path / "fmnist" / "bench.json").write_text(json.dumps(report))
    row = suite.scoreboard(tmp_path, ["fmnist"])["members"]["fmnist"][0]
    assert row["diverged"] == 1 and row["class_il"]["per_seed"] == [0.5] and row["class_il"]["seed_ids"] == [1]
    assert "50.0 ± 0.0 (50.0; 1 diverged)" in suite.format_markdown(suite.scoreboard(tmp_path, ["fmnist"]))


def test_a_tiny_suite_runs_prints_its_scoreboard_and_resumes(suite, tmp_path, capsys):
    _npz(tmp_path / "mnist.npz", 10, 12, (8, 8, 1))
    args = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--members", "mnist", "--methods",
            "derpp,finetune", "--seeds", "1", "--resume"]
    assert suite.main(args) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "finetune" in out and "suite average" in out
    first = json.loads((tmp_path / "out" / "mnist" / "bench.json").read_text())
    assert suite.main(args) == 0
    again = json.loads((tmp_path / "out" / "mnist" / "bench.json").read_text())
    assert all(r.get("reused") for r in again["runs"]) and len(again["runs"]) == len(first["runs"]) == 2
    assert json.loads((tmp_path / "out" / "scoreboard.json").read_text())["members"]["mnist"]
