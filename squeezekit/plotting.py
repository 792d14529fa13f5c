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


def wrapped(text: str, fig: Any, fontsize: float = 10.0) -> str:
    """``text`` broken into lines that fit the width of ``fig`` at ``fontsize`` (a long config description as a
    title would otherwise run off both sides)."""
    import textwrap

    width_pt = fig.get_figwidth() * 72
    chars = max(20, int(width_pt / (0.55 * fontsize)))  # about 0.55 em per character in the default sans font
    return "\n".join(textwrap.wrap(text, chars)) or text


def plot_layers(importance: Sequence[float], budgets: Sequence[int], path: str | Path, title: str = "") -> Path:
    """Bars: each layer's token budget; line: its importance (cosine similarity before vs after attention).

    ``importance`` and ``budgets`` are per-layer sequences (for a batch, pass the first sequence's or the mean).
    Layers with an unbounded budget (-1) are drawn as holding the whole prompt.
    """
    plt = pyplot()
    layers = list(range(len(importance)))
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.28), 3.6), dpi=120)
    ax.bar(layers, budgets, color="#4C72B0", alpha=0.8, label="budget (tokens)")
    ax.set_xlabel("layer")
    ax.set_ylabel("KV budget (tokens)", color="#4C72B0")
    ax2 = ax.twinx()
    ax2.plot(layers, importance, color="#DD8452", marker="o", ms=3, label="cosine similarity")
    ax2.set_ylabel("cos(input, input + attention)\nhigh = less important", color="#DD8452")
    ax.set_title(wrapped(title or "per-layer importance and KV budget", fig, 10), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
