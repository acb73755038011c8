"""I.i.d. toy slates with a known structure, for tests, benchmarks and guarantee checks.

Each slate shows ``m`` items with filter scores s ~ U(0, 1); an item is flagged
with probability ``rate · (1 + informativeness · (1 - 2s))``, so a higher score
means safer and ``informativeness`` in [0, 1] sets how much. Safe-pool sizes
are Poisson(``pool_mean``). Slates are exchangeable, which is all the
conformal guarantees ask for. (The KuaiRand-shaped world with users, watch
time and event streams is :mod:`calibration.synthetic`.)
"""

from __future__ import annotations

import numpy as np

from .slates import SlateBatch

__all__ = ["toy_batch"]


def toy_batch(
    rng: np.random.Generator,
    n: int,
    m: int = 20,
    k: int | None = None,
    rate: float = 0.1,
    informativeness: float = 0.8,
    pool_mean: float = 3.0,
    ragged: bool = False,
) -> SlateBatch:
    """``n`` toy slates of ``m`` items (``ragged``: between 1 and m items each).

    Examples
    --------
    >>> b = toy_batch(np.random.default_rng(0), 1000, m=20)
    >>> len(b), b.width, bool(0.05 < b.flags.mean() < 0.15)
    (1000, 20, True)
    """
    if not 0 <= rate <= 0.5:
        raise ValueError("rate must be in [0, 0.5] so that flag probabilities stay in [0, 1]")
    k = m if k is None else k
    scores = rng.random((n, m))
    p = rate * (1.0 + informativeness * (1.0 - 2.0 * scores))
    flags = rng.random((n, m)) < p
    if ragged and m > 1:
        lengths = rng.integers(1, m + 1, size=n)
        pad = np.arange(m)[None, :] >= lengths[:, None]
        scores[pad] = -np.inf
        flags[pad] = False
    pool = rng.poisson(pool_mean, size=n)
    return SlateBatch(scores, flags, np.full(n, k, dtype=np.int32), pool.astype(np.int32))
