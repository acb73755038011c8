"""Per-slate risk curves r̃(λ) on the grid Λ, and their O(items) fold into a window sum.

For one mature holdout slate with kept set ``kept(λ) = {i : s_i ≥ λ}``,
``a = |kept|`` and ``f = Σ_kept h_i`` (SPEC §4):

* ``remove`` / ``fraction``:  r(λ) = f / a                (0 when a = 0)
* ``replace`` / ``fraction``: r(λ) = f / min(k, a + p)    (0 when that is 0)
* ``per_slot`` (either):      r(λ) = f / k

and the curve is monotonised, r̃(λ) = max_{λ' ≥ λ, λ' ∈ Λ} r(λ').

The structure that makes this cheap: an item with score ``s`` is kept at grid
index ``g`` exactly when ``g < c(s)`` (``c`` = number of grid points ≤ s), so a
slate's curve only changes at its own items' ``c``. Sorting a slate's items by
``c`` descending and taking running counts gives r at each change point; the
monotonised curve is then a sum of non-negative steps,
``r̃(g) = Σ_j inc_j · [g < c_j]``. Adding ``inc_j`` at position ``c_j`` of an
array ``E`` folds a slate in O(items); the window sum is the reverse cumulative
sum ``S(g) = Σ_{c > g} E[c]``, evaluated only when λ̂ is recomputed.

Sums are kept in fixed point: each slate's curve value is rounded to a multiple
of 1/SCALE (SCALE = 2**32) before it is differenced, so a slate's own curve is
off by at most 2**-33 at any λ and every sum is an exact int64. Exact sums make
adding, subtracting, merging partitions and replaying in any order give
bit-identical windows, which floats would not.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .grid import Grid
from .slates import SlateBatch

__all__ = [
    "Strategy",
    "Loss",
    "STRATEGIES",
    "LOSSES",
    "raw_risk",
    "fold",
    "window_sums",
    "risk_curves",
    "SCALE",
]

Strategy = Literal["remove", "replace"]
Loss = Literal["fraction", "per_slot"]
STRATEGIES: tuple[str, ...] = ("remove", "replace")
LOSSES: tuple[str, ...] = ("fraction", "per_slot")

#: Fixed-point unit of a curve sum: S_q = round(S * SCALE). int64 holds 2**31 slates.
SCALE = 2**32

# Rows per vectorised pass: keeps the working set of a pass in cache.
_CHUNK = 16384


def _check(strategy: str, loss: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def raw_risk(a, f, k, pool, strategy: Strategy = "remove", loss: Loss = "fraction"):
    """Un-monotonised risk r from counts: kept ``a``, flagged-kept ``f``, ``k``, pool ``p``.

    Broadcasts over arrays. Examples
    --------
    >>> float(raw_risk(4, 1, 20, 0, "remove"))
    0.25
    >>> float(raw_risk(4, 1, 20, 4, "replace"))
    0.125
    >>> float(raw_risk(0, 0, 20, 0, "remove"))
    0.0
    """
    _check(strategy, loss)
    a = np.asarray(a, dtype=np.float64)
    f = np.asarray(f, dtype=np.float64)
    if loss == "per_slot":
        den = np.asarray(k, dtype=np.float64) + 0 * a
    elif strategy == "remove":
        den = a
    else:
        den = np.minimum(np.asarray(k, dtype=np.float64), a + np.asarray(pool, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, f / np.where(den > 0, den, 1.0), 0.0)
    return r


def _steps(batch: SlateBatch, grid: Grid, strategy: str, loss: str, quantize: bool = True):
    """For each item (sorted by c descending within its slate): c_j and the step inc_j."""
    n, m = batch.scores.shape
    G = len(grid)
    c = grid.index(batch.scores)
    # One sort carries both c (descending) and the flag: key = (G - c) * 2 + h.
    key = (G - c) << 1
    key |= batch.flags
    key.sort(axis=1)
    c_sorted = G - (key >> 1)
    f = np.cumsum(key & 1, axis=1, dtype=np.int32)
    a = np.arange(1, m + 1, dtype=np.int32)
    if loss == "per_slot":
        r = f / batch.k[:, None].astype(np.float64)
    elif strategy == "remove":
        r = f / a.astype(np.float64)
    else:
        r = f / np.minimum(batch.k[:, None], a + batch.pool[:, None]).astype(np.float64)
    # Within a run of equal c only the run's last position is a real curve value.
    # (With unflagged items sorted first inside a run, the partial values never
    # exceed the run's ends, so this mask changes nothing today; it keeps the
    # result right whatever order ties are sorted in.)
    if m > 1:
        r[:, :-1] *= c_sorted[:, :-1] != c_sorted[:, 1:]
    np.maximum.accumulate(r, axis=1, out=r)  # monotonise: running max towards lower λ
    if not quantize:
        inc = np.empty_like(r)
        inc[:, 0] = r[:, 0]
        np.subtract(r[:, 1:], r[:, :-1], out=inc[:, 1:])
        return c_sorted, inc
    # Round the curve values, not the steps: then each slate's steps telescope to
    # its rounded curve, and the error never grows with the number of items.
    q = np.rint(r * SCALE).astype(np.int64)
    inc = np.empty_like(q)
    inc[:, 0] = q[:, 0]
    np.subtract(q[:, 1:], q[:, :-1], out=inc[:, 1:])
    return c_sorted, inc


def fold(batch: SlateBatch, grid: Grid, strategy: Strategy = "remove", loss: Loss = "fraction") -> np.ndarray:
    """Fold slates into fixed-point steps E (int64, length G): ``Σ_slates r̃(g) ≈ Σ_{c > g} E[c] / SCALE``.

    O(items) per slate; no loop over grid points. Examples
    --------
    >>> from calibration.grid import make_grid
    >>> from calibration.slates import Slate
    >>> g = make_grid(0, 1, 11)
    >>> b = SlateBatch.from_slates([Slate((0.15, 0.75), (True, False), k=2)])
    >>> (window_sums(fold(b, g, "remove")) / SCALE).tolist()
    [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    _check(strategy, loss)
    G = len(grid)
    E = np.zeros(G, dtype=np.int64)
    if len(batch) == 0 or batch.width == 0:
        return E
    for lo in range(0, len(batch), _CHUNK):
        part = batch[lo : lo + _CHUNK] if len(batch) > _CHUNK else batch
        c_sorted, inc = _steps(part, grid, strategy, loss)
        # bincount adds in float64, exact here: a chunk's total per bin is at most
        # _CHUNK * SCALE < 2**53.
        E += np.bincount(c_sorted.ravel(), weights=inc.ravel(), minlength=G)[:G].astype(np.int64)
    # Steps at c = 0 belong to items kept at no λ (scores below the grid, padding):
    # they never enter S, and dropping them keeps E canonical, so equal windows
    # compare equal however their slates were padded.
    E[0] = 0
    return E


def window_sums(increments: np.ndarray) -> np.ndarray:
    """S_q(g) = Σ_{c > g} E[c]: the fixed-point sum of monotonised curves at each grid index.

    Non-increasing in g and ≥ 0 by construction (E ≥ 0), and 0 at λ = +inf.
    """
    E = np.asarray(increments, dtype=np.int64)
    S = np.zeros_like(E)
    if E.size > 1:
        S[:-1] = np.cumsum(E[:0:-1])[::-1]
    return S


def risk_curves(batch: SlateBatch, grid: Grid, strategy: Strategy = "remove", loss: Loss = "fraction") -> np.ndarray:
    """Dense monotonised curves r̃_j(λ), shape (n, G). For inspection and plots, not the hot path."""
    _check(strategy, loss)
    n, G = len(batch), len(grid)
    out = np.zeros((n, G))
    if n == 0 or batch.width == 0:
        return out
    c_sorted, inc = _steps(batch, grid, strategy, loss, quantize=False)
    # r̃_j(g) = Σ_i inc_ji [g < c_ji]: scatter steps then reverse-cumulate per row.
    E = np.zeros((n, G + 1))
    rows = np.repeat(np.arange(n), batch.width)
    np.add.at(E, (rows, c_sorted.ravel()), inc.ravel())
    out[:, :-1] = np.cumsum(E[:, G - 1 : 0 : -1], axis=1)[:, ::-1]
    return out
