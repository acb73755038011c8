"""A worker writes for its partitions only while it can show it still belongs to the group (streams.membership).

A worker stalled past its session timeout wrote its stale users after the new
owner's records (tests/integration/test_stalled_worker.py runs that against a
real broker); these check the pieces without one.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import faust
import orjson
import pytest

import streams.app as app_module
from streams.app import RiskgateApp
from streams.membership import GroupLease, membership_lost
from streams.settings import load_settings

from .fakes import FakeConsumer


class _Coordinator:
    """aiokafka's GroupCoordinator, as far as the lease reads it."""

    def __init__(self, answers=(), generation=3, member_id="m-1", on_beat=lambda: None):
        self.answers, self.generation, self.member_id, self.on_beat = list(answers), generation, member_id, on_beat

    async def _do_heartbeat(self):
        self.on_beat()  # (the request in flight)
        return self.answers.pop(0)


def test_a_heartbeat_renews_the_lease_from_when_it_was_sent_and_only_when_answered():
    now = [100.0]
    lease = GroupLease(session_timeout=6.0, clock=lambda: now[0])
    took = [0.5, 1.0]

    def in_flight():
        now[0] += took.pop(0)

    coordinator = _Coordinator(answers=[True, False], on_beat=in_flight)
    lease.watch(coordinator)
    lease.watch(coordinator)  # once per coordinator: not wrapped twice

    assert not lease.fresh()  # watched, never renewed
    assert asyncio.run(coordinator._do_heartbeat()) is True
    assert lease.renewed_at == 100.0 and now[0] == 100.5  # the send time, not the answer's: the broker counts from between
    assert asyncio.run(coordinator._do_heartbeat()) is False
    assert lease.renewed_at == 100.0
    now[0] = 102.99
    assert lease.fresh()
    now[0] = 103.0
    assert not lease.fresh() and lease.age() == pytest.approx(3.0)
    lease.renew(99.0)  # renewals never move it back
    assert lease.renewed_at == 100.0


def test_a_reset_generation_or_member_id_is_a_lost_membership():
    assert not membership_lost(_Coordinator())
    assert membership_lost(_Coordinator(generation=-1, member_id=""))
    assert membership_lost(_Coordinator(member_id=""))
    assert not membership_lost(None)  # nobody to ask: the lease decides


@pytest.fixture
def worker(tmp_path, monkeypatch):
    log, now = [], [1000.0]

    async def send_records(app, topic, partition, groups, on_sent=None, fence=False):
        groups = [list(g) for g in groups]
        log.append(("send", topic, partition))
        return sum(len(g) for g in groups), 0

    monkeypatch.setattr(app_module, "send_records", send_records)
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=2))
    rg.app._consumer = FakeConsumer(log, highwater=1)
    rg.app._lease = GroupLease(6.0, clock=lambda: now[0])
    rg.app.lease.watch(_Coordinator())
    rg.app.lease.renew()
    return rg, log, now


def _flag(event_id: str) -> SimpleNamespace:
    value = orjson.dumps({"event_id": event_id, "user_id": "u", "item_id": "i", "kind": "report",
                          "ts": 1_700_000_000.0})
    return SimpleNamespace(topic="flags", partition=1, offset=0, key=b"u", value=value, timestamp=0)


def _fenced(rg, what: str) -> float:
    return rg.metrics.fenced.labels(what)._value.get()


def test_a_flush_on_a_stale_lease_writes_nothing_and_keeps_its_records_unacked(worker):
    rg, log, now = worker
    asyncio.run(rg._on_batch([_flag("f1")]))
    now[0] += 3.0  # no heartbeat answered for half the session
    asyncio.run(rg._flush_all())
    assert log == [] and len(rg.partitions[1].unacked) == 1 and _fenced(rg, "flush") == 1
    asyncio.run(rg._send_snapshots(1))
    assert _fenced(rg, "snapshot") == 1
    rg.app.lease.renew()  # the group answered again: the same records are written and acked now
    asyncio.run(rg._flush_all())
    assert ("send", rg.users_table.changelog_topic.get_topic_name(), 1) in log
    assert log[-1] == ("ack", "flags", 1, [0]) and not rg.partitions[1].unacked


def test_lost_partitions_are_dropped_unflushed(worker, monkeypatch):
    rg, log, now = worker
    asyncio.run(rg._on_batch([_flag("f1")]))
    revoked = []

    async def faust_revoke(self, tps):  # (Faust's own revocation needs a running app)
        revoked.append(set(tps))

    monkeypatch.setattr(faust.App, "_on_partitions_revoked", faust_revoke)
    rg.app.group_coordinator = lambda: _Coordinator(generation=-1, member_id="")  # the broker dropped us
    asyncio.run(rg.app._on_partitions_revoked({("flags", 1)}))
    assert log == [("stop_flow",)] and rg.partitions == {} and _fenced(rg, "lost") == 1 and revoked
    asyncio.run(rg._flush_all())
    assert log == [("stop_flow",)]  # nothing left to write: the next owner re-reads the record

    # still a member, with a fresh lease: the revoke flushes as before
    asyncio.run(rg._on_batch([_flag("f2")]))
    rg.app.group_coordinator = lambda: _Coordinator()
    asyncio.run(rg.app._on_partitions_revoked({("flags", 1)}))
    assert ("ack", "flags", 1, [0]) in log and _fenced(rg, "lost") == 1


def test_input_records_flow_only_after_the_recovery_of_the_current_assignment(worker, monkeypatch):
    """A recovery that completed after a revoke (its assignment already being replaced) resumed Faust's
    flow, and records applied then, before the next assignment, were lost (crash audit: 291 first
    watches of 11 users). The gate opens only for the recovery of the assignment in force, and before
    Faust resumes and seeks the input partitions, so that nothing fetched after that seek is skipped."""
    rg, log, now = worker
    app = rg.app
    seen = []

    async def faust_completed(generation_id=0):  # Faust's: resumes and seeks the input partitions
        seen.append((generation_id, app.inputs_open))

    async def faust_noop(self, *args, **kwargs):
        return None

    monkeypatch.setattr(faust.App, "_on_partitions_assigned", faust_noop)
    monkeypatch.setattr(faust.App, "_on_partitions_revoked", faust_noop)
    app.tables.recovery.on_recovery_completed = faust_completed
    app.group_coordinator = lambda: _Coordinator()
    assert not app.inputs_open  # nothing before the first assignment's recovery

    app.consumer_generation_id = 3
    asyncio.run(app._on_partitions_assigned(set(), 3))
    assert not app.inputs_open  # assigned, not recovered
    asyncio.run(app.tables.recovery.on_recovery_completed(3))
    assert app.inputs_open and seen[-1] == (3, True)  # open when Faust resumes and seeks

    asyncio.run(app._on_partitions_revoked(set()))
    assert not app.inputs_open
    asyncio.run(app.tables.recovery.on_recovery_completed(3))  # generation 3's recovery, completing late
    assert not app.inputs_open and seen[-1] == (3, False)
    app.consumer_generation_id = 4
    asyncio.run(app._on_partitions_assigned(set(), 4))
    asyncio.run(app.tables.recovery.on_recovery_completed(4))
    assert app.inputs_open
