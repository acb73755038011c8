"""Replaying dead letters: ``riskgate dlq-replay``.

Every record of ``riskgate-dlq`` keeps the reason, where the event came from
and its original key and value (base64; :func:`streams.schemas.dead_letter`).
Once the cause is fixed — a producer corrected, a user's unreadable state
repaired or the riskgate that wrote it rolled forward — the operator replays
the records: each original key and value is produced again, unchanged and in
DLQ order, to the input topic it came from. An event applied already is
mostly harmless again (impressions, flags and constraints are de-duplicated
by the user's recent event ids, watches are idempotent), but one that is
still bad is dead-lettered again: each replay starts from the DLQ offset the
last one reached (``--from-offset``; printed as ``next_offset``).
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import orjson

from .broker import describe_error
from .topics import Topics

__all__ = ["DeadLetter", "parse", "select", "replay_dead_letters", "ReplayInterrupted"]


@dataclass(frozen=True)
class DeadLetter:
    """One ``riskgate-dlq`` record, decoded."""

    offset: int
    reason: str
    topic: str  # the (prefixed) topic it was read from
    key: bytes | None
    value: bytes | None

    @property
    def code(self) -> str:
        """The reason's code: the part before the first ``:`` (``unreadable_state``, ``schema``, ...)."""
        return self.reason.split(":", 1)[0]


def parse(offset: int, raw: bytes | None) -> DeadLetter | None:
    """The dead letter in a DLQ record's value, None if the value is not one (nothing to replay)."""
    try:
        d = orjson.loads(raw)
        return DeadLetter(offset, str(d["reason"]), str(d["topic"]),
                          None if d.get("key") is None else base64.b64decode(d["key"]),
                          None if d.get("value") is None else base64.b64decode(d["value"]))
    except (ValueError, TypeError, KeyError):  # (binascii.Error is a ValueError)
        return None


def select(letters: Iterable[DeadLetter], names: Topics, reasons: Iterable[str] = (),
           keys: Iterable[bytes] = ()) -> Iterator[DeadLetter]:
    """The dead letters to replay: from an input topic, with a reason code in ``reasons`` and a key in ``keys``.

    Empty ``reasons`` or ``keys``: any. A reason is matched by its code, the
    part before the first ``:`` (``unreadable_state``, ``schema``, ...).
    """
    codes, wanted = set(reasons), set(keys)
    inputs = set(names.inputs)
    for d in letters:
        if d.topic not in inputs or d.value is None:
            continue  # (internal topics' records, e.g. bad_snapshot, are not events)
        if codes and d.code not in codes:
            continue
        if wanted and d.key not in wanted:
            continue
        yield d


async def _read(bootstrap: str, topic: str, start: int, timeout: float, client_kwargs: dict) -> tuple[list, int]:
    """Every record of the one-partition ``topic`` from offset ``start`` to its end now: (records, end offset)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, **client_kwargs)
    try:
        await c.start()
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, start)
        out = []
        deadline = time.monotonic() + timeout
        while True:
            batch = await c.getmany(tp, timeout_ms=200, max_records=10_000)
            out.extend((m.offset, m.value) for m in batch.get(tp, ()))
            end = c.highwater(tp)  # from fetch responses (some brokers answer ListOffsets stale)
            if end is not None and await c.position(tp) >= end:
                return [r for r in out if r[0] < end], end
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end within {timeout} s")
    finally:
        await c.stop()


class ReplayInterrupted(Exception):
    """The broker failed during a replay: every selected letter before DLQ offset ``offset`` was replayed."""

    def __init__(self, offset: int, replayed: dict, cause: BaseException):
        super().__init__(describe_error(cause))
        self.offset, self.replayed, self.cause = offset, replayed, cause


async def replay_dead_letters(bootstrap: str, names: Topics, *, reasons: Iterable[str] = (),
                              keys: Iterable[bytes] = (), start: int = 0, dry_run: bool = False,
                              timeout: float = 60.0, client_kwargs: dict | None = None) -> dict:
    """Produce the selected dead letters from DLQ offset ``start`` on to their input topics, in order.

    Returns what was read and replayed, per topic and reason code, and
    ``next_offset``: where the next replay should start.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    kwargs = client_kwargs or {}
    records, end = await _read(bootstrap, names.dlq, start, timeout, kwargs)
    letters = [d for offset, raw in records if (d := parse(offset, raw)) is not None]
    chosen = list(select(letters, names, reasons, keys))
    replayed: Counter = Counter()
    if chosen and not dry_run:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kwargs)
        try:
            await producer.start()
            for d in chosen:  # one at a time, acknowledged: DLQ order is kept, retries or not
                try:
                    await producer.send_and_wait(d.topic, d.value, key=d.key)
                except KafkaError as e:  # (lost after the start: say where to go on from)
                    raise ReplayInterrupted(d.offset, dict(replayed), e) from e
                replayed[f"{names.base(d.topic)} {d.code}"] += 1
        finally:
            await producer.stop()
    else:
        replayed.update(f"{names.base(d.topic)} {d.code}" for d in chosen)
    return {"read": len(records), "unparsable": len(records) - len(letters), "selected": len(chosen),
            "would_replay" if dry_run else "replayed": dict(replayed), "next_offset": end}
