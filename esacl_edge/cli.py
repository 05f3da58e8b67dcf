"""``esacl-edge`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import textwrap
import warnings
from pathlib import Path

# Only light modules here: torch and the other heavy dependencies are imported by the commands that use them,
# so that --help and argument errors are immediate.
from . import __version__, reports
from .errors import EsaclError
from .names import (ABLATION_DESCRIPTIONS, ABLATION_NAMES, METHOD_DESCRIPTIONS, METHOD_NAMES, MODEL_DESCRIPTIONS,
                    MODEL_NAMES)

DEFAULT_RUN = "esacl-run"
DEMO_BUFFER_BYTES = 22400  # 200 digits samples of 112 bytes: a buffer far smaller than the stream


def export_task(run: str | Path, task: int, out: str | Path, variant: str = "sparse", profile: str | None = None,
                opset: int | None = None, stream: str | None = None, min_l1: float = 0.0) -> dict:
    """Export the snapshot of ``task`` in ``run`` under ``profile`` (default: the run's own); accuracy on
    the test data of ``stream`` (default: the run's own stream, if it is still there)."""
    import numpy as np

    from .deploy.export import export_variant
    from .deploy.snapshot import load_calibration, load_snapshot
    from .run_folder import run_profile
    from .device.profiles import load_profile
    from .evaluate import stream_tests

    model, meta = load_snapshot(run, task)
    prof = load_profile(profile) if profile else run_profile(run, meta)
    own = meta.get("stream")
    test = None
    if stream or (own and (Path(own) / "manifest.json").is_file()):
        parts = [p for p in stream_tests(stream or own, task, meta["spec"]) if p is not None]
        test = (np.concatenate([x for x, _, _ in parts]), np.concatenate([y for _, y, _ in parts])) if parts else None
    info = {"task": task, "task_classes": meta["task_classes"][: task + 1], "pattern": meta.get("pattern"),
            "providers": list(prof.providers)}
    return export_variant(model, meta["spec"], out, variant, info, calibration=load_calibration(run, task),
                          opset=opset or prof.opset, test=test, min_l1=min_l1)


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
    print(f"wrote {m.root}: {len(m.tasks)} tasks, {chunks} chunks, input {tuple(m.input_shape)} {m.dtype}, "
          f"{m.num_classes} classes" + (f", blurry boundaries of {args.blurry} chunks" if args.blurry else ""))


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


def _add_start_options(p: argparse.ArgumentParser, freeze: bool = True) -> None:
    """The options that choose a starting point (and, with ``freeze``, a frozen prefix) for a backbone."""
    p.add_argument("--init", metavar="FILE", help="start from this state dict (torchvision's ImageNet weights, a "
                   "'pretrain' output, a snapshot); the classifier is re-initialised when its shape differs")
    p.add_argument("--download-weights", action="store_true",
                   help="fetch torchvision's ImageNet weights of --model into torch's cache and start from them "
                   "(the only time anything is downloaded)")
    if freeze:
        p.add_argument("--freeze-until", metavar="LAYER", help="run the backbone up to this stage (e.g. layer3, "
                       "features.8) in inference mode without gradients; it is neither trained nor pruned")
        p.add_argument("--latent-replay", choices=("fp16", "uint8"),
                       help="with --freeze-until: the replay buffer keeps the frozen prefix's output in this form "
                       "instead of images")


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


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual, but prints a text with line breaks (a list of names) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.indent(text, indent) if "\n" in text else super()._fill_text(text, width, indent)


def _listing(sections: dict[str, dict[str, str]]) -> str:
    """Each heading, then one name per line with its description wrapped beside it."""
    width = max(60, min(shutil.get_terminal_size().columns - 2, 110))
    column = max(len(name) for names in sections.values() for name in names) + 4
    lines = []
    for heading, descriptions in sections.items():
        lines += ["", heading] if lines else [heading]
        for name, text in descriptions.items():
            lines += textwrap.wrap(text, width, initial_indent=f"  {name:<{column - 2}}",
                                   subsequent_indent=" " * column)
    return "\n".join(lines)


def _method_name(value: str) -> str:
    """A ``--method`` value: a method of the product list, or an ablation (runs saved under one resume)."""
    if value in METHOD_NAMES or value in ABLATION_NAMES:
        return value
    raise argparse.ArgumentTypeError(f"unknown method {value!r} (choose from {', '.join(METHOD_NAMES)})")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``esacl-edge`` command and its subcommands."""
    p = argparse.ArgumentParser(prog="esacl-edge", description="On-device continual learning of sparse models.")
    p.add_argument("--version", action="version", version=f"esacl-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="learn Split-Digits with EsaCL at 90%% sparsity and export ONNX")
    d.add_argument("--out", default="esacl-demo", help="folder for the stream, the run and the model (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "make-stream", help="write a data set as a chunk stream", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a data set as a class-incremental chunk stream (uint8 images, one folder per task).",
        epilog="data sets (--dataset):\n"
        "  digits              scikit-learn's bundled 8x8 digits\n"
        "  npz:PATH            uint8 arrays x_train, y_train, x_test, y_test (class_names optional), images\n"
        "                      NHWC or NHW (one channel); channels-first NCHW is refused\n"
        "  cifar10, cifar100   torchvision layout: ROOT/cifar-10-batches-py or ROOT/cifar-100-python.\n"
        "                      The official batches are Python pickles, which can run code when loaded:\n"
        "                      they are read only from the --root you name, never from anywhere else.\n"
        "  mnist, fashion-mnist  idx files (plain or .gz) in ROOT/MNIST/raw, ROOT/FashionMNIST/raw or ROOT\n"
        "                      itself, e.g. --root /usr/share/datasets/fashion-mnist (Debian's\n"
        "                      dataset-fashion-mnist package)\n"
        "  tiny-imagenet       ROOT/tiny-imagenet-200/{wnids.txt,train/<wnid>/images,val/val_annotations.txt};\n"
        "                      the val split is the test split\n"
        "  folder:PATH         one sub-folder of images per class; PATH/train + PATH/test if both exist,\n"
        "                      else a seeded stratified split (--test-fraction)\n"
        "Nothing is downloaded unless --download is given (cifar10, cifar100, mnist, fashion-mnist).")
    s.add_argument("--dataset", required=True, help="digits, npz:PATH, folder:PATH, cifar10, cifar100, mnist, "
                   "fashion-mnist or tiny-imagenet (see below)")
    s.add_argument("--out", required=True, help="stream folder to create (must not exist or be empty)")
    s.add_argument("--root", help="folder holding the data set (cifar10, cifar100, mnist, fashion-mnist, tiny-imagenet)")
    s.add_argument("--download", action="store_true", help="fetch the data set into --root if it is not there")
    s.add_argument("--tasks", type=int, default=5, help="number of tasks (classes split evenly; default: %(default)s)")
    s.add_argument("--classes-per-task", type=int, help="classes per task instead of --tasks (must divide the classes)")
    s.add_argument("--chunk-size", type=int, default=64, help="samples per chunk (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="shuffling, subsampling, splitting and class-order seed "
                   "(default: %(default)s)")
    s.add_argument("--per-class", type=int, help="keep at most this many training samples per class")
    s.add_argument("--test-per-class", type=int, help="keep at most this many test samples per class")
    s.add_argument("--classes", help="keep only these classes, e.g. 50-99 or 0,3,7 (labels keep their numbers; "
                   "default: all)")
    s.add_argument("--class-order", help="'random' (drawn with --seed) or comma-separated classes, e.g. 3,1,0,2,... "
                   "(default: 0..K-1)")
    s.add_argument("--image-size", help="resize images to N or HxW pixels (needed for folders of mixed sizes)")
    s.add_argument("--channels", type=int, choices=(1, 3), help="1 = greyscale, 3 = RGB (default: the source's; "
                   "RGB for folders)")
    s.add_argument("--test-fraction", type=float, default=0.2,
                   help="folder:PATH without train/ and test/: share of each class held out (default: %(default)s)")
    s.add_argument("--blurry", type=int, default=0, metavar="N",
                   help="blurry task boundaries: the N chunks either side of each boundary mix the two tasks, "
                   "the new task's share rising by 1/(2N+1) per chunk (default: 0, clean boundaries)")
    s.set_defaults(func=cmd_make_stream)

    methods_and_models = _listing({"methods (--method):": METHOD_DESCRIPTIONS,
                                   "models (--model):": MODEL_DESCRIPTIONS})
    bench_listing = _listing({"methods (--methods):": METHOD_DESCRIPTIONS,
                              "ablations (--methods; the variants BENCHMARKS.md compares):": ABLATION_DESCRIPTIONS,
                              "models (--model):": MODEL_DESCRIPTIONS})
    l = sub.add_parser("learn", help="learn a chunk stream, snapshot every task, write results.json",
                       description="Learn a chunk stream in order. The state is saved after every chunk, so "
                       "running the same command on the same --run resumes it and learns each chunk exactly once. "
                       "SIGINT/SIGTERM stop after the current chunk (exit status 130/143).",
                       formatter_class=_HelpFormatter, epilog=methods_and_models)
    l.add_argument("--profile", default="cpu", help="profile name (cpu, jetson_orin) or YAML path (default: %(default)s)")
    l.add_argument("--stream", required=True, help="chunk stream folder (with manifest.json)")
    l.add_argument("--run", default=DEFAULT_RUN, help="run folder for snapshots and results (default: %(default)s)")
    l.add_argument("--method", default="esacl", type=_method_name, metavar="METHOD",
                   help="continual-learning method, listed below (default: %(default)s)")
    l.add_argument("--sparsity", type=float, help="target sparsity in [0, 1) (default: the profile's)")
    l.add_argument("--seed", type=int, default=0)
    l.add_argument("--model", choices=MODEL_NAMES, help="backbone, listed below (default: by input shape)")
    l.add_argument("--buffer-bytes", type=int, help="replay buffer budget in bytes (default: the profile's)")
    l.add_argument("--overwrite", action="store_true",
                   help="start afresh, replacing a run already in --run (default: resume it)")
    l.add_argument("--follow", action="store_true",
                   help="keep waiting for new chunks (manifest entries or files in a task's chunk_dir)")
    l.add_argument("--poll", type=float, default=5.0, help="with --follow: seconds between looks (default: %(default)s)")
    l.add_argument("--max-idle", type=float,
                   help="with --follow: end (finishing the open task) after this many seconds without a new chunk")
    l.add_argument("--anytime", action="store_true", help="also evaluate after every chunk (anytime accuracy)")
    l.add_argument("--device", choices=("cpu", "cuda"), help="train on this device instead of the profile's")
    l.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                   help="training precision instead of the profile's: fp16 and bf16 are mixed precision (autocast; "
                        "fp16 with loss scaling); with --device, fp32 unless given")
    l.add_argument("--passes", type=int, help="passes over each chunk instead of the profile's")
    l.add_argument("--batch-size", type=int, help="minibatch size instead of the profile's (the memory "
                   "budget may lower it)")
    l.add_argument("--lr", type=float, help="SGD learning rate instead of the method's")
    l.add_argument("--pattern", choices=("2:4",), help="N:M structured sparsity for TensorRT sparse tensor cores")
    _add_start_options(l)
    l.add_argument("--quiet", action="store_true", help="no progress bar")
    l.set_defaults(func=cmd_learn)

    b = sub.add_parser("bench", help="compare methods on one stream over several seeds; table + bench.json",
                       formatter_class=_HelpFormatter, epilog=bench_listing)
    src = b.add_mutually_exclusive_group()
    src.add_argument("--stream", help="existing chunk stream folder")
    src.add_argument("--dataset", help="make a stream first (OUT/stream) from a make-stream data set: digits, "
                     "npz:PATH, folder:PATH, cifar10, ... (reused only when made with the same options)")
    b.add_argument("--root", help="with --dataset: folder holding it (cifar10, cifar100, mnist, fashion-mnist, "
                   "tiny-imagenet)")
    b.add_argument("--tasks", type=int, default=5, help="with --dataset (default: %(default)s)")
    b.add_argument("--chunk-size", type=int, default=64, help="with --dataset (default: %(default)s)")
    b.add_argument("--per-class", type=int, help="with --dataset: training samples per class")
    b.add_argument("--test-per-class", type=int, help="with --dataset: test samples per class")
    b.add_argument("--methods", default="esacl,derpp,sparcl,finetune",
                   help="comma-separated methods or ablations, listed below; METHOD@S sets the sparsity of one entry "
                   "(default: %(default)s)")
    b.add_argument("--sparsity", type=float, default=0.9, help="sparsity of entries without @ (default: %(default)s)")
    b.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    b.add_argument("--profile", default="cpu", help="profile name or YAML path (default: %(default)s)")
    b.add_argument("--passes", type=int, help="override the profile's passes per chunk")
    b.add_argument("--buffer-bytes", type=int, help="replay buffer budget in bytes (default: the profile's)")
    b.add_argument("--model", choices=MODEL_NAMES, help="backbone, listed below (default: by input shape)")
    b.add_argument("--anytime", action="store_true", help="also measure accuracy after every chunk")
    b.add_argument("--lr", type=float, help="SGD learning rate of every method instead of its own")
    _add_start_options(b)
    b.add_argument("--out", default="bench-out", help="output folder (default: %(default)s)")
    b.add_argument("--resume", action="store_true", help="keep the runs an interrupted bench into the same "
                   "--out completed with the same settings; run only the rest")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("pretrain", help="train a backbone offline on a labelled data set; write weights for --init",
                       description="Train a backbone (dense SGD, cosine schedule, crops and flips for colour) on the "
                       "chosen classes of a stream or an npz data set, report its held-out accuracy, and write its "
                       "state dict for 'learn --init'.", formatter_class=_HelpFormatter,
                       epilog=_listing({"models (--model):": MODEL_DESCRIPTIONS}))
    t.add_argument("--data", required=True, help="stream folder (with manifest.json) or npz file (x_train, y_train, "
                   "x_test, y_test: the make-stream npz format)")
    t.add_argument("--model", required=True, choices=MODEL_NAMES, metavar="MODEL", help="backbone, listed below")
    t.add_argument("--out", required=True, help="weights file to write (and FILE.json beside it)")
    t.add_argument("--classes", help="train on these classes only, e.g. 0-49 (default: all)")
    t.add_argument("--per-class", type=int, help="at most this many training samples per class")
    t.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    t.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle cosine schedule "
                   "(default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--profile", default="cpu", help="device profile: device, precision, batch size and the "
                   "training-memory budget (default: %(default)s)")
    _add_start_options(t, freeze=False)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_pretrain)

    pr = sub.add_parser("profiles", help="list device profiles, show one, or check a model against its budgets")
    pr.add_argument("action", nargs="?", default="list", choices=("list", "show", "check"))
    pr.add_argument("name", nargs="?", help="profile name or YAML path (show, check)")
    pr.add_argument("--model", default="small_cnn", choices=MODEL_NAMES, help="(default: %(default)s)")
    pr.add_argument("--input-shape", default="28,28,1", help="H,W,C of one stored sample (default: %(default)s)")
    pr.add_argument("--num-classes", type=int, default=10, help="(default: %(default)s)")
    pr.add_argument("--dtype", default="uint8", choices=("uint8", "float32"), help="input storage (default: %(default)s)")
    pr.add_argument("--method", default="esacl", type=_method_name, metavar="METHOD",
                    help="a method of 'esacl-edge learn --help' (default: %(default)s)")
    pr.add_argument("--freeze-until", metavar="LAYER", help="as for learn: the budgets of a frozen prefix")
    pr.add_argument("--latent-replay", choices=("fp16", "uint8"), help="as for learn: a buffer of latents")
    pr.set_defaults(func=cmd_profiles)

    e = sub.add_parser("export", help="export the model of one task to ONNX and check it with onnxruntime",
                       description="Export the model as it was at the end of task N (tasks count from 0) to a "
                       "single ONNX file, then compare onnxruntime with PyTorch; fails above 1e-4.")
    e.add_argument("--task", type=int, required=True, help="task number, counting from 0")
    e.add_argument("out", help="output .onnx file (not a folder)")
    e.add_argument("--run", default=DEFAULT_RUN, help="run folder (default: %(default)s)")
    e.add_argument("--variant", default="sparse", choices=("sparse", "dense", "structured", "int8"),
                   help="sparse: sparse initializers (default); dense; structured: unused units and channels "
                   "removed (small_cnn); int8: static quantization calibrated on the task's buffer samples")
    e.add_argument("--profile", help="device profile for the opset and providers (default: the one the run "
                   "learned with, kept in RUN/profile.yaml)")
    e.add_argument("--opset", type=int, help="ONNX opset, 7 to 23; int8 13 to 23 (default: the profile's)")
    e.add_argument("--stream", help="stream whose test data of tasks 0..N measures accuracy (default: the run's)")
    e.add_argument("--min-l1", type=float, default=0.0,
                   help="structured only, lossy: also remove units whose L1 norm is below this share of the "
                   "layer mean (default: 0, exact)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="accuracy of one task's snapshot on the test data of tasks 0..N of a stream",
                       description="Measure the model as it was at the end of task N on the test data of tasks "
                       "0..N of a stream: Class-IL and Task-IL accuracy per task and their means.")
    v.add_argument("--run", default=DEFAULT_RUN, help="run folder (default: %(default)s)")
    v.add_argument("--task", type=int, help="task number, counting from 0 (default: the run's last snapshot)")
    v.add_argument("--stream", help="stream whose test data is used (default: the run's)")
    v.add_argument("--json", help="also write the table to this JSON file")
    v.set_defaults(func=cmd_eval)
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


def main(argv: list[str] | None = None) -> int:
    """Run the command; exit status 2 on an input error, 130 when interrupted (also while torch loads)."""
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
