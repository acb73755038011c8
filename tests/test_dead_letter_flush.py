"""A malformed input record's dead letter goes out with its partition's flush, before the record is acked.

The worker's own batch path and flush (no broker): ``send_records`` and the
consumer's acks are recorded in one log, so the order is what is checked.
Sending the dead letter after the ack would lose it in a crash between the
two (the record is committed, never read again); not sending it loses it
outright.
"""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest

import streams.app as app_module
from streams.app import RiskgateApp
from streams.settings import load_settings

from .fakes import FakeConsumer, fake_send_records


class _Record:
    """What the worker reads of an aiokafka ConsumerRecord."""

    def __init__(self, topic, partition, offset, key, value):
        self.topic, self.partition, self.offset, self.key, self.value, self.timestamp = (
            topic, partition, offset, key, value, 0)


@pytest.fixture
def worker(tmp_path, monkeypatch):
    log = []

    monkeypatch.setattr(app_module, "send_records", fake_send_records(lambda *call: log.append(("send", *call))))
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=2))
    rg.app._consumer = FakeConsumer(log)
    return rg, log


def _watch(event_id: str, duration_ms: int) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": "u", "item_id": "i", "watch_ms": 1,
                         "duration_ms": duration_ms, "ts": 1_700_000_000.0})


def test_a_dead_letter_is_sent_with_its_partition_s_flush_before_the_ack(worker):
    rg, log = worker
    watch = rg.names.prefix + "watch"
    bad, bad_too = _watch("e1", -5), b"{not json"
    records = [_Record(watch, 1, 0, b"u", bad), _Record(watch, 1, 1, b"u", _watch("e2", 5)),
               _Record(watch, 0, 0, b"v", bad_too)]
    asyncio.run(rg._on_batch(records))
    asyncio.run(rg._flush_all())

    dlq = [(i, entry) for i, entry in enumerate(log) if entry[0] == "send" and entry[1] == rg.names.dlq]
    acks = {(entry[2]): i for i, entry in enumerate(log) if entry[0] == "ack"}
    assert acks.keys() == {0, 1}
    # one send per partition's flush, each before that partition's ack, each record whole and once
    assert len(dlq) == 2
    sent = {}
    for i, (_, _, partition, groups) in dlq:
        assert partition == 0  # (the DLQ topic has one partition)
        for (key, value), in groups:
            letter = orjson.loads(value)
            sent[(letter["partition"], letter["offset"])] = (i, key, letter)
    assert sent.keys() == {(1, 0), (0, 0)}
    i, key, letter = sent[(1, 0)]
    assert i < acks[1] and key == b"u" and base64.b64decode(letter["value"]) == bad
    assert letter["reason"].startswith("schema: duration_ms")
    i, key, letter = sent[(0, 0)]
    assert i < acks[0] and key == b"v" and base64.b64decode(letter["value"]) == bad_too
    assert log[acks[1]][3] == [0, 1]  # the dead-lettered record is acked with the good one

    # nothing is sent twice: the partition's next flush has no dead letters left
    log.clear()
    asyncio.run(rg._on_batch([_Record(watch, 1, 2, b"u", _watch("e3", 5))]))
    asyncio.run(rg._flush_all())
    assert [entry[:3] for entry in log if entry[0] == "ack"] == [("ack", watch, 1)]
    assert not any(entry[0] == "send" and entry[1] == rg.names.dlq for entry in log)


def test_dead_letters_of_a_revoked_partition_are_left_to_its_next_owner(worker):
    """The revoke's flush failed (broker gone): the records are not acked, so the next owner re-reads them."""
    from faust.types import TP

    rg, log = worker
    watch = rg.names.prefix + "watch"
    asyncio.run(rg._on_batch([_Record(watch, 1, 0, b"u", _watch("e1", -5)),
                              _Record(watch, 0, 0, b"v", _watch("e2", -5))]))
    asyncio.run(rg._on_revoked(rg.app, {TP(watch, 1)}))
    asyncio.run(rg._on_assigned(rg.app, {TP(watch, 0)}))
    assert set(rg._dead) == {0}  # partition 1's dead letter is not sent by this worker later
    asyncio.run(rg._flush_all())
    letters = [orjson.loads(v) for e in log if e[0] == "send" and e[1] == rg.names.dlq for (_, v), in e[3]]
    assert [(x["partition"], x["offset"]) for x in letters] == [(0, 0)]
