import json

import pytest

from esacl_edge.bench import bench, format_table, parse_method
from esacl_edge.errors import EsaclError
from tests.support import MIN_PROCESS_BYTES, RESULT_KEYS


def test_parse_method():
    assert parse_method("esacl", 0.9) == ("esacl@0.9", "esacl", 0.9)
    assert parse_method("sparcl@0.75", 0.9) == ("sparcl@0.75", "sparcl", 0.75)
    assert parse_method("derpp@0.5", 0.9) == ("derpp", "derpp", 0.0)  # dense methods stay dense
    with pytest.raises(EsaclError, match="unknown method 'nope'"):
        parse_method("nope", 0.9)
    with pytest.raises(EsaclError, match="must be a number"):
        parse_method("esacl@x", 0.9)


@pytest.mark.slow
def test_bench_runs_methods_over_seeds_and_writes_json_and_plots(tiny_stream, fast_profile, tmp_path):
    report = bench(tiny_stream.root, ["esacl", "finetune"], fast_profile.replace(passes_per_chunk=1), tmp_path,
                   sparsity=0.8, seeds=2, buffer_bytes=2240)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["label"], r["seed"]) for r in data["runs"]] == [
        ("esacl@0.8", 0), ("finetune", 0), ("esacl@0.8", 1), ("finetune", 1)]  # seeds interleaved
    for r in data["runs"]:
        assert RESULT_KEYS | {"train_flops", "train_macs", "peak_memory_bytes"} <= set(r)
        assert r["peak_memory_bytes"] >= MIN_PROCESS_BYTES and r["train_flops"] >= r["samples_trained"]
    rows = {row["label"]: row for row in data["summary"]}
    assert rows["esacl@0.8"]["flops_ratio_to_first"] == 1.0
    assert rows["finetune"]["sparsity"]["mean"] == 0.0
    mean = sum(r["final_acc_class_il"] for r in data["runs"] if r["label"] == "finetune") / 2
    assert rows["finetune"]["final_acc_class_il"]["mean"] == pytest.approx(mean)
    for name in ("acc_matrix_class_il.png", "accuracy_vs_flops.png", "layer_sparsity.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(report["summary"])
    assert "esacl@0.8" in table and "finetune" in table and "GFLOPs" in table


def test_bench_resume_keeps_finished_runs_and_refuses_other_settings(tiny_stream, fast_profile, tmp_path):
    profile = fast_profile.replace(passes_per_chunk=1)
    first = bench(tiny_stream.root, ["finetune"], profile, tmp_path, seeds=2, buffer_bytes=2240, plots=False)
    (tmp_path / "runs" / "finetune_seed1" / "results.json").unlink()  # as if the bench stopped during seed 1
    again = bench(tiny_stream.root, ["finetune"], profile, tmp_path, seeds=2, buffer_bytes=2240, plots=False,
                  resume=True)
    assert [r.get("reused", False) for r in again["runs"]] == [True, False]
    assert again["runs"][0]["train_seconds"] == first["runs"][0]["train_seconds"]  # not run again
    assert (tmp_path / "runs" / "finetune_seed1" / "results.json").is_file()
    with pytest.raises(EsaclError, match="finetune_seed0.*cannot resume.*buffer_bytes"):
        bench(tiny_stream.root, ["finetune"], profile, tmp_path, seeds=1, buffer_bytes=4480, plots=False, resume=True)
    with pytest.raises(EsaclError, match="finetune_seed0.*cannot resume.*profile"):
        bench(tiny_stream.root, ["finetune"], profile.replace(passes_per_chunk=2), tmp_path, seeds=1,
              buffer_bytes=2240, plots=False, resume=True)
