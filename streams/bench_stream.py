"""``riskgate bench stream``: one worker against a real broker, measured end to end.

Figures to read, never a test that fails (machines are noisy: compare the
ratios of one run). What it does, on the local tansu broker unless
``--broker`` names one:

1. **Backlog.** Generates a seeded synthetic stream of N events (slates of 20
   items, their watch events, flags and constraints in the world's
   proportions; :mod:`calibration.synthetic`) and produces it to fresh topics.
2. **Ceiling.** A bare aiokafka consumer reads the same topics from the start
   and decodes every value with orjson: what one Python process can consume
   here at all. Measured before the worker and again once it caught up; the
   ratio is to the mean of the two.
3. **Worker.** Starts ``riskgate worker`` on the backlog and samples its
   ``/metrics`` and ``/proc`` every 0.25 s: records applied, consumer lag, RSS,
   and how long its input loop waited for fetches (``fetch_wait_share``).
   Throughput is N / (last batch applied − first batch started), both stamped
   by the worker itself.
4. **Live** (``--live-seconds``). Produces at ``--live-rate`` events/s with
   event time = wall time while the worker runs, reads ``risk-thresholds``,
   and measures freshness as each publication's input age: its publish time
   minus ``inputs_through`` (every partition had applied its records produced
   up to then), so every flag older than that age is in its numbers. It also
   reports, per flag, the wait for the next publication at all, which is
   dominated by how often thresholds change (when slates mature, or the
   heartbeat). With ``--live-rate`` above what the worker sustains this is the
   soak: lag grows during the phase and must recover after it.
5. **Size.** RocksDB bytes on disk per 100k users, peak RSS.
6. **Restore** (unless ``--no-restore``). The worker stops; a new one starts
   on an empty data directory, as after a lost disk or on a new machine, and
   restores every table from its changelog. Figures: records restored, the
   restore's own seconds (first to last restored record, from its
   ``/metrics``), and seconds from the process start until it applied a
   probe event produced at that start: how long its partitions went
   unprocessed.
   Then (unless ``--no-crash``) that worker is killed (SIGKILL) and another
   starts on its directory: seconds until it applies a probe event, which
   takes the broker giving up on the dead member (the session timeout) and a
   second full restore (an unclean stop's local stores are dropped).

``--profile FILE`` runs the worker under py-spy and prints where its time went.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calibration.synthetic import WorldConfig, generate_events

from .broker import LocalBroker, free_port
from .topics import Topics

__all__ = ["StreamBenchConfig", "bench_stream", "group_rate"]

#: Event time of the backlog's start (its events come 2,000 a second of event time).
BACKLOG_START_TS = 1_700_000_000.0
EVENTS_PER_SLATE = 21.2  # impression + ~20 watches + flags/constraints, measured on the synthetic world


@dataclass
class StreamBenchConfig:
    events: int = 1_000_000
    users: int = 50_000
    partitions: int = 8
    seed: int = 0
    broker: str | None = None  # host:port; None: a local tansu
    live_seconds: float = 0.0
    live_rate: float = 20_000.0
    live_producers: int = 1
    recompute_interval: float = 5.0
    profile: str | None = None
    out: str | None = None
    worker_env: dict = field(default_factory=dict)
    keep: bool = False  # keep the temporary directory (worker log, RocksDB data)
    restore: bool = True  # then time a new worker restoring the tables from their changelogs
    crash: bool = True  # and then kill it and time a worker restarting on its directory
    malformed_share: float = 0.0  # of the backlog's watch events made invalid (dead-lettered by the worker)
    workers: int = 1  # more than one: the backlog only, the workers' combined rate once the group settled


def _world(cfg: StreamBenchConfig, n_events: int, seed: int, start_ts: float, rate: float, prefix: str) -> WorldConfig:
    n_slates = max(1, int(n_events / EVENTS_PER_SLATE))
    return WorldConfig(seed=seed, n_users=cfg.users, n_items=200_000, n_slates=n_slates, start_ts=start_ts,
                       slates_per_second=rate / EVENTS_PER_SLATE, holdout_share=0.2, label_delay=60.0,
                       id_prefix=prefix)


def _malform(records: list, share: float, seed: int) -> int:
    """Make a seeded ``share`` of the watch events invalid in place (a negative duration); returns how many."""
    rng = random.Random(seed)
    n = 0
    for i, (topic, key, value) in enumerate(records):
        if topic == "watch" and rng.random() < share:
            v = orjson.loads(value)
            v["duration_ms"] = -1  # rejected by validation: dead-lettered with its reason
            records[i] = (topic, key, orjson.dumps(v))
            n += 1
    return n


# -- producing -------------------------------------------------------------------
async def _produce(bootstrap: str, records, prefix: str, rate: float | None = None) -> tuple[int, float]:
    """Send (topic, key, value) records; ``rate`` paces to events/s. Returns (count, seconds)."""
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await p.start()
    t0 = time.monotonic()
    n = 0
    pending = []
    try:
        for topic, key, value in records:
            pending.append(await p.send(prefix + topic, value, key=key))
            n += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
            if rate and n % 200 == 0:
                ahead = n / rate - (time.monotonic() - t0)
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*pending)
    finally:
        await p.stop()
    return n, time.monotonic() - t0


def _encoded(world: WorldConfig, wall_clock: bool = False):
    """(topic, key, value bytes); with ``wall_clock`` event ts is rewritten to the time of encoding."""
    for topic, v in generate_events(world):
        if wall_clock:
            v["ts"] = time.time()
        yield topic, v["user_id"].encode(), orjson.dumps(v)


def _live_producer(bootstrap: str, prefix: str, cfg_json: str, seconds: float, rate: float, seed: int,
                   flags_out: str) -> None:
    """Child process of the live phase: produces at ``rate`` for ``seconds``, logs each flag's send time."""
    import gc

    # The generator holds the events of the next minutes of event time (~10^6 dicts): with
    # the default thresholds the cyclic GC walked them all again and again and this process
    # topped out near 15k events/s; ~30k with collections this rare (its data is acyclic).
    gc.set_threshold(200_000, 50, 100)
    cfg = StreamBenchConfig(**json.loads(cfg_json))
    world = _world(cfg, int(rate * seconds) + 1, seed, time.time(), rate, f"live{seed}-")
    flags = []
    users = set()

    def records():
        deadline = time.monotonic() + seconds
        for topic, key, value in _encoded(world, wall_clock=True):
            if time.monotonic() > deadline:
                return
            if topic == "flags":
                flags.append(time.time())
            users.add(key.decode())
            yield topic, key, value

    asyncio.run(_produce(bootstrap, records(), prefix, rate))
    Path(flags_out).write_text(json.dumps({"flags": flags, "users": sorted(users)}))


# -- the ceiling -----------------------------------------------------------------
async def _bare_consume(bootstrap: str, topics: list[str], total: int) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    await c.start()
    try:
        await c._client.force_metadata_update()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        n, t0 = 0, None
        loads = orjson.loads
        while n < total:
            batch = await c.getmany(timeout_ms=1000, max_records=10_000)
            for msgs in batch.values():
                if t0 is None:
                    t0 = time.perf_counter()
                for m in msgs:
                    loads(m.value)
                n += len(msgs)
        return n / (time.perf_counter() - t0)
    finally:
        await c.stop()


# -- the worker ------------------------------------------------------------------
def _metrics(port: int) -> dict[str, float]:
    """Sum of samples per series name (labels summed over)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{")[0]
        out[name] += float(value)
        if name == "riskgate_flush_seconds_bucket" and 'le="1.0"' in series:
            out["riskgate_flush_seconds_le_1"] += float(value)  # flushes that took at most 1 s
    return out


def _proc_kb(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _deltas(samples: list[tuple], t0: float, t1: float) -> tuple | None:
    """(Δt, Δ of each other field) between the first and last samples taken in [t0, t1]; None if fewer than 2."""
    inside = [x for x in samples if t0 <= x[0] <= t1]
    if len(inside) < 2:
        return None
    return tuple(b - a for a, b in zip(inside[0], inside[-1]))


def _cpu_share(cpu: list[tuple[float, float, float]], t0: float, t1: float) -> tuple[float, float]:
    """Cores the worker and the broker used on average between wall times ``t0`` and ``t1``."""
    d = _deltas(cpu, t0, t1)
    if d is None:
        return float("nan"), float("nan")
    dt, worker, broker = d
    return worker / dt, broker / dt


def _fetch_share(fetch: list[tuple[float, float, float, float]], t0: float, t1: float) -> tuple[float, float]:
    """Share of wall time spent waiting for fetches, and input records applied per fetch, between ``t0`` and ``t1``."""
    d = _deltas(fetch, t0, t1)
    if d is None or d[2] == 0:
        return float("nan"), float("nan")
    dt, waited, fetches, applied = d
    return waited / dt, applied / fetches


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class _Sampler(threading.Thread):
    """Samples (t, applied, lag, rss_kb) from a worker, and (t, worker CPU s, broker CPU s), every ``interval`` s."""

    def __init__(self, port: int, pid: int, interval: float = 0.25, broker_pid: int | None = None):
        super().__init__(daemon=True)
        self.port, self.pid, self.interval, self.broker_pid = port, pid, interval, broker_pid
        self.samples: list[tuple[float, float, float, int]] = []
        self.cpu: list[tuple[float, float, float]] = []
        self.users: list[tuple[float, float]] = []  # (t, users cached): what RSS grows with
        self.fetch: list[tuple[float, float, float, float]] = []  # (t, s waited for fetches, fetches, applied)
        self.last: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                m = _metrics(self.port)
                self.last = m
                self.samples.append((time.time(), m.get("riskgate_records_applied_total", 0.0),
                                     m.get("riskgate_consumer_lag", 0.0), _proc_kb(self.pid, "VmRSS")))
                self.cpu.append((time.time(), _cpu_s(self.pid), _cpu_s(self.broker_pid)))
                self.users.append((time.time(), m.get("riskgate_users_cached", 0.0)))
                self.fetch.append((time.time(), m.get("riskgate_fetch_wait_seconds_total", 0.0),
                                   m.get("riskgate_fetches_total", 0.0), m.get("riskgate_records_applied_total", 0.0)))
            except (OSError, ValueError):
                pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _start_worker(bootstrap: str, prefix: str, partitions: int, data_dir: Path, log: Path,
                  cfg: StreamBenchConfig) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ)
    env.update({
        "RISKGATE_BROKER": f"kafka://{bootstrap}", "RISKGATE_APP_ID": prefix.rstrip("."),
        "RISKGATE_DATA_DIR": str(data_dir), "RISKGATE_TOPIC_PARTITIONS": str(partitions),
        "RISKGATE_TOPIC_PREFIX": prefix, "RISKGATE_WEB_PORT": str(port), "RISKGATE_REBALANCE_TIMEOUT": "2",
        "RISKGATE_RECOMPUTE_INTERVAL": str(cfg.recompute_interval), "RISKGATE_LABEL_WINDOW": "120",
        "RISKGATE_ALLOWED_LATENESS": "5",
    })
    env.update(cfg.worker_env)
    cmd = [sys.executable, "-m", "streams.cli", "worker", "-l", "warn"]
    if cfg.profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy: pip install py-spy")
        cmd = [spy, "record", "-r", "100", "-f", "raw", "-o", cfg.profile, "--", *cmd]
    out = open(log, "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parents[1]))
    return proc, port


def _worker_pid(proc: subprocess.Popen, profiled: bool) -> int:
    if not profiled:
        return proc.pid
    for _ in range(100):  # py-spy's child: the worker
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.1)
    return proc.pid


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited ({proc.returncode}) while waiting for {what}; log {log}")
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}; log {log}")


def _profile_summary(path: str, top: int = 18) -> list[tuple[str, float]]:
    """Share of the main thread's samples spent *in* each function (self time), and by module."""
    selfs: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack.startswith("Thread._bootstrap"):  # py-spy's raw stacks without --threads: others start here
            continue
        n = int(n)
        total += n
        selfs[stack.rsplit(";", 1)[-1]] += n
    return [(f, n / total) for f, n in selfs.most_common(top)] if total else []


# -- the run -----------------------------------------------------------------------
def bench_stream(cfg: StreamBenchConfig, console: Console | None = None) -> dict:
    console = console or Console()
    fig: dict = {"events": cfg.events, "users": cfg.users, "partitions": cfg.partitions, "seed": cfg.seed}
    tmp = Path(tempfile.mkdtemp(prefix="riskgate-bench-"))
    broker = None
    proc = None
    try:
        if cfg.broker:
            bootstrap = cfg.broker.removeprefix("kafka://")
        else:
            broker = LocalBroker(log_path=str(tmp / "tansu.log")).start()
            bootstrap = broker.bootstrap
        prefix = f"bench-{uuid.uuid4().hex[:8]}."
        names = Topics(prefix)
        names.create(bootstrap, cfg.partitions)

        with console.status("generating and producing the backlog"):
            t0 = time.perf_counter()
            world = _world(cfg, cfg.events, cfg.seed, BACKLOG_START_TS, 2_000.0, "e-")
            records = list(_encoded(world))
            if cfg.malformed_share > 0:
                fig["malformed"] = _malform(records, cfg.malformed_share, cfg.seed)
            fig["generate_s"] = time.perf_counter() - t0
            kinds = collections.Counter(t for t, _, _ in records)
            fig["event_mix"] = dict(kinds)
            backlog_users = {k.decode() for _, k, _ in records}
            fig["distinct_users"] = len(backlog_users)
            n, secs = asyncio.run(_produce(bootstrap, records, prefix))
            fig["events"] = total = n
            fig["produce_events_per_s"] = n / secs
            del records

        # The ceiling is measured before the worker and again after it caught up (the worker then
        # idle): one measurement moved by half between runs on this shared machine, and the ratio
        # is taken against the mean of the two around the worker's own run.
        def ceiling(when: str) -> float:
            with console.status(f"measuring the bare-consumer ceiling ({when})"):
                rate = asyncio.run(_bare_consume(bootstrap, list(names.inputs), total))
            fig[f"ceiling_{when}_events_per_s"] = rate
            fig["ceiling_events_per_s"] = statistics.fmean(
                fig[k] for k in ("ceiling_before_events_per_s", "ceiling_after_events_per_s") if k in fig)
            return rate

        ceiling("before")

        if cfg.workers > 1:
            fig.update(_group_phase(cfg, bootstrap, prefix, tmp, total, broker, console))
            ceiling("after")
            rate = fig["group_events_per_s"]
            fig["ratio_to_ceiling"] = None if rate is None else rate / fig["ceiling_events_per_s"]
            _print(console, fig, cfg)
            if cfg.out:
                Path(cfg.out).write_text(json.dumps(fig, indent=1))
            return fig

        log = tmp / "worker.log"
        proc, port = _start_worker(bootstrap, prefix, cfg.partitions, tmp / "data", log, cfg)
        pid = _worker_pid(proc, bool(cfg.profile))
        sampler = None
        with console.status("worker catching up on the backlog"):
            _wait(lambda: _try_metrics(port), 120, "the worker's web view", proc, log)
            sampler = _Sampler(port, pid, broker_pid=broker.proc.pid if broker is not None else None)
            sampler.start()
            _wait(lambda: sampler.last.get("riskgate_records_applied_total", 0) >= total, 1800,
                  "the backlog to be applied", proc, log)
            m = sampler.last
            first, last = m["riskgate_first_record_timestamp_seconds"], m["riskgate_last_applied_timestamp_seconds"]
            fig["worker_events_per_s"] = total / (last - first)
            fig["worker_seconds"] = last - first
            # Cores used while catching up: a worker near 1.0 is CPU-bound (one Python thread
            # holds the GIL); the broker's share is what it takes from the same two cores.
            fig["worker_cores"], fig["broker_cores"] = _cpu_share(sampler.cpu, first, last)
            # The worker's CPU an event: what a machine's speed and the broker's share do not
            # move, and what a per-process rate goal is a budget of (50k events/s: 20 µs).
            fig["worker_cpu_us_per_event"] = 1e6 * fig["worker_cores"] / fig["worker_events_per_s"]
            # Waiting for records while behind: time the worker did not work (its consumer thread
            # parsing a fetch, or the broker). Near 0: the worker's own processing is the limit.
            fig["fetch_wait_share"], fig["records_per_fetch"] = _fetch_share(sampler.fetch, first, last)
            _wait(lambda: _try_metrics(port).get("riskgate_consumer_lag", 1) == 0 or None, 60, "lag 0", proc, log)
            m = _settled(port, "riskgate_changelog_records_total")  # (the last records' flush included)
            fig["changelog_records_per_event"] = m.get("riskgate_changelog_records_total", 0) / total
            fig["changelog_bytes_per_event"] = m.get("riskgate_changelog_bytes_total", 0) / total
            if cfg.malformed_share > 0:
                fig["dead_lettered"] = int(m.get("riskgate_dlq_total", 0))
        ceiling("after")  # (the worker caught up and idle)
        fig["ratio_to_ceiling"] = fig["worker_events_per_s"] / fig["ceiling_events_per_s"]
        fig["backlog_lag"] = [(round(t - first, 2), lag) for t, _, lag, _ in sampler.samples if t >= first - 1][::8]

        if cfg.live_seconds > 0:
            fig.update(_live_phase(cfg, bootstrap, names, prefix, tmp, sampler, proc, port, log, console))

        m = _try_metrics(port)
        fig["peak_rss_mb"] = _proc_kb(pid, "VmHWM") / 1024
        fig["rss_mb_series"] = [(round(t - first, 1), round(r / 1024)) for t, _, _, r in sampler.samples][::20]
        fig["users_cached_series"] = [(round(t - first, 1), int(u)) for t, u in sampler.users][::20]
        sampler.stop()
        fig["flush_mean_ms"] = 1e3 * m.get("riskgate_flush_seconds_sum", 0) / max(1, m.get("riskgate_flush_seconds_count", 1))
        # Long flushes stall the event loop: they show as lag spikes and as older inputs in a publication.
        fig["flushes"] = int(m.get("riskgate_flush_seconds_count", 0))
        fig["flushes_over_1s"] = int(m.get("riskgate_flush_seconds_count", 0) - m.get("riskgate_flush_seconds_le_1", 0))
        proc.send_signal(signal.SIGINT if cfg.profile else signal.SIGTERM)
        proc.wait(120)
        size = _du(tmp / "data")
        fig["rocksdb_bytes"] = size
        users = len(backlog_users | fig.pop("live_user_ids", set()))
        fig["users_in_state"] = users
        fig["rocksdb_mb_per_100k_users"] = size / users * 100_000 / 2**20
        if cfg.profile:
            fig["profile_top"] = _profile_summary(cfg.profile)
        proc = None
        if cfg.restore:
            fig.update(_restore_phase(cfg, bootstrap, prefix, tmp, console))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if broker is not None:
            broker.stop()
        if cfg.keep:
            console.print(f"kept the worker's log and data in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    _print(console, fig, cfg)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(fig, indent=1))
    return fig


#: The shortest time all workers of a group must have been applying records for ``--workers`` to
#: give a rate: the samples come every 0.25 s (:class:`_Sampler`), so 2 s leaves them ~1/8 of it.
GROUP_MIN_SECONDS = 2.0


def _group_phase(cfg, bootstrap, prefix, tmp, total, broker, console) -> dict:
    """``cfg.workers`` workers of one group on the backlog: their combined rate once all of them apply records.

    Workers join one by one and every join is a rebalance, so the rate is taken
    from the first moment each worker had applied records (the last join done)
    to the end of the backlog: (records applied in between) / (time in between).
    """
    procs, samplers = [], []
    try:
        for i in range(cfg.workers):
            log = tmp / f"worker-{i}.log"
            proc, port = _start_worker(bootstrap, prefix, cfg.partitions, tmp / f"data-{i}", log, cfg)
            procs.append((proc, port, log))
        with console.status(f"{cfg.workers} workers catching up on the backlog"):
            for proc, port, log in procs:
                _wait(lambda port=port: _try_metrics(port), 120, "the worker's web view", proc, log)
                samplers.append(_Sampler(port, proc.pid, broker_pid=broker.proc.pid if broker is not None else None))
                samplers[-1].start()
            proc, _, log = procs[0]
            applied = lambda: sum(sm.last.get("riskgate_records_applied_total", 0) for sm in samplers)
            _wait(lambda: applied() >= total, 1800, "the backlog to be applied", proc, log)
        for sm in samplers:
            sm.stop()
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs:  # (every one signalled before any is waited for)
            _reap(proc)

    end = max(sm.last["riskgate_last_applied_timestamp_seconds"] for sm in samplers)
    start = min(sm.last["riskgate_first_record_timestamp_seconds"] for sm in samplers)
    out = {"workers": cfg.workers, **group_rate([sm.samples for sm in samplers], total, end),
           "group_seconds_all": end - start,
           "per_worker_events": [sm.last.get("riskgate_records_applied_total", 0) for sm in samplers]}
    if out["group_events_per_s"] is None:
        return out
    settled = end - out["group_seconds_settled"]
    cores = [_cpu_share(sm.cpu, settled, end) for sm in samplers]
    out["per_worker_cores"] = [round(w, 3) for w, _ in cores]
    out["broker_cores"] = cores[0][1]
    # CPU an event summed over the workers: against one worker's, what splitting the input costs
    out["group_cpu_us_per_event"] = 1e6 * sum(w for w, _ in cores) / out["group_events_per_s"]
    return out


def group_rate(samples: list[list[tuple]], total: int, end: float, min_seconds: float = GROUP_MIN_SECONDS) -> dict:
    """The group's rate once every worker applies records: (records after that moment) / (seconds after it).

    ``samples`` holds each worker's ``(time, records applied, ...)`` samples and
    ``end`` is when the last record was applied. The group has settled at the
    first sample in which the last worker to start had applied a record. When no
    record was left to apply after that (a backlog too small for the group, or a
    worker that never got a record), or less than ``min_seconds`` was left (the
    samples' spacing would be a large part of it: a 0.25 s window once gave
    202k events/s, 3–4 times what two workers carry), there is no rate to give:
    ``group_events_per_s`` is None and ``group_not_settled`` says why.
    """
    firsts = [next((t for t, applied, *_ in ws if applied > 0), None) for ws in samples]
    idle = [i for i, t in enumerate(firsts) if t is None]
    if idle:
        return {"group_events_per_s": None, "group_not_settled": f"worker(s) {idle} applied no record"}
    settled = max(firsts)
    before = sum(max((a for t, a, *_ in ws if t <= settled), default=0.0) for ws in samples)
    after, seconds = total - before, end - settled
    if after <= 0 or seconds <= 0:
        return {"group_events_per_s": None,
                "group_not_settled": "the backlog was applied before every worker had applied a record"}
    if seconds < min_seconds:
        return {"group_events_per_s": None,
                "group_not_settled": f"every worker applied records for only {seconds:.2f} s (under {min_seconds:g} s)"}
    return {"group_events_per_s": after / seconds, "group_events_after_settled": after,
            "group_seconds_settled": seconds}


def _restore_phase(cfg, bootstrap, prefix, tmp, console) -> dict:
    """A worker on an empty data directory; then (``cfg.crash``) that worker killed and another on its directory.

    The second waits for the broker to give up on the dead member (the session
    timeout, twice ``RISKGATE_REBALANCE_TIMEOUT``) and restores every table
    again (the local stores of an unclean stop are dropped).
    """
    cfg = dataclasses.replace(cfg, profile=None)
    with console.status("a new worker restoring the tables from their changelogs"):
        fig = _restart(cfg, bootstrap, prefix, tmp, "restore", kill=cfg.crash)
    if cfg.crash:
        with console.status("a worker restarting on the directory of a killed one"):
            fig.update({f"crash_{k}": v for k, v in _restart(cfg, bootstrap, prefix, tmp, "crash").items()})
    return fig


def _restart(cfg, bootstrap, prefix, tmp, name: str, kill: bool = False) -> dict:
    """A worker started on ``tmp/restored``: seconds until it applied a probe event produced at its start,
    the records it restored and how fast; ``kill``: then SIGKILL it (no LeaveGroup, no flush, no clean-stop
    marker: an OOM kill, a lost node), else stop it cleanly."""
    fig: dict = {}
    log = tmp / f"{name}.log"
    t0 = time.monotonic()
    proc, port = _start_worker(bootstrap, prefix, cfg.partitions, tmp / "restored", log, cfg)
    try:
        _produce_probe(bootstrap, prefix, f"bench-{name}-probe")
        restored: list[tuple[float, float]] = []  # (monotonic, records restored so far) when it moved

        def probed():
            m = _try_metrics(port)
            n = m.get("riskgate_changelog_restored_records_total", 0.0)
            if n and (not restored or n > restored[-1][1]):
                restored.append((time.monotonic(), n))
            return m.get("riskgate_records_applied_total", 0) >= 1

        _wait(probed, 1800, f"the worker ({name}) to apply a probe event", proc, log)
        fig["restart_to_processing_s"] = time.monotonic() - t0
        m = _settled(port, "riskgate_changelog_restored_records_total", every=1.0)
        fig["restored_records"] = int(m.get("riskgate_changelog_restored_records_total", 0))
        if restored:
            # from the first sample that saw records restored (up to one scrape late) to the last move
            fig["restore_s"] = restored[-1][0] - restored[0][0]
            if fig["restore_s"] > 0:
                fig["restore_records_per_s"] = (restored[-1][1] - restored[0][1]) / fig["restore_s"]
    finally:
        if kill:
            proc.kill()
            proc.wait()
        else:
            _stop(proc)
    return fig


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Wait for a signalled worker to stop; kill it if it has not within 120 s."""
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def _produce_probe(bootstrap: str, prefix: str, name: str) -> None:
    """A watch of a new user: applied once the worker processes again. Its ts is the backlog's first
    (a late watch, still applied): it matures no slate, moves no window."""
    probe = {"event_id": name, "user_id": name, "item_id": "i-probe", "watch_ms": 1000, "duration_ms": 2000,
             "ts": BACKLOG_START_TS}
    asyncio.run(_produce(bootstrap, [("watch", name.encode(), orjson.dumps(probe))], prefix))


def _settled(port: int, name: str, every: float = 2.0, tries: int = 30) -> dict:
    """The metrics once ``name`` stopped moving between two scrapes ``every`` s apart (a flush interval and more)."""
    m = _try_metrics(port)
    for _ in range(tries):
        time.sleep(every)
        again = _try_metrics(port)
        if again.get(name) == m.get(name):
            return again
        m = again
    return m


def _try_metrics(port: int) -> dict:
    try:
        return _metrics(port)
    except (OSError, ValueError):
        return {}


def _live_phase(cfg, bootstrap, names, prefix, tmp, sampler, proc, port, log, console) -> dict:
    out: dict = {}
    before = sampler.last.get("riskgate_records_applied_total", 0)
    written = _try_metrics(port)
    flag_files = [tmp / f"flags-{i}.json" for i in range(cfg.live_producers)]
    cfg_json = json.dumps({k: v for k, v in cfg.__dict__.items() if k in ("users", "partitions")})
    rate = cfg.live_rate / cfg.live_producers
    start = time.time()
    children = [subprocess.Popen([sys.executable, "-c",
                                  "import sys; from streams.bench_stream import _live_producer as f; "
                                  "f(*sys.argv[1:4], float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), sys.argv[7])",
                                  bootstrap, prefix, cfg_json, str(cfg.live_seconds), str(rate), str(1000 + i),
                                  str(flag_files[i])], cwd=str(Path(__file__).resolve().parents[1]))
                for i in range(cfg.live_producers)]
    with console.status(f"live phase: {cfg.live_rate:,.0f} events/s for {cfg.live_seconds:.0f} s"):
        for c in children:
            c.wait()
        produced_s = time.time() - start
        sent = _read_count(bootstrap, names) - cfg.events
        _wait(lambda: sampler.last.get("riskgate_records_applied_total", 0) >= before + sent, 1800,
              "the live records to be applied", proc, log)
        caught_up = time.time()
        time.sleep(cfg.recompute_interval + 2)  # one more publication round for the last flags
    now = _settled(port, "riskgate_changelog_records_total")
    for name in ("records", "bytes"):
        key = f"riskgate_changelog_{name}_total"
        out[f"live_changelog_{name}_per_event"] = (now.get(key, 0) - written.get(key, 0)) / max(1, sent)
    pubs = _threshold_pubs(bootstrap, names)
    produced = [json.loads(f.read_text()) for f in flag_files]
    flags = sorted(t for d in produced for t in d["flags"])
    live_users = set().union(*(d["users"] for d in produced))
    fresh = []
    j = 0
    for t in flags:
        while j < len(pubs) and pubs[j][1] < t:
            j += 1
        if j < len(pubs):
            fresh.append(pubs[j][0] - t)
    lag = [(t - start, lg) for t, _, lg, _ in sampler.samples if t >= start]
    out.update({
        "live_rate_target": cfg.live_rate, "live_seconds": produced_s, "live_events": sent,
        "live_rate_achieved": sent / produced_s, "live_flags": len(flags), "live_user_ids": live_users,
        "live_catch_up_after_s": caught_up - (start + produced_s),
        "live_max_lag": max((lg for _, lg in lag), default=0.0),
        "live_lag_series": [(round(t, 1), lg) for t, lg in lag][::8],
        "live_rss_mb_first_last": (round(sampler.samples[0][3] / 1024), round(sampler.samples[-1][3] / 1024)),
    })
    # Freshness of what is published: each publication's age of inputs (publish time −
    # inputs_through), over the live phase. Every flag produced before publish − age
    # is in that publication's numbers.
    in_phase = [(t, t - through) for t, through in pubs if start + 2 * cfg.recompute_interval <= t <= caught_up]
    out["publication_input_age_series"] = [(round(t - start, 2), round(a, 3)) for t, a in in_phase]
    ages = sorted(a for _, a in in_phase)
    if ages:
        out.update({"publication_input_age_p50_s": ages[len(ages) // 2],
                    "publication_input_age_p99_s": ages[int(len(ages) * 0.99)],
                    "publication_input_age_max_s": ages[-1], "publications": len(ages),
                    "publication_input_age_over_goal": sum(a > cfg.recompute_interval + 1 for a in ages)})
    if fresh:
        # Thresholds are published when they change (a flag changes them once its slate
        # matures, label_window later) or at the heartbeat: this one waits for that.
        fresh.sort()
        out.update({"flag_to_next_publication_p50_s": fresh[len(fresh) // 2],
                    "flag_to_next_publication_max_s": fresh[-1], "flags_measured": len(fresh)})
    return out


def _read_count(bootstrap: str, names: Topics) -> int:
    """Records on the input topics (from fetch highwaters: tansu's ListOffsets lags)."""
    async def run():
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await c.start()
        try:
            await c._client.force_metadata_update()
            tps = [TopicPartition(t, p) for t in names.inputs for p in sorted(c.partitions_for_topic(t) or ())]
            c.assign(tps)
            for tp in tps:
                c.seek(tp, 0)
            for _ in range(50):
                await c.getmany(timeout_ms=200, max_records=1)
                if all(c.highwater(tp) is not None for tp in tps):
                    break
            return sum(c.highwater(tp) or 0 for tp in tps)
        finally:
            await c.stop()

    return asyncio.run(run())


def _threshold_pubs(bootstrap: str, names: Topics) -> list[tuple[float, float]]:
    """(publish time, inputs_through) of every global threshold record, by publish time."""
    async def run():
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await c.start()
        try:
            tp = TopicPartition(names.thresholds, 0)
            c.assign([tp])
            await c.seek_to_beginning(tp)
            out = []
            idle = 0
            while idle < 3:
                batch = await c.getmany(timeout_ms=500, max_records=10_000)
                msgs = [m for ms in batch.values() for m in ms]
                idle = 0 if msgs else idle + 1
                for m in msgs:
                    if m.value is None or not m.key.endswith(b":global"):
                        continue
                    through = orjson.loads(m.value).get("inputs_through")
                    if through is not None:
                        out.append((m.timestamp / 1000.0, through))
            out.sort()
            return out
        finally:
            await c.stop()

    return asyncio.run(run())


def _print(console: Console, fig: dict, cfg: StreamBenchConfig) -> None:
    t = Table(title=f"riskgate bench stream: {fig['events']:,} events, {fig['distinct_users']:,} users, "
                    f"{cfg.partitions} partitions, " + ("one worker" if cfg.workers == 1 else f"{cfg.workers} workers"))
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key, val in fig.items():
        if key.endswith("_series") or key in ("backlog_lag", "profile_top", "live_lag_series"):
            continue
        # None: not measured in this run (a figure that says why sits beside it, e.g. group_not_settled)
        # (escaped: rich reads "[nan, nan]" as a markup tag and prints nothing)
        t.add_row(key, f"{val:,.3f}" if isinstance(val, float) else "—" if val is None else escape(str(val)))
    console.print(t)
    for key, label in (("backlog_lag", "consumer lag during the backlog (s, records)"),
                       ("live_lag_series", "consumer lag during the live phase (s, records)"),
                       ("rss_mb_series", "worker RSS (s, MB)"), ("users_cached_series", "users cached (s, users)")):
        series = fig.get(key)
        if series:  # about a dozen points of each
            console.print(f"{label}: " + ", ".join(f"{t}:{int(v)}" for t, v in series[:: max(1, len(series) // 12)]))
    for name, share in fig.get("profile_top", []):
        console.print(f"  {share:6.1%}  {name}")
