"""The downstream side: a client that follows riskgate's outputs and applies Algorithm 1.

:class:`ThresholdBook` is pure: it holds the latest ``risk-thresholds`` and
``safe-pools`` values and resolves λ̂ for a user (``user:<id>`` → band →
``global``, SPEC §5). :class:`RankerClient` keeps a book up to date from Kafka
with a group-less aiokafka consumer reading both topics from the beginning, so
every ranker replica sees every key. :meth:`ThresholdBook.apply` runs
:func:`calibration.policy.apply_policy`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Sequence

import orjson

from calibration.groups import GLOBAL, band_group, user_group
from calibration.policy import Candidate, Served, apply_policy
from calibration.safe_pool import SafeItem

from .topics import SAFE_POOLS, THRESHOLDS

__all__ = ["ThresholdBook", "RankerClient", "Decision"]

log = logging.getLogger("riskgate.ranker")


@dataclass(frozen=True)
class Decision:
    """What the ranker did for one request."""

    slate: tuple[Served, ...]
    group: str | None  # the group whose λ̂ was used (None: no threshold known, everything filtered)
    lam: float | None
    version: int | None


@dataclass
class ThresholdBook:
    thresholds: dict[str, dict] = field(default_factory=dict)  # "strategy:group" -> message
    pools: dict[str, dict] = field(default_factory=dict)  # user_id -> message

    def on_threshold(self, key: bytes | str, value: bytes | None) -> None:
        k = key.decode() if isinstance(key, bytes) else key
        if value is None:
            self.thresholds.pop(k, None)
            return
        msg = orjson.loads(value)
        old = self.thresholds.get(k)
        if old is None or msg["version"] > old["version"]:  # ignore replays of older versions
            self.thresholds[k] = msg

    def on_pool(self, key: bytes | str, value: bytes | None) -> None:
        k = key.decode() if isinstance(key, bytes) else key
        if value is None:
            self.pools.pop(k, None)
        else:
            self.pools[k] = orjson.loads(value)

    def resolve(self, user_id: str, alpha: float, strategy: str) -> tuple[str | None, float | None, int | None]:
        """(group, λ̂, version) from the most specific group that has a threshold for ``alpha``.

        λ̂ None means filter everything: the answer when riskgate said filter_all,
        and also when no threshold is known at all (fail closed).
        """
        pool = self.pools.get(user_id, {})
        own = pool.get("thresholds", {}).get(strategy)
        candidates = []
        if own:
            candidates.append((user_group(user_id), own))
        candidates += [(g, self.thresholds.get(f"{strategy}:{g}"))
                       for g in (band_group(pool.get("band", "low")), GLOBAL)]
        for group, msg in candidates:
            if not msg:
                continue
            for t in msg["thresholds"]:
                if abs(t["alpha"] - alpha) < 1e-12:
                    return group, t["lambda"], msg.get("version")
        return None, None, None

    def apply(self, user_id: str, candidates: Sequence[Candidate], k: int, alpha: float, strategy: str) -> Decision:
        group, lam, version = self.resolve(user_id, alpha, strategy)
        pool = self.pools.get(user_id, {})
        safe = [SafeItem(p["item_id"], p["rank_score"], tuple(p.get("tags", ()))) for p in pool.get("safe_pool", ())]
        slate = apply_policy(candidates, k, lam, strategy, safe, pool.get("blocked_tags", ()))
        return Decision(tuple(slate), group, lam, version)


class RankerClient:
    """Follows ``risk-thresholds`` and ``safe-pools`` into a :class:`ThresholdBook`."""

    def __init__(self, bootstrap: str, book: ThresholdBook | None = None, prefix: str = "", **consumer_kwargs):
        self.bootstrap = bootstrap
        self.thresholds_topic, self.pools_topic = prefix + THRESHOLDS, prefix + SAFE_POOLS
        self.book = book or ThresholdBook()
        self.consumer_kwargs = consumer_kwargs
        self._task: asyncio.Task | None = None
        self._consumer = None
        self.updates: asyncio.Queue = asyncio.Queue()  # (topic, key, value) as they arrive

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            self.thresholds_topic, self.pools_topic, bootstrap_servers=self.bootstrap, group_id=None,
            auto_offset_reset="earliest", enable_auto_commit=False, **self.consumer_kwargs,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for msg in self._consumer:
            if msg.topic == self.thresholds_topic:
                self.book.on_threshold(msg.key, msg.value)
            else:
                self.book.on_pool(msg.key, msg.value)
            self.updates.put_nowait((msg.topic, msg.key, msg.value))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer:
            await self._consumer.stop()
