"""Applying the policy: Algorithm 1, lines 3–6 of the paper (SPEC §8).

Given the ranker's top-k in rank order, λ̂, the user's safe pool and blocked tags:

1. drop every item with s < λ̂ (λ̂ = None means +inf: drop all) or a blocked tag;
2. ``remove``: serve what is left, in order, with the freed slots empty;
3. ``replace``: fill the freed slots, in place, with safe-pool items (highest
   original rank score first, never an item already in the slate, never a
   blocked tag), then append safe items until the slate has ``k`` items or the
   pool runs out.

Filling up to ``k`` (not only the freed slots) is what the replace-risk of
SPEC §4, ``f / min(k, a + p)``, assumes about the served size; serving fewer
would make the calibrated bound too optimistic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from .safe_pool import SafeItem

__all__ = ["Candidate", "Served", "apply_policy", "in_holdout"]


@dataclass(frozen=True)
class Candidate:
    """An item the ranker proposes: filter score s, rank score f, tags."""

    item_id: str
    score: float
    rank_score: float
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Served:
    """An item in the final slate; ``replacement`` marks safe-pool fills."""

    item_id: str
    score: float | None
    rank_score: float
    tags: tuple[str, ...]
    replacement: bool


def apply_policy(
    candidates: Sequence[Candidate],
    k: int,
    lam: float | None,
    strategy: str,
    safe_pool: Iterable[SafeItem] = (),
    blocked_tags: Iterable[str] = (),
) -> list[Served]:
    """Algorithm 1: filter by λ̂ and blocked tags, then ``remove`` or ``replace``.

    Examples
    --------
    >>> c = [Candidate("a", 0.9, 5.0), Candidate("b", 0.2, 4.0), Candidate("c", 0.8, 3.0, ("guns",))]
    >>> [s.item_id for s in apply_policy(c, 3, 0.5, "remove", blocked_tags={"guns"})]
    ['a']
    >>> pool = [SafeItem("x", 9.0), SafeItem("a", 8.0), SafeItem("y", 1.0)]
    >>> [(s.item_id, s.replacement) for s in apply_policy(c, 3, 0.5, "replace", pool, {"guns"})]
    [('a', False), ('x', True), ('y', True)]
    """
    if strategy not in ("remove", "replace"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if k < 1:
        raise ValueError("k must be >= 1")
    blocked = frozenset(blocked_tags)
    top = list(candidates)[:k]

    def allowed(tags: Iterable[str]) -> bool:
        return not blocked or blocked.isdisjoint(tags)

    slots: list[Served | None] = []
    for c in top:
        keep = lam is not None and c.score >= lam and allowed(c.tags)
        slots.append(Served(c.item_id, c.score, c.rank_score, c.tags, False) if keep else None)

    if strategy == "remove":
        return [s for s in slots if s is not None]

    present = {c.item_id for c in top}
    fills = (
        Served(p.item_id, None, p.rank_score, p.tags, True)
        for p in sorted(safe_pool, key=lambda p: (-p.rank_score, p.item_id))
        if p.item_id not in present and allowed(p.tags)
    )
    out: list[Served] = []
    for s in slots:
        if s is None:
            s = next(fills, None)
        if s is not None:
            out.append(s)
    while len(out) < k:
        s = next(fills, None)
        if s is None:
            break
        out.append(s)
    return out


def in_holdout(slate_id: str, share: float, salt: str = "riskgate") -> bool:
    """Deterministic holdout draw: the same slate id always lands the same way.

    About ``share`` of slates are served unfiltered (``policy_applied=false``);
    only those measure the risk honestly and calibrate λ̂.

    Examples
    --------
    >>> sum(in_holdout(f"s{i}", 0.1) for i in range(10000)) in range(900, 1100)
    True
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError("holdout share must be in [0, 1]")
    return random.Random(f"{salt}:{slate_id}").random() < share
