"""A worker whose RISKGATE_TOPIC_PARTITIONS does not fit the existing topics stops at start, naming the variable.

Before, Faust created the tables' changelogs with the setting's count, began,
and stopped on its own ``PartitionsMismatch`` once records arrived; the
changelogs it had made kept the wrong count whatever the setting became.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams.broker import partition_counts

from .harness import Worker, impression_event, make_topics, produce_raw, wait_for, watch_event

pytestmark = pytest.mark.integration


def test_a_worker_refuses_topics_with_another_partition_count_and_creates_nothing(kafka_bootstrap, app_id,
                                                                                   topic_prefix, tmp_path):
    names = make_topics(kafka_bootstrap, topic_prefix, 2)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, partitions=4, prefix=topic_prefix).start()
    try:
        assert worker.proc.wait(90) == 2
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    assert "riskgate worker: the topics do not fit the settings" in log
    assert f"RISKGATE_TOPIC_PARTITIONS is 4, but {names.inputs[0]} has 2" in log
    assert "set RISKGATE_TOPIC_PARTITIONS=2 to use them as they are" in log and "Traceback" not in log
    changelogs = [f"{app_id}-{t}-changelog" for t in ("users", "partition-meta", "threshold-versions")]
    assert asyncio.run(partition_counts(kafka_bootstrap, changelogs)) == {}  # none was made with the wrong count


def test_a_worker_whose_broker_never_answers_stops_with_one_line_naming_the_setting(app_id, tmp_path):
    """Before, Faust stopped at once on it with a traceback."""
    from streams.broker import free_port

    port = free_port()  # nothing listens there
    worker = Worker(f"127.0.0.1:{port}", app_id, tmp_path / "data", tmp_path, broker_wait=1).start()
    try:
        assert worker.proc.wait(60) == 1
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    assert f"riskgate worker: no broker at 127.0.0.1:{port} answered within 1 s (last: ConnectionRefusedError" in log
    assert "check RISKGATE_BROKER" in log and "Traceback" not in log


def test_a_worker_on_a_broker_without_its_topics_creates_them_with_its_counts_and_applies_records(
        kafka_bootstrap, app_id, topic_prefix, tmp_path):
    """Found by running one by hand: Faust makes its changelogs but not its source topics, and a broker
    that creates topics on first use (tansu; Kafka with auto-creation) made the inputs with its own
    default count (4). The worker then never published (no snapshot from partitions 4-7 of 8) and
    stopped with Faust's PartitionsMismatch at its first record."""
    from streams.topics import Topics

    names = Topics(topic_prefix)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, partitions=3, prefix=topic_prefix).start()
    try:
        worker.wait_healthy(90)
        counts = asyncio.run(partition_counts(kafka_bootstrap, (*names.inputs, names.safe_pools, names.thresholds,
                                                                names.dlq, names.partials)))
        assert counts == {**{t: 3 for t in (*names.inputs, names.safe_pools)},
                          **{t: 1 for t in (names.thresholds, names.dlq, names.partials)}}
        produce_raw(kafka_bootstrap, [
            (names.inputs[0], b"u1", orjson.dumps(impression_event("u1", "e1", "s1", 1000.0,
                                                                     [("i1", 0.5, 1.0, ())]))),
            (names.inputs[1], b"u1", orjson.dumps(watch_event("u1", "w1", "i1", 1001.0))),
        ])
        wait_for(lambda: worker.metric("riskgate_events_total", type="watch", outcome="ok") >= 1, 60,
                 what="the worker to apply the records")
        worker.check_alive()
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    assert "riskgate worker: created topics" in log and "PartitionsMismatch" not in log and "Traceback" not in log
