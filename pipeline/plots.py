"""PNG figures of a run: the gate heatmap (task x expert mean gate weight) and per-task AUC curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.diagnostics import gate_groups, gate_matrix  # noqa: E402


def plot_gates(flat_metrics: dict[str, float], tasks: list[str], path: Path, split: str = "valid") -> Path | None:
    groups = gate_groups(flat_metrics, split)
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4 + 2.2 * len(groups), 1.2 + 0.6 * len(tasks)), squeeze=False)
    for ax, group in zip(axes[0], groups):
        m = gate_matrix(flat_metrics, split, group, tasks)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{group} ({split})")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xticks(range(m.shape[1]), [f"e{e}" for e in range(m.shape[1])])
        for (i, j), v in zip([(i, j) for i in range(m.shape[0]) for j in range(m.shape[1])], m.flatten()):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="mean gate weight")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_learning_curves(history: list[dict[str, float]], tasks: list[str], path: Path) -> Path | None:
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for task in tasks:
        ax.plot(epochs, [h.get(f"valid/{task}/auc") for h in history], marker="o", label=f"{task} (valid)")
        oracle = history[-1].get(f"valid/{task}/oracle_auc")
        if oracle is not None:
            ax.axhline(oracle, linestyle=":", color=ax.lines[-1].get_color(), label=f"{task} oracle")
    ax.set_xlabel("epoch")
    ax.set_ylabel("AUC")
    ax.set_xticks(epochs)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
