"""The replay report: PNG plots shaped like the paper's Fig. 3 (a–d), Fig. 5 and Fig. 6, a page, and the numbers.

Axes follow the paper. "Target reduction" is what α promises against the
unfiltered risk R₀ of the evaluated holdout slates, 1 − α / R₀; the realised
reduction is 1 − R / R₀, so a point on or above the diagonal of Fig. 3c means
R ≤ α. Only α < R₀ (positive target) appear on reduction axes: an α at or above
the unfiltered risk promises nothing.

:func:`figures` builds every series as plain numbers (``figures.json``);
the plot functions draw from that dict and return the matplotlib ``Figure`` so
tests can inspect the lines; :func:`write_report` writes PNGs, ``index.html``,
``report.md`` and ``figures.json`` into a folder. Matplotlib runs on the Agg
backend: no display needed.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import orjson

__all__ = ["figures", "plot_fig3", "plot_fig5", "plot_fig6", "write_report", "PLOTS"]

PLOTS = {
    "fig3a_ndcg.png": "nDCG@k vs target reduction (Fig. 3a)",
    "fig3b_recall.png": "Recall@k vs target reduction (Fig. 3b)",
    "fig3c_reduction.png": "Realised vs target risk reduction (Fig. 3c)",
    "fig3d_size.png": "Mean slate size vs α (Fig. 3d)",
    "fig5_beta.png": "β ablation, replace strategy (Fig. 5)",
    "fig6_bands.png": "Low- vs high-reporting users (RQ5, Fig. 6)",
}

_STYLE = {"remove": ("tab:red", "o"), "replace": ("tab:blue", "s")}
_BETA_COLORS = ("tab:green", "tab:orange", "tab:purple", "tab:gray", "tab:brown")


def _series(rows: list[dict], strategy: str, population: str, keys: tuple[str, ...]) -> dict:
    sel = sorted((r for r in rows if r["strategy"] == strategy and r["population"] == population),
                 key=lambda r: r["alpha"])
    return {"alpha": [r["alpha"] for r in sel], **{k: [r[k] for r in sel] for k in keys}}


_KEYS = ("target_reduction", "reduction", "reduction_adjusted", "risk", "risk_se", "risk_adjusted", "ndcg",
         "recall", "size", "replaced", "replaced_share", "n")


def figures(result) -> dict:
    """Every plotted number, keyed by figure, plus the run's metadata (the content of ``figures.json``)."""
    main = result.main
    base = main.row("none", None, "all")
    fig3 = {s: _series(list(main.rows), s, "all", _KEYS) for s in main.strategies}
    fig5 = {_beta(a.beta): _series(list(a.rows), "replace", "all", _KEYS) for a in result.ablation}
    fig6 = {f"{s}:{pop}": _series(list(main.rows), s, pop, _KEYS) for s in main.strategies for pop in ("low", "high")}
    bands = {pop: main.row("none", None, pop) for pop in ("all", "low", "high")}
    return {
        "meta": {"alphas": list(result.alphas), "k": result.k, "guarantee": result.guarantee, "loss": result.loss,
                 "group_policy": result.group_policy, "beta": _beta(result.beta), "counts": result.counts,
                 "groups_used": result.groups_used, "reflag": result.reflag},
        "baseline": {pop: {k: r[k] for k in ("n", "risk", "risk_se", "ndcg", "recall", "size")} for pop, r in bands.items()},
        "base_risk": base["risk"],
        "fig3": fig3,
        "fig5": fig5,
        "fig6": fig6,
        "thresholds": [{"strategy": t.strategy, "group": t.group, "n": t.n,
                        "thresholds": [x.to_dict() for x in t.thresholds]} for t in main.thresholds],
        "rows": list(main.rows),
        "ablation_rows": {a.name: list(a.rows) for a in result.ablation},
    }


def _beta(b) -> str:
    return "none" if b is None else f"{b:g}%"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _positive(s: dict, ykey: str) -> tuple[list, list, list]:
    """(x, y, alpha) where the target reduction is defined and positive."""
    xs, ys, al = [], [], []
    for x, y, a in zip(s["target_reduction"], s[ykey], s["alpha"]):
        if x is not None and y is not None and x > 0:
            xs.append(x)
            ys.append(y)
            al.append(a)
    return xs, ys, al


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_fig3(fig: dict) -> dict:
    """Fig. 3 a–d as four ``Figure`` objects keyed by file name. Each line's label is its strategy."""
    plt = _plt()
    out = {}
    k = fig["meta"]["k"]
    base = fig["baseline"]["all"]
    specs = [
        ("fig3a_ndcg.png", "ndcg", f"nDCG@{k}", base["ndcg"]),
        ("fig3b_recall.png", "recall", f"Recall@{k}", base["recall"]),
    ]
    for name, key, ylabel, base_y in specs:
        f, ax = plt.subplots(figsize=(5, 3.6))
        for s, series in fig["fig3"].items():
            c, m = _STYLE.get(s, ("k", "^"))
            x, y, _ = _positive(series, key)
            ax.plot(x, y, color=c, marker=m, label=s)
        if base_y is not None:
            ax.axhline(base_y, color="k", ls=":", lw=1, label="no filtering")
        _finish(ax, "target reduction 1 − α / R₀", ylabel, PLOTS[name])
        out[name] = f

    f, ax = plt.subplots(figsize=(5, 4))
    lo_hi = [0.0, 1.0]
    ax.plot(lo_hi, lo_hi, color="k", ls="--", lw=1, label="realised = target")
    for s, series in fig["fig3"].items():
        c, m = _STYLE.get(s, ("k", "^"))
        x, y, _ = _positive(series, "reduction")
        se = [rs / fig["base_risk"] if fig["base_risk"] else 0.0 for rs in _positive(series, "risk_se")[1]]
        ax.errorbar(x, y, yerr=[2 * e for e in se], color=c, marker=m, capsize=2, label=f"{s} (±2 s.e.)")
    ax.set_xlim(0, 1)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1)
    _finish(ax, "target reduction 1 − α / R₀", "realised reduction 1 − R / R₀", PLOTS["fig3c_reduction.png"])
    out["fig3c_reduction.png"] = f

    f, ax = plt.subplots(figsize=(5, 3.6))
    for s, series in fig["fig3"].items():
        c, m = _STYLE.get(s, ("k", "^"))
        ax.plot(series["alpha"], series["size"], color=c, marker=m, label=s)
    ax.axhline(k, color="k", ls=":", lw=1, label=f"k = {k}")
    ax.set_ylim(0, k * 1.08 if k else None)
    _finish(ax, "α", "mean slate size |S|", PLOTS["fig3d_size.png"])
    out["fig3d_size.png"] = f
    return out


def plot_fig5(fig: dict):
    """Fig. 5 as one ``Figure`` with (a) re-flag-adjusted reduction, (b) nDCG, (c) replaced items, (d) size.

    One line per β arm, labelled ``β=<arm>``; ``None`` when no ablation was run.
    """
    if not fig["fig5"]:
        return None
    plt = _plt()
    f, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    k = fig["meta"]["k"]
    axes[0].plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="realised = target")
    for (name, s), color in zip(fig["fig5"].items(), _BETA_COLORS):
        x, y, _ = _positive(s, "reduction_adjusted")
        axes[0].plot(x, y, color=color, marker="o", label=f"β={name}")
        x, y, _ = _positive(s, "ndcg")
        axes[1].plot(x, y, color=color, marker="o", label=f"β={name}")
        axes[2].plot(s["alpha"], s["replaced"], color=color, marker="o", label=f"β={name}")
        axes[3].plot(s["alpha"], s["size"], color=color, marker="o", label=f"β={name}")
    axes[0].set_xlim(0, 1)
    _finish(axes[0], "target reduction", "realised reduction (re-flag adjusted)", "(a) risk reduction")
    _finish(axes[1], "target reduction", f"nDCG@{k}", "(b) nDCG")
    _finish(axes[2], "α", "previously seen items per slate", "(c) replacements")
    _finish(axes[3], "α", "mean slate size", "(d) slate size")
    f.suptitle(PLOTS["fig5_beta.png"], fontsize=11)
    f.tight_layout()
    return f


def plot_fig6(fig: dict):
    """RQ5 as one ``Figure``: (a) realised reduction and (b) nDCG by reporting band, per strategy."""
    plt = _plt()
    f, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    k = fig["meta"]["k"]
    axes[0].plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="realised = target")
    for key, s in fig["fig6"].items():
        strategy, pop = key.split(":")
        c, m = _STYLE.get(strategy, ("k", "^"))
        ls = "-" if pop == "low" else "--"
        # both bands on the global target axis (α against the overall R₀), as the paper plots them
        xs = [a_t for a_t, n in zip(fig["fig3"][strategy]["target_reduction"], s["n"]) if n]
        ys = [r for r, n in zip(s["risk"], s["n"]) if n]
        red = [None if r is None or not fig["base_risk"] else 1 - r / fig["base_risk"] for r in ys]
        pts = [(x, y) for x, y in zip(xs, red) if x is not None and y is not None and x > 0]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=m, ls=ls, label=f"{strategy}, {pop}")
        pts = [(x, y) for x, y in zip(fig["fig3"][strategy]["target_reduction"], s["ndcg"])
               if x is not None and y is not None and x > 0]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=m, ls=ls, label=f"{strategy}, {pop}")
    _finish(axes[0], "target reduction (all users)", "realised reduction vs overall R₀", "(a) risk reduction")
    _finish(axes[1], "target reduction (all users)", f"nDCG@{k}", "(b) nDCG")
    f.suptitle(PLOTS["fig6_bands.png"], fontsize=11)
    f.tight_layout()
    return f


def _fmt(x, digits: int = 4) -> str:
    if x is None or isinstance(x, float) and not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(rows: list[dict], cols: tuple[str, ...]) -> list[list[str]]:
    return [[_fmt(r.get(c)) for c in cols] for r in rows]


_COLS = ("strategy", "alpha", "population", "n", "risk", "risk_se", "risk_adjusted", "target_reduction", "reduction",
         "ndcg", "recall", "size", "replaced")


def write_report(result, out_dir: str | Path, title: str = "riskgate replay") -> dict[str, Path]:
    """Write the PNGs, ``figures.json``, ``index.html`` and ``report.md`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = figures(result)
    plt = _plt()
    paths: dict[str, Path] = {}
    drawn = dict(plot_fig3(fig))
    f5 = plot_fig5(fig)
    if f5 is not None:
        drawn["fig5_beta.png"] = f5
    drawn["fig6_bands.png"] = plot_fig6(fig)
    for name, f in drawn.items():
        f.tight_layout()
        f.savefig(out / name, dpi=110)
        plt.close(f)
        paths[name] = out / name
    (out / "figures.json").write_bytes(orjson.dumps(fig, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    paths["figures.json"] = out / "figures.json"

    meta = fig["meta"]
    summary = (f"k = {meta['k']}, guarantee = {meta['guarantee']}, loss = {meta['loss']}, "
               f"λ̂ from {meta['group_policy']} groups, safe-pool β = {meta['beta']}; "
               f"{meta['counts'].get('evaluated_slates', 0)} holdout slates evaluated, "
               f"unfiltered risk R₀ = {_fmt(fig['base_risk'])}.")
    invalid = meta["counts"].get("invalid_events", 0)
    if invalid:  # (left out of every figure: say so where a reader looks first)
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(meta["counts"].get("invalid_reasons", {}).items()))
        summary += f" {invalid} invalid events were left out ({reasons})."
    rows = [r for r in fig["rows"] if r["population"] == "all"] + [r for r in fig["rows"] if r["population"] != "all"]
    md = [f"# {title}", "", summary, "",
          "Each holdout slate is re-served through Algorithm 1 with the λ̂ current at its serve time and the "
          "user's safe pool then; risk = flagged share of what would have been served (Eq. 5).", ""]
    for name in drawn:
        md += [f"## {PLOTS[name]}", "", f"![{PLOTS[name]}]({name})", ""]
    md += ["## All numbers (main arm)", "", "| " + " | ".join(_COLS) + " |", "|" + "---|" * len(_COLS)]
    md += ["| " + " | ".join(r) + " |" for r in _table(rows, _COLS)]
    md += ["", f"Re-flag rates of real repeat views by first-view W% bin: {orjson.dumps(meta['reflag']).decode()}", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    paths["report.md"] = out / "report.md"

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", f"<p>{esc(summary)}</p>"]
    for name in drawn:
        body.append(f"<h2>{esc(PLOTS[name])}</h2><img src='{esc(name)}' alt='{esc(PLOTS[name])}'>")
    body.append("<h2>All numbers (main arm)</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in _COLS) + "</tr>")
    body += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r) + "</tr>" for r in _table(rows, _COLS)]
    body.append("</table><p>Every number is in <a href='figures.json'>figures.json</a>.</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + esc(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}img{max-width:100%}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    paths["index.html"] = out / "index.html"
    return paths
