"""The calibration engine: mature slates in, thresholds and monitor figures out.

* :class:`Calibrator` keeps one bucketed window per (strategy, group) for the
  shared groups (``global``, ``band:low``, ``band:high``) and computes λ̂ for
  every α. Its windows are plain sums, so partitions can each keep one and an
  aggregator can add their buckets (:meth:`Calibrator.partials`,
  :meth:`Calibrator.merge_partials`).
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

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .events import Constraints, Event, Flag, Forget, Impression, Watch
from .grid import Grid, make_grid
from .groups import GLOBAL, band_group, user_group
from .risk import fold
from .slates import Slate, SlateBatch
from .threshold import Threshold, thresholds
from .user_state import Limits, MatureSlate, UserState
from .window import BucketedWindow, CurveAccumulator

__all__ = ["EngineConfig", "GroupResult", "Calibrator", "Monitors", "Engine", "SHARED_GROUPS", "PROPERTY1_BETAS"]

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
    return SlateBatch.from_slates([Slate(m.scores, m.flags, m.k, m.pool) for m in slates])


class Calibrator:
    """Bucketed windows for the shared groups, per strategy."""

    def __init__(self, config: EngineConfig):
        self.config = config
        size = len(config.grid)
        self.windows: dict[tuple[str, str], BucketedWindow] = {
            (s, g): BucketedWindow(size, config.window, config.buckets)
            for s in config.strategies
            for g in SHARED_GROUPS
        }
        self.refused = 0  # mature slates whose bucket had already left the window

    def add(self, slates: Iterable[MatureSlate]) -> int:
        """Fold mature holdout slates into their buckets; returns how many were added (per strategy)."""
        cfg = self.config
        by_key: dict[tuple[str, int], list[MatureSlate]] = defaultdict(list)
        any_window = next(iter(self.windows.values()))
        added = 0
        for m in slates:
            if m.policy_applied:
                continue
            if not any_window.accepts(m.ts):
                self.refused += 1
                continue
            b = any_window.bucket_of(m.ts)
            by_key[(GLOBAL, b)].append(m)
            by_key[(band_group(m.band), b)].append(m)
            added += 1
        for (group, b), ms in by_key.items():
            batch = _batch(ms)
            ts = b * any_window.width
            for strategy in cfg.strategies:
                self.windows[(strategy, group)].add_increments(ts, fold(batch, cfg.grid, strategy, cfg.loss), len(ms))
        return added

    def advance(self, watermark: float) -> None:
        for w in self.windows.values():
            w.advance(watermark)

    def result(self, strategy: str, group: str) -> GroupResult:
        cfg = self.config
        w = self.windows[(strategy, group)]
        acc = w.total()
        ts = thresholds(acc.sums(), acc.n, cfg.grid, cfg.alphas, cfg.guarantee, cfg.delta)
        return GroupResult(strategy, group, acc.n, w.span(), tuple(ts))

    def results(self) -> list[GroupResult]:
        return [self.result(s, g) for (s, g) in self.windows]

    def partials(self) -> dict[tuple[str, str, int], CurveAccumulator]:
        """Every live bucket, keyed (strategy, group, bucket): what a partition publishes."""
        return {(s, g, b): acc for (s, g), w in self.windows.items() for b, acc in w.items()}

    def merge_partials(self, parts: Iterable[tuple[tuple[str, str, int], CurveAccumulator]]) -> None:
        """Set buckets from partitions' partial sums (adds into existing buckets)."""
        for (s, g, b), acc in parts:
            w = self.windows[(s, g)]
            current = dict(w.items()).get(b)
            w.set_bucket(b, acc.copy() if current is None else current.copy().merge(acc))


def user_result(state: UserState, config: EngineConfig, strategy: str) -> GroupResult | None:
    """λ̂ for ``user:<id>`` from the user's own recent holdout slates, if there are ``min_slates``."""
    if len(state.recent) < config.min_slates:
        return None
    acc = CurveAccumulator(len(config.grid)).add(_batch(state.recent), config.grid, strategy, config.loss)
    ts = thresholds(acc.sums(), acc.n, config.grid, config.alphas, config.guarantee, config.delta)
    span = (state.recent[0].ts, state.recent[-1].ts)
    return GroupResult(strategy, user_group(state.user_id), acc.n, span, tuple(ts))


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
        key = "unknown" if m.alpha is None else m.alpha
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


class Engine:
    """One partition's processing in memory: the replay's engine and the stream's reference."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.users: dict[str, UserState] = {}
        self.calibrator = Calibrator(config)
        self.monitors = Monitors()
        self.max_ts: float | None = None
        self.counts: dict[tuple[str, str], int] = defaultdict(int)  # (event type, outcome) -> count
        self._due: list[tuple[float, str]] = []  # heap of (maturity time, user_id); stale entries are skipped
        self.matured: list[MatureSlate] = []  # holdout slates folded, kept when `keep_matured`
        self.keep_matured = False

    @property
    def watermark(self) -> float:
        return float("-inf") if self.max_ts is None else self.max_ts - self.config.allowed_lateness

    def process(self, ev: Event) -> str:
        """Apply one validated event; returns its outcome. Maturity is advanced after it."""
        kind = type(ev).__name__.lower()
        if isinstance(ev, Forget):
            self.users.pop(ev.user_id, None)
            outcome = "ok"
        else:
            wm = self.watermark
            state = self.users.get(ev.user_id)
            if state is None:
                state = self.users[ev.user_id] = UserState(ev.user_id)
            lim = self.config.limits
            if isinstance(ev, Impression):
                violations = state.violations(ev)
                outcome = state.on_impression(ev, wm, lim)
                if outcome != "duplicate":
                    self.monitors.on_served(ev, violations)
                due = state.next_maturity(self.config.label_window)
                if due is not None:
                    heapq.heappush(self._due, (due, ev.user_id))
            elif isinstance(ev, Watch):
                outcome = state.on_watch(ev, wm, lim)
            elif isinstance(ev, Flag):
                outcome = state.on_flag(ev, wm, lim)
            elif isinstance(ev, Constraints):
                outcome = state.on_constraints(ev, wm, lim)
            else:  # pragma: no cover - Event is a closed union
                raise TypeError(f"unknown event {ev!r}")
            if outcome != "duplicate" and (self.max_ts is None or ev.ts > self.max_ts):
                self.max_ts = ev.ts
        self.counts[(kind, outcome)] += 1
        self.advance()
        return outcome

    def advance(self) -> list[MatureSlate]:
        """Mature every due slate at the current watermark and fold the holdout ones."""
        wm = self.watermark
        cfg = self.config
        matured: list[MatureSlate] = []
        while self._due and self._due[0][0] <= wm:
            _, uid = heapq.heappop(self._due)
            state = self.users.get(uid)
            if state is None:
                continue  # forgotten
            ms = state.mature(wm, cfg.label_window, cfg.window, cfg.limits)
            matured.extend(ms)
            due = state.next_maturity(cfg.label_window)
            if due is not None and due > wm:
                heapq.heappush(self._due, (due, uid))
        if matured:
            for m in matured:
                self.monitors.on_mature(m)
            self.calibrator.add(matured)
            if self.keep_matured:
                self.matured.extend(m for m in matured if not m.policy_applied)
        if self.max_ts is not None:
            self.calibrator.advance(wm)
        return matured

    def results(self) -> list[GroupResult]:
        return self.calibrator.results()

    def user_results(self, user_id: str) -> list[GroupResult]:
        state = self.users.get(user_id)
        if state is None:
            return []
        return [r for s in self.config.strategies if (r := user_result(state, self.config, s)) is not None]
