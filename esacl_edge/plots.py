"""PNG plots of a bench report and of one learn run: accuracy matrices, accuracy vs training FLOPs,
per-layer sparsity. matplotlib (Agg backend) is imported on first use."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .reports import percent

MATRIX_TITLES = {"acc_matrix_class_il": "Class-IL accuracy (%)", "acc_matrix_task_il": "Task-IL accuracy (%)"}
RUN_PLOTS = (*(f"{key}.png" for key in MATRIX_TITLES), "layer_sparsity.png")  # what write_run_plots may write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _square(rows: list[list[float]]) -> np.ndarray:
    """A lower-triangular accuracy matrix (row i has i + 1 entries) in percent, NaN above the diagonal."""
    n = len(rows)
    return 100 * np.array([list(row) + [np.nan] * (n - len(row)) for row in rows], dtype=float)


MAX_ANNOTATED = 20  # tasks up to which every cell is written on the matrix
MAX_INCHES = 12     # the largest side of a matrix figure


def _colour_range(matrices: list[np.ndarray]) -> tuple[float, float]:
    """The colour scale's ends: the accuracies' own range (at least 5 points wide), so that 90 and 100% differ."""
    values = np.concatenate([m[~np.isnan(m)] for m in matrices]) if matrices else np.array([0.0, 100.0])
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 100.0)
    if high - low < 5:
        low, high = max(0.0, high - 5), max(high, 5.0)
    return low, high


def _heatmap(ax, matrix: np.ndarray, title: str, scale: tuple[float, float] | None = None):
    """One accuracy matrix on ``ax``: rows = after task i, columns = task j; cells annotated up to
    ``MAX_ANNOTATED`` tasks, ticks thinned beyond."""
    low, high = scale or _colour_range([matrix])
    image = ax.imshow(matrix, vmin=low, vmax=high, cmap="viridis")
    n = matrix.shape[0]
    if n <= MAX_ANNOTATED:
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="w" if v < low + 0.6 * (high - low) else "k")
    ticks = np.arange(0, n, max(1, -(-n // MAX_ANNOTATED)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after task")
    return image


def _layer_bars(ax, runs: list[dict], title: str) -> None:
    """Grouped bars of each run's ``layer_sparsity`` (fractions), one group per layer."""
    layers = list(runs[0]["layer_sparsity"])
    width = 0.8 / len(runs)
    for k, r in enumerate(runs):
        ax.bar(np.arange(len(layers)) + k * width, [100 * r["layer_sparsity"][n] for n in layers], width,
               label=r.get("label", r.get("method")))
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2)
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_xlabel("layer (prunable weights)")
    ax.set_ylabel("sparsity (% of weights zero)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def plot_report(report: dict, out: str | Path) -> list[Path]:
    """Write the three plots next to ``bench.json``; returns their paths."""
    plt = _pyplot()
    out = Path(out)
    labels = [row["label"] for row in report["summary"]]
    runs = [r for r in report["runs"] if not r.get("diverged")]  # a diverged run has no results to draw
    paths = []

    # Accuracy matrices (Class-IL), mean over seeds, one panel per method, one colour bar.
    fig, axes = plt.subplots(1, len(labels), figsize=(min(2.6 * len(labels) + 1, 4 * MAX_INCHES), 3.2), squeeze=False,
                             layout="constrained")
    image, means = None, {}
    for label in labels:
        mats = [_square(r["acc_matrix_class_il"]) for r in runs if r["label"] == label]
        if mats:
            with warnings.catch_warnings():  # the upper triangle is all-NaN by design
                warnings.simplefilter("ignore", RuntimeWarning)
                means[label] = np.nanmean(np.stack(mats), axis=0)
    scale = _colour_range(list(means.values()))
    for ax, label in zip(axes[0], labels):
        if label not in means:
            ax.set_title(f"{label}: every run diverged", fontsize=9)
            ax.axis("off")
            continue
        image = _heatmap(ax, means[label], label, scale)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)", shrink=0.8)
    seeds = report.get("seeds", 1)
    fig.suptitle(f"Class-IL accuracy (%), {'mean over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}: "
                 "row = after task i, column = task j", fontsize=10)
    paths.append(_save(plt, fig, out / "acc_matrix_class_il.png"))

    # Final Class-IL accuracy against training FLOPs.
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for row in report["summary"]:
        ax.errorbar(row["train_flops"]["mean"], 100 * row["final_acc_class_il"]["mean"],
                    xerr=row["train_flops"]["std"], yerr=100 * row["final_acc_class_il"]["std"], fmt="o", capsize=3)
        ax.annotate(row["label"], (row["train_flops"]["mean"], 100 * row["final_acc_class_il"]["mean"]),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (RigL convention)")
    ax.set_ylabel("final Class-IL accuracy (%)")
    ax.set_title("Final Class-IL accuracy vs training FLOPs (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out / "accuracy_vs_flops.png"))

    # Per-layer sparsity of the first seed's final model, for the methods that prune.
    sparse = [r for r in runs if r["seed"] == 0 and r["sparsity"] > 0]
    if sparse:
        n_layers = len(sparse[0]["layer_sparsity"])
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * n_layers * len(sparse) / 2), 4), layout="constrained")
        shown = ", ".join(r.get("label", r.get("method")) for r in sparse)
        _layer_bars(ax, sparse, f"Per-layer sparsity of the final model (seed 0): {shown}")
        paths.append(_save(plt, fig, out / "layer_sparsity.png"))
    return paths


def write_run_plots(results: dict, folder: str | Path) -> list[Path]:
    """Write the Class-IL and Task-IL accuracy matrices and, for a sparse model, its per-layer sparsity,
    from one learn run's ``results.json`` dict into ``folder``; returns the paths written (none for
    matrices before the first task ends)."""
    plt = _pyplot()
    folder = Path(folder)
    method = results.get("method", "run")
    paths = []
    for key, metric in MATRIX_TITLES.items():
        if not results.get(key):
            continue
        matrix = _square(results[key])
        side = min(1.0 * len(matrix), MAX_INCHES - 2.5)
        fig, ax = plt.subplots(figsize=(side + 2.5, 0.9 * side + 1.8), layout="constrained")
        fig.colorbar(_heatmap(ax, matrix, f"{method}: {metric}"), ax=ax, label="accuracy (%)", shrink=0.9)
        paths.append(_save(plt, fig, folder / f"{key}.png"))
    if results.get("layer_sparsity") and results.get("sparsity", 0) > 0:
        n_layers = len(results["layer_sparsity"])
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * n_layers), 4), layout="constrained")
        _layer_bars(ax, [results], f"{method}: per-layer sparsity at the end of the run "
                                   f"({percent(results['sparsity'])} overall)")
        paths.append(_save(plt, fig, folder / "layer_sparsity.png"))
    return paths
