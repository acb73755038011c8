"""Time the compiled fold on ``bench columnar``'s events, after checking it against ``ColumnarPartition``.

Run from the repository root with the project's venv, once ``cfold`` is built here:
``.venv/bin/python docs/experiments/compiled-fold/run.py [events]``. Prints µs an event of each step
for three layouts of the same floor: Python columns (``riskgate bench columnar``), compiled
columns called once per event from Python, and compiled columns with the per-event loop compiled too.
"""

import collections
import gc
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import msgspec  # noqa: E402
from cfold import CFold  # noqa: E402
from rich.console import Console  # noqa: E402

import streams.bench_columnar as bc  # noqa: E402
from streams.app import GC_THRESHOLDS  # noqa: E402
from streams.bench_inprocess import InprocessConfig, backlog, drive, encode_batches, step_figures  # noqa: E402
from streams.schemas import decode_event  # noqa: E402


def check(events: int = 100_000) -> None:
    """Both folds write the same rows for one partition's events (NaN read as None)."""
    a, b = bc.ColumnarPartition(), CFold()
    for topic, p, off, key, value in backlog(InprocessConfig(events=events)):
        if p == 0:
            ev = decode_event(topic, value, key)
            assert a.apply(ev, topic, off) == b.apply(ev, topic, off)
    dec = msgspec.msgpack.Decoder()

    def rows(records):
        return {k: sorted(tuple(None if isinstance(x, float) and math.isnan(x) else
                                tuple(x) if isinstance(x, list) else x for x in r) for r in dec.decode(v))
                for k, v in records if k.endswith(b"\x00d")}

    ra, rb = rows(a.flush()), rows(b.flush())
    assert ra == rb and ra, "the compiled fold differs from ColumnarPartition"
    print(f"same rows for {len(ra)} users")


def loop_compiled(cfg: InprocessConfig) -> dict:
    gc.set_threshold(*GC_THRESHOLDS)
    records = backlog(cfg)
    parts = {p: CFold() for p in range(cfg.partitions)}
    t = dict.fromkeys(bc.STEPS, 0.0)
    counts: collections.Counter = collections.Counter()

    def step(chunk):
        t0 = time.perf_counter()
        by = collections.defaultdict(list)
        for topic, p, offset, key, value in chunk:
            by[p].append((topic, offset, decode_event(topic, value, key)))
        t1 = time.perf_counter()
        for p, items in by.items():
            counts["ok"] += parts[p].apply_many(items)
        t["decode"] += t1 - t0
        t["engine"] += time.perf_counter() - t1

    def flush():
        for part in parts.values():
            t0 = time.perf_counter()
            out = part.flush()
            t1 = time.perf_counter()
            written, size = encode_batches(out)
            counts["changelog"] += written
            counts["changelog_bytes"] += size
            t["table"] += t1 - t0
            t["encode"] += time.perf_counter() - t1

    wall = drive(records, cfg, step, flush)
    return step_figures(t, counts, len(records), wall)


if __name__ == "__main__":
    cfg = InprocessConfig(events=int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    check()
    quiet = Console(quiet=True)
    rows = {"python columns": bc.bench_columnar(cfg, quiet)[0]}
    python_columns = bc.ColumnarPartition
    bc.ColumnarPartition = CFold
    try:
        rows["compiled columns, Python loop"] = bc.bench_columnar(cfg, quiet)[0]
    finally:
        bc.ColumnarPartition = python_columns
    rows["compiled columns and loop"] = loop_compiled(cfg)
    for name, fig in rows.items():
        print(f"{name:32}", "  ".join(f"{k[:-3]} {v:5.2f}" for k, v in fig.items() if k.endswith("_us")))
