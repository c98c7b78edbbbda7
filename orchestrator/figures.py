"""Figures logged to MLflow: coarse-to-fine heatmaps, the paper's Fig. 3-style lines, a sweep's
parameter effects; `save` / `log_item` write them (and CSV text) as run artifacts."""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")                      # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def heatmap(values: dict, train_levels: list[str], test_levels: list[str], title: str):
    """values[train_level][test_level] (fraction) -> a train x test heatmap in %, skipped cells blank,
    "–" where the metric is not meaningful (None)."""
    raw = [[values.get(tl, {}).get(lv, math.nan) for lv in test_levels] for tl in train_levels]
    grid = [[math.nan if v is None else 100 * v for v in row] for row in raw]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(test_levels), 1.2 + 0.6 * len(train_levels)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(test_levels)), [f"test {lv}" for lv in test_levels])
    ax.set_yticks(range(len(train_levels)), [f"train {tl}" for tl in train_levels])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            label = "–" if raw[i][j] is None else "skipped" if math.isnan(v) else f"{v:.1f}"
            ax.text(j, i, label, ha="center", va="center",
                    color="white" if math.isnan(v) or v < 60 else "black", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def level_lines(per_method: dict, train_levels: list[str], test_level: str, metric: str):
    """Fig. 3: the metric at the finest test level against the training level, one line per method."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, values in per_method.items():
        xs = [i for i, tl in enumerate(train_levels)
              if values.get(tl, {}).get(test_level) is not None and not math.isnan(values[tl][test_level])]
        ax.plot(xs, [100 * values[train_levels[i]][test_level] for i in xs], marker="o", label=method)
    ax.set_xticks(range(len(train_levels)), train_levels)
    ax.set_xlabel("training level (coarse -> fine)")
    ax.set_ylabel(f"{metric} at {test_level} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _show(ax, img, border=None):
    """A C x H x W uint8 image on an axis, optionally framed green (correct) or red (wrong)."""
    arr = img.permute(1, 2, 0).numpy()
    ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if border:
        for spine in ax.spines.values():
            spine.set_edgecolor(border)
            spine.set_linewidth(3)


def retrieval_grid(rows: list[dict], top: int = 10):
    """Fig. 1: each row = a query, then its top results for one method, correct ones green.
    rows: {"label": str, "query": image, "results": [image], "correct": [bool]}."""
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(1.1 * (top + 1), 1.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        _show(axes[r][0], row["query"])
        axes[r][0].set_ylabel(row["label"], fontsize=7, rotation=0, ha="right", va="center")
        for j in range(top):
            if j < len(row["results"]):
                _show(axes[r][j + 1], row["results"][j], "green" if row["correct"][j] else "red")
            else:
                axes[r][j + 1].axis("off")
    axes[0][0].set_title("query", fontsize=8)
    fig.tight_layout()
    return fig


def tsne_map(embeddings, labels, names: list[str], title: str, seed: int = 0):
    """Fig. 4: a t-SNE of one coarse class's images, coloured by their fine class."""
    from sklearn.manifold import TSNE
    xy = TSNE(n_components=2, init="pca", random_state=seed,
              perplexity=min(30.0, max(2.0, (len(embeddings) - 1) / 3))).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(5, 5))
    cmap = plt.get_cmap("tab20")
    for i, lab in enumerate(sorted(set(labels))):
        pts = xy[[k for k, v in enumerate(labels) if v == lab]]
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color=cmap(i % 20), label=names[lab] if i < 12 else None)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(set(labels)) <= 12:
        ax.legend(fontsize=6, markerscale=1.5, loc="best")
    fig.tight_layout()
    return fig


def param_effect(values: list, means: list[float], stds: list[float], param: str, metric: str):
    """A sweep's metric (mean ± std over replicates, %) against one swept parameter's values."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    x = list(range(len(values)))
    ax.errorbar(x, [100 * m for m in means], yerr=[100 * s for s in stds], fmt="o-", capsize=4)
    ax.set_xticks(x, [str(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(item, path: str) -> str:
    """CSV/Markdown text or a figure to path, atomically (a killed writer never leaves half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(item, str):
        with open(tmp, "w") as f:
            f.write(item)
    else:
        item.savefig(tmp, format="png", dpi=120)
        plt.close(item)
    os.replace(tmp, path)
    return path


def log_item(log, item, name: str, folder: str | None = None) -> None:
    """Save beside a run's journal and send it through it: figures under figures/, text under folder."""
    folder = folder or ("figures" if name.endswith(".png") else "matrices")
    log.log_artifact(save(item, os.path.join(os.path.dirname(log.path), folder, name)), folder)
