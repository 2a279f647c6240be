"""The two report plots: the level each unit got, and fitness per generation (PNG, matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_levels(path: str | Path, plans: dict[str, dict[str, object]], units: list[str], groups: list[str],
                ylabel: str = "level") -> None:
    """One line of markers per plan: x = unit (in model order), y = its level."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, len(units) / 12), 3.6), dpi=110)
    kinds = sorted(set(groups))
    markers = "osD^v<>ph*"
    for pi, (name, levels) in enumerate(plans.items()):
        ys = [levels[u] for u in units]
        numeric = all(isinstance(y, (int, float)) for y in ys)
        if not numeric:
            order = sorted(set(ys), key=str)
            ys = [order.index(y) for y in ys]
            ax.set_yticks(range(len(order)), [str(o) for o in order])
        for gi, g in enumerate(kinds):
            idx = [i for i, gg in enumerate(groups) if gg == g]
            ax.scatter(idx, [ys[i] + 0.08 * (pi - (len(plans) - 1) / 2) for i in idx], s=12,
                       marker=markers[gi % len(markers)], label=f"{name}: {g}" if len(plans) > 1 else g, alpha=0.8)
    ax.set_xlabel("unit (model order)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=min(len(kinds), 7), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path)
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
