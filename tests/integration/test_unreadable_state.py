"""A user whose stored state a worker cannot read, against a real broker.

The scenario of a roll back: a worker wrote a user, a record in a format this
riskgate does not know reaches the users changelog (here produced by hand, as a
newer riskgate would write it), and a new worker restores the partition from
the changelog. It must not crash on it nor read the user as new (that would
drop its flags). Black box:

* the worker stays healthy, ``riskgate_unreadable_users`` is 1, and ``GET
  /users/<id>`` answers 409 with the reason;
* that user's events reach ``riskgate-dlq`` as ``unreadable_state`` with their
  original bytes; another user of the same partition is processed as usual;
* a forget of the user still erases it: a tombstone for its key on the
  changelog, and the gauge back to 0.
"""

from __future__ import annotations

import base64

import pytest

from .harness import (Worker, flag_event, forget_event, impression_event, json_of, make_topics, produce_raw,
                      read_topic, send_events, users_changelog, users_in_partition, wait_for, watch_event)

pytestmark = pytest.mark.integration

PARTITIONS = 2
T0 = 1_700_000_000.0
SETTINGS = dict(label_window=100, allowed_lateness=10, window=86400, buckets=24, min_slates=1000, beta=50)
NEWER_CORE = b"\x93\x63\x90\x00"  # msgpack [99, [], 0]: a core in a format this riskgate does not know


def _alive(worker: Worker) -> None:
    worker.check_alive()  # raises with the worker's log if it died


def test_a_user_whose_stored_state_cannot_be_read_is_set_aside_and_the_worker_goes_on(
        kafka_bootstrap, topic_prefix, app_id, tmp_path):
    names = make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    bad, good = users_in_partition("u", 0, 2, PARTITIONS)
    first = Worker(kafka_bootstrap, app_id, tmp_path / "data-1", tmp_path, PARTITIONS, topic_prefix, **SETTINGS)
    first.start().wait_healthy()
    try:
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(bad, "b-1", "b-s1", T0, [("b-a", 0.9, 2.0, ()), ("b-b", 0.5, 1.0, ())])),
            ("watch", watch_event(bad, "b-2", "b-a", T0 + 1)),
            ("impressions", impression_event(good, "g-1", "g-s1", T0 + 2, [("g-a", 0.9, 2.0, ())])),
        ])
        wait_for(lambda: _alive(first) or all(first.get(f"/users/{u}", token=True)[0] == 200 for u in (bad, good)),
                 60, interval=0.5, what="both users held by the first worker")
    finally:
        first.stop()  # (a clean stop: its flush and commit are done)

    changelog = users_changelog(app_id)
    produce_raw(kafka_bootstrap, [(changelog, bad.encode(), NEWER_CORE)])  # keyed: the partition of the user

    second = Worker(kafka_bootstrap, app_id, tmp_path / "data-2", tmp_path, PARTITIONS, topic_prefix, **SETTINGS)
    second.start().wait_healthy()
    try:
        send_events(kafka_bootstrap, topic_prefix, [
            ("flags", flag_event(bad, "b-3", "b-a", T0 + 3)),
            ("watch", watch_event(good, "g-2", "g-a", T0 + 4)),
        ])
        dlq = wait_for(lambda: _alive(second) or read_topic(kafka_bootstrap, names.dlq), 60, interval=0.5,
                       what="the unreadable user's flag on the dead-letter topic")
        (key, value, _), = dlq
        record = json_of(value)
        assert key == bad.encode() and record["reason"].startswith("unreadable_state: ") and bad in record["reason"]
        assert json_of(base64.b64decode(record["value"]))["event_id"] == "b-3"
        assert second.metric("riskgate_unreadable_users") == 1
        assert second.metric("riskgate_events_total", type="flag", outcome="unreadable_state") == 1
        status, body = second.get(f"/users/{bad}", token=True)
        assert status == 409 and bad in json_of(body)["error"]
        status, body = second.get(f"/users/{good}", token=True)
        assert status == 200 and json_of(body)["safe_pool"] == ["g-a"]  # its watch applied (W% 90 > β)
        assert second.healthy()

        send_events(kafka_bootstrap, topic_prefix, [("forget", forget_event(bad, "b-4", T0 + 5))])
        wait_for(lambda: _alive(second) or second.metric("riskgate_unreadable_users") == 0, 60, interval=0.5,
                 what="the forgotten user to leave the gauge")
        assert wait_for(lambda: any(k == bad.encode() and v is None
                                    for k, v, _ in read_topic(kafka_bootstrap, changelog)), 60, interval=0.5,
                        what="a tombstone for the user's core on the changelog")
        assert second.get(f"/users/{bad}", token=True)[0] == 404
        assert len(read_topic(kafka_bootstrap, names.dlq)) == 1  # the forget was applied, not dead-lettered
    finally:
        second.stop()
