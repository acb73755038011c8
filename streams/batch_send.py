"""Many records to one topic partition as a few produce batches, each group of records whole.

Faust's ``send_soon`` costs ~30–40 µs a record here (a FutureMessage, the
producer buffer, aiokafka's per-message futures). A flush writes thousands of
records (changelog entries, safe pools), so it builds aiokafka record batches
itself (~3 µs a record) and queues them on the very producer Faust uses. Faust
flushes that producer before it commits offsets, so records queued here before
the acks are on the broker before the commit, as with ``send_soon``.

**Groups are atomic.** Records come in groups (one user's history entries and
core) and a group never straddles two batches. Kafka appends a record batch to
the log whole or not at all, so a crash in the middle of a flush leaves every
user either wholly written or not at all: the core's remembered event ids then
always agree with the entries, and a replayed event is skipped exactly when
its effects are there. (A group larger than a batch is split; that takes a
user with hundreds of kB of changes in one flush.)

**Fence.** The local tansu broker answers ListOffsets with the last batch's
base offset + 1, so recovery would stop before the rest of a multi-record last
batch. With ``fence`` a one-record batch (key ``fence``) follows the last one,
so the partition's end offset is exact there as well.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable, Sequence

from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import TopicPartition

__all__ = ["send_records", "BATCH_BYTES", "FENCE_KEY"]

#: Size of the record batches built here (below Kafka's default 1 MB message limit).
BATCH_BYTES = 512 * 1024
#: Key of the fence record (NUL-prefixed: no user id can collide with it).
FENCE_KEY = b"\x00fence"

Record = tuple[bytes | None, bytes | None]


def _payload(group: Sequence[Record]) -> int:
    """Bytes of the group's keys and values."""
    n = 0
    for k, v in group:  # (a plain loop: a generator costs more than the sums for 1-2 records)
        if k:
            n += len(k)
        if v:
            n += len(v)
    return n


async def send_records(app, topic: str, partition: int, groups: Iterable[Sequence[Record]],
                       on_sent: Callable[[int], None] | None = None, fence: bool = False,
                       before_send: Callable[[], Awaitable[None]] | None = None) -> tuple[int, int]:
    """Queue groups of ``(key, value)`` records for ``topic``/``partition`` in order.

    Returns the records sent and the bytes of their keys and values (the fence not counted).

    ``on_sent(last_offset)`` is called once the last batch is on the broker;
    ``before_send()`` is awaited before each batch is queued (it may raise to stop there).
    """
    producer = app.producer._ensure_producer()  # faust's aiokafka producer
    new = lambda: BatchBuilder(BATCH_BYTES, 0, is_transactional=False)  # noqa: E731 (0: no compression)
    batch = new()
    last = None
    count = n = payload = 0

    tp = TopicPartition(topic, partition)

    async def send(b):
        nonlocal last, count
        if before_send is not None:
            # aiokafka queues one batch a partition: send_batch waits for the one before it
            # to go out, then appends, with no word in between. Waited for here, so that the
            # check is the last thing before the append (found by a review: a slow broker let
            # a batch in after the lease had run out while send_batch waited).
            queued = producer._message_accumulator._batches
            while True:
                await before_send()
                pending = queued.get(tp)
                if not pending:
                    break
                await pending[-1].wait_drain(timeout=producer._request_timeout_ms / 1000)
        last, count = await producer.send_batch(b, topic, partition=partition), b.record_count()

    for group in groups:
        size = _payload(group)
        payload += size
        # (24: a record's framing, generously; most groups are 1-2 records)
        if batch.record_count() and batch.size() + size + 24 * len(group) > BATCH_BYTES:
            await send(batch)  # this group starts a batch of its own
            batch = new()
        for key, value in group:
            if batch.append(key=key, value=value, timestamp=None) is None:
                await send(batch)  # only a group larger than a whole batch gets here
                batch = new()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a producer batch")
            n += 1
    if batch.record_count():
        await send(batch)
        if fence and count > 1:
            b = new()
            b.append(key=FENCE_KEY, value=str(partition).encode(), timestamp=None)
            await send(b)
    if last is not None and on_sent is not None:
        last.add_done_callback(
            lambda f, c=count: None if f.cancelled() or f.exception() else on_sent(f.result().offset + c - 1))
    return n, payload
