"""Which dead letters ``riskgate dlq-replay`` sends back, and what it reads of a DLQ record (streams/dlq.py)."""

from __future__ import annotations

import orjson

from streams.dlq import parse, select
from streams.schemas import dead_letter
from streams.topics import Topics


def _letters(names: Topics):
    rows = [  # (source topic, reason, key, value) as the worker dead-letters them
        (names.prefix + "flags", "unreadable_state: the stored state of user 'u1' cannot be read (...)", b"u1", b'{"a":1}'),
        (names.prefix + "watch", "schema: watch_ms: must be >= 0", b"u2", b'{"b":2}'),
        (names.prefix + "flags", "unreadable_state: the stored state of user 'u2' cannot be read (...)", b"u2", b"\x00\xff"),
        (names.partials, "bad_snapshot: not JSON", b"0", b"{"),  # internal: never replayed
        (names.prefix + "impressions", "bad_json: unexpected end", None, None),  # no value: nothing to send
    ]
    return [parse(i, dead_letter(t, 0, 10 + i, v, reason, k)) for i, (t, reason, k, v) in enumerate(rows)]


def test_a_dead_letter_round_trips_with_its_original_bytes():
    names = Topics("acme.")
    letters = _letters(names)
    assert [(d.offset, d.topic, d.key) for d in letters[:3]] == [(0, "acme.flags", b"u1"), (1, "acme.watch", b"u2"),
                                                                  (2, "acme.flags", b"u2")]
    assert letters[2].value == b"\x00\xff" and letters[4].key is None and letters[4].value is None
    assert parse(7, b"not json") is None and parse(8, orjson.dumps({"reason": "x"})) is None and parse(9, None) is None


def test_replay_selects_input_events_by_reason_code_and_key_in_dlq_order():
    names = Topics("acme.")
    letters = _letters(names)
    offsets = lambda **kw: [d.offset for d in select(letters, names, **kw)]  # noqa: E731
    assert offsets() == [0, 1, 2]  # internal topics and value-less records never
    assert offsets(reasons=["unreadable_state"]) == [0, 2]
    assert offsets(reasons=["unreadable"]) == []  # a code, not a prefix of one
    assert offsets(reasons=["unreadable_state", "schema"], keys=[b"u2"]) == [1, 2]
    assert offsets(keys=[b"u1"]) == [0]
    assert [d.offset for d in select(letters, Topics(""))] == []  # another deployment's topics


def test_a_replay_that_lost_its_broker_names_the_first_letter_not_replayed(monkeypatch):
    """Going on from ``ReplayInterrupted.offset`` sends every selected letter once more at most, and skips none."""
    import asyncio

    import aiokafka
    import pytest
    from aiokafka.errors import KafkaTimeoutError

    from streams import dlq
    from streams.schemas import dead_letter

    names = Topics("acme.")
    raws = [(i, dead_letter(names.prefix + "watch", 0, i, b'{"n":%d}' % i, "schema: x", b"u%d" % i)) for i in range(6)]
    sent = []

    class Producer:
        def __init__(self, **kw):
            pass

        async def start(self):
            pass

        async def stop(self):
            pass

        async def send_and_wait(self, topic, value, key=None):
            if len(sent) == 3:
                raise KafkaTimeoutError("broker gone")
            sent.append(key)

    async def read(bootstrap, topic, start, timeout, kwargs):
        return [r for r in raws if r[0] >= start], len(raws)

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", Producer)
    monkeypatch.setattr(dlq, "_read", read)
    with pytest.raises(dlq.ReplayInterrupted) as raised:
        asyncio.run(dlq.replay_dead_letters("h:1", names, start=1))
    assert raised.value.offset == 4 and raised.value.replayed == {"watch schema": 3}
    assert "KafkaTimeoutError: broker gone" in str(raised.value)
    assert sent == [b"u1", b"u2", b"u3"]
