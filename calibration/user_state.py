"""One user's state and how each event changes it (SPEC §2–3): the stream's per-user logic.

The Faust agents and the offline replay both drive a :class:`UserState` with the
same calls, so a replay of an event file computes what the live stream does.

State, all bounded: the viewing history (the ``history_max`` most recent items
no pending slate needs, plus those it needs, plus ~10 % between trims; flagged
items are evicted last), tag rules from ``constraints`` (one per tag ever named:
bounded by the platform's tags, not by riskgate), reporting
counts (items shown, distinct items flagged), pending holdout and
policy-applied slates awaiting maturity (``pending_max``), the user's own recent
mature holdout slates for the ``user:<id>`` group (``user_window_max``), and
the ids of recent events for de-duplication (``dedup_max``; watch events are
idempotent by themselves and are not remembered).

Event time: the caller passes the watermark of the user's partition (largest
event ``ts`` seen minus the allowed lateness). An event older than the
watermark is *late*: a late impression is remembered in the history but never
calibrates; a late flag still updates the safe pool (SPEC §2). A slate served
at ``ts`` matures once the watermark passes ``ts + label_window``; its label
for item i is "the user flagged i at or before ``ts + label_window``".
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from .events import Constraints, Flag, Impression, Watch
from .groups import band_of
from .safe_pool import (HistoryEntry, SafeItem, SafePool, SafeSpans, is_safe, pool_size_at, record_flag, record_view,
                        record_watch, trim_history)
from .slates import DROPPED

__all__ = ["Limits", "PendingSlate", "MatureSlate", "UserState", "CORE", "RECENT", "PENDING", "SEEN", "SPANS_MIN"]

_INF = float("inf")

#: Histories of at least this many entries count a maturing slate's ``p`` with
#: :class:`calibration.safe_pool.SafeSpans` (kept change by change, ~16 bytes an
#: entry, ~90 more once more than the cap were safe at a slate's ts); shorter ones walk
#: the history (:func:`calibration.safe_pool.pool_size_at`), which costs less than keeping the spans.
SPANS_MIN = 64

#: In :attr:`UserState.touched` (never an item id: those hold no NUL): the core changed,
#: i.e. anything but history entries (positions are stored with the core).
CORE = "\x00core"
#: In :attr:`UserState.touched`, followed by a sequence number: that slate of
#: :attr:`UserState.recent` was added or dropped (stores keep each one apart from the core).
RECENT = "\x00r"
#: In :attr:`UserState.touched`, followed by :attr:`PendingSlate.seq`: that pending slate was added or matured.
PENDING = "\x00p"
#: In :attr:`UserState.touched`, followed by a sequence number: that remembered event id was added or forgotten.
SEEN = "\x00s"


@dataclass(frozen=True)
class Limits:
    """Per-user bounds and the safe-pool rule's parameters."""

    beta: float | None = 50.0
    history_max: int = 500
    pending_max: int = 2000
    safe_pool_max: int = 100
    user_window_max: int = 1000
    dedup_max: int = 512


class PendingSlate(msgspec.Struct, frozen=True, gc=False):
    """A served slate awaiting its labels."""

    slate_id: str
    ts: float
    k: int
    # p, repeats and band are counted at maturity, as of ts (UserState.mature), from everything up
    # to ts + label_window; these two stay so that stored slates keep their layout (written 0 and ()).
    pool: int
    policy_applied: bool
    alpha: float | None
    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    replacement: tuple[bool, ...]
    repeat_pct: tuple[float | None, ...]
    seq: int = 0  # the user's count of pending slates before this one (UserState.pending_seq): its store key
    # Each item's tags as served: what the ranker's tag filter saw (an item's history entry keeps
    # the tags of its first showing, which moderation may have changed since). None: a slate
    # stored before riskgate kept them (its items' history tags stand in).
    tags: tuple[tuple[str, ...], ...] | None = None
    # Constraint violations counted when the impression was applied (UserState.violations); its
    # maturity adds those of rules stamped by ts but read after. None: a slate stored before.
    violations: int | None = None


class MatureSlate(msgspec.Struct, frozen=True, gc=False):
    """A slate with final labels: what calibration and the monitors consume."""

    user_id: str
    slate_id: str
    ts: float
    k: int
    pool: int  # p: the usable safe-pool size at ts (pool minus the slate's own items)
    band: str  # the user's reporting band at ts
    policy_applied: bool
    alpha: float | None
    scores: tuple[float, ...]  # -inf: an item of a holdout slate the user's tag rules at ts drop
    flags: tuple[bool, ...]  # as read, dropped items' too (calibration ignores those: never kept)
    replacement: tuple[bool, ...]
    repeat_pct: tuple[float | None, ...]  # first-view W% of items viewed before ts and not flagged before it
    # violations of a policy-applied slate found at maturity beyond those counted at its impression
    # (rules stamped by ts, read after it); never stored: holdout slates have none
    late_violations: int = 0


@dataclass(slots=True)
class UserState:
    """Everything riskgate holds about one user. Mutated in place by the ``on_*`` methods."""

    user_id: str
    history: dict[str, HistoryEntry] = field(default_factory=dict)
    tag_rules: dict[str, tuple[bool, float]] = field(default_factory=dict)  # tag -> (blocked, ts)
    shown: int = 0
    flagged: int = 0
    pending: list[PendingSlate] = field(default_factory=list)
    recent: list[MatureSlate] = field(default_factory=list)
    # Sequence number of recent[0]; recent[i] is number recent_seq + i. Slates are only ever
    # appended and dropped from the front, so a store can key each slate by its number.
    recent_seq: int = 0
    seen: dict[str, float] = field(default_factory=dict)  # event_id -> ts, insertion-ordered
    # Like recent_seq: the i-th remembered id is number seen_seq + i; and the number the next
    # pending slate gets. Stores key these lists' members by them (streams.state).
    seen_seq: int = 0
    pending_seq: int = 0
    version: int = 0  # of this user's own published thresholds; only grows, kept with the state
    # What a slate still pending may need to see the user as of its ts (see counts_at and
    # blocked_at), beyond what the history and the pending slates tell: impressions counted in
    # ``shown`` that hold no pending slate (late, or past pending_max), as (ts, items shown);
    # and tag rules no longer current (superseded, or older than the current one when they
    # arrived), as (tag, blocked, ts) in arrival order. Pruned at maturity: both hold only
    # what a slate served at or after min(watermark, oldest pending ts) can still need.
    shown_log: list[tuple[float, int]] = field(default_factory=list)
    rule_log: list[tuple[str, bool, float]] = field(default_factory=list)
    # Source log -> position (offset) of the last record of this user applied from it. A log
    # replayed after a crash re-delivers records; these are recognised however many there are
    # (``seen`` only covers the last ``dedup_max`` event ids, and a fast replay of a heavy user
    # runs past that). The offline replay, which has no log positions, leaves it empty.
    # Stored with the core, so what a store holds may lag for watches (note_position):
    # a watch replayed is harmless as long as its entry is still there.
    positions: dict[str, int] = field(default_factory=dict)
    # What changed since a store last wrote this user, for stores that write changes
    # only (streams.state): item ids of changed or evicted history entries, RECENT, PENDING
    # or SEEN + the number of each member of those lists added or dropped, and CORE when
    # anything else changed. None: not tracked (a new user, or the replay's dict).
    touched: set | None = field(default=None, compare=False, repr=False)
    # Items of pending slates, counted (trimming checks it on every event); None: recount.
    _pending_items: int | None = field(default=None, init=False, compare=False, repr=False)
    # The capped safe pool, followed change by change once asked for (None: build at the next ask),
    # and whether it may differ from what the caller last took (pool_changed).
    _pool: SafePool | None = field(default=None, init=False, compare=False, repr=False)
    _pool_changed: bool = field(default=True, init=False, compare=False, repr=False)
    _pool_took_out: bool = field(default=True, init=False, compare=False, repr=False)  # see take_pool_removal
    # The pool as the caller last handed it out (pool_published), item id -> item; None: unknown,
    # so any safe item may have been. A removal is judged against this, not the current pool:
    # a caller that holds back additions may have handed out items the pool no longer shows.
    _pool_shown: dict | None = field(default=None, init=False, compare=False, repr=False)
    _blocked: frozenset | None = field(default=None, init=False, compare=False, repr=False)
    # When each entry counted in the pool (p at maturity), for long histories (SPANS_MIN); None: not kept.
    _spans: SafeSpans | None = field(default=None, init=False, compare=False, repr=False)
    # First-flag times of the history's flagged entries, sorted (None: read at the next ask); only a
    # flag or an eviction changes them. A flagged user's every maturity asks (counts_at).
    _flag_times_cache: list[float] | None = field(default=None, init=False, compare=False, repr=False)

    # -- derived views -----------------------------------------------------
    @property
    def band(self) -> str:
        return band_of(self.shown, self.flagged)

    @property
    def blocked_tags(self) -> frozenset[str]:
        blocked = self._blocked
        if blocked is None:  # kept until the tag rules change: read for every impression
            blocked = self._blocked = frozenset(t for t, (b, _) in self.tag_rules.items() if b)
        return blocked

    def safe_pool(self, limits: Limits) -> list[SafeItem]:
        """T_safe(u), capped (:func:`calibration.safe_pool.safe_pool` of the history)."""
        pool = self._pool
        if pool is None or pool.beta != limits.beta or pool.max_size != limits.safe_pool_max:
            pool = self._pool = SafePool(self.history.values(), limits.beta, self.blocked_tags, limits.safe_pool_max)
        return list(pool.items)

    def take_pool_changed(self) -> bool:
        """Whether the safe pool may have changed since the last call (True on a user just loaded)."""
        changed, self._pool_changed = self._pool_changed, False
        return changed

    def take_pool_removal(self) -> bool:
        """Whether an item may have left the safe pool since the last call (True on a user just loaded).

        Removals are what keep rankers safe (a flagged item must stop being a
        replacement); a pool that only gained items may be published later.
        """
        took_out, self._pool_took_out = self._pool_took_out, False
        return took_out

    def pool_published(self, items: Iterable[SafeItem]) -> None:
        """Note the pool the caller handed out: later removals are judged against it (:meth:`take_pool_removal`)."""
        self._pool_shown = {item.item_id: item for item in items}

    def _entry_changed(self, old: HistoryEntry | None, new: HistoryEntry | None) -> None:
        if self._spans is not None:
            self._spans.update(old, new)
        pool = self._pool
        if pool is None:
            self._pool_changed = self._pool_took_out = True
            return
        changed = pool.update(old, new)
        if changed is None:
            self._pool = None
            self._pool_changed = self._pool_took_out = True
            return
        if changed:
            self._pool_changed = True
        if old is not None and not self._pool_took_out:
            # A removal is an item handed out that is no longer safe as handed out (flagged,
            # blocked, evicted, or its rank score or tags changed), wherever it now ranks:
            # it may have dropped past the cap, or out of the pool's reserve, unpublished.
            shown = self._pool_shown
            if shown is None:
                was = SafeItem(old.item_id, old.first_rank_score, old.tags) if is_safe(old, pool.beta, pool.blocked) else None
            else:
                was = shown.get(old.item_id)
            if was is not None and not (new is not None and new.first_rank_score == was.rank_score
                                        and new.tags == was.tags and is_safe(new, pool.beta, pool.blocked)):
                self._pool_took_out = True

    def violations(self, ev: Impression) -> int:
        """Served items carrying a tag blocked by a rule in force at the slate's ts (must be 0 on policy-applied slates).

        Counted when the impression is applied, for an alert that fires at once:
        a rule from after the slate, read first because the constraints topic ran
        ahead, is no violation. One from before it that is not read yet is added
        at the slate's maturity (:meth:`mature`, ``MatureSlate.late_violations``).
        """
        if not self.tag_rules:
            return 0
        return _blocked_count(self.blocked_at(ev.ts), (it.tags for it in ev.items))

    # -- de-duplication ----------------------------------------------------
    def is_duplicate(self, event_id: str) -> bool:
        return event_id in self.seen

    def _remember(self, event_id: str, ts: float, limits: Limits) -> None:
        seen, touched = self.seen, self.touched
        seen[event_id] = ts
        if touched is not None:
            touched.add(CORE)
            touched.add(SEEN + str(self.seen_seq + len(seen) - 1))
        while len(seen) > limits.dedup_max:
            del seen[next(iter(seen))]
            if touched is not None:
                touched.add(SEEN + str(self.seen_seq))
            self.seen_seq += 1

    # -- events ------------------------------------------------------------
    def on_impression(self, ev: Impression, watermark: float, limits: Limits, violations: int | None = None) -> str:
        """Record a served slate. Returns the outcome: ``ok``, ``late``, ``duplicate``, ``pending_overflow``.

        ``violations``: what :meth:`violations` counted for it, kept with the pending slate
        so that its maturity counts only those of rules read since.
        """
        if self.is_duplicate(ev.event_id):
            return "duplicate"
        self._remember(ev.event_id, ev.ts, limits)
        late = ev.ts < watermark
        outcome = "late" if late else "ok"
        held = False  # whether a pending slate counts these items for counts_at
        if not late:
            # p, band and repeats are counted at maturity, as of the slate's ts (see mature):
            # by then every event up to ts + label_window has been read, whatever the order.
            pending = PendingSlate(
                ev.slate_id, ev.ts, ev.k, 0, ev.policy_applied, ev.alpha,
                tuple(it.item_id for it in ev.items), tuple(it.score for it in ev.items),
                tuple(it.replacement for it in ev.items), (), self.pending_seq, tuple(it.tags for it in ev.items),
                violations,
            )
            if len(self.pending) >= limits.pending_max:
                outcome = "pending_overflow"
            else:
                self._insert_pending(pending)
                held = True
        if not held and self.pending and ev.ts > self._needed_from(watermark):
            self.shown_log.append((ev.ts, len(ev.items)))  # (the core is touched: the event id was remembered)
        for it in ev.items:
            rank = it.score if it.rank_score is None else it.rank_score
            old = self.history.get(it.item_id)
            self.history[it.item_id] = new = record_view(self.history, it.item_id, rank, it.tags, ev.ts)
            self._entry_changed(old, new)
        if self.touched is not None:
            self.touched.update(it.item_id for it in ev.items)
        self.shown += len(ev.items)  # (the core is touched: the event id was remembered)
        self._trim(limits)
        return outcome

    def on_watch(self, ev: Watch, watermark: float, limits: Limits) -> str:
        # Not remembered for de-duplication: a watch is idempotent by itself (only the
        # first view sets W%, last_seen is a max), and remembering the ids of the
        # most frequent event would change the user's stored core on every one.
        old = self.history.get(ev.item_id)
        self.history[ev.item_id] = new = record_watch(self.history, ev.item_id, ev.watch_ms, ev.duration_ms, ev.ts)
        self._entry_changed(old, new)
        if self.touched is not None:
            self.touched.add(ev.item_id)
        self._trim(limits)
        return "late" if ev.ts < watermark else "ok"

    def on_flag(self, ev: Flag, watermark: float, limits: Limits) -> str:
        if self.is_duplicate(ev.event_id):
            return "duplicate"
        self._remember(ev.event_id, ev.ts, limits)
        old = self.history.get(ev.item_id)
        if old is None or not old.flagged:
            self.flagged += 1  # distinct items flagged: the reporting rate's numerator
        self.history[ev.item_id] = new = record_flag(self.history, ev.item_id, ev.ts)
        self._flag_times_cache = None
        self._entry_changed(old, new)
        if self.touched is not None:
            self.touched.add(ev.item_id)
        self._trim(limits)
        return "late" if ev.ts < watermark else "ok"

    def on_constraints(self, ev: Constraints, watermark: float, limits: Limits) -> str:
        """Block/unblock tags; per tag the rule with the latest ``ts`` wins, whatever the arrival order."""
        if self.is_duplicate(ev.event_id):
            return "duplicate"
        self._remember(ev.event_id, ev.ts, limits)
        log = self.rule_log
        for tag, blocked in [(t, True) for t in ev.block_tags] + [(t, False) for t in ev.unblock_tags]:
            old = self.tag_rules.get(tag)
            if old is None or ev.ts >= old[1]:
                self.tag_rules[tag] = (blocked, ev.ts)
                self._pool, self._pool_changed, self._blocked = None, True, None  # blocked tags changed
                self._spans = None
                self._pool_took_out = True
                if old is not None:
                    log.append((tag, old[0], old[1]))  # still the rule of slates served before ev.ts
            else:
                log.append((tag, blocked, ev.ts))  # the rule of slates served between its ts and the current's
        if log:
            self._prune_logs(self._needed_from(watermark))
        return "late" if ev.ts < watermark else "ok"

    # -- the user as of a slate's ts -----------------------------------------
    def counts_at(self, t: float) -> tuple[int, int]:
        """(items shown, distinct items flagged) by events with ``ts ≤ t``: the counts behind the band at ``t``.

        What came after ``t`` is taken off the totals: impressions of pending
        slates served after ``t`` and of :attr:`shown_log`, and items whose
        first flag is after ``t`` (flagged entries are evicted last, so their
        entries are there). Exact for any ``t`` a pending slate can have.
        """
        pending_items = self._pending_items
        if pending_items is None:
            pending_items = self._pending_items = sum(len(p.item_ids) for p in self.pending)
        # All pending items but those of slates at or before t, summed from the oldest (pending is in
        # ts order): maturity asks for the oldest ts, and walking back from the newest slate took the
        # whole list at each maturity, O(pending²) over a label window for a heavy user.
        at_or_before = 0
        for p in self.pending:
            if p.ts > t:
                break
            at_or_before += len(p.item_ids)
        shown = self.shown - (pending_items - at_or_before)
        for ts, n in self.shown_log:
            if ts > t:
                shown -= n
        flagged = self.flagged
        if flagged:
            flag_times = self._flag_times()
            flagged -= len(flag_times) - bisect_right(flag_times, t)
        return shown, flagged

    def _flag_times(self) -> list[float]:
        times = self._flag_times_cache
        if times is None:
            times = self._flag_times_cache = sorted(h.flag_ts for h in self.history.values()
                                                    if h.flagged and h.flag_ts is not None)
        return times

    def blocked_at(self, t: float) -> frozenset[str]:
        """The tags blocked by the rules in force at event time ``t`` (per tag the latest with ``ts ≤ t``)."""
        current = self.blocked_tags
        rules = self.tag_rules
        if all(ts <= t for _, ts in rules.values()):
            return current  # (a rule in the log is never later than its tag's current one)
        in_force: dict[str, tuple[float, bool]] = {}
        for tag, blocked, ts in self.rule_log:  # arrival order: of equal ts, the later arrival won
            if ts <= t and (tag not in in_force or ts >= in_force[tag][0]):
                in_force[tag] = (ts, blocked)
        for tag, (blocked, ts) in rules.items():
            if ts <= t:
                in_force[tag] = (ts, blocked)
        return frozenset(tag for tag, (_, blocked) in in_force.items() if blocked)

    def _needed_from(self, watermark: float) -> float:
        """The earliest ts a slate that may still mature can have: min(watermark, oldest pending ts).

        Pending slates do not move, and a new one is not late (its ts is at least the
        watermark, which never decreases), so this never decreases either.
        """
        return min(watermark, self.pending[0].ts) if self.pending else watermark

    def _prune_logs(self, q: float) -> None:
        """Drop what no slate served at or after ``q`` can need from :attr:`shown_log` and :attr:`rule_log`."""
        if self.shown_log:
            self.shown_log = [x for x in self.shown_log if x[0] > q]
        log = self.rule_log
        if log:
            # Per tag, of the rules with ts ≤ q only the one in force at q is still needed, and
            # only if it is not the current rule.
            latest: dict[str, int] = {}
            for i, (tag, _, ts) in enumerate(log):
                if ts <= q and (tag not in latest or ts >= log[latest[tag]][2]):
                    latest[tag] = i
            keep = [x for i, x in enumerate(log)
                    if x[2] > q or (latest.get(x[0]) == i and self.tag_rules.get(x[0], (False, _INF))[1] > q)]
            if len(keep) != len(log):
                self.rule_log = keep

    # -- maturity ----------------------------------------------------------
    def next_maturity(self, label_window: float) -> float | None:
        return self.pending[0].ts + label_window if self.pending else None

    def mature(
        self, watermark: float, label_window: float, horizon: float, limits: Limits
    ) -> tuple[list[MatureSlate], list[MatureSlate]]:
        """Pop every pending slate with ``ts + label_window < watermark`` (event time has passed it, SPEC §1) and label it.

        Holdout slates served at or after ``horizon`` (the start of the oldest live
        window bucket) join :attr:`recent`, the user's share of every calibration
        window. Returns ``(matured, evicted)``: ``evicted`` are live slates pushed
        out of :attr:`recent` by ``user_window_max``, which the caller must take
        back out of the shared windows so that those stay the sum of the users'
        ``recent`` slates.
        """
        matured: list[MatureSlate] = []
        blocked = self.blocked_tags
        history = self.history
        spans = self._spans
        if spans is None or spans.beta != limits.beta or (spans.blocked is not blocked and spans.blocked != blocked):
            spans = self._spans = (SafeSpans(self.history.values(), limits.beta, blocked)
                                   if len(self.history) >= SPANS_MIN else None)
        while self.pending and self.pending[0].ts + label_window < watermark:
            p = self.pending.pop(0)
            if self.touched is not None:
                self.touched.add(CORE)
                self.touched.add(PENDING + str(p.seq))
            if self._pending_items is not None:
                self._pending_items -= len(p.item_ids)
            # Everything is counted now, as of the slate's ts: by maturity every event up to
            # ts + label_window has been read (the watermark waits for lagging topics), so
            # what the slate carries does not depend on how far each topic had been read
            # when its impression was, or is now (tests/test_read_order.py).
            t = p.ts
            cutoff = t + label_window
            flags = []
            repeats = []
            blocked_then = self.blocked_at(t)
            # SPEC §8: the ranker drops an item of a tag the user blocked whatever λ̂, so a
            # holdout slate calibrates that filter: such an item gets filter score -inf
            # (never kept at any λ, as padding), or a slate's fraction of flagged kept
            # items would not bound what the policy serves (dropping an unflagged blocked
            # item raises it). Its flag stays as read, for the monitors.
            dropped = None if p.policy_applied or not blocked_then else []
            served_tags = p.tags
            for j, item in enumerate(p.item_ids):
                h = history.get(item)  # (items of pending slates are never trimmed)
                if dropped is not None:
                    tags = served_tags[j] if served_tags is not None else h.tags if h is not None else ()
                    dropped.append(not blocked_then.isdisjoint(tags))
                if h is None:
                    flags.append(False)
                    repeats.append(None)
                    continue
                flag_ts = h.flag_ts
                flags.append(flag_ts is not None and flag_ts <= cutoff)
                # A repeat: viewed before ts, and not flagged before it (entries older than
                # these times count as viewed and flagged long ago).
                first = h.first_watch_ts
                viewed = h.watched and (first is None or first < t)
                repeats.append(h.first_watch_pct if viewed and not (h.flagged and (flag_ts is None or flag_ts < t))
                               else None)
            band = band_of(*self.counts_at(t))
            # p, the usable safe-pool size when the slate was served, under the tag rules then.
            # (the spans follow the current rules: a slate served under others walks the history)
            if spans is not None and (blocked_then is blocked or blocked_then == blocked):
                pool = spans.size_at(t, history, limits.safe_pool_max, set(p.item_ids))
            else:
                pool = pool_size_at(history.values(), t, limits.beta, blocked_then, limits.safe_pool_max,
                                    set(p.item_ids))
            scores = p.scores
            if dropped and any(dropped):
                scores = tuple(DROPPED if d else sc for sc, d in zip(scores, dropped))
            late = 0
            if p.policy_applied and blocked_then and p.violations is not None and served_tags is not None:
                # Rules stamped by ts but read after the impression: violations its count missed.
                # (Never less than counted: a counter cannot take back a rule since overridden.)
                late = max(0, _blocked_count(blocked_then, served_tags) - p.violations)
            m = MatureSlate(self.user_id, p.slate_id, t, p.k, pool, band, p.policy_applied, p.alpha,
                            scores, tuple(flags), p.replacement, tuple(repeats), late)
            matured.append(m)
            if not p.policy_applied and p.ts >= horizon:
                if self.touched is not None:
                    self.touched.add(RECENT + str(self.recent_seq + len(self.recent)))
                self.recent.append(m)
        if matured and (self.shown_log or self.rule_log):  # (the core is touched: a slate matured)
            self._prune_logs(self._needed_from(watermark))
        evicted: list[MatureSlate] = []
        recent = self.recent
        if recent and recent[0].ts < horizon:  # their buckets are gone already
            # recent is in ts order (slates mature in ts order, and one served later than a
            # matured one was pending at its maturity), so those before the horizon lead it.
            cut = 1
            while cut < len(recent) and recent[cut].ts < horizon:
                cut += 1
            self._drop_recent(cut)
        if len(self.recent) > limits.user_window_max:
            cut = len(self.recent) - limits.user_window_max
            evicted = self.recent[:cut]
            self._drop_recent(cut)
        return matured, evicted

    def _drop_recent(self, n: int) -> None:
        """Drop the first ``n`` slates of :attr:`recent`."""
        if self.touched is not None:
            self.touched.add(CORE)  # (recent_seq)
            self.touched.update(RECENT + str(self.recent_seq + i) for i in range(n))
        self.recent = self.recent[n:]
        self.recent_seq += n

    def live_recent(self, horizon: float) -> list[MatureSlate]:
        """The user's holdout slates still inside the window."""
        return [m for m in self.recent if m.ts >= horizon]

    # -- housekeeping ------------------------------------------------------
    def _insert_pending(self, p: PendingSlate) -> None:
        # Keep pending ordered by ts; out-of-order arrivals are rare, so scan from the end.
        i = len(self.pending)
        while i > 0 and self.pending[i - 1].ts > p.ts:
            i -= 1
        self.pending.insert(i, p)
        self.pending_seq += 1
        if self.touched is not None:
            self.touched.add(PENDING + str(p.seq))
        if self._pending_items is not None:
            self._pending_items += len(p.item_ids)

    def _trim(self, limits: Limits) -> None:
        # Trim in steps of ~10% of what is held: sorting the history on every event past
        # the cap cost more than all other per-event work together. Items of pending slates
        # are never evicted (their labels need them), so they do not count against the
        # cap: otherwise a user with more pending items than the cap re-sorted the whole
        # history on every event and evicted nothing. The step grows with them too: a user
        # with thousands of pending items (an impression every few seconds over a label
        # window) re-sorted its whole history every few maturities, 0.2-3 ms an event.
        pending_items = self._pending_items
        if pending_items is None:
            pending_items = self._pending_items = sum(len(p.item_ids) for p in self.pending)
        held = limits.history_max + pending_items
        if len(self.history) > held + max(1, held // 10):
            keep_pending = {i for p in self.pending for i in p.item_ids}
            # the cap applies to the rest: the history_max most recent entries not pending stay
            rest = {k: e for k, e in self.history.items() if k not in keep_pending} if keep_pending else self.history
            for item in trim_history(rest, limits.history_max):
                old = self.history.pop(item)
                if old.flagged:
                    self._flag_times_cache = None
                self._entry_changed(old, None)
                if self.touched is not None:
                    self.touched.add(item)
                    # A watch of an evicted item, replayed, would bring it back: the core
                    # (with the positions of every watch applied so far) goes with the eviction.
                    self.touched.add(CORE)

    def bump_version(self) -> int:
        """Next version of this user's own published thresholds."""
        self.version += 1
        if self.touched is not None:
            self.touched.add(CORE)
        return self.version

    def applied(self, source: str, position: int) -> bool:
        """Whether the record at ``position`` of ``source`` was applied already (a replay)."""
        return position <= self.positions.get(source, -1)

    def note_position(self, source: str, position: int, durable: bool = True) -> None:
        """Note the last record applied from ``source``.

        ``durable=False`` for a record that is harmless to apply twice while its
        entry exists (a watch: the earliest view sets W%, ``last_seen`` is a max):
        the position is not worth a write of its own and goes with the user's next
        core write. Every eviction writes the core, so a stored position lags only
        behind watches whose entries are all still stored; replayed after a crash,
        those change nothing. Any other record writes the core with its position.
        """
        self.positions[source] = position
        if durable and self.touched is not None:
            self.touched.add(CORE)

    def is_empty(self) -> bool:
        return not (self.history or self.tag_rules or self.pending or self.recent or self.shown or self.seen)

    # -- storage -----------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-able form for a table value (round-trips through :meth:`from_dict`)."""
        return {
            "user_id": self.user_id,
            "history": [
                [e.item_id, e.first_rank_score, list(e.tags), e.first_watch_pct, e.watched, e.shown, e.flagged,
                 e.last_seen, e.flag_ts, e.first_shown, e.first_watch_ts]
                for e in self.history.values()
            ],
            "tag_rules": {t: [b, ts] for t, (b, ts) in self.tag_rules.items()},
            "shown": self.shown,
            "flagged": self.flagged,
            "pending": [_slate_to_list(p) for p in self.pending],
            "recent": [_mature_to_list(m) for m in self.recent],
            "recent_seq": self.recent_seq,
            "seen": list(self.seen.items()),
            "seen_seq": self.seen_seq,
            "pending_seq": self.pending_seq,
            "version": self.version,
            "shown_log": [list(x) for x in self.shown_log],
            "rule_log": [list(x) for x in self.rule_log],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "UserState":
        history = {}
        for item_id, rank, tags, pct, watched, shown, flagged, last_seen, flag_ts, *times in d["history"]:
            history[item_id] = HistoryEntry(item_id, rank, tuple(tags), pct, watched, shown, flagged, last_seen, flag_ts,
                                            *times)
        return cls(
            user_id=d["user_id"],
            history=history,
            tag_rules={t: (bool(b), float(ts)) for t, (b, ts) in d["tag_rules"].items()},
            shown=int(d["shown"]),
            flagged=int(d["flagged"]),
            pending=[_slate_from_list(x, i) for i, x in enumerate(d["pending"])],
            pending_seq=int(d.get("pending_seq", len(d["pending"]))),
            seen_seq=int(d.get("seen_seq", 0)),
            recent=[_mature_from_list(x, d["user_id"]) for x in d["recent"]],
            recent_seq=int(d.get("recent_seq", 0)),
            seen={k: v for k, v in d["seen"]},
            version=int(d.get("version", 0)),
            shown_log=[(float(ts), int(n)) for ts, n in d.get("shown_log", ())],
            rule_log=[(str(t), bool(b), float(ts)) for t, b, ts in d.get("rule_log", ())],
        )


def _blocked_count(blocked: frozenset[str], tags: Iterable[Iterable[str]]) -> int:
    """How many of the items (given by their tags) carry a blocked tag."""
    return sum(1 for t in tags if not blocked.isdisjoint(t)) if blocked else 0


def _slate_to_list(p: PendingSlate) -> list:
    return [p.slate_id, p.ts, p.k, p.pool, p.policy_applied, p.alpha, list(p.item_ids), list(p.scores),
            list(p.replacement), list(p.repeat_pct), p.seq, None if p.tags is None else [list(t) for t in p.tags],
            p.violations]


def _slate_from_list(x: list, index: int) -> PendingSlate:
    seq = x[10] if len(x) > 10 else index  # (lists written before pending slates were numbered)
    tags = tuple(tuple(t) for t in x[11]) if len(x) > 11 and x[11] is not None else None
    return PendingSlate(x[0], x[1], x[2], x[3], x[4], x[5], tuple(x[6]), tuple(x[7]), tuple(x[8]), tuple(x[9]), seq,
                        tags, x[12] if len(x) > 12 else None)


def _mature_to_list(m: MatureSlate) -> list:
    # (a dropped item's -inf as None: JSON has no infinity, and orjson wrote it as null)
    return [m.slate_id, m.ts, m.k, m.pool, m.band, m.policy_applied, m.alpha,
            [None if x == DROPPED else x for x in m.scores], list(m.flags), list(m.replacement), list(m.repeat_pct)]


def _mature_from_list(x: list, user_id: str) -> MatureSlate:
    scores = tuple(DROPPED if v is None else v for v in x[7])
    return MatureSlate(user_id, x[0], x[1], x[2], x[3], x[4], x[5], x[6], scores, tuple(x[8]), tuple(x[9]),
                       tuple(x[10]))
