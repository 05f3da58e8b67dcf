"""Parts of a method on their own: each built against a hand-made context, no learner."""

import numpy as np
import pytest
import torch
from torch import nn

from esacl_edge.learn import sdp
from esacl_edge.learn.buffer import BufferLayout, BufferStore, ReservoirBuffer, new_buffer
from esacl_edge.learn.context import Context
from esacl_edge.learn.cost import CostMeter, layer_forward_flops
from esacl_edge.learn.precision import MixedPrecision
from esacl_edge.learn.pruning import Pruning
from esacl_edge.learn.select import IdsSelect
from esacl_edge.learn.state import Generators, TaskProgress
from esacl_edge.learn.step import Batch, ChunkRecord
from esacl_edge.models import build_model

CPU = torch.device("cpu")


def context(model: nn.Module, *, target_sparsity: float = 0.0, buffer_bytes: int = 0, num_classes: int = 10,
            shape: tuple = (8, 8, 1), seed: int = 0, parts: tuple = ()) -> tuple[Context, list[str]]:
    """A context around ``model`` (fp32, CPU, a buffer of uint8 images of ``shape``); the list records each
    masks-changed event, which ``parts`` are told of as a learner tells its parts."""
    events: list[str] = []

    def masks_changed():
        events.append("masks")
        for part in parts:
            part.masks_changed(ctx)

    layout = BufferLayout(shape, "uint8")
    buffer = new_buffer(buffer_bytes, shape, "uint8", num_classes)

    def train_inputs(x):
        return torch.as_tensor(np.asarray(x), dtype=torch.float32).permute(0, 3, 1, 2)

    flops = layer_forward_flops(model, shape) if any(p.dim() > 1 for p in model.parameters()) else {}
    ctx = Context(model, model, torch.optim.SGD([*model.parameters()] or [nn.Parameter(torch.zeros(1))], lr=0.1), MixedPrecision(CPU), CostMeter(flops),
                  CPU, Generators.from_seed(seed), num_classes, target_sparsity, None, 1, 16, seed, "test",
                  BufferStore(buffer, layout, CPU, train_inputs), train_inputs,
                  on_masks_changed=masks_changed, train_offline=lambda x, y: None)
    return ctx, events


def _density(pruning: Pruning) -> float:
    return sdp.live(pruning.state) / sdp.size(pruning.state)


def test_the_pruning_schedule_reaches_the_target_by_the_first_tasks_end_and_regrows_at_the_next():
    torch.manual_seed(0)
    model = build_model("small_cnn", (8, 8, 1), 10)
    pruning = Pruning(score="magnitude", warmup=0.0, regrow_steps=1)
    ctx, events = context(model, target_sparsity=0.8, parts=(pruning,))
    pruning.bind(ctx)
    ctx.masks = pruning.state.masks

    ctx.progress = TaskProgress(task=0, n_chunks=4, first_task=True)
    pruning.begin_task(ctx)
    densities = []
    for done in range(1, 5):
        ctx.progress.chunks_done = done
        pruning.after_chunk(ctx, None)
        densities.append(_density(pruning))
    # The cubic schedule from dense to the target over the first task's 4 chunks.
    want = [sdp.cubic_density(1.0, 0.2, k, 4) for k in range(1, 5)]
    assert densities == pytest.approx(want, abs=1e-3) and densities[-1] == pytest.approx(0.2, abs=1e-3)
    assert events == ["masks"] * 4 and len(pruning.events) == 4
    zeros = {n: int((p == 0).sum()) for n, p in dict(model.named_parameters()).items() if n in ctx.masks}
    assert zeros == {n: int((~m).sum()) for n, m in ctx.masks.items()}  # pruned weights are zero

    # The second task: after its first step, regrowth at zero where |grad| is largest.
    ctx.progress = TaskProgress(task=1, n_chunks=4, first_task=False)
    pruning.begin_task(ctx)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    pruning.after_backward(ctx, Batch(x, y))
    ctx.progress.steps = 1
    pruning.after_update(ctx, Batch(x, y))
    assert _density(pruning) == pytest.approx(0.2 + pruning.regrow_frac, abs=1e-3)
    assert events[-1] == "masks" and "regrown" in pruning.events[-1]


def test_the_first_task_does_not_regrow():
    model = build_model("small_cnn", (8, 8, 1), 10)
    ctx, events = context(model, target_sparsity=0.8)
    pruning = Pruning(score="magnitude", warmup=0.0, regrow_steps=1)
    pruning.bind(ctx)
    ctx.progress = TaskProgress(task=0, n_chunks=4, first_task=True, steps=1)
    pruning.after_update(ctx, None)
    assert events == [] and _density(pruning) == 1.0


def test_ids_selection_keeps_the_highest_loss_samples_of_each_class():
    logits_model = nn.Identity()   # the logits are the inputs
    ctx, _ = context(logits_model, num_classes=2)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    right = torch.tensor([3.0, 1.0, -1.0, 0.0, 2.0, -2.0, 0.5, 1.5])   # logit of the true class over the other
    x = torch.zeros(8, 2)
    x[torch.arange(8), y] = right
    keep, logits, scores = IdsSelect(keep=0.5).select(ctx, x, y)
    assert torch.equal(logits, x) and torch.equal(scores, nn.functional.cross_entropy(x, y, reduction="none"))
    # The two least-fitting samples of each class: class 0's margins -1, 0; class 1's -2, 0.5.
    assert sorted(keep.tolist()) == [2, 3, 5, 6]


def test_the_reservoir_buffer_keeps_every_sample_seen_with_equal_probability():
    kept_early = []
    for seed in range(200):
        ctx, _ = context(nn.Identity(), buffer_bytes=10 * (64 + 8 + 40), seed=seed)
        part, buf = ReservoirBuffer(), ctx.store.buffer
        assert buf.capacity == 10
        for c in range(10):   # 10 chunks of 10 samples; sample i has label i // 10 (its chunk)
            x = np.zeros((10, 8, 8, 1), np.uint8)
            y = np.full(10, c)
            part.after_chunk(ctx, ChunkRecord(x, y, 0, torch.zeros(10, 10), torch.zeros(10), torch.zeros(10)))
        assert buf.size == 10 and buf.seen == 100
        kept_early.append(int((buf.y[: buf.size] < 5).sum()))
    # Half the samples seen came in the first 5 chunks: about half of what is kept is theirs.
    assert np.mean(kept_early) == pytest.approx(5.0, abs=0.5)
