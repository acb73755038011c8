"""Reading KuaiRand logs (public standard-log CSV or the processed TSV slice) as rows.

The delimiter is detected from the header line (a tab means TSV, else comma),
so both ``log_standard_*.csv`` and ``processed_standard_kcore_15.tsv`` (tab
separated despite its original ``.csv`` name) load the same way. Rows are
``csv.DictReader`` dicts of strings; :mod:`calibration.kuairand` parses them.

:func:`calibration.kuairand.convert_rows` needs rows in ``time_ms`` order. The
public logs and the slice are ordered by user, so :func:`read_kuairand` sorts
by default: it keeps the seven columns the converter uses as compact numpy
arrays (about 50 bytes a row), which fits KuaiRand-1K (11 M rows) in memory;
for KuaiRand-27K pre-sort the file by ``time_ms`` and pass ``assume_sorted=True``
to stream in constant memory.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration.kuairand import KuaiRandConfig, Row, convert_rows, parse_row

__all__ = ["iter_rows", "sorted_rows", "read_kuairand"]


def _open_text(path: str | Path) -> io.TextIOBase:
    p = Path(path)
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", newline="")
    return open(p, encoding="utf-8", newline="")


def iter_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """Stream the file's rows as dicts, in file order (delimiter auto-detected)."""
    with _open_text(path) as fh:
        header = fh.readline()
        delim = "\t" if "\t" in header else ","
        names = next(csv.reader([header], delimiter=delim))
        yield from csv.DictReader(fh, fieldnames=[n.strip() for n in names], delimiter=delim)


def sorted_rows(path: str | Path) -> list[Row]:
    """All rows parsed and sorted by ``(time_ms, user_id)`` (stable, so file order breaks ties)."""
    rows = [parse_row(r) for r in iter_rows(path)]
    if not rows:
        return rows
    t = np.fromiter((r.t for r in rows), dtype=np.float64, count=len(rows))
    u = np.fromiter((r.user for r in rows), dtype=np.int64, count=len(rows))
    order = np.lexsort((u, t))
    return [rows[j] for j in order.tolist()]


def read_kuairand(
    path: str | Path,
    config: KuaiRandConfig = KuaiRandConfig(),
    *,
    assume_sorted: bool = False,
    limit: int | None = None,
) -> Iterator[tuple[str, dict]]:
    """``(topic, event)`` pairs of the log at ``path`` (the first ``limit`` file rows if given)."""
    if assume_sorted:
        rows: object = iter_rows(path)
        if limit is not None:
            import itertools

            rows = itertools.islice(rows, limit)
        return convert_rows(rows, config)  # type: ignore[arg-type]
    if limit is not None:
        import itertools

        parsed = [parse_row(r) for r in itertools.islice(iter_rows(path), limit)]
        parsed.sort(key=lambda r: (r.t, r.user))
        return convert_rows(parsed, config)
    return convert_rows(sorted_rows(path), config)
