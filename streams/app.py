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
import shutil
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import weakref

import orjson
from faust.streams import _current_event
from faust.types import TP

from calibration.engine import PROPERTY1_BETAS, Engine, EngineConfig, Watermark, user_result
from calibration.grid import make_grid
from calibration.groups import user_group
from calibration.user_state import CORE, Limits

from .aggregator import Aggregator
from .batch_send import send_records
from .consumer import BatchingApp, MessageContext
from .membership import WritesFenced
from .metrics import Metrics
from .schemas import INPUT_REASONS, InvalidEvent, dead_letter, decode_event
from .settings import Settings
from .state import TableErased, TableUsers, UnreadableUser, phase
from .topics import (DLQ_MAX_BYTES, INPUT_TOPICS, PARTIALS_CONFIG, InvalidSnapshot, Topics, decode_snapshot,
                     encode_snapshot, key_partition, safe_pool_message, threshold_basis, threshold_key,
                     threshold_message)

__all__ = ["RiskgateApp", "engine_config", "GC_THRESHOLDS"]

log = logging.getLogger("riskgate")
# The worker's cyclic-GC thresholds (set by `riskgate worker`, and by `bench inprocess` to
# measure the same process). The input path allocates several GC-tracked objects per record
# (aiokafka ConsumerRecords, Faust's bookkeeping, users' containers): with CPython's default
# first threshold (700) the collector ran ~200 times a second and its full collections, which
# walk every cached user, took ~20 % of the worker's time in `riskgate bench stream`. Rarer
# collections cost no correctness; the garbage that waits for them is a few MB at most.
GC_THRESHOLDS = (50_000, 20, 10)
#: Seconds between looks at the lease while a flush waits for a heartbeat to be answered (streams.membership).
LEASE_POLL = 0.05


def _offset_kept(fut) -> None:
    """Faust's changelog-send callback for the users table: the persisted offset is left as it is."""


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
                      safe_pool_max=s.safe_pool_max, user_window_max=s.user_window_max),
    )


@dataclass
class _Partition:
    """What a worker holds for one assigned input partition."""

    engine: Engine
    users: TableUsers
    last_offsets: dict = field(default_factory=dict)  # topic -> last processed offset
    # What was last sent per user, to send only changes. Bounded like the user cache: a
    # user forgotten here is sent once more when next changed, which is harmless.
    pools: "_Recent" = field(default_factory=lambda: _Recent(100_000))  # user_id -> hash of the safe-pools payload
    own: "_Recent" = field(default_factory=lambda: _Recent(100_000))  # user_id -> (fingerprint, own thresholds)
    unacked: list = field(default_factory=list)  # records applied since the last flush, acked by it
    last_message: object = None  # a record of this partition: the table-write context of a flush
    deferred: set = field(default_factory=set)  # users whose pool gained items since last sent
    additions_at: float = 0.0  # monotonic time of the last round of deferred additions
    through: float | None = None  # producer timestamp (s) of the newest input record applied
    # When (consumer clock, ms) the newest fetch of this partition's applied records was answered:
    # a topic's end known only from an older fetch may be stale (see RiskgateApp._stale). None: unknown.
    fetched_at: float | None = None
    # (topic, outcome) -> events applied since the last flush, counted by it (dropped with the
    # partition: its records are read again, and counted then)
    counts: dict = field(default_factory=lambda: defaultdict(int))


class RiskgateApp:
    """Builds and owns one Faust app; no module-level state."""

    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.config = engine_config(s)
        self._basis = threshold_basis(self.config)  # what every published λ̂ says it was computed with
        self.metrics = Metrics()
        for a in self.config.alphas:
            self.metrics.target_risk.labels(str(a)).set(a)
            # Counters at 0 from the start: rate() and increase() cannot see a series' first sample
            # (a restore of 43,018 records showed as 26,769; a table's whole restore as none).
            self.metrics.realised_slates.labels(str(a))
            self.metrics.realised_risk_sum.labels(str(a))
        self.metrics.min_slates.set(self.config.min_slates)
        for b in PROPERTY1_BETAS:
            self.metrics.property1_repeats.labels(str(b))
            self.metrics.property1_reflagged.labels(str(b))
        self.partitions: dict[int, _Partition] = {}
        self.latest: dict[str, dict] = {}  # risk-thresholds published by this worker, by key
        self.healthy = False
        # Engine -> its monitors' values last copied to the counters (an engine dropped with its
        # partition is forgotten with it).
        self._exported: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Input partition -> dead-letter records of its records since its last flush, sent by that
        # flush before it acks them (as changelog records are: a few µs each, not send_soon's ~40).
        self._dead: dict[int, list] = defaultdict(list)
        # Input partition -> (topic, reason, counted as an invalid event) -> those dead letters, counted
        # by the flush that sends them.
        self._dead_counts: dict[int, dict] = defaultdict(lambda: defaultdict(int))
        self._lag_series: set[tuple[str, str]] = set()  # (topic, partition) of the lag this worker exports
        self._flush_lock = asyncio.Lock()
        self._pool_parts = list(range(s.topic_partitions))
        # One-record producer batches are the tansu settings (docs/operations.md): there the
        # changelog's end offset is only exact if its last batch holds one record.
        self._fence = s.producer_max_batch_size < 16 * 1024
        self._unflushed = 0
        self._flushed_at = time.monotonic()
        self._first_batch_at: float | None = None
        self._waiting_logged_at = float("-inf")  # when the aggregator last said what it waits for
        self._fenced_logged_at = float("-inf")  # when a write skipped on a stale lease was last logged
        self._fenced_out: WritesFenced | None = None  # a flush given up half-way: this worker writes no more
        self._local_ahead = False  # a flush wrote a local store and has not queued all of its sends yet
        self.app = app = BatchingApp(
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
            # tansu under-reports a partition's end offset (ListOffsets answers with
            # the last batch's base offset + 1), so the persisted changelog offset
            # can be "ahead" of it; Faust's check would then refuse to start.
            recovery_consistency_check=s.recovery_consistency_check,
            producer_max_batch_size=s.producer_max_batch_size,
            # A dead-letter record carries the original value (up to schemas.MAX_BYTES) in
            # base64: ~1.33 MB, over Faust's default 1 MB request (the DLQ topic is created
            # with max.message.bytes to match).
            producer_max_request_size=DLQ_MAX_BYTES,
        )
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        self.names = names = Topics(s.topic_prefix)
        self._base_names = {t: names.base(t) for t in names.inputs}  # input topic -> its SPEC name
        self.inputs = app.topic(*names.inputs, partitions=s.topic_partitions, **raw)
        for topic in self._base_names.values():  # (at 0: see realised_slates above)
            self.metrics.events.labels(_KIND[topic], "invalid")
            for reason in INPUT_REASONS:
                self.metrics.dlq.labels(topic, reason)
        # Compacted like safe-pools: one latest value per strategy:group, which a ranker reads
        # from the beginning; tombstones (a forgotten user's, an ended user λ̂) then erase the key.
        self.thresholds_topic = app.topic(names.thresholds, partitions=1, compacting=True, **raw)
        self.pools_topic = app.topic(names.safe_pools, partitions=s.topic_partitions, compacting=True, **raw)
        self.dlq_topic = app.topic(names.dlq, partitions=1, config={"max.message.bytes": str(DLQ_MAX_BYTES)}, **raw)
        self.partials_topic = app.topic(names.partials, partitions=1, internal=True, config=PARTIALS_CONFIG, **raw)
        # Raw bytes (the app's serializers are "raw") and bounded RocksDB memory: at most
        # partitions × 3 tables × (2 write buffers + block cache).
        rocks = {"write_buffer_size": s.rocksdb_write_buffer_mb << 20, "max_write_buffer_number": 2,
                 "block_cache_size": s.rocksdb_block_cache_mb << 20}
        table_args = dict(key_type=bytes, value_type=bytes, options=rocks)
        self.users_table = app.Table("users", partitions=s.topic_partitions, **table_args)
        self.meta_table = app.Table("partition-meta", partitions=s.topic_partitions, **table_args)
        self.versions_table = app.Table("threshold-versions", partitions=1, **table_args)
        for table in (self.users_table, self.meta_table, self.versions_table):
            self.metrics.restored.labels(table.name)  # (at 0: see realised_slates above)
        # The users table's persisted changelog offset is TableUsers' to set, at a sync of the
        # local store (and by streams.restore): Faust moved it at every forget marker it wrote,
        # past records only in the changelog until the next sync, and a recovery that kept the
        # local store then started after them (found by a review: a user's acked flag lost when
        # its partition came back to a worker that had dropped it unsynced).
        self.users_table._on_changelog_sent = _offset_kept
        self.aggregator = Aggregator(self.config, s.recompute_interval, s.heartbeat,
                                     versions=_IntTable(self.versions_table), partitions=s.topic_partitions)

        # The input topics bypass Faust streams (streams/consumer.py): whole
        # fetches go to _on_batch; the conductor only needs to subscribe them.
        app.topics.add(self.inputs)
        app.batch_topics = frozenset(names.inputs)
        app.batch_max = s.batch_max
        app.on_batch = self._on_batch
        app.before_revoke = self._flush_and_sync
        app.on_lost = self._on_lost
        app.on_fetch = self._on_fetch
        app.on_restore = self._on_restore
        app.timer(s.flush_interval, name="riskgate.flush")(self._flush_timer)
        app.agent(self.partials_topic, name="riskgate.aggregate")(self._aggregate)
        app.task(self._snapshot_ticks)
        app.timer(2.0, name="riskgate.health")(self._check_health)
        app.task(self._declare_topics)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        from .web import register_views

        register_views(self)
        self._discard_local_state_after_a_crash()

    # -- local state and crashes ---------------------------------------------
    @property
    def _clean_stop_marker(self):
        return self.settings.data_dir / "riskgate-clean-stop"

    def _discard_local_state_after_a_crash(self) -> None:
        """Restore the tables from their changelogs unless the last stop was clean.

        A flush writes the local RocksDB before its changelog records are on the
        broker, so after a crash the local stores may hold what the changelog
        never got; since replayed events are de-duplicated against that state,
        it would never be sent. As Kafka Streams does after an unclean shutdown,
        the local stores are dropped and Faust restores them from the changelogs.
        The marker exists only between a clean stop and the next start.
        """
        tabledir = Path(self.app.conf.tabledir)
        marker = self._clean_stop_marker
        if tabledir.exists() and any(tabledir.iterdir()) and not marker.exists():
            log.warning("the last stop was not clean: local table stores are dropped and restored from the changelogs")
            shutil.rmtree(tabledir)
        marker.unlink(missing_ok=True)

    def mark_clean_stop(self) -> None:
        """Called after the worker stopped: writes the marker if the stop flushed everything."""
        if self.app.stopped_cleanly:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            self._clean_stop_marker.write_text("the last stop flushed every table and the producer\n")

    # -- start-up and rebalancing -------------------------------------------
    async def _declare_topics(self) -> None:
        for topic in (self.thresholds_topic, self.pools_topic, self.dlq_topic):
            await topic.maybe_declare()

    async def _on_revoked(self, app, revoked, **kwargs) -> None:
        for tp in revoked:
            self._drop_partition(tp.partition)

    def _drop_aggregator(self) -> None:
        """Forget what this worker published as the aggregator, which it may no longer be.

        A former owner of ``riskgate-partials`` kept exporting its last λ̂, filter_all
        and versions, and the dashboard's max over workers let a stale filter_all or
        +Inf win over the current owner's values; its ``/thresholds`` kept answering,
        when an empty one is how the runbooks find the aggregator. Called when an
        assignment leaves this worker without the partition.
        """
        m = self.metrics
        for msg in self.latest.values():
            strategy, group = msg["strategy"], msg["group"]
            for gauge in (m.version, m.published_at, m.inputs_age, m.window_slates):
                _remove(gauge, strategy, group)
            for t in msg["thresholds"]:
                for gauge in (m.lam, m.filter_all, m.risk_at_lambda):
                    _remove(gauge, strategy, group, str(t["alpha"]))
        self.latest = {}
        self.aggregator.reset()

    async def _on_assigned(self, app, assigned, **kwargs) -> None:
        # Engines are rebuilt lazily from the tables, once their recovery is done.
        keep = {tp.partition for tp in assigned if tp.topic in self.names.inputs}
        # (here, not at the revoke: Faust revokes everything at every rebalance, and the worker
        # that keeps riskgate-partials would have exported nothing until its next heartbeat)
        if not any(tp.topic == self.names.partials for tp in assigned):
            self._drop_aggregator()
        for p in set(self.partitions) | set(self._dead):
            if p not in keep:
                self._drop_partition(p)

    def _drop_partition(self, p: int) -> None:
        """Forget what this worker holds for input partition ``p``, no longer its own."""
        self.partitions.pop(p, None)
        # Dead letters of records not acked (the flush before the revoke failed): the
        # records are read again by the partition's next owner, which sends them.
        self._dead.pop(p, None)
        self._dead_counts.pop(p, None)
        # Its series too: a former owner's frozen lag summed with the new owner's showed
        # phantom lag on the dashboard, and could hold RiskgateConsumerLagGrowing up.
        for topic in INPUT_TOPICS:
            _remove(self.metrics.lag, topic, str(p))
        _remove(self.metrics.watermark, str(p))

    def _partition(self, p: int) -> _Partition:
        part = self.partitions.get(p)
        if part is None:
            users = TableUsers(self.users_table, p, self.settings.user_cache, self.settings.local_sync_interval)
            wm, max_ts = _read_meta(p, self.meta_table.get(str(p).encode()))
            clock = Watermark(self.config.allowed_lateness, float("-inf") if wm is None else wm, max_ts)
            engine = Engine(self.config, users=users, clock=clock, erased=TableErased(self.users_table, p))
            engine.rebuild()
            cap = self.settings.user_cache
            # Rounds of pool additions start at the partition's own phase, so the
            # partitions' rounds do not all fall in one flush.
            additions_at = time.monotonic() - self.settings.pool_additions_interval * phase(p)
            part = self.partitions[p] = _Partition(engine, users, pools=_Recent(cap), own=_Recent(cap),
                                                   additions_at=additions_at)
        return part

    # -- the input path: whole fetches, flushed and acked together ------------
    async def _on_batch(self, messages) -> None:
        """Validate and fold one fetch of input records (aiokafka ``ConsumerRecord``, from :class:`BatchConsumer`).

        Records are applied in offset order per partition, each partition by
        its own engine. Their effects stay in the engines' write-back caches
        until :meth:`_flush`, which writes every changed user once and only
        then acks the records, so Faust never commits an offset whose effects
        are not in the changelog.
        """
        s = self.settings
        m = self.metrics
        if self._first_batch_at is None:
            self._first_batch_at = time.time()
            m.first_record_at.set(self._first_batch_at)
        base = self._base_names
        by_partition: dict[int, list] = defaultdict(list)
        horizon = time.time() + s.max_future_skew
        for msg in messages:
            topic = base[msg.topic]
            try:
                rec = decode_event(topic, msg.value, msg.key, s.max_items)
                if rec.ts > horizon:
                    raise InvalidEvent("future_ts", f"ts is more than RISKGATE_MAX_FUTURE_SKEW={s.max_future_skew:g} s "
                                                    "past the worker's clock")
            except InvalidEvent as e:
                self._dead_letter(msg, e)
                rec = None
            except Exception as e:  # a validator bug must not stop the stream (nor crash on every restart)
                log.error("validation failed unexpectedly (%s) for %s[%d]@%d: dead-lettered",
                          type(e).__name__, msg.topic, msg.partition, msg.offset)
                self._dead_letter(msg, InvalidEvent("internal", f"validation failed: {type(e).__name__}"))
                rec = None
            by_partition[msg.partition].append((msg, topic, rec))
        for p, items in by_partition.items():
            self._run_partition(p, items)
        m.pending.set(sum(x.engine.pending for x in self.partitions.values()))
        m.applied.inc(len(messages))
        m.last_applied_at.set(time.time())
        self._unflushed += len(messages)
        now = time.monotonic()
        if self._unflushed >= s.flush_max_events or now - self._flushed_at >= s.flush_interval:
            await self._flush_all()

    def _on_fetch(self, waited: float, records: bool) -> None:
        self.metrics.fetch_wait.inc(waited)
        if records:
            self.metrics.fetches.inc()

    def _on_restore(self, tp, records: int) -> None:
        table = self.app.tables.recovery.tp_to_table.get(tp)
        self.metrics.restored.labels(table.name if table is not None else tp.topic).inc(records)

    def _run_partition(self, p: int, items) -> None:
        part = self._partition(p)
        eng = part.engine
        final: dict[str, int] = {}  # topic -> index of its last record in this batch (offsets ascend)
        for i, (_, topic, _) in enumerate(items):
            final[topic] = i
        last = part.last_offsets
        for i in final.values():
            msg = items[i][0]
            if msg.offset > last.get(msg.topic, -1):
                last[msg.topic] = msg.offset
            polled = self._polled_at(TP(msg.topic, p))
            if polled is not None and (part.fetched_at is None or polled > part.fetched_at):
                part.fetched_at = polled
        # A topic holds the watermark back while it has unread records beyond
        # this batch (_mark_lagging) *or* records later in this batch: records
        # are applied one by one, and a batch may hold the rest of `flags`
        # after a run of `watch` whose ts would otherwise make them late.
        behind = self._mark_lagging(p, part)
        clock = eng.clock
        for topic in final:
            clock.set_lagging(topic, True)
        counts = part.counts
        process = eng.process
        part.unacked.extend(msg for msg, _, _ in items)
        # (before applying: a flush at stop after an event raised needs a message of the partition,
        # and MessageContext(None) failed every partition's flush)
        part.last_message = items[-1][0]
        for i, (msg, topic, rec) in enumerate(items):
            if rec is not None:
                try:
                    counts[(topic, process(rec, topic, msg.offset))] += 1
                except UnreadableUser as e:  # (a user set aside: what the event changed of it is dropped)
                    if e.user_id != rec.user_id:
                        raise  # another user's (maturing): not this event's to answer for
                    counts[(topic, "unreadable_state")] += 1
                    self._dead_letter(msg, InvalidEvent("unreadable_state", str(e)), invalid_event=False)
            if final[topic] == i and topic not in behind:
                clock.set_lagging(topic, False)
                eng.advance_clock()  # the watermark may move now that this topic is read up to its end
        newest = max(msg.timestamp or 0 for msg, _, _ in items) / 1000.0  # aiokafka records: ms
        if part.through is None or newest > part.through:
            part.through = newest

    async def _flush_timer(self) -> None:
        # From the partitions themselves, not a counter: records applied while a
        # flush awaits its sends belong to the next flush, whoever runs it.
        if not self.app.rebalancing and any(self._due(part) for part in self.partitions.values()):
            await self._flush_all()

    def _additions_due(self, part: _Partition) -> bool:
        return time.monotonic() - part.additions_at >= self.settings.pool_additions_interval

    def _due(self, part: _Partition) -> bool:
        """Whether the partition has records to ack, users changed without a record (slates matured by
        the health tick), or a round of pool additions to send."""
        return bool(part.unacked) or bool(part.engine.changed) or (bool(part.deferred) and self._additions_due(part))

    async def _flush_and_sync(self) -> bool:
        """Before a revoke or stop: flush, and bring every local store up to its changelog; False if it could not."""
        return await self._flush_all(sync=True)

    def _may_write(self, what: str) -> bool:
        """Whether this worker's lease on the group is fresh (:mod:`streams.membership`); else counts ``what`` as fenced.

        A worker stalled past its session wrote its stale users after the new owner's
        records, and the next restore of those users lost what the new owner applied.
        """
        lease = self.app.lease
        if lease.held() and self._fenced_out is None:
            return True
        self.metrics.fenced.labels(what).inc()
        if time.monotonic() - self._fenced_logged_at >= 10:
            self._fenced_logged_at = time.monotonic()
            log.warning("%s skipped: no heartbeat answered for %.1f s (half the session timeout is %.1f s); this "
                        "worker's partitions may be another's until the group answers", what, lease.age(), lease.term)
        return False

    async def _on_lost(self) -> None:
        """The group moved this worker's partitions while it could not write (a stall past its session):
        drop what it holds of them unflushed (their events' counts with them). Their next owner re-reads
        those records from the committed offsets."""
        self.metrics.fenced.labels("lost").inc()
        async with self._flush_lock:  # after a flush in progress, which began on a fresh lease
            self._drop_held()
        self._drop_aggregator()

    def _drop_held(self) -> None:
        """Drop every input partition held here, unflushed: its records are read again, from the committed offsets."""
        for p in set(self.partitions) | set(self._dead):
            self._drop_partition(p)
        self._unflushed = 0

    async def _hold_lease(self) -> None:
        """Before each send of a flush: return while this worker may write; else wait for the lease.

        A flush checks the lease at its start, but a stall in the middle of it (a
        paused VM, a long GIL-holding pause) was followed by the rest of the flush,
        unchecked. Once the next heartbeat is answered the partitions are still this
        worker's and the flush goes on; raises :class:`WritesFenced` once the broker
        has dropped the member, a rebalance is pending, a whole session timeout has
        passed unanswered, or at a stop.
        """
        lease = self.app.lease
        while not lease.held():
            # (A whole session unanswered: the broker has dropped the member by now, though aiokafka may
            # never say so, its heartbeat task gone on an error it does not retry.)
            if (self._fenced_out is not None or lease.moving() or self.app.should_stop
                    or lease.age() >= lease.session_timeout):
                why = ("the broker no longer knows this member" if lease.lost() else
                       "a rebalance is pending" if lease.moving() else
                       "the worker is stopping" if self.app.should_stop else "a whole session went unanswered")
                raise WritesFenced(f"no heartbeat answered for {lease.age():.1f} s in the middle of a flush, and {why}")
            await asyncio.sleep(LEASE_POLL)

    async def _give_up(self, e: WritesFenced) -> None:
        """A flush given up half-way: drop what is held unflushed; stop unclean if that is not enough.

        Nothing of the flush was acked: its records are read again by the partitions' next
        owner, from the committed offsets. When a rebalance follows (the member was dropped, or
        one is pending) and no local store got ahead of its changelog, dropping is enough: the
        next assignment restores from them and seeks back. Otherwise the worker stops unclean,
        so that its next start restores from the changelogs alone
        (:meth:`_discard_local_state_after_a_crash`): a flush writes evicted users, forgets and
        periodic syncs to the local store before its sends, and no rebalance may be coming (a
        whole session unanswered: aiokafka's heartbeat task may be gone).
        """
        self.metrics.fenced.labels("flush").inc()
        self.app.inputs_open = False  # (nothing more is applied until an assignment's recovery)
        self._drop_held()
        lease = self.app.lease
        if not self._local_ahead and (lease.moving() or self.app.should_stop):
            log.warning("flush given up: %s; what was not flushed is dropped, and read again after the rebalance", e)
            return
        self._fenced_out = e
        log.error("flush given up: %s; stopping, unclean: the next start restores from the changelogs", e)
        await self.app.crash(e)

    async def _flush_all(self, sync: bool = False) -> bool:
        """Flush every partition with unacked records (see :meth:`_flush`); ``sync``: and sync every local store.

        Returns False when it did not flush: on a lease not fresh (:meth:`_may_write`), or given up half-way.
        """
        async with self._flush_lock:  # the timer and the batch callback both flush
            if not self._may_write("flush"):
                return False  # (kept unacked: written at the next flush on a fresh lease, or dropped when lost)
            t0 = time.perf_counter()
            try:
                for p, part in list(self.partitions.items()):
                    if self._due(part) or (sync and part.deferred):
                        await self._flush(p, part, sync)
            except WritesFenced as e:
                await self._give_up(e)
                return False
            if sync:
                # After the sends, not before: local only, and before a revoke the lease runs out
                # within the rebalance timeout (a review saw a healthy worker give up its pre-revoke
                # flush while it wrote 28k users to RocksDB first). Nothing was applied since the
                # flush: the inputs are closed at a revoke and at a stop.
                for part in self.partitions.values():
                    part.users.sync()
            self._unflushed = sum(len(part.unacked) for part in self.partitions.values())
            self.metrics.users_cached.set(sum(part.users.cached for part in self.partitions.values()))
            self._flushed_at = time.monotonic()
            self.metrics.flush.observe(time.perf_counter() - t0)
            return True

    async def _flush(self, p: int, part: _Partition, sync: bool = False) -> None:
        """Write the partition's changed users once, send its outputs, then ack its records.

        Order matters for crash safety: changelog and output records are queued
        in the producer before the acks, and Faust flushes the producer before
        it commits the acked offsets. Everything up to the first await is taken
        at once, so records applied while the batches are queued belong to the
        next flush.
        """
        await self._hold_lease()
        eng = part.engine
        unacked, part.unacked = part.unacked, []
        counts, part.counts = part.counts, defaultdict(int)
        dead = self._dead.pop(p, None)
        dead_counts = self._dead_counts.pop(p, None)
        outgoing = self._user_outputs(part, eng.changed, force=sync)  # may bump versions: before the flush persists them
        eng.changed.clear()
        _, deleted, groups = part.users.flush()  # (a sync of the local store: after, see _flush_all)
        self._local_ahead = part.users.wrote_local  # (until this partition's sends are queued)
        ctx = MessageContext(part.last_message)  # the few writes through Faust tables pick this partition
        _in_event_of(ctx)
        eng.erased.flush()
        # The partition's watermark as of this flush's users, written after their records (below):
        # written before, and the flush given up, the records read again were judged against it.
        meta = orjson.dumps({"watermark": eng.clock.known, "max_ts_by_topic": eng.clock.max_ts})
        wm = eng.clock.known
        # Forgets read again: tombstones again. A user back since has a value of this flush in
        # `outgoing` for some keys (its pool, say): a tombstone after it erased the user from
        # rankers, so those keys get none; the others still do (its own λ̂ of before the forget).
        again = sorted(eng.erased_again - deleted)
        eng.erased_again.clear()
        if again:
            sent_now = {(t, k) for t, k, _ in outgoing}
        for uid in [*deleted, *again]:
            key = uid.encode()
            if not again or (self.pools_topic, key) not in sent_now:
                part.pools.pop(uid, None)
                outgoing.append((self.pools_topic, key, None))
            for st in self.config.strategies:
                tkey = threshold_key(st, user_group(uid)).encode()
                if not again or (self.thresholds_topic, tkey) not in sent_now:
                    part.own.pop(uid, None)
                    outgoing.append((self.thresholds_topic, tkey, None))
        changelog = self.users_table.changelog_topic.get_topic_name()
        hold = self._hold_lease
        records, size = await send_records(self.app, changelog, p, groups, on_sent=part.users.note_sent,
                                           fence=self._fence, before_send=hold)
        self.metrics.changelog_records.inc(records)
        self.metrics.changelog_bytes.inc(size)
        pools: dict[int, list] = defaultdict(list)
        for t, k, v in outgoing:
            if t is self.pools_topic:
                pools[self._pool_partition(k)].append((k, v))
        for partition, records in pools.items():
            await send_records(self.app, self.names.safe_pools, partition, [[r] for r in records], before_send=hold)
        await hold()
        for topic, key, value in outgoing:
            if topic is not self.pools_topic:
                topic.send_soon(key=key, value=value)
        if dead:
            await send_records(self.app, self.names.dlq, 0, [[r] for r in dead], before_send=hold)
        await hold()
        _in_event_of(ctx)  # (again: this task's current event, should anything have set it meanwhile)
        self.meta_table[str(p).encode()] = meta
        del ctx
        if wm is not None:
            self.metrics.watermark.labels(str(p)).set(wm)
        self._local_ahead = False
        by_topic: dict = defaultdict(list)
        for msg in unacked:
            by_topic[msg.topic].append(msg.offset)
        consumer = self.app.consumer
        for topic, offsets in by_topic.items():
            consumer.ack_offsets(TP(topic, p), offsets)
        for (topic, outcome), n in counts.items():
            self.metrics.events.labels(_KIND[topic], outcome).inc(n)
        for (topic, code, invalid_event), n in (dead_counts or {}).items():
            if invalid_event:
                self.metrics.events.labels(_KIND.get(topic, topic), "invalid").inc(n)
            self.metrics.dlq.labels(topic, code).inc(n)

    def _pool_partition(self, key: bytes) -> int:
        # The key's partition under Kafka's default (murmur2) partitioner, where
        # send_soon put these records: compaction needs every record of a key in one.
        return key_partition(key, len(self._pool_parts))

    def _user_outputs(self, part: _Partition, changed, force: bool = False) -> list:
        """``safe-pools`` values and the users' own thresholds that changed since last sent.

        A user's own λ̂ (SPEC §5: only with ``min_slates`` slates of their own) is
        published to ``risk-thresholds`` under ``strategy:user:<id>`` with the
        user's own version, bumped here so the flush that follows persists it.
        Both are recomputed only when the user noted a change that can move them:
        own λ̂ when the core changed (slates matured), the ``safe-pools`` value when
        the core or the safe pool changed (most watches change neither). A pool
        that only gained items is sent with the next round of additions
        (``POOL_ADDITIONS_INTERVAL``; ``force``: now): an item a ranker must stop
        using, or any other change, goes out with this flush.
        """
        out = []
        basis = self._basis
        horizon = part.engine.calibrator.horizon()
        round_due = force or self._additions_due(part)
        due: set = set()
        if round_due:
            due, part.deferred, part.additions_at = part.deferred, set(), time.monotonic()
        for uid in (changed | due) if due else changed:
            try:
                state = part.users.get(uid)
            except LookupError:  # set aside since it changed (or since its additions were deferred)
                continue
            if state is None:
                continue
            touched = state.touched
            core = touched is None or CORE in touched
            pool_changed = state.take_pool_changed()
            removal = state.take_pool_removal()
            if pool_changed and not (core or removal or round_due):
                part.deferred.add(uid)  # only additions: the next round sends them
                continue
            # A removal is sent even when the pool's top did not change: the item may have
            # dropped past the cap (behind additions held back) after the ranker got it.
            pool_changed = pool_changed or removal or uid in due
            known = part.own.get(uid)
            if core or known is None:
                own = [r for st in self.config.strategies if (r := user_result(state, self.config, st, horizon))]
                fingerprint = [(r.strategy, r.n, r.thresholds) for r in own]
                if own and (known is None or known[0] != fingerprint):
                    state.bump_version()
                    part.users[uid] = state
                    for r in own:
                        out.append((self.thresholds_topic, threshold_key(r.strategy, r.group).encode(),
                                    threshold_message(r, self.config, state.version)))
                elif not own and (known[0] if known is not None else state.version):
                    # The user's own λ̂ ended (fewer than min_slates live slates): delete its
                    # keys, or the last one would stand on risk-thresholds for good. (Not
                    # known, as after a restart: sent again, harmless on a compacted topic.)
                    # Known by its fingerprint, not the version: a user forgotten and back
                    # before the flush starts again at version 0 and is in no flush's deleted
                    # users, and its former λ̂ stood, against the erasure.
                    for st in self.config.strategies:
                        out.append((self.thresholds_topic, threshold_key(st, user_group(uid)).encode(), None))
                part.own[uid] = (fingerprint, own)
            elif not pool_changed:
                continue
            else:
                own = known[1]
            pool = state.safe_pool(self.config.limits)
            state.pool_published(pool)  # later removals are judged against what rankers were given
            payload = safe_pool_message(uid, pool, state.blocked_tags, own, state.version, state.band, basis)
            digest = hash(payload)
            if part.pools.get(uid) != digest:
                part.pools[uid] = digest
                out.append((self.pools_topic, uid.encode(), payload))
            part.deferred.discard(uid)  # (sent whole: its earlier additions with it)
        return out

    def _mark_lagging(self, p: int, part: _Partition) -> set[str]:
        """Tell the partition's watermark which input topics have unread records past this batch; returns them."""
        behind = set()
        for topic in self.names.inputs:
            lagging = not self._read_to_end(part, TP(topic, p))
            part.engine.clock.set_lagging(self.names.base(topic), lagging)
            if lagging:
                behind.add(self.names.base(topic))
        return behind

    def _read_to_end(self, part: _Partition, tp, ends: dict | None = None) -> bool:
        """Whether input ``tp`` is known to be read to its end: the end its newest fetch told, unless that
        fetch is older than the records applied (:meth:`_stale`); or, when no fetch told one yet, the end
        in ``ends`` (asked for just now, so newer than any fetch of the records applied)."""
        consumer = self.app.consumer
        try:
            hw = consumer.highwater(tp)
        except Exception:
            hw = None
        if hw is not None:
            if self._stale(part, tp):
                return False
        elif (hw := (ends or {}).get(tp)) is None:
            return False
        last = part.last_offsets.get(tp.topic)
        position = last + 1 if last is not None else (consumer._committed_offset.get(tp) or 0)
        return position >= hw

    def _polled_at(self, tp) -> float | None:
        """When (ms, the consumer's clock) the last fetch response covering ``tp`` was read; None: unknown."""
        polled = getattr(self.app.consumer, "last_poll_timestamp", None)
        if polled is None:  # (a consumer that cannot say: test doubles)
            return None
        try:
            return polled(tp)
        except Exception:  # (not assigned in aiokafka: revoked, or not yet)
            return None

    def _stale(self, part: _Partition, tp) -> bool:
        """Whether ``tp``'s known end (its fetch highwater) is older than the fetch of records applied since.

        A partition's highwater is only updated by a fetch that covers it, and the consumer
        leaves a partition out of its fetches while it holds records of it not yet handed
        over. So the records of one topic can come from a fetch answered after the one that
        last told another topic's end: `flags` looked read to its end at an offset the broker
        had passed before the `impressions` record being applied was even produced, and the
        watermark moved past slates whose flags were unread (a crash-test reference run matured
        u54's slate s-798 without its four flags). Such a topic counts as lagging until a fetch
        at least as new covers it (the consumer's next one, as it holds nothing of it).
        """
        fetched_at = part.fetched_at
        if fetched_at is None:
            return False
        polled = self._polled_at(tp)
        return polled is None or polled < fetched_at

    def _release_caught_up(self, ends: dict) -> None:
        """Let input topics read to their end stop holding a partition's watermark back, without a batch.

        A topic is marked lagging at a batch when its end is not known yet (an empty ``forget``
        partition right after a restart); only the partition's next batch cleared it, so a partition
        that got no more input kept its watermark frozen and its slates unmatured for good (crash
        audit: 267 slates on four partitions). The health tick asks here with the ends it fetched.

        Not while the inputs are closed: a revoke's or a stop's flush, which syncs the local stores
        after its sends, must be the last change to the users until the next assignment.
        """
        if not self.app.inputs_open:
            return
        for p, part in list(self.partitions.items()):
            clock = part.engine.clock
            if not clock.lagging:
                continue
            released = False
            for topic in self.names.inputs:
                base = self.names.base(topic)
                if base in clock.lagging and self._read_to_end(part, TP(topic, p), ends):
                    clock.set_lagging(base, False)
                    released = True
            if released:
                part.engine.advance_clock()  # (what matures is written by the next flush: see _due)

    def _dead_letter(self, msg, err: InvalidEvent, invalid_event: bool = True) -> None:
        """Send ``msg`` to the dead-letter topic with its reason (``invalid_event``: counted as an invalid event)."""
        topic = self.names.base(msg.topic)
        value = dead_letter(msg.topic, msg.partition, msg.offset, msg.value, err.reason, msg.key)
        if msg.topic in self._base_names:
            # An input record: its dead letter goes out with its partition's flush, before the
            # record is acked (so a crash re-reads it rather than losing it). A flood of
            # malformed input then costs what valid input does, not a Faust send per record.
            # Counted by that flush too: dropped unflushed with a lost partition, the record is
            # read and counted again (a review: the counters counted it twice).
            self._dead[msg.partition].append((msg.key, value))
            self._dead_counts[msg.partition][(topic, err.code, invalid_event)] += 1
            return
        if invalid_event:
            self.metrics.events.labels(_KIND.get(topic, topic), "invalid").inc()
        self.metrics.dlq.labels(topic, err.code).inc()
        # send_soon: no await here (offsets are committed only after the producer
        # buffer is flushed, so the record is not lost on a crash).
        self.dlq_topic.send_soon(key=msg.key, value=value)

    # -- snapshots and the aggregator ----------------------------------------
    async def _snapshot_ticks(self) -> None:
        """Send snapshots at wall-clock multiples of RECOMPUTE_INTERVAL, on every worker alike.

        Aligned ticks make all partitions' snapshots of a round reach the
        aggregator together, so it publishes once per round, right after it: a
        flag applied at t is in a published threshold by the next tick plus
        the aggregator's short buffer (freshness ≤ RECOMPUTE_INTERVAL + ~0.2 s).
        """
        interval = self.settings.recompute_interval
        while True:
            now = time.time()
            tick = (now // interval + 1) * interval
            await asyncio.sleep(tick - now)
            try:
                # The round is the tick's number, the same on every worker whose clock is
                # within half an interval: the aggregator publishes once it has them all.
                await self._send_snapshots(round(tick / interval))
            except Exception:  # never let one failed round end the ticks
                log.exception("sending partition snapshots failed; retrying at the next tick")

    async def _send_snapshots(self, round_: int | None = None) -> None:
        """Send every assigned partition's window totals, idle ones too (their ``round_`` completes the round)."""
        # During a rebalance the tables are still being restored: an engine built
        # now would rebuild its window from part of the changelog, and stay
        # cached with it after the recovery ends (a wrong, small window). Nor between a revoke and
        # the next assignment, which Faust's `rebalancing` does not always cover (found by a review:
        # a revoked generation's recovery completing late ends it): the assignor's partitions are
        # the revoked ones then, and engines built for them would be another worker's.
        if (self.app.rebalancing or self.app.awaiting_assignment or not self.app.inputs_open
                or not self._may_write("snapshot")):
            return
        for tp in self.app.assignor.assigned_actives():
            if tp.topic == self.names.inputs[0]:
                self._partition(tp.partition)  # build engines for assigned partitions with no events yet
        for p, part in list(self.partitions.items()):
            if not self._may_write("snapshot"):  # (again: each send may have waited)
                return
            eng = part.engine
            await self.partials_topic.send(key=str(p).encode(),
                                           value=encode_snapshot(p, eng.clock.known, eng.calibrator.span(),
                                                                 eng.calibrator.snapshot(), part.through, round_))

    async def _aggregate(self, stream) -> None:
        s = self.settings
        # A short buffer: a round's snapshots arrive together (aligned ticks).
        grid = len(self.config.grid)
        async for events in stream.take_events(1000, within=min(0.2, s.recompute_interval / 4)):
            for event in events:
                msg = event.message
                try:
                    snapshot = decode_snapshot(msg.value, grid, s.topic_partitions)
                except InvalidSnapshot as e:
                    # Only workers write this topic; a record they could not have written
                    # (another deployment's grid, a stray producer) must not stop the sums.
                    log.error("a %s record that is not a snapshot (%s[%d]@%d): dead-lettered",
                              self.names.partials, msg.topic, msg.partition, msg.offset)
                    self._dead_letter(msg, InvalidEvent("bad_snapshot", str(e)), invalid_event=False)
                    continue
                self.aggregator.update(*snapshot)
            _in_event_of(events[-1])  # version table writes
            t0 = time.perf_counter()
            pubs = self.aggregator.due(time.time()) if self._may_write("publish") else []
            missing = self.aggregator.missing()
            if missing and time.monotonic() - self._waiting_logged_at >= s.heartbeat:
                self._waiting_logged_at = time.monotonic()
                log.info("nothing published yet: no snapshot from input partitions %s", missing)
            if pubs:
                # The new versions must be in the versions table's changelog before
                # anyone sees them: a restart that restores the table from there
                # must never hand out a version again.
                await self.app.producer.flush()
            for i, pub in enumerate(pubs):
                if not self._may_write("publish"):  # (again: the flush and each send may have waited)
                    for rest in pubs[i:]:
                        self.aggregator.unsent(rest.key)
                    break
                await self.thresholds_topic.send(key=pub.key.encode(),
                                                 value=threshold_message(pub.result, self.config, pub.version,
                                                                         inputs_through=pub.inputs_through))
                self._record(pub)
            self.metrics.recompute.observe(time.perf_counter() - t0)

    def _record(self, pub) -> None:
        r, m = pub.result, self.metrics
        m.version.labels(r.strategy, r.group).set(pub.version)
        m.published_at.labels(r.strategy, r.group).set(time.time())
        if pub.inputs_through is not None:
            m.inputs_age.labels(r.strategy, r.group).set(time.time() - pub.inputs_through)
        m.window_slates.labels(r.strategy, r.group).set(r.n)
        for t in r.thresholds:
            labels = (r.strategy, r.group, str(t.alpha))
            m.lam.labels(*labels).set(float("inf") if t.lam is None else t.lam)
            m.filter_all.labels(*labels).set(1 if t.filter_all else 0)
            m.risk_at_lambda.labels(*labels).set(float("nan") if t.risk_at_lambda is None else t.risk_at_lambda)
        self.latest[pub.key] = {"version": pub.version, "n": r.n, "group": r.group, "strategy": r.strategy,
                                **self._basis, "thresholds": [t.to_dict() for t in r.thresholds]}

    # -- health and lag -------------------------------------------------------
    def _held_inputs(self) -> set:
        """Input partitions this worker holds now: the assignor's, once aiokafka has them too.

        During a rebalance the assignor's new ones are not assigned in aiokafka yet, and
        highwater() of one raised AssertionError, outside any handler: the worker crashed
        on a second worker's join (found by scaling a group up).
        """
        tps = {tp for tp in self.app.assignor.assigned_actives() if tp.topic in self.names.inputs}
        return tps & self.app.consumer.assignment() if tps else tps

    async def _check_health(self) -> None:
        # (set aside on reading: when rebuilding an assigned partition, or on a user's next event)
        self.metrics.unreadable_users.set(sum(len(part.users.unreadable) for part in self.partitions.values()))
        consumer = self.app.consumer
        tps = self._held_inputs()
        try:
            # A round trip to the broker: fails (or times out) while it is unreachable.
            ends = await asyncio.wait_for(consumer.highwaters(*tps), timeout=5.0) if tps else {}
        except Exception:  # broker unreachable: keep state, report unhealthy, retry on the next tick
            self.healthy = False
            self.metrics.healthy.set(0)
            return
        if not self.app.rebalancing:
            self._release_caught_up(ends or {})
        # A rebalance may have taken partitions during the await: a series set for one after its
        # revoke (which removed it) stayed, frozen, for good (seen: 12,451 records of phantom lag
        # beside the new owner's 0, holding RiskgateConsumerLagGrowing's threshold up).
        held = self._held_inputs()
        exported: set[tuple[str, str]] = set()
        for tp in tps:
            if tp not in held:
                continue
            # Lag from the high watermark of the last fetch response: some brokers
            # (tansu) answer ListOffsets with stale numbers, fetches are exact.
            try:
                hw = consumer.highwater(tp)
            except AssertionError:  # (revoked during the await above)
                continue
            if hw is None:
                continue
            part = self.partitions.get(tp.partition)
            last = part.last_offsets.get(tp.topic) if part else None
            # (no record applied here yet: the offset Faust committed, else the consumer's fetch
            # position; 0 was phantom lag, nothing hid a worker stuck before its first record)
            position = last + 1 if last is not None else consumer._committed_offset.get(tp)
            if position is None and hw == 0:
                position = 0  # an empty partition: no lag wherever this worker starts
            if position is None:
                try:
                    position = await asyncio.wait_for(consumer.position(tp), timeout=1.0)
                except Exception:  # (not known yet, or the broker slow: next tick)
                    position = None
                if position is None or tp not in self._held_inputs():
                    continue  # (revoked while we asked)
            series = (self.names.base(tp.topic), str(tp.partition))
            self.metrics.lag.labels(*series).set(max(0, hw - position))
            exported.add(series)
        for series in self._lag_series - exported:
            _remove(self.metrics.lag, *series)
        self._lag_series = exported
        self.healthy = True
        self.metrics.healthy.set(1)
        self._export_monitors()

    def _export_monitors(self) -> None:
        """Copy the engines' in-memory monitors to Prometheus: counters by what each engine added since
        its last copy, gauges from the totals.

        Per engine, not from totals: an engine rebuilt after a rebalance starts from zero, and
        re-basing on totals lost what the partitions kept counted while the set changed, each
        counter differently (the realised-risk alert divides two of them).
        """
        m = self.metrics
        risk_sum: dict = defaultdict(float)
        risk_n: dict = defaultdict(int)
        p1_seen: dict = defaultdict(int)
        p1_flag: dict = defaultdict(int)
        for part in self.partitions.values():
            e = part.engine
            mon = e.monitors
            now = {m.replacements_shown: mon.replacements_shown, m.replacements_flagged: mon.replacements_flagged,
                   m.served_items: mon.served_items, m.violations: mon.violations, m.refused: e.calibrator.refused,
                   m.matured.labels("holdout"): e.matured_counts["holdout"],
                   m.matured.labels("applied"): e.matured_counts["applied"]}
            for b, n in mon.repeat_seen.items():
                now[m.property1_repeats.labels(str(b))] = n
                now[m.property1_reflagged.labels(str(b))] = mon.repeat_flagged[b]
            for a, n in mon.realised_slates.items():
                now[m.realised_slates.labels(str(a))] = n
                now[m.realised_risk_sum.labels(str(a))] = mon.realised_risk_sum[a]
                risk_n[a] += n
                risk_sum[a] += mon.realised_risk_sum[a]
            before = self._exported.get(e, {})
            for counter, value in now.items():
                delta = value - before.get(counter, 0)
                if delta > 0:  # (an engine's monitors only grow)
                    counter.inc(delta)
            self._exported[e] = now
            for b in mon.repeat_seen:
                p1_seen[b] += mon.repeat_seen[b]
                p1_flag[b] += mon.repeat_flagged[b]
        for a, n in risk_n.items():
            if n:
                m.realised_risk.labels(str(a)).set(risk_sum[a] / n)
        for b, n in p1_seen.items():
            if n:
                m.property1.labels(str(b)).set(p1_flag[b] / n)


def _remove(metric, *labels: str) -> None:
    """Drop one labelled series (a no-op when it was never set)."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class _Recent(OrderedDict):
    """A dict that forgets its least recently set keys beyond ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)


def _in_event_of(event) -> None:
    """Make ``event`` the current event *of this task* for Faust's table writes.

    Faust picks a table write's RocksDB partition and changelog partition from the
    current event. Only the context variable is set: ``Stream._set_current_event``
    would also overwrite the stream's own attribute, which ``take_events`` reads
    to pair buffered values with their events, and a write there while the
    buffer is filling loses one event and duplicates another.
    """
    _current_event.set(weakref.ref(event))


def _read_meta(p: int, raw: bytes | None) -> tuple[float | None, dict[str, float]]:
    """A partition's stored watermark and largest ts per topic; nothing if none or unreadable.

    Unreadable (a corrupt record: only workers write it) is logged and read as
    none: the watermark then starts again from the events read, which is what a
    new partition does; it only ever decides lateness and maturity, and slates
    mature once whatever it restarts from passes them.
    """
    if not raw:
        return None, {}
    try:
        meta = orjson.loads(raw)
        wm = meta.get("watermark")
        max_ts = meta.get("max_ts_by_topic") or {}
        if not (wm is None or isinstance(wm, (int, float))) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) for k, v in max_ts.items()):
            raise ValueError("wrong types")
        return (None if wm is None else float(wm)), {k: float(v) for k, v in max_ts.items()}
    except (ValueError, AttributeError) as e:  # (orjson.JSONDecodeError is a ValueError)
        log.error("partition-meta of partition %d unreadable (%s: %r); the watermark starts afresh", p,
                  type(e).__name__, raw[:60])
        return None, {}


class _IntTable:
    """A Faust table of raw bytes seen as str -> int (the aggregator's versions)."""

    def __init__(self, table):
        self.table = table

    def get(self, key: str, default=0) -> int:
        raw = self.table.get(key.encode())
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            # Versions only grow (rankers drop a version older than theirs): go on from the clock
            # in ms, as versions follow it anyway; the next publication writes it back.
            version = int(time.time() * 1000)
            log.error("threshold version of %s unreadable (%r); going on from %d", key, raw[:40], version)
            return version

    def __setitem__(self, key: str, value: int) -> None:
        self.table[key.encode()] = str(int(value)).encode()
