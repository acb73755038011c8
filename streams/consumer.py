"""Whole fetches of the input topics handed to one callback: Faust without its per-event stream.

Faust delivers every record through its conductor, a channel queue and a
stream iterator, with tasks created per record (``Service.wait_first``). On
this 2-core machine that costs ~75 µs of CPU per record even for an agent that
does nothing (13.6k records/s, against ~490k/s for a bare aiokafka consumer
reading the same topic): far more than riskgate's own work per event.

:class:`BatchingApp` keeps everything else of Faust — the consumer group and
its assignor (input and table partitions stay co-assigned), RocksDB tables and
their changelogs, recovery, offset commits, timers, agents for the internal
topics, the web server — and changes one thing: records of the topics named in
:attr:`BatchingApp.batch_topics` are collected per fetch and passed, as a list
of aiokafka ``ConsumerRecord`` (timestamps in ms), to :attr:`BatchingApp.on_batch`. Records of every
other topic take Faust's usual path, except a fetch of a changelog partition
under recovery, which is written to its table in one step
(:func:`streams.restore.restore_fetch`).

Offsets stay Faust's business: the callback *acks* records
(:meth:`BatchConsumer.ack_offsets`) once their effects are in the tables, and
Faust commits the highest contiguous acked offset after flushing the producer
(changelog records first), so a crash re-delivers exactly the records whose
effects may not be durable. That is at-least-once; folding is idempotent by
``event_id`` (see :mod:`streams.app`).

This overrides ``Consumer._drain_messages`` of faust-streaming's aiokafka
driver (pinned in ``requirements.lock``); the override keeps its read-offset
and gap bookkeeping line for line. The integration tests run it against a real
broker, so an incompatible Faust upgrade fails there.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Awaitable, Callable, Sequence

import faust
from faust.transport import by_url
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import Consumer as _AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as _AIOKafkaTransport
from faust.types.tuples import ack_lock

from .membership import GroupLease, membership_lost
from .restore import restore_fetch

__all__ = ["BatchingApp", "BatchConsumer", "BatchTransport", "MessageContext"]

BatchCallback = Callable[[Sequence], Awaitable[None]]


class MessageContext:
    """A stand-in for Faust's current event: table writes read ``.message.topic/.partition`` from it."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, message):
        self.message = message


class BatchConsumer(_AIOKafkaConsumer):
    """aiokafka consumer whose drain loop hands the batch topics' records over per fetch."""

    def ack_offsets(self, tp, offsets: Sequence[int]) -> int:
        """Ack records of one partition by offset, all in one step; returns how many were new.

        The bookkeeping ``Consumer.ack`` does for one message (these records were
        never tracked as Faust messages, so that is all there is), at a fraction
        of its per-message cost: a flush acks every record it covers.
        """
        with ack_lock:
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            new = [o for o in offsets if (committed is None or o >= committed) and o not in index]
            index.update(new)
            self._acked[tp].extend(new)
            self._n_acked += len(new)
            return len(new)

    def last_poll_timestamp(self, tp) -> int | None:
        """When (ms) the last fetch response covering ``tp`` was read: the age of :meth:`highwater`'s answer.

        aiokafka's, read across threads like ``highwater``; None until a fetch covered it.
        """
        return self._thread._ensure_consumer().last_poll_timestamp(tp)

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised against a real broker
        app = self.app
        batch_topics = app.batch_topics
        on_batch = app.on_batch
        max_batch = app.batch_max
        callback = self.callback
        to_message = self._to_message
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = app.topics.acks_enabled_for
        inbound = app.monitor.stream_inbound_time
        on_fetch = app.on_fetch
        on_restore = app.on_restore
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                # Faust's getmany with its bookkeeping done per partition, not per record: its
                # async generator step and a ConsumerMessage per record cost about as much as
                # riskgate's own work on a watch. Records of the batch topics stay aiokafka
                # ConsumerRecords (timestamps in ms); only other topics get Faust messages.
                waiting = monotonic()
                records, active = await self._wait_next_records(1.0)
                if on_fetch is not None:  # (idle when caught up; when behind, the time not spent working)
                    on_fetch(monotonic() - waiting, bool(records))
                await self.sleep(0)
                if self.should_stop:
                    break
                if records is None:
                    continue
                if not self.flow_active:
                    self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
                    try:
                        await self.perform_seek()
                    except Exception as ex:
                        self.log.warning(f"exception performing seek when flow not active {ex}")
                    continue
                generation_id = app.consumer_generation_id
                fetched: dict = {}  # batch topics' records, per partition
                others: list = []
                for tp, recs in records.items():
                    if not self.flow_active or app.consumer_generation_id != generation_id:
                        break
                    if not (active is None or tp in active or tp in self._buffered_partitions):
                        continue
                    if tp.topic in batch_topics and not app.inputs_open:
                        continue  # (read again: the recovery that opens them seeks to the committed offsets)
                    app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and recs and recs[0].offset < r_offset:
                        recs = [r for r in recs if r.offset >= r_offset]  # a re-fetch after a seek
                    if not recs:
                        continue
                    if acks_enabled_for(tp.topic) and (
                            (r_offset and recs[0].offset - r_offset > 1)
                            or recs[-1].offset - recs[0].offset != len(recs) - 1):
                        # offsets the broker skipped (compaction, transaction markers): Faust's gaps
                        prev = r_offset
                        for r in recs:
                            if prev and r.offset - prev > 1:
                                await self._add_gap(tp, prev + 1, r.offset)
                            prev = r.offset
                    if tp.topic in batch_topics:
                        fetched[tp] = recs
                        set_read_offset(tp, recs[-1].offset)
                    else:
                        others.append((tp, recs))
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                if fetched:
                    # Faust's round-robin over partitions and topics, as its streams would see them:
                    # records of a partition's topics interleave as they would one by one.
                    batch = [r for _, r in self.scheduler.iterate(fetched)]
                    for i in range(0, len(batch), max_batch):
                        if not (self.flow_active and app.inputs_open) or app.consumer_generation_id != generation_id:
                            # A rebalance while delivering: the new assignment seeks and re-reads. The
                            # generation changes only at the assignment; the flow stops at the revoke
                            # (BatchingApp._on_partitions_revoked), whose flush must be the last of these
                            # partitions' records here: chunks applied after it were lost (a rebuilt
                            # engine read a local store without them, and positions moved past them).
                            break
                        await self._deliver(on_batch, batch[i:i + max_batch], fetched, inbound)
                for tp, recs in others:
                    restored = restore_fetch(app, tp, recs)  # a changelog partition under recovery: in bulk
                    if restored is not None:
                        set_read_offset(tp, recs[-1].offset)
                        if on_restore is not None:
                            on_restore(tp, restored)
                        continue
                    for r in recs:
                        await self.wait_first(callback(to_message(tp, r)), self.suspend_flow.wait())
                        set_read_offset(tp, r.offset)
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    @staticmethod
    async def _deliver(on_batch: BatchCallback, batch: list, tps, inbound: dict) -> None:
        now = monotonic()
        for tp in tps:  # Faust's stall detector reads when each partition last reached a stream
            inbound[tp] = now
        await on_batch(batch)


class BatchTransport(_AIOKafkaTransport):
    Consumer = BatchConsumer


class BatchingApp(faust.App):
    """A Faust app whose ``batch_topics`` bypass streams; see the module docstring.

    Set :attr:`batch_topics` (topic names), :attr:`on_batch` (an async callable
    taking a list of messages), :attr:`batch_max` (most records per call) and,
    optionally, :attr:`before_revoke` (awaited at the start of a rebalance, while
    every table partition is still writable) and :attr:`on_fetch` (told how long
    each wait for records took) and :attr:`on_restore`.
    """

    batch_topics: frozenset = frozenset()
    batch_max: int = 2000
    on_batch: BatchCallback | None = None
    #: Awaited before a revoke and at a stop: flush what the batch callback holds. False: it could
    #: not (its lease ran out while it waited), so a stop is not clean.
    before_revoke: Callable[[], Awaitable[bool | None]] | None = None
    #: Called after each wait for a fetch: (seconds waited, whether it brought records).
    on_fetch: Callable[[float, bool], None] | None = None
    #: Called after a fetch of a changelog partition was restored in bulk (streams.restore): (tp, records written).
    on_restore: Callable[[object, int], None] | None = None
    #: Awaited instead of :attr:`before_revoke` when the partitions were lost rather than revoked (the
    #: broker had dropped this member, or its lease ran out): drop, without writing, what is unflushed.
    on_lost: Callable[[], Awaitable[None]] | None = None
    _lease: GroupLease | None = None
    #: Whether fetched input records may reach :attr:`on_batch`: closed at each revoke, opened when
    #: the recovery of the assignment that follows it completes. Faust's flow flag is not enough: a
    #: recovery that completed after a revoke (its assignment already being replaced) resumed the
    #: flow, and records applied then, between riskgate's pre-revoke flush and the next assignment,
    #: were lost (found by a crash audit: 291 first watches and an impression of 11 users).
    inputs_open: bool = False
    #: Between a revoke and the assignment that follows it (Faust's `rebalancing` is not: a recovery of a
    #: revoked assignment, completing late, ends it early).
    awaiting_assignment: bool = True
    _recovery_watched: object | None = None

    @property
    def lease(self) -> GroupLease:
        """This worker's lease on the group (:mod:`streams.membership`): write only while it is fresh."""
        if self._lease is None:
            self._lease = GroupLease(self.conf.broker_session_timeout,
                                     rebalance_timeout=self.conf.broker_rebalance_timeout)
        return self._lease

    def group_coordinator(self):
        """aiokafka's group coordinator of the running consumer, None before it runs."""
        try:
            return self.consumer._thread._ensure_consumer()._coordinator
        except Exception:  # not started, or stopped
            return None

    def _new_transport(self):
        url = self.conf.broker_consumer[0]
        if by_url(url) is not _AIOKafkaTransport:
            raise ValueError(f"riskgate needs the aiokafka transport (kafka://), got {url}")
        return BatchTransport(self.conf.broker_consumer, self)

    #: Set once a stop has flushed the batch callback's state and the producer.
    stopped_cleanly: bool = False

    async def on_stop(self) -> None:
        # A stop flushes what the batch callback holds, like a rebalance, then
        # Faust stops the consumer and flushes the producer.
        flushed = True
        self.inputs_open = False  # (the stop's flush is the last: what is fetched after it is read again)
        if self.before_revoke is not None:
            if not self.lease.fresh():
                # Partitions this worker may no longer own: its writes could land after the new
                # owner's. Not flushed, so not a clean stop: the next start restores from the changelogs.
                self.log.warning("not flushed before stopping: no heartbeat answered for %.1f s (half the session "
                                 "timeout is %.1f s), so the partitions may be another worker's",
                                 self.lease.age(), self.lease.term)
                flushed = False
            else:
                try:
                    # (False: the lease ran out while the flush waited for one in progress)
                    flushed = await self.before_revoke() is not False
                except Exception:  # the broker may be gone: those records are re-read after a restart
                    self.log.exception("could not flush before stopping")
                    flushed = False
        await super().on_stop()
        self.stopped_cleanly = flushed

    async def _on_partitions_revoked(self, revoked) -> None:
        # Before Faust revokes table partitions and commits: whatever the batch
        # callback holds in memory is written and acked now, so the commit
        # that follows covers it and no record is read twice. The flow stops
        # first (Faust stops it only after this), so that no chunk of a fetch is
        # delivered after that flush (_drain_messages checks it before each).
        self.inputs_open = False
        self.awaiting_assignment = True
        if self.before_revoke is not None and not self.should_stop:
            self.consumer.stop_flow()
            lost = membership_lost(self.group_coordinator())
            if revoked and (lost or not self.lease.fresh()):
                # The broker dropped this member (a stall past the session timeout), or may have:
                # another worker owns these partitions and went on from their committed offsets.
                # What is unflushed here is dropped, not written after that worker's records.
                self.log.warning("partitions %s: what was not flushed is dropped (no heartbeat answered for %.1f s; "
                                 "the broker %s this member)", "lost" if lost else "maybe lost",
                                 self.lease.age(), "no longer knows" if lost else "may have dropped")
                if self.on_lost is not None:
                    await self.on_lost()
            else:
                await self.before_revoke()
        await super()._on_partitions_revoked(revoked)

    async def _on_partitions_assigned(self, assigned, generation_id: int = 0) -> None:
        # An assignment proves membership; from here each answered heartbeat renews the lease.
        self.lease.renew()
        coordinator = self.group_coordinator()
        if coordinator is None:
            self.log.error("no group coordinator to watch: writes of a worker stalled past its session are not fenced")
        self.lease.watch(coordinator)
        self.awaiting_assignment = False
        self._open_inputs_after_recovery()
        await super()._on_partitions_assigned(assigned, generation_id)

    def _open_inputs_after_recovery(self) -> None:
        """Open :attr:`inputs_open` when a recovery of the current assignment completes (wraps Faust's, once)."""
        recovery = self.tables.recovery
        if recovery is self._recovery_watched:
            return
        completed = recovery.on_recovery_completed

        async def on_recovery_completed(generation_id: int = 0) -> None:
            # Opened before Faust resumes the input partitions and seeks them to their committed
            # offsets: what is fetched from there on must be delivered (skipped records are read
            # again only after a seek). Not for a recovery of an assignment revoked since: its
            # records are skipped, and the next assignment's recovery seeks back to them.
            if not self.awaiting_assignment and generation_id == self.consumer_generation_id:
                self.inputs_open = True
            await completed(generation_id)

        recovery.on_recovery_completed = on_recovery_completed
        self._recovery_watched = recovery
