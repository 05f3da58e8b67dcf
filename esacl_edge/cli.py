"""``esacl-edge`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

# Only light modules here: torch and the other heavy dependencies are imported by the commands that use them,
# so that --help and argument errors are immediate.
from . import arguments, reports
from .errors import EsaclError

DEMO_BUFFER_BYTES = 22400  # 200 digits samples of 112 bytes: a buffer far smaller than the stream


def export_task(run: str | Path, task: int, out: str | Path, variant: str = "sparse", profile: str | None = None,
                opset: int | None = None, stream: str | None = None, min_l1: float = 0.0) -> dict:
    """Export the snapshot of ``task`` in ``run`` under ``profile`` (default: the run's own); accuracy on
    the test data of ``stream`` (default: the run's own stream, if it is still there)."""
    import numpy as np

    from .deploy.export import export_variant
    from .deploy.metadata import export_meta
    from .deploy.snapshot import load_calibration, load_snapshot
    from .run_folder import run_profile
    from .device.profiles import load_profile
    from .evaluate import stream_tests, warn_unlearned

    model, meta = load_snapshot(run, task)
    prof = load_profile(profile) if profile else run_profile(run, meta)
    own = meta.get("stream")
    test = None
    if stream or (own and (Path(own) / "manifest.json").is_file()):
        parts = [p for p in stream_tests(stream or own, task, meta["spec"]) if p is not None]
        warn_unlearned(parts, meta, stream or own, task)
        test = (np.concatenate([x for x, _, _ in parts]), np.concatenate([y for _, y, _ in parts])) if parts else None
    info = export_meta(task, meta["task_classes"], meta.get("pattern"), prof.providers)
    report = export_variant(model, meta["spec"], out, variant, info, calibration=load_calibration(run, task),
                            opset=opset or prof.opset, test=test, min_l1=min_l1)
    if prof.model_bytes is not None and report["bytes"] > prof.model_bytes:
        snapshot = f", {meta['bytes']:,} B" if isinstance(meta.get("bytes"), int) else ""
        warnings.warn(f"{out}: the {variant} file takes {report['bytes']:,} B, more than profile {prof.name}'s "
                      f"budgets.model_bytes = {prof.model_bytes:,} B, which bounds the model snapshot (live weights "
                      f"+ 1-bit masks{snapshot}); gzipped it takes {report['gzip_bytes']:,} B",
                      RuntimeWarning, stacklevel=2)
    return report


def cmd_make_stream(args: argparse.Namespace) -> None:
    """``make-stream``: write a data set as a chunk stream."""
    from .data.build import make_stream

    order = args.class_order
    if order and order != "random":
        try:
            order = [int(c) for c in order.split(",")]
        except ValueError:
            raise EsaclError(f"--class-order must be 'random' or comma-separated class numbers, got {order!r}") from None
    m = make_stream(args.dataset, args.out, tasks=args.tasks, chunk_size=args.chunk_size, seed=args.seed,
                    per_class=args.per_class, test_per_class=args.test_per_class, class_order=order,
                    classes_per_task=args.classes_per_task, blurry=args.blurry, root=args.root, classes=args.classes,
                    download=args.download, image_size=args.image_size, channels=args.channels,
                    test_fraction=args.test_fraction)
    chunks = sum(len(t.chunks) for t in m.tasks)
    sizes = [len(t.classes) for t in m.tasks]
    per_task = str(sizes[0]) if len(set(sizes)) == 1 else ", ".join(map(str, sizes))
    print(f"wrote {m.root}: {len(m.tasks)} tasks of {per_task} classes, {chunks} chunks, input "
          f"{tuple(m.input_shape)} {m.dtype}, {m.num_classes} classes"
          + (f", blurry boundaries of {args.blurry} chunks" if args.blurry else ""))


def _at_least_one(**options: int | None) -> None:
    """One error for a count option given below 1 (``batch_size`` is ``--batch-size``)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise EsaclError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def cmd_learn(args: argparse.Namespace) -> int:
    """``learn``: learn or resume a stream; the exit status says whether a signal stopped it."""
    from .device.profiles import load_profile
    from .device.selection import apply_threads
    from .runner import learn

    profile = load_profile(args.profile)
    _at_least_one(passes=args.passes, batch_size=args.batch_size)
    # The profile's precision is for its device: --device elsewhere trains in fp32 unless --precision says otherwise.
    moved = args.device is not None and args.device != profile.device
    overrides = {"device": args.device, "passes_per_chunk": args.passes, "batch_size": args.batch_size,
                 "precision": args.precision or ("fp32" if moved else None)}
    profile = profile.replace(**{k: v for k, v in overrides.items() if v is not None})
    apply_threads(profile)
    r = learn(args.stream, profile=profile, run_dir=args.run, method=args.method, sparsity=args.sparsity,
              seed=args.seed, model=args.model, buffer_bytes=args.buffer_bytes, overwrite=args.overwrite,
              progress=not args.quiet, anytime=args.anytime, pattern=args.pattern, follow=args.follow,
              poll_seconds=args.poll, max_idle=args.max_idle, lr=args.lr, init=_init_file(args),
              freeze_until=args.freeze_until, latent_replay=args.latent_replay)
    if r["resumed_at_chunk"]:
        print(f"resumed {args.run} after {r['resumed_at_chunk']} chunks learned earlier")
    reports.print_results(r)
    print(f"results and task snapshots in {args.run}")
    if r["stopped_by"]:
        print(f"stopped by {r['stopped_by']} after {r['chunks_consumed']} of {r['chunks']} chunks, state saved; "
              "the same command resumes", file=sys.stderr)
        return 128 + getattr(signal, r["stopped_by"])
    return 0


def _init_file(args: argparse.Namespace) -> str | None:
    """``--init FILE``, or with ``--download-weights`` torchvision's ImageNet weights of ``--model`` (fetched now)."""
    if not args.download_weights:
        return args.init
    if args.init:
        raise EsaclError("give --init FILE or --download-weights, not both")
    if args.model is None:
        raise EsaclError("--download-weights needs --model: the torchvision network whose ImageNet weights to fetch")
    from .weights import download_weights

    path = download_weights(args.model)
    print(f"ImageNet weights of {args.model} in {path} (copy this file to a device without internet: --init FILE)")
    return str(path)


def cmd_pretrain(args: argparse.Namespace) -> None:
    """``pretrain``: train a backbone offline and write a weights file for ``--init``."""
    from .device.profiles import load_profile
    from .device.selection import apply_threads
    from .pretrain import pretrain

    profile = load_profile(args.profile)
    apply_threads(profile)
    r = pretrain(args.data, args.model, args.out, classes=args.classes, epochs=args.epochs, profile=profile,
                 lr=args.lr, seed=args.seed, init=_init_file(args), per_class=args.per_class, progress=not args.quiet)
    print(f"wrote {r['file']} ({r['bytes']:,} bytes) and {r['file']}.json: {r['model']} on {len(r['classes'])} classes, "
          f"{r['train_samples']:,} samples x {r['epochs']} epochs in {r['train_seconds']:.0f} s; held-out accuracy "
          f"{100 * r['heldout_acc']:.1f}% ({r['heldout_samples']:,} samples, {r['heldout']})")
    print(f"start learning from it: esacl-edge learn --model {r['model']} --init {r['file']} ...")


def cmd_export(args: argparse.Namespace) -> None:
    """``export``: one task's model to ONNX, checked with onnxruntime."""
    reports.print_export(export_task(args.run, args.task, args.out, args.variant, args.profile, args.opset,
                                     args.stream, args.min_l1))


def cmd_eval(args: argparse.Namespace) -> None:
    """``eval``: accuracy of one task's snapshot on the test data of tasks 0..N of a stream."""
    from .evaluate import evaluate_snapshot, format_evaluation
    from .files import write_json

    if args.json is not None and Path(args.json).is_dir():
        raise EsaclError(f"--json {args.json}: is a folder; give a file name")
    result = evaluate_snapshot(args.run, args.task, args.stream)
    print(format_evaluation(result))
    if args.json is not None:
        try:
            write_json(args.json, result)
        except OSError as exc:
            raise EsaclError(f"--json {args.json}: cannot write it ({exc.strerror or exc})") from None
        print(f"wrote {args.json}")


def cmd_bench(args: argparse.Namespace) -> None:
    """``bench``: methods x seeds on one stream, made first from ``--dataset`` if asked."""
    from .bench import bench, bench_stream, format_table, plan_runs
    from .device.profiles import load_profile

    out = Path(args.out)
    if args.stream is None and args.dataset is None:
        raise EsaclError("bench needs --stream DIR or --dataset NAME (a make-stream data set)")
    plan_runs(args.methods.split(","), args.sparsity, args.seeds, args.buffer_bytes)
    _at_least_one(passes=args.passes)
    profile = load_profile(args.profile)
    if args.passes is not None:
        profile = profile.replace(passes_per_chunk=args.passes)
    stream = args.stream or bench_stream(out / "stream", args.dataset, root=args.root, tasks=args.tasks,
                                         chunk_size=args.chunk_size, per_class=args.per_class,
                                         test_per_class=args.test_per_class)
    report = bench(stream, args.methods.split(","), profile, out, sparsity=args.sparsity, seeds=args.seeds,
                   buffer_bytes=args.buffer_bytes, model=args.model, anytime=args.anytime, init=_init_file(args),
                   freeze_until=args.freeze_until, latent_replay=args.latent_replay, lr=args.lr,
                   resume=args.resume)
    print(format_table(report["summary"]))
    print(f"wrote {out / 'bench.json'} and {', '.join(Path(p).name for p in report.get('plots', []))}")


def cmd_profiles(args: argparse.Namespace) -> None:
    """``profiles``: list, show or check device profiles."""
    from .data.stream import classes_problem, shape_problem
    from .learn.plan import plan
    from .device.profiles import load_profile, profile_names
    from .learn.methods import get_method
    from .models import check_input

    if args.action == "list":
        reports.print_profiles((name, load_profile(name)) for name in profile_names())
        return
    if not args.name:
        raise EsaclError(f"profiles {args.action} needs a profile name or YAML path")
    try:
        h, w, c = (int(v) for v in args.input_shape.split(","))
    except ValueError:
        raise EsaclError(f"--input-shape must be H,W,C, got {args.input_shape!r}") from None
    if problem := shape_problem((h, w, c)):
        raise EsaclError(f"--input-shape {problem}")
    if problem := classes_problem(args.num_classes):
        raise EsaclError(f"--num-classes {problem}")
    check_input(args.model, (h, w, c), args.num_classes)
    p = load_profile(args.name)
    if args.action == "show":
        reports.print_profile(p)
    pl = plan(p, args.model, (h, w, c), args.num_classes, get_method(args.method), args.dtype,
              freeze_until=args.freeze_until, latent=args.latent_replay)
    reports.print_plan(p, pl, args.num_classes, args.method, args.dtype)


def cmd_demo(args: argparse.Namespace) -> None:
    """``demo``: Split-Digits stream, EsaCL run and ONNX export in one folder."""
    from .data.build import make_stream
    from .runner import learn

    out = Path(args.out)
    stream, run = out / "stream", out / "run"
    if not (stream / "manifest.json").exists():
        make_stream("digits", stream, tasks=5, chunk_size=64, seed=args.seed)
    print(f"Split-Digits stream in {stream}; learning with EsaCL at 90% sparsity on the cpu profile, "
          f"replay buffer of {DEMO_BUFFER_BYTES:,} bytes")
    r = learn(stream, profile="cpu", run_dir=run, method="esacl", sparsity=0.9, seed=args.seed, overwrite=True,
              buffer_bytes=DEMO_BUFFER_BYTES)
    reports.print_results(r)
    last = r["tasks"] - 1
    reports.print_export(export_task(run, last, out / f"model_task{last}.onnx"))


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``esacl-edge`` command: each subcommand's options (``arguments.py``) and its function."""
    p, sub = arguments.command_parser()
    for add, func in ((arguments.demo, cmd_demo), (arguments.make_stream, cmd_make_stream),
                      (arguments.learn, cmd_learn), (arguments.bench, cmd_bench), (arguments.pretrain, cmd_pretrain),
                      (arguments.profiles, cmd_profiles), (arguments.export, cmd_export), (arguments.evaluate, cmd_eval)):
        add(sub).set_defaults(func=func)
    return p


def _plain_warnings(show_other):
    """A ``warnings.showwarning`` that prints RuntimeWarnings (ours) as one line, without source file and line,
    above any progress bar; other warnings go to ``show_other``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, RuntimeWarning):
            return show_other(message, category, filename, lineno, file, line)
        from tqdm.auto import tqdm

        tqdm.write(f"esacl-edge: warning: {message}", file=file or sys.stderr)

    return show


def _printable_output() -> None:
    """Characters the terminal's encoding cannot show (a non-ASCII path under an ASCII locale) are printed
    escaped, never an error after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a detached or closed stream: leave it as it is
                pass


def main(argv: list[str] | None = None) -> int:
    """Run the command; exit status 2 on an input error, 130 when interrupted (also while torch loads)."""
    _printable_output()
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("default", RuntimeWarning)
            warnings.showwarning = _plain_warnings(warnings.showwarning)
            return args.func(args) or 0
    except EsaclError as exc:
        print(f"esacl-edge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esacl-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
