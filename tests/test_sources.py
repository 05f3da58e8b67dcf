"""Every make-stream source, read from tiny files written here in the real on-disk formats."""

import gzip
import json

import numpy as np
import pytest

from esacl_edge.cli import main
from esacl_edge.data.build import make_stream
from esacl_edge.data.stream import iter_chunks, load_test, read_manifest
from esacl_edge.errors import StreamError
from esacl_edge.streaming import StreamingLearner
from esacl_edge.runner import learn

from tests import formats

NAMES10 = [f"class{i}" for i in range(10)]


def images(per_class, classes=10, size=(32, 32), channels=3, seed=0):
    """Images whose pixel values encode the class (so a test can check labels travel with images)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.integers(0, 256, (len(y), *size, channels), dtype=np.uint8)
    x[:, 0, 0, 0] = y * 20
    return x, y


def labels_of(manifest):
    ys = [c.y for c in iter_chunks(manifest)]
    return np.concatenate(ys)


def check_stream(m, classes, tasks, train_per_class, chunk_size):
    assert m.num_classes == classes and len(m.tasks) == tasks
    y = labels_of(m)
    assert np.bincount(y, minlength=classes).tolist() == [train_per_class] * classes
    for t, task in enumerate(m.tasks):
        sizes = [len(c.y) for c in iter_chunks(m) if c.task == t]
        assert all(s == chunk_size for s in sizes[:-1]) and 0 < sizes[-1] <= chunk_size
        assert set(load_test(m, t)[1].tolist()) == set(task.classes)
    assert sorted(c for t in m.tasks for c in t.classes) == list(range(classes))


def stream_arrays(m):
    return [(c.x, c.y) for c in iter_chunks(m)]


def same_stream(a, b):
    return all(np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in
               zip(stream_arrays(a), stream_arrays(b), strict=True))


# ------------------------------------------------------------------------------------------ CIFAR
@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    x_tr, y_tr = images(6)
    x_te, y_te = images(2, seed=1)
    formats.write_cifar(root, x_tr, y_tr, x_te, y_te, NAMES10)
    return root


def test_cifar10_batches(cifar10_root, tmp_path):
    m = make_stream("cifar10", tmp_path / "s", tasks=5, chunk_size=5, root=cifar10_root)
    check_stream(m, 10, 5, 6, 5)
    assert m.input_shape == (32, 32, 3) and m.dtype == "uint8" and list(m.class_names) == NAMES10
    x, y = next(iter(stream_arrays(m)))
    assert np.array_equal(x[:, 0, 0, 0], y * 20)  # pixels and labels stay paired through the pickles
    assert len(m.normalization["mean"]) == 3 and m.normalization["scale"] == pytest.approx(1 / 255)
    # the batches folder itself is accepted as the root
    m2 = make_stream("cifar10", tmp_path / "s2", tasks=5, chunk_size=5, root=cifar10_root / "cifar-10-batches-py")
    assert same_stream(m, m2)


def test_cifar100_fine_labels(tmp_path):
    x_tr, y_tr = images(2, classes=100, size=(32, 32))
    x_te, y_te = images(1, classes=100, size=(32, 32), seed=1)
    formats.write_cifar(tmp_path / "root", x_tr, y_tr, x_te, y_te, [f"f{i}" for i in range(100)], fine=True)
    m = make_stream("cifar100", tmp_path / "s", tasks=10, chunk_size=8, root=tmp_path / "root")
    check_stream(m, 100, 10, 2, 8)
    assert [len(t.classes) for t in m.tasks] == [10] * 10 and m.class_names[99] == "f99"


def test_cifar_errors(cifar10_root, tmp_path):
    with pytest.raises(StreamError, match=r"cifar-10-batches-py not found under .*--download"):
        make_stream("cifar10", tmp_path / "s", root=tmp_path)
    with pytest.raises(StreamError, match="needs --root"):
        make_stream("cifar10", tmp_path / "s")
    bad = tmp_path / "bad"
    folder = bad / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in (cifar10_root / "cifar-10-batches-py").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:100])
    with pytest.raises(StreamError, match=r"data_batch_3: not a readable CIFAR python batch"):
        make_stream("cifar10", tmp_path / "s", root=bad)
    (folder / "test_batch").unlink()
    with pytest.raises(StreamError, match="missing test_batch"):
        make_stream("cifar10", tmp_path / "s", root=bad)
    assert not (tmp_path / "s").exists()


def test_download_only_when_asked(cifar10_root, tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(StreamError, match="not found under"):
        make_stream("cifar10", tmp_path / "s", root=tmp_path / "empty")
    assert calls == []
    with pytest.raises(StreamError, match=r"downloading cifar10 failed: OSError: network unreachable"):
        make_stream("cifar10", tmp_path / "s", root=tmp_path / "empty", download=True)
    with pytest.raises(StreamError, match=r"downloading mnist failed"):
        make_stream("mnist", tmp_path / "s", root=tmp_path / "empty", download=True)
    assert len(calls) == 2
    make_stream("cifar10", tmp_path / "s", root=cifar10_root, download=True, chunk_size=30)  # present: no fetch
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ MNIST family
@pytest.fixture(scope="module")
def mnist_arrays():
    x_tr, y_tr = images(8, size=(28, 28), channels=1)
    x_te, y_te = images(3, size=(28, 28), channels=1, seed=1)
    return x_tr, y_tr, x_te, y_te


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_torchvision_layout(mnist_arrays, tmp_path, gz):
    formats.write_mnist(tmp_path / "root" / "MNIST" / "raw", *mnist_arrays, gz=gz)
    m = make_stream("mnist", tmp_path / "s", tasks=2, chunk_size=16, root=tmp_path / "root")
    check_stream(m, 10, 2, 8, 16)
    assert m.input_shape == (28, 28, 1) and m.dtype == "uint8"
    assert [t.classes for t in m.tasks] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]


def test_fashion_mnist_debian_layout(mnist_arrays, tmp_path):
    # Debian's dataset-fashion-mnist: four .gz idx files in /usr/share/datasets/fashion-mnist
    formats.write_mnist(tmp_path / "datasets" / "fashion-mnist", *mnist_arrays, gz=True)
    a = make_stream("fashion-mnist", tmp_path / "a", tasks=5, chunk_size=7, root=tmp_path / "datasets" / "fashion-mnist")
    b = make_stream("fashion-mnist", tmp_path / "b", tasks=5, chunk_size=7, root=tmp_path / "datasets")
    check_stream(a, 10, 5, 8, 7)
    assert same_stream(a, b) and a.class_names[9] == "Ankle boot"
    c = make_stream("fashion-mnist", tmp_path / "c", tasks=5, chunk_size=7, root=tmp_path / "datasets",
                    image_size="32", channels=3)
    assert c.input_shape == (32, 32, 3) and len(c.normalization["std"]) == 3


def test_mnist_errors(mnist_arrays, tmp_path):
    with pytest.raises(StreamError, match=r"no mnist idx files .*--download"):
        make_stream("mnist", tmp_path / "s", root=tmp_path)
    raw = formats.write_mnist(tmp_path / "MNIST" / "raw", *mnist_arrays, gz=True)
    data = gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:1000]))
    with pytest.raises(StreamError, match=r"train-images-idx3-ubyte.gz: not a readable idx3 image file"):
        make_stream("mnist", tmp_path / "s", root=tmp_path)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(StreamError, match=r"train-images-idx3-ubyte.gz: not a readable"):
        make_stream("mnist", tmp_path / "s", root=tmp_path)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ Tiny-ImageNet
def test_tiny_imagenet(tmp_path):
    x_tr, y_tr = images(4, classes=4, size=(64, 64))
    x_te, y_te = images(2, classes=4, size=(64, 64), seed=1)
    wnids = ["n01443537", "n01629819", "n01641577", "n01644900"]
    formats.write_tiny_imagenet(tmp_path / "root", x_tr, y_tr, x_te, y_te, wnids)
    m = make_stream("tiny-imagenet", tmp_path / "s", tasks=2, chunk_size=3, root=tmp_path / "root")
    check_stream(m, 4, 2, 4, 3)
    assert m.input_shape == (64, 64, 3) and m.class_names[0] == "class 0"
    assert sum(len(load_test(m, t)[1]) for t in range(2)) == 8
    small = make_stream("tiny-imagenet", tmp_path / "small", tasks=2, chunk_size=3, root=tmp_path / "root",
                        image_size="32", per_class=2, test_per_class=1)
    check_stream(small, 4, 2, 2, 3)
    assert small.input_shape == (32, 32, 3)
    kw = {"tasks": 2, "chunk_size": 3, "root": tmp_path / "root", "per_class": 2, "image_size": "8"}
    a = make_stream("tiny-imagenet", tmp_path / "a", seed=5, **kw)
    assert same_stream(a, make_stream("tiny-imagenet", tmp_path / "b", seed=5, **kw))
    assert not same_stream(a, make_stream("tiny-imagenet", tmp_path / "c", seed=6, **kw))
    jpeg = tmp_path / "root" / "tiny-imagenet-200" / "val" / "images" / "val_3.JPEG"
    good = jpeg.read_bytes()
    jpeg.write_bytes(good[:50])
    with pytest.raises(StreamError, match=r"val_3.JPEG: cannot read the image"):
        make_stream("tiny-imagenet", tmp_path / "bad", root=tmp_path / "root")
    jpeg.write_bytes(good)
    ann = tmp_path / "root" / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(StreamError, match=r"val_annotations.txt:9: .*known wnid"):
        make_stream("tiny-imagenet", tmp_path / "bad", root=tmp_path / "root")
    with pytest.raises(StreamError, match="no Tiny-ImageNet here"):
        make_stream("tiny-imagenet", tmp_path / "bad", root=tmp_path)


# ------------------------------------------------------------------------------------------ image folders
@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "pets"
    x, y = images(10, classes=3, size=(20, 20))
    sizes = np.random.default_rng(0).integers(12, 40, (len(y), 2))
    return formats.write_folder(root, x, y, ["cat", "dog", "fox"], sizes=sizes)


def test_folder_split_and_resize(folder_root, tmp_path):
    m = make_stream(f"folder:{folder_root}", tmp_path / "s", tasks=3, chunk_size=4, image_size="16x24", seed=3)
    assert m.input_shape == (16, 24, 3) and list(m.class_names) == ["cat", "dog", "fox"]
    check_stream(m, 3, 3, 8, 4)  # 10 per class, 20% held out
    assert [len(load_test(m, t)[1]) for t in range(3)] == [2, 2, 2]
    again = make_stream(f"folder:{folder_root}", tmp_path / "again", tasks=3, chunk_size=4, image_size="16x24", seed=3)
    other = make_stream(f"folder:{folder_root}", tmp_path / "other", tasks=3, chunk_size=4, image_size="16x24", seed=4)
    assert same_stream(m, again) and not same_stream(m, other)
    grey = make_stream(f"folder:{folder_root}", tmp_path / "grey", tasks=3, image_size="8", channels=1,
                       per_class=3, test_fraction=0.5)
    assert grey.input_shape == (8, 8, 1)
    check_stream(grey, 3, 3, 3, 64)


def test_folder_train_test_subfolders(tmp_path):
    x, y = images(3, classes=2, size=(10, 10))
    formats.write_folder(tmp_path / "d" / "train", x, y, ["a", "b"])
    formats.write_folder(tmp_path / "d" / "test", x[[0, 3, 4]], y[[0, 3, 4]], ["a", "b"])
    m = make_stream(f"folder:{tmp_path / 'd'}", tmp_path / "s", tasks=2, chunk_size=2)
    check_stream(m, 2, 2, 3, 2)  # all three train images per class; nothing held out of train/
    assert [len(load_test(m, t)[1]) for t in range(2)] == [1, 2]


def test_folder_errors(folder_root, tmp_path):
    with pytest.raises(StreamError, match="pass --image-size"):
        make_stream(f"folder:{folder_root}", tmp_path / "s", tasks=3)
    with pytest.raises(StreamError, match="image folder not found"):
        make_stream(f"folder:{tmp_path / 'nope'}", tmp_path / "s")
    with pytest.raises(StreamError, match="--image-size must be"):
        make_stream(f"folder:{folder_root}", tmp_path / "s", image_size="0x5")
    broken = tmp_path / "broken"
    x, y = images(3, classes=2, size=(8, 8))
    formats.write_folder(broken, x, y, ["a", "b"])
    bad = min((broken / "b").iterdir())
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(StreamError, match=rf"{bad.name}: cannot read the image"):
        make_stream(f"folder:{broken}", tmp_path / "s", tasks=2)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


# ------------------------------------------------------------------------------------------ options
def test_seeded_class_order_and_subsampling(cifar10_root, tmp_path):
    kw = {"tasks": 5, "chunk_size": 4, "root": cifar10_root, "class_order": "random", "per_class": 4,
          "test_per_class": 1}
    a = make_stream("cifar10", tmp_path / "a", seed=1, **kw)
    b = make_stream("cifar10", tmp_path / "b", seed=1, **kw)
    c = make_stream("cifar10", tmp_path / "c", seed=2, **kw)
    assert [t.classes for t in a.tasks] == [t.classes for t in b.tasks] and same_stream(a, b)
    assert [t.classes for t in a.tasks] != [t.classes for t in c.tasks]
    assert sorted(c for t in a.tasks for c in t.classes) == list(range(10))
    check_stream(a, 10, 5, 4, 4)
    d = make_stream("cifar10", tmp_path / "d", chunk_size=4, root=cifar10_root, classes_per_task=5)
    assert [t.classes for t in d.tasks] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    with pytest.raises(StreamError, match="must divide"):
        make_stream("cifar10", tmp_path / "e", root=cifar10_root, classes_per_task=3)


def test_unknown_dataset_and_download_refused(tmp_path):
    with pytest.raises(StreamError, match="unknown dataset 'cifar11'"):
        make_stream("cifar11", tmp_path / "s")
    with pytest.raises(StreamError, match="--per-class must be >= 1"):
        make_stream("digits", tmp_path / "s", per_class=0)
    with pytest.raises(StreamError, match="--download is available for"):
        make_stream("digits", tmp_path / "s", download=True)


def test_output_must_be_fresh(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "other.txt").write_text("mine")
    with pytest.raises(StreamError, match="not an empty folder"):
        make_stream("digits", tmp_path / "s")
    assert (tmp_path / "s" / "other.txt").read_text() == "mine"
    (tmp_path / "e").mkdir()
    assert make_stream("digits", tmp_path / "e", per_class=5, chunk_size=8).root == tmp_path / "e"


# ------------------------------------------------------------------------------------------ blurry boundaries
def test_blurry_boundaries(tmp_path):
    m = make_stream("digits", tmp_path / "s", tasks=5, chunk_size=9, per_class=18, test_per_class=3, blurry=1)
    clean = make_stream("digits", tmp_path / "c", tasks=5, chunk_size=9, per_class=18, test_per_class=3)
    assert [len(t.chunks) for t in m.tasks] == [4] * 5
    chunks = list(iter_chunks(m))
    for t, task in enumerate(m.tasks):  # blurry_classes: exactly the neighbours' classes found in the chunks
        seen = set(np.concatenate([c.y for c in chunks if c.task == t]).tolist()) - set(task.classes)
        neighbours = {c for u in (t - 1, t + 1) if 0 <= u < 5 for c in m.tasks[u].classes}
        assert set(task.blurry_classes) == seen and seen and seen <= neighbours
    assert all(not t.blurry_classes for t in clean.tasks)
    for c in chunks:
        own = np.isin(c.y, m.tasks[c.task].classes)
        first, last = c.index == 0 and c.task > 0, c.index == 3 and c.task < 4
        # the chunks either side of a boundary swap round(9 / 3) = 3 samples; the rest are clean
        assert (~own).sum() == (3 if first or last else 0)
    assert sorted(labels_of(m).tolist()) == sorted(labels_of(clean).tolist())
    for t in range(5):  # test splits stay clean
        assert set(load_test(m, t)[1].tolist()) == set(m.tasks[t].classes)
    raw = json.loads((m.root / "manifest.json").read_text())
    assert raw["version"] == 1 and raw["tasks"][0]["blurry_classes"] == list(m.tasks[0].blurry_classes)
    assert "blurry_classes" not in json.loads((clean.root / "manifest.json").read_text())["tasks"][0]
    two = make_stream("digits", tmp_path / "two", tasks=2, chunk_size=10, per_class=10, test_per_class=2, blurry=2)
    mixed = [int((~np.isin(c.y, two.tasks[c.task].classes)).sum()) for c in iter_chunks(two)]
    assert mixed == [0, 0, 0, 2, 4, 4, 2, 0, 0, 0]  # shares 1/5 and 2/5 of a chunk of 10, either side
    with pytest.raises(StreamError, match="--blurry 3 needs at least 6 chunks in task 1"):
        make_stream("digits", tmp_path / "x", tasks=5, chunk_size=9, per_class=18, blurry=3)


def test_blurry_classes_in_manifest_are_validated(tmp_path):
    m = make_stream("digits", tmp_path / "s", tasks=5, chunk_size=9, per_class=18, test_per_class=3, blurry=1)
    path = m.root / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["tasks"][1]["blurry_classes"]
    path.write_text(json.dumps(raw))
    with pytest.raises(StreamError, match=r"labels \[\d(, \d)*\] are not classes of this task"):
        list(iter_chunks(read_manifest(m.root)))
    raw["tasks"][1]["blurry_classes"] = [2]
    path.write_text(json.dumps(raw))
    with pytest.raises(StreamError, match=r"tasks\[1\]: blurry_classes must be .* not among the task's classes"):
        read_manifest(m.root)


def test_learner_keeps_declared_classes_on_blurry_chunks(tmp_path, fast_profile):
    m = make_stream("digits", tmp_path / "s", tasks=2, chunk_size=8, per_class=8, test_per_class=4, blurry=1)
    r = learn(m.root, fast_profile, run_dir=tmp_path / "run", seed=0, progress=False)
    assert len(r["acc_matrix_class_il"]) == 2 and r["final_acc_task_il"] > 0.2
    learner = StreamingLearner("small_cnn", fast_profile, 10, (8, 8, 1), input_dtype="uint8")
    chunk = next(c for c in iter_chunks(m) if c.task == 0 and c.index == len(m.tasks[0].chunks) - 1)
    learner.begin_task(0, 1, list(m.tasks[0].classes))
    learner.observe(chunk.x, chunk.y, 0)
    assert set(chunk.y.tolist()) - set(m.tasks[0].classes)  # the chunk holds a class of task 1 ...
    assert learner.task_classes[0] == sorted(m.tasks[0].classes)  # ... which Task-IL does not count as task 0's


# ------------------------------------------------------------------------------------------ command line
def test_cli_make_stream(cifar10_root, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["make-stream", "--dataset", "cifar10", "--root", str(cifar10_root), "--out", str(out),
                 "--tasks", "2", "--chunk-size", "10", "--class-order", "random", "--blurry", "1",
                 "--image-size", "16"]) == 0
    assert "2 tasks" in capsys.readouterr().out
    m = read_manifest(out)
    assert m.input_shape == (16, 16, 3) and m.tasks[0].blurry_classes
    assert main(["make-stream", "--dataset", "cifar10", "--root", str(tmp_path / "none"), "--out",
                 str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("esacl-edge: error: ") and "not found under" in err and "Traceback" not in err
    assert main(["make-stream", "--dataset", "digits", "--out", str(tmp_path / "u"), "--class-order", "1,x"]) == 2
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


def test_help_says_cifar_batches_are_pickles(capsys):
    with pytest.raises(SystemExit):
        main(["make-stream", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pickles" in text and "only from the --root you name" in text
