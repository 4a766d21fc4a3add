"""report.md from a ``Sweep``: the tables (one Markdown table builder, ``markdown.py``) and the plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..cache_config import UNQUANTIZED, CacheConfig
from ..engine.protocol import SPEED_PHASES
from ..markdown import markdown_table
from .data import Sweep, SweepRow, by_model_and_context, pareto_front
from .plots import plots


def write_report(sweep: Sweep, out: Path) -> None:
    """report.md and the plots, from what ``sweep`` holds (the run has saved sweep.json already)."""
    (out / "report.md").write_text(markdown(sweep, plots(sweep, out)))


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [*markdown_table(head, rows).split("\n"), ""]


def markdown(sweep: Sweep, plots: list[str] | str) -> str:
    env = sweep.environment
    out = ["# KV-cache model-selection report", "",
           f"{env.get('date')} · pytest-kvquality {env.get('plugin')} · llama-cpp-python "
           f"{env.get('llama_cpp_python')} (ggml {env.get('ggml')}) · {env.get('backend')} · corpus "
           f"{env.get('corpus', '?')}", "",
           *(f"`python -m pytest_kvquality sweep {c}`" for c in env.get("commands", [env.get("command", "")])), ""]
    for (model, n_ctx), rows in by_model_and_context(sweep.rows).items():
        out += [f"## {model}, n_ctx {n_ctx}", "", *_grids(rows), *_per_category(rows)]
        if rows and rows[0].positions:
            spans = [f"{p['start']}–{p['end'] - 1}" for p in rows[0].positions]
            out += ["Mean KLD by context position (the scored second half of each chunk):", ""]
            out += _table(["cache", *spans],
                          [[f"`{r.cache.label}`", *(f"{p['kl_mean']:.4f}" for p in r.positions)] for r in rows])
        front = pareto_front([(r.kv_bytes_per_token or 0.0, r.kl_mean) for r in rows])
        out += ["Pareto front (no other config has both fewer KV bytes and lower mean KLD): "
                + ", ".join(f"`{rows[i].cache.label}`" + (" ⚠ CPU" if rows[i].cpu_fallback else "") for i in front),
                ""]
    out += _compounding(sweep)
    if isinstance(plots, str):
        out += [f"Plots: {plots}", ""]
    else:
        out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    if sweep.failures:
        out += ["## Not measured", "", *(f"* {f}" for f in sweep.failures), ""]
    if sweep.notes:
        out += ["## Notes", "", *(f"* {n}" for n in sweep.notes), ""]
    return "\n".join(out)


def _grids(rows: list[SweepRow]) -> list[str]:
    """K x V, which half carries the loss, rotation on against off."""
    by = {r.cache: r for r in rows}
    ks, vs = _grid_axes([r.cache for r in rows])
    out = ["Mean KLD, K type × V type (rotation on):", ""]
    out += _table(["K \\ V", *vs], [[k, *(_fmt(by.get(CacheConfig(k, v, True))) for v in vs)] for k in ks])
    quantized = [c for c in ks if c not in UNQUANTIZED]
    if quantized:
        out += ["Which half carries the loss — K only, V only, both (rotation on):", ""]
        out += _table(["type", "K only (V f16)", "V only (K f16)", "both"],
                      [[t, _fmt(by.get(CacheConfig(t, "f16", True))), _fmt(by.get(CacheConfig("f16", t, True))),
                        _fmt(by.get(CacheConfig(t, t, True)))] for t in quantized])
    rot = [(c, by[c], by.get(CacheConfig(c.type_k, c.type_v, False))) for c in by if c.rotation and c.quantized]
    if any(off is not None for _, _, off in rot):
        out += ["Hadamard rotation on and off:", ""]
        out += _table(["cache", "rotation on", "rotation off", "off / on"],
                      [[f"`{c.label}`", _fmt(on), _fmt(off),
                        f"{off.kl_mean / on.kl_mean:.2f}×" if off and on.kl_mean > 0 else "-"]
                       for c, on, off in rot])
    return out


def _per_category(rows: list[SweepRow]) -> list[str]:
    cats = list(dict.fromkeys(c for r in rows for c in r.categories))
    phases = [p for p in SPEED_PHASES if any(p in r.speed for r in rows)]
    out = ["Per category (mean KLD), memory, top-1 and throughput (scored tokens/s of the evaluation"
           + (", llama.cpp's pp/tg tokens/s" if phases else "") + "; ⚠ CPU: KV ops fell back to the CPU):", ""]
    return out + _table(
        ["cache", *cats, "overall ± σ", "same top", "KV B/token", "KV MiB per 32k", "scored tok/s",
         *(f"{p} tok/s" for p in phases)],
        [[f"`{r.cache.label}`" + (" ⚠ CPU" if r.cpu_fallback else ""),
          *(f"{r.categories.get(c, 0):.5f}" for c in cats), f"{r.kl_mean:.5f} ± {r.kl_mean_unc:.5f}",
          f"{100 * r.top1:.2f} %", f"{r.kv_bytes_per_token:,.0f}" if r.kv_bytes_per_token else "-",
          f"{r.kv_mib_per_32k:,.0f}" if r.kv_mib_per_32k is not None else "-",
          f"{r.scored_per_s:,.0f}", *(f"{r.speed[p]:,.0f}" if p in r.speed else "-" for p in phases)]
         for r in rows])


def _compounding(sweep: Sweep) -> list[str]:
    if not sweep.compounding:
        return []
    out = ["## Weights × cache", "",
           "Against the original weights with an f16 cache: lower-precision weights alone, the cache alone, "
           "both; `excess` = both − (weights + cache).", ""]
    return out + _table(["weights", "cache", "KL weights", "KL cache", "sum", "KL both", "excess", "same top (both)"],
                        [[c.weights, f"`{c.cache}`", f"{c.kl_weights:.5f}", f"{c.kl_cache:.5f}",
                          f"{c.kl_weights + c.kl_cache:.5f}", f"{c.kl_both:.5f}", f"{c.excess:+.5f}",
                          f"{100 * c.top1_both:.2f} %"] for c in sweep.compounding])


def _grid_axes(caches: Sequence[CacheConfig]) -> tuple[list[str], list[str]]:
    """K and V types of the K × V table: those paired with more than one other type (a lone
    ``f32`` or ``bf16`` added with --kv-cache is in the per-category table, not a sparse column)."""
    pairs = {(c.type_k, c.type_v) for c in caches}
    ks = list(dict.fromkeys(k for k, _ in pairs if sum(1 for kk, _ in pairs if kk == k) > 1))
    vs = list(dict.fromkeys(v for _, v in pairs if sum(1 for _, vv in pairs if vv == v) > 1))
    order = list(dict.fromkeys(t for c in caches for t in (c.type_k, c.type_v)))
    if not ks or not vs:  # no grid at all: one column and row per config
        ks = list(dict.fromkeys(c.type_k for c in caches))
        vs = list(dict.fromkeys(c.type_v for c in caches))
    return sorted(ks, key=order.index), sorted(vs, key=order.index)


def _fmt(r: SweepRow | None) -> str:
    return f"{r.kl_mean:.5f}" if r is not None else "-"
