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
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration.kuairand import KuaiRandConfig, Row, convert_rows, parse_row

from .synthetic_io import GZIP_ERRORS, open_maybe_gzip

__all__ = ["KuaiRandFileError", "iter_rows", "parsed_rows", "sorted_rows", "read_kuairand"]


class KuaiRandFileError(ValueError):
    """A row the converter cannot read: ``PATH:LINE: problem``."""


def _lines(path: str | Path) -> Iterator[str]:
    """The file's lines as text (``.gz`` read through gzip); :class:`KuaiRandFileError` names one that is not UTF-8."""
    n = 0
    try:
        with open_maybe_gzip(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):  # (decoded line by line: an error can name its line)
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise KuaiRandFileError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except GZIP_ERRORS as e:
        raise KuaiRandFileError(f"{path}:{n + 1}: not a readable gzip file ({e})") from None


def iter_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """Stream the file's rows as dicts, in file order (delimiter auto-detected)."""
    return (row for _, row in _numbered_rows(path))


def _numbered_rows(path: str | Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of the file's rows; :class:`KuaiRandFileError` for one csv cannot read."""
    lines = _lines(path)
    header = next(lines, "")
    delim = "\t" if "\t" in header else ","
    names = next(csv.reader([header], delimiter=delim), [])
    reader = csv.DictReader(lines, fieldnames=[n.strip() for n in names], delimiter=delim)
    try:
        for row in reader:
            yield reader.line_num + 1, row  # (+1: the header was read apart)
    except csv.Error as e:
        raise KuaiRandFileError(f"{path}:{reader.line_num + 1}: {e}") from None


def parsed_rows(path: str | Path) -> Iterator[Row]:
    """The file's rows parsed, in file order; :class:`KuaiRandFileError` names the line of one that is not a row."""
    for line, row in _numbered_rows(path):
        try:
            parsed = parse_row(row)
        except (KeyError, ValueError, TypeError) as e:  # a missing column, a field that is not a number
            raise KuaiRandFileError(f"{path}:{line}: {e.args[0] if e.args else e}") from None
        yield parsed


def sorted_rows(path: str | Path) -> list[Row]:
    """All rows parsed and sorted by ``(time_ms, user_id)`` (stable, so file order breaks ties)."""
    rows = list(parsed_rows(path))
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
        rows: object = parsed_rows(path)
        if limit is not None:
            import itertools

            rows = itertools.islice(rows, limit)
        return convert_rows(rows, config)  # type: ignore[arg-type]
    if limit is not None:
        import itertools

        parsed = list(itertools.islice(parsed_rows(path), limit))
        parsed.sort(key=lambda r: (r.t, r.user))
        return convert_rows(parsed, config)
    return convert_rows(sorted_rows(path), config)
