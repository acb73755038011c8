"""Per-user viewing history and the safe-pool rule (Eq. 7 and Property 1 of the paper).

T_safe(u) = {i seen by u : never flagged by u, first-view W% > β, no tag blocked by u},
with W% = 100 · watch_ms / duration_ms of the user's *first* view of the item.

Decisions (SPEC is silent):

* ``duration_ms = 0`` leaves W% undefined; such an item is not safe for any
  numeric β (we cannot claim the user watched it), but is for ``β = None``.
* ``β = None`` drops the watch-time condition (the "none" arm of the paper's
  Fig. 5 ablation); ``β = 0`` still requires a positive watch.
* An item shown but never watched has no first view yet: not safe for numeric β.
* An item never shown in a slate (known only from a watch or a flag, say from
  another surface, or one read before its impression) is not safe: its tags,
  and so whether a rule blocks it, are not known, nor its rank score. It
  becomes safe once an impression shows it.
* The pool is bounded (``max_size``), keeping the highest first rank scores,
  because the ranker fills slots highest-rank-score first anyway.
"""

from __future__ import annotations

import bisect
import heapq
from bisect import bisect_right
from typing import Collection, Container, Iterable, Mapping

import msgspec

__all__ = ["HistoryEntry", "SafeItem", "SafePool", "SafeSpans", "watch_pct", "is_safe", "safe_pool", "pool_size",
           "pool_size_at", "safe_span", "record_view", "record_watch", "record_flag", "trim_history"]


def watch_pct(watch_ms: float, duration_ms: float) -> float | None:
    """W% = 100 · watch_ms / duration_ms; None when the duration is 0.

    Examples
    --------
    >>> watch_pct(30_000, 60_000), watch_pct(5, 0)
    (50.0, None)
    """
    if watch_ms < 0 or duration_ms < 0:
        raise ValueError("watch_ms and duration_ms must be non-negative")
    if duration_ms == 0:
        return None
    return 100.0 * watch_ms / duration_ms


class HistoryEntry(msgspec.Struct, frozen=True, gc=False):
    """What riskgate remembers of one (user, item): SPEC §3 "history".

    Immutable: every change makes a new entry (a struct, built ~8× faster than
    a frozen dataclass: one is made for every item shown and every watch).
    """

    item_id: str
    first_rank_score: float
    tags: tuple[str, ...] = ()
    first_watch_pct: float | None = None
    watched: bool = False  # a first view has been recorded (W% may still be None)
    shown: bool = False  # an impression has been seen (rank score and tags are real)
    flagged: bool = False
    last_seen: float = 0.0
    flag_ts: float | None = None  # event time of the first flag (labels need "flagged by when")
    first_shown: float | None = None  # event time of the first impression showing it
    first_watch_ts: float | None = None  # event time of the first view (the earliest watch)


class SafeItem(msgspec.Struct, frozen=True, gc=False):
    """A replacement candidate: the item, its original rank score and tags."""

    item_id: str
    rank_score: float
    tags: tuple[str, ...] = ()


def is_safe(entry: HistoryEntry, beta: float | None, blocked_tags: Iterable[str] = ()) -> bool:
    """Eq. 7 plus tag constraints: shown, unflagged, first-view W% > β, no blocked tag.

    Examples
    --------
    >>> e = HistoryEntry("i1", 1.0, ("cooking",), first_watch_pct=80.0, watched=True, shown=True)
    >>> is_safe(e, 50.0), is_safe(e, 90.0), is_safe(e, 50.0, {"cooking"})
    (True, False, False)
    >>> is_safe(HistoryEntry("i2", 0.0, (), first_watch_pct=80.0, watched=True), 50.0)  # never shown: tags unknown
    False
    """
    if entry.flagged or not entry.shown:
        return False
    blocked = blocked_tags if isinstance(blocked_tags, (set, frozenset)) else frozenset(blocked_tags)
    if blocked and not blocked.isdisjoint(entry.tags):
        return False
    if beta is None:
        return True
    return entry.first_watch_pct is not None and entry.first_watch_pct > beta


def safe_pool(
    history: Iterable[HistoryEntry],
    beta: float | None,
    blocked_tags: Iterable[str] = (),
    max_size: int | None = None,
) -> list[SafeItem]:
    """T_safe(u), highest first rank score first (ties by item id), at most ``max_size``.

    Examples
    --------
    >>> h = [HistoryEntry("a", 2.0, first_watch_pct=90.0, watched=True, shown=True),
    ...      HistoryEntry("b", 5.0, first_watch_pct=10.0, watched=True, shown=True),
    ...      HistoryEntry("c", 3.0, first_watch_pct=70.0, watched=True, shown=True, flagged=True)]
    >>> [s.item_id for s in safe_pool(h, 50.0)]
    ['a']
    >>> [s.item_id for s in safe_pool(h, None)]
    ['b', 'a']
    """
    pool = [SafeItem(e.item_id, e.first_rank_score, e.tags) for e in _safe_entries(history, beta, blocked_tags)]
    pool.sort(key=lambda s: (-s.rank_score, s.item_id))
    return pool if max_size is None else pool[: max(0, int(max_size))]


class SafePool:
    """T_safe(u) capped at ``max_size`` (as :func:`safe_pool`), kept up to date one entry change at a time.

    It holds the true top ``reserve`` (2 × ``max_size``) of the safe entries, or
    all of them (``complete``), and shows the first ``max_size``. An entry that
    enters is one insertion, one that leaves (flagged, evicted) one removal; the
    history is read again only when removals leave fewer than ``max_size`` of a
    pool that is not complete, which :meth:`update` reports by returning ``None``.

    Examples
    --------
    >>> h = {i: HistoryEntry(i, r, first_watch_pct=90.0, watched=True, shown=True) for i, r in [("a", 3.0), ("b", 2.0)]}
    >>> pool = SafePool(h.values(), 50.0, frozenset(), max_size=2)
    >>> new = HistoryEntry("c", 2.5, first_watch_pct=80.0, watched=True, shown=True)
    >>> pool.update(None, new), [s.item_id for s in pool.items]
    (True, ['a', 'c'])
    >>> pool.update(h["a"], HistoryEntry("a", 3.0, first_watch_pct=90.0, watched=True, shown=True, flagged=True))
    True
    >>> [s.item_id for s in pool.items]
    ['c', 'b']
    """

    __slots__ = ("beta", "blocked", "max_size", "reserve", "keys", "held", "members", "complete")

    def __init__(self, history: Iterable[HistoryEntry], beta: float | None, blocked: frozenset[str],
                 max_size: int | None):
        self.beta, self.blocked = beta, blocked
        self.max_size = None if max_size is None else max(0, int(max_size))
        self.reserve = None if max_size is None else 2 * self.max_size
        safe = sorted(((-e.first_rank_score, e.item_id), e) for e in _safe_entries(history, beta, blocked))
        self.complete = self.reserve is None or len(safe) <= self.reserve
        if not self.complete:
            safe = safe[: self.reserve]
        self.keys = [k for k, _ in safe]
        self.held = [SafeItem(e.item_id, e.first_rank_score, e.tags) for _, e in safe]
        self.members = {item.item_id: item for item in self.held}

    @property
    def items(self) -> list[SafeItem]:
        """The pool: the first ``max_size`` held, highest first rank score first."""
        return self.held if self.max_size is None else self.held[: self.max_size]

    def update(self, old: HistoryEntry | None, new: HistoryEntry | None) -> bool | None:
        """Apply one entry's change (``new`` None: evicted). True: the pool changed; False: it did not;
        None: it cannot follow (too few held after removals) and must be rebuilt from the history."""
        item_id = (new if new is not None else old).item_id
        safe = new is not None and is_safe(new, self.beta, self.blocked)
        member = self.members.get(item_id)
        cap = self.max_size
        changed = False
        if member is not None:
            if safe and new.first_rank_score == member.rank_score and new.tags == member.tags:
                return False
            i = bisect.bisect_left(self.keys, (-member.rank_score, item_id))
            del self.keys[i], self.held[i], self.members[item_id]
            changed = cap is None or i < cap
        if safe:
            key = (-new.first_rank_score, item_id)
            i = bisect.bisect(self.keys, key)
            if i < len(self.keys) or self.complete:  # else it ranks below everything held, and more exists
                item = SafeItem(item_id, new.first_rank_score, new.tags)
                self.keys.insert(i, key)
                self.held.insert(i, item)
                self.members[item_id] = item
                changed = changed or cap is None or i < cap
                if self.reserve is not None and len(self.keys) > self.reserve:
                    self.keys.pop()
                    del self.members[self.held.pop().item_id]
                    self.complete = False
        if not self.complete and cap is not None and len(self.keys) < cap:
            return None
        return changed


def _safe_entries(history: Iterable[HistoryEntry], beta: float | None, blocked_tags: Iterable[str]) -> list[HistoryEntry]:
    """The entries :func:`is_safe` accepts."""
    blocked = blocked_tags if isinstance(blocked_tags, (set, frozenset)) else frozenset(blocked_tags)
    return [e for e in history if is_safe(e, beta, blocked)]


def pool_size(
    history: Iterable[HistoryEntry],
    beta: float | None,
    blocked_tags: Iterable[str] = (),
    max_size: int | None = None,
    exclude: Container[str] = (),
) -> int:
    """|T_safe(u) \\ exclude| with T_safe capped at ``max_size``: ``len`` of :func:`safe_pool` minus ``exclude``.

    Examples
    --------
    >>> h = [HistoryEntry(i, float(r), first_watch_pct=90.0, watched=True, shown=True)
    ...      for i, r in [("a", 3), ("b", 2), ("c", 1)]]
    >>> pool_size(h, 50.0, max_size=2, exclude={"a"}), pool_size(h, 50.0, exclude={"a"})
    (1, 2)
    """
    safe = _safe_entries(history, beta, blocked_tags)
    if max_size is not None and len(safe) > max_size:  # only the cap's highest rank scores count
        safe = heapq.nsmallest(max(0, int(max_size)), safe, key=lambda e: (-e.first_rank_score, e.item_id))
    return sum(1 for e in safe if e.item_id not in exclude)


def _min(a: float | None, b: float) -> float:
    return b if a is None or b < a else a


def record_view(
    history: Mapping[str, HistoryEntry], item_id: str, rank_score: float, tags: Iterable[str], ts: float
) -> HistoryEntry:
    """The entry after ``item_id`` is shown at ``ts``: first rank score and tags are kept."""
    # Entries are built field by field, not with dataclasses.replace: this runs
    # for every item shown and every watch, and replace() costs several times more.
    old = history.get(item_id)
    ts = float(ts)
    if old is None:
        return HistoryEntry(item_id, float(rank_score), tuple(tags), None, False, True, False, ts, None, ts, None)
    last = old.last_seen if old.last_seen > ts else ts
    if not old.shown:  # created by an early watch or flag: fill in what the impression knows
        return HistoryEntry(item_id, float(rank_score), tuple(tags), old.first_watch_pct, old.watched, True,
                            old.flagged, last, old.flag_ts, _min(old.first_shown, ts), old.first_watch_ts)
    return HistoryEntry(item_id, old.first_rank_score, old.tags, old.first_watch_pct, old.watched, old.shown,
                        old.flagged, last, old.flag_ts, _min(old.first_shown, ts), old.first_watch_ts)


def record_watch(
    history: Mapping[str, HistoryEntry], item_id: str, watch_ms: float, duration_ms: float, ts: float
) -> HistoryEntry:
    """The entry after a watch: the *first* view (the earliest by event time) sets W%.

    A watch that arrives before its impression creates the entry (rank score 0,
    no tags) so the first view is not lost; the impression later fills them in.
    The earliest watch wins whatever the arrival order, so the entry does not
    depend on how the input topics were interleaved.
    """
    ts = float(ts)
    old = history.get(item_id)
    if old is None:
        return HistoryEntry(item_id, 0.0, (), watch_pct(watch_ms, duration_ms), True, False, False, ts, None, None, ts)
    last = old.last_seen if old.last_seen > ts else ts
    if not old.watched or (old.first_watch_ts is not None and ts < old.first_watch_ts):
        pct, first = watch_pct(watch_ms, duration_ms), ts
    else:
        pct, first = old.first_watch_pct, old.first_watch_ts
    return HistoryEntry(item_id, old.first_rank_score, old.tags, pct, True, old.shown, old.flagged, last, old.flag_ts,
                        old.first_shown, first)


def record_flag(history: Mapping[str, HistoryEntry], item_id: str, ts: float) -> HistoryEntry:
    """The entry after a flag: flagged forever (a flag always updates the safe pool).

    ``flag_ts`` keeps the earliest flag time, so labels do not depend on the
    order in which duplicate or out-of-order flags arrive.
    """
    ts = float(ts)
    old = history.get(item_id)
    if old is None:
        return HistoryEntry(item_id, 0.0, (), None, False, False, True, ts, ts, None, None)
    first = ts if old.flag_ts is None else min(old.flag_ts, ts)
    last = old.last_seen if old.last_seen > ts else ts
    return HistoryEntry(item_id, old.first_rank_score, old.tags, old.first_watch_pct, old.watched, old.shown, True,
                        last, first, old.first_shown, old.first_watch_ts)


def pool_size_at(
    history: Iterable[HistoryEntry],
    t: float,
    beta: float | None,
    blocked_tags: Iterable[str] = (),
    max_size: int | None = None,
    exclude: Container[str] = (),
) -> int:
    """|T_safe(u) \\ exclude| as it stood at event time ``t``: :func:`pool_size` over the history as of ``t``.

    As of ``t`` an entry is shown (first shown at or before ``t``), unflagged
    (no flag at or before ``t``) and, for a numeric β, first viewed at or
    before ``t`` with W% > β; ``blocked_tags`` are the rules in force at ``t``.
    Entries written before these times were kept count as shown and viewed long ago.

    Examples
    --------
    >>> h = [HistoryEntry("a", 2.0, first_watch_pct=90.0, watched=True, shown=True, first_shown=5.0,
    ...                   first_watch_ts=6.0),
    ...      HistoryEntry("b", 1.0, first_watch_pct=90.0, watched=True, shown=True, first_shown=5.0,
    ...                   first_watch_ts=20.0),
    ...      HistoryEntry("c", 3.0, first_watch_pct=90.0, watched=True, shown=True, flagged=True, flag_ts=30.0,
    ...                   first_shown=1.0, first_watch_ts=2.0)]
    >>> pool_size_at(h, 10.0, 50.0), pool_size_at(h, 25.0, 50.0), pool_size_at(h, 31.0, 50.0)
    (2, 3, 2)
    """
    # The rule is safe_span's, the one SafeSpans keeps for long histories.
    blocked = blocked_tags if isinstance(blocked_tags, (set, frozenset)) else frozenset(blocked_tags)
    keys = [(-e.first_rank_score, e.item_id) for e in history
            if (s := safe_span(e, beta, blocked)) is not None and s[0] <= t < s[1]]
    if max_size is not None and len(keys) > max_size:  # only the cap's highest rank scores count
        keys = heapq.nsmallest(max(0, int(max_size)), keys)
    return sum(1 for _, item in keys if item not in exclude)


_INF = float("inf")


def safe_span(e: HistoryEntry, beta: float | None, blocked: frozenset[str]) -> tuple[float, float] | None:
    """When ``e`` counts in :func:`pool_size_at` (cap aside): at every ``t`` with ``start ≤ t < end``; None: never.

    ``start`` is the first showing, or the first view if later (β numeric),
    ``-inf`` for an entry written before those times were kept; ``end`` is the
    first flag, ``inf`` if none. An entry never shown never counts (its tags are unknown).

    Examples
    --------
    >>> e = HistoryEntry("a", 2.0, (), 90.0, watched=True, shown=True, flag_ts=9.0, first_shown=5.0, first_watch_ts=6.0)
    >>> safe_span(e, 50.0, frozenset()), safe_span(e, None, frozenset()), safe_span(e, 95.0, frozenset())
    ((6.0, 9.0), (5.0, 9.0), None)
    """
    if not e.shown or (blocked and not blocked.isdisjoint(e.tags)):
        return None
    start = -_INF if e.first_shown is None else e.first_shown
    if beta is not None:
        if not e.watched or e.first_watch_pct is None or e.first_watch_pct <= beta:
            return None
        if e.first_watch_ts is not None and e.first_watch_ts > start:
            start = e.first_watch_ts
    end = _INF if e.flag_ts is None else e.flag_ts
    return (start, end) if start < end else None


class SafeSpans:
    """How many entries counted in the pool at any time ``t``: :func:`pool_size_at` without reading the history.

    Each entry's :func:`safe_span` ``[start, end)``, as two sorted lists: the
    entries counted at ``t`` (cap aside) number #{start ≤ t} − #{end ≤ t}, since
    every span ends after it starts. A slate's ``p`` at maturity is then two
    bisections and a look at the slate's own items, where :func:`pool_size_at`
    walks the whole history (``history_max`` entries) for every slate. Kept
    change by change (:meth:`update`, with the entry before and after, as
    :class:`SafePool`); the rule is the same, so the two always agree
    (``tests/test_safe_pool_incremental.py``). When more than the cap counted
    at ``t``, which of them rank within it needs their rank scores: from then on
    the spans are also kept in the pool's order, and the count walks them up to
    the cap.

    Examples
    --------
    >>> h = {"a": HistoryEntry("a", 2.0, first_watch_pct=90.0, watched=True, shown=True, first_watch_ts=6.0,
    ...                        flag_ts=30.0),
    ...      "b": HistoryEntry("b", 1.0, first_watch_pct=90.0, watched=True, shown=True, first_watch_ts=20.0)}
    >>> spans = SafeSpans(h.values(), 50.0, frozenset())
    >>> [spans.size_at(t, h, None, ()) for t in (5.0, 10.0, 25.0, 31.0)]
    [0, 1, 2, 1]
    >>> spans.size_at(25.0, h, None, {"a"}), spans.size_at(25.0, h, 1, ())
    (1, 1)
    """

    __slots__ = ("beta", "blocked", "starts", "ends", "ranked")

    def __init__(self, history: Iterable[HistoryEntry], beta: float | None, blocked: frozenset[str]):
        self.beta, self.blocked = beta, blocked
        spans = [s for e in history if (s := safe_span(e, beta, blocked)) is not None]
        self.starts = sorted(s for s, _ in spans)
        self.ends = sorted(e for _, e in spans if e != _INF)  # (an open span never ends by any t)
        # (-rank score, item id, start, end) of every span, in the pool's order: kept only once
        # more than the cap counted at some t (see size_at), as it costs ~90 bytes an entry.
        self.ranked: list[tuple] | None = None

    def update(self, old: HistoryEntry | None, new: HistoryEntry | None) -> None:
        """Apply one entry's change (``old`` the entry these spans hold for it; ``new`` None: evicted)."""
        beta, blocked, ranked = self.beta, self.blocked, self.ranked
        before = None if old is None else safe_span(old, beta, blocked)
        after = None if new is None else safe_span(new, beta, blocked)
        if before == after and (ranked is None or before is None or old.first_rank_score == new.first_rank_score):
            return  # most changes (a later watch, a view): the span, and its place in the order, stay
        if before != after:
            if before is not None:
                start, end = before
                del self.starts[bisect.bisect_left(self.starts, start)]
                if end != _INF:
                    del self.ends[bisect.bisect_left(self.ends, end)]
            if after is not None:
                start, end = after
                bisect.insort(self.starts, start)
                if end != _INF:
                    bisect.insort(self.ends, end)
        if ranked is not None:
            if before is not None:  # (a 2-tuple sorts just before the 4-tuples it begins)
                del ranked[bisect.bisect_left(ranked, (-old.first_rank_score, old.item_id))]
            if after is not None:
                bisect.insort(ranked, (-new.first_rank_score, new.item_id, *after))

    def size_at(self, t: float, history: Mapping[str, HistoryEntry], max_size: int | None,
                exclude: Collection[str]) -> int:
        """:func:`pool_size_at` of ``history`` (the entries these spans follow) at ``t``, minus ``exclude``."""
        n = bisect_right(self.starts, t) - bisect_right(self.ends, t)
        if max_size is not None and n > max_size:
            # Which of them rank within the cap: walk the spans in the pool's order up to the
            # cap-th counted at t (a heavy user's history holds more safe items than the cap).
            if max_size <= 0:
                return 0
            ranked = self.ranked
            if ranked is None:
                beta, blocked = self.beta, self.blocked
                ranked = self.ranked = sorted((-e.first_rank_score, e.item_id, *s) for e in history.values()
                                              if (s := safe_span(e, beta, blocked)) is not None)
            counted = taken = 0
            for _, item, start, end in ranked:
                if start <= t < end:
                    counted += 1
                    if item in exclude:
                        taken += 1
                    if counted == max_size:
                        break
            return counted - taken
        for item in exclude:
            e = history.get(item)
            if e is not None and (s := safe_span(e, self.beta, self.blocked)) is not None and s[0] <= t < s[1]:
                n -= 1
        return n


def trim_history(history: Mapping[str, HistoryEntry], max_items: int) -> list[str]:
    """Item ids to evict so at most ``max_items`` remain: least recently seen first.

    Flagged items are evicted last: forgetting a flag would let the item back
    into the safe pool if it were shown and watched again.
    """
    excess = len(history) - int(max_items)
    if excess <= 0:
        return []
    # The order is (flagged, last_seen, item_id). A trim runs every ~history_max/10 new
    # items over the whole history, so it avoids sorting entries by a key tuple: the
    # excess-th smallest last_seen of the unflagged (a sort of plain floats) bounds the
    # ones evicted, and only those at or below it are sorted by the full key.
    entries = history.values()
    times = sorted([e.last_seen for e in entries if not e.flagged])
    if len(times) < excess:  # flagged ones go too: the whole order
        order = sorted(entries, key=lambda e: (e.flagged, e.last_seen, e.item_id))
        return [e.item_id for e in order[:excess]]
    cut = times[excess - 1]
    oldest = sorted([(e.last_seen, e.item_id) for e in entries if e.last_seen <= cut and not e.flagged])
    return [item for _, item in oldest[:excess]]
