"""PNG plots of a bench report: accuracy matrices, accuracy vs training FLOPs, per-layer sparsity."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: dict, out: str | Path) -> list[Path]:
    """Write the three plots next to ``bench.json``; returns their paths."""
    plt = _pyplot()
    out = Path(out)
    labels = [row["label"] for row in report["summary"]]
    runs = report["runs"]
    paths = []

    # Accuracy matrices (Class-IL), mean over seeds, one panel per method.
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels), 2.8), squeeze=False)
    for ax, label in zip(axes[0], labels):
        mats = [np.array([row + [np.nan] * (len(r["acc_matrix_class_il"]) - len(row))
                          for row in r["acc_matrix_class_il"]]) for r in runs if r["label"] == label]
        with warnings.catch_warnings():  # the upper triangle is all-NaN by design
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = 100 * np.nanmean(np.stack(mats), axis=0)
        ax.imshow(mean, vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(mean):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("task evaluated")
        ax.set_ylabel("after task")
    paths.append(_save(plt, fig, out / "acc_matrix_class_il.png"))

    # Final Class-IL accuracy against training FLOPs.
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["summary"]:
        ax.errorbar(row["train_flops"]["mean"], 100 * row["final_acc_class_il"]["mean"],
                    xerr=row["train_flops"]["std"], yerr=100 * row["final_acc_class_il"]["std"], fmt="o", capsize=3)
        ax.annotate(row["label"], (row["train_flops"]["mean"], 100 * row["final_acc_class_il"]["mean"]),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (RigL convention)")
    ax.set_ylabel("final Class-IL accuracy (%)")
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out / "accuracy_vs_flops.png"))

    # Per-layer sparsity of the first seed's final model, for the methods that prune.
    sparse = [r for r in runs if r["seed"] == 0 and r["sparsity"] > 0]
    if sparse:
        layers = list(sparse[0]["layer_sparsity"])
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) * len(sparse) / 2), 4))
        width = 0.8 / len(sparse)
        for k, r in enumerate(sparse):
            ax.bar(np.arange(len(layers)) + k * width, [100 * r["layer_sparsity"][n] for n in layers], width,
                   label=r["label"])
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2)
        ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("sparsity (%)")
        ax.legend(fontsize=7)
        paths.append(_save(plt, fig, out / "layer_sparsity.png"))
    return paths
