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

    def partitions(self) -> list[int] | None:
        """The input partitions ``/health`` says this worker holds, sorted; None if it exited or did not answer."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        status, body = self.get("/health")
        return sorted(json_of(body).get("partitions") or []) if status else None

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


class BrokerProxy:
    """A ``tansu proxy`` child process in front of a broker: the way a test takes the broker away from a worker.

    ``tansu proxy`` forwards the Kafka protocol request by request and rewrites
    every broker address in Metadata and FindCoordinator answers to its own
    ``--advertised-listener-url``, so a client bootstrapped at :attr:`bootstrap`
    never learns the origin's address and sends everything through the proxy,
    while the test's own clients keep talking to the origin directly.

    :meth:`cut` kills the proxy process: every connection through it is closed
    at once and new ones are refused (nothing listens on the port), which is what
    a client sees when its broker is unreachable. :meth:`restore` starts a new
    proxy on the same port and returns once it answers a Metadata request.
    """

    def __init__(self, origin: str, log_dir: Path, port: int | None = None, timeout: float = 30.0):
        self.origin = origin
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"proxy-{self.port}.log"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "BrokerProxy":
        from streams.broker import tansu_binary, wait_for_broker

        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [tansu_binary(), "proxy", "--listener-url", url, "--advertised-listener-url", url,
                 "--origin-url", f"tcp://{self.origin}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_broker(self.bootstrap, self.timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones until :meth:`restore`."""
        self.stop()

    def restore(self) -> "BrokerProxy":
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "BrokerProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tcp_peer_ports(pid: int) -> list[int]:
    """Remote ports of the established TCP connections of process ``pid`` (Linux ``/proc``).

    Lets a test check where a child process is really connected, e.g. that a
    worker behind a :class:`BrokerProxy` holds no connection to the broker itself.
    """
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # the process is gone
        return []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols[3] == "01" and cols[9] in inodes:  # 01 = ESTABLISHED
                ports.append(int(cols[2].rsplit(":", 1)[1], 16))
    return ports


def produce_pipelined(bootstrap: str, records, in_flight: int = 2000,
                      max_request_size: int = 4 * 1024 * 1024) -> dict[tuple[str, int], int]:
    """Send (topic, key, value-bytes-or-None) records as they are, pipelined through one producer.

    Sends are queued without waiting for each acknowledgement and awaited in
    groups of ``in_flight`` (like :func:`streams.producer.produce_events`); records
    to one partition keep their order. ``max_request_size`` lets values over
    the client's default 1 MiB through (to test the worker's own size limit).
    Returns ``{(topic, partition): offset after the last record sent there}``,
    what :func:`wait_committed` waits for.
    """

    async def run():
        from aiokafka import AIOKafkaProducer

        p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024,
                             max_request_size=max_request_size)
        await p.start()
        ends: dict[tuple[str, int], int] = {}

        def note(done):
            for md in done:
                key = (md.topic, md.partition)
                ends[key] = max(ends.get(key, 0), md.offset + 1)

        try:
            pending = []
            for topic, key, value in records:
                pending.append(await p.send(topic, value, key=key))
                if len(pending) >= in_flight:
                    note(await asyncio.gather(*pending))
                    pending.clear()
            note(await asyncio.gather(*pending))
        finally:
            await p.stop()
        return ends

    return asyncio.run(run())


def committed_offsets(bootstrap: str, group: str, partitions) -> dict[tuple[str, int], int | None]:
    """The consumer group's committed offsets for (topic, partition) pairs (None: nothing committed).

    Asks the group coordinator (OffsetFetch) without joining the group, so the
    group's members are not rebalanced.
    """

    async def run():
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        await c.start()
        try:
            return {(t, p): await c.committed(TopicPartition(t, p)) for t, p in partitions}
        finally:
            await c.stop()

    return asyncio.run(run())


def wait_committed(bootstrap: str, group: str, ends: dict[tuple[str, int], int], timeout: float = 60.0) -> None:
    """Wait until ``group`` has committed every offset in ``ends`` (as :func:`produce_pipelined` returns them).

    A riskgate worker acks a record only once its effects (table changelog and
    output records) are queued, and Faust flushes the producer before it
    commits: once committed, every effect of those records is on the broker.
    """
    last = {}

    def done():
        last.update(committed_offsets(bootstrap, group, ends))
        return all((last[tp] or 0) >= end for tp, end in ends.items())

    try:
        wait_for(done, timeout, interval=0.5, what="committed offsets")
    except AssertionError:
        behind = {f"{t}:{p}": (last.get((t, p)), end) for (t, p), end in ends.items()
                  if (last.get((t, p)) or 0) < end}
        raise AssertionError(f"{group} did not commit within {timeout} s; (committed, wanted): {behind}") from None


def users_changelog(app_id: str) -> str:
    """The changelog topic of a worker's ``users`` table: a record for every write to the table."""
    return f"{app_id}-users-changelog"


def published_thresholds(bootstrap: str, topic: str) -> dict:
    """The latest ``risk-thresholds`` message per key (highest version), tombstoned keys left out."""
    out: dict = {}
    for key, value, _ in read_topic(bootstrap, topic):
        k = key.decode()
        if value is None:
            out.pop(k, None)
            continue
        msg = orjson.loads(value)
        if k not in out or msg["version"] > out[k]["version"]:
            out[k] = msg
    return out


class HealthWatch:
    """Polls a worker's ``/health`` from a background thread; ``failures`` lists every non-200 answer.

    ``with HealthWatch(worker) as hw: ...`` then ``assert not hw.failures``. Entering
    returns once ``/health`` has answered, so the watch is running before the block's
    first step; ``answered`` holds the monotonic time of every answer, to show it ran
    across the steps it should have watched.
    """

    def __init__(self, worker: "Worker", interval: float = 0.25):
        self.worker, self.interval = worker, interval
        self.failures: list[tuple[float, int | None]] = []
        self.answered: list[float] = []
        self._stop = None
        self._thread = None

    def __enter__(self) -> "HealthWatch":
        import threading

        self._stop = threading.Event()
        first = threading.Event()

        def run():
            while not self._stop.is_set():
                status = self.worker.get("/health")[0]
                at = time.monotonic()
                self.answered.append(at)
                first.set()
                if status != 200:
                    self.failures.append((at, status))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="health-watch", daemon=True)
        self._thread.start()
        if not first.wait(30):
            self._stop.set()
            raise AssertionError("/health never answered")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def metric_samples(worker: "Worker", *names: str) -> dict:
    """Every sample of the named metrics: ``{(name, frozenset(label pairs)): value}`` (empty if unreachable)."""
    status, body = worker.get("/metrics")
    if status != 200:
        return {}
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if name not in names:
            continue
        pairs = []
        for part in labels.rstrip("}").split('",'):
            if part:
                k, _, v = part.partition("=")
                pairs.append((k, v.strip('"')))
        out[(name, frozenset(pairs))] = float(value)
    return out


# -- events of SPEC §2, as dicts, for tests that write their own streams ----------------------

def impression_event(uid: str, event_id: str, slate_id: str, ts: float, items, k: int | None = None,
                     policy_applied: bool = False) -> dict:
    """``items``: (item_id, score, rank_score, tags) tuples, in rank order."""
    return {"event_id": event_id, "user_id": uid, "slate_id": slate_id, "ts": ts, "k": k or len(items),
            "policy_applied": policy_applied,
            "items": [{"item_id": i, "score": s, "rank_score": r, "tags": list(tags), "replacement": False}
                      for i, s, r, tags in items]}


def watch_event(uid: str, event_id: str, item_id: str, ts: float, watch_ms: float = 9000.0,
                duration_ms: float = 10000.0) -> dict:
    return {"event_id": event_id, "user_id": uid, "item_id": item_id, "watch_ms": watch_ms,
            "duration_ms": duration_ms, "ts": ts}


def flag_event(uid: str, event_id: str, item_id: str, ts: float, kind: str = "report") -> dict:
    return {"event_id": event_id, "user_id": uid, "item_id": item_id, "kind": kind, "ts": ts}


def constraints_event(uid: str, event_id: str, ts: float, block=("guns",), unblock=()) -> dict:
    return {"event_id": event_id, "user_id": uid, "block_tags": list(block), "unblock_tags": list(unblock),
            "source": "declared", "ts": ts}


def forget_event(uid: str, event_id: str, ts: float) -> dict:
    return {"event_id": event_id, "user_id": uid, "ts": ts}


def send_events(bootstrap: str, prefix: str, events) -> dict[tuple[str, int], int]:
    """(topic, value-dict) pairs, keyed by user_id like every producer of riskgate's inputs, pipelined."""
    return produce_pipelined(bootstrap, [(prefix + t, v["user_id"].encode(), orjson.dumps(v)) for t, v in events])


def users_in_partition(stem: str, partition: int, count: int, partitions: int) -> list[str]:
    """``count`` user ids that the default partitioner (keys = user ids) puts in ``partition``."""
    from streams.topics import key_partition

    out, j = [], 0
    while len(out) < count:
        u = f"{stem}-{j}"
        if key_partition(u.encode(), partitions) == partition:
            out.append(u)
        j += 1
    return out


def outcome_counts(worker: "Worker") -> dict | None:
    """``{(type, outcome): n}`` of ``riskgate_events_total``, non-zero series only (None if unreachable)."""
    samples = metric_samples(worker, "riskgate_events_total")
    if not samples and worker.get("/metrics")[0] != 200:
        return None
    out = {}
    for (_, labels), v in samples.items():
        ls = dict(labels)
        if v:
            out[(ls["type"], ls["outcome"])] = int(v)
    return out


# -- shared input builders ---------------------------------------------------------
def tick_users(partitions: int) -> list[str]:
    """One user id per partition (keys = user ids, aiokafka's default partitioner), sorted."""
    from streams.topics import key_partition

    users, j = {}, 0
    while len(users) < partitions:
        u = f"tick-{j}"
        users.setdefault(key_partition(u.encode(), partitions), u)
        j += 1
    return sorted(users.values())


def watermark_ticks(partitions: int, ts: float) -> list[tuple[str, dict]]:
    """A one-item impression per partition at ``ts``: every partition's watermark moves to ``ts`` - lateness."""
    return [("impressions", {"event_id": f"tick-{j}", "user_id": u, "slate_id": f"tick-{j}", "k": 1, "ts": ts,
                             "policy_applied": False, "items": [{"item_id": "tick", "score": 0.5, "rank_score": 0.0}]})
            for j, u in enumerate(tick_users(partitions))]


def events_with_forgets_and_ticks(world, partitions: int, forget: int = 2) -> tuple[list, list[str]]:
    """A synthetic world's events, then forgets of its first ``forget`` users, then watermark ticks.

    Returns ``(events, forgotten)``; the ticks (ts = last + 1000) make every slate mature.
    """
    from calibration.synthetic import generate_events

    evs = list(generate_events(world))
    last = max(v["ts"] for _, v in evs)
    forgotten = sorted({v["user_id"] for _, v in evs})[:forget]
    evs += [("forget", {"event_id": f"forget-{j}", "user_id": u, "ts": last + 1}) for j, u in enumerate(forgotten)]
    return evs + watermark_ticks(partitions, last + 1000), forgotten


def calibrate_slates(tmp_path, slates: list[dict], strategy: str, alphas) -> dict:
    """``riskgate calibrate`` on window slates as /debug/window-slates lists them (its JSON output)."""
    import json

    from click.testing import CliRunner

    from streams.cli import main as cli

    path = tmp_path / f"slates-{strategy}.jsonl"
    path.write_text("".join(json.dumps({"k": s["k"], "safe_pool_size": s["safe_pool_size"], "items": s["items"]}) + "\n"
                            for s in slates))
    args = ["calibrate", "--slates", str(path), "--strategy", strategy]
    for a in alphas:
        args += ["--alpha", str(a)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


#: Worker settings for :func:`flag_every_item`'s scenarios: slates mature within the run, nothing is
#: evicted, every event is on time, and the engine that computed the expectation agrees.
FLAG_EVERY_ITEM_SETTINGS = dict(label_window=120, allowed_lateness=100000, window=86400 * 30, buckets=24,
                                min_slates=15, alphas="0.05,0.1", history_max=100000, beta=50)


def flag_every_item(seed: int, n_users: int, n_items: int, n_slates: int) -> tuple[list, list, dict[str, int]]:
    """Users' histories (a synthetic world without flags or forgets), then one flag per item each user saw.

    Returns ``(history, flags, expect)``: once every flag is applied exactly once, each user's
    ``flagged`` is ``expect[user]`` (the items it saw) and its safe pool is empty. A lost or
    repeated flag shows per user.
    """
    from calibration.engine import Engine, EngineConfig
    from calibration.events import event_from_dict
    from calibration.synthetic import WorldConfig, generate_events
    from calibration.user_state import Limits

    world = WorldConfig(seed=seed, n_users=n_users, n_items=n_items, n_slates=n_slates, slates_per_second=5.0,
                        holdout_share=0.5, rate_multiplier=20.0, label_delay=60.0, constraint_user_share=0.0)
    history = [e for e in generate_events(world) if e[0] not in ("flags", "forget")]
    eng = Engine(EngineConfig(label_window=120, allowed_lateness=100000, min_slates=15, alphas=(0.05, 0.1),
                              window=86400 * 30, limits=Limits(beta=50.0, history_max=100000)))
    for topic, value in history:
        eng.process(event_from_dict(topic, value), source=topic)
    last = max(v["ts"] for _, v in history)
    items = [(u, i) for u, state in sorted(eng.users.items()) for i in sorted(state.history)]
    flags = [("flags", {"event_id": f"F-{u}-{i}", "user_id": u, "item_id": i, "kind": "not_interested",
                        "ts": last + 1 + j * 1e-4}) for j, (u, i) in enumerate(items)]
    return history, flags, {u: len(state.history) for u, state in eng.users.items()}
