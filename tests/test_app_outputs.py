"""What a worker's flush publishes to ``safe-pools`` (RiskgateApp._user_outputs), without a broker.

A pool that only gained items waits for the next round of additions
(``POOL_ADDITIONS_INTERVAL``); an item the ranker was given and must stop
using goes out with the flush that saw it, whatever else changed.
"""

from __future__ import annotations

from types import SimpleNamespace

import orjson

from calibration.events import Impression, ShownItem, Watch
from streams.app import RiskgateApp
from streams.settings import load_settings

from .fakes import fake_send_records


def _app(tmp_path) -> RiskgateApp:
    # the broker is never contacted: outputs are read from _user_outputs' return value
    return RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                     safe_pool_max=1, beta=50.0, pool_additions_interval=3600.0))


def _flush(rg: RiskgateApp, part) -> list[list[str]]:
    """One flush's outputs: the safe pools published, as item ids."""
    out = rg._user_outputs(part, part.engine.changed)
    part.engine.changed.clear()
    part.users.flush()
    return [orjson.loads(v)["safe_pool"] for t, _, v in out if t is rg.pools_topic]


def _items(pool) -> list[str]:
    return [p if isinstance(p, str) else p["item_id"] for p in pool]


def _with_an_addition_held(tmp_path):
    """User u handed [x], then y (rank 2.0) made safe: an addition, held for the round an hour away."""
    rg = _app(tmp_path)
    part = rg._partition(0)
    eng = part.engine
    eng.process(Impression("e1", "u", "s1", 1.0, 2, False, (ShownItem("x", 1.0), ShownItem("y", 0.5, 2.0))),
                "impressions")
    eng.process(Watch("e2", "u", "x", 80.0, 100.0, 10.0), "watch")
    assert [_items(p) for p in _flush(rg, part)] == [["x"]]  # x is safe (y is not watched yet)
    eng.process(Watch("e3", "u", "y", 90.0, 100.0, 11.0), "watch")  # y outranks x: an addition
    assert _flush(rg, part) == []  # held for the round of additions
    return rg, part


def test_an_item_made_unsafe_by_a_watch_alone_is_withdrawn_at_once(tmp_path):
    """X handed out, pushed past the cap by an addition held back, then made unsafe by an earlier first view.

    The watch changes no core and the shown pool's top does not change, but
    the ranker holds X: the flush must send the pool without it, not wait for
    the round of additions an hour away.
    """
    rg, part = _with_an_addition_held(tmp_path)
    eng = part.engine
    eng.process(Watch("e4", "u", "x", 10.0, 100.0, 5.0), "watch")  # x's first view was earlier, at W% 10
    state = part.users.get("u")
    assert [s.item_id for s in state.safe_pool(rg.config.limits)] == ["y"]
    assert [_items(p) for p in _flush(rg, part)] == [["y"]]


def test_held_additions_go_out_with_the_user_s_next_other_change(tmp_path):
    """An impression changes nothing of the value but the held addition: the flush sends it, not the round."""
    rg, part = _with_an_addition_held(tmp_path)
    eng = part.engine
    eng.process(Impression("e4", "u", "s2", 12.0, 1, False, (ShownItem("z", 0.1),)), "impressions")
    assert [_items(p) for p in _flush(rg, part)] == [["y"]]
    eng.process(Impression("e5", "u", "s3", 13.0, 1, False, (ShownItem("w", 0.1),)), "impressions")
    assert _flush(rg, part) == []  # nothing of the value changed


def test_what_rankers_hold_is_every_user_s_current_value_after_each_flush(tmp_path):
    """What flushes publish never leaves a ranker a stale safe-pools value (band, tags, versions, own λ̂, pool).

    A seeded synthetic stream with many flags, tag rules and forgets, small
    pools and few slates per own λ̂ (so bands, blocked tags, versions, own
    thresholds and pools all change; a 60 s window, so own thresholds also
    lapse), flushed every 37 events on average: after each
    flush, the value last published for every user whose additions are not
    held back is the value a full recompute gives; after a forced round, for
    every user.
    """
    import random

    from calibration.synthetic import WorldConfig, generate_events
    from streams.schemas import decode_event
    from streams.topics import safe_pool_message, threshold_basis

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   safe_pool_max=3, beta=50.0, pool_additions_interval=3600.0, min_slates=3,
                                   label_window=20.0, allowed_lateness=1.0, window=60.0, buckets=6))
    part = rg._partition(0)
    eng = part.engine
    world = WorldConfig(seed=7, n_users=25, n_items=300, n_slates=400, k=6, slates_per_second=2.0, holdout_share=0.6,
                        rate_multiplier=60.0, label_delay=15.0, flag_lag=2.0, constraint_user_share=0.5,
                        unblock_share=0.4, forget_share=0.02, repeat_share=0.3, out_of_order_share=0.1,
                        out_of_order_lag=10.0)
    held: dict[str, bytes | None] = {}  # user -> the value rankers hold
    lapsed: list[str] = []  # users whose own thresholds left a value published
    keys: dict[str, bytes | None] = {}  # strategy:user:<id> -> what risk-thresholds holds (None: deleted)

    def flush(force: bool = False) -> None:
        for t, k, v in rg._user_outputs(part, eng.changed, force=force):
            if t is rg.thresholds_topic:
                keys[k.decode()] = v
            if t is rg.pools_topic:
                uid = k.decode()
                if held.get(uid) and orjson.loads(held[uid])["thresholds"] and not orjson.loads(v)["thresholds"]:
                    lapsed.append(uid)
                held[uid] = v
        eng.changed.clear()
        _, deleted, _ = part.users.flush()
        for uid in deleted:
            part.pools.pop(uid, None)
            part.own.pop(uid, None)
            held[uid] = None
            for st in rg.config.strategies:  # (the flush's own tombstones, as RiskgateApp._flush sends them)
                keys[f"{st}:user:{uid}"] = None

    def check(users) -> int:
        checked = 0
        for uid in users:
            state = part.users.get(uid)
            if state is None:
                assert held.get(uid) is None
                continue
            own = part.own[uid][1]
            # risk-thresholds holds the user's own λ̂ while there is one, and nothing once it
            # lapsed (its last value stood there for good)
            mine = {r.strategy: r for r in own}
            for st in rg.config.strategies:
                value = keys.get(f"{st}:user:{uid}")
                if st in mine:
                    assert orjson.loads(value)["version"] == state.version, uid
                else:
                    assert value is None, uid
            pool = state.safe_pool(rg.config.limits)
            assert held[uid] == safe_pool_message(uid, pool, state.blocked_tags, own, state.version, state.band,
                                                threshold_basis(rg.config)), uid
            checked += 1
        return checked

    kinds: dict[str, int] = {}
    rnd = random.Random(3)
    for n, (topic, value) in enumerate(generate_events(world)):
        ev = decode_event(topic, orjson.dumps(value), value["user_id"].encode())
        kinds[topic] = kinds.get(topic, 0) + 1
        eng.process(ev, topic, n)
        if rnd.random() < 1 / 37:
            flush()
            check(set(held) - part.deferred)
    flush(force=True)
    assert check(set(held)) >= 20
    assert {"impressions", "watch", "flags", "constraints", "forget"} <= set(kinds), kinds
    versions = [s.version for _, s in part.users.items()]
    assert max(versions) >= 2  # own thresholds were republished
    assert lapsed  # and some lapsed (no version bump: only the thresholds left the value)
    assert {s.band for _, s in part.users.items()} == {"low", "high"}


def test_a_user_forgotten_and_back_before_the_flush_has_its_former_own_threshold_deleted(tmp_path):
    """Forgotten, then seen again before the flush: the flush's deleted users leave it out (it exists), and it
    starts again at version 0, so its former ``strategy:user:<id>`` λ̂ was never deleted, against the erasure."""
    from calibration.events import Forget

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   min_slates=2, label_window=10.0, allowed_lateness=0.0))
    part = rg._partition(0)
    eng = part.engine
    for j in range(3):
        eng.process(Impression(f"e{j}", "u", f"s{j}", 10.0 * j, 1, False, (ShownItem(f"i{j}", 0.5),)), "impressions")
    eng.process(Impression("tick", "t", "st", 100.0, 1, False, (ShownItem("z", 0.5),)), "impressions")

    def flush():
        out = rg._user_outputs(part, eng.changed)
        eng.changed.clear()
        _, deleted, _ = part.users.flush()
        return {k.decode(): v for t, k, v in out if t is rg.thresholds_topic}, deleted

    published, _ = flush()
    assert {k for k, v in published.items() if v is not None} == {"remove:user:u", "replace:user:u"}
    eng.process(Forget("f", "u", 101.0), "forget")
    eng.process(Impression("e9", "u", "s9", 102.0, 1, False, (ShownItem("i9", 0.5),)), "impressions")  # back
    published, deleted = flush()
    assert "u" not in deleted
    assert published == {"remove:user:u": None, "replace:user:u": None}


def test_an_idle_user_s_own_threshold_leaves_with_its_slates(tmp_path):
    """A user who stopped coming kept the λ̂ of slates long out of the window, and its ``strategy:user:<id>``
    keys and the λ̂ in its safe-pools value were deleted only if it came back (found by the growth audit).
    Other users' events move the watermark: when its slates leave the window, its own λ̂ goes."""
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   min_slates=2, label_window=10.0, allowed_lateness=0.0, window=3600.0, buckets=4))
    part = rg._partition(0)
    eng = part.engine
    for j in range(3):
        eng.process(Impression(f"e{j}", "u", f"s{j}", 10.0 * j, 1, False, (ShownItem(f"i{j}", 0.5),)), "impressions")

    def flush():
        out = rg._user_outputs(part, eng.changed)
        eng.changed.clear()
        part.users.flush()
        return ({k.decode(): v for t, k, v in out if t is rg.thresholds_topic},
                {k.decode(): orjson.loads(v) for t, k, v in out if t is rg.pools_topic and v is not None})

    tick = 0

    def other_user_at(ts):
        nonlocal tick
        tick += 1
        eng.process(Impression(f"t{tick}", "v", f"st{tick}", ts, 1, False, (ShownItem("z", 0.5),)), "impressions")

    other_user_at(100.0)
    published, pools = flush()
    assert {k for k, v in published.items() if v is not None} == {"remove:user:u", "replace:user:u"}
    assert pools["u"]["thresholds"]  # (its own λ̂, in its safe-pools value)
    other_user_at(3000.0)  # its slates are still in the window (the bucket of ts 0..900 lives until 3600)
    published, _ = flush()
    assert "remove:user:u" not in published and len(part.users.get("u").recent) == 3
    other_user_at(3700.0)  # the window's oldest bucket is now [900, 1800): u's slates are out
    published, pools = flush()
    assert published == {"remove:user:u": None, "replace:user:u": None}
    assert not pools["u"]["thresholds"] and part.users.get("u").recent == []
    other_user_at(9000.0)
    assert flush() == ({}, {})  # nothing more to withdraw: no queue entry left for u


def test_outputs_lost_in_a_crash_after_the_changelog_are_sent_again_when_the_records_are_replayed(tmp_path):
    """A flush queues the users' changelog records before the outputs, and acks its records after both: a
    crash between the two left the state durable and the outputs lost (crash audit, by fault injection:
    a flagged item stayed in the user's safe-pools value; a forgotten user's value was never tombstoned).
    The records are read again after the restart, as replays (a forget: as a duplicate); their users'
    outputs must go out again."""
    from calibration.events import Flag, Forget

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   beta=50.0))
    part = rg._partition(0)
    eng = part.engine
    eng.process(Impression("e1", "u", "s1", 1.0, 2, False, (ShownItem("x", 1.0), ShownItem("y", 0.5))),
                "impressions", 0)
    eng.process(Watch("e2", "u", "x", 80.0, 100.0, 2.0), "watch", 0)
    eng.process(Impression("e3", "v", "s3", 3.0, 1, False, (ShownItem("z", 1.0),)), "impressions", 1)
    eng.process(Flag("f1", "u", "x", "report", 4.0), "flags", 0)
    eng.process(Forget("g1", "v", 5.0), "forget", 0)

    def flush():
        out = rg._user_outputs(part, eng.changed)
        eng.changed.clear()
        _, deleted, _ = part.users.flush()
        return out, deleted

    flush()  # the state is written; say its outputs were lost in a crash before they went out
    part.pools.clear(), part.own.clear()  # (a restarted worker has sent nothing yet)
    assert eng.process(Flag("f1", "u", "x", "report", 4.0), "flags", 0) == "replayed"
    assert eng.process(Forget("g1", "v", 5.0), "forget", 0) == "duplicate"
    assert "u" in eng.changed and eng.erased_again == {"v"}
    out, _ = flush()
    pools = {k.decode(): v for t, k, v in out if t is rg.pools_topic}
    assert [p["item_id"] for p in orjson.loads(pools["u"])["safe_pool"]] == []  # x is flagged: not offered


def test_a_forget_read_again_sends_its_tombstones_again(tmp_path, monkeypatch):
    import asyncio

    import streams.app as app_module
    from calibration.events import Forget

    sent = []

    monkeypatch.setattr(app_module, "send_records",
                        fake_send_records(lambda topic, _, groups: sent.extend((topic, k, v) for g in groups for k, v in g)))
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    soon = []
    for topic in (rg.thresholds_topic,):
        monkeypatch.setattr(topic, "send_soon", lambda key, value, _t=topic: soon.append((key, value)))
    rg.app._consumer = SimpleNamespace(ack_offsets=lambda tp, offsets: None, topic_partitions=lambda topic: 1)
    part = rg._partition(0)
    eng = part.engine
    eng.process(Impression("e1", "v", "s1", 1.0, 1, False, (ShownItem("z", 1.0),)), "impressions", 0)
    eng.process(Forget("g1", "v", 5.0), "forget", 0)
    assert eng.process(Forget("g1", "v", 5.0), "forget", 0) == "duplicate"  # read again, in the same flush
    eng.process(Impression("e2", "w", "s2", 6.0, 1, False, (ShownItem("z", 1.0),)), "impressions", 1)
    eng.process(Forget("g2", "w", 7.0), "forget", 1)
    part.last_message = SimpleNamespace(topic=rg.names.inputs[0], partition=0, offset=0)  # (table writes' event)
    part.unacked = [SimpleNamespace(topic="forget", offset=0)]
    asyncio.run(rg._flush(0, part))
    sent.clear(), soon.clear()
    assert eng.process(Forget("g2", "w", 7.0), "forget", 1) == "duplicate"  # after a restart, say
    part.unacked = [SimpleNamespace(topic="forget", offset=1)]
    asyncio.run(rg._flush(0, part))
    assert [(k, v) for t, k, v in sent if t == rg.names.safe_pools] == [(b"w", None)]
    assert sorted(soon) == [(b"remove:user:w", None), (b"replace:user:w", None)]
    assert eng.erased_again == set()


def test_a_user_back_after_a_forget_read_again_keeps_the_value_sent_for_it(tmp_path, monkeypatch):
    """Found by a review: the forget read again (a producer's retry, or a replay after a crash) and the
    user's next event in one flush sent the user's new value, then the forget's tombstone after it: on the
    compacted topic rankers lost the user's blocked tags until the user changed again."""
    import asyncio

    import streams.app as app_module
    from calibration.events import Constraints, Forget

    sent = []
    monkeypatch.setattr(app_module, "send_records",
                        fake_send_records(lambda topic, _, groups: sent.extend((topic, k, v) for g in groups for k, v in g)))
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    soon = []
    monkeypatch.setattr(rg.thresholds_topic, "send_soon", lambda key, value: soon.append((key, value)))
    rg.app._consumer = SimpleNamespace(ack_offsets=lambda tp, offsets: None, topic_partitions=lambda topic: 1)
    part = rg._partition(0)
    eng = part.engine
    eng.process(Impression("e1", "v", "s1", 1.0, 1, False, (ShownItem("z", 1.0),)), "impressions", 0)
    eng.process(Forget("g1", "v", 5.0), "forget", 0)
    part.last_message = SimpleNamespace(topic=rg.names.inputs[0], partition=0, offset=0)  # (table writes' event)
    part.unacked = [SimpleNamespace(topic="forget", offset=0)]
    asyncio.run(rg._flush(0, part))
    sent.clear(), soon.clear()  # (lost in a crash, say: the forget is read again after the restart)
    assert eng.process(Forget("g1", "v", 5.0), "forget", 1) == "duplicate"
    assert eng.process(Constraints("c1", "v", 10.0, block_tags=("firearms",)), "constraints", 0) == "ok"
    part.unacked = [SimpleNamespace(topic="forget", offset=1), SimpleNamespace(topic="constraints", offset=0)]
    asyncio.run(rg._flush(0, part))
    pools = [v for t, k, v in sent if t == rg.names.safe_pools and k == b"v"]
    assert pools and pools[-1] is not None and orjson.loads(pools[-1])["blocked_tags"] == ["firearms"]
    # ... while its own λ̂ of before the forget is still erased (a review: all its tombstones were dropped)
    assert sorted(k for k, v in soon if v is None) == [b"remove:user:v", b"replace:user:v"]
    assert eng.erased_again == set()
