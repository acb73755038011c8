"""A lower bound on what a columnar users' state would cost: figures for a design that is not built.

``docs/benchmarks.md`` names the one change left that could bring one worker
process to 50,000 events/s (20 µs of CPU an event): per-partition columns of
history entries instead of a :class:`calibration.user_state.UserState` of
objects per user, with a user's changed rows encoded together at a flush. This
module measures what such a layout costs *at least*, before anyone rewrites the
core for it. It runs the same seeded events as ``riskgate bench inprocess``
through the same decoder, in the same fetch-sized chunks and flushes, into:

* one row per (user, item) of a partition, in typed arrays (``array('d')``,
  a ``bytearray`` of flags), so that a watch is a dict lookup and a few array
  writes; per user only its item -> row map, positions and pending slates;
* at a flush, one changelog record per changed user holding its changed rows
  (a msgpack list of row tuples: encoding each column as packed doubles
  instead cost 1.2 µs an event more), plus one core record when more than
  history changed, appended to Kafka record batches as the worker does.

What it models is the history's semantics exactly (the earliest watch sets
W%, ``last_seen`` is a maximum, the earliest flag and first sight are kept; a
test checks every row against :class:`~calibration.engine.Engine`). What it
leaves out would each *add* to its cost, so its figures are a floor: maturity
and calibration, de-duplication by event id, trimming, the capped safe pool
kept in rank order, the ``safe-pools`` and own-threshold outputs, watermark
lagging, and writing the local RocksDB at a sync.
"""

from __future__ import annotations

import collections
import gc
import math
import time
from array import array
from dataclasses import dataclass, field

import msgspec
from rich.console import Console

from .bench_inprocess import (
    InprocessConfig,
    backlog,
    drive,
    encode_batches,
    step_figures,
    step_table,
)

__all__ = ["STEPS", "ColumnarPartition", "bench_columnar"]

#: The steps of ``riskgate bench inprocess`` this bound has a counterpart of (no ``outputs``).
STEPS = ("decode", "engine", "table", "encode")

WATCHED, SHOWN, FLAGGED = 1, 2, 4


@dataclass(slots=True)
class ColumnarUser:
    """What stays per user: where its rows are, its log positions, its pending slates."""

    rows: dict = field(default_factory=dict)  # item id -> row
    positions: dict = field(default_factory=dict)  # source -> last offset applied
    pending: list = field(default_factory=list)
    dirty: set | None = None  # rows changed since the last flush
    core: bool = False  # more than history changed (positions of a durable event, pending)
    pool_changed: bool = False  # an entry may have entered or left T_safe


class ColumnarPartition:
    """One partition's history entries as columns (row = one user's item); see the module docstring."""

    def __init__(self, beta: float | None = 50.0):
        self.beta = beta
        self.users: dict[str, ColumnarUser] = {}
        self.item: list[str] = []
        self.tags: list[tuple] = []
        self.bits = bytearray()  # WATCHED | SHOWN | FLAGGED
        # NaN: unknown (never watched, never flagged, W% undefined for a 0 duration, ...)
        self.rank, self.pct, self.last_seen, self.flag_ts, self.first_shown, self.first_watch_ts = (
            array("d") for _ in range(6))
        self.changed: list[str] = []  # users with dirty rows, in order of first change
        self.max_ts: dict[str, float] = {}
        self._enc = msgspec.msgpack.Encoder()

    def _user(self, uid: str) -> ColumnarUser:
        u = self.users.get(uid)
        if u is None:
            u = self.users[uid] = ColumnarUser()
        return u

    def _row(self, u: ColumnarUser, item_id: str) -> int:
        r = u.rows.get(item_id)
        if r is None:
            r = u.rows[item_id] = len(self.bits)
            self.item.append(item_id)
            self.tags.append(())
            self.bits.append(0)
            nan = float("nan")
            for col in (self.rank, self.pct, self.last_seen, self.flag_ts, self.first_shown, self.first_watch_ts):
                col.append(nan)
        return r

    def _touch(self, uid: str, u: ColumnarUser, rows) -> None:
        if u.dirty is None:
            u.dirty = set(rows)
            self.changed.append(uid)
        else:
            u.dirty.update(rows)

    def apply(self, ev, source: str, offset: int) -> str:
        """Apply one decoded event at ``offset`` of ``source``; returns its outcome."""
        uid = ev.user_id
        u = self._user(uid)
        if offset <= u.positions.get(source, -1):
            return "replayed"
        kind = ev.event_type
        ts = ev.ts
        if kind == "watch":
            r = self._row(u, ev.item_id)
            bits = self.bits[r]
            if not bits & WATCHED or ts < self.first_watch_ts[r]:  # the earliest view sets W%
                d = ev.duration_ms
                pct = 100.0 * ev.watch_ms / d if d else float("nan")
                self.pct[r], self.first_watch_ts[r], self.bits[r] = pct, ts, bits | WATCHED
                if bits & (SHOWN | FLAGGED) == SHOWN and (self.beta is None or pct > self.beta):
                    u.pool_changed = True
            if not ts <= self.last_seen[r]:  # (NaN: never seen)
                self.last_seen[r] = ts
            u.positions[source] = offset  # not durable by itself, as in the worker (note_position)
            # (_touch inlined: watches are 95 % of the events, and the floor should be what a careful
            # implementation pays, not a method call and a tuple more)
            if u.dirty is None:
                u.dirty = {r}
                self.changed.append(uid)
            else:
                u.dirty.add(r)
        elif kind == "impression":
            rows = []
            for it in ev.items:
                r = self._row(u, it.item_id)
                bits = self.bits[r]
                if not bits & SHOWN:  # the first impression's rank score and tags are kept
                    self.rank[r] = it.score if it.rank_score is None else it.rank_score
                    self.tags[r] = tuple(it.tags)
                    self.bits[r] = bits | SHOWN
                if not ts >= self.first_shown[r]:
                    self.first_shown[r] = ts
                if not ts <= self.last_seen[r]:
                    self.last_seen[r] = ts
                rows.append(r)
            u.pending.append((ev.slate_id, ts, ev.k, ev.policy_applied, ev.alpha, tuple(rows),
                              tuple(it.score for it in ev.items), tuple(it.replacement for it in ev.items)))
            u.positions[source] = offset
            u.core = u.pool_changed = True
            self._touch(uid, u, rows)
        elif kind == "flag":
            r = self._row(u, ev.item_id)
            self.bits[r] |= FLAGGED
            if not ts >= self.flag_ts[r]:  # the earliest flag
                self.flag_ts[r] = ts
            if not ts <= self.last_seen[r]:
                self.last_seen[r] = ts
            u.positions[source] = offset
            u.core = u.pool_changed = True
            self._touch(uid, u, (r,))
        else:  # constraints, forget: ~0.02 % of the events, not modelled
            return "skipped"
        m = self.max_ts.get(source)
        if m is None or ts > m:
            self.max_ts[source] = ts
        return "ok"

    def flush(self) -> list[tuple[bytes, bytes]]:
        """Changelog records of what changed: per user its changed rows in one value, and its core if changed."""
        enc = self._enc
        item, tags, bits = self.item, self.tags, self.bits
        rank, pct, last, flag, shown, first = (self.rank, self.pct, self.last_seen, self.flag_ts, self.first_shown,
                                               self.first_watch_ts)
        records = []
        for uid in self.changed:
            u = self.users[uid]
            rows = sorted(u.dirty)
            u.dirty = None
            key = uid.encode()
            records.append((key + b"\x00d", enc.encode([
                (item[r], tags[r], bits[r], rank[r], pct[r], last[r], flag[r], shown[r], first[r]) for r in rows])))
            if u.core:
                records.append((key + b"\x00c", enc.encode((u.positions, u.pending))))
                u.core = False
        self.changed = []
        return records

    def history(self, uid: str) -> dict[str, tuple]:
        """The user's rows as ``item -> (rank, tags, W%, watched, shown, flagged, last_seen, flag_ts,
        first_shown, first_watch_ts)``, None for unknowns (as :class:`calibration.safe_pool.HistoryEntry`)."""
        def v(x):
            return None if math.isnan(x) else x
        out = {}
        for item_id, r in self._user(uid).rows.items():
            b = self.bits[r]
            out[item_id] = (v(self.rank[r]), self.tags[r], v(self.pct[r]), bool(b & WATCHED), bool(b & SHOWN),
                            bool(b & FLAGGED), v(self.last_seen[r]), v(self.flag_ts[r]), v(self.first_shown[r]),
                            v(self.first_watch_ts[r]))
        return out


def bench_columnar(cfg: InprocessConfig, console: Console | None = None) -> tuple[dict, dict[int, ColumnarPartition]]:
    """Time the columnar floor on ``bench inprocess``'s events; returns its figures and the partitions."""
    console = console or Console()
    from .app import GC_THRESHOLDS
    from .schemas import decode_event

    gc.set_threshold(*GC_THRESHOLDS)  # as the worker
    records = backlog(cfg)
    parts = {p: ColumnarPartition() for p in range(cfg.partitions)}
    t = dict.fromkeys(STEPS, 0.0)
    counts: collections.Counter = collections.Counter()

    def step(chunk):
        t0 = time.perf_counter()
        by = collections.defaultdict(list)
        for topic, p, offset, key, value in chunk:
            by[p].append((topic, offset, decode_event(topic, value, key)))
        t1 = time.perf_counter()
        for p, items in by.items():
            apply = parts[p].apply
            for topic, offset, ev in items:
                counts[apply(ev, topic, offset)] += 1
        t["decode"] += t1 - t0
        t["engine"] += time.perf_counter() - t1

    def flush():
        for part in parts.values():
            t0 = time.perf_counter()
            out = part.flush()
            t1 = time.perf_counter()
            written, size = encode_batches(out)
            counts["changelog"] += written
            counts["changelog_bytes"] += size
            t["table"] += t1 - t0
            t["encode"] += time.perf_counter() - t1

    wall = drive(records, cfg, step, flush)
    fig = step_figures(t, counts, len(records), wall)
    fig.update(applied=counts["ok"], skipped=counts["skipped"])
    console.print(step_table(f"riskgate bench columnar: {len(records):,} events, a floor", fig))
    console.print(f"changelog records/event {fig['changelog_records_per_event']:.2f} "
                  f"({fig['changelog_bytes_per_event']:,.0f} bytes); compare with the same steps of "
                  f"`riskgate bench inprocess --events {cfg.events} --users {cfg.users}`")
    return fig, parts
