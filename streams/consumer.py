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
of ``ConsumerMessage``, to :attr:`BatchingApp.on_batch`. Records of every
other topic take Faust's usual path.

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

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised against a real broker
        app = self.app
        batch_topics = app.batch_topics
        on_batch = app.on_batch
        max_batch = app.batch_max
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = app.topics.acks_enabled_for
        inbound = app.monitor.stream_inbound_time
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if self.should_stop:
                    break
                batch: list = []
                async for tp, message in ait:
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is not None and offset < r_offset:
                        continue  # already read (a re-fetch after a seek): Faust drops these too
                    gap = offset - (r_offset or 0)
                    if gap > 1 and r_offset and acks_enabled_for(message.topic):
                        await self._add_gap(tp, r_offset + 1, offset)
                    if commit_every is not None and self._n_acked >= commit_every:
                        self._n_acked = 0
                        await self.commit()
                    if tp.topic in batch_topics:
                        batch.append(message)
                        set_read_offset(tp, offset)
                        if len(batch) >= max_batch:
                            await self._deliver(on_batch, batch, inbound)
                            batch = []
                        continue
                    if batch:  # keep the order of records relative to other topics' callbacks
                        await self._deliver(on_batch, batch, inbound)
                        batch = []
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if batch:
                    await self._deliver(on_batch, batch, inbound)
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
    async def _deliver(on_batch: BatchCallback, batch: list, inbound: dict) -> None:
        now = monotonic()
        for m in batch:  # Faust's stall detector reads when each partition last reached a stream
            inbound[m.tp] = now
        await on_batch(batch)


class BatchTransport(_AIOKafkaTransport):
    Consumer = BatchConsumer


class BatchingApp(faust.App):
    """A Faust app whose ``batch_topics`` bypass streams; see the module docstring.

    Set :attr:`batch_topics` (topic names), :attr:`on_batch` (an async callable
    taking a list of messages), :attr:`batch_max` (most records per call) and,
    optionally, :attr:`before_revoke` (awaited at the start of a rebalance, while
    every table partition is still writable).
    """

    batch_topics: frozenset = frozenset()
    batch_max: int = 2000
    on_batch: BatchCallback | None = None
    before_revoke: Callable[[], Awaitable[None]] | None = None

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
        if self.before_revoke is not None:
            try:
                await self.before_revoke()
            except Exception:  # the broker may be gone: those records are re-read after a restart
                self.log.exception("could not flush before stopping")
                flushed = False
        await super().on_stop()
        self.stopped_cleanly = flushed

    async def _on_partitions_revoked(self, revoked) -> None:
        # Before Faust revokes table partitions and commits: whatever the batch
        # callback holds in memory is written and acked now, so the commit
        # that follows covers it and no record is read twice.
        if self.before_revoke is not None and not self.should_stop:
            await self.before_revoke()
        await super()._on_partitions_revoked(revoked)
