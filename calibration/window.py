"""Calibration windows: an accumulator of curve sums, and the event-time bucketed window.

A :class:`CurveAccumulator` holds ``n`` and the fixed-point steps ``E`` of a
population's summed monotonised curves (see :mod:`calibration.risk`); adding or
subtracting slates, or merging two accumulators, is integer addition, so the
result does not depend on order.

A :class:`BucketedWindow` cuts event time into buckets of ``window / buckets``
seconds (SPEC §6). A mature slate is added to the bucket of the time it was
*served* (its impression ``ts``), so the window's content depends only on the
events, never on when they were processed: a replay and the live stream agree.
At watermark ``T`` the window holds the ``buckets`` most recent buckets up to
the one containing ``T``; older buckets are dropped whole, and a slate whose
bucket has already left the window is refused (and counted by the caller).
Memory is O(buckets · |Λ|) whatever the traffic.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .grid import Grid
from .risk import Loss, Strategy, fold, window_sums
from .slates import SlateBatch

__all__ = ["CurveAccumulator", "BucketedWindow"]


class CurveAccumulator:
    """``n`` slates and their summed curve steps ``E`` (int64, length G).

    R̂(λ_g) = S_q(g) / (n · SCALE) with S_q = :func:`calibration.risk.window_sums` (E).

    Examples
    --------
    >>> from calibration.grid import make_grid
    >>> from calibration.slates import Slate
    >>> g = make_grid(0, 1, 11)
    >>> acc = CurveAccumulator(len(g))
    >>> b = SlateBatch.from_slates([Slate((0.15, 0.75), (True, False), k=2)])
    >>> acc.add(b, g, "remove").n
    1
    >>> acc.risk()[:3].tolist()
    [0.5, 0.5, 0.0]
    >>> acc.subtract(b, g, "remove").n, int(acc.increments.sum())
    (0, 0)
    """

    __slots__ = ("n", "increments")

    def __init__(self, size: int, n: int = 0, increments: np.ndarray | None = None):
        self.n = int(n)
        if increments is None:
            self.increments = np.zeros(int(size), dtype=np.int64)
        else:
            inc = np.array(increments, dtype=np.int64)
            if inc.shape != (int(size),):
                raise ValueError(f"increments must have shape ({size},), got {inc.shape}")
            self.increments = inc

    @property
    def size(self) -> int:
        return int(self.increments.size)

    def add_increments(self, increments: np.ndarray, n: int) -> "CurveAccumulator":
        """Add ``n`` slates already folded into ``increments``."""
        self.increments += increments
        self.n += int(n)
        return self

    def subtract_increments(self, increments: np.ndarray, n: int) -> "CurveAccumulator":
        """Remove ``n`` slates previously added as ``increments``."""
        if n > self.n:
            raise ValueError(f"cannot remove {n} slates from an accumulator holding {self.n}")
        self.increments -= increments
        self.n -= int(n)
        return self

    def add(self, batch: SlateBatch, grid: Grid, strategy: Strategy, loss: Loss = "fraction") -> "CurveAccumulator":
        """Fold a batch of mature slates in: O(items)."""
        return self.add_increments(fold(batch, grid, strategy, loss), len(batch))

    def subtract(self, batch: SlateBatch, grid: Grid, strategy: Strategy, loss: Loss = "fraction") -> "CurveAccumulator":
        """Take a batch of previously added slates back out."""
        return self.subtract_increments(fold(batch, grid, strategy, loss), len(batch))

    def merge(self, other: "CurveAccumulator") -> "CurveAccumulator":
        """Add another accumulator (e.g. a partition's partial sum) into this one."""
        return self.add_increments(other.increments, other.n)

    def copy(self) -> "CurveAccumulator":
        return CurveAccumulator(self.size, self.n, self.increments.copy())

    def sums(self) -> np.ndarray:
        """Fixed-point S_q(g) = Σ_slates r̃(λ_g) · SCALE."""
        return window_sums(self.increments)

    def risk(self) -> np.ndarray:
        """Empirical risk R̂(λ_g) (all zeros when n = 0)."""
        from .risk import SCALE

        if self.n == 0:
            return np.zeros(self.size)
        return self.sums() / (self.n * SCALE)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CurveAccumulator)
            and self.n == other.n
            and np.array_equal(self.increments, other.increments)
        )

    def __repr__(self) -> str:
        return f"CurveAccumulator(n={self.n}, size={self.size})"

    def to_bytes(self) -> bytes:
        """Compact encoding: n as int64, then E as little-endian int64."""
        return np.int64(self.n).astype("<i8").tobytes() + self.increments.astype("<i8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CurveAccumulator":
        arr = np.frombuffer(data, dtype="<i8")
        if arr.size < 1:
            raise ValueError("empty accumulator encoding")
        return cls(arr.size - 1, int(arr[0]), arr[1:].astype(np.int64))


class BucketedWindow:
    """Event-time window of ``window`` seconds in ``buckets`` buckets of curve sums.

    Examples
    --------
    >>> w = BucketedWindow(size=4, window=3600.0, buckets=4)     # 15-minute buckets
    >>> w.bucket_of(1000.0), w.bucket_of(1800.0)
    (1, 2)
    >>> w.add_increments(1000.0, np.array([0, 5, 0, 0]), 1)
    True
    >>> w.advance(5000.0)          # watermark 5000 s: window keeps buckets 2..5
    [1]
    >>> w.total().n
    0
    """

    def __init__(self, size: int, window: float, buckets: int):
        if not (window > 0 and math.isfinite(window)):
            raise ValueError(f"window must be a positive number of seconds, got {window}")
        if int(buckets) < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.size = int(size)
        self.window = float(window)
        self.buckets = int(buckets)
        self.width = self.window / self.buckets
        self.newest: int | None = None  # bucket id holding the watermark
        self._acc: dict[int, CurveAccumulator] = {}

    def bucket_of(self, ts: float) -> int:
        """Bucket id: floor(ts / width)."""
        return int(math.floor(ts / self.width))

    def bucket_start(self, b: int) -> float:
        """The least ``ts`` with ``bucket_of(ts) >= b``: bucket ``b``'s start as :meth:`bucket_of` draws it.

        ``b * width`` is rounded, and ``floor(ts / width)`` rounds again: near the
        product the two can disagree by an ulp when ``width`` is not a whole binary
        number (3600 s in 7 buckets), so the edge is stepped to where they agree.
        A slate compared with this start and one placed by :meth:`bucket_of` then
        fall on the same side of it.

        >>> w = BucketedWindow(1, 3600.0, 7)
        >>> t = w.bucket_start(6)
        >>> w.bucket_of(t), w.bucket_of(math.nextafter(t, -math.inf))
        (6, 5)
        """
        t = b * self.width
        while self.bucket_of(t) < b:
            t = math.nextafter(t, math.inf)
        while self.bucket_of(below := math.nextafter(t, -math.inf)) >= b:
            t = below
        return t

    def oldest_live(self) -> int | None:
        return None if self.newest is None else self.newest - self.buckets + 1

    def accepts(self, ts: float) -> bool:
        """Whether a slate served at ``ts`` still belongs to the window."""
        oldest = self.oldest_live()
        return oldest is None or self.bucket_of(ts) >= oldest

    def add_increments(self, ts: float, increments: np.ndarray, n: int) -> bool:
        """Add slates served at ``ts``; False (nothing added) if their bucket aged out."""
        return self.add_to_bucket(self.bucket_of(ts), increments, n)

    def add_to_bucket(self, b: int, increments: np.ndarray, n: int) -> bool:
        """Add slates to bucket ``b`` (a :meth:`bucket_of` id); False if it aged out.

        Callers that already know a slate's bucket pass its id, never a time made
        back from it: ``floor(b * width / width)`` is ``b - 1`` for some ``b`` when
        ``width`` is not a whole number (86400 s in 13 buckets), and such a slate
        would land a bucket early, or be dropped from the oldest live one.
        """
        oldest = self.oldest_live()
        if oldest is not None and b < oldest:
            return False
        acc = self._acc.get(b)
        if acc is None:
            acc = self._acc[b] = CurveAccumulator(self.size)
        acc.add_increments(increments, n)
        return True

    def add(self, ts: float, batch: SlateBatch, grid: Grid, strategy: Strategy, loss: Loss = "fraction") -> bool:
        return self.add_increments(ts, fold(batch, grid, strategy, loss), len(batch))

    def advance(self, watermark: float) -> list[int]:
        """Move the window's end to ``watermark``; returns the ids of the buckets dropped."""
        b = self.bucket_of(watermark)
        if self.newest is not None and b <= self.newest:
            return []
        self.newest = b
        oldest = b - self.buckets + 1
        dropped = sorted(k for k in self._acc if k < oldest)
        for k in dropped:
            del self._acc[k]
        return dropped

    def total(self) -> CurveAccumulator:
        """Sum of the live buckets."""
        out = CurveAccumulator(self.size)
        for acc in self._acc.values():
            out.merge(acc)
        return out

    def span(self) -> tuple[float, float] | None:
        """Event-time [start, end) the window covers, once it has a watermark."""
        if self.newest is None:
            return None
        return self.bucket_start(self.newest - self.buckets + 1), self.bucket_start(self.newest + 1)

    def items(self) -> Iterable[tuple[int, CurveAccumulator]]:
        return sorted(self._acc.items())

    def set_bucket(self, bucket: int, acc: CurveAccumulator) -> None:
        """Restore or replace one bucket (e.g. from a changelog or a partition's partial sum)."""
        if acc.size != self.size:
            raise ValueError("accumulator size does not match the window's grid")
        self._acc[int(bucket)] = acc
