"""Input validation (SPEC §2): what ``streams.schemas.decode`` accepts, what it rejects and why.

The product promise under test: a malformed event becomes an ``InvalidEvent``
with a reason (and so a dead-letter record), never any other exception, and a
valid event becomes a frozen, typed model. Fuzzing with hypothesis checks the
"never any other exception" half on random bytes and on mutated valid events.
"""

from __future__ import annotations

import base64
import json
import math
import time

import orjson
import pydantic
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.schemas import MAX_BYTES, InvalidEvent, dead_letter, decode

TS = 1732200000.5

VALID = {
    "impressions": {"event_id": "e-1", "user_id": "u1", "slate_id": "s-1", "ts": TS, "k": 20, "policy_applied": False,
                    "items": [{"item_id": "i9", "score": 0.93, "rank_score": 12.1, "tags": ["sports"],
                               "replacement": False}]},
    "watch": {"event_id": "e-2", "user_id": "u1", "item_id": "i9", "watch_ms": 1500, "duration_ms": 30000, "ts": TS},
    "flags": {"event_id": "e-3", "user_id": "u1", "item_id": "i9", "kind": "report", "ts": TS},
    "constraints": {"event_id": "e-4", "user_id": "u1", "block_tags": ["firearms"], "unblock_tags": [],
                    "source": "declared", "ts": TS},
    "forget": {"event_id": "e-5", "user_id": "u1", "ts": TS},
}


def enc(v) -> bytes:
    return orjson.dumps(v)


def with_(topic: str, **changes) -> bytes:
    v = dict(VALID[topic])
    v.update(changes)
    return enc(v)


def with_item(**changes) -> bytes:
    v = dict(VALID["impressions"])
    v["items"] = [dict(v["items"][0], **changes)]
    return enc(v)


def code_of(topic: str, raw: bytes, key: bytes | None = b"u1", max_items: int = 200) -> str:
    with pytest.raises(InvalidEvent) as exc:
        decode(topic, raw, key, max_items)
    assert exc.value.reason.startswith(exc.value.code)
    return exc.value.code


# ----------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("topic", sorted(VALID))
def test_the_spec_examples_decode_and_are_frozen(topic):
    ev = decode(topic, enc(VALID[topic]), b"u1", 200)
    assert ev.user_id == "u1" and ev.ts == TS
    with pytest.raises(pydantic.ValidationError):
        ev.user_id = "u2"


def test_fields_have_their_spec_types():
    imp = decode("impressions", enc(VALID["impressions"]), None, 200)
    item = imp.items[0]
    assert (imp.k, imp.policy_applied, item.item_id, item.score, item.rank_score, item.tags, item.replacement) == (
        20, False, "i9", 0.93, 12.1, ("sports",), False)
    w = decode("watch", enc(VALID["watch"]), None, 200)
    assert (w.watch_ms, w.duration_ms) == (1500, 30000)


def test_integers_are_numbers_and_zero_watch_is_valid():
    ev = decode("watch", with_("watch", watch_ms=0, duration_ms=0, ts=1732200000), b"u1", 200)
    assert ev.watch_ms == 0 and ev.ts == 1732200000


def test_unknown_extra_fields_are_ignored():
    ev = decode("flags", with_("flags", producer_version="3.1", debug={"x": 1}), b"u1", 200)
    assert not hasattr(ev, "producer_version")


def test_no_key_is_accepted_and_unicode_ids_are_fine():
    ev = decode("forget", enc({"event_id": "é-1", "user_id": "ユーザー", "ts": TS}), "ユーザー".encode(), 200)
    assert ev.user_id == "ユーザー"
    assert decode("forget", enc(VALID["forget"]), None, 200).user_id == "u1"


def test_empty_slate_and_optional_fields():
    ev = decode("impressions", with_("impressions", items=[]), b"u1", 200)
    assert ev.items == ()
    ev = decode("impressions", enc({**VALID["impressions"], "items": [{"item_id": "a", "score": 0.5}]}), b"u1", 200)
    assert ev.items[0].tags == () and ev.items[0].replacement is False and ev.items[0].rank_score is None


# ----------------------------------------------------------------------------- rejected, with the right code


@pytest.mark.parametrize("raw", [b"", b"{", b"{not json", b"\xff\xfe", b"{\"a\": 1,}"])
def test_broken_json_is_bad_json(raw):
    assert code_of("watch", raw) == "bad_json"


def test_missing_value_is_bad_json():
    assert code_of("watch", None) == "bad_json"


# The parser reads NaN/Infinity literals (so a NaN score is reported as a schema error
# at its field, not as unreadable JSON); a bare NaN document is therefore "not an object".
@pytest.mark.parametrize("raw", [b"[1, 2]", b"\"text\"", b"null", b"3.5", b"true", b"NaN"])
def test_json_that_is_not_an_object(raw):
    assert code_of("flags", raw) == "not_object"


def test_unknown_topic():
    assert code_of("clicks", enc(VALID["flags"])) == "unknown_topic"


def test_key_must_match_user_id():
    assert code_of("flags", enc(VALID["flags"]), key=b"u2") == "key_mismatch"


def test_oversized_value_is_rejected_before_parsing():
    raw = b'{"pad": "' + b"x" * MAX_BYTES + b'"}'
    assert code_of("flags", raw) == "too_large"


def test_more_items_than_max_items_is_too_large():
    items = [{"item_id": f"i{j}", "score": 0.5} for j in range(11)]
    assert code_of("impressions", with_("impressions", k=20, items=items), max_items=10) == "too_large"
    assert len(decode("impressions", with_("impressions", k=20, items=items), b"u1", 11).items) == 11


@pytest.mark.parametrize("raw", [
    with_item(score="0.5"),            # no str -> float coercion
    with_item(score=True),             # a bool is not a number
    with_item(score=None),
    with_item(rank_score="12"),
    with_item(replacement=1),          # an int is not a bool
    with_item(replacement="false"),
    with_item(tags="sports"),          # a string is not a list
    with_item(tags=[1]),
    with_item(item_id=9),
    with_item(item_id=""),
    with_item(item_id="x" * 257),
    with_item(tags=["t"] * 33),
    with_item(tags=["x" * 129]),
    with_item(tags=[""]),
    with_("impressions", policy_applied=0),
    with_("impressions", policy_applied="false"),
    with_("impressions", k=0),
    with_("impressions", k=-1),
    with_("impressions", k=20.5),
    with_("impressions", k="20"),
    with_("impressions", k=True),
    with_("impressions", k=7).replace(b'"k":7', b'"k":' + b"9" * 30),
    with_("impressions", k=0.5),
    with_("impressions", items={"item_id": "i"}),
    with_("impressions", items=[{"item_id": "a", "score": 0.1}, {"item_id": "a", "score": 0.2}]),  # duplicate
    with_("impressions", k=1, items=[{"item_id": "a", "score": 0.1}, {"item_id": "b", "score": 0.2}]),  # > k
    with_("impressions", slate_id=""),
    with_("watch", watch_ms=-1),
    with_("watch", duration_ms=-0.5),
    with_("watch", watch_ms="100"),
    with_("watch", duration_ms=None),
    with_("watch", ts=0),
    with_("watch", ts=-5),
    with_("watch", ts="1732200000"),
    with_("flags", kind="hate"),
    with_("flags", kind="REPORT"),
    with_("flags", kind=None),
    with_("constraints", source="guessed"),
    with_("constraints", block_tags="firearms"),
    with_("constraints", block_tags=["t"] * 33),
    with_("constraints", unblock_tags=[None]),
    with_("forget", user_id=""),
    with_("forget", user_id=None),
    with_("forget", event_id=5),
    with_("forget", user_id="u" * 257),
])
def test_mistyped_or_out_of_range_fields_are_schema_errors(raw):
    topic = _topic_of(raw)
    assert code_of(topic, raw, key=None) == "schema"


def _topic_of(raw: bytes) -> str:
    v = orjson.loads(raw)
    if "slate_id" in v:
        return "impressions"
    if "watch_ms" in v:
        return "watch"
    if "kind" in v:
        return "flags"
    if "source" in v:
        return "constraints"
    return "forget"


@pytest.mark.parametrize("field", ["event_id", "user_id", "ts"])
@pytest.mark.parametrize("topic", sorted(VALID))
def test_missing_required_fields(topic, field):
    v = dict(VALID[topic])
    del v[field]
    assert code_of(topic, enc(v), key=None) == "schema"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_non_finite_numbers_are_rejected_everywhere(literal):
    good = enc(VALID["watch"]).replace(b"1500", b"@")
    assert code_of("watch", good.replace(b"@", literal)) == "schema"
    imp = with_item(score=0.25).replace(b"0.25", literal)
    assert code_of("impressions", imp) == "schema"
    assert code_of("forget", enc(VALID["forget"]).replace(str(TS).encode(), literal)) == "schema"


def test_the_reason_says_where_and_what():
    with pytest.raises(InvalidEvent) as exc:
        decode("impressions", with_item(score=float("inf")).replace(b"null", b"Infinity"), b"u1", 200)
    assert exc.value.code == "schema"
    assert "items.0.score" in exc.value.reason and "finite" in exc.value.reason


def test_deeply_nested_json_is_rejected_not_a_crash():
    raw = b'{"event_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert code_of("forget", raw) in ("bad_json", "schema")


# ----------------------------------------------------------------------------- privacy of summaries


def test_repr_and_reasons_do_not_carry_user_data():
    c = decode("constraints", enc({**VALID["constraints"], "block_tags": ["secret-tag"]}), b"u1", 200)
    f = decode("flags", enc({**VALID["flags"], "item_id": "secret-item"}), b"u1", 200)
    for ev in (c, f):
        assert "secret" not in repr(ev) and "secret" not in str(ev)
    with pytest.raises(InvalidEvent) as exc:
        decode("constraints", enc({**VALID["constraints"], "block_tags": ["secret-tag"], "source": "secret-src"}),
               b"u1", 200)
    assert "secret" not in exc.value.reason


# ----------------------------------------------------------------------------- dead letters


def test_dead_letter_keeps_the_original_bytes_and_the_reason():
    raw = b"\x00\xffnot json"
    before = time.time()
    rec = orjson.loads(dead_letter("watch", 3, 1234, raw, "bad_json: oops", b"u1"))
    assert base64.b64decode(rec["value"]) == raw
    assert base64.b64decode(rec["key"]) == b"u1"
    assert (rec["topic"], rec["partition"], rec["offset"], rec["reason"]) == ("watch", 3, 1234, "bad_json: oops")
    assert before <= rec["rejected_at"] <= time.time() + 1


def test_dead_letter_of_a_missing_key_and_value():
    rec = orjson.loads(dead_letter("forget", 0, 0, None, "bad_json: empty value", None))
    assert rec["key"] is None and rec["value"] is None


# ----------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(topic=st.sampled_from(sorted(VALID) + ["nope"]), raw=st.binary(max_size=400),
       key=st.none() | st.binary(max_size=8))
def test_random_bytes_only_ever_raise_invalid_event(topic, raw, key):
    try:
        decode(topic, raw, key, 5)
    except InvalidEvent as e:
        assert e.code in {"bad_json", "not_object", "schema", "key_mismatch", "unknown_topic", "too_large"}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _dumps(v) -> bytes:
    """The stdlib encoder: big integers and NaN/Infinity literals as a sloppy producer would send them."""
    return json.dumps(v).encode()


def _mutated(topic, data) -> dict:
    """A valid event with one field (also inside an item) replaced, dropped or added, as arbitrary JSON."""
    v = orjson.loads(enc(VALID[topic]))
    target = v
    if topic == "impressions" and data.draw(st.booleans(), "in item"):
        target = v["items"][0]
    field = data.draw(st.sampled_from(sorted(target) + ["extra"]), "field")
    if data.draw(st.booleans(), "drop"):
        target.pop(field, None)
    else:
        target[field] = data.draw(JSON, "value")
    return v


@FUZZ
@given(topic=st.sampled_from(sorted(VALID)), data=st.data())
def test_mutated_valid_events_are_valid_or_invalid_event(topic, data):
    """Replace, drop or add one field (also inside an item) with arbitrary JSON."""
    raw = _dumps(_mutated(topic, data))
    try:
        ev = decode(topic, raw, data.draw(st.sampled_from([None, b"u1"]), "key"), 200)
    except InvalidEvent:
        return
    # whatever got through is well-formed
    assert ev.event_id and ev.user_id and math.isfinite(ev.ts) and ev.ts > 0
    for name in ("watch_ms", "duration_ms"):
        if hasattr(ev, name):
            assert math.isfinite(getattr(ev, name)) and getattr(ev, name) >= 0
    for item in getattr(ev, "items", ()):
        assert isinstance(item.score, float) and math.isfinite(item.score)
        assert isinstance(item.replacement, bool)


def test_ids_with_a_nul_byte_are_rejected():
    # The users table keeps forget markers under keys starting with NUL: no user id may collide with them.
    import orjson

    from streams.schemas import InvalidEvent, decode

    with pytest.raises(InvalidEvent, match="user_id"):
        decode("forget", orjson.dumps({"event_id": "x", "user_id": "\x00erased:abc", "ts": 5.0}), None)


# -- the worker's fast path (msgspec) against the reference models (pydantic) ----

def _verdicts(topic: str, raw: bytes, key):
    """(fast accepted?, reference accepted?, the two records when both accept)."""
    from streams.schemas import _record, decode_event, fast_decode

    fast = fast_decode(topic, raw, key, 200)
    try:
        ref = _record(topic, decode(topic, raw, key, 200))
    except InvalidEvent:
        ref = None
    if fast is not None:
        # decode_event returns the fast record; it must equal the reference's
        return True, ref is not None, (decode_event(topic, raw, key, 200), ref)
    return False, ref is not None, None


def _assert_agree(topic, raw, key):
    fast_ok, ref_ok, records = _verdicts(topic, raw, key)
    # Never more lenient: whatever the fast path accepts, the models accept, as the same record.
    if fast_ok:
        assert ref_ok, (topic, raw)
        fast, ref = records
        # The fast record is a validating subclass of the core's record: same class family, same fields.
        assert isinstance(fast, type(ref)), (topic, raw)
        assert msgspec.to_builtins(fast) == msgspec.to_builtins(ref), (topic, raw)
    return fast_ok, ref_ok


@FUZZ
@given(topic=st.sampled_from(sorted(VALID)), data=st.data())
def test_fast_path_agrees_with_the_models_on_mutated_events(topic, data):
    v = _mutated(topic, data)
    key = data.draw(st.sampled_from([None, b"u1", b"u2"]), "key")
    fast_ok, ref_ok = _assert_agree(topic, _dumps(v), key)
    # and it is not a path that rejects everything: an accepted event is accepted by both,
    # except where the reference accepts what the fast path leaves to it (checked below)
    if ref_ok and not fast_ok:
        from streams.schemas import decode_event

        decode_event(topic, _dumps(v), key, 200)  # still accepted through the fallback


@FUZZ
@given(topic=st.sampled_from(sorted(VALID)), raw=st.binary(max_size=300), key=st.none() | st.just(b"u1"))
def test_fast_path_agrees_with_the_models_on_random_bytes(topic, raw, key):
    _assert_agree(topic, raw, key)


@pytest.mark.parametrize("topic,raw", [
    ("watch", with_("watch", watch_ms=5.0, duration_ms=0)),
    ("watch", with_("watch", ts=5)),  # an integer ts is a number
    ("watch", b'{"event_id":"e","user_id":"u1","item_id":"i","watch_ms":1,"duration_ms":2,"ts":3,"ts":-1}'),
    ("impressions", with_("impressions", k=1.0)),
    ("impressions", with_("impressions", alpha=0.5)),
    ("impressions", with_("impressions", items=[])),
    ("impressions", with_item(tags=["a"] * 32)),
    ("impressions", with_item(tags=["a"] * 33)),
    ("impressions", with_item(rank_score=None)),
    ("flags", with_("flags", item_id="x" * 256)),
    ("flags", with_("flags", item_id="x" * 257)),
    ("flags", with_("flags", user_id="\u00e9l\u00e8ve", event_id="\U0001f600")),
    ("constraints", with_("constraints", source="inferred", unblock_tags=["x"])),
    ("forget", b'{"event_id":"e","user_id":"u1","ts":1e308}'),
    ("flags", with_("flags", item_id="a\x00b")),  # the fast path leaves \u0000 to the models
])
def test_fast_path_agrees_with_the_models_on_edge_cases(topic, raw):
    fast_ok, ref_ok = _assert_agree(topic, raw, None)
    assert fast_ok == ref_ok, (topic, raw)  # these the fast path decides itself, either way


def test_fast_path_takes_the_spec_examples():
    from streams.schemas import fast_decode

    for topic, value in VALID.items():
        assert fast_decode(topic, enc(value), b"u1", 200) is not None, topic


@pytest.mark.parametrize("raw", [b'{"event_id":"e1","user_id":"u\xff","item_id":"i","kind":"report","ts":1}',
                                 b'{"event_id":"e1","user_id":"u\xed\xa0\x80","item_id":"i","kind":"report","ts":1}'])
def test_invalid_utf8_inside_a_string_is_bad_json_on_the_worker_path(raw):
    from streams.schemas import decode_event

    with pytest.raises(InvalidEvent) as exc:
        decode_event("flags", raw, None)
    assert exc.value.code == "bad_json"


def test_a_non_object_inside_the_event_is_a_schema_error_not_not_object():
    with pytest.raises(InvalidEvent) as exc:
        decode("impressions", with_("impressions", items=["i1"]), None)
    assert exc.value.code == "schema" and "items.0" in exc.value.reason
