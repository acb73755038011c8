"""A clean stop and a restart on the same data directory (issue 6: local RocksDB synced lazily).

A flush sends every change to the changelog but writes a cached user's changes
to the local RocksDB only when the user is evicted, at a periodic local sync,
or before a revoke or stop (``streams.state.TableUsers``). Here the periodic
sync never comes (an hour) and the cache holds 3 users per partition, so the
local stores are written by evictions and by the stop alone. Then:

* the restarted worker holds every user exactly as before the stop, and its
  Faust recovery started past the beginning of each users changelog (the stop
  synced the offset the local store covers);
* after more events, a third worker on an empty directory, restored from the
  changelogs alone, holds every user exactly as the restarted one does, and
  wrote every record of the users changelog through the bulk restore
  (``streams.restore``).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from calibration.synthetic import WorldConfig
from streams.producer import produce_events

from .harness import (Worker, events_with_forgets_and_ticks, json_of, make_topics, read_topic, users_changelog,
                      wait_for)

pytestmark = pytest.mark.integration

PARTITIONS = 4
SETTINGS = dict(label_window=120, allowed_lateness=5, window=86400, buckets=24, min_slates=15, history_max=30,
                beta=50, user_cache=3, local_sync_interval=3600)


def _events():
    world = WorldConfig(seed=11, n_users=40, n_items=3000, n_slates=500, slates_per_second=1.0, holdout_share=0.5,
                        rate_multiplier=20.0, label_delay=60.0, constraint_user_share=0.2)
    return events_with_forgets_and_ticks(world, PARTITIONS)


def _users(worker, uids) -> dict:
    out = {}
    for uid in uids:
        status, body = worker.get(f"/users/{uid}", token=True)
        out[uid] = json_of(body) if status == 200 else status
    return out


def _await_users(worker, uids, want: dict) -> None:
    """Engines are built once a partition's tables are restored (at the first snapshot tick or event)."""
    last = []
    try:
        wait_for(lambda: last.append(_users(worker, uids)) or last[-1] == want, 60, interval=0.5,
                 what="the users as they were")
    except AssertionError:
        diff = {u: (last[-1][u], v) for u, v in want.items() if last[-1][u] != v}
        raise AssertionError(f"{len(diff)} users differ (got, want): {dict(list(diff.items())[:3])}") from None


def _consumed(worker, n: int) -> None:
    wait_for(lambda: worker.check_alive() or worker.metric("riskgate_events_total") >= n, 120,
             what=f"the worker to apply {n} events")


def _recovery_starts(log: str, changelog: str) -> dict[int, int]:
    """Partition -> offset Faust's recovery started reading ``changelog`` at (its "Reading Starts At" table)."""
    block = log.rsplit("active offsets at start of reading", 1)[1]
    starts, current = {}, None
    for line in block.splitlines():
        m = re.match(r"\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(-?\d+)\s*\|", line)
        if m is None:
            if starts and line.startswith("+"):
                break
            continue
        topic, partition, offset = m.groups()
        if topic != "〃":
            current = topic
        if current == changelog:
            starts[int(partition)] = int(offset)
    return starts


def test_a_clean_restart_on_the_same_directory_keeps_every_user(kafka_bootstrap, topic_prefix, app_id, tmp_path):
    make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    events, forgotten = _events()
    uids = sorted({v["user_id"] for _, v in events if not v["user_id"].startswith("tick-")})
    half = len(events) // 2
    first, second = events[:half], events[half:]
    asyncio.run(produce_events(kafka_bootstrap, first, prefix=topic_prefix))
    data = tmp_path / "data"
    w = Worker(kafka_bootstrap, app_id, data, tmp_path, PARTITIONS, topic_prefix, **SETTINGS).start()
    try:
        w.wait_healthy()
        _consumed(w, len(first))
        before = _users(w, uids)
    finally:
        w.stop()
    assert sum(1 for u in before.values() if u != 404) > 20  # users held, far more than 3 a partition

    again = Worker(kafka_bootstrap, app_id, data, tmp_path, PARTITIONS, topic_prefix, **SETTINGS).start()
    try:
        again.wait_healthy()
        _await_users(again, uids, before)
        starts = _recovery_starts(again.log_path.read_text(), f"{app_id}-users-changelog")
        assert len(starts) == PARTITIONS and all(offset > 0 for offset in starts.values()), starts
        asyncio.run(produce_events(kafka_bootstrap, second, prefix=topic_prefix))
        _consumed(again, len(second))
        after = _users(again, uids)
    finally:
        again.stop()
    assert all(after[u] == 404 for u in forgotten)

    changelog = read_topic(kafka_bootstrap, users_changelog(app_id))  # what the fresh worker must restore
    fresh = Worker(kafka_bootstrap, app_id, tmp_path / "empty", tmp_path, PARTITIONS, topic_prefix, **SETTINGS).start()
    try:
        fresh.wait_healthy()
        _await_users(fresh, uids, after)
        # Every record of the users changelog was written a fetch at a time (streams.restore), none by
        # Faust's own record-by-record path, and each once.
        assert fresh.metric("riskgate_changelog_restored_records_total", table="users") == len(changelog) > 0
    finally:
        fresh.stop()
