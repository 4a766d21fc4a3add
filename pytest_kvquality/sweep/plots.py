"""The sweep's plots, with matplotlib when it is installed (an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import Sweep, SweepRow, by_model_and_context, pareto_front


def plots(sweep: Sweep, out: Path) -> list[str] | str:
    """PNG plots with matplotlib (an optional extra); the reason when there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'pytest-kvquality[plots]'); tables only"
    made = []
    groups = by_model_and_context(sweep.rows)
    if groups:
        fig, axes = _panels(plt, len(groups))
        for ax, ((model, n_ctx), rows) in zip(axes, groups.items(), strict=True):
            positive = [r.kl_mean for r in rows if r.kl_mean > 0]
            floor = min(positive) / 3 if positive else 1e-6  # lossless configs drawn on the floor
            pts = [(r.kv_bytes_per_token or 0.0, max(r.kl_mean, floor)) for r in rows]
            front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.5, label="every config")
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o--", color="C3", linewidth=1,
                    markersize=5, label="Pareto front")
            for n, i in enumerate(front):  # only the front is labelled: a full grid would be unreadable
                label = rows[i].cache.label + (" (0)" if rows[i].kl_mean <= 0 else "") + \
                    (" CPU!" if rows[i].cpu_fallback else "")
                ax.annotate(label, pts[i], fontsize=7, xytext=(4, 6 if n % 2 else -11), textcoords="offset points")
            _label_log_axes(ax, "KV cache bytes per token", "mean KLD against f16 (log)", f"{model}, n_ctx {n_ctx}", 8)
        made.append(_finish(plt, fig, "KV cache: quality against memory", out / "pareto.png"))
    # position profiles of the symmetric configs (K = V, rotation on): one panel per n_ctx
    by_ctx: dict[int, list[SweepRow]] = {}
    for r in sweep.rows:
        if r.positions and r.cache.quantized and r.cache.type_k == r.cache.type_v and r.cache.rotation:
            by_ctx.setdefault(r.n_ctx, []).append(r)
    if by_ctx:
        fig, axes = _panels(plt, len(by_ctx))
        for ax, (n_ctx, rows) in zip(axes, sorted(by_ctx.items()), strict=True):
            for r in rows:
                ax.plot([(p["start"] + p["end"]) / 2 for p in r.positions], [p["kl_mean"] for p in r.positions],
                        marker="o", markersize=3, label=f"{r.model} {r.cache.label}")
            _label_log_axes(ax, "context position", "mean KLD (log)", f"n_ctx {n_ctx}", 7)
        made.append(_finish(plt, fig, "Mean KLD by context position (K = V, rotation on)", out / "positions.png"))
    return made


def _panels(plt: Any, count: int) -> tuple[Any, Any]:
    """A figure with ``count`` panels side by side, and the row of their axes."""
    fig, axes = plt.subplots(1, count, figsize=(6.5 * count, 4.8), squeeze=False)
    return fig, axes[0]


def _label_log_axes(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    """Axis labels, a log y axis, the panel title and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)


def _finish(plt: Any, fig: Any, title: str, path: Path) -> str:
    """Title, lay out, write and close a figure; returns where it went."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
