"""Restoring a table from its changelog a fetch at a time, not a record at a time.

After a crash, on a new machine or when a partition moves, Faust rebuilds each
assigned table partition's RocksDB from its changelog topic. It does so record
by record: a Faust message, a table event, a task for ``wait_first``, a flow
control queue, ``asyncio.wait_for`` around the queue's ``get`` (another task),
then ``need_recovery()`` over every partition. Measured here (``riskgate bench
stream``'s restore phase, 2026-11-24): ~10,000 records/s, with the RocksDB
writes themselves 1 % of the time. The users changelog holds ~2 records per
input event (see :mod:`streams.state`), so a worker that took 35 s to apply a
backlog of a million events needed over three minutes to restore what it
wrote, during which its partitions are processed by nobody.

:func:`restore_fetch` applies one fetch of one changelog partition in a single
RocksDB write batch and does Faust's per-record bookkeeping once: the offset
read (``Recovery.active_offsets``, what ``need_recovery`` compares with the
highwater), the persisted offset in the partition's database, and the end of
recovery when that was the last record needed. Records already applied (at or
below the offset read) are skipped, exactly as Faust skips them.

It takes only what it can do exactly as Faust would, and says so by returning
``None``: any other fetch (a standby partition, a table whose store is not
RocksDB, a table with a changelog callback, a transactional app, a partition not
under active recovery) takes Faust's own path, unchanged. So that the two paths
never reorder one partition's records, a table's records Faust buffered but
has not written yet are written first.

This reads attributes of faust-streaming's ``Recovery`` (pinned in
``requirements.lock``). The integration tests restore workers from their
changelogs and compare every user with an uninterrupted run, so an
incompatible Faust upgrade fails there.
"""

from __future__ import annotations

from time import monotonic
from typing import Sequence

import rocksdict
from faust.stores.rocksdb import Store as RocksDBStore

__all__ = ["restore_fetch"]


def restore_fetch(app, tp, records: Sequence) -> int | None:
    """Apply aiokafka ``records`` of changelog partition ``tp`` to their table; None: not taken (Faust's path).

    Returns how many records were written (0 when all had been applied before).
    """
    tables = app.tables
    recovery = tables.recovery
    _clear_end_signal_at_each_start(recovery)
    if not recovery.in_recovery or tp not in recovery.active_tps or tp in recovery.standby_tps:
        return None
    if app.in_transaction:  # (aborted transactions' records need Faust's handling)
        return None
    table = recovery.tp_to_table.get(tp)
    if table is None or table._on_changelog_event is not None:
        return None
    store = table.data
    if not isinstance(store, RocksDBStore) or not store.use_rocksdict:
        return None
    offsets = recovery.active_offsets
    seen = offsets.get(tp)
    if seen is not None:
        records = [r for r in records if r.offset > seen]
    if not records:
        return 0
    held = recovery.buffers.get(table)
    if held:  # records of this table Faust read earlier: theirs go first
        table.apply_changelog_batch(held)
        held.clear()
    batch = rocksdict.WriteBatch(raw_mode=True)
    for r in records:
        if r.value is None:
            batch.delete(r.key)
        else:
            batch.put(r.key, r.value)
    store._db_for_partition(tp.partition).write(batch)
    last = records[-1].offset
    store.set_persisted_offset(tp, last)
    now = monotonic()
    offsets[tp] = last
    recovery._active_events_received_at[tp] = now  # (its stall warnings)
    recovery._last_flush_at = now
    if not recovery.need_recovery():
        # What Recovery._slurp_changelogs does after the last record it needed; it
        # would otherwise notice only after waiting 5 s for a record that never comes.
        recovery.flush_buffers()
        recovery._set_recovery_ended()
        # Left set for the recovery waiting on it, whether it waits already or is about to
        # (Faust schedules its wait a loop pass after resuming the partitions); the next
        # recovery's start clears it (_clear_end_signal_at_each_start).
        recovery.signal_recovery_end.set()
    return len(records)


def _clear_end_signal_at_each_start(recovery) -> None:
    """Make every recovery start by clearing the end signal :func:`restore_fetch` may have left set.

    Faust's own loop clears it at the top of its next pass, which comes only after
    its 5 s wait for a changelog record times out. A rebalance in between found it
    set: the next recovery "ended" with nothing read, the worker ran on stale local
    state and wrote users back with counts gone (a group crashed on one, found by
    churning workers). Clearing it right after setting it could instead lose it for
    a waiter not yet waiting. ``_set_recovery_started`` runs before the partitions
    to restore are resumed, so no record of the new recovery can have set it yet.
    """
    if getattr(recovery, "_riskgate_clears_end_signal", False):
        return
    started = recovery._set_recovery_started

    def _started() -> None:
        recovery.signal_recovery_end.clear()
        started()

    recovery._set_recovery_started = _started
    recovery._riskgate_clears_end_signal = True
