"""The λ grid Λ: ascending candidate thresholds that always end in ``+inf``.

At ``λ = +inf`` every item is filtered, so every per-slate risk is 0 there; that
is what makes "filter everything" a valid (if useless) answer for any α.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["Grid", "make_grid"]

# An item whose position (s - lo) / step lies this close to a grid point is
# placed by an exact binary search instead of by arithmetic, so the fast path
# never disagrees with ``searchsorted`` because of rounding.
_NEAR = 1e-6


@dataclass(frozen=True, eq=False)
class Grid:
    """Ascending thresholds Λ = (λ_0 < λ_1 < ... < λ_{G-2} < +inf).

    Attributes
    ----------
    values : ndarray of float64, shape (G,)
        The thresholds, last one ``+inf``.
    lo, step : float or None
        Set when the finite part is evenly spaced (``lo + j*step``); enables the
        arithmetic fast path of :meth:`index`.
    """

    values: np.ndarray
    lo: float | None = None
    step: float | None = None
    _inv_step: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64)
        if v.ndim != 1 or v.size < 2:
            raise ValueError("a grid needs at least one finite point and +inf")
        if not np.isposinf(v[-1]) or not np.all(np.isfinite(v[:-1])):
            raise ValueError("grid must be finite values followed by a single +inf")
        if np.any(np.diff(v[:-1]) <= 0):
            raise ValueError("grid values must be strictly ascending")
        v.setflags(write=False)
        object.__setattr__(self, "values", v)
        if self.step is not None:
            object.__setattr__(self, "_inv_step", 1.0 / self.step)

    def __len__(self) -> int:
        return int(self.values.size)

    @property
    def finite_size(self) -> int:
        """Number of finite thresholds, G - 1."""
        return int(self.values.size - 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid) and np.array_equal(self.values, other.values)

    def __hash__(self) -> int:
        return hash(self.values.tobytes())

    def index(self, scores: np.ndarray) -> np.ndarray:
        """Count of grid points ≤ s for each score: c(s) = |{j : λ_j ≤ s}|.

        Item ``s`` is kept at grid index ``g`` exactly when ``g < c(s)``.
        ``-inf`` (padding) maps to 0. Returns int32 of the same shape.

        Examples
        --------
        >>> g = make_grid(0.0, 1.0, 11)
        >>> g.index(np.array([-1.0, 0.0, 0.05, 0.1, 1.0, 7.0])).tolist()
        [0, 1, 1, 2, 11, 11]
        """
        s = np.asarray(scores, dtype=np.float64)
        if self.step is None:
            return np.searchsorted(self.values, s, side="right").astype(np.int32)
        n_finite = self.finite_size
        x = (s - self.lo) * self._inv_step
        np.clip(x, -1.0, float(n_finite), out=x)
        fl = np.floor(x)
        c = fl.astype(np.int32)
        c += 1
        np.clip(c, 0, n_finite, out=c)
        # Rounding can only matter right next to a grid point: redo those exactly.
        near = (x - fl) < _NEAR
        near |= (fl + 1.0 - x) < _NEAR
        near &= x > -1.0  # clipped from below: s < lo, so c = 0 is exact
        if near.any():
            c[near] = np.searchsorted(self.values, s[near], side="right")
        return c


def make_grid(
    grid_min: float = 0.0,
    grid_max: float = 1.0,
    size: int = 1001,
    values: Sequence[float] | None = None,
) -> Grid:
    """Build Λ: ``size`` evenly spaced points on [grid_min, grid_max] plus +inf,
    or the given explicit ``values`` (sorted, de-duplicated) plus +inf.

    Examples
    --------
    >>> make_grid(0, 1, 3).values.tolist()
    [0.0, 0.5, 1.0, inf]
    >>> make_grid(values=[0.3, 0.1]).values.tolist()
    [0.1, 0.3, inf]
    """
    if values is not None:
        v = np.unique(np.asarray(list(values), dtype=np.float64))
        if v.size == 0:
            raise ValueError("explicit grid values must not be empty")
        if not np.all(np.isfinite(v)):
            raise ValueError("explicit grid values must be finite (+inf is appended)")
        return Grid(np.append(v, np.inf))
    size = int(size)
    if size < 1:
        raise ValueError(f"grid size must be >= 1, got {size}")
    lo, hi = float(grid_min), float(grid_max)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("grid bounds must be finite")
    if size == 1:
        return Grid(np.array([lo, np.inf]))
    if not hi > lo:
        raise ValueError(f"grid_max ({hi}) must exceed grid_min ({lo})")
    finite = np.linspace(lo, hi, size)
    return Grid(np.append(finite, np.inf), lo=lo, step=(hi - lo) / (size - 1))
