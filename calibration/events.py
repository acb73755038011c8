"""The events of SPEC §2 as plain frozen records, after validation.

``streams.schemas`` validates raw Kafka bytes and turns them into these; the
offline replay builds them from JSONL. The core never sees unvalidated input.

Records are frozen :class:`msgspec.Struct` s, not dataclasses: the stream makes
one per event (hundreds of thousands a second), a struct is built ~8× faster
than a frozen dataclass, and the stream's validating decoders are subclasses
of these (``streams.schemas``), so JSON is decoded straight into them.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = ["ShownItem", "Impression", "Watch", "Flag", "Constraints", "Forget", "Event", "event_from_dict"]


class ShownItem(msgspec.Struct, frozen=True, gc=False):
    """One served item; ``rank_score`` None means "same as ``score``" (SPEC §2)."""

    item_id: str
    score: float
    rank_score: float | None = None
    tags: tuple[str, ...] = ()
    replacement: bool = False


class Impression(msgspec.Struct, frozen=True, gc=False):
    """A served slate. ``alpha`` (optional, an extension) names the α the ranker applied."""

    event_type: ClassVar[str] = "impression"  # what the stream counts it as
    event_id: str
    user_id: str
    slate_id: str
    ts: float
    k: int
    policy_applied: bool
    items: tuple[ShownItem, ...]
    alpha: float | None = None


class Watch(msgspec.Struct, frozen=True, gc=False):
    event_type: ClassVar[str] = "watch"  # what the stream counts it as
    event_id: str
    user_id: str
    item_id: str
    watch_ms: float
    duration_ms: float
    ts: float


class Flag(msgspec.Struct, frozen=True, gc=False):
    event_type: ClassVar[str] = "flag"  # what the stream counts it as
    event_id: str
    user_id: str
    item_id: str
    kind: str
    ts: float


class Constraints(msgspec.Struct, frozen=True, gc=False):
    event_type: ClassVar[str] = "constraints"  # what the stream counts it as
    event_id: str
    user_id: str
    ts: float
    block_tags: tuple[str, ...] = ()
    unblock_tags: tuple[str, ...] = ()
    source: str = "declared"


class Forget(msgspec.Struct, frozen=True, gc=False):
    event_type: ClassVar[str] = "forget"  # what the stream counts it as
    event_id: str
    user_id: str
    ts: float = 0.0


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
