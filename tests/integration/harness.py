"""Running real workers against a real broker from tests: processes, topics, polling."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from streams.broker import free_port
from streams.topics import Topics

TOKEN = "test-token"
REPO = Path(__file__).resolve().parents[2]


def wait_for(condition, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``condition()`` until it returns a truthy value; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def make_topics(bootstrap: str, prefix: str, partitions: int) -> Topics:
    names = Topics(prefix)
    names.create(bootstrap, partitions)
    return names


class Worker:
    """One ``riskgate worker`` child process."""

    def __init__(self, bootstrap: str, app_id: str, data_dir: Path, log_dir: Path, partitions: int = 4,
                 prefix: str = "", **settings):
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "RISKGATE_BROKER": f"kafka://{bootstrap}",
            "RISKGATE_APP_ID": app_id,
            "RISKGATE_DATA_DIR": str(data_dir),
            "RISKGATE_TOPIC_PARTITIONS": str(partitions),
            "RISKGATE_TOPIC_PREFIX": prefix,
            "RISKGATE_WEB_PORT": str(self.port),
            "RISKGATE_WEB_TOKEN": TOKEN,
            "RISKGATE_REBALANCE_TIMEOUT": "2",
            "RISKGATE_RECOMPUTE_INTERVAL": "1",
            "RISKGATE_HEARTBEAT": "5",
            # tansu quirks (see test_broker_smoke.TANSU_NOTES): exact end offsets for recovery
            "RISKGATE_PRODUCER_MAX_BATCH_SIZE": "1",
            "RISKGATE_RECOVERY_CONSISTENCY_CHECK": "false",
            "PYTHONPATH": str(REPO),
        })
        self.env.update({f"RISKGATE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = Path(log_dir) / f"worker-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Worker":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "-l", "info"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)
        return self

    def get(self, path: str, token: bool = False):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {TOKEN}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None, b""

    def healthy(self) -> bool:
        self.check_alive()
        return self.get("/health")[0] == 200

    def wait_healthy(self, timeout: float = 60.0) -> "Worker":
        wait_for(self.healthy, timeout, what=f"worker on :{self.port} to report healthy (log {self.log_path})")
        return self

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        status, body = self.get("/metrics")
        if status != 200:
            return float("nan")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}; log:\n" + self.log_path.read_text()[-4000:])

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[tuple[bytes | None, bytes | None, int]]:
    """Every record of ``topic`` from the beginning up to its current end: (key, value, partition).

    Raises if the end is not reached within ``timeout``: a partial read would
    make "latest value per key" silently wrong.
    """

    async def run():
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await c.start()
        try:
            parts = c.partitions_for_topic(topic) or set()
            if not parts:
                await c._client.force_metadata_update()
                parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            if not tps:
                return []
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            # The end comes from the first fetch responses' high watermarks: tansu
            # answers ListOffsets (end_offsets) with stale numbers, fetches correctly.
            out = []
            deadline = time.monotonic() + timeout
            ends: dict = {}
            while True:
                batch = await c.getmany(timeout_ms=200, max_records=10_000)
                for tp, msgs in batch.items():
                    out.extend((m.key, m.value, tp.partition, m.offset) for m in msgs)
                for tp in tps:
                    if tp not in ends and c.highwater(tp) is not None:
                        ends[tp] = c.highwater(tp)
                if len(ends) == len(tps) and all([await c.position(tp) >= ends[tp] for tp in tps]):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not read {topic} to its end within {timeout} s")
            return [(k, v, p) for k, v, p, off in out if off < ends[TopicPartition(topic, p)]]
        finally:
            await c.stop()

    return asyncio.run(run())


def latest_by_key(records) -> dict:
    out = {}
    for key, value, _ in records:
        out[key] = value
    return out


def produce_raw(bootstrap: str, records) -> None:
    """Send (topic, key, value-bytes) records as they are (for malformed input)."""

    async def run():
        from aiokafka import AIOKafkaProducer

        p = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await p.start()
        try:
            for topic, key, value in records:
                await p.send_and_wait(topic, value, key=key)
        finally:
            await p.stop()

    asyncio.run(run())


def json_of(raw: bytes):
    return orjson.loads(raw)
