"""The downstream side: a client that follows riskgate's outputs and applies Algorithm 1.

:class:`ThresholdBook` is pure: it holds the latest ``risk-thresholds`` and
``safe-pools`` values and resolves λ̂ for a user (``user:<id>`` → band →
``global``, SPEC §5). :class:`RankerClient` keeps a book up to date from Kafka
with a group-less aiokafka consumer reading both topics from the beginning.
:meth:`ThresholdBook.apply` runs :func:`calibration.policy.apply_policy`.

A value the book cannot use (not JSON, or missing what :meth:`ThresholdBook.resolve`
and :meth:`ThresholdBook.apply` read) is refused with a logged reason and counted in
:attr:`ThresholdBook.rejected`; the key keeps its last good value and the client
goes on reading. Before, one such record raised in the client's read loop, which
died unseen: the book froze and the ranker served the old λ̂ for good.
:attr:`RankerClient.healthy` says whether the loop is still reading.

**Ready.** Until the client has read both topics up to where they ended when it
started, its book lacks users' pools, bands and blocked tags: a ranker serving
then would serve a user the ``low`` band's λ̂ and items of tags the user blocked.
:attr:`RankerClient.ready` turns true once it has caught up (and stays true);
serve only then (the example ranker answers 503 before).

**Shards.** ``safe-pools`` holds one value per user (for a pool of 20 items,
1.4 kB on the wire and ~10 kB parsed in the book), too many for every ranker
replica to hold on a platform of hundreds of millions of users. With ``shard=Shard(i, n)`` a replica follows only the
``safe-pools`` partitions ``p`` with ``p mod n = i`` (and all of
``risk-thresholds``, one small value per group); requests for a user are routed
to replica :meth:`RankerClient.shard_of` of the user, which :meth:`RankerClient.owns`
checks. A user's partition is Kafka's default partitioner's, as riskgate writes it
(:func:`streams.topics.key_partition`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Sequence

import msgspec
import orjson

from calibration.groups import GLOBAL, band_group, user_group
from calibration.policy import Candidate, Served, apply_policy
from calibration.safe_pool import SafeItem

from .topics import SAFE_POOLS, THRESHOLDS, key_partition

__all__ = ["ThresholdBook", "RankerClient", "Decision", "InvalidOutput", "Shard"]

log = logging.getLogger("riskgate.ranker")


class InvalidOutput(ValueError):
    """A ``risk-thresholds`` or ``safe-pools`` value the book cannot use; the message says why."""


# What the book reads of each value, checked before it replaces the last good one (the
# writers are streams.topics.threshold_message and safe_pool_message; other fields pass).
class _Level(msgspec.Struct):
    alpha: float
    lam: float | None = msgspec.field(name="lambda")


class _Thresholds(msgspec.Struct):
    version: int
    thresholds: list[_Level]
    n: int | None = None
    min_slates: int | None = None  # (values written before riskgate said it: the group is taken)


class _PoolItem(msgspec.Struct):
    item_id: str
    rank_score: float
    tags: list[str] = []


class _Pool(msgspec.Struct):
    safe_pool: list[_PoolItem] = []
    blocked_tags: list[str] = []
    band: str = "low"
    thresholds: dict[str, _Thresholds] = {}


@dataclass(frozen=True)
class Shard:
    """Replica ``index`` of ``count``: it follows the ``safe-pools`` partitions ``p`` with ``p mod count = index``."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"a shard is I/N with 0 <= I < N, not {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"``, e.g. ``"0/4"``; ``ValueError`` saying the form otherwise."""
        i, sep, n = text.partition("/")
        try:
            if not sep:
                raise ValueError
            index, count = int(i), int(n)
        except ValueError:
            raise ValueError(f"a shard is I/N (replica I of N, counted from 0), not {text!r}") from None
        return cls(index, count)

    def follows(self, partition: int) -> bool:
        return partition % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Decision:
    """What the ranker did for one request."""

    slate: tuple[Served, ...]
    group: str | None  # the group whose λ̂ was used (None: no threshold known, everything filtered)
    lam: float | None
    version: int | None


def same_alpha(a: float, b: float) -> bool:
    """Whether a requested α is a published one (JSON round trips may leave a last-bit difference)."""
    return abs(a - b) < 1e-12


def _own_lambda(msg: dict) -> bool:
    """Whether a group's value is its own λ̂: ``n >= min_slates`` (SPEC §5), or a value that does not say."""
    n, least = msg.get("n"), msg.get("min_slates")
    return n is None or least is None or n >= least


def _checked(shape: type[msgspec.Struct], value: bytes) -> dict:
    """``value`` as a dict, once it holds what the book reads (``shape``); else :class:`InvalidOutput`."""
    try:
        msg = orjson.loads(value)
        msgspec.convert(msg, shape)  # (parsed once; the dict is kept whole: callers may read any field)
    except (orjson.JSONDecodeError, msgspec.ValidationError) as e:
        raise InvalidOutput(str(e)) from None
    return msg


@dataclass
class ThresholdBook:
    thresholds: dict[str, dict] = field(default_factory=dict)  # "strategy:group" -> message
    pools: dict[str, dict] = field(default_factory=dict)  # user_id -> message
    # Values refused, per topic ("risk-thresholds", "safe-pools"); see the module docstring.
    rejected: collections.Counter = field(default_factory=collections.Counter)

    def on_threshold(self, key: bytes | str, value: bytes | None) -> bool:
        """Take one ``risk-thresholds`` record (``None``: a tombstone); False if its value was refused.

        A user's own threshold (key ``strategy:user:<id>``) is not kept: the same
        value travels in the user's ``safe-pools`` record, which :meth:`resolve`
        reads, so keeping this copy only made every replica, whatever its shard,
        hold every such user's.
        """
        k = self._key(THRESHOLDS, key)
        if k is None:
            return False
        if k.partition(":")[2].startswith("user:"):
            return True
        if value is None:
            self.thresholds.pop(k, None)
            return True
        msg = self._take(THRESHOLDS, k, _Thresholds, value)
        if msg is None:
            return False
        old = self.thresholds.get(k)
        if old is None or msg["version"] > old["version"]:  # ignore replays of older versions
            self.thresholds[k] = msg
        return True

    def on_pool(self, key: bytes | str, value: bytes | None) -> bool:
        """Take one ``safe-pools`` record (``None``: a tombstone); False if its value was refused."""
        k = self._key(SAFE_POOLS, key)
        if k is None:
            return False
        if value is None:
            self.pools.pop(k, None)
            return True
        msg = self._take(SAFE_POOLS, k, _Pool, value)
        if msg is not None:
            self.pools[k] = msg
        return msg is not None

    def _key(self, topic: str, key: bytes | str | None) -> str | None:
        """The record's key as text; None (refused and counted) if it has none or it is not UTF-8."""
        if isinstance(key, str):
            return key
        try:
            return key.decode()
        except (AttributeError, UnicodeDecodeError):  # (None has no decode)
            self.rejected[topic] += 1
            log.warning("%s: a record with key %r refused: keys are user ids or strategy:group, as text", topic, key)
            return None

    def _take(self, topic: str, key: str, shape: type[msgspec.Struct], value: bytes) -> dict | None:
        try:
            return _checked(shape, value)
        except InvalidOutput as e:
            self.rejected[topic] += 1
            log.warning("%s: value of key %r refused, its last good value stays (%s): %r", topic, key, e,
                        value[:200])
            return None

    def resolve(self, user_id: str, alpha: float, strategy: str) -> tuple[str | None, float | None, int | None]:
        """(group, λ̂, version) from the most specific group that has a threshold of its own for ``alpha``.

        SPEC §5: a group has a λ̂ of its own only with ``n >= min_slates``
        (both in its value); otherwise the next group is used, ``user:<id>`` →
        band → ``global``, and ``global`` whatever its ``n``. λ̂ None means
        filter everything: the answer when riskgate said filter_all, and also
        when no threshold is known at all (fail closed).
        """
        pool = self.pools.get(user_id, {})
        own = pool.get("thresholds", {}).get(strategy)
        candidates = []
        if own:
            candidates.append((user_group(user_id), own))
        candidates += [(g, self.thresholds.get(f"{strategy}:{g}"))
                       for g in (band_group(pool.get("band", "low")), GLOBAL)]
        for group, msg in candidates:
            if not msg or (group != GLOBAL and not _own_lambda(msg)):
                continue
            for t in msg["thresholds"]:
                if same_alpha(t["alpha"], alpha):
                    return group, t["lambda"], msg.get("version")
        return None, None, None

    def apply(self, user_id: str, candidates: Sequence[Candidate], k: int, alpha: float, strategy: str) -> Decision:
        group, lam, version = self.resolve(user_id, alpha, strategy)
        pool = self.pools.get(user_id, {})
        safe = [SafeItem(p["item_id"], p["rank_score"], tuple(p.get("tags", ()))) for p in pool.get("safe_pool", ())]
        slate = apply_policy(candidates, k, lam, strategy, safe, pool.get("blocked_tags", ()))
        return Decision(tuple(slate), group, lam, version)


class RankerClient:
    """Follows ``risk-thresholds`` and ``safe-pools`` (all, or a :class:`Shard` of it) into a :class:`ThresholdBook`."""

    #: How long a read waits for records before the client checks whether it has caught up.
    POLL_MS = 200
    #: How often the client looks again for topics that do not exist yet.
    TOPIC_RETRY_S = 1.0

    def __init__(self, bootstrap: str, book: ThresholdBook | None = None, prefix: str = "",
                 keep_updates: bool = False, shard: Shard | None = None, **consumer_kwargs):
        self.bootstrap = bootstrap
        self.thresholds_topic, self.pools_topic = prefix + THRESHOLDS, prefix + SAFE_POOLS
        self.book = book or ThresholdBook()
        self.shard = shard
        self.consumer_kwargs = consumer_kwargs
        self._task: asyncio.Task | None = None
        self._consumer = None
        #: With ``keep_updates``, every record read, as (topic, key, value), for a caller that drains it
        #: (the demo prints them); None otherwise. Unbounded: kept for a ranker that never read it, it
        #: grew by every safe-pools record for good (thousands a second on a busy platform).
        self.updates: asyncio.Queue | None = asyncio.Queue() if keep_updates else None
        #: Why the read loop stopped, if it failed (the book then no longer follows riskgate).
        self.error: BaseException | None = None
        #: The ``safe-pools`` partitions followed, once the topics' metadata is known.
        self.partitions: tuple[int, ...] = ()
        self.pool_partitions: int | None = None  # how many safe-pools has
        self._ready = asyncio.Event()
        self._next: dict = {}  # partition -> offset of the next record to take (what lag() counts from)

    @property
    def healthy(self) -> bool:
        """Whether the book still follows the topics: started, and the read loop neither failed nor ended."""
        return self._task is not None and not self._task.done() and self.error is None

    @property
    def ready(self) -> bool:
        """Whether the book has caught up: it holds every value written before the client started."""
        return self._ready.is_set() and self.healthy

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until :attr:`ready`; raises the read loop's error if it failed first, TimeoutError after ``timeout``."""
        if self._task is None:
            raise RuntimeError("the ranker client was not started")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self.error is not None:
            raise self.error
        if not self._ready.is_set():
            raise TimeoutError(f"the ranker client did not catch up with {self.thresholds_topic} and "
                               f"{self.pools_topic} within {timeout} s")

    def lag(self) -> dict[str, int]:
        """Records each followed topic holds beyond what the book took, as of the latest fetch responses."""
        out = {self.thresholds_topic: 0, self.pools_topic: 0}
        consumer = self._consumer
        for tp, taken in self._next.items():
            hw = consumer.highwater(tp) if consumer is not None else None
            if hw is not None and hw > taken:
                out[tp.topic] += hw - taken
        return out

    def shard_of(self, user_id: str) -> int | None:
        """The index of the shard that holds ``user_id``'s pool (0 unsharded); None before the metadata is known."""
        if self.pool_partitions is None:
            return None
        n = self.shard.count if self.shard else 1
        return key_partition(user_id.encode(), self.pool_partitions) % n

    def owns(self, user_id: str) -> bool:
        """Whether this client follows ``user_id``'s pool (False before the metadata is known)."""
        if self.shard is None:
            return True
        return self.shard_of(user_id) == self.shard.index

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, auto_offset_reset="earliest",
            enable_auto_commit=False, **self.consumer_kwargs,
        )
        try:
            await self._consumer.start()
        except BaseException:
            await self._consumer.stop()  # (a failed start leaves its client open)
            raise
        self._task = asyncio.create_task(self._run())

    async def _assign(self) -> list:
        """Assign both topics' partitions (safe-pools: the shard's), from the beginning, once they exist."""
        from aiokafka import TopicPartition

        consumer, tries = self._consumer, 0
        while True:  # (the ranker may start before riskgate created its topics: it is not ready meanwhile)
            await consumer._client.force_metadata_update()
            parts = {t: consumer.partitions_for_topic(t) for t in (self.thresholds_topic, self.pools_topic)}
            if all(parts.values()):
                break
            if tries % 30 == 0:
                log.warning("waiting for %s to exist", " and ".join(t for t, p in parts.items() if not p))
            tries += 1
            await asyncio.sleep(self.TOPIC_RETRY_S)
        n = len(parts[self.pools_topic])
        followed = tuple(p for p in sorted(parts[self.pools_topic]) if self.shard is None or self.shard.follows(p))
        if not followed:
            raise ValueError(f"shard {self.shard} follows no partition: {self.pools_topic} has {n}, "
                             f"so at most {n} shards")
        self.pool_partitions, self.partitions = n, followed
        tps = ([TopicPartition(self.thresholds_topic, p) for p in sorted(parts[self.thresholds_topic])]
               + [TopicPartition(self.pools_topic, p) for p in followed])
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        return tps

    async def _run(self) -> None:
        try:
            consumer = self._consumer
            behind = set(await self._assign())
            self._next = dict.fromkeys(behind, 0)
            ends: dict = {}  # partition -> its end as of the first fetch (a live topic's end moves on)
            while True:
                batch = await consumer.getmany(timeout_ms=self.POLL_MS)
                for tp, records in batch.items():
                    self._next[tp] = records[-1].offset + 1
                    for msg in records:
                        if msg.topic == self.thresholds_topic:
                            self.book.on_threshold(msg.key, msg.value)  # (a bad value is refused, not raised)
                        else:
                            self.book.on_pool(msg.key, msg.value)
                        if self.updates is not None:
                            self.updates.put_nowait((msg.topic, msg.key, msg.value))
                # (getmany returns at once while fetched records wait: without this a catch-up
                # would hold the event loop, and the ranker's requests, until the buffer ran dry)
                await asyncio.sleep(0)
                if behind:
                    # The end comes from the fetch responses' high watermarks: tansu answers
                    # ListOffsets with the last batch's base offset + 1, short of the end.
                    for tp in list(behind):
                        if tp not in ends and (hw := consumer.highwater(tp)) is not None:
                            ends[tp] = hw
                        if tp in ends and await consumer.position(tp) >= ends[tp]:
                            behind.discard(tp)
                    if not behind:
                        self._ready.set()
                        log.info("caught up with %s and %s%s: %d thresholds, %d pools", self.thresholds_topic,
                                 self.pools_topic, f" (shard {self.shard})" if self.shard else "",
                                 len(self.book.thresholds), len(self.book.pools))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the consumer itself failed: say so, the book is frozen from here
            self.error = e
            log.exception("the ranker client stopped reading %s and %s: its thresholds no longer follow riskgate",
                          self.thresholds_topic, self.pools_topic)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer:
            await self._consumer.stop()
