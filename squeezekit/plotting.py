"""PNG plots (matplotlib, headless): per-layer importance and budgets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fitted_title(ax: Any, text: str, fontsize: float = 10.0) -> None:
    """Set ``ax``'s title, broken into as many lines as it takes to lie within the figure (a long config
    description would otherwise run off both sides), and lay the figure out around it."""
    import textwrap

    fig = ax.figure
    chars = max(20, int(fig.get_figwidth() * 72 / (0.5 * fontsize)))  # a first guess: ~0.5 em per character
    while True:
        ax.set_title("\n".join(textwrap.wrap(text, chars)) or text, fontsize=fontsize)
        fig.tight_layout()
        box = ax.title.get_window_extent(fig.canvas.get_renderer())
        if (box.x0 >= 0 and box.x1 <= fig.bbox.x1) or chars <= 20:
            return
        chars = max(20, int(chars * fig.bbox.width / box.width * 0.95))


def plot_layers(
    importance: Sequence[float],
    budgets: Sequence[int],
    path: str | Path,
    title: str = "",
    head_budgets: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Bars: each layer's token budget; line: its importance (cosine similarity before vs after attention); with
    ``head_budgets`` (per layer, each KV head's budget), a dot per head: how the head split shared the layer's.

    ``importance`` and ``budgets`` are per-layer sequences (for a batch, pass the first sequence's or the mean).
    Layers with an unbounded budget (-1) are drawn as holding the whole prompt.
    """
    plt = pyplot()
    layers = list(range(len(importance)))
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.28), 3.6), dpi=120)
    ax.bar(layers, budgets, color="#4C72B0", alpha=0.8, label="budget (tokens)")
    if head_budgets is not None:
        xs = [i for i, row in enumerate(head_budgets) for b in row if b >= 0]
        ys = [b for row in head_budgets for b in row if b >= 0]
        ax.scatter(xs, ys, s=9, color="#222222", zorder=3, label="a KV head's budget")
        ax.legend(loc="upper left", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("KV budget (tokens)", color="#4C72B0")
    ax2 = ax.twinx()
    ax2.plot(layers, importance, color="#DD8452", marker="o", ms=3, label="cosine similarity")
    ax2.set_ylabel("cos(input, input + attention)\nhigh = less important", color="#DD8452")
    fitted_title(ax, title or "per-layer importance and KV budget")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
