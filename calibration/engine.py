"""The calibration engine: mature slates in, thresholds and monitor figures out.

* :class:`Calibrator` keeps one bucketed window per (strategy, group) for the
  shared groups (``global``, ``band:low``, ``band:high``) and computes λ̂ for
  every α. Its windows are plain sums, so partitions can each keep one and an
  aggregator can add them up (:meth:`Calibrator.snapshot`, :func:`combine`).
* Invariant: a partition's windows are exactly the fold of its users'
  ``recent`` slates in live buckets. The users are the only state that must be
  durable; windows are derived, rebuilt from the users after a restart
  (:meth:`Engine.rebuild`), and a forgotten user's slates are taken back out.
* ``user:<id>`` groups are computed from the user's own recent mature slates
  (:attr:`UserState.recent`), where the user's state lives: per-user memory then
  grows with that user's traffic, never with |Λ|, and only users with at least
  ``min_slates`` slates get a threshold of their own.
* :class:`Monitors` accumulates the live checks of SPEC "Monitoring" from
  policy-applied slates, which never enter a calibration window.
* :class:`Engine` drives users, the watermark and maturity for one partition's
  worth of events; the offline replay uses it as is, and the stream does the
  same steps with Faust tables.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence


from .events import Event, Impression
from .grid import Grid, make_grid
from .groups import GLOBAL, band_group, user_group
from .risk import fold
from .slates import Slate, SlateBatch
from .threshold import Threshold, thresholds
from .user_state import Limits, MatureSlate, UserState
from .window import BucketedWindow, CurveAccumulator

__all__ = ["EngineConfig", "GroupResult", "Calibrator", "Monitors", "Engine", "combine", "user_result", "SHARED_GROUPS", "PROPERTY1_BETAS"]

SHARED_GROUPS = (GLOBAL, band_group("low"), band_group("high"))
#: β values at which the live Property-1 curve P(h=1 | repeat, unflagged first view, W% > β) is kept.
PROPERTY1_BETAS = (0.0, 25.0, 50.0, 75.0, 100.0)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to turn events into thresholds (SPEC defaults)."""

    alphas: tuple[float, ...] = (0.05, 0.1, 0.2)
    strategies: tuple[str, ...] = ("remove", "replace")
    guarantee: str = "expectation"
    delta: float | None = None
    loss: str = "fraction"
    grid: Grid = field(default_factory=make_grid)
    label_window: float = 3600.0
    allowed_lateness: float = 60.0
    window: float = 86_400.0
    buckets: int = 24
    min_slates: int = 100
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class GroupResult:
    """λ̂ for every α of one (strategy, group), with the window it came from."""

    strategy: str
    group: str
    n: int
    window: tuple[float, float] | None
    thresholds: tuple[Threshold, ...]


def _batch(slates: Sequence[MatureSlate]) -> SlateBatch:
    return SlateBatch.from_slates([calibration_slate(m) for m in slates])


def calibration_slate(m: MatureSlate) -> Slate:
    """What a mature slate calibrates: its scores, flags, k and p; an item its user's tag
    rules dropped (score :data:`~calibration.slates.DROPPED`, see :meth:`UserState.mature`)
    is never kept, so its flag never counts."""
    return Slate.served(m.scores, m.flags, m.k, m.pool)


class Calibrator:
    """Bucketed windows for the shared groups, per strategy."""

    def __init__(self, config: EngineConfig):
        self.config = config
        size = len(config.grid)
        self._windows: dict[tuple[str, str], BucketedWindow] = {
            (s, g): BucketedWindow(size, config.window, config.buckets)
            for s in config.strategies
            for g in SHARED_GROUPS
        }
        self._clock = next(iter(self._windows.values()))  # all windows advance together
        self._refused = 0  # mature holdout slates whose bucket had already left the window
        # Slates queued to be folded in (+1) or out (-1) together: folding one slate costs
        # numpy's per-call overhead several times over. Folding only depends on the windows
        # through which buckets are live, so the queue is folded before any bucket moves,
        # and before anyone reads the sums: the result is exactly that of folding at once.
        self._queued: dict[int, list[MatureSlate]] = {1: [], -1: []}

    @property
    def windows(self) -> dict[tuple[str, str], BucketedWindow]:
        """The bucketed window of each (strategy, shared group), with every queued slate folded."""
        self.settle()
        return self._windows

    @property
    def refused(self) -> int:
        self.settle()
        return self._refused

    @refused.setter
    def refused(self, value: int) -> None:
        self._refused = value

    def span(self) -> tuple[float, float] | None:
        """Event-time span of the windows, once they have a watermark."""
        return self._clock.span()

    def horizon(self) -> float:
        """Start of the oldest live bucket (-inf before the first watermark)."""
        span = self.span()
        return float("-inf") if span is None else span[0]

    def accepts(self, ts: float) -> bool:
        return self._clock.accepts(ts)

    def leaves_at(self, ts: float) -> float:
        """The watermark at which a slate served at ``ts`` has left the window: its bucket's start + ``window``."""
        clock = self._clock
        return clock.bucket_start(clock.bucket_of(ts) + clock.buckets)

    def _fold(self, slates: Iterable[MatureSlate], sign: int) -> int:
        cfg = self.config
        by_key: dict[tuple[str, int], list[MatureSlate]] = defaultdict(list)
        count = 0
        for m in slates:
            if m.policy_applied:
                continue
            if not self.accepts(m.ts):
                if sign > 0:
                    self._refused += 1
                continue
            b = self._clock.bucket_of(m.ts)
            by_key[(GLOBAL, b)].append(m)
            by_key[(band_group(m.band), b)].append(m)
            count += 1
        for (group, b), ms in by_key.items():
            batch = _batch(ms)
            for strategy in cfg.strategies:
                inc = fold(batch, cfg.grid, strategy, cfg.loss)
                self._windows[(strategy, group)].add_to_bucket(b, sign * inc, sign * len(ms))
        return count

    def add(self, slates: Iterable[MatureSlate]) -> int:
        """Fold mature holdout slates into their buckets; returns how many were added."""
        self.settle()
        return self._fold(slates, +1)

    def subtract(self, slates: Iterable[MatureSlate]) -> int:
        """Take previously added slates back out (user forgotten, or evicted from its window)."""
        self.settle()
        return self._fold(slates, -1)

    def queue(self, added: Sequence[MatureSlate], removed: Sequence[MatureSlate] = ()) -> None:
        """:meth:`add` ``added`` and :meth:`subtract` ``removed``, folded in bulk later (see ``_queued``)."""
        self._queued[1].extend(added)
        self._queued[-1].extend(removed)
        if len(self._queued[1]) + len(self._queued[-1]) >= 4096:
            self.settle()

    def settle(self) -> None:
        """Fold whatever is queued."""
        q = self._queued
        if q[1] or q[-1]:
            added, removed = q[1], q[-1]
            self._queued = {1: [], -1: []}
            self._fold(added, +1)
            self._fold(removed, -1)

    def advance(self, watermark: float) -> None:
        clock = self._clock
        if clock.newest is not None and clock.bucket_of(watermark) <= clock.newest:
            return  # still inside the newest bucket (most calls: the watermark moves with every event)
        self.settle()
        for w in self._windows.values():
            w.advance(watermark)

    def next_edge(self) -> float:
        """The earliest watermark that starts a new bucket (advancing to less changes nothing)."""
        clock = self._clock
        return float("-inf") if clock.newest is None else clock.bucket_start(clock.newest + 1)

    def result(self, strategy: str, group: str) -> GroupResult:
        self.settle()
        w = self._windows[(strategy, group)]
        return _result(self.config, strategy, group, w.total(), w.span())

    def results(self) -> list[GroupResult]:
        return [self.result(s, g) for (s, g) in self._windows]

    def snapshot(self) -> dict[tuple[str, str], CurveAccumulator]:
        """This partition's window totals per (strategy, group): what it sends the aggregator."""
        self.settle()
        return {key: w.total() for key, w in self._windows.items()}


def _result(config: EngineConfig, strategy: str, group: str, acc: CurveAccumulator, span) -> GroupResult:
    ts = thresholds(acc.sums(), acc.n, config.grid, config.alphas, config.guarantee, config.delta)
    return GroupResult(strategy, group, acc.n, span, tuple(ts))


def combine(config: EngineConfig, snapshots: Iterable[dict[tuple[str, str], CurveAccumulator]],
            span: tuple[float, float] | None = None) -> list[GroupResult]:
    """λ̂ for every (strategy, shared group) from partitions' snapshots: the aggregator's sum."""
    size = len(config.grid)
    totals = {(s, g): CurveAccumulator(size) for s in config.strategies for g in SHARED_GROUPS}
    for snap in snapshots:
        for key, acc in snap.items():
            if key in totals:
                totals[key].merge(acc)
    return [_result(config, s, g, acc, span) for (s, g), acc in totals.items()]


def user_result(state: UserState, config: EngineConfig, strategy: str, horizon: float = float("-inf")) -> GroupResult | None:
    """λ̂ for ``user:<id>`` from the user's own live holdout slates, if there are ``min_slates``."""
    if len(state.recent) < config.min_slates:  # (live ones are fewer still: skip building the list)
        return None
    recent = state.live_recent(horizon)
    if len(recent) < config.min_slates:
        return None
    acc = CurveAccumulator(len(config.grid)).add(_batch(recent), config.grid, strategy, config.loss)
    return _result(config, strategy, user_group(state.user_id), acc, (recent[0].ts, recent[-1].ts))


@dataclass
class Monitors:
    """Live checks that keep the guarantee honest (SPEC "Monitoring")."""

    realised_flagged: dict = field(default_factory=lambda: defaultdict(int))  # alpha -> flagged served items
    realised_served: dict = field(default_factory=lambda: defaultdict(int))
    realised_slates: dict = field(default_factory=lambda: defaultdict(int))
    realised_risk_sum: dict = field(default_factory=lambda: defaultdict(float))  # Σ per-slate flagged fraction
    replacements_shown: int = 0
    replacements_flagged: int = 0
    repeat_seen: dict = field(default_factory=lambda: defaultdict(int))  # beta -> repeats with W% > beta
    repeat_flagged: dict = field(default_factory=lambda: defaultdict(int))
    served_items: int = 0
    violations: int = 0
    alphas: tuple[float, ...] = ()  # the configured α: what a slate's α is reported as (see alpha_key)
    unmatched_alphas: set = field(default_factory=set)  # other α counted under their own key (see alpha_key)

    def alpha_key(self, alpha: float | None) -> float | str:
        """The α a policy-applied slate's realised risk is counted under (compared with that target).

        An α within 1e-12 of a configured one is that one (a ranker echoing a requested
        α that went through JSON and arithmetic); none, with a single α configured, is
        that α, the only one a ranker following riskgate can have applied. Any other α
        is itself, for the first :attr:`UNMATCHED_MAX` such values, then ``"unknown"``,
        as is no α with several configured: no target to compare with
        (RiskgateRealisedRiskUnchecked), and a ranker writing ever new values must not
        make ever new series.
        """
        if alpha is None:
            return self.alphas[0] if len(self.alphas) == 1 else "unknown"
        for a in self.alphas:
            if abs(a - alpha) < 1e-12:
                return a
        unmatched = self.unmatched_alphas
        if alpha in unmatched or len(unmatched) < self.UNMATCHED_MAX:
            unmatched.add(alpha)
            return alpha
        return "unknown"

    #: Distinct unmatched α values counted under their own key (per engine) before the rest count as "unknown".
    UNMATCHED_MAX = 8

    def on_served(self, ev: Impression, violations: int) -> None:
        if ev.policy_applied:
            self.served_items += len(ev.items)
            self.violations += violations

    def on_mature(self, m: MatureSlate) -> None:
        # Property 1 on every mature slate: repeats of items unflagged at first view.
        for pct, h in zip(m.repeat_pct, m.flags):
            if pct is None:
                continue
            for beta in PROPERTY1_BETAS:
                if pct > beta:
                    self.repeat_seen[beta] += 1
                    self.repeat_flagged[beta] += int(h)
        if not m.policy_applied:
            return
        self.violations += m.late_violations
        key = self.alpha_key(m.alpha)
        f = sum(m.flags)
        self.realised_flagged[key] += f
        self.realised_served[key] += len(m.flags)
        self.realised_slates[key] += 1
        self.realised_risk_sum[key] += f / len(m.flags) if m.flags else 0.0
        for rep, h in zip(m.replacement, m.flags):
            if rep:
                self.replacements_shown += 1
                self.replacements_flagged += int(h)

    def realised_risk(self) -> dict:
        """Mean per-slate flagged fraction on mature policy-applied slates, per α applied."""
        return {a: self.realised_risk_sum[a] / n for a, n in self.realised_slates.items() if n}

    def reflag_rate(self) -> float | None:
        return self.replacements_flagged / self.replacements_shown if self.replacements_shown else None

    def property1(self) -> dict[float, float | None]:
        return {b: (self.repeat_flagged[b] / self.repeat_seen[b] if self.repeat_seen[b] else None) for b in PROPERTY1_BETAS}

    def violation_rate(self) -> float | None:
        return self.violations / self.served_items if self.served_items else None


class Erasures(dict):
    """Forget markers in memory: a hash of the user id -> the forget's ts.

    ``positions``: the same hash -> the forgotten user's log positions then
    (``streams.state.TableErased`` keeps both in the users table).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions: dict[str, dict[str, int]] = {}


def erasure_key(user_id: str) -> str:
    """What is kept of a forgotten user: a hash of the id, never the id itself."""
    return hashlib.sha256(user_id.encode()).hexdigest()


class Watermark:
    """Event-time watermark of one partition: largest ``ts`` seen minus the allowed lateness.

    With several sources (the input topics, consumed concurrently), a source
    that still has unread records holds the watermark back to the largest ``ts``
    read from it, so a topic consumed ahead of another (say ``watch`` ahead of
    ``flags`` while catching up) cannot mature slates before their flags are
    read. A source with nothing left to read does not hold it back. The value
    never decreases. With one source this is exactly SPEC's rule.
    """

    def __init__(self, lateness: float, value: float = float("-inf"), max_ts: dict | None = None):
        self.lateness = float(lateness)
        self.value = float(value)
        self.max_ts: dict[str, float] = dict(max_ts or {})
        self.lagging: set[str] = set()
        # The lagging source whose max_ts is the least (what holds the watermark back);
        # None: unknown. Raising any other source's max_ts cannot move the watermark.
        self._holder: str | None = None

    def note(self, source: str, ts: float) -> None:
        """Note an event's ``ts`` and, if it raised its source's maximum, move the watermark (:meth:`update`)."""
        max_ts = self.max_ts
        m = max_ts.get(source)
        if m is not None and ts <= m:
            return
        max_ts[source] = ts
        if self.lagging:
            holder = self._holder
            if holder is None or holder == source:
                self.update()
            return
        base = max(max_ts.values()) - self.lateness  # update() with nothing lagging
        if base > self.value:
            self.value = base

    def set_lagging(self, source: str, lagging: bool) -> None:
        if lagging:
            if source not in self.lagging:
                self.lagging.add(source)
                self._holder = None
        elif source in self.lagging:
            self.lagging.discard(source)
            self._holder = None

    @property
    def known(self) -> float | None:
        """The watermark, or None before any event."""
        return None if self.value == float("-inf") else self.value

    def update(self) -> float:
        if self.lagging:
            base = float("inf")
            max_ts = self.max_ts
            holder = None
            for s in self.lagging:
                m = max_ts.get(s)
                if m is None:
                    self._holder = None
                    return self.value  # a source with unread records we know nothing of yet
                if m < base:
                    base, holder = m, s
            self._holder = holder
        elif self.max_ts:
            base = max(self.max_ts.values())
        else:
            return self.value
        self.value = max(self.value, base - self.lateness)
        return self.value


class Engine:
    """One partition's processing: the replay's engine and, per partition, the stream's.

    ``users`` is any mutable mapping of user id to :class:`UserState`: a dict for
    the replay, a write-back view of a Faust table in the stream. A store whose
    ``get`` raises ``LookupError`` for a user it cannot read gets the error back
    from :meth:`process` for that user's event (nothing changed), and that
    user's slates stay pending when another event's watermark would mature them.
    """

    def __init__(self, config: EngineConfig, users=None, clock: Watermark | None = None, erased=None):
        self.config = config
        self.users = {} if users is None else users
        self.calibrator = Calibrator(config)
        self.monitors = Monitors(alphas=tuple(config.alphas))
        self.clock = clock or Watermark(config.allowed_lateness)
        self.counts: dict[tuple[str, str], int] = defaultdict(int)  # (event type, outcome) -> count
        self._due: list[tuple[float, str]] = []  # heap of (maturity time, user_id); stale entries are skipped
        self.matured: list[MatureSlate] = []  # holdout slates folded, kept when `keep_matured`
        self.keep_matured = False
        self.matured_counts = {"holdout": 0, "applied": 0}
        # Forgotten users, by a hash of the id: event time of the forget. Events of
        # theirs up to then that arrive later (another topic read behind) belong
        # to the erased past and are dropped, so a forget is not undone by them.
        self.erased = Erasures() if erased is None else erased
        # ...and the forgotten user's log positions then (a store of markers may keep them as
        # ``positions``): a record re-read after a crash that was applied before the forget must
        # be known as a replay by the user made afresh for it, or the forget is undone.
        positions = getattr(self.erased, "positions", None)
        self.erased_positions: dict[str, dict[str, int]] = {} if positions is None else positions
        self.changed: set[str] = set()  # users touched since the caller last cleared this
        # Users not held whose forget was read again (a replay after a crash): their outputs'
        # tombstones may not have gone out; the caller sends them again and clears this.
        self.erased_again: set[str] = set()
        self._next_edge = float("-inf")  # the windows move when the watermark reaches it
        self._set_aside_count = 0  # users whose state raised while applied (see _set_aside)
        self.pending_slates = 0  # slates held for maturity by this engine's users

    @property
    def watermark(self) -> float:
        return self.clock.value

    @property
    def max_ts(self) -> float | None:
        """Largest event ``ts`` seen (over every source), None before any."""
        return max(self.clock.max_ts.values()) if self.clock.max_ts else None

    def rebuild(self) -> None:
        """Re-derive windows and the maturity queue from ``users`` (after a restart or rebalance)."""
        self.calibrator = Calibrator(self.config)
        if self.watermark > float("-inf"):
            self.calibrator.advance(self.watermark)
        self._next_edge = self.calibrator.next_edge()
        self._due = []
        live = []
        # A store may offer the users without their history (all this needs).
        users = self.users.cores() if hasattr(self.users, "cores") else self.users.items()
        pending = 0
        for uid, state in users:
            live.extend(state.live_recent(self.calibrator.horizon()))
            pending += len(state.pending)
            due = self._next_due(state)
            if due is not None:
                self._due.append((due, uid))
        heapq.heapify(self._due)
        self.calibrator.add(live)
        self.calibrator.refused = 0
        self.pending_slates = pending

    def _next_due(self, state: UserState) -> float | None:
        """When ``state`` next needs :meth:`UserState.mature`: its oldest pending slate matures, or, for a
        user with enough recent slates for a λ̂ of its own, its oldest recent slate leaves the window.

        The second keeps an idle user's own λ̂ (``user:<id>``) to the window like every group's:
        without it, a user who stopped coming kept the λ̂ of slates long gone, and its
        ``strategy:user:<id>`` keys were deleted only if it came back. Only for those users
        (``min_slates`` holdout slates in the window: heavy ones), so that the queue does not
        hold an entry for every user seen within the window.
        """
        due = state.next_maturity(self.config.label_window)
        if len(state.recent) >= self.config.min_slates:
            leaves = self.calibrator.leaves_at(state.recent[0].ts)
            due = leaves if due is None or leaves < due else due
        return due

    def process(self, ev: Event, source: str = "events", position: int | None = None) -> str:
        """Apply one validated event read from ``source``; returns its outcome. Maturity is advanced after it.

        ``position``: the record's offset in ``source`` when it comes from a log that
        may be replayed (the stream); a record at or before the user's last applied
        position there is a replay (outcome ``replayed``) and changes nothing.
        """
        kind = ev.event_type
        uid = ev.user_id
        erased = self.erased
        if kind == "forget" and (erased_at := erased.get(erasure_key(uid))) is not None and ev.ts <= erased_at:
            # Everything of the user up to erased_at is gone already, and events up to it are
            # dropped: what is held now came after, and this forget (a replay after a crash,
            # or an older one arriving late) must not take it.
            outcome = "duplicate"
            # A crash may have come between the forget's changelog records and its outputs'
            # tombstones: send them again (a user held now, back since, has its values sent).
            try:
                held = self.users.get(uid) is not None
            except LookupError:  # set aside: its outputs wait for it
                held = True
            if held:
                self.changed.add(uid)
            else:
                self.erased_again.add(uid)
        elif kind == "forget":
            # Delete even when nothing is held here: a store may still need its
            # tombstones (a changelog written before a rebalance, an output topic).
            state = self.users.pop(uid, None)
            key = erasure_key(uid)
            if state is not None:
                self.calibrator.subtract(state.live_recent(self.calibrator.horizon()))
                self.pending_slates -= len(state.pending)
                if state.positions:
                    self.erased_positions[key] = dict(state.positions)
            erased[key] = ev.ts  # (later than any earlier forget's: see above)
            self.changed.discard(uid)
            outcome = "ok"
        # Hash only when someone was forgotten here: the common case costs nothing.
        elif erased and (erased_at := erased.get(erasure_key(uid))) is not None and ev.ts <= erased_at:
            outcome = "erased"
        else:
            wm = self.clock.value
            state = self.users.get(uid)
            if state is None:
                state = UserState(uid)
                if erased and (kept := self.erased_positions.get(erasure_key(uid))) is not None:
                    # a user who came back after a forget: records up to its positions were
                    # applied (and erased) before, and are replays if read again
                    state.positions = dict(kept)
            lim = self.config.limits
            try:
                if position is not None and state.applied(source, position):
                    outcome = "replayed"
                elif kind == "watch":
                    outcome = state.on_watch(ev, wm, lim)
                elif kind == "impression":
                    violations = state.violations(ev)
                    outcome = state.on_impression(ev, wm, lim, violations)
                    if outcome != "duplicate":
                        self.monitors.on_served(ev, violations)
                    if outcome == "ok":  # (held for maturity: not late, nor past pending_max)
                        self.pending_slates += 1
                    due = state.next_maturity(self.config.label_window)
                    if due is not None:
                        heapq.heappush(self._due, (due, uid))
                elif kind == "flag":
                    outcome = state.on_flag(ev, wm, lim)
                elif kind == "constraints":
                    outcome = state.on_constraints(ev, wm, lim)
                else:  # pragma: no cover - Event is a closed union
                    raise TypeError(f"unknown event {ev!r}")
            except Exception as e:
                # This user's state broke while applied: set it aside (a store that cannot raises
                # the error), and answer for the event as for a user that cannot be read.
                self._set_aside(uid, e)
                self.users.get(uid)  # raises the store's LookupError: the caller dead-letters the event
                raise
            if outcome == "replayed":
                # seen before the crash, and by the watermark then: observing it again is harmless.
                # Its effects are in the store, but a crash may have come before the outputs of the
                # flush that wrote them went out (they are sent after the changelog): send them again.
                self.clock.note(source, ev.ts)
                self.changed.add(uid)
            elif outcome == "duplicate":
                if position is not None:  # nothing else changed, but the log moved past it
                    state.note_position(source, position)
                    self.users[uid] = state
            else:
                if position is not None:
                    state.note_position(source, position, durable=kind != "watch")
                self.users[uid] = state
                self.changed.add(uid)
                self.clock.note(source, ev.ts)
        self.counts[(kind, outcome)] += 1
        self.advance()
        return outcome

    #: Users one engine sets aside before it lets the error go on: one broken user must not stop
    #: a partition, but many are a bug in the code, which should fail loudly, not dead-letter all.
    SET_ASIDE_MAX = 10

    def _set_aside(self, uid: str, error: Exception) -> None:
        """A user whose state raised while applied: set aside by a store that can (its events are then
        refused with ``LookupError``), else the error goes on (an in-memory run has nobody to hand its
        events to, and past :attr:`SET_ASIDE_MAX` users the code, not a user, is broken)."""
        set_aside = getattr(self.users, "set_aside", None)
        self._set_aside_count += 1
        if set_aside is None or self._set_aside_count > self.SET_ASIDE_MAX:
            raise error
        set_aside(uid, f"{type(error).__name__}: {error}"[:300])
        self.changed.discard(uid)

    def advance_clock(self) -> list[MatureSlate]:
        """Recompute the watermark (after a source stopped lagging) and mature what is now due."""
        self.clock.update()
        return self.advance()

    def advance(self) -> list[MatureSlate]:
        """Move the windows to the watermark, then mature and fold every due slate."""
        wm = self.watermark
        if wm == float("-inf"):
            return []
        if wm >= self._next_edge:  # a new bucket (the watermark moves with most events; buckets rarely)
            self.calibrator.advance(wm)
            self._next_edge = self.calibrator.next_edge()
        if not (self._due and self._due[0][0] < wm):
            return []  # nothing due: most events
        cfg = self.config
        horizon = self.calibrator.horizon()
        matured: list[MatureSlate] = []
        evicted: list[MatureSlate] = []
        while self._due and self._due[0][0] < wm:
            _, uid = heapq.heappop(self._due)
            try:
                state = self.users.get(uid)
            except LookupError:  # a store that cannot read this user (streams.state.UnreadableUser): left pending
                continue
            if state is None:
                continue  # forgotten
            seq = state.recent_seq
            try:
                ms, ev = state.mature(wm, cfg.label_window, horizon, cfg.limits)
            except Exception as e:
                self._set_aside(uid, e)
                continue
            if not ms and state.recent_seq == seq:
                continue  # a stale queue entry: nothing matured, no recent slate left the window
            matured.extend(ms)
            evicted.extend(ev)
            self.pending_slates -= len(ms)
            self.users[uid] = state
            self.changed.add(uid)
            due = self._next_due(state)
            if due is not None:
                heapq.heappush(self._due, (due, uid))
        if matured:
            for m in matured:
                self.monitors.on_mature(m)
                self.matured_counts["applied" if m.policy_applied else "holdout"] += 1
            self.calibrator.queue(matured, evicted)
            if self.keep_matured:
                self.matured.extend(m for m in matured if not m.policy_applied and m.ts >= horizon)
        return matured

    def push_watermark(self, ts: float) -> list[MatureSlate]:
        """Move the watermark to at least ``ts`` (end of a finite log) and mature what is due."""
        self.clock.value = max(self.clock.value, float(ts))
        return self.advance()

    @property
    def pending(self) -> int:
        """Slates held for maturity (the queue holds more entries: stale ones, and recent slates' expiry)."""
        return self.pending_slates

    def results(self) -> list[GroupResult]:
        return self.calibrator.results()

    def user_results(self, user_id: str) -> list[GroupResult]:
        state = self.users.get(user_id)
        if state is None:
            return []
        horizon = self.calibrator.horizon()
        return [r for s in self.config.strategies if (r := user_result(state, self.config, s, horizon)) is not None]
