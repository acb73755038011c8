"""Multi-topic event files: one JSON object per line, ``{"topic": ..., "value": {...}}``.

One file holds a whole multi-topic stream (impressions, watch, flags,
constraints, forget) in the order it was produced, which for
:func:`calibration.synthetic.generate_events` is event-time order (up to the
deliberately late events). ``value`` is exactly the Kafka message value of
SPEC §2; the key is ``value["user_id"]``. Example line::

    {"topic":"flags","value":{"event_id":"e-17","user_id":"u3","item_id":"i9","kind":"report","ts":1649376001.5}}

Writing and reading both stream (constant memory). A path ending in ``.gz`` is
gzip-compressed transparently.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import IO, Iterable, Iterator

import orjson

from .topics import INPUT_TOPICS

__all__ = ["write_jsonl", "read_jsonl", "EventFileError"]


class EventFileError(ValueError):
    """A line that is not ``{"topic": str, "value": object}``: ``PATH:LINE: problem``."""


def open_maybe_gzip(path: str | Path, mode: str) -> IO[bytes]:
    """``path`` opened in binary ``mode``, through gzip when its name ends in ``.gz``."""
    p = Path(path)
    return gzip.open(p, mode) if p.suffix == ".gz" else open(p, mode)


#: What reading a ``.gz`` file raises when it is not gzip, or is cut short (as its lines are read).
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def write_jsonl(
    events: Iterable[tuple[str, dict]],
    path: str | Path,
    *,
    progress: bool = False,
    total: int | None = None,
) -> int:
    """Write ``(topic, value)`` pairs to ``path``, one line each; returns the number written.

    ``progress`` shows a rich progress bar (``total`` events if known).
    """
    n = 0
    dumps = orjson.dumps
    with open_maybe_gzip(path, "wb") as fh:
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("writing events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
                task = bar.add_task("events", total=total)
                buf: list[bytes] = []
                for topic, value in events:
                    buf.append(dumps({"topic": topic, "value": value}))
                    n += 1
                    if len(buf) >= 8192:  # batch writes and bar refreshes
                        fh.write(b"\n".join(buf) + b"\n")
                        bar.advance(task, len(buf))
                        buf.clear()
                if buf:
                    fh.write(b"\n".join(buf) + b"\n")
                    bar.advance(task, len(buf))
        else:
            buf = []
            for topic, value in events:
                buf.append(dumps({"topic": topic, "value": value}))
                n += 1
                if len(buf) >= 8192:
                    fh.write(b"\n".join(buf) + b"\n")
                    buf.clear()
            if buf:
                fh.write(b"\n".join(buf) + b"\n")
    return n


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(topic, value)`` pairs from a file written by :func:`write_jsonl`.

    Blank lines are skipped. Only the envelope is checked here (the values are
    validated by the consumer, which dead-letters bad ones per SPEC §2).
    """
    lineno = 0
    try:
        with open_maybe_gzip(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    raise EventFileError(f"{path}:{lineno}: bad JSON ({err})") from None
                if not (isinstance(obj, dict) and isinstance(obj.get("topic"), str)
                        and isinstance(obj.get("value"), dict)):
                    raise EventFileError(f"{path}:{lineno}: expected {{\"topic\": str, \"value\": object}}")
                if obj["topic"] not in INPUT_TOPICS:  # (produce would send it to a topic of that name)
                    raise EventFileError(f"{path}:{lineno}: unknown topic {obj['topic']!r} "
                                         f"(one of {', '.join(INPUT_TOPICS)})")
                yield obj["topic"], obj["value"]
    except GZIP_ERRORS as e:
        raise EventFileError(f"{path}:{lineno + 1}: not a readable gzip file ({e})") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.synthetic_io OUT.jsonl [--slates N] [--seed S] [--set field=value ...]``.

    Writes a synthetic world's stream (any :class:`~calibration.synthetic.WorldConfig`
    field can be set with ``--set``, e.g. ``--set holdout_share=1.0``), or with
    ``--kuairand LOG`` the conversion of a KuaiRand log, with a progress bar.
    """
    import argparse
    import dataclasses

    from calibration.synthetic import WorldConfig, generate_events

    ap = argparse.ArgumentParser(prog="python -m streams.synthetic_io", description=main.__doc__)
    ap.add_argument("out", help="output .jsonl or .jsonl.gz")
    ap.add_argument("--slates", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--kuairand", metavar="LOG", help="convert a KuaiRand log instead (CSV or TSV)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.kuairand:
        from streams.kuairand_io import KuaiRandFileError, read_kuairand

        try:
            events = read_kuairand(args.kuairand)  # (read and sorted whole: a bad row stops it before OUT is opened)
        except KuaiRandFileError as e:
            ap.exit(2, f"{ap.prog}: {e}\n")
        n = write_jsonl(events, args.out, progress=not args.quiet)
    else:
        types = {f.name: f.type for f in dataclasses.fields(WorldConfig)}
        overrides: dict[str, object] = {"n_slates": args.slates, "seed": args.seed}
        for item in args.set:
            name, _, raw = item.partition("=")
            if name not in types:
                ap.error(f"unknown WorldConfig field {name!r}")
            try:
                overrides[name] = orjson.loads(raw) if raw not in ("None", "") else None
            except orjson.JSONDecodeError:
                ap.error(f"--set {item}: the value is not JSON (strings need quotes)")
            if isinstance(overrides[name], list):
                overrides[name] = tuple(overrides[name])  # band_shares
        try:
            config = WorldConfig(**overrides)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            ap.error(f"bad world: {e}")
        n = write_jsonl(generate_events(config), args.out, progress=not args.quiet)
    if not args.quiet:
        print(f"{n} events -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
