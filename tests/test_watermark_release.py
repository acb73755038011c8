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
