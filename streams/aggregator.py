"""The aggregator: partitions' window totals in, one λ̂ per (strategy, group) out.

Each worker sends the totals of its partitions' windows to the one-partition
``riskgate-partials`` topic; whichever worker owns that partition runs this
logic. It keeps the latest totals of every partition (and publishes nothing
until each partition has sent one), sums them
(:func:`calibration.engine.combine`) and decides what to publish: a key whose
result changed is published once per round of snapshots (at most every half
``recompute_interval``; workers send them at wall-clock multiples of it), and every
key at least once per ``heartbeat``. Versions come from a durable mapping (a
Faust table), so they keep growing across restarts.
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

    def update(self, partition: int, watermark, span, totals: dict[tuple[str, str], CurveAccumulator],
               through: float | None = None) -> None:
        self.snapshots[partition] = (watermark, span, totals)
        self.through[partition] = through

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
                version = int(self.versions.get(key, 0)) + 1
                self.versions[key] = version
                self._last[key] = (fingerprint, now)
                out.append(Publication(key, version, r, through))
        return out
