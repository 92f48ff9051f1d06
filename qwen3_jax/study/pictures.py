"""Pictures of a study, drawn with matplotlib (the `study` extra) into PNG files: attention maps, patching
heatmaps, the logit lens, per-layer curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen3_jax.extras import require
from qwen3_jax.textio import atomic_output


def _pyplot():
    require("study", "the study pictures")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(tokens: Sequence[str]) -> list[str]:
    return [repr(t)[1:-1][:12] for t in tokens]


def _save(fig, path: str | Path) -> None:
    with atomic_output(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def attention_maps(pattern: np.ndarray, tokens: Sequence[str], layer: int, path: str | Path) -> None:
    """One map per head of a layer's pattern [N, T, T] (queries down, keys across)."""
    plt = _pyplot()
    heads = pattern.shape[0]
    columns = min(heads, 4)
    rows = math.ceil(heads / columns)
    size = max(3.0, 0.25 * len(tokens))
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for head, ax in enumerate(axes.flat):
        ax.set_visible(head < heads)
        if head < heads:
            ax.imshow(pattern[head], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}")
            ax.set_xticks(range(len(tokens)), _labels(tokens), rotation=90, fontsize=7)
            ax.set_yticks(range(len(tokens)), _labels(tokens), fontsize=7)
    _save(fig, path)


def patching_heatmap(grid: np.ndarray, tokens: Sequence[str], kind: str, metric: str, path: str | Path) -> None:
    """The patching sweep's metric [L, T]: layers down, positions across."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(tokens)), max(3.0, 0.3 * grid.shape[0])))
    image = ax.imshow(grid, cmap="RdBu", aspect="auto")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(len(tokens)), _labels(tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(grid.shape[0]))
    ax.set_ylabel("layer")
    ax.set_title(f"{kind} patched from the clean run")
    _save(fig, path)


def lens_table(top: Sequence[Sequence[str]], probs: np.ndarray, tokens: Sequence[str], path: str | Path) -> None:
    """The logit lens: each layer's (down) most likely next token at each position (across), coloured by
    its probability [L, T]."""
    plt = _pyplot()
    layers, length = probs.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * length), max(3.0, 0.35 * layers)))
    image = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for layer in range(layers):
        for position in range(length):
            ax.text(position, layer, _labels([top[layer][position]])[0], ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="probability")
    ax.set_xticks(range(length), _labels(tokens), rotation=90, fontsize=7)
    ax.set_yticks(range(layers))
    ax.set_ylabel("layer")
    ax.set_title("logit lens: top token per layer")
    _save(fig, path)


def layer_curves(curves: dict[str, np.ndarray], ylabel: str, path: str | Path) -> None:
    """One line per label over the layers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=label[:40])
    ax.set_xticks(range(max(map(len, curves.values()))))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
