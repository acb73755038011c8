"""riskgate's numeric core: conformal risk control for recommendation slates.

Pure numpy (and scipy.special for the binomial tail); no Kafka, no I/O. Where
each number is computed:

* :mod:`calibration.grid`      — the λ grid Λ (ends in +inf)
* :mod:`calibration.slates`    — mature slates as padded arrays
* :mod:`calibration.risk`      — per-slate risk curves r̃(λ) and their O(items) fold
* :mod:`calibration.bound`     — the Hoeffding–Bentkus upper confidence bound
* :mod:`calibration.threshold` — λ̂ for many α (expectation / high probability)
* :mod:`calibration.window`    — accumulators and the bucketed event-time window
* :mod:`calibration.groups`    — global / band / user populations and fallback
* :mod:`calibration.safe_pool` — viewing history and the safe-pool rule
* :mod:`calibration.policy`    — Algorithm 1: applying λ̂ to a ranker's slate
* :mod:`calibration.toy`       — i.i.d. toy slates for tests and benchmarks
"""

from .grid import Grid, make_grid
from .risk import SCALE, fold, risk_curves, window_sums
from .slates import Slate, SlateBatch
from .threshold import Threshold, lambda_hat_index, thresholds
from .window import BucketedWindow, CurveAccumulator

__all__ = [
    "Grid",
    "make_grid",
    "SCALE",
    "fold",
    "risk_curves",
    "window_sums",
    "Slate",
    "SlateBatch",
    "Threshold",
    "lambda_hat_index",
    "thresholds",
    "BucketedWindow",
    "CurveAccumulator",
]
