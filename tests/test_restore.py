"""A changelog fetch restored in one step (``streams.restore``), against Faust's own Recovery and RocksDB store.

No broker: the worker's app is built as it would be, and its ``Recovery`` is
put in the state Faust's rebalance leaves it in (partitions added as actives,
highwaters and start offsets built, ``in_recovery``). What must hold is what
Faust's record-by-record path gives: each record at most once, in order, after
any record Faust itself buffered; the offset read and the persisted offset at
the last record; and recovery ended exactly when the last needed record is in.
The real-broker version is ``tests/integration/test_restart.py``.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.types import TP

from streams.app import RiskgateApp
from streams.restore import restore_fetch
from streams.settings import load_settings
from streams.state import partition_db


class _Record:
    """What restore_fetch reads of an aiokafka ConsumerRecord."""

    def __init__(self, offset: int, key: bytes, value: bytes | None):
        self.offset, self.key, self.value = offset, key, value


@pytest.fixture
def restoring(tmp_path):
    """The app, its users table, and changelog partition 0 under active recovery up to offset 9 (highwater)."""
    rg = RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=2))
    table = rg.users_table
    recovery = rg.app.tables.recovery
    tps = [TP(table.changelog_topic.get_topic_name(), p) for p in (0, 1)]
    for tp in tps:
        recovery.add_active(table, tp)
        recovery.active_offsets[tp] = -1  # nothing read yet (Faust's _build_offsets on an empty store)
        recovery.active_highwaters[tp] = 9 if tp.partition == 0 else -1  # partition 1: an empty changelog
    recovery._set_recovery_started()
    return rg, table, recovery, tps[0]


def _db(table):
    return {k: v for k, v in partition_db(table, 0).items() if not k.startswith(b"__faust")}


def test_a_fetch_is_written_in_order_with_its_offsets(restoring):
    rg, table, recovery, tp = restoring
    records = [_Record(0, b"a", b"1"), _Record(1, b"b", b"2"), _Record(2, b"a", b"3"), _Record(3, b"b", None)]
    assert restore_fetch(rg.app, tp, records) == 4
    assert _db(table) == {b"a": b"3"}  # the later value of a; b written then deleted
    assert recovery.active_offsets[tp] == 3
    assert table.data.persisted_offset(tp) == 3
    assert recovery.in_recovery and not recovery.signal_recovery_end.is_set()  # 4..9 still to read


def test_records_already_read_are_skipped(restoring):
    rg, table, recovery, tp = restoring
    restore_fetch(rg.app, tp, [_Record(0, b"a", b"1"), _Record(1, b"a", b"2")])
    # a fetch that overlaps what was read (a re-fetch after a seek): only offset 2 is new
    assert restore_fetch(rg.app, tp, [_Record(0, b"a", b"stale"), _Record(1, b"b", b"stale"),
                                      _Record(2, b"c", b"3")]) == 1
    assert _db(table) == {b"a": b"2", b"c": b"3"}
    assert restore_fetch(rg.app, tp, [_Record(2, b"c", b"stale")]) == 0
    assert _db(table)[b"c"] == b"3" and recovery.active_offsets[tp] == 2


def test_records_faust_buffered_go_first(restoring):
    rg, table, recovery, tp = restoring
    # Faust's own path read offsets 0 and 1 and holds them in its buffer, not yet written
    for offset, key in enumerate((b"a", b"b")):
        msg = SimpleNamespace(tp=tp, partition=0, offset=offset, key=key, value=b"old")
        recovery.buffers[table].append(SimpleNamespace(message=msg, key=key, value=b"old"))
    recovery.active_offsets[tp] = 1
    assert restore_fetch(rg.app, tp, [_Record(2, b"a", b"new")]) == 1
    assert _db(table) == {b"a": b"new", b"b": b"old"}  # none lost, and the newer a last
    assert not recovery.buffers[table]  # (not written again over it later)


def test_the_last_record_needed_ends_the_recovery(restoring):
    rg, table, recovery, tp = restoring

    async def restore():
        # Faust's recovery waits on the signal (Recovery._restart_recovery)
        waiting = asyncio.ensure_future(recovery.signal_recovery_end.wait())
        await asyncio.sleep(0)
        restore_fetch(rg.app, tp, [_Record(i, b"k%d" % i, b"v") for i in range(9)])
        await asyncio.sleep(0)
        assert recovery.in_recovery and not waiting.done()  # highwater 9 not reached
        # the highwater's record, and one after it in the same batch (tansu under-reports the end)
        restore_fetch(rg.app, tp, [_Record(9, b"k9", b"v"), _Record(10, b"k10", b"v")])
        assert await asyncio.wait_for(waiting, 1.0)  # woken
        # a waiter that starts only now (Faust schedules its wait a pass after resuming) sees it too
        assert await asyncio.wait_for(recovery.signal_recovery_end.wait(), 1.0)
        # ...and the next recovery starts with it clear: left set, the next rebalance's recovery
        # found it set and "ended" with nothing read (Faust's loop clears it only after a 5 s wait)
        recovery._set_recovery_started()
        assert recovery.in_recovery and not recovery.signal_recovery_end.is_set()
        recovery._set_recovery_ended()

    asyncio.run(restore())
    assert not recovery.in_recovery and not rg.app.in_recovery
    assert len(_db(table)) == 11 and table.data.persisted_offset(tp) == 10


def test_what_it_cannot_do_as_faust_would_is_left_to_faust(restoring):
    rg, table, recovery, tp = restoring
    records = [_Record(0, b"a", b"1")]
    other = TP(tp.topic, 5)  # not assigned here
    assert restore_fetch(rg.app, other, records) is None
    recovery.standby_tps.add(tp)
    assert restore_fetch(rg.app, tp, records) is None  # a standby (riskgate runs none; Faust's path if it did)
    recovery.standby_tps.discard(tp)
    table._on_changelog_event = lambda event: None
    assert restore_fetch(rg.app, tp, records) is None  # a table with a changelog callback
    table._on_changelog_event = None
    recovery._set_recovery_ended()
    assert restore_fetch(rg.app, tp, records) is None  # not in recovery
    assert _db(table) == {} and recovery.active_offsets[tp] == -1
