"""The aggregator: partitions' window totals in, one λ̂ per (strategy, group) out.

Each worker sends the totals of its partitions' windows to the one-partition
``riskgate-partials`` topic; whichever worker owns that partition runs this
logic. It keeps the latest totals of every partition (and publishes nothing
until each partition has sent one), sums them
(:func:`calibration.engine.combine`) and decides what to publish: a key whose
result changed is published once per round of snapshots (at most every half
``recompute_interval``; workers send every partition's snapshot at wall-clock
multiples of it), once the round is complete: every partition has sent its
snapshot of the newest round, or half an interval has passed since the
partitions' rounds diverged (a worker that is gone delays one round, no more).
Every key is published at least once per ``heartbeat``. A version is the
publication's wall time in milliseconds, or one more than the key's last
version (kept in a durable mapping, a Faust table) when the clock is behind it:
versions grow strictly across restarts and owners, and an owner working from
a stale table still publishes above what the others published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import MutableMapping

from calibration.engine import EngineConfig, GroupResult, combine
from calibration.window import CurveAccumulator

__all__ = ["Aggregator", "Publication"]


@dataclass(frozen=True)
class Publication:
    key: str
    version: int
    result: GroupResult
    inputs_through: float | None = None


@dataclass
class Aggregator:
    config: EngineConfig
    recompute_interval: float
    heartbeat: float
    versions: MutableMapping[str, int] = field(default_factory=dict)
    snapshots: dict[int, tuple] = field(default_factory=dict)  # partition -> (watermark, span, totals)
    _last: dict[str, tuple[object, float]] = field(default_factory=dict)  # key -> (fingerprint, published at)
    through: dict[int, float | None] = field(default_factory=dict)  # partition -> newest input applied (s)
    # How many input partitions there are: nothing is published until each has
    # reported, or a restarted aggregator would publish λ̂ over part of the window.
    partitions: int | None = None
    rounds: dict[int, int | None] = field(default_factory=dict)  # partition -> round of its latest snapshot
    _waiting_since: float | None = None  # wall time due() first found the newest round incomplete
    #: Rounds (of RECOMPUTE_INTERVAL) the newest snapshot may lag the clock before the aggregator
    #: deems what it holds the past, not the present: see :meth:`due`.
    STALE_ROUNDS = 3

    def reset(self) -> None:
        """Forget every snapshot and what was published: this worker no longer owns ``riskgate-partials``.

        Kept, a worker that got the partition back started from what it held when
        it lost it, and published the first complete round it read, however old
        (n fell from 357 to 201 between two versions). Versions are durable and stay.
        """
        self.snapshots.clear()
        self.through.clear()
        self.rounds.clear()
        self._last.clear()
        self._waiting_since = None

    def unsent(self, key: str) -> None:
        """A publication :meth:`due` handed out was not sent: due again at the next round (its version stays used)."""
        self._last.pop(key, None)

    def update(self, partition: int, watermark, span, totals: dict[tuple[str, str], CurveAccumulator],
               through: float | None = None, round_: int | None = None) -> None:
        self.snapshots[partition] = (watermark, span, totals)
        self.through[partition] = through
        self.rounds[partition] = round_

    def round_complete(self) -> bool:
        """Whether every partition's latest snapshot is of the newest round (snapshots without one count as current).

        A round's snapshots may reach the aggregator in two fetches; publishing
        after the first would give λ̂ over some partitions' previous round, and
        the rest of the round could only be published a round later.
        """
        known = self._known_rounds()
        return not known or min(known) == max(known)

    def _known_rounds(self) -> list[int]:
        """The rounds of the partitions' latest snapshots, where they carry one."""
        return [r for r in self.rounds.values() if r is not None]

    def inputs_through(self) -> float | None:
        """Every partition had applied its inputs produced up to this time (None if one has none)."""
        values = list(self.through.values())
        return min(values) if values and None not in values else None

    def missing(self) -> list[int]:
        """Input partitions with no snapshot yet (publication waits for them)."""
        if self.partitions is None:
            return []
        return [p for p in range(self.partitions) if p not in self.snapshots]

    def span(self):
        spans = [s for _, s, _ in self.snapshots.values() if s]
        if not spans:
            return None
        return (min(s[0] for s in spans), max(s[1] for s in spans))

    def results(self) -> list[GroupResult]:
        return combine(self.config, (t for _, _, t in self.snapshots.values()), self.span())

    def due(self, now: float) -> list[Publication]:
        """What to publish at wall time ``now``; records it as published.

        Nothing before every partition's first snapshot: a window summed over
        some partitions is a different window (smaller ``n``, other λ̂).
        """
        if self.missing():
            return []
        known = self._known_rounds()
        if known and max(known) < now / self.recompute_interval - self.STALE_ROUNDS:
            # Every snapshot is rounds old: the partition's records are being read from the past
            # (an owner catching up after it got the partition back, or one stalled past its
            # session), and another owner may have published newer ones already. Wait for the
            # present rather than publish the past under a new version.
            return []
        if self.round_complete():
            self._waiting_since = None
        else:
            # The rest of the round is on its way. Wait at most half an interval from the
            # moment the rounds diverged: a partition that stopped reporting (its worker is
            # gone) delays one round, then publication goes on without waiting for it.
            if self._waiting_since is None:
                self._waiting_since = now
            if now - self._waiting_since < self.recompute_interval / 2:
                return []
        out = []
        through = self.inputs_through()
        for r in self.results():
            key = f"{r.strategy}:{r.group}"
            fingerprint = (r.n, r.window, r.thresholds)
            last = self._last.get(key)
            if last is None:
                publish = True
            else:
                changed = last[0] != fingerprint
                # Half an interval: once per round of (aligned) snapshots, never a round late.
                publish = (changed and now - last[1] >= self.recompute_interval / 2) or now - last[1] >= self.heartbeat
            if publish:
                # The publication's wall time in ms, or one past the last version when the clock is
                # behind it: strictly growing across restarts and owners, like a counter, and a
                # worker that publishes from a stale table (stalled past its session, then reading
                # fresh snapshots before it learns it lost the partition) publishes under the
                # present's version, not its table's, so rankers do not ignore the next owner's
                # values for as many rounds as it missed: only for the two clocks' skew.
                version = max(int(self.versions.get(key, 0)) + 1, int(now * 1000))
                self.versions[key] = version
                self._last[key] = (fingerprint, now)
                out.append(Publication(key, version, r, through))
        return out
