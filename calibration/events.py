"""The events of SPEC §2 as plain frozen records, after validation.

``streams.schemas`` validates raw Kafka bytes and turns them into these; the
offline replay builds them from JSONL. The core never sees unvalidated input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ShownItem", "Impression", "Watch", "Flag", "Constraints", "Forget", "Event", "event_from_dict"]


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


def event_from_dict(topic: str, d: dict) -> Event:
    """Build the record for an already *validated* event value of ``topic`` (SPEC §2 field names)."""
    if topic == "impressions":
        items = tuple(
            ShownItem(str(i["item_id"]), float(i["score"]),
                      float(i["score"] if i.get("rank_score") is None else i["rank_score"]),
                      tuple(i.get("tags") or ()), bool(i.get("replacement", False)))
            for i in d["items"]
        )
        alpha = d.get("alpha")
        return Impression(str(d["event_id"]), str(d["user_id"]), str(d["slate_id"]), float(d["ts"]), int(d["k"]),
                          bool(d["policy_applied"]), items, None if alpha is None else float(alpha))
    if topic == "watch":
        return Watch(str(d["event_id"]), str(d["user_id"]), str(d["item_id"]), float(d["watch_ms"]),
                     float(d["duration_ms"]), float(d["ts"]))
    if topic == "flags":
        return Flag(str(d["event_id"]), str(d["user_id"]), str(d["item_id"]), str(d["kind"]), float(d["ts"]))
    if topic == "constraints":
        return Constraints(str(d["event_id"]), str(d["user_id"]), float(d["ts"]), tuple(d.get("block_tags") or ()),
                           tuple(d.get("unblock_tags") or ()), str(d.get("source", "declared")))
    if topic == "forget":
        return Forget(str(d["event_id"]), str(d["user_id"]), float(d.get("ts", 0.0)))
    raise ValueError(f"unknown topic {topic!r}")
