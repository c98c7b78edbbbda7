"""Figures logged to MLflow: coarse-to-fine heatmaps and the paper's Fig. 3-style lines."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")                      # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def heatmap(values: dict, train_levels: list[str], test_levels: list[str], title: str):
    """values[train_level][test_level] (fraction) -> a train x test heatmap in %, skipped cells blank."""
    grid = [[100 * values.get(tl, {}).get(lv, math.nan) for lv in test_levels] for tl in train_levels]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(test_levels), 1.2 + 0.6 * len(train_levels)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(test_levels)), [f"test {lv}" for lv in test_levels])
    ax.set_yticks(range(len(train_levels)), [f"train {tl}" for tl in train_levels])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "skipped" if math.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="white" if math.isnan(v) or v < 60 else "black", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def level_lines(per_method: dict, train_levels: list[str], test_level: str, metric: str):
    """Fig. 3: the metric at the finest test level against the training level, one line per method."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, values in per_method.items():
        xs = [i for i, tl in enumerate(train_levels) if not math.isnan(values.get(tl, {}).get(test_level, math.nan))]
        ax.plot(xs, [100 * values[train_levels[i]][test_level] for i in xs], marker="o", label=method)
    ax.set_xticks(range(len(train_levels)), train_levels)
    ax.set_xlabel("training level (coarse -> fine)")
    ax.set_ylabel(f"{metric} at {test_level} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
