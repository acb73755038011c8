"""The aggregator's publish rule and the ranker's threshold resolution, without Kafka."""

import asyncio
import base64
import time
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.engine import Engine, EngineConfig, combine
from calibration.events import Flag, Impression, ShownItem
from calibration.grid import make_grid
from calibration.policy import Candidate
from calibration.window import CurveAccumulator
from streams.aggregator import Aggregator
from streams.ranker import ThresholdBook
from streams.topics import (
    InvalidSnapshot,
    decode_snapshot,
    encode_snapshot,
    safe_pool_message,
    threshold_message,
)

CFG = EngineConfig(alphas=(0.1, 0.3), label_window=10.0, allowed_lateness=0.0, grid=make_grid(0, 1, 11),
                   min_slates=5)


def _engine(user_prefix, n):
    eng = Engine(CFG)
    for j in range(n):
        u = f"{user_prefix}{j % 3}"
        eng.process(Impression(f"e{user_prefix}{j}", u, f"s{j}", 100.0 + j, 2, False,
                               (ShownItem(f"a{j}", 0.2, 1.0), ShownItem(f"b{j}", 0.8, 1.0))))
        if j % 2:
            eng.process(Flag(f"f{user_prefix}{j}", u, f"a{j}", "report", 101.0 + j))
    eng.process(Impression("tick", "zz", "tick", 500.0, 1, False, (ShownItem("t", 0.5, 1.0),)))
    return eng


def test_snapshots_round_trip_and_sum_to_one_engine():
    e1, e2 = _engine("x", 40), _engine("y", 30)
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0)
    for p, e in ((0, e1), (1, e2)):
        agg.update(*decode_snapshot(encode_snapshot(p, e.watermark, e.calibrator.span(), e.calibrator.snapshot())))
    got = {(r.strategy, r.group): r for r in agg.results()}
    want = {(r.strategy, r.group): r for r in combine(CFG, [e1.calibrator.snapshot(), e2.calibrator.snapshot()])}
    assert {k: (r.n, r.thresholds) for k, r in got.items()} == {k: (r.n, r.thresholds) for k, r in want.items()}
    assert got[("remove", "global")].n == 70


def _snapshot(**change) -> bytes:
    e = _engine("x", 10)
    d = orjson.loads(encode_snapshot(3, e.watermark, e.calibrator.span(), e.calibrator.snapshot(), 99.5, 7))
    d.update(change)
    return orjson.dumps(d)


def test_a_snapshot_decodes_to_what_was_encoded_and_is_checked_against_this_deployment():
    part, wm, span, totals, through, round_ = decode_snapshot(_snapshot(), len(CFG.grid), 8)
    assert (part, through, round_) == (3, 99.5, 7) and wm == _engine("x", 10).watermark
    assert all(len(acc.increments) == len(CFG.grid) for acc in totals.values())
    with pytest.raises(InvalidSnapshot, match="12 grid points, this worker 11"):
        decode_snapshot(encode_snapshot(0, 1.0, None, {("remove", "global"): CurveAccumulator(12)}), 11, 8)
    with pytest.raises(InvalidSnapshot, match="input partition"):
        decode_snapshot(_snapshot(), len(CFG.grid), 2)  # from a deployment with more partitions


ZERO = base64.b64encode(bytes(8 * 12)).decode()


@pytest.mark.parametrize("raw, reason", [
    (b"{", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (_snapshot(partition="3"), "partition"),
    (_snapshot(partition=True), "partition"),
    (_snapshot(partition=-1), "partition"),
    (_snapshot(round=1.5), "round"),
    (_snapshot(watermark="soon"), "watermark"),
    (_snapshot(through=[1]), "through"),
    (_snapshot(span=[1.0]), "span"),
    (_snapshot(span=[1.0, None]), "span"),
    (_snapshot(totals=[]), "totals must be an object"),
    (_snapshot(totals={"remove": ZERO}), "strategy|group"),
    (_snapshot(totals={"remove|global": "not base64!"}), "not an encoded accumulator"),
    (_snapshot(totals={"remove|global": base64.b64encode(b"abc").decode()}), "not an encoded accumulator"),
    (_snapshot(totals={"remove|global": 5}), "not an encoded accumulator"),
    (_snapshot(totals={"remove|global": ""}), "not an encoded accumulator"),
    (_snapshot(totals={"remove|global": base64.b64encode((-1).to_bytes(8, "little", signed=True) + bytes(8 * 12)).decode()}),
     "counts -1 slates"),
])
def test_a_record_no_worker_wrote_is_refused_with_its_reason(raw, reason):
    with pytest.raises(InvalidSnapshot, match=reason):
        decode_snapshot(raw, 12, 8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                                  ["partition", "round", "through", "watermark", "span", "totals", "remove|global"]),
                                  c, max_size=6), max_leaves=12).map(orjson.dumps)))
def test_decoding_a_snapshot_raises_nothing_but_invalid_snapshot(raw):
    try:
        decode_snapshot(raw, 12, 8)
    except InvalidSnapshot:
        pass


def test_the_aggregator_agent_dead_letters_a_bad_snapshot_and_sums_the_good_ones(tmp_path, monkeypatch):
    import streams.app as app_module
    from streams.app import RiskgateApp
    from streams.settings import load_settings

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=2))
    grid = len(rg.config.grid)
    good = encode_snapshot(1, 5.0, None, {("remove", "global"): CurveAccumulator(grid)}, 4.0, 2)
    bad = encode_snapshot(0, 5.0, None, {("remove", "global"): CurveAccumulator(grid + 1)}, 4.0, 2)
    sent = []
    rg.dlq_topic.send_soon = lambda key, value: sent.append(orjson.loads(value))

    class Stream:
        async def take_events(self, n, within):
            yield [SimpleNamespace(message=SimpleNamespace(topic="riskgate-partials", partition=0, offset=o, key=None,
                                                           value=v))
                   for o, v in enumerate([bad, good])]

    monkeypatch.setattr(app_module, "_in_event_of", lambda event: None)  # (no Faust event to write tables in)
    asyncio.run(rg._aggregate(Stream()))
    assert [(d["offset"], d["reason"].split(":")[0]) for d in sent] == [(0, "bad_snapshot")]
    assert "grid points" in sent[0]["reason"] and base64.b64decode(sent[0]["value"]) == bad
    assert sorted(rg.aggregator.snapshots) == [1] and rg.aggregator.missing() == [0]


def test_publish_rule_interval_heartbeat_and_growing_versions():
    versions = {"remove:global": 41}
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0, versions=versions)
    e = _engine("x", 40)
    agg.update(0, e.watermark, None, e.calibrator.snapshot())
    first = {p.key: p.version for p in agg.due(1000.0)}
    assert first["remove:global"] == first["replace:band:low"] == 1_000_000  # the wall time in ms
    assert agg.due(1001.0) == []  # nothing changed
    agg.update(1, None, None, _engine("y", 30).calibrator.snapshot())
    assert agg.due(1004.0) == []  # changed, but within half a recompute_interval (the same round)
    changed = {p.key for p in agg.due(1005.0)}  # the next round's snapshots are published at once
    assert "remove:global" in changed
    beat = agg.due(1071.0)
    assert {p.key for p in beat} == {f"{s}:{g}" for s in CFG.strategies for g in ("global", "band:low", "band:high")}
    assert versions["remove:global"] == 1_071_000


def test_a_publication_not_sent_is_due_again_at_the_next_round():
    """A publication handed out by due() but not sent (the worker's lease ran out between two sends)
    was remembered as published: the key waited for a change of value or the heartbeat."""
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0)
    agg.update(0, None, None, _engine("x", 40).calibrator.snapshot())
    assert "remove:global" in {p.key for p in agg.due(1000.0)}
    assert agg.due(1010.0) == []  # sent: nothing changed since
    agg.unsent("remove:global")
    assert [p.key for p in agg.due(1020.0)] == ["remove:global"]


def test_versions_grow_strictly_past_a_stored_version_ahead_of_the_clock():
    versions = {"remove:global": 5_000_000}  # written by an owner whose clock ran ahead, or by a restart
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0, versions=versions)
    agg.update(0, None, None, _engine("x", 40).calibrator.snapshot())
    assert {p.key: p.version for p in agg.due(1000.0)}["remove:global"] == 5_000_001
    assert {p.key: p.version for p in agg.due(1060.0)}["remove:global"] == 5_000_002
    assert {p.key: p.version for p in agg.due(6000.0)}["remove:global"] == 6_000_000  # the clock passed it


def test_an_owner_with_a_stale_versions_table_still_publishes_above_the_other_owner():
    """A worker stalled past its session timeout keeps the versions it held then; on waking it may
    read fresh snapshots and publish before it learns the partition moved. Under counters its
    versions were below the new owner's, so rankers ignored the new owner's values until the
    counters passed them again (seen once in an audit). With the wall time they are not."""
    stale = {"remove:global": 3}  # what the stalled worker's table held
    owner = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0, versions={"remove:global": 3})
    zombie = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0, versions=stale)
    held = 0  # the version a ranker holds: it drops anything not above it
    for i in range(30):  # the new owner publishes every heartbeat during the stall
        owner.update(0, None, None, _engine("x", 40 + i).calibrator.snapshot())
        pubs = {p.key: p.version for p in owner.due(1000.0 + 60 * i)}
        assert pubs["remove:global"] > held
        held = pubs["remove:global"]
    zombie.update(0, None, None, _engine("x", 70).calibrator.snapshot())
    woke = {p.key: p.version for p in zombie.due(1000.0 + 60 * 30)}["remove:global"]
    assert woke > held  # the ranker takes the value it computed from fresh snapshots
    owner.versions["remove:global"] = woke  # it wrote its version back to the shared table's changelog
    owner.update(0, None, None, _engine("x", 71).calibrator.snapshot())
    assert {p.key: p.version for p in owner.due(1000.0 + 60 * 31)}["remove:global"] > woke


def test_nothing_is_published_until_every_partition_has_reported():
    e1, e2 = _engine("x", 40), _engine("y", 30)
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0, partitions=2)
    agg.update(1, e2.watermark, e2.calibrator.span(), e2.calibrator.snapshot())
    assert agg.due(1000.0) == [] and agg.due(2000.0) == []  # even past a heartbeat: half a window is not one
    agg.update(0, e1.watermark, e1.calibrator.span(), e1.calibrator.snapshot())
    pubs = {p.key: p for p in agg.due(2001.0)}
    assert pubs["remove:global"].result.n == 70 and all(p.version == 2_001_000 for p in pubs.values())


def test_ranker_resolves_user_then_band_then_global_and_fails_closed():
    book = ThresholdBook()
    assert book.resolve("u1", 0.1, "replace") == (None, None, None)  # nothing known: filter everything
    e = _engine("x", 40)
    for r in e.results():
        book.on_threshold(f"{r.strategy}:{r.group}", threshold_message(r, CFG, 7))
    g, lam, v = book.resolve("u1", 0.1, "replace")
    assert g == "band:low" and v == 7  # band published, user unknown -> band low
    book.on_pool("u1", safe_pool_message("u1", [], [], [], band="high"))
    assert book.resolve("u1", 0.1, "replace")[0] == "band:high"
    older = orjson.loads(threshold_message(e.results()[0], CFG, 3))
    book.on_threshold("remove:global", orjson.dumps(older))
    assert book.thresholds["remove:global"]["version"] == 7  # an older version never replaces a newer one
    from calibration.engine import GroupResult
    from calibration.safe_pool import SafeItem
    from calibration.threshold import Threshold

    fixed = GroupResult("replace", "band:high", 500, (0.0, 1.0), (Threshold(0.3, 0.5, False, 0.2),))
    book.on_threshold("replace:band:high", threshold_message(fixed, CFG, 99))
    book.on_pool("u1", safe_pool_message("u1", [SafeItem("old", 3.0)], ["guns"], [], band="high"))
    cands = [Candidate("c1", 0.95, 2.0), Candidate("c2", 0.01, 1.0), Candidate("c3", 0.9, 0.5, ("guns",))]
    d = book.apply("u1", cands, 3, 0.3, "replace")
    assert (d.group, d.lam, d.version) == ("band:high", 0.5, 99)
    assert [(x.item_id, x.replacement) for x in d.slate] == [("c1", False), ("old", True)]


def test_a_round_is_published_once_every_partition_has_sent_it():
    """Snapshots of one round arriving in two fetches give one publication, over the whole round.

    Publishing after the first fetch summed some partitions' previous round
    (inputs a round older), and the half-interval rule then held the rest of
    the round back until the next one.
    """
    old, new = _engine("x", 20), _engine("x", 40)
    other = _engine("y", 30)
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=600.0, partitions=2)
    agg.update(0, None, None, old.calibrator.snapshot(), 100.0, 100)
    agg.update(1, None, None, other.calibrator.snapshot(), 100.0, 100)
    assert agg.due(1000.0)  # round 7, complete: published
    agg.update(0, None, None, new.calibrator.snapshot(), 110.0, 101)
    assert agg.due(1010.1) == []  # partition 1's snapshot of round 8 is still on its way
    agg.update(1, None, None, other.calibrator.snapshot(), 110.0, 101)
    pubs = {p.key: p for p in agg.due(1010.3)}
    assert pubs["remove:global"].result.n == 70 and pubs["remove:global"].inputs_through == 110.0


def test_a_partition_that_stops_reporting_delays_one_round_only():
    e0, e1 = _engine("x", 40), _engine("y", 30)
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=600.0, partitions=2)
    agg.update(0, None, None, e0.calibrator.snapshot(), 100.0, 100)
    agg.update(1, None, None, e1.calibrator.snapshot(), 100.0, 100)
    assert agg.due(1000.0)
    agg.update(0, None, None, _engine("x", 20).calibrator.snapshot(), 110.0, 101)  # partition 1's worker is gone
    assert agg.due(1010.0) == [] and agg.due(1014.9) == []
    assert {p.key for p in agg.due(1015.0)} >= {"remove:global"}  # half an interval later: published anyway
    agg.update(0, None, None, _engine("x", 10).calibrator.snapshot(), 120.0, 102)
    assert {p.key for p in agg.due(1020.0)} >= {"remove:global"}  # and from then on without waiting



def test_rounds_from_the_past_are_not_published_and_a_lost_partition_forgets_its_snapshots():
    """A worker that got riskgate-partials back published the first complete round it read, 40 s old, under
    a new version (n fell from 357 to 201 between two versions): it started from what it held when it lost
    the partition, and read older rounds than another owner had published meanwhile."""
    e0, e1 = _engine("x", 40), _engine("y", 30)
    agg = Aggregator(CFG, recompute_interval=10.0, heartbeat=60.0, partitions=2)
    agg.update(0, None, None, e0.calibrator.snapshot(), 100.0, 100)
    agg.update(1, None, None, e1.calibrator.snapshot(), 100.0, 100)
    assert agg.due(1000.5)  # round 100 at t = 1000: the present
    agg.update(0, None, None, e0.calibrator.snapshot(), 100.0, 100)
    assert agg.due(1040.0 + 60.0) == []  # round 100 is ten rounds old at t = 1100: even past a heartbeat
    agg.update(0, None, None, e0.calibrator.snapshot(), 100.0, 110)
    agg.update(1, None, None, e1.calibrator.snapshot(), 100.0, 110)
    assert agg.due(1100.5)  # the present again
    agg.reset()  # the partition went to another worker
    assert agg.missing() == [0, 1] and agg.due(1101.0) == []  # a fresh start: every partition again


def test_publications_cut_short_by_the_lease_are_due_again(tmp_path, monkeypatch):
    """The lease is asked again before each publication of a round; those not sent are due again."""
    import streams.app as app_module
    from streams.app import RiskgateApp
    from streams.settings import load_settings

    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1))
    grid = len(rg.config.grid)
    snapshot = encode_snapshot(0, 5.0, None, {(s, "global"): CurveAccumulator(grid) for s in ("remove", "replace")},
                               4.0, None)
    sent, answers = [], iter([True, True])  # the round's check, the first send's; then the lease runs out

    async def send(key, value):
        sent.append(key)

    async def flush():
        return None

    class Stream:
        async def take_events(self, n, within):
            yield [SimpleNamespace(message=SimpleNamespace(topic="riskgate-partials", partition=0, offset=0, key=None,
                                                           value=snapshot))]

    monkeypatch.setattr(app_module, "_in_event_of", lambda event: None)  # (no Faust event to write tables in)
    monkeypatch.setattr(rg.thresholds_topic, "send", send)
    monkeypatch.setattr(rg.app.producer, "flush", flush)
    monkeypatch.setattr(rg, "_may_write", lambda what: next(answers, False))
    monkeypatch.setattr(rg, "_record", lambda pub: None)
    rg.aggregator.versions = {}  # (the versions table needs a Faust event to write in)
    asyncio.run(rg._aggregate(Stream()))
    assert len(sent) == 1
    due = {p.key for p in rg.aggregator.due(time.time())}
    assert len(due) >= 5 and sent[0].decode() not in due  # the rest of the round (global, bands), not the one sent
