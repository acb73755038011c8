"""Topic names and the wire formats riskgate writes (SPEC §2, §7).

Inputs (JSON values, key = user_id): ``impressions``, ``watch``, ``flags``,
``constraints``, ``forget``. Outputs: ``risk-thresholds`` (key
``strategy:group``), ``safe-pools`` (compacted, key ``user_id``),
``riskgate-dlq``. Internal: ``riskgate-partials`` (one partition: each
partition's window totals, read by the single aggregator).
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

import msgspec
import orjson
from aiokafka.partitioner import DefaultPartitioner

from calibration.engine import EngineConfig, GroupResult
from calibration.safe_pool import SafeItem
from calibration.window import CurveAccumulator

__all__ = [
    "Topics",
    "INPUT_TOPICS",
    "THRESHOLDS",
    "SAFE_POOLS",
    "DLQ",
    "PARTIALS",
    "DLQ_MAX_BYTES",
    "threshold_message",
    "safe_pool_message",
    "encode_snapshot",
    "decode_snapshot",
    "InvalidSnapshot",
    "key_partition",
    "partition_layout",
    "layout_problems",
]

INPUT_TOPICS = ("impressions", "watch", "flags", "constraints", "forget")
THRESHOLDS = "risk-thresholds"
SAFE_POOLS = "safe-pools"
DLQ = "riskgate-dlq"
PARTIALS = "riskgate-partials"
#: Largest dead-letter record (the original value, up to 1 MB, in base64 plus its envelope).
DLQ_MAX_BYTES = 4 * 1024 * 1024
#: riskgate-partials carries each partition's window totals every RECOMPUTE_INTERVAL (~64 kB a
#: partition with the default grid: ~4 GB a day at 8 partitions) and only the latest round is
#: ever read (a restarted aggregator waits for the next): an hour of it is plenty.
PARTIALS_CONFIG = {"retention.ms": str(3600 * 1000)}

_PARTITIONER = DefaultPartitioner()


@lru_cache(maxsize=1 << 16)
def key_partition(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions`` under Kafka's default partitioner: murmur2(key) mod n.

    Producers of the input topics (keyed by user id) and riskgate's ``safe-pools``
    records use it, so a user's events, state and pool share one partition
    number; a sharded ranker routes a user with it (:class:`streams.ranker.Shard`).
    """
    parts = list(range(partitions))
    return _PARTITIONER(key, parts, parts)


@dataclass(frozen=True)
class Topics:
    """The topic names with an optional prefix (``RISKGATE_TOPIC_PREFIX``, empty by default).

    A prefix lets several riskgate deployments (or test runs) share one cluster.
    """

    prefix: str = ""

    def __getattr__(self, name: str) -> str:  # pragma: no cover - only for unknown names
        raise AttributeError(name)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.prefix + t for t in INPUT_TOPICS)

    @property
    def thresholds(self) -> str:
        return self.prefix + THRESHOLDS

    @property
    def safe_pools(self) -> str:
        return self.prefix + SAFE_POOLS

    @property
    def dlq(self) -> str:
        return self.prefix + DLQ

    @property
    def partials(self) -> str:
        return self.prefix + PARTIALS

    def base(self, topic: str) -> str:
        """The spec name of a (prefixed) topic: ``acme.flags`` -> ``flags``."""
        return topic[len(self.prefix):] if self.prefix and topic.startswith(self.prefix) else topic

    def create(self, bootstrap: str, partitions: int, replication: int = 1, **client_kwargs) -> list[str]:
        """Create every topic riskgate uses that does not exist yet (inputs and safe-pools with
        ``partitions``, the rest with one), in one admin session; returns the names created."""
        import asyncio

        from .broker import create_topic_specs

        compact = {"cleanup.policy": "compact"}
        specs = [*((t, partitions, {}) for t in self.inputs),
                 (self.thresholds, 1, compact),
                 (self.partials, 1, PARTIALS_CONFIG),
                 (self.dlq, 1, {"max.message.bytes": str(DLQ_MAX_BYTES)}),
                 (self.safe_pools, partitions, compact)]
        return asyncio.run(create_topic_specs(bootstrap, specs, replication, **client_kwargs))


def threshold_key(strategy: str, group: str) -> str:
    return f"{strategy}:{group}"


def partition_layout(names: Topics, app_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(topics with ``RISKGATE_TOPIC_PARTITIONS`` partitions, topics with exactly one).

    The input topics, ``safe-pools`` and the changelogs of the per-partition
    tables (``users``, ``partition-meta``) share one count: a user's events,
    state and pool live under one partition number (Faust refuses a table whose
    changelog differs from its source; a ranker shard finds a user's pool by
    it). ``riskgate-partials`` has exactly one, so that one aggregator sums
    every partition's totals, and so has ``threshold-versions``' changelog.
    """
    shared = (*names.inputs, names.safe_pools, *(f"{app_id}-{t}-changelog" for t in ("users", "partition-meta")))
    return shared, (names.partials, f"{app_id}-threshold-versions-changelog")


def layout_problems(actual: Mapping[str, int], names: Topics, app_id: str, partitions: int,
                    setting: str = "RISKGATE_TOPIC_PARTITIONS") -> list[str]:
    """Why the existing topics (``actual``: name -> partition count) do not fit ``partitions``; [] if they do.

    Topics that do not exist yet are fine: the worker creates them.
    """
    shared, single = partition_layout(names, app_id)
    out = []
    off = {t: actual[t] for t in shared if t in actual and actual[t] != partitions}
    if off:
        existing = {actual[t] for t in shared if t in actual}
        hint = (f"set {setting}={existing.pop()} to use them as they are" if len(existing) == 1
                else "recreate the topics that differ")
        out.append(f"{setting} is {partitions}, but " + ", ".join(f"{t} has {n}" for t, n in off.items())
                   + " partitions. The input topics, safe-pools and the tables' changelogs must all have "
                   + f"{setting} partitions (a changelog's count cannot be changed): {hint}")
    out += [f"{t} has {actual[t]} partitions; it must have exactly 1" for t in single if actual.get(t, 1) != 1]
    return out


def threshold_message(result: GroupResult, config: EngineConfig, version: int, computed_at: float | None = None,
                      inputs_through: float | None = None) -> bytes:
    """One ``risk-thresholds`` value, as SPEC §7 shows it, plus the loss it was computed with and
    ``inputs_through``: every partition had applied its input records produced up to this wall time
    (the oldest partition's newest record; ``null`` when unknown, as for ``user:`` groups)."""
    start, end = result.window if result.window is not None else (None, None)
    return orjson.dumps(
        {
            "version": version,
            "computed_at": time.time() if computed_at is None else computed_at,
            "strategy": result.strategy,
            **threshold_basis(config),
            "group": result.group,
            "window": {"start": start, "end": end},
            "n": result.n,
            "thresholds": [t.to_dict() for t in result.thresholds],
            "inputs_through": inputs_through,
        }
    )


def threshold_basis(config: EngineConfig) -> dict:
    """What every published λ̂ says it was computed with (SPEC §4: "every output names the loss").

    ``min_slates`` tells consumers when to fall back (SPEC §5): a group whose
    ``n`` is below it has no λ̂ of its own, and a ranker uses the next group in
    ``user:<id>`` → band → ``global`` (``global`` is used whatever its ``n``).
    """
    return {
        "guarantee": config.guarantee,
        "delta": config.delta if config.guarantee == "high_probability" else None,
        "loss": config.loss,
        "min_slates": config.min_slates,
    }


_json = msgspec.json.Encoder()


def safe_pool_message(user_id: str, pool: Iterable[SafeItem], blocked: Iterable[str],
                      user_thresholds: Iterable[GroupResult] = (), version: int = 0, band: str = "low",
                      basis: Mapping[str, object] | None = None) -> bytes:
    """One ``safe-pools`` value: the pool with rank scores, blocked tags, band, the user's own λ̂ if any.

    ``basis`` (:func:`threshold_basis`) goes into each own λ̂, as into every ``risk-thresholds`` value.
    """
    # msgspec encodes the SafeItem structs as {"item_id", "rank_score", "tags"} objects, ~10× faster
    # than building a dict per item (a pool is re-sent whenever it changes).
    return _json.encode(
        {
            "user_id": user_id,
            "band": band,
            "safe_pool": pool if isinstance(pool, list) else list(pool),
            "blocked_tags": sorted(blocked),
            "thresholds": {
                r.strategy: {"group": r.group, "n": r.n, "version": version, **(basis or {}),
                             "thresholds": [t.to_dict() for t in r.thresholds]}
                for r in user_thresholds
            },
        }
    )


def encode_snapshot(partition: int, watermark: float | None, span, totals: Mapping[tuple[str, str], CurveAccumulator],
                    through: float | None = None, round_: int | None = None) -> bytes:
    """A partition's window totals for the aggregator (fixed-point sums, base64).

    ``through``: producer timestamp (s) of the newest input record applied to them;
    ``round_``: the snapshot tick it was sent at (wall time / RECOMPUTE_INTERVAL).
    """
    return orjson.dumps(
        {
            "partition": partition,
            "round": round_,
            "through": through,
            "watermark": watermark,
            "span": list(span) if span else None,
            "totals": {f"{s}|{g}": base64.b64encode(acc.to_bytes()).decode() for (s, g), acc in totals.items()},
        }
    )


class InvalidSnapshot(ValueError):
    """A ``riskgate-partials`` record that is not a snapshot this worker can sum; the message says why."""


def _number(v, name: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidSnapshot(f"{name} must be a finite number or null")
    return float(v)


def decode_snapshot(raw: bytes, grid_size: int | None = None, partitions: int | None = None
                    ) -> tuple[int, float | None, tuple | None, dict[tuple[str, str], CurveAccumulator],
                               float | None, int | None]:
    """``(partition, watermark, span, totals, through, round)``, as :meth:`Aggregator.update` takes them.

    Raises :class:`InvalidSnapshot` for anything :func:`encode_snapshot` would not
    have written, or written by a worker with another grid (``grid_size``) or
    partition count (``partitions``): summing such totals would fail, or give λ̂
    over windows that are not this deployment's. Totals of strategies or groups
    this worker does not publish are kept; the sum ignores them (a rolling
    deploy that adds a strategy).
    """
    try:
        d = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError) as e:
        raise InvalidSnapshot(f"not JSON ({e})") from None
    if not isinstance(d, dict):
        raise InvalidSnapshot("not a JSON object")
    partition = d.get("partition")
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0 or (
            partitions is not None and partition >= partitions):
        raise InvalidSnapshot(f"partition must be an input partition (0..{partitions - 1 if partitions else 'n'})")
    round_ = d.get("round")
    if round_ is not None and (isinstance(round_, bool) or not isinstance(round_, int)):
        raise InvalidSnapshot("round must be an integer or null")
    watermark, through = _number(d.get("watermark"), "watermark"), _number(d.get("through"), "through")
    span = d.get("span")
    if span is not None:
        if not isinstance(span, list) or len(span) != 2:
            raise InvalidSnapshot("span must be [start, end] or null")
        span = (_number(span[0], "span"), _number(span[1], "span"))
        if None in span:
            raise InvalidSnapshot("span must be [start, end] or null")
    raw_totals = d.get("totals")
    if not isinstance(raw_totals, dict):
        raise InvalidSnapshot("totals must be an object")
    totals = {}
    for key, b64 in raw_totals.items():
        st, sep, group = key.partition("|")
        if not sep:
            raise InvalidSnapshot(f"totals key {key[:80]!r} is not strategy|group")
        try:
            data = base64.b64decode(b64, validate=True) if isinstance(b64, str) else None
        except binascii.Error:
            data = None
        if not data or len(data) % 8:
            raise InvalidSnapshot(f"totals[{key[:80]!r}] is not an encoded accumulator")
        acc = CurveAccumulator.from_bytes(data)
        if acc.n < 0:
            raise InvalidSnapshot(f"totals[{key[:80]!r}] counts {acc.n} slates")
        if grid_size is not None and len(acc.increments) != grid_size:
            raise InvalidSnapshot(f"totals[{key[:80]!r}] has {len(acc.increments)} grid points, this worker {grid_size}")
        totals[(st, group)] = acc
    return partition, watermark, span, totals, through, round_
