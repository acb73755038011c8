"""The events of SPEC §2 as plain frozen records, after validation.

``streams.schemas`` validates raw Kafka bytes and turns them into these; the
offline replay builds them from JSONL. The core never sees unvalidated input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ShownItem", "Impression", "Watch", "Flag", "Constraints", "Forget", "Event"]


@dataclass(frozen=True)
class ShownItem:
    item_id: str
    score: float
    rank_score: float
    tags: tuple[str, ...] = ()
    replacement: bool = False


@dataclass(frozen=True)
class Impression:
    """A served slate. ``alpha`` (optional, an extension) names the α the ranker applied."""

    event_id: str
    user_id: str
    slate_id: str
    ts: float
    k: int
    policy_applied: bool
    items: tuple[ShownItem, ...]
    alpha: float | None = None


@dataclass(frozen=True)
class Watch:
    event_id: str
    user_id: str
    item_id: str
    watch_ms: float
    duration_ms: float
    ts: float


@dataclass(frozen=True)
class Flag:
    event_id: str
    user_id: str
    item_id: str
    kind: str
    ts: float


@dataclass(frozen=True)
class Constraints:
    event_id: str
    user_id: str
    ts: float
    block_tags: tuple[str, ...] = ()
    unblock_tags: tuple[str, ...] = ()
    source: str = "declared"


@dataclass(frozen=True)
class Forget:
    event_id: str
    user_id: str
    ts: float = field(default=0.0)


Event = Impression | Watch | Flag | Constraints | Forget
