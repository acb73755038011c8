"""Benchmarks: figures to read, never tests to fail (machines are noisy)."""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

from calibration.grid import make_grid
from calibration.threshold import thresholds
from calibration.toy import toy_batch
from calibration.window import CurveAccumulator

__all__ = ["bench_calibrate"]


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_calibrate(n_slates: int, items: int, n_alphas: int = 8, grid_size: int = 1001, seed: int = 0,
                    chunk: int = 100_000, console: Console | None = None) -> dict:
    """Fold ``n_slates`` toy slates (generation not timed), then time λ̂ for ``n_alphas`` α."""
    console = console or Console()
    rng = np.random.default_rng(seed)
    grid = make_grid(0.0, 1.0, grid_size)
    alphas = np.linspace(0.02, 0.3, n_alphas)
    figures: dict = {"slates": n_slates, "items": items, "grid": len(grid), "alphas": n_alphas}
    for strategy in ("remove", "replace"):
        acc = CurveAccumulator(len(grid))
        fold_s = 0.0
        done = 0
        while done < n_slates:
            n = min(chunk, n_slates - done)
            batch = toy_batch(rng, n, m=items)
            t0 = time.perf_counter()
            acc.add(batch, grid, strategy)
            fold_s += time.perf_counter() - t0
            done += n
        sums = acc.sums()
        figures[f"{strategy}_slates_per_s"] = n_slates / fold_s
        for guarantee in ("expectation", "high_probability"):
            sec = _best_of(lambda: thresholds(acc.sums(), acc.n, grid, alphas, guarantee, 0.1), 50)
            figures[f"{strategy}_{guarantee}_lambda_ms"] = sec * 1e3
        figures[f"{strategy}_sums_ms"] = _best_of(acc.sums, 50) * 1e3
        del sums
    table = Table(title=f"riskgate bench calibrate: {n_slates:,} slates x {items} items, |Λ|={len(grid)}, {n_alphas} α")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, val in figures.items():
        table.add_row(key, f"{val:,.3f}" if isinstance(val, float) else f"{val:,}")
    console.print(table)
    return figures
