"""Validation of input events (SPEC §2): raw Kafka bytes in, a typed event or a reason out.

Strict: no string-to-number coercion, booleans must be JSON booleans, numbers
finite, durations and watch times non-negative, ``ts`` positive, lists and ids
bounded, ``kind`` and ``source`` from their fixed sets. Unknown extra fields are
ignored (producers may add their own), so adding a field upstream never sends
every event to the dead-letter topic. A message key, when present, must equal
the value's ``user_id`` (the key decides the partition, and so where the
user's state lives).

:func:`decode` raises :class:`InvalidEvent` with a short ``code`` for metrics
(``bad_json``, ``not_object``, ``schema``, ``key_mismatch``, ``unknown_topic``,
``too_large``) and a ``reason`` that says what was wrong without echoing
user data.

:func:`decode_event` is what the worker calls: it returns the core's record
(:mod:`calibration.events`) and validates with msgspec first (~1 µs a watch
event, against ~18 µs for the pydantic models). The msgspec structs encode the
same rules and are never more lenient; anything they reject is validated again
by :func:`decode`, so codes and reasons always come from the pydantic models,
and a value the two judged differently would still be decided by pydantic.
``tests/test_schemas.py`` checks with hypothesis that both decide alike.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Annotated, Literal

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from calibration import events as core

__all__ = ["InvalidEvent", "INPUT_REASONS", "decode", "decode_event", "fast_decode", "dead_letter", "MODELS", "MAX_BYTES"]

#: Largest value accepted, in bytes (a 200-item slate with tags is ~40 kB).
MAX_BYTES = 1_000_000

# No NUL: the users table keeps forget markers under keys that start with one.
Id = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]+$")]
Tag = Annotated[str, Field(min_length=1, max_length=128)]
Tags = Annotated[tuple[Tag, ...], Field(max_length=32)]


def _finite(v: float, name: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite")
    return v


class _Event(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    event_id: Id
    user_id: Id
    ts: float

    @field_validator("ts")
    @classmethod
    def _ts(cls, v: float) -> float:
        _finite(v, "ts")
        if v <= 0:
            raise ValueError("ts must be > 0 (seconds since the epoch)")
        return v

    def __repr__(self) -> str:  # never print user data (flags, constraints) by accident
        return f"{type(self).__name__}(event_id={self.event_id!r})"

    __str__ = __repr__


class Item(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    item_id: Id
    score: float
    rank_score: float | None = None
    tags: Tags = ()
    replacement: bool = False

    @field_validator("score", "rank_score")
    @classmethod
    def _numbers(cls, v, info):
        return v if v is None else _finite(v, info.field_name)


class Impression(_Event):
    slate_id: Id
    k: Annotated[int, Field(ge=1, le=10_000)]
    policy_applied: bool
    items: tuple[Item, ...]
    alpha: Annotated[float, Field(gt=0, lt=1)] | None = None

    @field_validator("items")
    @classmethod
    def _bounded(cls, v, info):
        limit = (info.context or {}).get("max_items", 200)
        if len(v) > limit:
            raise PydanticCustomError("too_large", "{n} items exceed the limit of {limit}", {"n": len(v), "limit": limit})
        return v

    @model_validator(mode="after")
    def _sizes(self):
        if len(self.items) > self.k:
            raise ValueError(f"{len(self.items)} items exceed k={self.k}")
        if len({i.item_id for i in self.items}) != len(self.items):
            raise ValueError("an item appears twice in the slate")
        return self


class Watch(_Event):
    item_id: Id
    watch_ms: Annotated[float, Field(ge=0)]
    duration_ms: Annotated[float, Field(ge=0)]

    @field_validator("watch_ms", "duration_ms")
    @classmethod
    def _numbers(cls, v, info):
        return _finite(v, info.field_name)


class Flag(_Event):
    item_id: Id
    kind: Literal["not_interested", "report"]


class Constraints(_Event):
    block_tags: Tags = ()
    unblock_tags: Tags = ()
    source: Literal["declared", "inferred"] = "declared"


class Forget(_Event):
    pass


MODELS: dict[str, type[_Event]] = {
    "impressions": Impression,
    "watch": Watch,
    "flags": Flag,
    "constraints": Constraints,
    "forget": Forget,
}


#: Every ``code`` a dead letter of an input record can carry: :func:`decode`'s, and the worker's own
#: (``future_ts``: beyond RISKGATE_MAX_FUTURE_SKEW; ``unreadable_state``: the user's state cannot be
#: read or broke while applied; ``internal``: validation itself raised). The worker exports its
#: dead-letter counter at 0 for each, per input topic, so that the first letter of a reason shows.
INPUT_REASONS = ("bad_json", "not_object", "schema", "key_mismatch", "too_large", "future_ts",
                 "unreadable_state", "internal")


class InvalidEvent(ValueError):
    """A rejected event: ``code`` for counting, ``reason`` for the dead-letter record."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, f"{code}: {reason}"


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "event"
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    more = len(err.errors()) - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def decode(topic: str, raw: bytes | None, key: bytes | None, max_items: int = 200) -> _Event:
    """Validate one message of ``topic``; raise :class:`InvalidEvent` if it is not a valid event."""
    model = MODELS.get(topic)
    if model is None:
        raise InvalidEvent("unknown_topic", f"no schema for topic {topic!r}")
    if raw is None:
        raise InvalidEvent("bad_json", "empty value")
    if len(raw) > MAX_BYTES:
        raise InvalidEvent("too_large", f"value of {len(raw)} bytes exceeds {MAX_BYTES}")
    try:
        # pydantic's own JSON parser: one pass, and JSON arrays validate as tuples in strict mode.
        ev = model.model_validate_json(raw, strict=True, context={"max_items": max_items})
    except ValidationError as e:
        kinds = {err["type"] for err in e.errors()}
        if "json_invalid" in kinds:
            raise InvalidEvent("bad_json", e.errors()[0]["msg"]) from None
        if any(err["type"] in ("model_type", "model_attributes_type") and not err["loc"] for err in e.errors()):
            raise InvalidEvent("not_object", "value is not a JSON object") from None
        if "too_large" in kinds:
            raise InvalidEvent("too_large", _describe(e)) from None
        raise InvalidEvent("schema", _describe(e)) from None
    if key is not None and key != ev.user_id.encode():
        raise InvalidEvent("key_mismatch", "message key differs from the value's user_id")
    return ev


# -- the fast path -----------------------------------------------------------
# The same rules as the models above, as msgspec structs. msgspec's JSON decoder
# is strict (no str/number/bool coercion), rejects NaN, Infinity and numbers out
# of the float range, and ignores unknown fields, like the models.
# No pattern on ids: a NUL can only get into a decoded string as the escape \u0000 (JSON
# forbids raw control characters), so fast_decode leaves any value containing it to the models.
_FId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_FTag = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_FTags = Annotated[tuple[_FTag, ...], msgspec.Meta(max_length=32)]
_FTs = Annotated[float, msgspec.Meta(gt=0)]
_FNonNeg = Annotated[float, msgspec.Meta(ge=0)]


# Subclasses of the core's records with the rules as constraints: a valid value
# decodes straight into a record the engine takes (no second object per event).
class _FItem(core.ShownItem, frozen=True, gc=False):
    item_id: _FId
    score: float
    rank_score: float | None = None
    tags: _FTags = ()
    replacement: bool = False


class _FImpression(core.Impression, frozen=True, gc=False):
    event_id: _FId
    user_id: _FId
    slate_id: _FId
    ts: _FTs
    k: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    policy_applied: bool
    items: tuple[_FItem, ...]
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=1)] | None = None


class _FWatch(core.Watch, frozen=True, gc=False):
    event_id: _FId
    user_id: _FId
    item_id: _FId
    watch_ms: _FNonNeg
    duration_ms: _FNonNeg
    ts: _FTs


class _FFlag(core.Flag, frozen=True, gc=False):
    event_id: _FId
    user_id: _FId
    item_id: _FId
    kind: Literal["not_interested", "report"]
    ts: _FTs


class _FConstraints(core.Constraints, frozen=True, gc=False):
    event_id: _FId
    user_id: _FId
    ts: _FTs
    block_tags: _FTags = ()
    unblock_tags: _FTags = ()
    source: Literal["declared", "inferred"] = "declared"


class _FForget(core.Forget, frozen=True, gc=False):
    event_id: _FId
    user_id: _FId
    ts: _FTs


_FAST = {
    "impressions": msgspec.json.Decoder(_FImpression),
    "watch": msgspec.json.Decoder(_FWatch),
    "flags": msgspec.json.Decoder(_FFlag),
    "constraints": msgspec.json.Decoder(_FConstraints),
    "forget": msgspec.json.Decoder(_FForget),
}


def _record(topic: str, m) -> core.Event:
    """The core's record of an event the pydantic models validated."""
    if topic == "watch":
        return core.Watch(m.event_id, m.user_id, m.item_id, float(m.watch_ms), float(m.duration_ms), float(m.ts))
    if topic == "impressions":
        items = tuple(core.ShownItem(i.item_id, float(i.score), None if i.rank_score is None else float(i.rank_score),
                                     tuple(i.tags), i.replacement) for i in m.items)
        return core.Impression(m.event_id, m.user_id, m.slate_id, float(m.ts), m.k, m.policy_applied, items,
                               None if m.alpha is None else float(m.alpha))
    if topic == "flags":
        return core.Flag(m.event_id, m.user_id, m.item_id, m.kind, float(m.ts))
    if topic == "constraints":
        return core.Constraints(m.event_id, m.user_id, float(m.ts), tuple(m.block_tags), tuple(m.unblock_tags), m.source)
    return core.Forget(m.event_id, m.user_id, float(m.ts))


def fast_decode(topic: str, raw: bytes, key: bytes | None, max_items: int = 200) -> core.Event | None:
    """The core's record of a valid event (decoded in one step), or None when :func:`decode` must give a verdict."""
    dec = _FAST.get(topic)
    if dec is None or raw is None or len(raw) > MAX_BYTES or b"\\u0000" in raw:
        return None
    try:
        m = dec.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):  # invalid UTF-8 in a string
        return None
    if key is not None and key != m.user_id.encode():
        return None
    if topic == "impressions":
        items = m.items
        if len(items) > max_items or len(items) > m.k or len({i.item_id for i in items}) != len(items):
            return None
    return m


def decode_event(topic: str, raw: bytes | None, key: bytes | None, max_items: int = 200) -> core.Event:
    """Validate one message of ``topic`` into the core's record; raise :class:`InvalidEvent` if invalid."""
    ev = fast_decode(topic, raw, key, max_items)
    if ev is None:
        ev = _record(topic, decode(topic, raw, key, max_items))  # the reference verdict, with the reason
    return ev


def dead_letter(topic: str, partition: int, offset: int, raw: bytes | None, reason: str, key: bytes | None) -> bytes:
    """The ``riskgate-dlq`` record: the reason, where it came from, and the original bytes (base64)."""
    return orjson.dumps(
        {
            "reason": reason,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": None if key is None else base64.b64encode(key).decode(),
            "value": None if raw is None else base64.b64encode(raw).decode(),
            "rejected_at": time.time(),
        }
    )
