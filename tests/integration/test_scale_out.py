"""Scale-out (issue #6): two workers in one consumer group publish what one worker publishes.

The same seeded synthetic stream is produced to two topic prefixes of the real
broker, each with 8 partitions:

* scenario A: ONE worker (its own app id, so its own consumer group) reads its copy;
* scenario B: TWO workers in ONE consumer group (same app id, own data dirs and
  web ports) read the other copy and split its 8 partitions between them. They
  start together; when the first to join takes every partition, the rebalance
  after the second joins hands some over (state recovered from the changelog).

Once each scenario has applied and committed every record and its published
thresholds cover its calibration windows, the latest ``risk-thresholds``
message of every shared key (``remove|replace`` × ``global|band:low|band:high``)
and of every ``strategy:user:<id>`` key must carry the same ``n`` and the same
``thresholds`` (every α's ``lambda``, ``filter_all``, ``risk_at_lambda``), and the
latest ``safe-pools`` record of every user the same pool and blocked tags.
Versions and publication times are not compared: they depend on timing. When
thresholds differ, the failure lists the calibration-window slates
(``/debug/window-slates``) that the two scenarios hold differently, field by
field, and each worker's log with its assignments, warnings and errors.
"""

from __future__ import annotations

import uuid

import pytest

from calibration.synthetic import WorldConfig

from .harness import events_with_forgets_and_ticks, Worker, json_of, latest_by_key, make_topics, read_topic, send_events, wait_committed, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 8
ALPHAS = (0.01, 0.05, 0.1)
# test_stream.SETTINGS, with min_slates low enough that users with 5 or more mature
# holdout slates of their own get a ``strategy:user:<id>`` threshold.
SETTINGS = dict(label_window=120, allowed_lateness=5, window=86400, buckets=24, min_slates=5,
                alphas=",".join(map(str, ALPHAS)), history_max=100000, beta=50)
SHARED = [f"{s}:{g}" for s in ("remove", "replace") for g in ("global", "band:low", "band:high")]


def _world():
    return WorldConfig(seed=7, n_users=60, n_items=5000, n_slates=800, slates_per_second=1.0, holdout_share=0.5,
                       rate_multiplier=20.0, label_delay=60.0, constraint_user_share=0.1)


def _events():
    return events_with_forgets_and_ticks(_world(), PARTITIONS)[0]


def _health(worker: Worker) -> dict | None:
    worker.check_alive()
    status, body = worker.get("/health")
    if status is None:
        return None
    try:
        return json_of(body)
    except ValueError:  # orjson.JSONDecodeError: a half-started web server
        return None


def _split(workers):
    """Each worker's partitions once every worker is healthy, holds some, and together they hold all 8."""
    owned = []
    for w in workers:
        h = _health(w)
        if not h or not h.get("healthy") or not h.get("partitions"):
            return None
        owned.append(set(h["partitions"]))
    if set().union(*owned) != set(range(PARTITIONS)) or sum(map(len, owned)) != PARTITIONS:
        return None
    return owned


def _published(bootstrap, topic):
    """The latest (highest version) ``risk-thresholds`` message per key, tombstoned keys left out."""
    out = {}
    for key, value, _ in read_topic(bootstrap, topic):
        k = key.decode()
        if value is None:
            out.pop(k, None)
            continue
        msg = json_of(value)
        if k not in out or msg["version"] > out[k]["version"]:
            out[k] = msg
    return out


def _window_slates(workers):
    """Every slate in the scenario's calibration windows, from all its workers (None while one does not answer)."""
    slates, seen = [], set()
    for w in workers:
        status, body = w.get("/debug/window-slates", token=True)
        if status != 200:
            return None
        mine = json_of(body)["slates"]
        parts = {s["partition"] for s in mine}
        if parts & seen:  # a partition on two workers: mid-rebalance
            return None
        seen |= parts
        slates += mine
    return slates


def _settled(workers, bootstrap, names):
    """The published shared thresholds once their ``n`` equals what the workers' windows hold."""
    slates = _window_slates(workers)
    if not slates:
        return None
    want = {"global": len(slates)}
    for band in ("low", "high"):
        want[f"band:{band}"] = sum(1 for s in slates if s["band"] == band)
    pub = _published(bootstrap, names.thresholds)
    if any(k not in pub or pub[k]["n"] != want[k.split(":", 1)[1]] for k in SHARED):
        return None
    return pub


def _thresholds_view(pub):
    return {k: {"n": m["n"], "thresholds": m["thresholds"]} for k, m in pub.items()}


def _pools_view(bootstrap, topic):
    out = {}
    for k, v in latest_by_key(read_topic(bootstrap, topic)).items():
        if v is None:
            out[k.decode()] = None  # tombstone (a forgotten user)
        else:
            m = json_of(v)
            out[k.decode()] = {"safe_pool": [p["item_id"] for p in m["safe_pool"]], "blocked_tags": m["blocked_tags"]}
    return out


def _describe(t):
    return {"n": t["n"], "lambda": [(x["alpha"], x["lambda"], x["filter_all"], x["risk_at_lambda"])
                                    for x in t["thresholds"]]}


def _diff(a: dict, b: dict, describe=lambda x: x, limit: int = 20) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            da = describe(a[k]) if k in a and a[k] is not None else a.get(k, "<missing>")
            db = describe(b[k]) if k in b and b[k] is not None else b.get(k, "<missing>")
            out.append(f"{k}: one worker {da} / two workers {db}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _slate_diff(a: list, b: list, limit: int = 10) -> str:
    """Which window slates (``/debug/window-slates``) the two scenarios hold differently, and in which fields."""
    da = {s["slate_id"]: s for s in a}
    db = {s["slate_id"]: s for s in b}
    only_one, only_two = sorted(set(da) - set(db))[:limit], sorted(set(db) - set(da))[:limit]
    lines = [(f"window slates: {len(da)} with one worker, {len(db)} with two; "
              f"only with one: {only_one}, only with two: {only_two}")]
    fields: dict[str, int] = {}
    examples = []
    for sid in sorted(set(da) & set(db), key=lambda x: (len(x), x)):
        x, y = da[sid], db[sid]
        bad = [f for f in x if f != "partition" and x[f] != y.get(f)]
        for f in bad:
            fields[f] = fields.get(f, 0) + 1
        if bad and len(examples) < limit:
            examples.append(f"  {sid} ({x['user_id']}, partition {x['partition']}): "
                            + ", ".join(f"{f} {x[f]!r} / {y.get(f)!r}" for f in bad if f != "items")
                            + (" (items differ)" if "items" in bad else ""))
    parts: dict[int, int] = {}
    for sid in set(da) & set(db):
        if da[sid] != {**db[sid], "partition": da[sid]["partition"]}:
            parts[da[sid]["partition"]] = parts.get(da[sid]["partition"], 0) + 1
    lines.append(f"slates differing, by field: {fields}; by partition: {dict(sorted(parts.items()))}")
    return "\n".join(lines + examples)


def _logs(scaled) -> str:
    """Where every worker's log is, with its assignments, warnings and errors."""
    out = [f"partitions of the two workers: {scaled['owned']}"]
    named = [("one worker", scaled["one"][0])] + [(f"two workers #{i}", w) for i, w in enumerate(scaled["two"], 1)]
    for name, w in named:
        lines = w.log_path.read_text(errors="replace").splitlines()
        notable = [ln for ln in lines if any(m in ln for m in ("WARN", "ERROR", "Traceback", "newly assigned"))]
        out.append(f"--- {name}: {w.log_path} ({len(lines)} lines; assignments, warnings, errors:)")
        out += notable[-15:]
    return "\n".join(out)


@pytest.fixture(scope="module")
def scaled(kafka_bootstrap, tmp_path_factory):
    run = uuid.uuid4().hex[:8]
    tmp = tmp_path_factory.mktemp("scale-out")
    events = _events()
    app_a, app_b = f"rg-one-{run}", f"rg-two-{run}"
    prefix_a, prefix_b = f"{app_a}.", f"{app_b}."
    names_a = make_topics(kafka_bootstrap, prefix_a, PARTITIONS)
    names_b = make_topics(kafka_bootstrap, prefix_b, PARTITIONS)
    # The whole stream is on the broker before any worker starts, once per scenario.
    ends_a = send_events(kafka_bootstrap, prefix_a, events)
    ends_b = send_events(kafka_bootstrap, prefix_b, events)
    one = [Worker(kafka_bootstrap, app_a, tmp / "a", tmp, PARTITIONS, prefix_a, **SETTINGS)]
    two = [Worker(kafka_bootstrap, app_b, tmp / f"b{i}", tmp, PARTITIONS, prefix_b, **SETTINGS) for i in (1, 2)]
    workers = one + two
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_healthy(90)
        # Both B workers hold partitions: after the second one joined, a rebalance gave it some.
        owned = wait_for(lambda: _split(two), 90, interval=0.5,
                         what="the two workers to split the 8 partitions between them")
        for ws, app, ends, names in ((one, app_a, ends_a, names_a), (two, app_b, ends_b, names_b)):
            wait_for(lambda ws=ws: sum(w.metric("riskgate_records_applied_total") for w in ws) >= len(events), 120,
                     interval=0.5, what=f"{app} to apply {len(events)} records")
            # Committed offsets: every effect of every record (user writes, safe pools,
            # users' own thresholds) is on the broker.
            wait_committed(kafka_bootstrap, app, ends, timeout=90)
            wait_for(lambda ws=ws, names=names: _settled(ws, kafka_bootstrap, names), 60, interval=0.5,
                     what=f"{app}'s published thresholds to cover its windows")
        # Still split the same way: nothing rebalanced while the numbers settled.
        assert _split(two) == owned, (owned, _split(two))
        slates = {"one": _window_slates(one), "two": _window_slates(two)}  # for diagnostics
        yield dict(bootstrap=kafka_bootstrap, one=one, two=two, names_a=names_a, names_b=names_b, owned=owned,
                   events=events, slates=slates)
    finally:
        for w in workers:
            w.stop()


def _eventually_equal(get_a, get_b, what, timeout: float = 20.0):
    """(a, b) once equal; outputs leave through producer buffers, so await them instead of sleeping."""
    last = []

    def same():
        last[:] = [get_a(), get_b()]
        return last[0] == last[1]

    try:
        wait_for(same, timeout, interval=1.0, what=what)
    except AssertionError:
        pass
    return last[0], last[1]


def test_two_workers_split_the_partitions(scaled):
    a, b = scaled["owned"]
    assert a and b and a | b == set(range(PARTITIONS)) and not a & b


def test_shared_thresholds_equal_one_workers(scaled):
    bs, na, nb = scaled["bootstrap"], scaled["names_a"], scaled["names_b"]

    def shared(names):
        return {k: v for k, v in _thresholds_view(_published(bs, names.thresholds)).items() if k in SHARED}

    one, two = _eventually_equal(lambda: shared(na), lambda: shared(nb), "the shared thresholds to agree")
    assert set(one) == set(SHARED)
    assert one["replace:global"]["n"] > 300  # a real window
    # Both bands hold slates: a slate's band (its user's as of its ts) is compared, not just the global sums.
    assert one["replace:band:low"]["n"] > 30 and one["replace:band:high"]["n"] > 30, {k: v["n"] for k, v in one.items()}
    assert any(t["lambda"] not in (None, 0.0) for v in one.values() for t in v["thresholds"])  # some α filters
    diff = _diff(one, two, _describe)
    assert not diff, ("shared thresholds differ:\n" + "\n".join(diff) + "\n"
                      + _slate_diff(scaled["slates"]["one"], scaled["slates"]["two"]) + "\n" + _logs(scaled))


def test_user_thresholds_equal_one_workers(scaled):
    bs, na, nb = scaled["bootstrap"], scaled["names_a"], scaled["names_b"]

    def users(names):
        return {k: v for k, v in _thresholds_view(_published(bs, names.thresholds)).items() if ":user:" in k}

    one, two = _eventually_equal(lambda: users(na), lambda: users(nb), "the users' own thresholds to agree")
    assert len(one) >= 20  # user groups appeared (min_slates is low enough)
    assert {k.split(":", 1)[0] for k in one} == {"remove", "replace"}
    diff = _diff(one, two, _describe)
    assert not diff, (f"users' own thresholds differ ({len(one)} keys with one worker, {len(two)} with two):\n"
                      + "\n".join(diff) + "\n" + _slate_diff(scaled["slates"]["one"], scaled["slates"]["two"])
                      + "\n" + _logs(scaled))


def test_safe_pools_equal_one_workers(scaled):
    bs, na, nb = scaled["bootstrap"], scaled["names_a"], scaled["names_b"]
    one, two = _eventually_equal(lambda: _pools_view(bs, na.safe_pools), lambda: _pools_view(bs, nb.safe_pools),
                                 "the safe pools to agree")
    users = {v["user_id"] for _, v in scaled["events"]}
    assert set(one) == users  # every user has a record (a tombstone for the forgotten ones)
    assert sum(1 for v in one.values() if v is None) == 2
    assert sum(len(v["safe_pool"]) for v in one.values() if v) > 100
    assert any(v["blocked_tags"] for v in one.values() if v)
    diff = _diff(one, two)
    assert not diff, "safe pools differ:\n" + "\n".join(diff) + "\n" + _logs(scaled)
