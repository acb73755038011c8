"""Time the compiled fold on ``bench columnar``'s events, after checking it against ``ColumnarPartition``.

Run from the repository root with the project's venv, once ``cfold`` is built here:
``.venv/bin/python docs/experiments/compiled-fold/run.py [events]``. Prints µs an event of each step
for two layouts of the same floor: Python columns (``riskgate bench columnar``) and compiled
columns called once per event from the same Python loop.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import msgspec  # noqa: E402
from cfold import CFold  # noqa: E402
from rich.console import Console  # noqa: E402

import streams.bench_columnar as bc  # noqa: E402
from streams.bench_inprocess import InprocessConfig, backlog  # noqa: E402
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


if __name__ == "__main__":
    cfg = InprocessConfig(events=int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    check()
    quiet = Console(quiet=True)
    rows = {"python columns": bc.bench_columnar(cfg, quiet)[0]}
    python_columns = bc.ColumnarPartition
    bc.ColumnarPartition = CFold
    try:
        rows["compiled columns"] = bc.bench_columnar(cfg, quiet)[0]
    finally:
        bc.ColumnarPartition = python_columns
    for name, fig in rows.items():
        print(f"{name:32}", "  ".join(f"{k[:-3]} {v:5.2f}" for k, v in fig.items() if k.endswith("_us")))
