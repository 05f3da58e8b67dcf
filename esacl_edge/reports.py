"""Text reports the ``esacl-edge`` command prints: learning results, export checks, profiles and budget plans."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .learn.plan import Plan
    from .device.profiles import Profile


def fixed(value: float, digits: int, top: float = 1.0) -> str:
    """``value`` with ``digits`` decimals, or more where rounding would turn a value strictly between 0 and
    ``top`` into 0 or ``top`` (a sparsity of 0.99999 is not 100%)."""
    for d in range(digits, digits + 15):
        text = f"{value:.{d}f}"
        if not 0 < value < top or 0 < float(text) < top:
            return text
    return repr(value)


def percent(fraction: float, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage; only 0 shows as 0% and only 1 as 100%."""
    return fixed(100 * fraction, digits, 100.0) + "%"


def print_results(r: dict) -> None:
    """Accuracy matrices and the summary lines of a learn run's results."""
    from .metrics import format_matrix

    if not r["acc_matrix_class_il"]:
        print(f"no task finished yet ({r['chunks_consumed']} chunks learned)")
        return
    print(format_matrix(r["acc_matrix_class_il"], "Class-IL accuracy (%), row = after task i, column = task j"))
    print()
    print(format_matrix(r["acc_matrix_task_il"], "Task-IL accuracy (%)"))
    print()
    finished = len(r["acc_matrix_class_il"])
    label = "final accuracy  " if r.get("complete", True) else "accuracy so far "
    if r["final_acc_class_il"] is None:
        print(f"{label} not measured: no finished task has a test split")
    else:
        print(f"{label} Class-IL {100 * r['final_acc_class_il']:.1f}%   Task-IL {100 * r['final_acc_task_il']:.1f}%"
              + ("" if r.get("complete", True) else
                 f"   (tasks 0..{finished - 1} of {r['tasks']}; {r['chunks_consumed']} of {r['chunks']} chunks "
                 "learned, the stream is not finished)"))
    if r["forgetting_class_il"] is not None:
        print(f"forgetting       Class-IL {100 * r['forgetting_class_il']:.1f} points")
    if r.get("untested_tasks"):
        print(f"not evaluated    tasks {', '.join(map(str, r['untested_tasks']))} (no test split)")
    target = r.get("target_sparsity")
    short = f" (target {percent(target)}, not reached)" if target and r["sparsity"] < target - 5e-4 else ""
    print(f"sparsity         {percent(r['sparsity'])} of prunable weights are zero{short}")
    dense, sparse = r["model_bytes_dense"], r["model_bytes_sparse"]
    size = (f"{dense / sparse:.1f}x smaller" if sparse < dense else
            f"{sparse / dense:.2f}x the dense size: at this sparsity the dense form is the smaller one")
    print(f"model size       {dense:,} bytes dense, {sparse:,} bytes sparse ({size})")
    print(f"replay buffer    {r['buffer_size']} of {r['buffer_capacity']} samples, {r['buffer_bytes']:,} bytes")
    if r.get("init"):
        print(f"started from     {r['init']['file']} (classifier {r['init']['classifier']})")
    if r.get("freeze_until"):
        kept = f"; buffer keeps {r['latent_replay']} latents" if r.get("latent_replay") else ""
        print(f"frozen prefix    up to {r['freeze_until']}, {r['trainable_params']:,} parameters train{kept}")
    print(f"train time       {r['train_seconds']:.1f} s on {r['device']} in {r.get('precision', 'fp32')} "
          f"({r['method']}, profile {r['profile']}, seed {r['seed']})")
    if r.get("overflow_skipped_steps") or r.get("unperturbed_sam_steps"):
        print(f"fp16 overflows   {r['overflow_skipped_steps']} steps skipped, {r['unperturbed_sam_steps']} SAM steps "
              "unperturbed (loss scaling backs off and recovers)")


def print_export(report: dict) -> None:
    """The exported file, its parity with PyTorch and, when measured, its accuracy."""
    line = (f"wrote {report['path']} ({report['variant']}, {report['bytes']:,} bytes, {report['gzip_bytes']:,} gzipped, "
            f"opset {report['opset']}); onnxruntime vs PyTorch max abs diff {report['max_abs_diff']:.2e}")
    if "top1_agreement" in report:
        line += f", top-1 agreement {100 * report['top1_agreement']:.1f}%"
    print(line)
    if "removed" in report:
        removed = [f"{name} {n:,}" for name, n in report["removed"].items() if n]
        print("structured: removed " + (", ".join(removed) + " units or channels" if removed else "nothing"))
    if "accuracy_onnx" in report:
        print(f"accuracy over all test samples of tasks 0..{report['task']} pooled: PyTorch snapshot "
              f"{100 * report['accuracy_torch']:.2f}%, this file {100 * report['accuracy_onnx']:.2f}%")
    print(f"sidecar {report['path']}.json")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.2f} MiB"


def print_profiles(profiles: Iterable[tuple[str, Profile]]) -> None:
    """One table row per ``(name, profile)``, each printed as soon as it is loaded."""
    print(f"{'profile':<18}{'device':<7}{'memory':>10}{'train peak':>14}{'buffer':>12}{'model':>12}  description")
    for name, p in profiles:
        print(f"{name:<18}{p.device:<7}{p.memory_mb:>7} MB{_mib(p.training_peak_bytes):>14}"
              f"{_mib(p.buffer_bytes):>12}{_mib(p.model_bytes):>12}  {p.description}")


def print_profile(p: Profile) -> None:
    """Every field of a profile, under the file it came from."""
    print(f"# {p.source}")
    for key, value in vars(p).items():
        if key != "source":
            print(f"{key:<24}{value}")
    print()


def print_plan(p: Profile, pl: Plan, num_classes: int, method: str, dtype: str) -> None:
    """What a profile's budgets yield for one model and input, and the training-peak estimate."""
    h, w, c = pl.input_shape
    print(f"derived for {pl.model} on {h}x{w}x{c} {dtype}, {num_classes} classes, method {method}:")
    print(f"  target sparsity   {fixed(pl.target_sparsity, 4)}  ({pl.sparsity_from})")
    print(f"  model             {pl.model_bytes_dense:,} B dense -> {pl.model_bytes_stored:,} B stored"
          + (f" (budget {p.model_bytes:,} B)" if p.model_bytes else ""))
    print(f"  replay buffer     {pl.buffer_capacity:,} samples = {pl.buffer_bytes:,} B (budget {p.buffer_bytes:,} B)"
          + ("; replayed from a copy in GPU memory" if pl.buffer_on_device else ""))
    if pl.freeze_until:
        layout = pl.buffer_layout
        print(f"  frozen prefix     up to {pl.freeze_until}: {pl.trainable_params:,} parameters train"
              + (f"; buffer of {layout.latent} latents {'x'.join(map(str, layout.shape))}" if layout.latent else ""))
    print(f"  batch size        {pl.batch_size} (profile allows up to {p.batch_size})")
    print(f"  training peak     estimate {pl.memory_estimate_bytes:,} B of budget {pl.memory_budget_bytes:,} B:")
    for term, value in pl.memory_terms.items():
        print(f"    {term:<24}{value:>16,} B")
    print("  fits: yes" + ("" if p.training_supported else " (deployment only: this profile does not train)"))
