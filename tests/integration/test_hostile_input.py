"""Bad input at scale (issue 7): a flood of hostile events against a running worker.

Over 10,000 malformed events, built by hypothesis with a fixed seed (derandomized,
generate phase only, so every run sends the same bytes), are spread over all
five input topics of a real ``riskgate worker``. SPEC §2: every malformed event
"goes to the dead-letter topic with the reason and the original bytes, is
counted, and never stops or crashes processing". Black box, so:

* the dead-letter topic holds exactly one record per hostile event, with a
  reason and the original key and value bytes;
* nothing else moved: the safe-pools topic, the users' state, the set of users,
  the published thresholds and the watermarks are what they were before the
  flood, and only the ``invalid`` outcome counter rose, by exactly the number
  sent (per event type);
* ``/health`` answers 200 throughout, and valid events sent after the flood are
  processed (the worker did not wedge).

Two single-case tests name the inputs that take a worker down when they fail:
a value over 1 MB (its dead-letter record is larger still) and invalid UTF-8
inside a JSON string. A last one sends records no worker could have written to
the internal snapshots topic: dead-lettered as ``bad_snapshot``, and the
aggregator goes on publishing.
"""

from __future__ import annotations

import base64
import time
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .harness import (HealthWatch, Worker, constraints_event, flag_event, forget_event, impression_event, json_of,
                      latest_by_key, make_topics, metric_samples, produce_pipelined, published_thresholds, read_topic,
                      send_events, users_changelog, users_in_partition, wait_committed, wait_for, watch_event)

pytestmark = pytest.mark.integration

PARTITIONS = 4
T0 = 1_700_000_000.0
LABEL_WINDOW = 100.0
LATENESS = 10.0
MAX_ITEMS = 200  # most items in one impression (RISKGATE_MAX_ITEMS, set below)
MAX_BYTES = 1_000_000  # largest value accepted: anything over 1 MB is rejected (streams.schemas.MAX_BYTES)
SETTINGS = dict(label_window=LABEL_WINDOW, allowed_lateness=LATENESS, window=86400, buckets=24, min_slates=1000,
                beta=50, max_items=MAX_ITEMS)
N_HOSTILE = 10_000
INPUTS = ("impressions", "watch", "flags", "constraints", "forget")
TYPE_OF = {"impressions": "impression", "watch": "watch", "flags": "flag", "constraints": "constraints",
           "forget": "forget"}  # the `type` label of riskgate_events_total

# -- the valid traffic the flood must not disturb ------------------------------------------


def _per_partition(stem: str, count: int) -> list[str]:
    """``count`` user ids in every partition (keys are user ids, as every producer of riskgate's inputs uses)."""
    return [u for p in range(PARTITIONS) for u in users_in_partition(stem, p, count, PARTITIONS)]


VALID_USERS = _per_partition("v", 2)
TICK_USERS = _per_partition("tick", 1)
FRESH_USERS = [f"h-{j}" for j in range(40)]  # only ever named by hostile events: must never exist


def valid_events():
    """Per user: a holdout slate of three items, a long and a short watch, a flag, a tag block.

    Safe pool of each user: the long-watched item only. Then one policy-applied
    tick per partition moves every watermark past the slates' label window, so
    all eight slates mature into the calibration window.
    """
    evs = []
    for j, u in enumerate(VALID_USERS):
        ts = T0 + j
        evs.append(("impressions", impression_event(u, f"{u}-imp", f"{u}-s", ts,
                                                    [(f"{u}-a", 0.9, 3.0, ("cats",)), (f"{u}-b", 0.6, 2.0, ()),
                                                     (f"{u}-c", 0.3, 1.0, ("guns",))])))
        evs.append(("watch", watch_event(u, f"{u}-w1", f"{u}-a", ts + 1, 9000.0)))
        evs.append(("watch", watch_event(u, f"{u}-w2", f"{u}-b", ts + 1, 1000.0)))
        evs.append(("flags", flag_event(u, f"{u}-f", f"{u}-c", ts + 2)))
        evs.append(("constraints", constraints_event(u, f"{u}-c", ts + 2)))
    for j, u in enumerate(TICK_USERS):
        evs.append(("impressions", impression_event(u, f"{u}-imp", f"{u}-s", T0 + LABEL_WINDOW + LATENESS + 50 + j,
                                                    [("tick", 0.5, 0.0, ())], policy_applied=True)))
    return evs


def expected_pools():
    pools = {u: [f"{u}-a"] for u in VALID_USERS}
    pools.update({u: [] for u in TICK_USERS})
    return pools


# -- the hostile events ---------------------------------------------------------------------
# Each strategy draws (topic, key, value, kind): `value` bytes (or None, a Kafka null) that
# SPEC §2 rejects, `key` the message key. Users are mostly the valid ones (so a rejected
# event that slipped through would visibly change them) and otherwise fresh ids.

users = st.sampled_from(VALID_USERS + FRESH_USERS)
event_ids = st.integers(0, 10**6).map(lambda n: f"x-{n}")
ts_ok = st.integers(0, 20_000).map(lambda n: T0 + n / 4)
unit = st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
item_ids = st.sampled_from(["a", "b", "c", "d", "zz-1"])


@st.composite
def valid_value(draw, topic=None, uid=None):
    """A valid event as a dict (the base every mutation starts from)."""
    topic = topic or pick(draw, INPUTS)
    uid = uid or draw(users)
    eid, ts = draw(event_ids), draw(ts_ok)
    if topic == "impressions":
        n = draw(st.integers(1, 4))
        items = [(f"i{j}", draw(unit), 10.0 * draw(unit), ()) for j in range(n)]
        return topic, impression_event(uid, eid, f"s-{eid}", ts, items, k=n + draw(st.integers(0, 3)))
    if topic == "watch":
        return topic, watch_event(uid, eid, draw(item_ids), ts, 1e4 * draw(unit), 1e4 + 1e4 * draw(unit))
    if topic == "flags":
        return topic, flag_event(uid, eid, draw(item_ids), ts, pick(draw, ["report", "not_interested"]))
    if topic == "constraints":
        return topic, constraints_event(uid, eid, ts, draw(st.lists(st.sampled_from(["guns", "gore"]), max_size=2)))
    return topic, forget_event(uid, eid, ts)


def pick(draw, options):
    """``draw(st.sampled_from(options))`` without building (and validating) a new strategy per draw."""
    options = tuple(options)
    return options[draw(st.integers(0, len(options) - 1))]


def _key(value: dict) -> bytes:
    return str(value["user_id"]).encode()


def _dump(value) -> bytes:
    return orjson.dumps(value)


def _with_literal(value: dict, path: tuple, literal: bytes) -> bytes:
    """``value`` as JSON with the field at ``path`` replaced by raw JSON text (NaN, 1e999 ...)."""
    marker = "@@LITERAL@@"
    obj = orjson.loads(orjson.dumps(value))
    target = obj
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = marker
    raw = orjson.dumps(obj)
    assert raw.count(f'"{marker}"'.encode()) == 1
    return raw.replace(f'"{marker}"'.encode(), literal)


@st.composite
def broken_json(draw):
    topic, v = draw(valid_value())
    raw = _dump(v)
    how = pick(draw, ["truncate", "append", "garbage", "single_quotes", "comment"])
    if how == "truncate":  # any strict prefix of a JSON object is not JSON
        out = raw[: draw(st.integers(1, len(raw) - 1))]
    elif how == "append":
        out = raw + pick(draw, [b"}", b",", b"]", b" x", b"{}", b"\x00"])
    elif how == "garbage":
        out = pick(draw, [b"\x00", b"\xff", b"<", b"#", b"}", b"\x1b"]) + draw(st.binary(max_size=64))
    elif how == "single_quotes":
        out = raw.replace(b'"', b"'")
    else:
        out = b"/* c */" + raw
    return topic, pick(draw, [_key(v), None]), out, "broken_json"


@st.composite
def invalid_utf8(draw):
    """Bytes that are not UTF-8 inside a JSON string: not a JSON text (RFC 8259 §8.1)."""
    topic, v = draw(valid_value())
    field = pick(draw, ["event_id", "user_id"])
    bad = pick(draw, [b"\xff", b"\xfe\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf",
                      b"\xf8\x88\x80\x80\x80"])
    raw = _with_literal(v, (field,), b'"u' + bad + b'"')
    return topic, pick(draw, [_key(v), None]), raw, "invalid_utf8"


@st.composite
def lone_surrogate(draw):
    """A JSON escape of a lone UTF-16 surrogate in an id: no Unicode scalar value, so no UTF-8 key can match it."""
    topic, v = draw(valid_value())
    field = pick(draw, ["event_id", "user_id"])
    esc = pick(draw, [b"\\ud800", b"\\udfff", b"x\\udbff", b"\\udc00y", b"\\ud83d"])  # \ud83d: half an emoji
    raw = _with_literal(v, (field,), b'"' + esc + b'"')
    return topic, pick(draw, [_key(v), None]), raw, "lone_surrogate"


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))


@st.composite
def not_object(draw):
    topic = pick(draw, INPUTS)
    value = draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=5),
                           valid_value(topic).map(lambda tv: [tv[1]])))  # a valid event wrapped in a list
    return topic, pick(draw, [b"u", None]), _dump(value), "not_object"


# Field -> values of the wrong JSON type. `null` only for fields without a default.
_NOT_STR = [0, 7, -1.5, True, False, [], ["x"], {"id": "x"}]
_NOT_NUM = ["1", "0.5", "1700000000", "", True, False, [], [1], {"v": 1}]
_WRONG = {
    "event_id": _NOT_STR + [None], "user_id": _NOT_STR + [None], "slate_id": _NOT_STR + [None],
    "item_id": _NOT_STR + [None], "kind": _NOT_STR + [None],
    "ts": _NOT_NUM + [None], "watch_ms": _NOT_NUM + [None], "duration_ms": _NOT_NUM + [None],
    "k": ["3", 2.5, True, [], None], "policy_applied": ["false", "true", 0, 1, None, []],
    "items": ["i1", {"item_id": "i1", "score": 0.5}, [1, 2], ["i1"], None],
    "block_tags": ["guns", 1, {"guns": True}, [1, 2], [None]], "unblock_tags": ["guns", 7, [True]],
    "source": [1, True, ["declared"]],
}
_WRONG_ITEM = {"item_id": _NOT_STR + [None], "score": _NOT_NUM + [None], "rank_score": ["1", True, [1]],
               "tags": ["cats", 3, [1], {"t": 1}], "replacement": ["no", 0, 1, []]}
_REQUIRED = {"impressions": ["event_id", "user_id", "slate_id", "ts", "k", "policy_applied", "items"],
             "watch": ["event_id", "user_id", "item_id", "watch_ms", "duration_ms", "ts"],
             "flags": ["event_id", "user_id", "item_id", "kind", "ts"],
             "constraints": ["event_id", "user_id", "ts"], "forget": ["event_id", "user_id", "ts"]}


@st.composite
def wrong_type(draw):
    """One field of the wrong JSON type (strings for numbers, numbers for strings, bools), or missing."""
    topic, v = draw(valid_value())
    key = _key(v)
    fields = [f for f in v if f in _WRONG]
    if topic == "impressions" and draw(st.booleans()):
        field = pick(draw, sorted(_WRONG_ITEM))
        v["items"][0][field] = pick(draw, _WRONG_ITEM[field])
    elif draw(st.integers(0, 4)) == 0:
        del v[pick(draw, _REQUIRED[topic])]
    else:
        field = pick(draw, fields)
        v[field] = pick(draw, _WRONG[field])
    return topic, key, _dump(v), "wrong_type"


@st.composite
def huge_list(draw):
    """Lists over the limits: items over max_items, tags over 32 per item or per constraint."""
    which = pick(draw, ["items", "item_tags", "block_tags", "unblock_tags"])
    if which == "items":
        topic, v = draw(valid_value("impressions"))
        n = draw(st.integers(MAX_ITEMS + 1, 3 * MAX_ITEMS))
        v["k"] = 10_000
        v["items"] = [{"item_id": f"i{j}", "score": 0.5} for j in range(n)]
    elif which == "item_tags":
        topic, v = draw(valid_value("impressions"))
        v["items"][0]["tags"] = [f"t{j}" for j in range(draw(st.integers(33, 200)))]
    else:
        topic, v = draw(valid_value("constraints"))
        v[which] = [f"t{j}" for j in range(draw(st.integers(33, 500)))]
    return topic, _key(v), _dump(v), "huge_list"


_NON_FINITE = [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"nan", b"inf"]
_NUMERIC = {"impressions": [("ts",), ("k",), ("items", 0, "score"), ("items", 0, "rank_score"), ("alpha",)],
            "watch": [("ts",), ("watch_ms",), ("duration_ms",)], "flags": [("ts",)], "constraints": [("ts",)],
            "forget": [("ts",)]}


@st.composite
def non_finite(draw):
    topic, v = draw(valid_value())
    path = pick(draw, _NUMERIC[topic])
    if path == ("alpha",):
        v["alpha"] = 0.1
    raw = _with_literal(v, path, pick(draw, _NON_FINITE))
    return topic, _key(v), raw, "non_finite"


@st.composite
def negative(draw):
    """Negative watch_ms or duration_ms."""
    topic, v = draw(valid_value("watch"))
    field = pick(draw, ["watch_ms", "duration_ms"])
    v[field] = draw(st.one_of(st.integers(-10**9, -1), st.floats(-1e12, -1e-6)))
    return topic, _key(v), _dump(v), "negative"


@st.composite
def bad_ts(draw):
    """ts must be > 0 (seconds since the epoch)."""
    topic, v = draw(valid_value())
    v["ts"] = draw(st.one_of(st.just(0), st.just(0.0), st.just(-0.0), st.integers(-10**12, -1),
                             st.floats(-1e12, -1e-9)))
    return topic, _key(v), _dump(v), "bad_ts"


@st.composite
def long_id(draw):
    """Ids over 256 characters, of any script (CJK, emoji, combining marks, RTL)."""
    topic, v = draw(valid_value())
    seed = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                        min_size=1, max_size=8))
    n = draw(st.integers(257, 5000))
    long = (seed * (n // len(seed) + 1))[:n]
    field = pick(draw, [f for f in ("event_id", "user_id", "slate_id", "item_id") if f in v]
                 + (["items.item_id"] if topic == "impressions" else []))
    if field == "items.item_id":
        v["items"][0]["item_id"] = long
    else:
        v[field] = long
    return topic, _key(v), _dump(v), "long_id"


@st.composite
def nul_id(draw):
    topic, v = draw(valid_value())
    field = pick(draw, [f for f in ("event_id", "user_id", "slate_id", "item_id") if f in v])
    s = v[field]
    at = draw(st.integers(0, len(s)))
    v[field] = s[:at] + "\x00" + s[at:]
    key = pick(draw, [_key(v), None])
    return topic, key, _dump(v), "nul_id"


@st.composite
def empty(draw):
    """Empty values: a null or zero-byte value, blank text, {}, empty ids and tags."""
    topic = pick(draw, INPUTS)
    how = pick(draw, ["null", "zero", "blank", "object", "id", "tag"])
    if how == "null":
        return topic, b"u", None, "empty"
    if how == "zero":
        return topic, b"u", b"", "empty"
    if how == "blank":
        return topic, b"u", pick(draw, [b" ", b"\n", b"\t \r\n"]), "empty"
    if how == "object":
        return topic, b"u", b"{}", "empty"
    topic, v = draw(valid_value(topic))
    if how == "tag" and topic in ("constraints", "impressions"):
        if topic == "constraints":
            v["block_tags"] = ["guns", ""]
        else:
            v["items"][0]["tags"] = [""]
    else:
        v[pick(draw, [f for f in ("event_id", "user_id", "slate_id", "item_id") if f in v])] = ""
    return topic, _key(v), _dump(v), "empty"


@st.composite
def key_mismatch(draw):
    """A valid event whose message key is not its user_id (the key decides the partition)."""
    topic, v = draw(valid_value())
    key = draw(st.one_of(st.sampled_from(VALID_USERS + FRESH_USERS).map(str.encode),
                         st.binary(min_size=1, max_size=16)))
    if key == _key(v):
        key += b"-other"
    return topic, key, _dump(v), "key_mismatch"


@st.composite
def unknown_kind(draw):
    """Flags of a kind outside {not_interested, report}; constraints of an unknown source."""
    if draw(st.booleans()):
        topic, v = draw(valid_value("flags"))
        v["kind"] = draw(st.one_of(st.sampled_from(["Report", "REPORT", "report ", " report", "not-interested",
                                                    "notinterested", "hate", "spam", "like", "", "null"]),
                                   st.text(max_size=12)).filter(lambda s: s not in ("report", "not_interested")))
    else:
        topic, v = draw(valid_value("constraints"))
        v["source"] = draw(st.text(max_size=12).filter(lambda s: s not in ("declared", "inferred")))
    return topic, _key(v), _dump(v), "unknown_kind"


@st.composite
def bad_slate(draw):
    """More items than k, an item twice in one slate, k out of [1, 10000], alpha out of (0, 1)."""
    topic, v = draw(valid_value("impressions"))
    how = pick(draw, ["items_gt_k", "duplicate_item", "k_out_of_range", "alpha_out_of_range"])
    if how == "items_gt_k":
        k = draw(st.integers(1, 20))
        v["k"] = k
        v["items"] = [{"item_id": f"i{j}", "score": 0.5} for j in range(k + draw(st.integers(1, 10)))]
    elif how == "duplicate_item":
        n = draw(st.integers(2, 10))
        ids = [f"i{j}" for j in range(n)]
        ids[draw(st.integers(1, n - 1))] = ids[0]
        v["items"] = [{"item_id": i, "score": 0.5} for i in ids]
        v["k"] = n
    elif how == "k_out_of_range":
        v["k"] = pick(draw, [0, -1, 10_001, 2**63, -(2**63)])
    else:
        v["alpha"] = pick(draw, [0, 0.0, 1, 1.0, -0.1, 1.5, 100])
    return topic, _key(v), _dump(v), how


@st.composite
def oversized(draw):
    """A value over 1 MB that would otherwise be valid (the bulk is an unknown field)."""
    topic, v = draw(valid_value(uid=pick(draw, VALID_USERS)))
    size = draw(st.integers(MAX_BYTES + 1, MAX_BYTES + 300_000))
    v["padding"] = ""
    v["padding"] = "p" * (size - len(_dump(v)))
    raw = _dump(v)
    assert len(raw) == size
    return topic, _key(v), raw, "oversized"


HOSTILE = st.one_of(broken_json(), invalid_utf8(), lone_surrogate(), not_object(), wrong_type(), huge_list(),
                    non_finite(), negative(), bad_ts(), long_id(), nul_id(), empty(), key_mismatch(), unknown_kind(),
                    bad_slate())
KINDS = {"broken_json", "invalid_utf8", "lone_surrogate", "not_object", "wrong_type", "huge_list", "non_finite",
         "negative", "bad_ts", "long_id", "nul_id", "empty", "key_mismatch", "unknown_kind", "items_gt_k",
         "duplicate_item", "k_out_of_range", "alpha_out_of_range", "oversized"}


def _collect(strategy, n: int) -> list:
    """``n`` draws of ``strategy``, the same on every run (derandomized, generate phase only)."""
    out: list = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(x):
        out.append(x)

    draw()
    return out


def _hostile() -> list[tuple[str, bytes | None, bytes | None, str]]:
    """The hostile events: N_HOSTILE (and a few more) of every kind above, then three values over 1 MB."""
    per = 20  # events per hypothesis example: amortises the engine's per-example cost (~8 s in all)
    lists = _collect(st.lists(HOSTILE, min_size=per, max_size=per), N_HOSTILE // per + 25)
    events = [e for chunk in lists for e in chunk]
    events += _collect(oversized(), 3)
    assert len(events) >= N_HOSTILE, len(events)
    assert {kind for *_, kind in events} == KINDS
    assert {topic for topic, *_ in events} == set(INPUTS)
    return events


# -- the test ---------------------------------------------------------------------------------

COUNTED = ("riskgate_events_total", "riskgate_dlq_total", "riskgate_watermark_seconds",
           "riskgate_slates_matured_total", "riskgate_window_slates", "riskgate_pending_slates",
           "riskgate_window_refused_total")
REASON_CODES = {"bad_json", "not_object", "schema", "key_mismatch", "too_large"}
CODE_OF_KIND = {"broken_json": "bad_json", "invalid_utf8": "bad_json", "not_object": "not_object",
                "key_mismatch": "key_mismatch", "oversized": "too_large"}


def _pools(bootstrap, names) -> dict:
    latest = latest_by_key(read_topic(bootstrap, names.safe_pools))
    return {k.decode(): (None if v is None else [p["item_id"] for p in json_of(v)["safe_pool"]])
            for k, v in latest.items()}


def _view_thresholds(worker) -> dict | None:
    status, body = worker.get("/thresholds")
    if status != 200:
        return None
    return {k: (v["n"], v["thresholds"]) for k, v in json_of(body)["thresholds"].items()}


class _Snapshot:
    """Everything a hostile event must not change, taken from outside the worker."""

    def __init__(self, worker, bootstrap, names, app_id):
        self.pools_records = Counter(read_topic(bootstrap, names.safe_pools))
        self.changelog = Counter(read_topic(bootstrap, users_changelog(app_id)))
        self.users = {}
        for u in VALID_USERS + TICK_USERS:
            status, body = worker.get(f"/users/{u}", token=True)
            assert status == 200, (u, status)
            self.users[u] = json_of(body)
        self.view = _view_thresholds(worker)
        self.published = {k: (m["n"], m["thresholds"])
                          for k, m in published_thresholds(bootstrap, names.thresholds).items()}
        self.metrics = metric_samples(worker, *COUNTED)


def _first_errors(worker, n: int = 3) -> str:
    """The first ERROR lines of the worker's log: the cause, where the log's tail shows the shutdown."""
    lines = [x for x in worker.log_path.read_text(errors="replace").splitlines() if "[ERROR]" in x
             or "[CRITICAL]" in x]
    return "\n".join(x[:400] for x in lines[:n])


def _alive(worker) -> None:
    try:
        worker.check_alive()
    except AssertionError:
        raise AssertionError("the worker died; first errors in its log:\n" + _first_errors(worker)) from None


def _folded(key) -> bool:
    """A riskgate_events_total series of events that reached the core (any outcome but invalid)."""
    name, labels = key
    return name == "riskgate_events_total" and ("outcome", "invalid") not in labels


def _events_total(samples, **labels) -> float:
    return sum(v for (name, ls), v in samples.items()
               if name == "riskgate_events_total" and all((k, w) in ls for k, w in labels.items()))


def test_a_flood_of_hostile_events_changes_nothing_but_the_dead_letter_topic(kafka_bootstrap, topic_prefix, app_id,
                                                                             tmp_path):
    t_start = time.monotonic()
    names = make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, PARTITIONS, topic_prefix,
                    **SETTINGS).start()
    try:
        hostile = _hostile()  # while the worker starts
        n_hostile = len(hostile)
        worker.wait_healthy()

        # 1. Valid traffic, then its steady state: every event folded, every slate in the
        # window, every safe pool on the compacted topic.
        valid = valid_events()
        ends = send_events(kafka_bootstrap, topic_prefix, valid)
        wait_for(lambda: worker.metric("riskgate_events_total", outcome="ok") == len(valid), 60,
                 what=f"the worker to fold the {len(valid)} valid events")
        wait_for(lambda: (_view_thresholds(worker) or {}).get("replace:global", (0,))[0] == len(VALID_USERS), 60,
                 what="every valid slate to mature into the published window")
        want_pools = expected_pools()
        wait_for(lambda: _pools(kafka_bootstrap, names) == want_pools, 60, interval=0.5,
                 what="the valid users' safe pools on safe-pools")
        wait_for(lambda: worker.metric("riskgate_slates_matured_total", kind="holdout") == len(VALID_USERS), 30,
                 what="the matured slates to reach the metrics")  # copied by a 2 s timer
        wait_committed(kafka_bootstrap, app_id, ends)  # so every effect of the valid events is on the broker
        before = _Snapshot(worker, kafka_bootstrap, names, app_id)
        assert before.view["remove:global"][0] == len(VALID_USERS)
        assert all(before.users[u]["blocked_tags"] == ["guns"] for u in VALID_USERS)
        assert _events_total(before.metrics, outcome="invalid") == 0

        # 2. The flood, with /health watched throughout.
        with HealthWatch(worker) as health:
            flood_at = time.monotonic()
            flood_ends = produce_pipelined(kafka_bootstrap, [(topic_prefix + t, k, v) for t, k, v, _ in hostile])
            folded_before = {k: v for k, v in before.metrics.items() if _folded(k)}

            def rejected_all():
                _alive(worker)
                now = metric_samples(worker, "riskgate_events_total")
                folded = {k: v for k, v in now.items() if _folded(k)}
                # fail at once, not at the timeout, when a hostile event is folded as if valid
                assert not now or folded == folded_before, f"hostile events were accepted: {folded}"
                return _events_total(now, outcome="invalid") >= n_hostile

            wait_for(rejected_all, 120, interval=0.5, what=f"the worker to reject {n_hostile} hostile events")
            rejected_at = time.monotonic()

            def dead_lettered():
                _alive(worker)
                records = read_topic(kafka_bootstrap, names.dlq)
                return records if len(records) >= n_hostile else None

            dlq = wait_for(dead_lettered, 60, interval=1.0, what=f"{n_hostile} records on the dead-letter topic")
            wait_committed(kafka_bootstrap, app_id, {**ends, **flood_ends})  # whatever they did is on the broker
            flooded = _Snapshot(worker, kafka_bootstrap, names, app_id)

            # 3. Valid events after the flood are still processed, on every partition: flags
            # that empty one valid user's safe pool per partition. They are older than the
            # newest event but not late, and in no pending slate's label window, so they
            # move neither the watermark nor the thresholds.
            after_users = VALID_USERS[::2]  # one per partition
            post = [("flags", flag_event(u, f"{u}-f-after", f"{u}-a", T0 + LABEL_WINDOW + LATENESS + 45))
                    for u in after_users]
            send_events(kafka_bootstrap, topic_prefix, post)
            want_pools.update({u: [] for u in after_users})
            wait_for(lambda: _pools(kafka_bootstrap, names) == want_pools, 60, interval=0.5,
                     what="flags sent after the flood to empty the safe pools")
            wait_for(lambda: worker.metric("riskgate_events_total", type="flag", outcome="ok")
                     == len(VALID_USERS) + len(post), 30, what="the post-flood events to be counted")
            final = metric_samples(worker, "riskgate_events_total")
        # The watch ran across the whole flood: /health answered before it was produced and after
        # every hostile event had been rejected (a count of polls depended on the machine's speed).
        assert health.answered[0] <= flood_at and health.answered[-1] >= rejected_at
        assert not health.failures, f"/health answered other than 200 during the flood: {health.failures[:10]}"
        assert worker.healthy()

        # (a) exactly one dead-letter record per hostile event, with a reason and the original bytes
        assert len(dlq) == n_hostile
        got, where, bad_reason, wrong_code = Counter(), set(), [], []
        kinds = {}
        for t, k, v, kind in hostile:
            kinds.setdefault((topic_prefix + t, k, v), set()).add(kind)
        for _, raw, _ in dlq:
            rec = json_of(raw)
            key = None if rec["key"] is None else base64.b64decode(rec["key"])
            value = None if rec["value"] is None else base64.b64decode(rec["value"])
            got[(rec["topic"], key, value)] += 1
            where.add((rec["topic"], rec["partition"], rec["offset"]))
            reason = rec["reason"]
            if not (isinstance(reason, str) and reason.split(":")[0] in REASON_CODES and len(reason) > len("schema: ")):
                bad_reason.append(reason)
            ks = kinds.get((rec["topic"], key, value), set())
            want = {CODE_OF_KIND.get(kind) for kind in ks}
            if len(want) == 1 and None not in want and reason.split(":")[0] not in want:
                wrong_code.append((sorted(ks), reason))
        assert got == Counter((topic_prefix + t, k, v) for t, k, v, _ in hostile)
        assert len(where) == n_hostile  # one record per consumed offset
        assert not bad_reason, bad_reason[:5]
        assert not wrong_code, wrong_code[:5]

        # (b) nothing else changed: no safe-pools record, no write to the users table, the same
        # users (and no new ones), thresholds and watermarks; only the invalid counters moved,
        # by exactly what was sent of each type
        assert flooded.pools_records == before.pools_records
        assert flooded.changelog == before.changelog
        assert flooded.users == before.users
        for u in FRESH_USERS:
            assert worker.get(f"/users/{u}", token=True)[0] == 404, u
        assert flooded.view == before.view
        assert flooded.published == before.published
        sent = Counter(TYPE_OF[t] for t, *_ in hostile)
        for key in set(flooded.metrics) | set(before.metrics):
            name, labels = key
            delta = flooded.metrics.get(key, 0.0) - before.metrics.get(key, 0.0)
            ls = dict(labels)
            if name == "riskgate_events_total" and ls["outcome"] == "invalid":
                assert delta == sent[ls["type"]], (ls, delta, sent)
            elif name != "riskgate_dlq_total":  # by reason code; its total is checked below
                assert delta == 0, (name, ls, delta)
        assert sum(v for (n, _), v in flooded.metrics.items() if n == "riskgate_dlq_total") == n_hostile
        # and still exactly n_hostile invalid once the valid events after them were counted
        assert _events_total(final, outcome="invalid") == n_hostile
    finally:
        worker.stop()
        print(f"hostile flood test: {time.monotonic() - t_start:.1f} s wall")


# -- single cases that have taken a worker down --------------------------------------------

def _padded_forget(uid: str, size: int) -> bytes:
    v = forget_event(uid, "x-pad", T0)
    v["padding"] = ""
    v["padding"] = "p" * (size - len(_dump(v)))
    raw = _dump(v)
    assert len(raw) == size
    return raw


SINGLE_CASES = {
    # Valid but for its size; its dead-letter record (base64, 4/3 of it) is larger still.
    "a value just over 1 MB": ("forget", _padded_forget(VALID_USERS[0], MAX_BYTES + 1), "too_large"),
    # Not UTF-8 inside a string: not JSON text (RFC 8259 §8.1), so bad_json like any other.
    "invalid UTF-8 in a string": ("flags", _with_literal(flag_event(VALID_USERS[0], "x-utf8", "a", T0), ("item_id",),
                                                         b'"\xff\xfe"'), "bad_json"),
    # A control that every worker so far has survived.
    "a NUL in the user id": ("flags", orjson.dumps(flag_event(VALID_USERS[0] + "\x00", "x-nul", "a", T0)), "schema"),
}


@pytest.mark.parametrize("case", sorted(SINGLE_CASES))
def test_a_single_hostile_value_is_dead_lettered_and_the_worker_goes_on(case, kafka_bootstrap, topic_prefix, app_id,
                                                                         tmp_path):
    topic, raw, code = SINGLE_CASES[case]
    uid = VALID_USERS[0]
    # After the hostile record, on its own topic and partition: a valid event with a visible effect.
    follow_up, pool_after = {"forget": (forget_event(uid, "ok-forget", T0 + 2), None),
                             "flags": (flag_event(uid, "ok-flag", "a", T0 + 2), [])}[topic]
    names = make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, PARTITIONS, topic_prefix,
                    **SETTINGS).start()
    try:
        worker.wait_healthy()
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(uid, "ok-imp", "ok-s", T0, [("a", 0.5, 1.0, ())])),
            ("watch", watch_event(uid, "ok-w", "a", T0 + 1))])
        wait_for(lambda: _alive(worker) or _pools(kafka_bootstrap, names).get(uid) == ["a"], 60, interval=0.5,
                 what="the valid events before the hostile one to be folded")
        produce_pipelined(kafka_bootstrap, [(topic_prefix + topic, uid.encode(), raw),
                                            (topic_prefix + topic, uid.encode(), orjson.dumps(follow_up))])
        # The worker read past the hostile record in its partition and folded the next one.
        wait_for(lambda: _alive(worker) or _pools(kafka_bootstrap, names).get(uid, "absent") == pool_after, 60,
                 interval=0.5, what=f"the valid {topic} event after the hostile one to be folded")
        dlq = wait_for(lambda: _alive(worker) or read_topic(kafka_bootstrap, names.dlq), 30, interval=0.5,
                       what="a dead-letter record")
        assert len(dlq) == 1
        rec = json_of(dlq[0][1])
        assert base64.b64decode(rec["value"]) == raw
        assert base64.b64decode(rec["key"]) == uid.encode()
        assert rec["topic"] == topic_prefix + topic
        assert rec["reason"].split(":")[0] == code
        wait_for(lambda: _alive(worker) or worker.metric("riskgate_events_total", outcome="ok") == 3, 30,
                 what="the three valid events to be counted")  # counted when flushed: maybe after their outputs
        assert worker.metric("riskgate_events_total", outcome="invalid") == 1
        assert worker.healthy()
    finally:
        worker.stop()


def test_a_stray_record_on_the_snapshots_topic_is_dead_lettered_and_publication_goes_on(kafka_bootstrap, topic_prefix,
                                                                                         app_id, tmp_path):
    """Only workers write ``riskgate-partials``; a record none could have written must not stop the aggregator.

    Its agent used to raise on it (and Faust restarts a crashed agent on the next
    record); now it goes to the dead-letter topic as ``bad_snapshot`` and the sums
    go on: publications keep coming with growing versions.
    """
    names = make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, PARTITIONS, topic_prefix,
                    **dict(SETTINGS, recompute_interval=1, heartbeat=2)).start()
    key = "remove:global"

    def version() -> int:
        return published_thresholds(kafka_bootstrap, names.thresholds).get(key, {}).get("version", 0)

    try:
        worker.wait_healthy()
        before = wait_for(lambda: _alive(worker) or version(), 60, interval=0.5, what="a first publication")
        stray = orjson.dumps({"partition": 0, "round": 1, "watermark": None, "span": None,
                              "totals": {"remove|global": base64.b64encode(bytes(8 * 3)).decode()}})  # 2 grid points
        produce_pipelined(kafka_bootstrap, [(names.partials, b"0", stray), (names.partials, b"x", b"not json")])
        dlq = wait_for(lambda: _alive(worker) or (len(r := read_topic(kafka_bootstrap, names.dlq)) >= 2 and r), 60,
                       interval=0.5, what="two dead-letter records")
        assert sorted(json_of(v)["reason"].split(":")[0] for _, v, _ in dlq) == ["bad_snapshot", "bad_snapshot"]
        assert {base64.b64decode(json_of(v)["value"]) for _, v, _ in dlq} == {stray, b"not json"}
        assert worker.metric("riskgate_dlq_total", reason="bad_snapshot") == 2
        # The aggregator is still summing: the heartbeat publishes again, with a newer version.
        wait_for(lambda: _alive(worker) or version() >= before + 2, 60, interval=0.5,
                 what="publications after the stray records")
        assert worker.healthy()
    finally:
        worker.stop()

