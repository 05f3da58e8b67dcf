"""``esacl-edge pretrain``: train a backbone offline on a labelled data set and write a weights file for ``--init``.

This is the starting point for a user without ImageNet weights, or with a domain of their own:
train on the classes available now (a stream, or an npz as ``make-stream`` reads it), then learn
the new ones on the device from these weights. The learner's training step with dense SGD (Nesterov
momentum, weight decay) under a one-cycle schedule; random crops (4-pixel padding) and horizontal flips for colour images. The held-out
accuracy is measured on the data set's test split of the chosen classes (or, where it has none,
on a seeded 10% of their training samples).

Output: ``FILE`` holds the backbone's state dict (torchvision's key names for its networks, so
any tool that reads those reads it), written atomically; ``FILE.json`` says what it is.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.build import measure_normalization, parse_classes
from .data.sources import load_npz_source
from .data.stream import iter_chunks, load_test, read_manifest
from .device.profiles import Profile, load_profile
from .device.transfer import to_device
from .errors import EsaclError
from .files import atomic_write, write_json
from .learn.forward import minibatches
from .learn.learner import Learner
from .learn.methods import Method
from .learn.optim import Sgd
from .learn.step import mean_loss, train_step

HOLDOUT = 0.1  # share of each class held out where the data set has no test split


def read_labelled(data: str | Path) -> tuple[dict[str, np.ndarray], int, list[str] | None, dict | None]:
    """(arrays x_train, y_train, x_test, y_test; number of classes; class names; normalisation or None) of a
    stream folder or an npz file (``npz:PATH`` or ``PATH.npz``)."""
    path = Path(str(data).removeprefix("npz:"))
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        chunks = list(iter_chunks(manifest))
        tests = [load_test(manifest, t) for t, task in enumerate(manifest.tasks) if task.test]
        arrays = {"x_train": np.concatenate([c.x for c in chunks]), "y_train": np.concatenate([c.y for c in chunks]),
                  "x_test": np.concatenate([x for x, _ in tests]) if tests else np.zeros((0, *manifest.input_shape)),
                  "y_test": np.concatenate([y for _, y in tests]) if tests else np.zeros(0, np.int64)}
        names = list(manifest.class_names) if manifest.class_names else None
        return arrays, manifest.num_classes, names, dict(manifest.normalization)
    if path.suffix == ".npz" or str(data).startswith("npz:"):
        src = load_npz_source(path)
        return ({"x_train": src.x_train, "y_train": src.y_train, "x_test": src.x_test, "y_test": src.y_test},
                src.num_classes, src.class_names, None)
    raise EsaclError(f"{data}: neither a stream folder (with manifest.json) nor an .npz data set")


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips, per sample (NCHW float, on its device); the draws
    come from ``gen`` (a CPU generator)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    out[flip] = out[flip].flip(3)
    return out


def pretrain(data: str | Path, model: str, out: str | Path, *, classes: str | list[int] | None = None,
             epochs: int = 10, profile: str | Path | Profile = "cpu", lr: float = 0.05, seed: int = 0,
             init: str | Path | None = None, per_class: int | None = None, progress: bool = True) -> dict:
    """Train backbone ``model`` on ``classes`` of ``data``; write its weights to ``out`` (+ ``out.json``).

    The epochs run through the learner's own training step (``learn/step.py``) with a dense method
    whose optimizer is SGD with Nesterov momentum and weight decay, under a one-cycle schedule; the
    minibatch order, augmentation and initialisation draw from the learner's generators, seeded by
    ``seed`` (nothing global). Returns the report written to ``out.json``: held-out accuracy per
    epoch, time, settings.
    """
    out = Path(out)
    if out.is_dir():
        raise EsaclError(f"{out}: is a folder; give a file name for the weights")
    if epochs < 1:
        raise EsaclError(f"--epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise EsaclError(f"--lr must be > 0, got {lr}")
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    arrays, num_classes, names, normalization = read_labelled(data)
    chosen = parse_classes(classes, num_classes) if classes is not None else sorted(np.unique(arrays["y_train"]))
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(np.isin(arrays["y_train"], chosen))
    if per_class is not None:
        train = np.concatenate([rng.permutation(train[arrays["y_train"][train] == c])[:per_class] for c in chosen])
    test = np.flatnonzero(np.isin(arrays["y_test"], chosen))
    x_tr, y_tr = arrays["x_train"][train], arrays["y_train"][train]
    if len(test):
        x_te, y_te = arrays["x_test"][test], arrays["y_test"][test]
    else:
        held = rng.random(len(y_tr)) < HOLDOUT
        x_te, y_te, x_tr, y_tr = x_tr[held], y_tr[held], x_tr[~held], y_tr[~held]
    if len(y_tr) < 2 or len(y_te) == 0:
        raise EsaclError(f"{data}: classes {chosen[0]}..{chosen[-1]} have {len(y_tr)} training and {len(y_te)} "
                         "held-out samples; pretraining needs at least 2 and 1")
    label = np.full(num_classes, -1, np.int64)
    label[chosen] = np.arange(len(chosen))  # the head has one output per chosen class, in order
    input_shape = tuple(x_tr.shape[1:])
    dtype = "uint8" if x_tr.dtype == np.uint8 else "float32"
    norm = normalization or measure_normalization(x_tr, 1.0 / 255.0 if dtype == "uint8" else 1.0)
    method = Method("pretrain", optimizer=Sgd(lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True))
    learner = Learner(model, prof, len(chosen), input_shape, method=method, sparsity=0.0, buffer_bytes=0,
                      input_dtype=dtype, normalization=norm, seed=seed, init=init)
    ctx, batch = learner.ctx, learner.ctx.batch_size
    steps = epochs * -(-len(y_tr) // batch)  # minibatches per epoch: equal splits of at most batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(learner.optimizer, lr, total_steps=steps, pct_start=0.15)
    x_tr = x_tr.astype(dtype, copy=False)
    y_train = to_device(label[y_tr], learner.device)
    y_held = label[y_te]
    history, start = [], time.perf_counter()
    for epoch in tqdm(range(epochs), desc="pretrain", unit="epoch", disable=not progress):
        ctx.trainable.train()
        losses = []
        for idx in minibatches(torch.from_numpy(ctx.rngs.order.permutation(len(y_tr))), batch):
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            x = learner.train_inputs(x_tr[idx.numpy()])
            if input_shape[2] == 3:
                x = augment(x, ctx.rngs.torch)
            idx = to_device(idx, learner.device)
            losses.append(train_step(ctx, learner.method, x, y_train[idx], idx)[0])
            schedule.step()
        loss = mean_loss(losses, learner.precision.scales_loss)
        if not np.isfinite(loss):
            raise EsaclError(f"pretraining diverged in epoch {epoch + 1} (loss {loss:.3g}); lower --lr")
        acc = float((learner.logits(x_te.astype(dtype, copy=False)).argmax(1).cpu().numpy() == y_held).mean())
        history.append({"epoch": epoch + 1, "loss": loss, "heldout_acc": acc})
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {loss:.3f}, held-out accuracy {100 * acc:.1f}%")
    seconds = time.perf_counter() - start
    state = {k: v.detach().cpu().clone() for k, v in learner.model[1].state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    report = {"model": model, "file": str(out), "bytes": out.stat().st_size, "data": str(data),
              "classes": [int(c) for c in chosen],
              "class_names": [names[c] for c in chosen] if names else None, "input_shape": list(input_shape),
              "normalization": norm, "train_samples": int(len(y_tr)), "heldout_samples": int(len(y_te)),
              "heldout": "test split" if len(test) else f"{HOLDOUT:.0%} of the training samples",
              "epochs": epochs, "lr": lr, "batch_size": batch, "seed": seed, "init": learner.init,
              "device": str(learner.device), "precision": learner.precision.name,
              "train_gflops": learner.cost.flops / 1e9, "train_seconds": seconds,
              "heldout_acc": history[-1]["heldout_acc"], "history": history}
    write_json(out.with_name(out.name + ".json"), report)
    return report
