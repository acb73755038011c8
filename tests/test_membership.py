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
from faust.types import TP

import streams.app as app_module
from streams.app import RiskgateApp
from streams.membership import GroupLease, membership_lost
from streams.settings import load_settings

from .fakes import FakeConsumer, fake_send_records


class _Coordinator:
    """aiokafka's GroupCoordinator, as far as the lease reads it."""

    def __init__(self, generation=3, member_id="m-1"):
        self.generation, self.member_id = generation, member_id

    async def _send_req(self, request):
        return None


class _AiokafkaCoordinator:
    """aiokafka's own heartbeat code (GroupCoordinator._do_heartbeat) over answers given as Kafka error
    codes (an exception: the request failed); ``on_send`` runs while a request is in flight."""

    from aiokafka.consumer.group_coordinator import GroupCoordinator as _GC

    _do_heartbeat = _GC._do_heartbeat
    reset_generation = _GC.reset_generation
    request_rejoin = _GC.request_rejoin
    coordinator_dead = _GC.coordinator_dead

    def __init__(self, loop, codes, on_send=lambda: None):
        self.group_id, self.generation, self.member_id, self.coordinator_id = "riskgate", 3, "m-1", 0
        self.codes, self.on_send = list(codes), on_send
        self._rejoin_needed_fut = loop.create_future()

    async def _send_req(self, request):
        self.on_send()
        code = self.codes.pop(0)
        if isinstance(code, Exception):
            raise code
        return SimpleNamespace(error_code=code)


NO_ERROR, REBALANCE_IN_PROGRESS, UNKNOWN_MEMBER_ID = 0, 27, 25


def test_a_heartbeat_renews_the_lease_from_when_it_was_sent_and_only_when_answered():
    from aiokafka.errors import RequestTimedOutError

    now = [100.0]
    lease = GroupLease(session_timeout=6.0, clock=lambda: now[0])
    took = [0.5, 1.0]

    def in_flight():
        now[0] += took.pop(0)

    loop = asyncio.new_event_loop()
    coordinator = _AiokafkaCoordinator(loop, [NO_ERROR, RequestTimedOutError()], on_send=in_flight)
    lease.watch(coordinator)
    lease.watch(coordinator)  # once per coordinator: not wrapped twice

    assert not lease.fresh()  # watched, never renewed
    try:
        assert loop.run_until_complete(coordinator._do_heartbeat()) is True
        assert lease.renewed_at == 100.0 and now[0] == 100.5  # the send time, not the answer's: the broker counts from between
        assert loop.run_until_complete(coordinator._do_heartbeat()) is False
    finally:
        loop.close()
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

    monkeypatch.setattr(app_module, "send_records", fake_send_records(lambda t, p, _: log.append(("send", t, p))))
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=2))
    rg.app._consumer = FakeConsumer(log, highwater=1)
    rg.app._lease = GroupLease(6.0, clock=lambda: now[0])
    rg.app.lease.watch(_Coordinator())
    rg.app.lease.renew()
    rg.app.awaiting_assignment, rg.app.inputs_open = False, True  # (as after an assignment and its recovery)
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
    app.inputs_open, app.awaiting_assignment = False, True  # (a worker just started)
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


def test_a_heartbeat_answered_during_a_rebalance_does_not_renew_the_lease():
    """Found by a review: aiokafka counts a heartbeat answered REBALANCE_IN_PROGRESS as a success, yet the
    coordinator drops a member that has not rejoined when the join phase ends, one rebalance timeout after
    it began, whatever its heartbeats: a worker whose main loop was blocked past that kept flushing for up
    to ~10 s after its partitions had moved. Nor may the lease outlast the rebalance timeout."""
    now = [100.0]
    lease = GroupLease(session_timeout=20.0, clock=lambda: now[0], rebalance_timeout=4.0)
    assert lease.term == 4.0  # (half the session would be 10 s: past the join phase's end)
    loop = asyncio.new_event_loop()
    try:
        coordinator = _AiokafkaCoordinator(loop, [NO_ERROR, REBALANCE_IN_PROGRESS, REBALANCE_IN_PROGRESS])
        lease.watch(coordinator)
        assert loop.run_until_complete(coordinator._do_heartbeat()) is True
        assert lease.renewed_at == 100.0 and not lease.moving()
        now[0] = 101.0
        assert loop.run_until_complete(coordinator._do_heartbeat()) is True  # (aiokafka: rebalancing, fine)
        assert lease.renewed_at == 100.0 and lease.moving()  # not renewed; a rejoin is pending
        now[0] = 102.0
        loop.run_until_complete(coordinator._do_heartbeat())
        assert lease.renewed_at == 100.0
        now[0] = 104.0
        assert not lease.fresh()
    finally:
        loop.close()


def test_a_rejoin_the_worker_asks_for_itself_does_not_stop_renewals():
    """Found by a review: renewals stopped whenever aiokafka had a rejoin pending, also one it asked for
    itself (a metadata change) while the group was stable and answered every heartbeat: a pre-revoke flush
    longer than the term then gave up and stopped a healthy worker. No broker deadline runs then."""
    now = [100.0]
    lease = GroupLease(session_timeout=20.0, clock=lambda: now[0], rebalance_timeout=4.0)
    loop = asyncio.new_event_loop()
    try:
        coordinator = _AiokafkaCoordinator(loop, [NO_ERROR, NO_ERROR])
        lease.watch(coordinator)
        loop.run_until_complete(coordinator._do_heartbeat())
        coordinator.request_rejoin()  # (aiokafka, on a metadata change)
        now[0] = 103.0
        assert loop.run_until_complete(coordinator._do_heartbeat()) is True
        assert lease.renewed_at == 103.0 and lease.moving()
    finally:
        loop.close()


def test_no_write_once_the_broker_no_longer_knows_the_member(worker):
    """The lease may still be fresh when a heartbeat is refused (UNKNOWN_MEMBER_ID) and aiokafka resets
    the generation: from then on nothing is written, before the revoke that follows reaches the main loop."""
    rg, log, now = worker
    loop = asyncio.new_event_loop()
    try:
        coordinator = _AiokafkaCoordinator(loop, [UNKNOWN_MEMBER_ID])
        rg.app.lease.watch(coordinator)
        assert loop.run_until_complete(coordinator._do_heartbeat()) is False
    finally:
        loop.close()
    assert rg.app.lease.fresh() and rg.app.lease.lost()
    asyncio.run(rg._on_batch([_flag("f1")]))
    asyncio.run(rg._flush_all())
    asyncio.run(rg._send_snapshots(1))
    assert not [e for e in log if e[0] in ("send", "ack")]
    assert _fenced(rg, "flush") == 1 and _fenced(rg, "snapshot") == 1
    assert rg._fenced_out is None and rg.partitions[1].unacked  # (kept for the revoke that follows: no stop)


def _two_partitions_of_flags(rg):
    asyncio.run(rg._on_batch([_flag("f1"), SimpleNamespace(**{**vars(_flag("f2")), "partition": 0})]))
    assert set(rg.partitions) == {0, 1}


def test_a_flush_stalled_half_way_waits_for_the_group_then_goes_on(worker, monkeypatch):
    """A stall inside a flush (a paused VM): the rest of it waits for the next answered heartbeat."""
    rg, log, now = worker
    monkeypatch.setattr(app_module, "LEASE_POLL", 0)
    _two_partitions_of_flags(rg)
    sends = []

    def record(topic, partition, groups):
        sends.append((topic, partition, now[0]))
        if len(sends) == 1:
            now[0] += 4.0  # stopped past the lease's term (3 s), not past the session (6 s)

    monkeypatch.setattr(app_module, "send_records", fake_send_records(record))

    async def scenario():
        flush = asyncio.create_task(rg._flush_all())
        while len(sends) < 1 or rg.app.lease.fresh():
            await asyncio.sleep(0)
        for _ in range(5):  # the flush is waiting, not writing
            await asyncio.sleep(0)
        assert len(sends) == 1
        rg.app.lease.renew()  # a heartbeat answered: still a member, same generation
        return await flush

    assert asyncio.run(scenario()) is True
    assert len(sends) > 1 and all(t >= 1004.0 for _, _, t in sends[1:])
    assert sorted(e[2] for e in log if e[0] == "ack") == [0, 1] and rg._fenced_out is None


@pytest.mark.parametrize("local_ahead", [False, True])
def test_a_flush_whose_partitions_moved_half_way_writes_nothing_more(worker, monkeypatch, local_ahead):
    """Found by a review: a flush checked the lease once, then wrote its other partitions, their
    outputs and acks after a stall in the middle of it, whatever had become of the partitions. What it
    holds is dropped for the rebalance that follows; if its local store got ahead of the changelog
    (an evicted user, written locally before the sends), the worker stops unclean as well."""
    rg, log, now = worker
    monkeypatch.setattr(app_module, "LEASE_POLL", 0)
    _two_partitions_of_flags(rg)
    if local_ahead:
        for part in rg.partitions.values():
            part.users.cache_max = 0  # (its user leaves memory at the flush: written locally first)
    coordinator = _Coordinator()
    rg.app.lease._watched = coordinator
    sends = []

    def record(topic, partition, groups):
        sends.append((topic, partition))
        if len(sends) == 1:
            now[0] += 60.0  # stopped for a minute: the broker dropped the member meanwhile
            coordinator.generation, coordinator.member_id = -1, ""

    monkeypatch.setattr(app_module, "send_records", fake_send_records(record))
    crashed = []

    async def crash(reason):
        crashed.append(reason)

    monkeypatch.setattr(rg.app, "crash", crash)
    assert asyncio.run(rg._flush_all()) is False
    assert len(sends) == 1 and not [e for e in log if e[0] == "ack"]  # nothing after the stall
    assert rg.partitions == {} and not rg.app.inputs_open and _fenced(rg, "flush") == 1
    # nor the partition's watermark, which is written after its users (review: written before, the
    # records read again after the rebalance were judged late against it)
    assert rg.meta_table.get(b"1") is None and rg.meta_table.get(b"0") is None
    assert [type(r).__name__ for r in crashed] == (["WritesFenced"] if local_ahead else [])
    coordinator.generation, coordinator.member_id = 4, "m-2"  # the rebalance that follows
    rg.app.lease.renew()
    # a stop then: not clean if the local store is ahead; else nothing is held that is not written
    assert asyncio.run(rg._flush_and_sync()) is (not local_ahead)


def test_events_dropped_with_lost_partitions_are_counted_once_read_again(worker, monkeypatch):
    """Found by a review: the counts of events dropped unflushed were kept, and counted again with the
    same records read again."""
    rg, log, now = worker

    async def faust_revoke(self, tps):
        return None

    monkeypatch.setattr(faust.App, "_on_partitions_revoked", faust_revoke)
    flags_ok = rg.metrics.events.labels("flag", "ok")
    asyncio.run(rg._on_batch([_flag("f1")]))
    rg.app.group_coordinator = lambda: _Coordinator(generation=-1, member_id="")
    asyncio.run(rg.app._on_partitions_revoked({("flags", 1)}))
    assert rg.partitions == {}
    rg.app.group_coordinator = lambda: _Coordinator()
    asyncio.run(rg._on_batch([_flag("f1")]))  # read again from the committed offset
    asyncio.run(rg._flush_all())
    assert flags_ok._value.get() == 1


def test_dead_letters_dropped_with_lost_partitions_are_counted_once_read_again(worker, monkeypatch):
    """The same for a malformed record: its dead letter, dropped unsent with the partition, was counted
    when it was read (riskgate_dlq_total and the invalid outcome), and again when read again."""
    rg, log, now = worker

    async def faust_revoke(self, tps):
        return None

    monkeypatch.setattr(faust.App, "_on_partitions_revoked", faust_revoke)
    bad = SimpleNamespace(**{**vars(_flag("f1")), "value": b"{not json"})
    asyncio.run(rg._on_batch([bad]))
    rg.app.group_coordinator = lambda: _Coordinator(generation=-1, member_id="")
    asyncio.run(rg.app._on_partitions_revoked({("flags", 1)}))
    rg.app.group_coordinator = lambda: _Coordinator()
    asyncio.run(rg._on_batch([bad]))
    asyncio.run(rg._flush_all())
    sent = [e for e in log if e[0] == "send" and e[1] == rg.names.dlq]
    assert len(sent) == 1
    assert rg.metrics.dlq.labels("flags", "bad_json")._value.get() == 1
    assert rg.metrics.events.labels("flag", "invalid")._value.get() == 1


def test_a_stop_whose_flush_found_the_lease_run_out_is_not_clean(worker, monkeypatch):
    """Found by a review: the lease was checked before the stop's flush waited for one in progress; run
    out by then, the flush wrote nothing, and the stop was counted clean (a local store vouched for)."""
    rg, log, now = worker

    async def faust_on_stop(self):
        return None

    monkeypatch.setattr(faust.App, "on_stop", faust_on_stop)
    asyncio.run(rg._on_batch([_flag("f1")]))

    async def scenario():
        release = asyncio.Event()

        async def flush_in_progress():  # its sends wait on a broker that does not answer
            async with rg._flush_lock:
                await release.wait()
                now[0] += 15.0  # no heartbeat answered meanwhile

        busy = asyncio.create_task(flush_in_progress())
        await asyncio.sleep(0)
        stop = asyncio.create_task(rg.app.on_stop())  # SIGTERM, on a fresh lease
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(busy, stop)

    asyncio.run(scenario())
    assert not rg.app.stopped_cleanly and not [e for e in log if e[0] == "ack"]
    rg.mark_clean_stop()
    assert not rg._clean_stop_marker.exists()


def test_no_snapshot_between_a_revoke_and_the_next_assignment(worker, monkeypatch):
    """Found by a review: a revoked generation's recovery completing late ends Faust's `rebalancing`
    before the next assignment; snapshots then built engines for the assignor's partitions, the revoked
    ones, and sent their windows as this worker's."""
    rg, log, now = worker
    app = rg.app
    sent = []

    async def send(key, value):
        sent.append(key)

    async def faust_noop(self, *args):
        return None

    monkeypatch.setattr(rg.partials_topic, "send", send)
    monkeypatch.setattr(faust.App, "_on_partitions_assigned", faust_noop)
    monkeypatch.setattr(faust.App, "_on_partitions_revoked", faust_noop)
    monkeypatch.setattr(app.assignor, "assigned_actives", lambda: {TP(rg.names.inputs[0], 0)})
    app.group_coordinator = lambda: _Coordinator()
    asyncio.run(app._on_partitions_assigned({TP(rg.names.inputs[0], 0)}, 3))
    asyncio.run(rg._send_snapshots(1))
    assert sent == [b"0"]  # assigned: its window goes out, idle or not
    asyncio.run(app._on_partitions_revoked({TP(rg.names.inputs[0], 0)}))
    asyncio.run(rg._on_revoked(app, {TP(rg.names.inputs[0], 0)}))  # (Faust's signal, from its revoke)
    assert rg.partitions == {} and not app.rebalancing  # (as after a stale recovery's completion)
    asyncio.run(rg._send_snapshots(2))
    assert sent == [b"0"] and rg.partitions == {}


def test_a_flush_gives_up_after_a_whole_session_unanswered(worker, monkeypatch):
    """Found by a review: waiting for the lease ended only on a loss, a rebalance or a stop; with
    aiokafka's heartbeat task gone on an error it does not retry, none of them came, and the flush held
    its lock (and the drain loop) for good. After a whole session unanswered the broker has dropped us."""
    rg, log, now = worker
    monkeypatch.setattr(app_module, "LEASE_POLL", 0)
    _two_partitions_of_flags(rg)
    crashed = []

    async def crash(reason):
        crashed.append(reason)

    def record(topic, partition, groups):
        now[0] += 4.0  # each send outlasts the lease; nothing says the member is gone

    monkeypatch.setattr(rg.app, "crash", crash)
    monkeypatch.setattr(app_module, "send_records", fake_send_records(record))

    async def scenario():
        flush = asyncio.create_task(rg._flush_all())
        while rg.app.lease.fresh():
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not flush.done()  # stale, not yet a session: it waits for a heartbeat
        now[0] += rg.app.lease.session_timeout
        return await asyncio.wait_for(flush, 10)  # (it polls the lease: done at once, unless it waits for good)

    assert asyncio.run(scenario()) is False
    assert "a whole session went unanswered" in str(crashed[0]) and not [e for e in log if e[0] == "ack"]


def test_a_batch_waits_for_the_one_before_it_then_asks_the_lease(worker, monkeypatch):
    """Found by a review: the lease was asked before aiokafka's send_batch, which then waited for the
    partition's batch before it to go out (a slow broker) and appended after the lease had run out and the
    member was dropped. aiokafka's accumulator and send_batch as they are; only the network is missing."""
    from aiokafka.producer.message_accumulator import BatchBuilder, MessageAccumulator
    from aiokafka.producer.producer import AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from streams import batch_send

    rg, log, now = worker
    monkeypatch.setattr(app_module, "LEASE_POLL", 0)
    monkeypatch.setattr(app_module, "send_records", batch_send.send_records)  # (the real one)
    monkeypatch.setattr(rg.thresholds_topic, "send_soon", lambda **kw: None)
    coordinator = _Coordinator()
    rg.app.lease._watched = coordinator
    crashed = []

    async def crash(reason):
        crashed.append(reason)

    monkeypatch.setattr(rg.app, "crash", crash)

    async def scenario():
        acc = MessageAccumulator(SimpleNamespace(), 16384, 0, 1200, loop=asyncio.get_running_loop())

        async def metadata_known(topic):
            return None

        producer = SimpleNamespace(client=SimpleNamespace(_wait_on_metadata=metadata_known), _txn_manager=None,
                                   _message_accumulator=acc, _request_timeout_ms=1_200_000,
                                   _partition=lambda topic, partition, *a: partition)
        producer.send_batch = AIOKafkaProducer.send_batch.__get__(producer)
        rg.app.producer = SimpleNamespace(_ensure_producer=lambda: producer, send_soon=lambda *a, **k: None)
        tp = TopicPartition(rg.users_table.changelog_topic.get_topic_name(), 1)
        before = BatchBuilder(16384, 0, is_transactional=False)
        before.append(key=b"k", value=b"v", timestamp=None)
        await acc.add_batch(before, tp, 1)  # the last flush's batch, not on the broker yet: a slow broker
        await rg._on_batch([_flag("f1")])
        flush = asyncio.create_task(rg._flush_all())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not flush.done()  # waiting for the batch before it, on a fresh lease
        now[0] += 60.0  # the broker answers nothing for a minute, and drops the member
        coordinator.generation, coordinator.member_id = -1, ""
        acc._batches[tp].popleft().drain_ready()  # it answers at last
        await flush
        return len(acc._batches.get(tp) or ())

    assert asyncio.run(scenario()) == 0  # nothing queued after the loss
    assert not [e for e in log if e[0] == "ack"] and rg.partitions == {} and _fenced(rg, "flush") == 1


def test_a_revoke_syncs_the_local_stores_after_its_sends(worker, monkeypatch):
    """Found by a review: the pre-revoke flush wrote every user changed since the last sync to RocksDB
    (28k users: 2.4 s) before its first send, while the lease, no longer renewed in a rebalance, ran
    out: a healthy worker gave up and stopped at an ordinary scale-out. Local only, the sync comes last."""
    from streams.state import TableUsers

    rg, log, now = worker
    monkeypatch.setattr(TableUsers, "_sync_into", lambda self, batch: log.append(("sync", self.partition)))
    asyncio.run(rg._on_batch([_flag("f1")]))
    rg.app.inputs_open = False  # (closed at the revoke: nothing is applied after its flush)
    assert asyncio.run(rg._flush_and_sync()) is True
    changelog = rg.users_table.changelog_topic.get_topic_name()
    order = [e[0] for e in log if e[:2] in (("send", changelog), ("sync", 1))]
    assert order == ["send", "sync"]


def test_a_partition_dropped_unsynced_comes_back_whole(worker, monkeypatch):
    """Found by a review: Faust moved the users table's persisted changelog offset at every forget
    marker it wrote. Users flushed since the last local sync were then only in the changelog, below
    that offset; a worker that dropped the partition unsynced (a lost or given-up flush) and got it
    back restored from the offset on, without them: a flag acked and committed, lost for good."""
    from faust.types import TP

    rg, log, now = worker
    changelog = []  # (partition, offset, key, value), as the broker would number them
    name = rg.users_table.changelog_topic.get_topic_name()

    def record(topic, partition, groups):
        if topic == name:
            changelog.extend((partition, len(changelog), k, v) for g in groups for k, v in g)

    monkeypatch.setattr(app_module, "send_records", fake_send_records(record))
    asyncio.run(rg._on_batch([_flag("f1")]))  # user u's flag, flushed and acked; not synced locally (60 s)
    asyncio.run(rg._flush_all())
    assert ("ack", "flags", 1, [0]) in log
    # a forget of another user: its marker goes through the Faust table, and Faust's callback for
    # the marker's send runs (what it did: store.set_persisted_offset(tp, marker offset))
    forget = SimpleNamespace(topic="forget", partition=1, offset=0, key=b"w", timestamp=0,
                             value=orjson.dumps({"event_id": "g1", "user_id": "w", "ts": 1_700_000_001.0}))
    asyncio.run(rg._on_batch([forget]))
    asyncio.run(rg._flush_all())
    changelog.append((1, len(changelog), b"<marker>", b"<ts>"))
    marker_sent = SimpleNamespace(result=lambda: SimpleNamespace(topic_partition=TP(name, 1), offset=changelog[-1][1]))
    rg.users_table._on_changelog_sent(marker_sent)
    rg._drop_partition(1)  # lost (or a flush given up): dropped unflushed, unsynced, the local store kept

    # the partition comes back to this worker: Faust recovers from the persisted offset on
    start = rg.users_table.persisted_offset(TP(name, 1))
    db = rg.users_table.data._db_for_partition(1)
    for part, offset, key, value in changelog:
        if part == 1 and (start is None or offset > start) and key != b"<marker>":
            if value is None:
                db.delete(key)
            else:
                db[key] = value
    u = rg._partition(1).users.get("u")
    assert u is not None and u.history["i"].flagged
