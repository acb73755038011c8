"""Users whose stored state a worker cannot read, against a real broker: set aside, erased, repaired, replayed.

The scenario of a roll back: a worker wrote the users, records in a format
this riskgate does not know reach the users changelog (produced here by hand,
as a newer riskgate would write them), and a new worker restores the
partition from the changelog. It must not crash on them nor read the users as
new (that would drop their flags). Black box:

* the worker stays healthy, ``riskgate_unreadable_users`` counts both users,
  and ``GET /users/<id>`` answers 409 with the reason;
* their events reach ``riskgate-dlq`` as ``unreadable_state`` with their
  original bytes; another user of the same partition is processed as usual;
* a forget of one of them still erases it: a tombstone for its key on the
  changelog, and the gauge down by one;
* the other is repaired (its last good core written back), a new worker
  restores it, and ``riskgate dlq-replay --reason unreadable_state --key <it>``
  sends its dead-lettered flag back: the flag is applied (the item leaves its
  safe pool) and nothing is lost.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import orjson
import pytest

from .harness import (REPO, Worker, flag_event, forget_event, impression_event, json_of, latest_by_key, make_topics,
                      produce_raw, read_topic, send_events, users_changelog, users_in_partition, wait_for, watch_event)

pytestmark = pytest.mark.integration

PARTITIONS = 2
T0 = 1_700_000_000.0
SETTINGS = dict(label_window=100, allowed_lateness=10, window=86400, buckets=24, min_slates=1000, beta=50)
NEWER_CORE = b"\x93\x63\x90\x00"  # msgpack [99, [], 0]: a core in a format this riskgate does not know


def _alive(worker: Worker) -> None:
    worker.check_alive()  # raises with the worker's log if it died


def _user(worker: Worker, uid: str) -> tuple[int | None, dict]:
    status, body = worker.get(f"/users/{uid}", token=True)
    return status, (json_of(body) if body else {})


def _dlq_replay(bootstrap: str, prefix: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "streams.cli", "dlq-replay", "--broker", f"kafka://{bootstrap}",
                          *args], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RISKGATE_TOPIC_PREFIX=prefix, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def test_users_whose_stored_state_cannot_be_read_are_set_aside_erased_or_repaired_and_replayed(
        kafka_bootstrap, topic_prefix, app_id, tmp_path):
    names = make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    bad, fixed, good = users_in_partition("u", 0, 3, PARTITIONS)
    changelog = users_changelog(app_id)
    first = Worker(kafka_bootstrap, app_id, tmp_path / "data-1", tmp_path, PARTITIONS, topic_prefix, **SETTINGS)
    first.start().wait_healthy()
    try:
        events = [("impressions", impression_event(good, "g-1", "g-s1", T0, [("g-a", 0.9, 2.0, ())]))]
        for u in (bad, fixed):
            events += [("impressions", impression_event(u, f"{u}-1", f"{u}-s1", T0, [(f"{u}-a", 0.9, 2.0, ())])),
                       ("watch", watch_event(u, f"{u}-2", f"{u}-a", T0 + 1))]  # W% 90: {u}-a is safe
        send_events(kafka_bootstrap, topic_prefix, events)
        wait_for(lambda: _alive(first) or all(_user(first, u)[0] == 200 for u in (bad, fixed, good)), 60,
                 interval=0.5, what="the three users held by the first worker")
        assert _user(first, fixed)[1]["safe_pool"] == [f"{fixed}-a"]
    finally:
        first.stop()  # (a clean stop: its flush and commit are done)

    fixed_core = latest_by_key(read_topic(kafka_bootstrap, changelog))[fixed.encode()]
    produce_raw(kafka_bootstrap, [(changelog, u.encode(), NEWER_CORE) for u in (bad, fixed)])  # keyed: their partition

    second = Worker(kafka_bootstrap, app_id, tmp_path / "data-2", tmp_path, PARTITIONS, topic_prefix, **SETTINGS)
    second.start().wait_healthy()
    try:
        send_events(kafka_bootstrap, topic_prefix, [
            ("flags", flag_event(bad, "b-3", f"{bad}-a", T0 + 3)),
            ("flags", flag_event(fixed, "f-3", f"{fixed}-a", T0 + 3)),
            ("watch", watch_event(good, "g-2", "g-a", T0 + 4)),
        ])
        dlq = wait_for(lambda: _alive(second) or (len(r := read_topic(kafka_bootstrap, names.dlq)) >= 2 and r), 60,
                       interval=0.5, what="the unreadable users' flags on the dead-letter topic")
        assert sorted(k for k, _, _ in dlq) == sorted([bad.encode(), fixed.encode()])
        for key, value, _ in dlq:
            record = json_of(value)
            assert record["reason"].startswith("unreadable_state: ") and key.decode() in record["reason"]
            assert json_of(base64.b64decode(record["value"]))["user_id"] == key.decode()
        assert second.metric("riskgate_unreadable_users") == 2
        assert second.metric("riskgate_events_total", type="flag", outcome="unreadable_state") == 2
        status, body = _user(second, bad)
        assert status == 409 and bad in body["error"]
        status, body = _user(second, good)
        assert status == 200 and body["safe_pool"] == ["g-a"]  # its watch applied (W% 90 > β)
        assert second.healthy()

        send_events(kafka_bootstrap, topic_prefix, [("forget", forget_event(bad, "b-4", T0 + 5))])
        wait_for(lambda: _alive(second) or second.metric("riskgate_unreadable_users") == 1, 60, interval=0.5,
                 what="the forgotten user to leave the gauge")
        assert wait_for(lambda: any(k == bad.encode() and v is None
                                    for k, v, _ in read_topic(kafka_bootstrap, changelog)), 60, interval=0.5,
                        what="a tombstone for the user's core on the changelog")
        assert _user(second, bad)[0] == 404
        assert len(read_topic(kafka_bootstrap, names.dlq)) == 2  # the forget was applied, not dead-lettered
    finally:
        second.stop()

    # The repair: the fixed user's last good core back on the changelog; a new worker restores it.
    produce_raw(kafka_bootstrap, [(changelog, fixed.encode(), fixed_core)])
    third = Worker(kafka_bootstrap, app_id, tmp_path / "data-3", tmp_path, PARTITIONS, topic_prefix, **SETTINGS)
    third.start().wait_healthy()
    try:
        wait_for(lambda: _alive(third) or ((r := _user(third, fixed))[0] == 200
                                           and r[1]["safe_pool"] == [f"{fixed}-a"]),
                 60, interval=0.5, what="the repaired user, readable again, its pool as before the flag")
        dry = _dlq_replay(kafka_bootstrap, topic_prefix, "--reason", "unreadable_state", "--key", fixed, "--dry-run")
        assert dry["would_replay"] == {"flags unreadable_state": 1} and dry["next_offset"] == 2
        assert len(read_topic(kafka_bootstrap, names.dlq)) == 2
        done = _dlq_replay(kafka_bootstrap, topic_prefix, "--reason", "unreadable_state", "--key", fixed)
        assert done == {"read": 2, "unparsable": 0, "selected": 1, "replayed": {"flags unreadable_state": 1},
                        "next_offset": 2}
        body = wait_for(lambda: _alive(third) or ((b := _user(third, fixed)[1]).get("flagged") == 1 and b), 60,
                        interval=0.5, what="the replayed flag applied")
        assert body["safe_pool"] == []  # the flagged item is no longer a replacement
        assert _dlq_replay(kafka_bootstrap, topic_prefix, "--from-offset", "2")["selected"] == 0
        assert len(read_topic(kafka_bootstrap, names.dlq)) == 2  # nothing dead-lettered again
    finally:
        third.stop()
