"""The command line's start-up, help, interrupts and warnings; the numbers and plots it reports."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.figure
import matplotlib.image
import pytest
import torch

from esacl_edge import cli, reports
from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.device.profiles import load_profile, to_yaml
from esacl_edge.names import ABLATION_DESCRIPTIONS, ABLATION_NAMES, METHOD_DESCRIPTIONS, METHOD_NAMES, MODEL_NAMES
from esacl_edge.plots import plot_report, write_run_plots

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "sklearn")
README = Path(__file__).resolve().parent.parent / "README.md"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_and_argument_errors_import_no_heavy_dependency():
    done = _python(f"""
import contextlib, io, sys
from esacl_edge.cli import main
for argv in (["--help"], ["learn", "--help"], ["bench", "--help"], ["export", "--help"], ["profiles", "--help"],
             ["make-stream", "--help"], ["learn", "--stream", "s", "--method", "nope"], ["export"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_package_exports_load_on_first_use():
    done = _python("""
import sys
import esacl_edge
assert "torch" not in sys.modules
from esacl_edge import EsaclError, Profile, StreamingLearner, load_profile
from esacl_edge.streaming import StreamingLearner as S
assert StreamingLearner is S and load_profile("cpu").name == "cpu" and "StreamingLearner" in dir(esacl_edge)
try:
    esacl_edge.no_such_name
except AttributeError as exc:
    print(exc)
""")
    assert done.returncode == 0, done.stderr
    assert "has no attribute 'no_such_name'" in done.stdout


def test_method_and_model_names_are_one_list():
    from esacl_edge.learn.ablations import ABLATIONS
    from esacl_edge.learn.methods import METHODS, get_method
    from esacl_edge.models import MODEL_NAMES as BUILT
    from esacl_edge.models import build_model

    assert list(METHODS) == list(METHOD_NAMES) == list(METHOD_DESCRIPTIONS)
    assert list(ABLATIONS) == list(ABLATION_NAMES) == list(ABLATION_DESCRIPTIONS)
    assert not set(METHOD_NAMES) & set(ABLATION_NAMES)
    assert all(get_method(name).name == name for name in METHOD_NAMES + ABLATION_NAMES)
    assert BUILT is MODEL_NAMES
    for name in MODEL_NAMES:
        assert build_model(name, (32, 32, 3), 4).eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 4), name
    parser = cli.build_parser()
    for name in METHOD_NAMES + ABLATION_NAMES:  # an ablation is not listed, yet runs saved under it resume
        assert parser.parse_args(["learn", "--stream", "s", "--method", name]).method == name
    for name in MODEL_NAMES:
        assert parser.parse_args(["bench", "--model", name]).model == name


def _listed(out: str, descriptions: dict[str, str]) -> list[str]:
    """The names of ``descriptions`` that ``out`` lists with the start of their description beside them."""
    return [name for name, text in descriptions.items()
            if re.search(rf"^  {re.escape(name)} +{re.escape(' '.join(text.split()[:3]))}", out, flags=re.MULTILINE)]


def test_learn_help_lists_the_product_methods_only(capsys):
    with pytest.raises(SystemExit):
        main(["learn", "--help"])
    out = capsys.readouterr().out
    assert _listed(out, METHOD_DESCRIPTIONS) == list(METHOD_NAMES)
    assert _listed(out, ABLATION_DESCRIPTIONS) == [] and "esacl-channels" not in out
    assert re.search(r"^  resnet18_reduced +reduced ResNet-18", out, flags=re.MULTILINE)


def test_bench_help_lists_methods_then_ablations(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert _listed(out, METHOD_DESCRIPTIONS) == list(METHOD_NAMES)
    assert _listed(out, ABLATION_DESCRIPTIONS) == list(ABLATION_NAMES)
    assert out.index("\nablations") > out.index("  sparcl ")


def test_unknown_method_names_the_product_methods(capsys):
    with pytest.raises(SystemExit):
        main(["learn", "--stream", "s", "--method", "nope"])
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and ", ".join(METHOD_NAMES) in err and "esacl-noids" not in err


def test_readme_methods_table_is_the_product_list():
    table = README.read_text().split("| `--method` | what it is |\n|---|---|\n", 1)[1].split("\n\n", 1)[0]
    assert table.splitlines() == [f"| `{name}` | {text.replace('|', chr(92) + '|')} |"
                                  for name, text in METHOD_DESCRIPTIONS.items()]


def test_interrupt_before_the_command_starts_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        status = main(["profiles"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")
    assert status == 130
    assert capsys.readouterr().err == "esacl-edge: interrupted\n"


def test_interrupt_while_torch_loads_is_one_line(tmp_path):
    # Ctrl-C lands in the first second of a command, while torch is being imported.
    done = _python(f"""
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
from esacl_edge.cli import main
sys.exit(main(["learn", "--stream", {str(tmp_path)!r}, "--run", {str(tmp_path / "run")!r}]))
""")
    assert done.returncode == 130, done.stderr
    assert done.stderr == "esacl-edge: interrupted\n"


@pytest.fixture
def small_stream(tmp_path):
    return make_stream("digits", tmp_path / "stream", tasks=2, chunk_size=16, seed=0, per_class=4, test_per_class=2)


def test_cuda_fallback_is_one_plain_warning_line(tmp_path, small_stream, monkeypatch, capsys):
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(to_yaml(load_profile("jetson_orin").replace(name="gpu", passes_per_chunk=1, batch_size=8,
                                                               threads=0)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = warnings.showwarning
    assert main(["learn", "--profile", str(gpu), "--stream", str(small_stream.root), "--run", str(tmp_path / "run"),
                 "--quiet"]) == 0
    assert warnings.showwarning is before
    err = capsys.readouterr().err.splitlines()
    fallback = [line for line in err if "CUDA" in line]
    assert len(fallback) == 1, err
    assert fallback[0].startswith("esacl-edge: warning: profile gpu: CUDA is not available, so this runs on the CPU, "
                                  "where bf16 becomes fp32.")
    assert not [line for line in err if "RuntimeWarning" in line or ".py:" in line or "warnings.warn" in line], err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["device"] == "cpu"


def test_cli_leaves_other_warnings_to_python(monkeypatch, capsys):
    def command(args):
        warnings.warn("from a dependency", UserWarning)
        warnings.warn("ours", RuntimeWarning)

    monkeypatch.setattr(cli, "cmd_profiles", command)
    with pytest.warns(UserWarning, match="from a dependency"):
        assert main(["profiles"]) == 0
    assert capsys.readouterr().err == "esacl-edge: warning: ours\n"


def _results(sparsity: float, **extra) -> dict:
    return {"acc_matrix_class_il": [[0.9], [0.5, 0.8], [0.3, 0.4, 0.7]],
            "acc_matrix_task_il": [[0.9], [0.85, 0.9], [0.8, 0.82, 0.9]], "final_acc_class_il": 0.4667,
            "final_acc_task_il": 0.84, "forgetting_class_il": 0.5, "sparsity": sparsity,
            "layer_sparsity": {"1.conv1.weight": sparsity / 2, "1.fc1.weight": sparsity, "1.classifier.weight": 0.5},
            "model_bytes_dense": 1000, "model_bytes_sparse": 100, "buffer_size": 4, "buffer_capacity": 4,
            "buffer_bytes": 448, "train_seconds": 1.0, "device": "cpu", "method": "esacl", "profile": "cpu",
            "seed": 0, "chunks_consumed": 6, **extra}


@pytest.mark.parametrize("sparsity, shown", [(0.99999, "99.999%"), (0.9995, "99.95%"), (1e-5, "0.001%"),
                                             (0.9, "90.0%"), (0.0, "0.0%")])
def test_results_never_round_sparsity_to_0_or_100(sparsity, shown, capsys):
    reports.print_results(_results(sparsity))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sparsity"))
    assert line.split()[1] == shown


def test_budget_plan_never_rounds_target_sparsity_to_1(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(to_yaml(load_profile("cpu").replace(name="p", target_sparsity=0.99999)))
    assert main(["profiles", "check", str(path), "--input-shape", "8,8,1"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "target sparsity" in line)
    assert line.split()[2] == "0.99999"


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved, in order."""
    figures = []
    save = matplotlib.figure.Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


def _has_colour_bar(fig) -> bool:
    return any(image.colorbar is not None for ax in fig.axes for image in ax.images)


def test_run_plots_are_titled_pngs_with_colour_bars(tmp_path, saved_figures):
    paths = write_run_plots(_results(0.9), tmp_path)
    assert [p.name for p in paths] == ["acc_matrix_class_il.png", "acc_matrix_task_il.png", "layer_sparsity.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
    class_il, task_il, layers = saved_figures
    for fig, metric in ((class_il, "Class-IL"), (task_il, "Task-IL")):
        title = fig.axes[0].get_title()
        assert "esacl" in title and metric in title and _has_colour_bar(fig)
    ax = layers.axes[0]
    assert "esacl" in ax.get_title() and "90.0%" in ax.get_title()
    assert "layer" in ax.get_xlabel() and "sparsity" in ax.get_ylabel()


def test_run_plots_of_a_dense_run_before_its_first_task(tmp_path):
    empty = _results(0.0, acc_matrix_class_il=[], acc_matrix_task_il=[])
    assert write_run_plots(empty, tmp_path) == []
    assert [p.name for p in write_run_plots(_results(0.0), tmp_path)] == ["acc_matrix_class_il.png",
                                                                         "acc_matrix_task_il.png"]


def test_bench_plots_have_titles_and_colour_bars(tmp_path, saved_figures):
    runs = [{"label": label, **_results(sp), "seed": seed} for seed in (0, 1) for label, sp in
            (("esacl@0.9", 0.9), ("derpp", 0.0))]
    stats = {"mean": 1.0, "std": 0.1}
    summary = [{"label": label, "train_flops": stats, "final_acc_class_il": stats} for label in ("esacl@0.9", "derpp")]
    paths = plot_report({"summary": summary, "runs": runs, "seeds": 2}, tmp_path)
    assert [p.name for p in paths] == ["acc_matrix_class_il.png", "accuracy_vs_flops.png", "layer_sparsity.png"]
    matrices, flops, layers = saved_figures
    assert _has_colour_bar(matrices) and "Class-IL" in matrices.get_suptitle()
    assert [ax.get_title() for ax in matrices.axes[:2]] == ["esacl@0.9", "derpp"]
    assert flops.axes[0].get_title()
    ax = layers.axes[0]
    assert ax.get_title() and "layer" in ax.get_xlabel() and "sparsity" in ax.get_ylabel()


def test_plots_import_matplotlib_on_first_use_with_agg():
    done = _python("""
import sys, tempfile
import esacl_edge.plots as plots
assert "matplotlib" not in sys.modules
plots.write_run_plots({"acc_matrix_class_il": [[1.0]], "method": "m"}, tempfile.mkdtemp())
import matplotlib
print(matplotlib.get_backend())
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() == "agg"


def test_a_stopped_run_reports_accuracy_so_far_not_final(capsys):
    reports.print_results(_results(0.9, complete=False, tasks=5, chunks=20))
    out = capsys.readouterr().out
    assert "final accuracy" not in out
    assert "accuracy so far  Class-IL 46.7%   Task-IL 84.0%   (tasks 0..2 of 5; 6 of 20 chunks learned" in out
    reports.print_results(_results(0.9, complete=True, tasks=3, chunks=6))
    assert "final accuracy   Class-IL 46.7%" in capsys.readouterr().out


def test_model_size_and_sparsity_lines_say_when_sparse_is_larger_or_the_target_was_missed(capsys):
    reports.print_results(_results(0.0, model_bytes_sparse=1100, target_sparsity=0.0))
    out = capsys.readouterr().out
    assert "1.10x the dense size: at this sparsity the dense form is the smaller one" in out and "smaller)" not in out
    reports.print_results(_results(0.994, target_sparsity=0.999))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sparsity"))
    assert line.endswith("(target 99.9%, not reached)")
    reports.print_results(_results(0.9, target_sparsity=0.9))
    assert "not reached" not in capsys.readouterr().out


def test_matrix_colours_span_the_accuracies_and_large_runs_stay_readable(tmp_path, saved_figures):
    high = _results(0.9, acc_matrix_class_il=[[0.9], [0.95, 1.0]], acc_matrix_task_il=[[1.0], [1.0, 1.0]])
    write_run_plots(high, tmp_path)
    image = saved_figures[0].axes[0].images[0]
    assert image.norm.vmin == pytest.approx(90.0) and image.norm.vmax == pytest.approx(100.0)
    n = 50
    rows = [[0.5] * (i + 1) for i in range(n)]
    saved_figures.clear()
    paths = write_run_plots(_results(0.9, acc_matrix_class_il=rows, acc_matrix_task_il=rows), tmp_path)
    height, width = matplotlib.image.imread(paths[0]).shape[:2]
    assert max(height, width) <= 12 * 120  # MAX_INCHES at the saved dpi
    ax = saved_figures[0].axes[0]
    assert len(ax.texts) == 0 and len(ax.get_xticks()) <= 20  # no unreadable numbers, thinned ticks


def test_bench_plots_name_the_method_and_the_seeds(tmp_path, saved_figures):
    runs = [{"label": "esacl@0.9", **_results(0.9), "seed": 0}]
    stats = {"mean": 1.0, "std": 0.1}
    plot_report({"summary": [{"label": "esacl@0.9", "train_flops": stats, "final_acc_class_il": stats}],
                 "runs": runs, "seeds": 1}, tmp_path)
    matrices, _, layers = saved_figures
    assert "one seed" in matrices.get_suptitle() and "1 seeds" not in matrices.get_suptitle()
    assert "esacl@0.9" in layers.axes[0].get_title()
