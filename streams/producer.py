"""Producing event streams to Kafka: the synthetic traffic of the demo, tests and benchmarks.

Events are (topic, value) pairs in the exact formats of SPEC §2 (as
:func:`calibration.synthetic.generate_events` yields them or
:func:`streams.synthetic_io.read_jsonl` reads them); each is sent keyed by its
``user_id``. Sends are pipelined (aiokafka batches them) and awaited in
groups, so a slow broker applies back-pressure instead of growing memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Iterable

import orjson

from .broker import describe_error

__all__ = ["produce_events", "ProduceInterrupted"]


class ProduceInterrupted(Exception):
    """The broker failed after the producer started; ``acknowledged`` events (the first ones) are on it.

    Events after those may be on the broker too: sending them again is safe, riskgate
    drops an event whose ``event_id`` its user has already applied.
    """

    def __init__(self, acknowledged: int, cause: BaseException):
        super().__init__(describe_error(cause))
        self.acknowledged, self.cause = acknowledged, cause


async def produce_events(
    bootstrap: str,
    events: Iterable[tuple[str, dict]],
    rate: float | None = None,
    in_flight: int = 5000,
    on_progress=None,
    producer_kwargs: dict | None = None,
    prefix: str = "",
) -> Counter:
    """Send every event; ``rate`` caps events per second (None: as fast as the broker takes them).

    Returns the count of events sent per topic. A broker that cannot be reached at
    the start raises aiokafka's error; one lost later, :class:`ProduceInterrupted`
    with how many of the first events are on the broker.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024,
                                **(producer_kwargs or {}))
    counts: Counter = Counter()
    pending: list[asyncio.Future] = []
    t0 = time.monotonic()
    sent = acknowledged = 0
    try:
        await producer.start()  # (inside: a failed start leaves its client open until stopped)
        try:
            for topic, value in events:
                key = str(value.get("user_id", "")).encode()
                pending.append(await producer.send(prefix + topic, orjson.dumps(value), key=key))
                counts[topic] += 1
                sent += 1
                if len(pending) >= in_flight:
                    await asyncio.gather(*pending)
                    pending.clear()
                    acknowledged = sent
                    if on_progress is not None:
                        on_progress(sent)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0.005:
                        await asyncio.sleep(ahead)
            if pending:
                await asyncio.gather(*pending)
        except KafkaError as e:
            raise ProduceInterrupted(acknowledged, e) from e
        if on_progress is not None:
            on_progress(sent)
    finally:
        await producer.stop()
    return counts
