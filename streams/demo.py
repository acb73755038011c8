"""``riskgate demo``: the embedded default job.

Until the live pipeline lands this runs the calibration core over a rolling
event-time window fed by i.i.d. toy slates, printing each threshold update as
it would be published (SPEC §7 shape, one JSON object per line).
"""

from __future__ import annotations

import time

import numpy as np
import orjson

from calibration.grid import make_grid
from calibration.threshold import thresholds
from calibration.toy import toy_batch
from calibration.window import BucketedWindow

__all__ = ["run_offline_demo"]


def run_offline_demo(duration: float = 10.0, alphas=(0.05, 0.1, 0.2), slates_per_tick: int = 2000,
                     tick_seconds: float = 600.0, seed: int = 0, echo=print) -> int:
    """Simulate event time in ``tick_seconds`` steps for ``duration`` wall seconds; return updates printed."""
    rng = np.random.default_rng(seed)
    grid = make_grid()
    windows = {s: BucketedWindow(len(grid), window=86_400.0, buckets=24) for s in ("remove", "replace")}
    version = 0
    ts = 1_732_200_000.0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        ts += tick_seconds
        batch = toy_batch(rng, slates_per_tick, m=20)
        version += 1
        for strategy, w in windows.items():
            w.add(ts, batch, grid, strategy)
            w.advance(ts)
            acc = w.total()
            start, end = w.span()
            echo(orjson.dumps({
                "version": version, "computed_at": time.time(), "strategy": strategy,
                "guarantee": "expectation", "delta": None, "loss": "fraction", "group": "global",
                "window": {"start": start, "end": end}, "n": acc.n,
                "thresholds": [t.to_dict() for t in thresholds(acc.sums(), acc.n, grid, alphas)],
            }).decode())
        time.sleep(0.5)
    return version
