"""The worker's health tick and its series across rebalances, through its own methods (no broker).

Found by scaling a group up (a deploy audit): the tick read the high watermark of
partitions the assignor had just given this worker but aiokafka had not assigned
yet, and aiokafka's AssertionError, outside any handler, crashed the worker on
another worker's join (a crash: no clean stop, a full restore, another rebalance).
"""

from __future__ import annotations

import asyncio

import pytest
from faust.types import TP

from calibration.engine import PROPERTY1_BETAS
from streams.app import RiskgateApp
from streams.schemas import INPUT_REASONS
from streams.settings import load_settings


class _Consumer:
    """aiokafka as Faust wraps it: highwaters() asks the broker (ListOffsets) for any partition;
    highwater() reads the consumer's own fetch state and raises for one it does not hold, as aiokafka's
    does. ``revoke`` is taken away while highwaters() awaits the broker."""

    def __init__(self, held, ends, revoke=(), committed=None, positions=None):
        self.held, self.ends, self.revoke, self.asked = set(held), ends, set(revoke), []
        # the offsets Faust committed for this worker (none yet for a partition it was just given)
        self._committed_offset = {tp: 0 for tp in held} if committed is None else committed
        self.positions = positions or {}  # the fetch positions aiokafka knows (none: it raises)

    async def position(self, tp):
        return self.positions[tp]

    def assignment(self):
        return set(self.held)

    async def highwaters(self, *tps):
        self.held -= self.revoke
        return {tp: self.ends[tp] for tp in tps}

    def highwater(self, tp):
        self.asked.append(tp)
        assert tp in self.held, "Partition is not assigned"
        return self.ends[tp]


@pytest.fixture
def rg(tmp_path):
    return RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=2))


def _series(rg, name):
    return {tuple(s.labels.values()): s.value for m in rg.metrics.registry.collect() for s in m.samples
            if s.name == name}


def _nonzero(rg, name):
    """The series of ``name`` with a value (counters of every configured α are exported at 0)."""
    return {k: v for k, v in _series(rg, name).items() if v}


def test_the_health_tick_reads_only_partitions_the_consumer_holds(rg, monkeypatch):
    imp0, imp1 = TP(rg.names.inputs[0], 0), TP(rg.names.inputs[0], 1)
    consumer = _Consumer(held=[imp0], ends={imp0: 7, imp1: 9})
    rg.app._consumer = consumer
    monkeypatch.setattr(rg.app.assignor, "assigned_actives", lambda: {imp0, imp1})  # imp1: mid-rebalance
    asyncio.run(rg._check_health())  # raised AssertionError('Partition is not assigned') for imp1
    assert rg.healthy and consumer.asked == [imp0]
    assert _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 7.0}


def test_a_partition_revoked_while_the_tick_awaits_the_broker_is_skipped(rg, monkeypatch):
    imp0, imp1 = TP(rg.names.inputs[0], 0), TP(rg.names.inputs[0], 1)
    consumer = _Consumer(held=[imp0, imp1], ends={imp0: 7, imp1: 9}, revoke=[imp1])
    rg.app._consumer = consumer
    monkeypatch.setattr(rg.app.assignor, "assigned_actives", lambda: {imp0, imp1})
    asyncio.run(rg._check_health())
    assert rg.healthy and _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 7.0}


def test_a_series_set_for_a_partition_revoked_mid_tick_does_not_outlive_it(rg, monkeypatch):
    """The tick awaited the broker, the partition was revoked (its series removed), and the tick then
    set it again: 12,451 records of phantom lag, frozen for good beside the new owner's 0."""
    imp0, imp1 = TP(rg.names.inputs[0], 0), TP(rg.names.inputs[0], 1)
    actives = {imp0, imp1}
    monkeypatch.setattr(rg.app.assignor, "assigned_actives", lambda: set(actives))
    rg.app._consumer = _Consumer(held=[imp0, imp1], ends={imp0: 7, imp1: 9})
    asyncio.run(rg._check_health())
    assert _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 7.0, ("impressions", "1"): 9.0}

    class Revoking(_Consumer):
        async def highwaters(self, *tps):  # the rebalance lands while the broker answers
            actives.discard(imp1)
            rg._drop_partition(1)
            return {tp: self.ends[tp] for tp in tps}

    rg.app._consumer = Revoking(held=[imp0, imp1], ends={imp0: 8, imp1: 9})  # (aiokafka still holds it)
    asyncio.run(rg._check_health())
    assert _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 8.0}
    # and a series left from an earlier tick goes once its partition is no longer this worker's
    rg.metrics.lag.labels("impressions", "1").set(9)
    rg._lag_series.add(("impressions", "1"))
    rg.app._consumer = _Consumer(held=[imp0], ends={imp0: 8})
    asyncio.run(rg._check_health())
    assert _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 8.0}


def test_lag_of_a_partition_with_nothing_applied_or_committed_here_is_from_the_fetch_position(rg, monkeypatch):
    """Just assigned, nothing applied or committed here: end offset minus 0 was phantom lag; exporting
    nothing hid a worker stuck before its first record from RiskgateConsumerLagGrowing."""
    imp0, imp1 = TP(rg.names.inputs[0], 0), TP(rg.names.inputs[0], 1)
    monkeypatch.setattr(rg.app.assignor, "assigned_actives", lambda: {imp0, imp1})
    rg.app._consumer = _Consumer(held=[imp0, imp1], ends={imp0: 7, imp1: 12451}, committed={imp0: 5, imp1: None},
                                 positions={imp1: 12000})
    asyncio.run(rg._check_health())
    assert rg.healthy and _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 2.0,
                                                                   ("impressions", "1"): 451.0}
    rg.app._consumer = _Consumer(held=[imp0, imp1], ends={imp0: 7, imp1: 12451}, committed={imp0: 5, imp1: None})
    asyncio.run(rg._check_health())  # the position not known either: nothing rather than a guess
    assert rg.healthy and _series(rg, "riskgate_consumer_lag") == {("impressions", "0"): 2.0}


def test_a_revoked_partition_takes_its_series_with_it(rg):
    """A former owner's frozen lag was summed with the new owner's: phantom lag on the dashboard."""
    for p in (0, 1):
        rg.metrics.lag.labels("watch", str(p)).set(100 + p)
        rg.metrics.watermark.labels(str(p)).set(1e9 + p)
    rg._drop_partition(1)
    assert _series(rg, "riskgate_consumer_lag") == {("watch", "0"): 100.0}
    assert _series(rg, "riskgate_watermark_seconds") == {("0",): 1e9}
    rg._drop_partition(1)  # twice, or never set: no error


def test_realised_risk_is_exported_as_a_sum_that_recent_traffic_can_be_read_from(rg):
    """The gauge is a mean since the partitions were assigned; the counter lets an alert take a range."""
    part = rg._partition(0)
    mon = part.engine.monitors
    mon.realised_slates[0.1], mon.realised_risk_sum[0.1] = 4, 0.5
    rg._export_monitors()
    assert _nonzero(rg, "riskgate_realised_risk_sum_total") == {("0.1",): 0.5}
    assert _nonzero(rg, "riskgate_realised_slates_total") == {("0.1",): 4.0}
    # A rebalance: partition 0 goes, 1 comes with a fresh engine. Every slate an engine counted is
    # new to the counters, which never go down. (Re-based on totals, the 1 slate and 0.25 of the new
    # engine were lost below the 4 and 0.5 of the old, and slates and sums by different amounts.)
    rg._drop_partition(0)
    part = rg._partition(1)
    part.engine.monitors.realised_slates[0.1], part.engine.monitors.realised_risk_sum[0.1] = 1, 0.25
    rg._export_monitors()
    assert _nonzero(rg, "riskgate_realised_risk_sum_total") == {("0.1",): 0.75}
    assert _nonzero(rg, "riskgate_realised_slates_total") == {("0.1",): 5.0}
    part.engine.monitors.realised_slates[0.1], part.engine.monitors.realised_risk_sum[0.1] = 3, 1.25
    rg._export_monitors()
    assert _nonzero(rg, "riskgate_realised_risk_sum_total") == {("0.1",): 1.75}  # + (1.25 - 0.25)
    assert _nonzero(rg, "riskgate_realised_slates_total") == {("0.1",): 7.0}  # + (3 - 1)
    assert _series(rg, "riskgate_realised_risk") == {("0.1",): 1.25 / 3}  # the gauge: the engines' mean


def test_counters_whose_first_increment_matters_are_exported_at_zero_from_the_start(rg):
    """rate() and increase() cannot see a series' first sample: a restore made its series with its whole
    count (a table's restore showed as nothing), and the first realised slates and ranker failures were
    invisible to the alerts."""
    from types import SimpleNamespace

    from streams.metrics import RankerMetrics
    from streams.ranker import ThresholdBook

    assert {lab for lab, v in _series(rg, "riskgate_changelog_restored_records_total").items() if v == 0} == {
        ("users",), ("partition-meta",), ("threshold-versions",)}
    alphas = {(str(a),) for a in rg.config.alphas}
    assert {k: v for k, v in _series(rg, "riskgate_realised_slates_total").items()} == dict.fromkeys(alphas, 0.0)
    assert {k: v for k, v in _series(rg, "riskgate_realised_risk_sum_total").items()} == dict.fromkeys(alphas, 0.0)
    inputs = ("impressions", "watch", "flags", "constraints", "forget")
    assert {k for k, v in _series(rg, "riskgate_dlq_total").items() if v == 0} == {
        (t, r) for t in inputs for r in INPUT_REASONS}  # the first dead letter of a reason shows in rate()
    assert {k for k, v in _series(rg, "riskgate_events_total").items() if v == 0} >= {
        (kind, "invalid") for kind in ("impression", "watch", "flag", "constraints", "forget")}
    client = SimpleNamespace(book=ThresholdBook(), healthy=True, ready=True, lag=dict)
    ranker = RankerMetrics(client)

    def ranker_series(name):
        return {tuple(s.labels.values()): s.value for m in ranker.registry.collect() for s in m.samples
                if s.name == name}

    assert ranker_series("riskgate_ranker_impressions_total") == {("sent",): 0.0, ("failed",): 0.0}
    assert ranker_series("riskgate_ranker_rejected_total") == {("risk-thresholds",): 0.0, ("safe-pools",): 0.0}


def test_a_worker_that_loses_the_aggregator_stops_exporting_what_it_published(rg):
    """A former owner of riskgate-partials kept its last λ̂ and filter_all series and its /thresholds, so the
    dashboard's max over workers could show a stale filter_all over the current owner's value."""
    from types import SimpleNamespace

    from calibration.engine import GroupResult
    from calibration.threshold import Threshold

    result = GroupResult("remove", "global", 10, (0.0, 1.0), (Threshold(0.1, None, True, None),))
    rg._record(SimpleNamespace(result=result, version=3, key="remove:global", inputs_through=1.0))
    assert _series(rg, "riskgate_threshold_filter_all") == {("remove", "global", "0.1"): 1.0}
    partials, imp0 = TP(rg.names.partials, 0), TP(rg.names.inputs[0], 0)
    # Faust revokes everything at every rebalance: a worker given riskgate-partials back keeps its values
    asyncio.run(rg._on_revoked(rg.app, {partials, imp0}))
    asyncio.run(rg._on_assigned(rg.app, {partials, imp0}))
    assert rg.latest and _series(rg, "riskgate_threshold_version") == {("remove", "global"): 3.0}
    asyncio.run(rg._on_revoked(rg.app, {partials, imp0}))
    asyncio.run(rg._on_assigned(rg.app, {imp0}))  # another worker has it now
    assert rg.latest == {}
    for name in ("riskgate_threshold_filter_all", "riskgate_threshold_lambda", "riskgate_threshold_risk_at_lambda",
                 "riskgate_threshold_version", "riskgate_threshold_published_timestamp_seconds",
                 "riskgate_threshold_inputs_age_seconds", "riskgate_window_slates"):
        assert _series(rg, name) == {}, name


def test_property1_is_exported_as_counters_that_recent_traffic_can_be_read_from(rg):
    """The gauge is a ratio since the partitions were assigned (weeks of traffic dilute it), and the
    dashboard averaged it over workers unweighted: counters per β, summed, give the curve over any range."""
    betas = {(str(b),) for b in PROPERTY1_BETAS}
    assert _series(rg, "riskgate_property1_repeats_total") == dict.fromkeys(betas, 0.0)
    part = rg._partition(0)
    mon = part.engine.monitors
    mon.repeat_seen[50.0], mon.repeat_flagged[50.0] = 8, 2
    rg._export_monitors()
    mon.repeat_seen[50.0], mon.repeat_flagged[50.0] = 10, 3
    rg._export_monitors()
    assert _nonzero(rg, "riskgate_property1_repeats_total") == {("50.0",): 10.0}
    assert _nonzero(rg, "riskgate_property1_reflagged_total") == {("50.0",): 3.0}


def test_a_revoke_stops_the_flow_before_its_flush(rg, monkeypatch):
    """The drain loop stopped delivering a fetch's chunks only when the generation changed, at the next
    assignment: chunks applied after the revoke's flush were lost (found by moving partitions under a
    backlog). The flow, which the loop checks before each chunk, must stop before that flush."""
    import faust

    seen = []

    class Consumer:
        flow_active = True

        def stop_flow(self):
            self.flow_active = False

    consumer = Consumer()
    rg.app._consumer = consumer

    async def flush():
        seen.append(consumer.flow_active)

    async def faust_revoke(self, revoked):
        seen.append("faust")

    rg.app.before_revoke = flush
    monkeypatch.setattr(faust.App, "_on_partitions_revoked", faust_revoke)
    asyncio.run(rg.app._on_partitions_revoked(set()))
    assert seen == [False, "faust"]


def test_every_dead_letter_code_of_an_input_record_is_exported_from_the_start():
    """The counter is made at 0 for INPUT_REASONS only: a code added without it would be invisible to
    rate() at its first letter. (unknown_topic cannot happen to a subscribed input; bad_snapshot is
    riskgate-partials'.)"""
    import re
    from pathlib import Path

    import streams

    codes = set()
    for path in Path(streams.__file__).parent.glob("*.py"):
        codes.update(re.findall(r'InvalidEvent\(\s*"(\w+)"', path.read_text()))
    assert "schema" in INPUT_REASONS and len(codes) > 5
    assert codes - {"unknown_topic", "bad_snapshot"} <= set(INPUT_REASONS), codes - set(INPUT_REASONS)
