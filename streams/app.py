"""The Faust app: topics, tables, the processing agent, the aggregator, timers and web views.

Thin by design: every number comes from :mod:`calibration`. Data flow:

1. ``process`` (one agent over the five input topics) takes events in batches,
   validates each (bad ones go to ``riskgate-dlq`` with the reason), groups them
   by partition and hands them, in order, to that partition's
   :class:`calibration.engine.Engine`, whose users live in the RocksDB-backed
   ``users`` table through a write-back cache (:class:`streams.state.TableUsers`).
   After each batch every changed user is written once, forgotten users are
   tombstoned, and changed safe pools go to the compacted ``safe-pools`` topic.
2. Every ``recompute_interval`` a timer sends each partition's window totals to
   ``riskgate-partials``; the agent on that one-partition topic (so exactly one
   worker) sums them and publishes λ̂ to ``risk-thresholds`` with versions kept in
   a table, so they keep growing across restarts.

Crash safety is at-least-once with idempotent folding: the users table is the
only state that must survive (windows are rebuilt from it), a replayed event
is recognised by its ``event_id`` in the user's state, and a slate matures once
because maturing removes it from the user's pending list in the same write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import faust
import orjson

from calibration.engine import Engine, EngineConfig, user_result
from calibration.events import event_from_dict
from calibration.grid import make_grid
from calibration.user_state import Limits

from .aggregator import Aggregator
from .metrics import Metrics
from .schemas import InvalidEvent, dead_letter, decode
from .settings import Settings
from .state import TableUsers
from .topics import DLQ, INPUT_TOPICS, PARTIALS, SAFE_POOLS, THRESHOLDS, decode_snapshot, encode_snapshot, \
    safe_pool_message, threshold_message

__all__ = ["RiskgateApp", "engine_config"]

log = logging.getLogger("riskgate")

_KIND = {"impressions": "impression", "watch": "watch", "flags": "flag", "constraints": "constraints",
         "forget": "forget"}


def engine_config(s: Settings) -> EngineConfig:
    """The calibration settings of a worker, from its typed settings."""
    grid = make_grid(values=s.grid_values) if s.grid_values else make_grid(s.grid_min, s.grid_max, s.grid_size)
    return EngineConfig(
        alphas=tuple(s.alphas), strategies=tuple(s.strategies), guarantee=s.guarantee,
        delta=s.delta if s.guarantee == "high_probability" else None, loss=s.loss, grid=grid,
        label_window=s.label_window, allowed_lateness=s.allowed_lateness, window=s.window, buckets=s.buckets,
        min_slates=s.min_slates,
        limits=Limits(beta=s.beta, history_max=s.history_max, pending_max=s.pending_max,
                      safe_pool_max=s.safe_pool_max),
    )


@dataclass
class _Partition:
    """What a worker holds for one assigned input partition."""

    engine: Engine
    users: TableUsers
    last_offsets: dict = field(default_factory=dict)  # topic -> last processed offset
    dirty: bool = True  # window changed since the last snapshot was sent
    sent_at: float = 0.0
    pools: dict = field(default_factory=dict)  # user_id -> last safe-pools payload sent


class RiskgateApp:
    """Builds and owns one Faust app; no module-level state."""

    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.config = engine_config(s)
        self.metrics = Metrics()
        for a in self.config.alphas:
            self.metrics.target_risk.labels(str(a)).set(a)
        self.partitions: dict[int, _Partition] = {}
        self.latest: dict[str, dict] = {}  # risk-thresholds published by this worker, by key
        self.healthy = False
        self._exported: dict = {}
        self.app = app = faust.App(
            s.app_id,
            broker=s.broker,
            broker_credentials=s.broker_credentials(),
            store="rocksdb://",
            datadir=str(s.data_dir),
            topic_partitions=s.topic_partitions,
            topic_replication_factor=s.topic_replication_factor,
            web_enabled=True,
            web_port=s.web_port,
            web_bind=s.web_host,
            web_host=s.web_host,
            consumer_auto_offset_reset="earliest",
            processing_guarantee="at_least_once",
            table_standby_replicas=0,
            stream_wait_empty=False,
            autodiscover=False,
            producer_linger_ms=5,
            key_serializer="raw",
            value_serializer="raw",
            # The group coordinator waits this long for members to (re)join; a
            # short wait keeps restarts and tests quick.
            broker_rebalance_timeout=s.rebalance_timeout,
            broker_session_timeout=max(6.0, 2 * s.rebalance_timeout),
            broker_heartbeat_interval=1.0,
        )
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        self.inputs = app.topic(*INPUT_TOPICS, partitions=s.topic_partitions, **raw)
        self.thresholds_topic = app.topic(THRESHOLDS, partitions=1, **raw)
        self.pools_topic = app.topic(SAFE_POOLS, partitions=s.topic_partitions, compacting=True, **raw)
        self.dlq_topic = app.topic(DLQ, partitions=1, **raw)
        self.partials_topic = app.topic(PARTIALS, partitions=1, internal=True, **raw)
        table_args = dict(key_type=bytes, value_type=bytes)  # raw bytes: the app's serializers are "raw"
        self.users_table = app.Table("users", partitions=s.topic_partitions, **table_args)
        self.meta_table = app.Table("partition-meta", partitions=s.topic_partitions, **table_args)
        self.versions_table = app.Table("threshold-versions", partitions=1, **table_args)
        self.aggregator = Aggregator(self.config, s.recompute_interval, s.heartbeat, versions=_IntTable(self.versions_table))

        app.agent(self.inputs, name="riskgate.process")(self._process)
        app.agent(self.partials_topic, name="riskgate.aggregate")(self._aggregate)
        app.timer(s.recompute_interval, name="riskgate.snapshot")(self._send_snapshots)
        app.timer(2.0, name="riskgate.health")(self._check_health)
        app.task(self._declare_topics)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        from .web import register_views

        register_views(self)

    # -- start-up and rebalancing -------------------------------------------
    async def _declare_topics(self) -> None:
        for topic in (self.thresholds_topic, self.pools_topic, self.dlq_topic):
            await topic.maybe_declare()

    async def _on_revoked(self, app, revoked, **kwargs) -> None:
        for tp in revoked:
            self.partitions.pop(tp.partition, None)

    async def _on_assigned(self, app, assigned, **kwargs) -> None:
        # Engines are rebuilt lazily from the tables, once their recovery is done.
        keep = {tp.partition for tp in assigned if tp.topic in INPUT_TOPICS}
        for p in list(self.partitions):
            if p not in keep:
                del self.partitions[p]

    def _partition(self, p: int) -> _Partition:
        part = self.partitions.get(p)
        if part is None:
            users = TableUsers(self.users_table, p, self.settings.user_cache)
            meta = self.meta_table.get(str(p).encode())
            max_ts = orjson.loads(meta)["max_ts"] if meta else None
            engine = Engine(self.config, users=users, max_ts=max_ts)
            engine.rebuild()
            part = self.partitions[p] = _Partition(engine, users)
        return part

    # -- the processing agent ------------------------------------------------
    async def _process(self, stream) -> None:
        s = self.settings
        async for events in stream.take_events(s.batch_max, within=s.batch_within):
            by_partition: dict[int, list] = defaultdict(list)
            for event in events:
                msg = event.message
                try:
                    model = decode(msg.topic, msg.value, msg.key, s.max_items)
                    rec = event_from_dict(msg.topic, model.model_dump())
                except InvalidEvent as e:
                    await self._dead_letter(msg, e)
                    continue
                by_partition[msg.partition].append((event, rec))
            for p, items in by_partition.items():
                # Table writes go to the RocksDB and changelog partition of the current event.
                stream._set_current_event(items[-1][0])
                self._run_partition(p, items)
            stream._set_current_event(None)
            self.metrics.pending.set(sum(x.engine.pending for x in self.partitions.values()))

    def _run_partition(self, p: int, items) -> None:
        part = self._partition(p)
        eng = part.engine
        for event, rec in items:
            outcome = eng.process(rec)
            self.metrics.events.labels(_KIND[event.message.topic], outcome).inc()
            part.last_offsets[event.message.topic] = event.message.offset
        part.dirty = True
        written, deleted = part.users.flush()
        self.meta_table[str(p).encode()] = orjson.dumps({"max_ts": eng.max_ts})
        if eng.max_ts is not None:
            self.metrics.watermark.labels(str(p)).set(eng.watermark)
        self._publish_user_state(part, written, deleted)
        eng.changed.clear()
        eng.forgotten.clear()

    def _publish_user_state(self, part: _Partition, written, deleted) -> None:
        eng = part.engine
        horizon = eng.calibrator.horizon()
        for uid in written:
            state = part.users.get(uid)
            if state is None:
                continue
            own = [r for st in self.config.strategies if (r := user_result(state, self.config, st, horizon))]
            payload = safe_pool_message(uid, state.safe_pool(self.config.limits), state.blocked_tags, own,
                                        state.version, state.band)
            if part.pools.get(uid) == payload:
                continue
            if own:
                state.version += 1
                part.users[uid] = state  # persisted with the next flush
                for r in own:
                    msg = threshold_message(r, self.config, state.version)
                    self.thresholds_topic.send_soon(key=f"{r.strategy}:{r.group}".encode(), value=msg)
            part.pools[uid] = payload
            self.pools_topic.send_soon(key=uid.encode(), value=payload)
        for uid in deleted:
            part.pools.pop(uid, None)
            self.pools_topic.send_soon(key=uid.encode(), value=None)
            for st in self.config.strategies:
                self.thresholds_topic.send_soon(key=f"{st}:user:{uid}".encode(), value=None)

    async def _dead_letter(self, msg, err: InvalidEvent) -> None:
        self.metrics.events.labels(_KIND.get(msg.topic, msg.topic), "invalid").inc()
        self.metrics.dlq.labels(msg.topic, err.code).inc()
        await self.dlq_topic.send(key=msg.key, value=dead_letter(msg.topic, msg.partition, msg.offset, msg.value,
                                                                  err.reason, msg.key))

    # -- snapshots and the aggregator ----------------------------------------
    async def _send_snapshots(self) -> None:
        now = time.time()
        for tp in self.app.assignor.assigned_actives():
            if tp.topic == INPUT_TOPICS[0]:
                self._partition(tp.partition)  # build engines for assigned partitions with no events yet
        for p, part in list(self.partitions.items()):
            if not part.dirty and now - part.sent_at < self.settings.heartbeat / 2:
                continue
            eng = part.engine
            wm = eng.watermark if eng.max_ts is not None else None
            await self.partials_topic.send(key=str(p).encode(),
                                           value=encode_snapshot(p, wm, eng.calibrator._clock.span(),
                                                                 eng.calibrator.snapshot()))
            part.dirty, part.sent_at = False, now

    async def _aggregate(self, stream) -> None:
        s = self.settings
        async for events in stream.take_events(1000, within=min(1.0, s.recompute_interval)):
            for event in events:
                p, wm, span, totals = decode_snapshot(event.message.value)
                self.aggregator.update(p, wm, span, totals)
            stream._set_current_event(events[-1])  # version table writes
            t0 = time.perf_counter()
            pubs = self.aggregator.due(time.time())
            for pub in pubs:
                await self.thresholds_topic.send(key=pub.key.encode(),
                                                 value=threshold_message(pub.result, self.config, pub.version))
                self._record(pub)
            self.metrics.recompute.observe(time.perf_counter() - t0)
            stream._set_current_event(None)

    def _record(self, pub) -> None:
        r, m = pub.result, self.metrics
        m.version.labels(r.strategy, r.group).set(pub.version)
        m.published_at.labels(r.strategy, r.group).set(time.time())
        m.window_slates.labels(r.strategy, r.group).set(r.n)
        for t in r.thresholds:
            labels = (r.strategy, r.group, str(t.alpha))
            m.lam.labels(*labels).set(float("inf") if t.lam is None else t.lam)
            m.filter_all.labels(*labels).set(1 if t.filter_all else 0)
            m.risk_at_lambda.labels(*labels).set(float("nan") if t.risk_at_lambda is None else t.risk_at_lambda)
        self.latest[pub.key] = {"version": pub.version, "n": r.n, "group": r.group, "strategy": r.strategy,
                                "thresholds": [t.to_dict() for t in r.thresholds]}

    # -- health and lag -------------------------------------------------------
    async def _check_health(self) -> None:
        tps = [tp for tp in self.app.assignor.assigned_actives() if tp.topic in INPUT_TOPICS]
        try:
            highwaters = await asyncio.wait_for(self.app.consumer.highwaters(*tps), timeout=5.0) if tps else {}
        except Exception:  # broker unreachable: keep state, report unhealthy, retry on the next tick
            self.healthy = False
            self.metrics.healthy.set(0)
            return
        for tp, hw in highwaters.items():
            part = self.partitions.get(tp.partition)
            last = part.last_offsets.get(tp.topic) if part else None
            committed = self.app.consumer._committed_offset.get(tp)
            position = last + 1 if last is not None else (committed or 0)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, hw - position))
        self.healthy = True
        self.metrics.healthy.set(1)
        self._export_monitors()

    def _export_monitors(self) -> None:
        """Copy the engines' in-memory monitors to Prometheus (counters by delta since the last copy)."""
        m = self.metrics
        engines = [x.engine for x in self.partitions.values()]
        totals: dict[str, float] = defaultdict(float)
        risk_sum: dict = defaultdict(float)
        risk_n: dict = defaultdict(int)
        p1_seen: dict = defaultdict(int)
        p1_flag: dict = defaultdict(int)
        for e in engines:
            mon = e.monitors
            totals["replacements_shown"] += mon.replacements_shown
            totals["replacements_flagged"] += mon.replacements_flagged
            totals["served_items"] += mon.served_items
            totals["violations"] += mon.violations
            totals["refused"] += e.calibrator.refused
            totals["matured_holdout"] += e.matured_counts["holdout"]
            totals["matured_applied"] += e.matured_counts["applied"]
            for a, n in mon.realised_slates.items():
                risk_n[a] += n
                risk_sum[a] += mon.realised_risk_sum[a]
            for b in mon.repeat_seen:
                p1_seen[b] += mon.repeat_seen[b]
                p1_flag[b] += mon.repeat_flagged[b]
        counters = {"replacements_shown": m.replacements_shown, "replacements_flagged": m.replacements_flagged,
                    "served_items": m.served_items, "violations": m.violations, "refused": m.refused,
                    "matured_holdout": m.matured.labels("holdout"), "matured_applied": m.matured.labels("applied")}
        for name, counter in counters.items():
            delta = totals[name] - self._exported.get(name, 0.0)
            if delta > 0:
                counter.inc(delta)
            # Engines rebuilt after a rebalance start from zero: re-base, never decrement.
            self._exported[name] = totals[name]
        for a, n in risk_n.items():
            if n:
                m.realised_risk.labels(str(a)).set(risk_sum[a] / n)
                delta = n - self._exported.get(("slates", a), 0)
                if delta > 0:
                    m.realised_slates.labels(str(a)).inc(delta)
                self._exported[("slates", a)] = n
        for b, n in p1_seen.items():
            if n:
                m.property1.labels(str(b)).set(p1_flag[b] / n)


class _IntTable:
    """A Faust table of raw bytes seen as str -> int (the aggregator's versions)."""

    def __init__(self, table):
        self.table = table

    def get(self, key: str, default=0) -> int:
        raw = self.table.get(key.encode())
        return default if raw is None else int(raw)

    def __setitem__(self, key: str, value: int) -> None:
        self.table[key.encode()] = str(int(value)).encode()
