"""A partition whose input topics are read to their end lets its watermark move without another batch.

Found by re-running the crash audit: a topic is marked lagging at a batch when its end is not
known yet (an empty ``forget`` partition right after a restart), and only the partition's next
batch cleared it. A partition that got no more input kept its watermark frozen and 267 slates
unmatured, for good. The health tick now releases topics read to their end.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson

from streams.app import RiskgateApp
from streams.settings import load_settings

from .fakes import FakeConsumer, fake_send_records


def _impression(uid: str, event_id: str, ts: float) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": uid, "slate_id": event_id, "ts": ts, "k": 1,
                         "policy_applied": False, "items": [{"item_id": "i", "score": 0.5}]})


def test_a_topic_read_to_its_end_stops_holding_the_watermark_without_another_batch(tmp_path, monkeypatch):
    import streams.app as app_module

    monkeypatch.setattr(app_module, "send_records", fake_send_records(lambda *_: None))
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   label_window=10.0, allowed_lateness=0.0))
    impressions = rg.names.prefix + "impressions"
    ends = {impressions: 2}  # every other input topic's end: not known yet
    log = []
    rg.app._consumer = FakeConsumer(log, highwater=lambda tp: ends.get(tp.topic), partitions=1)
    records = [SimpleNamespace(topic=impressions, partition=0, offset=i, key=uid.encode(), timestamp=0,
                               value=_impression(uid, f"e{i}", ts)) for i, (uid, ts) in enumerate([("u", 100.0),
                                                                                                  ("v", 200.0)])]
    asyncio.run(rg._on_batch(records))
    part = rg.partitions[0]
    assert part.engine.pending == 2  # the watermark waits for topics whose end is unknown
    asyncio.run(rg._flush_all())
    assert not rg._due(part)

    rg.app.inputs_open = True  # (as after the assignment's recovery)
    rg._release_caught_up({})
    assert part.engine.pending == 2  # still unknown: still held back
    ends.update({rg.names.prefix + t: 0 for t in ("watch", "flags", "constraints", "forget")})  # empty topics
    rg.app.inputs_open = False  # a revoke or a stop: its flush (local sync last) is the last change
    rg._release_caught_up({})
    assert part.engine.pending == 2
    rg.app.inputs_open = True
    rg._release_caught_up({})
    assert part.engine.pending == 1 and part.engine.matured_counts["holdout"] == 1  # ts 100 + 10 < 200
    assert rg._due(part)  # the matured user is written by the next flush, with no record to ack


def _flag(uid: str, event_id: str, item: str, ts: float) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": uid, "item_id": item, "kind": "report", "ts": ts})


def test_a_topic_whose_end_is_known_only_from_an_older_fetch_holds_the_watermark(tmp_path, monkeypatch):
    """A flag on the broker before an impression far ahead was even produced is read before its slate matures.

    The consumer covers a partition in a fetch only when it holds none of its records, so the
    ``flags`` end it knows can come from a fetch older than the one that brought ``impressions``
    records: ``flags`` looked read to its end at offset 1 while the broker had a second flag,
    and a tick 400 s ahead matured the slate without it (the crash test's reference run published
    λ̂ 0.306 instead of 0.307 so, and its window listed u54's slate s-798 with none of its 4 flags).
    """
    import streams.app as app_module

    monkeypatch.setattr(app_module, "send_records", fake_send_records(lambda *_: None))
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                   label_window=10.0, allowed_lateness=0.0))
    impressions, flags = rg.names.prefix + "impressions", rg.names.prefix + "flags"
    # (highwater, when the fetch that told it was answered) per topic; the others are empty
    known = {t: (0, 1000) for t in rg.names.inputs}
    known.update({impressions: (1, 1000), flags: (1, 1000)})
    rg.app._consumer = FakeConsumer([], highwater=lambda tp: known[tp.topic][0], partitions=1,
                                    polled=lambda tp: known[tp.topic][1])
    rg.app.inputs_open = True  # (as after the assignment's recovery)

    def record(topic, offset, value, uid="u"):
        return SimpleNamespace(topic=topic, partition=0, offset=offset, key=uid.encode(), timestamp=0, value=value)

    slate = orjson.dumps({"event_id": "e0", "user_id": "u", "slate_id": "s", "ts": 100.0, "k": 1,
                          "policy_applied": False, "items": [{"item_id": "a", "score": 0.5}]})
    asyncio.run(rg._on_batch([record(impressions, 0, slate), record(flags, 0, _flag("u", "f0", "z", 101.0))]))
    part = rg.partitions[0]
    matured = part.engine.matured_counts
    assert part.engine.pending == 1

    # The second flag (ts 105, item a of the slate) reached the broker, then the tick was produced.
    # The next fetch covers every topic but `flags`, whose records the consumer still held then.
    known.update({t: (0, 2000) for t in rg.names.inputs if t != flags})
    known[impressions] = (2, 2000)
    asyncio.run(rg._on_batch([record(impressions, 1, _impression("tick", "t0", 500.0), uid="tick")]))
    assert matured["holdout"] == 0  # `flags` is read to offset 1 of the end it knew at 1000: maybe not its end
    rg._release_caught_up({})
    assert matured["holdout"] == 0  # (the health tick does not release it either)

    known[flags] = (2, 2100)  # the next fetch covers `flags`: its second record
    rg._release_caught_up({})
    assert matured["holdout"] == 0
    asyncio.run(rg._on_batch([record(flags, 1, _flag("u", "f1", "a", 105.0))]))
    known.update({t: (known[t][0], 2100) for t in rg.names.inputs})
    rg._release_caught_up({})
    assert matured["holdout"] == 1
    [m] = rg.partitions[0].users.get("u").recent
    assert m.flags == (True,)  # its flag counted: 105 <= 100 + label window
