"""Mature holdout slates as padded numpy arrays, the input of every risk curve.

A batch of ``n`` slates with at most ``m`` shown items each is held as
``scores (n, m)`` and ``flags (n, m)``; shorter slates are padded with
``score = -inf`` (never kept at any λ) and ``flag = False``. ``k`` is each slate's
size budget and ``pool`` the user's safe-pool size when it was served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["SlateBatch", "Slate", "DROPPED"]

#: The filter score of a shown item the policy drops whatever λ (SPEC §8: a tag its user
#: blocked): never kept at any λ, like padding, and so its flag never counts.
DROPPED = float("-inf")


@dataclass(frozen=True)
class Slate:
    """One mature holdout slate: filter scores, final flag labels, k, safe-pool size p."""

    scores: tuple[float, ...]
    flags: tuple[bool, ...]
    k: int
    pool: int = 0

    @classmethod
    def served(cls, scores: tuple[float, ...], flags: tuple[bool, ...], k: int, pool: int = 0) -> "Slate":
        """The slate as the policy can serve it: a :data:`DROPPED` item's flag cleared (it is never kept).

        >>> Slate.served((0.4, DROPPED), (True, True), 2).flags
        (True, False)
        """
        if DROPPED in scores:
            flags = tuple(f and s != DROPPED for s, f in zip(scores, flags))
        return cls(scores, flags, k, pool)


@dataclass(frozen=True, eq=False)
class SlateBatch:
    """Many slates, padded to a common width (see module docstring)."""

    scores: np.ndarray  # float64 (n, m), -inf padding
    flags: np.ndarray  # bool (n, m)
    k: np.ndarray  # int32 (n,)
    pool: np.ndarray  # int32 (n,)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        flags = np.asarray(self.flags, dtype=bool)
        if scores.ndim != 2 or flags.shape != scores.shape:
            raise ValueError("scores and flags must be 2-D arrays of the same shape")
        k = np.asarray(self.k, dtype=np.int32).reshape(-1)
        pool = np.asarray(self.pool, dtype=np.int32).reshape(-1)
        n = scores.shape[0]
        if k.shape != (n,) or pool.shape != (n,):
            raise ValueError("k and pool need one entry per slate")
        if np.isnan(scores).any() or np.isposinf(scores).any():
            raise ValueError("scores must be finite (-inf only as padding)")
        if n and (k.min() < 1):
            raise ValueError("k must be >= 1")
        if n and (pool.min() < 0):
            raise ValueError("safe-pool size must be >= 0")
        shown = np.isfinite(scores)
        if (flags & ~shown).any():
            raise ValueError("padding positions cannot be flagged")
        if n and (shown.sum(axis=1) > k).any():
            raise ValueError("a slate shows more items than its k")
        for name, arr in (("scores", scores), ("flags", flags), ("k", k), ("pool", pool)):
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def width(self) -> int:
        return int(self.scores.shape[1])

    @classmethod
    def empty(cls) -> "SlateBatch":
        return cls(np.zeros((0, 0)), np.zeros((0, 0), bool), np.zeros(0, np.int32), np.zeros(0, np.int32))

    @classmethod
    def from_slates(cls, slates: Iterable[Slate] | Sequence[Slate]) -> "SlateBatch":
        """Pad a sequence of :class:`Slate` into one batch.

        Examples
        --------
        >>> b = SlateBatch.from_slates([Slate((0.2, 0.9), (True, False), k=2, pool=1),
        ...                             Slate((0.5,), (False,), k=3)])
        >>> b.scores.tolist()
        [[0.2, 0.9], [0.5, -inf]]
        """
        slates = list(slates)
        n = len(slates)
        m = max((len(s.scores) for s in slates), default=0)
        scores = np.full((n, m), -np.inf)
        flags = np.zeros((n, m), dtype=bool)
        for j, s in enumerate(slates):
            if len(s.flags) != len(s.scores):
                raise ValueError(f"slate {j}: {len(s.scores)} scores but {len(s.flags)} flags")
            scores[j, : len(s.scores)] = s.scores
            flags[j, : len(s.flags)] = s.flags
        k = np.fromiter((s.k for s in slates), dtype=np.int32, count=n)
        pool = np.fromiter((s.pool for s in slates), dtype=np.int32, count=n)
        return cls(scores, flags, k, pool)

    def __getitem__(self, idx) -> "SlateBatch":
        """Row selection (slice, index array or mask), keeping the batch padded."""
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1) if idx != -1 else slice(-1, None)
        return SlateBatch(self.scores[idx], self.flags[idx], self.k[idx], self.pool[idx])

    def slates(self) -> list[Slate]:
        """Back to a list of :class:`Slate` (padding dropped)."""
        out = []
        for j in range(len(self)):
            shown = np.isfinite(self.scores[j])
            out.append(
                Slate(
                    tuple(float(x) for x in self.scores[j, shown]),
                    tuple(bool(x) for x in self.flags[j, shown]),
                    int(self.k[j]),
                    int(self.pool[j]),
                )
            )
        return out
