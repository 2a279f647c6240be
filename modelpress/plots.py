"""The two report plots: the level each unit got, and fitness per generation (PNG, matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_levels(path: str | Path, plans: dict[str, dict[str, object]], units: list[str], groups: list[str],
                blocks: list[int], ylabel: str = "level") -> None:
    """A heat map per plan: rows = layer type (q_proj, ..., attn, mlp), columns = block, colour (and,
    where the cells are wide enough, the text) = the unit's level. Levels that are not numbers
    (GGML types, joint levels, kept / dropped) are coloured by their sorted order."""
    import numpy as np

    plt = _plt()
    rows = list(dict.fromkeys(groups))  # layer types in model order
    n_blocks = max(blocks) + 1 if blocks else 1
    values = [levels[u] for levels in plans.values() for u in units]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = sorted({v for v in values}, key=(float if numeric else str))
    code = {v: (float(v) if numeric else float(i)) for i, v in enumerate(order)}
    fig, axes = plt.subplots(len(plans), 1, figsize=(max(6, 0.32 * n_blocks + 2), 0.36 * len(rows) * len(plans) + 1.4),
                             dpi=110, squeeze=False)
    lo, hi = min(code.values()), max(code.values())
    annotate = n_blocks <= 40
    for ax, (name, levels) in zip(axes[:, 0], plans.items()):
        grid = np.full((len(rows), n_blocks), np.nan)
        text: dict[tuple[int, int], tuple[str, float]] = {}
        for u, g, b in zip(units, groups, blocks):
            grid[rows.index(g), b] = code[levels[u]]
            text[(rows.index(g), b)] = (str(levels[u]), (code[levels[u]] - lo) / ((hi - lo) or 1))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1,
                       interpolation="nearest")
        if annotate:
            for (r, b), (t, shade) in text.items():  # dark text on the bright end of viridis
                ax.text(b, r, t[:4], ha="center", va="center", fontsize=5, color="black" if shade > 0.6 else "white")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xticks(range(n_blocks), [str(b) if b % 5 == 0 else "" for b in range(n_blocks)], fontsize=7)
        ax.set_title(name, fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("block")
    bar = fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01)
    bar.set_label(ylabel, fontsize=8)
    if not numeric or len(order) <= 12:  # discrete levels: one tick each
        bar.set_ticks([code[v] for v in order], labels=[str(v) for v in order])
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_fitness(path: str | Path, history: list[dict]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    if history:
        gens = [h["generation"] for h in history]
        ax.plot(gens, [h["fitness"] for h in history], marker=".", alpha=0.6,
                label="fitness (a fresh sample each generation)")
        val = [(g, h["validation"]) for g, h in zip(gens, history) if h.get("validation") is not None]
        if val:
            ax.plot([g for g, _ in val], [v for _, v in val], marker="o", label="validation (fixed held-out sample)")
        ax.legend(fontsize=8)
    ax.set_xlabel("generation")
    ax.set_ylabel("KL to dense (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curve(path: str | Path, curves: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
               points: dict[str, tuple[float, float]] | None = None, logy: bool = False,
               logx: bool = False, marker: str | None = "o", ymax: float | None = None) -> None:
    plt = _plt()
    many = len(curves) + len(points or {}) > 10
    fig, ax = plt.subplots(figsize=(9.6 if many else 6.4, 4.5 if many else 4), dpi=110)
    colors = plt.get_cmap("tab20").colors if many else None
    for i, (name, (xs, ys)) in enumerate(curves.items()):
        ax.plot(xs, ys, marker=marker, ms=3, label=name, color=colors[i % 20] if colors else None,
                linestyle="-" if i < 10 or not many else "--")
    for i, (name, (x, y)) in enumerate((points or {}).items()):  # colour and marker both vary: no two alike
        j = len(curves) + i
        ax.scatter([x], [y], s=34, label=name, zorder=3, marker="osD^vPX*"[i % 8],
                   color=colors[j % 20] if colors else None)
    if logy:
        ax.set_yscale("log")
    if ymax is not None:
        ax.set_ylim(top=ymax)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
