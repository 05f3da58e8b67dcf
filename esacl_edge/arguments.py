"""The command line's options: one builder per subcommand, each returning its parser (``cli.py`` gives
each its function). Importing this module loads no heavy dependency."""

from __future__ import annotations

import argparse
import shutil
import textwrap

from . import __version__
from .names import (ABLATION_DESCRIPTIONS, ABLATION_NAMES, METHOD_DESCRIPTIONS, METHOD_NAMES, MODEL_DESCRIPTIONS,
                    MODEL_NAMES)

DEFAULT_RUN = "esacl-run"


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


def command_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``esacl-edge`` parser and the holder its subcommands are added to."""
    p = argparse.ArgumentParser(prog="esacl-edge", description="On-device continual learning of sparse models.")
    p.add_argument("--version", action="version", version=f"esacl-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    return p, sub


def demo(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``demo`` subcommand's options."""
    d = sub.add_parser("demo", help="learn Split-Digits with EsaCL at 90%% sparsity and export ONNX")
    d.add_argument("--out", default="esacl-demo", help="folder for the stream, the run and the model (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    return d


def make_stream(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``make-stream`` subcommand's options."""
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
    s.add_argument("--tasks", type=int, default=5,
                   help="number of tasks; the classes are split as evenly as they go, the first tasks taking one "
                   "more where they do not divide (10 classes in 3 tasks: 4, 3, 3; default: %(default)s)")
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
    return s


def learn(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``learn`` subcommand's options."""
    methods_and_models = _listing({"methods (--method):": METHOD_DESCRIPTIONS,
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
    return l


def bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``bench`` subcommand's options."""
    bench_listing = _listing({"methods (--methods):": METHOD_DESCRIPTIONS,
                              "ablations (--methods; the variants BENCHMARKS.md compares):": ABLATION_DESCRIPTIONS,
                              "models (--model):": MODEL_DESCRIPTIONS})
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
    return b


def pretrain(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``pretrain`` subcommand's options."""
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
    return t


def profiles(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``profiles`` subcommand's options."""
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
    return pr


def export(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``export`` subcommand's options."""
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
    return e


def evaluate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``eval`` subcommand's options."""
    v = sub.add_parser("eval", help="accuracy of one task's snapshot on the test data of tasks 0..N of a stream",
                       description="Measure the model as it was at the end of task N on the test data of tasks "
                       "0..N of a stream: Class-IL and Task-IL accuracy per task and their means.")
    v.add_argument("--run", default=DEFAULT_RUN, help="run folder (default: %(default)s)")
    v.add_argument("--task", type=int, help="task number, counting from 0 (default: the run's last snapshot)")
    v.add_argument("--stream", help="stream whose test data is used (default: the run's)")
    v.add_argument("--json", help="also write the table to this JSON file")
    return v
