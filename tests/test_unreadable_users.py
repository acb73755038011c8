"""A user whose stored state cannot be read, through the worker's own batch path (no broker).

``streams.state.UnreadableUser`` sets such a user aside; the worker must then
dead-letter that user's events with the reason (they are kept, to be replayed
once the state is repaired or the newer riskgate that wrote it is back), go on
with every other user, count them, and still honour a forget.
"""

from __future__ import annotations

import asyncio
import base64
import collections

import orjson

from streams.app import RiskgateApp
from streams.schemas import decode_event
from streams.settings import load_settings
from streams.state import partition_db

NEWER_CORE = b"\x93\x63\x90\x00"  # msgpack [99, [], 0]: a core in a format this riskgate does not know


class _Record:
    def __init__(self, topic, offset, key, value):
        self.topic, self.partition, self.offset, self.key, self.value, self.timestamp = topic, 0, offset, key, value, 0


class _Consumer:
    """Faust's consumer as the batch path asks it: end offsets (None: unknown, so every topic holds the watermark)."""

    _committed_offset: dict = {}

    def __init__(self, ends: dict | None = None):
        self.ends = ends

    def highwater(self, tp):
        return None if self.ends is None else self.ends.get(tp.topic, 0)


def test_events_of_an_unreadable_user_are_dead_lettered_and_the_rest_go_on(tmp_path):
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    partition_db(rg.users_table, 0)[b"bad"] = NEWER_CORE  # as a restore from the changelog would leave it
    part = rg._partition(0)  # (rebuilds the windows from the stored users: the bad one is set aside)
    assert part.users.unreadable.keys() == {"bad"}
    rg.app._consumer = _Consumer()
    sent = rg._dead[0]  # dead letters of partition 0, sent by its next flush (tests/test_dead_letter_flush.py)
    full = {rg.names.base(t): t for t in rg.names.inputs}

    def run(*events):
        items = []
        for offset, (topic, value) in enumerate(events):
            raw = orjson.dumps(value)
            msg = _Record(full[topic], offset, value["user_id"].encode(), raw)
            items.append((msg, topic, decode_event(topic, raw, msg.key)))
        rg._run_partition(0, items)
        return items

    imp = {"event_id": "e1", "user_id": "bad", "slate_id": "s1", "ts": 1_700_000_000.0, "k": 1,
           "policy_applied": False, "items": [{"item_id": "i1", "score": 0.5}]}
    items = run(("impressions", imp), ("watch", {"event_id": "e2", "user_id": "good", "item_id": "i2",
                                                 "watch_ms": 9000, "duration_ms": 10000, "ts": 1_700_000_001.0}))
    assert len(sent) == 1
    key, value = sent[0]
    record = orjson.loads(value)
    assert key == b"bad" and record["reason"].startswith("unreadable_state: ") and "'bad'" in record["reason"]
    assert base64.b64decode(record["value"]) == items[0][0].value  # the original bytes, to replay after a repair
    assert part.counts == collections.Counter({("impressions", "unreadable_state"): 1, ("watch", "ok"): 1})
    assert part.users.get("good").history["i2"].watched
    asyncio.run(rg._check_health())
    assert rg.metrics.unreadable_users._value.get() == 1

    run(("forget", {"event_id": "e3", "user_id": "bad", "ts": 1_700_000_002.0}))  # erasure needs no decoding
    assert len(sent) == 1 and part.users.unreadable == {}
    _, deleted, groups = part.users.flush()
    assert deleted == {"bad"} and (b"bad", None) in [r for group in groups for r in group]
    asyncio.run(rg._check_health())
    assert rg.metrics.unreadable_users._value.get() == 0


def test_a_pending_slate_of_an_unreadable_user_stays_pending_and_the_others_mature(tmp_path):
    """Only a history entry is bad: the core was read when the partition was assigned, so its slate is due.

    When another user's event moves the watermark past it, the engine must not
    fail on that user (it is not the event's) nor label the slate from a history
    it cannot read: the slate stays pending, the others mature.
    """
    from calibration.engine import Engine
    from streams.state import SEP, encode_core, user_records

    settings = load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                             label_window=10.0, allowed_lateness=1.0)
    rg = RiskgateApp(settings)
    eng = Engine(rg.config)  # the users as a first worker left them: a slate each, awaiting its labels
    for uid, ts in (("bad", 100.0), ("ok", 101.0)):
        eng.process(decode_event("impressions", orjson.dumps(
            {"event_id": f"{uid}-1", "user_id": uid, "slate_id": f"{uid}-s", "ts": ts, "k": 1,
             "policy_applied": False, "items": [{"item_id": f"{uid}-i", "score": 0.5}]}), uid.encode()), "impressions")
    db = partition_db(rg.users_table, 0)
    for uid, state in eng.users.items():
        db[uid.encode()] = encode_core(state)
        for suffix, value in user_records(state):
            db[uid.encode() + SEP + suffix] = value
    db[b"bad" + SEP + b"bad-i"] = b"\xc1"  # not msgpack
    part = rg._partition(0)
    assert part.engine.pending == 2 and part.users.unreadable == {}  # (cores read: the entry is not)
    rg.app._consumer = _Consumer({rg.names.prefix + "watch": 1})  # the tick below is the last record of any topic

    raw = orjson.dumps({"event_id": "t-1", "user_id": "tick", "item_id": "x", "watch_ms": 1, "duration_ms": 2,
                        "ts": 200.0})
    tick = _Record(rg.names.prefix + "watch", 0, b"tick", raw)
    rg._run_partition(0, [(tick, "watch", decode_event("watch", raw, b"tick"))])
    assert part.engine.matured_counts["holdout"] == 1  # "ok"'s slate
    assert part.users.get("ok").pending == [] and len(part.users.get("ok").recent) == 1
    assert part.users.unreadable.keys() == {"bad"}
    assert part.counts == collections.Counter({("watch", "ok"): 1})


def test_an_unreadable_partition_meta_record_starts_the_watermark_afresh():
    from streams.app import _read_meta

    good = orjson.dumps({"watermark": 1_700_000_000.5, "max_ts_by_topic": {"watch": 1_700_000_010, "flags": 3.5}})
    assert _read_meta(0, good) == (1_700_000_000.5, {"watch": 1_700_000_010.0, "flags": 3.5})
    assert _read_meta(0, orjson.dumps({"watermark": None, "max_ts_by_topic": None})) == (None, {})
    assert _read_meta(0, None) == (None, {})
    for bad in (b"{not json", b"[1, 2]", orjson.dumps({"watermark": "soon"}),
                orjson.dumps({"watermark": 1.0, "max_ts_by_topic": {"watch": "x"}}),
                orjson.dumps({"watermark": 1.0, "max_ts_by_topic": [1]})):
        assert _read_meta(0, bad) == (None, {}), bad


def test_a_batch_that_raised_still_leaves_its_partition_a_message_to_flush_under(tmp_path):
    """An event that raised (a user broken in a way the decoder did not catch) ends the worker; its stop-time
    flush then needs a record of the partition for the table writes' context: MessageContext(None) raised
    AttributeError and aborted the flush of every partition."""
    import pytest

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    part = rg._partition(0)
    rg.app._consumer = _Consumer()
    raw = orjson.dumps({"event_id": "e1", "user_id": "u", "item_id": "i", "watch_ms": 1, "duration_ms": 2,
                        "ts": 1_700_000_000.0})
    msg = _Record(rg.names.inputs[1], 0, b"u", raw)

    def broken(*args):
        raise ValueError("counts must be non-negative")

    part.engine.process = broken
    with pytest.raises(ValueError):
        rg._run_partition(0, [(msg, "watch", decode_event("watch", raw, b"u"))])
    assert part.last_message is msg and part.unacked == [msg]


def test_a_user_whose_state_breaks_while_applied_is_set_aside_and_the_partition_goes_on(tmp_path, caplog):
    """A user that decodes but breaks an invariant (a bug, or a record a bug wrote) raised out of the batch:
    the worker died, and so did every worker that took the partition over, on the same user."""
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   label_window=10.0, allowed_lateness=0.0))
    part = rg._partition(0)
    ends: dict = {}  # each topic's end: every record sent is read, so no topic holds the watermark back
    rg.app._consumer = _Consumer(ends)
    full = {rg.names.base(t): t for t in rg.names.inputs}
    offsets = collections.Counter()

    def run(*events):
        items = []
        for topic, value in events:
            raw = orjson.dumps(value)
            msg = _Record(full[topic], offsets[topic], value["user_id"].encode(), raw)
            offsets[topic] += 1
            ends[full[topic]] = offsets[topic]
            items.append((msg, topic, decode_event(topic, raw, msg.key)))
        rg._run_partition(0, items)

    def imp(uid, ts):
        return ("impressions", {"event_id": f"{uid}-{ts}", "user_id": uid, "slate_id": f"{uid}-s{ts}", "ts": ts,
                                "k": 1, "policy_applied": False, "items": [{"item_id": "i1", "score": 0.5}]})

    def watch(uid, ts):
        return ("watch", {"event_id": f"{uid}-w{ts}", "user_id": uid, "item_id": "i1", "watch_ms": 9000,
                          "duration_ms": 10000, "ts": ts})

    run(imp("broken", 100.0), imp("late-breaker", 100.0), imp("good", 100.0))

    from unittest import mock

    from calibration.user_state import UserState

    def breaking(method, who):
        def run_it(self, *args, **kwargs):
            if self.user_id == who:
                raise ValueError("counts must be non-negative")
            return method(self, *args, **kwargs)
        return run_it

    with mock.patch.object(UserState, "on_watch", breaking(UserState.on_watch, "broken")), \
            mock.patch.object(UserState, "mature", breaking(UserState.mature, "late-breaker")):
        # broken's next event breaks it; late-breaker's slate breaks it when it matures (ts 200)
        run(watch("broken", 101.0), watch("good", 102.0), imp("good", 200.0))
    letters = [orjson.loads(v) for _, v in rg._dead[0]]
    assert [(r["reason"].split(":")[0], "counts must be non-negative" in r["reason"]) for r in letters] == [
        ("unreadable_state", True)]
    assert set(part.users.unreadable) == {"broken", "late-breaker"}
    assert part.counts[("watch", "unreadable_state")] == 1 and part.counts[("watch", "ok")] == 1
    assert part.engine.monitors and part.users.get("good").history["i1"].watched
    run(watch("broken", 201.0))  # and its later events follow, without reading it again
    assert len(rg._dead[0]) == 2


def test_a_user_set_aside_with_changes_not_synced_locally_holds_the_local_offset_back(tmp_path):
    """Its flushed changes are dropped unwritten from the local database, so a restart on the same directory
    must read the changelog from before them (the offset that lets it skip the changelog does not move)."""
    from calibration.events import Watch

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    users = rg._partition(0).users
    engine = rg._partition(0).engine
    offset_key = rg.users_table.data.offset_key
    db = partition_db(rg.users_table, 0)
    for n, uid in enumerate(("a", "b")):
        engine.process(Watch(f"w{n}", uid, "i", 1.0, 2.0, 10.0 + n), "watch", n)
    users.flush()
    users.note_sent(7)
    users.sync()
    assert db[offset_key] == b"7"
    engine.process(Watch("w9", "a", "j", 1.0, 2.0, 20.0), "watch", 9)
    users.flush()
    users.note_sent(8)
    users.set_aside("a", "ValueError: broken")
    users.sync()
    assert db[offset_key] == b"7"  # a's change at 8 is not in the local database


def test_a_forget_of_a_user_set_aside_at_run_time_tombstones_its_keys_flushed_since_the_last_sync(tmp_path):
    """set_aside dropped the user's record of keys flushed but not synced locally, which is where a forget
    finds them: an item the user watched stayed on the compacted changelog, against the erasure."""
    from calibration.events import Forget, Watch
    from streams.state import SEP

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    part = rg._partition(0)
    engine, users = part.engine, part.users
    offset_key = rg.users_table.data.offset_key
    engine.process(Watch("w1", "a", "i", 1.0, 2.0, 10.0), "watch", 0)
    users.flush()
    users.note_sent(5)
    users.set_aside("a", "ValueError: broken")
    users.sync()
    assert offset_key not in partition_db(rg.users_table, 0)  # a's entry is not in the local database
    assert engine.process(Forget("f1", "a", 11.0), "forget", 0) == "ok"
    _, deleted, groups = users.flush()
    tombstones = {k for group in groups for k, v in group if v is None}
    assert deleted == {"a"} and {b"a", b"a" + SEP + b"i"} <= tombstones
    users.sync()
    assert partition_db(rg.users_table, 0)[offset_key] == b"5"  # nothing of a's is missing any more


def test_a_user_set_aside_while_its_pool_additions_wait_for_their_round_does_not_break_the_flush(tmp_path):
    """A user whose pool only gained items waits in ``deferred`` for the next round; set aside meanwhile, the
    round read it and raised UnreadableUser out of the flush (its records were never acked)."""
    from calibration.events import Impression, ShownItem, Watch

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   safe_pool_max=1, beta=50.0, pool_additions_interval=3600.0))
    part = rg._partition(0)
    eng = part.engine
    eng.process(Impression("e1", "u", "s1", 1.0, 2, False, (ShownItem("x", 1.0), ShownItem("y", 0.5, 2.0))),
                "impressions")
    eng.process(Watch("e2", "u", "x", 80.0, 100.0, 10.0), "watch")
    rg._user_outputs(part, eng.changed)
    eng.changed.clear()
    part.users.flush()
    eng.process(Watch("e3", "u", "y", 90.0, 100.0, 11.0), "watch")  # an addition: deferred to the round
    assert rg._user_outputs(part, eng.changed) == [] and part.deferred == {"u"}
    eng.changed.clear()
    part.users.flush()
    part.users.set_aside("u", "ValueError: broken")
    assert rg._user_outputs(part, eng.changed, force=True) == []  # raised UnreadableUser


def test_past_a_few_broken_users_the_error_goes_on_rather_than_dead_lettering_everyone(tmp_path, monkeypatch):
    """A bug that raises for every user must fail loudly, not set the partition's users aside one by one."""
    import pytest

    from calibration.engine import Engine
    from calibration.events import Watch
    from calibration.user_state import UserState

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    eng = rg._partition(0).engine
    monkeypatch.setattr(Engine, "SET_ASIDE_MAX", 2)

    def broken(self, *args):
        raise ValueError("a bug")

    monkeypatch.setattr(UserState, "on_watch", broken)
    for n, uid in enumerate(("a", "b")):
        with pytest.raises(LookupError):  # set aside: the caller dead-letters the event
            eng.process(Watch(f"w{n}", uid, "i", 1.0, 2.0, 10.0), "watch", n)
    with pytest.raises(ValueError, match="a bug"):
        eng.process(Watch("w2", "c", "i", 1.0, 2.0, 10.0), "watch", 2)
