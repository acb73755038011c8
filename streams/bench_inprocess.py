"""The worker's own per-event work without Kafka: where one event's microseconds go.

``riskgate bench inprocess`` builds a :class:`streams.app.RiskgateApp` (nothing
connects to a broker), feeds it the same seeded synthetic events as
``riskgate bench stream`` in fetch-sized chunks through the worker's own
methods, and flushes as the worker would (every ``flush_every`` events): users
over real RocksDB stores, safe-pools and own-threshold outputs, and the
changelog records encoded into Kafka record batches (not sent). It times each
step and prints µs per event: the part of the worker that is riskgate's, and
that Kafka and Faust add to in ``bench stream``.
"""

from __future__ import annotations

import collections
import gc
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

__all__ = ["InprocessConfig", "backlog", "bench_inprocess", "drive", "encode_batches", "step_figures", "step_table"]

STEPS = ("decode", "engine", "outputs", "table", "encode")


@dataclass(frozen=True)
class InprocessConfig:
    events: int = 300_000
    users: int = 50_000
    partitions: int = 8
    seed: int = 0
    chunk: int = 5_000  # records per call, as RISKGATE_BATCH_MAX
    flush_every: int = 25_000  # about one second of the worker's input


class _Record:
    """What the worker reads of an aiokafka ConsumerRecord."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "timestamp")

    def __init__(self, topic, partition, offset, key, value):
        self.topic, self.partition, self.offset, self.key, self.value, self.timestamp = (
            topic, partition, offset, key, value, 0)


class _Consumer:
    """The two things the batch path asks of Faust's consumer: fetch highwaters and committed offsets."""

    _committed_offset: dict = {}

    def __init__(self, ends):
        self.ends = ends

    def highwater(self, tp):
        return self.ends[(tp.topic, tp.partition)]


def backlog(cfg: InprocessConfig) -> list[tuple[str, int, int, bytes, bytes]]:
    """``bench stream``'s seeded backlog as ``(topic, partition, offset, key, value)``, topics by their base names."""
    from .bench_stream import BACKLOG_START_TS, StreamBenchConfig, _encoded, _world

    world = _world(StreamBenchConfig(events=cfg.events, users=cfg.users, partitions=cfg.partitions, seed=cfg.seed),
                   cfg.events, cfg.seed, BACKLOG_START_TS, 2_000.0, "e-")
    offsets: collections.Counter = collections.Counter()
    out = []
    for topic, key, value in _encoded(world):
        p = zlib.crc32(key) % cfg.partitions  # any stable split: the users of a partition stay together
        out.append((topic, p, offsets[(topic, p)], key, value))
        offsets[(topic, p)] += 1
    return out


def encode_batches(records) -> tuple[int, int]:
    """Append ``(key, value)`` records to Kafka record batches as a flush does (not sent); returns (records, bytes)."""
    from aiokafka.producer.message_accumulator import BatchBuilder

    from .batch_send import BATCH_BYTES

    n = size = 0
    batch = BatchBuilder(BATCH_BYTES, 0, is_transactional=False)
    for k, v in records:
        if batch.append(key=k, value=v, timestamp=None) is None:
            batch = BatchBuilder(BATCH_BYTES, 0, is_transactional=False)
            batch.append(key=k, value=v, timestamp=None)
        n += 1
        size += len(k) + (0 if v is None else len(v))
    return n, size


def drive(records: list, cfg: InprocessConfig, step, flush) -> float:
    """Feed ``records`` to ``step`` in chunks of ``cfg.chunk``, ``flush`` every ``cfg.flush_every`` and at the end;
    returns the wall seconds."""
    start = time.perf_counter()
    since = 0
    for i in range(0, len(records), cfg.chunk):
        step(records[i:i + cfg.chunk])
        since += cfg.chunk
        if since >= cfg.flush_every:
            flush()
            since = 0
    flush()
    return time.perf_counter() - start


def step_figures(t: dict, counts, n: int, wall: float) -> dict:
    """µs an event of each step and in all, and changelog records and bytes an event."""
    fig = {f"{k}_us": 1e6 * v / n for k, v in t.items()}
    fig.update(total_us=1e6 * wall / n, events_per_s=n / wall, events=n,
               changelog_records_per_event=counts["changelog"] / n,
               changelog_bytes_per_event=counts["changelog_bytes"] / n)
    return fig


def step_table(title: str, fig: dict) -> Table:
    """The figures' steps (in the order timed) and total, µs an event."""
    table = Table(title=title)
    table.add_column("step")
    table.add_column("µs / event", justify="right")
    for k, us in fig.items():
        if k.endswith("_us") and k != "total_us":
            table.add_row(k[:-3], f"{us:.2f}")
    table.add_row("total", f"{fig['total_us']:.2f}")
    return table


def bench_inprocess(cfg: InprocessConfig, console: Console | None = None) -> dict:
    console = console or Console()
    from .app import GC_THRESHOLDS, RiskgateApp
    from .schemas import decode_event
    from .settings import load_settings

    gc.set_threshold(*GC_THRESHOLDS)  # as the worker
    tmp = tempfile.mkdtemp(prefix="riskgate-inprocess-")

    # the settings of `bench stream`'s worker; the broker is never contacted
    rg = RiskgateApp(load_settings(data_dir=tmp, broker="kafka://127.0.0.1:1", topic_partitions=cfg.partitions,
                                   label_window=120.0, allowed_lateness=5.0))
    full = {rg.names.base(t): t for t in rg.names.inputs}
    records = [_Record(full[topic], p, offset, key, value) for topic, p, offset, key, value in backlog(cfg)]
    ends: collections.Counter = collections.Counter()
    for r in records:
        ends[(r.topic, r.partition)] = r.offset + 1
    rg.app._consumer = _Consumer(ends)
    base, max_items = rg._base_names, rg.settings.max_items
    t = dict.fromkeys(STEPS, 0.0)
    counts = collections.Counter()

    def step(chunk):
        t0 = time.perf_counter()
        by = collections.defaultdict(list)
        for m in chunk:
            topic = base[m.topic]
            by[m.partition].append((m, topic, decode_event(topic, m.value, m.key, max_items)))
        t1 = time.perf_counter()
        for p, items in by.items():
            rg._run_partition(p, items)
        t["decode"] += t1 - t0
        t["engine"] += time.perf_counter() - t1

    def flush():
        for part in rg.partitions.values():
            t0 = time.perf_counter()
            part.unacked = []
            out = rg._user_outputs(part, part.engine.changed)
            part.engine.changed.clear()
            t1 = time.perf_counter()
            _, _, groups = part.users.flush()
            t2 = time.perf_counter()
            written, size = encode_batches(r for group in groups for r in group)
            counts["changelog"] += written
            counts["changelog_bytes"] += size
            counts["outputs"] += len(out)
            t["outputs"] += t1 - t0
            t["table"] += t2 - t1
            t["encode"] += time.perf_counter() - t2

    try:
        wall = drive(records, cfg, step, flush)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(records)
    fig = step_figures(t, counts, n, wall)
    fig["outputs_per_event"] = counts["outputs"] / n
    console.print(step_table(f"riskgate bench inprocess: {n:,} events, no Kafka", fig))
    console.print(f"{fig['events_per_s']:,.0f} events/s in-process; changelog records/event "
                  f"{fig['changelog_records_per_event']:.2f} ({fig['changelog_bytes_per_event']:,.0f} bytes), "
                  f"outputs/event {fig['outputs_per_event']:.2f}")
    return fig
