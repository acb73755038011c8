"""Out-of-order and late data against a running worker (issue 7; SPEC §2, §3, README decisions).

SPEC §2: "Events may arrive out of order (a flag before its impression, a watch
before its impression) within ``allowed_lateness``; later ones are counted as
late and ignored for calibration (but a flag always updates the safe pool)."
A partition's watermark is the largest ``ts`` seen minus ``allowed_lateness``;
an event older than it is late. A slate matures once the watermark passes
``ts + label_window``; its labels are then final.

Every user of a scenario is keyed into one partition, so one watermark orders
them all. The events are sent in stages, and each stage waits until the
worker's per-outcome counters (``riskgate_events_total{type, outcome}``) show
exactly what SPEC says they should, so the order in which the worker reads them
is the order the test wrote them, across topics too. What is checked, from
outside only: the counters, the watermark gauge, the published thresholds'
``n`` (``/thresholds``), the slates in the calibration window and their labels
(``/debug/window-slates``), the users (``/users/{id}``) and ``safe-pools``.
"""

from __future__ import annotations

import pytest

from .harness import (Worker, flag_event, forget_event, impression_event, json_of, latest_by_key, make_topics,
                      metric_samples, outcome_counts, read_topic, send_events, users_in_partition, wait_for,
                      watch_event)

pytestmark = pytest.mark.integration

PARTITIONS = 2
P = 1  # the scenario's partition; the other one stays empty
T0 = 1_700_000_000.0
LABEL_WINDOW = 100.0
LATENESS = 30.0
SETTINGS = dict(label_window=LABEL_WINDOW, allowed_lateness=LATENESS, window=86400, buckets=24, min_slates=1000,
                beta=50)


def _start(kafka_bootstrap, topic_prefix, app_id, tmp_path, **extra):
    names = make_topics(kafka_bootstrap, topic_prefix, PARTITIONS)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, PARTITIONS, topic_prefix,
                    **{**SETTINGS, **extra}).start()
    return names, worker


def _await_counts(worker, want: dict, timeout: float = 60.0) -> None:
    """Wait until the non-zero outcome counters are exactly ``want`` ({(type, outcome): n})."""
    last = []

    def exact():
        worker.check_alive()
        last.append(outcome_counts(worker))
        return last[-1] == want

    try:
        wait_for(exact, timeout, interval=0.25, what="the outcome counters")
    except AssertionError:
        raise AssertionError(f"outcome counters: want {sorted(want.items())}, "
                             f"last {sorted((last[-1] or {}).items())}") from None


def _thresholds(worker) -> dict:
    status, body = worker.get("/thresholds")
    return json_of(body)["thresholds"] if status == 200 else {}


def _n(worker, key: str = "replace:global"):
    return _thresholds(worker).get(key, {}).get("n")


def _await_n(worker, want: dict, all_keys: bool = False, timeout: float = 60.0) -> None:
    """Wait until the published ``n`` of every key in ``want`` is as given (``all_keys``: and no other key)."""
    last = []

    def match():
        th = _thresholds(worker)
        last.append({k: m["n"] for k, m in th.items() if all_keys or k in want})
        return last[-1] == want

    try:
        wait_for(match, timeout, interval=0.25, what="published window sizes")
    except AssertionError:
        raise AssertionError(f"published n: want {want}, last {last[-1] if last else None}") from None


def _window_slates(worker) -> dict:
    status, body = worker.get("/debug/window-slates", token=True)
    assert status == 200, status
    return {s["slate_id"]: s for s in json_of(body)["slates"]}


def _user(worker, uid):
    status, body = worker.get(f"/users/{uid}", token=True)
    return json_of(body) if status == 200 else status


def _pools(bootstrap, names) -> dict:
    latest = latest_by_key(read_topic(bootstrap, names.safe_pools))
    return {k.decode(): (None if v is None else [(p["item_id"], p["rank_score"]) for p in json_of(v)["safe_pool"]])
            for k, v in latest.items()}


def _await_pools(bootstrap, names, want: dict, timeout: float = 60.0) -> None:
    last = []

    def match():
        last.append(_pools(bootstrap, names))
        return all(last[-1].get(u, "absent") == pool for u, pool in want.items())

    try:
        wait_for(match, timeout, interval=0.5, what="safe pools")
    except AssertionError:
        raise AssertionError(f"safe-pools: want {want}, "
                             f"last {[(u, last[-1].get(u, 'absent')) for u in want]}") from None


def _watermark(worker) -> float | None:
    for (_, labels), v in metric_samples(worker, "riskgate_watermark_seconds").items():
        if dict(labels).get("partition") == str(P):
            return v
    return None


def _await_watermark(worker, want: float, timeout: float = 30.0) -> None:
    """The partition's watermark gauge (set when the worker flushes, maybe after the counters moved)."""
    wait_for(lambda: _watermark(worker) == want, timeout, what=f"the watermark of partition {P} to be {want}")


def test_flags_and_watches_before_their_impression_count_normally(kafka_bootstrap, topic_prefix, app_id, tmp_path):
    """Feedback read before its slate, within the allowed lateness, is folded like any other.

    The early flag labels the slate when it matures (and counts for the user's
    reporting band from its own ts on: not for the slate, served before it);
    the early watch makes the item safe once shown.
    """
    a, b, tick = users_in_partition("early", P, 3, PARTITIONS)
    names, worker = _start(kafka_bootstrap, topic_prefix, app_id, tmp_path)
    try:
        worker.wait_healthy()
        # 1. The user flags a1 and watches 90% of a2, both 20 s after the slate was served;
        # the slate itself has not been read yet.
        send_events(kafka_bootstrap, topic_prefix, [("flags", flag_event(a, "a-flag", "a1", T0 + 20)),
                                                    ("watch", watch_event(a, "a-watch", "a2", T0 + 20, 9000, 10000))])
        _await_counts(worker, {("flag", "ok"): 1, ("watch", "ok"): 1})
        _await_watermark(worker, T0 + 20 - LATENESS)  # the newest ts read minus the allowed lateness
        # 2. The slates arrive: 20 s behind the newest event, within the lateness of 30 s.
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(a, "a-imp", "a-slate", T0, [("a1", 0.9, 3.0, ()), ("a2", 0.8, 2.0, ()),
                                                                          ("a3", 0.7, 1.0, ())])),
            ("impressions", impression_event(b, "b-imp", "b-slate", T0 + 10, [("b1", 0.5, 1.0, ())])),
        ])
        _await_counts(worker, {("flag", "ok"): 1, ("watch", "ok"): 1, ("impression", "ok"): 2})
        # The early watch counts as a2's first view, with the rank score the impression brings;
        # the early-flagged a1 is never safe; a3 was never watched.
        _await_pools(kafka_bootstrap, names, {a: [("a2", 2.0)], b: []})
        user_a = _user(worker, a)
        assert (user_a["shown"], user_a["flagged"], user_a["pending_slates"], user_a["band"]) == (3, 1, 1, "high")
        assert _n(worker) in (None, 0)  # nothing matured yet
        # 3. A policy-applied tick moves the watermark past both slates' label windows (past:
        # reaching T0 + 10 + LABEL_WINDOW matures nothing, SPEC §1).
        tick_ts = T0 + 10 + LABEL_WINDOW + LATENESS + 1
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(tick, "tick-imp", "tick-slate", tick_ts, [("t", 0.5, 0.0, ())],
                                             policy_applied=True))])
        # Both slates calibrate band low: a's user is high now (1 of 3 shown items flagged), but
        # the flag came 20 s after a-slate was served, and a slate's band is its user's then.
        want_n = {"replace:global": 2, "remove:global": 2, "replace:band:high": 0, "remove:band:high": 0,
                  "replace:band:low": 2, "remove:band:low": 2}
        _await_n(worker, want_n, all_keys=True)
        _await_counts(worker, {("flag", "ok"): 1, ("watch", "ok"): 1, ("impression", "ok"): 3})
        _await_watermark(worker, tick_ts - LATENESS)
        slates = _window_slates(worker)
        assert set(slates) == {"a-slate", "b-slate"}
        # The flag read before its slate is in the slate's labels: a1 flagged, a2 and a3 not.
        assert [(i["score"], i["flagged"]) for i in slates["a-slate"]["items"]] == [(0.9, True), (0.8, False),
                                                                                    (0.7, False)]
        assert [(i["score"], i["flagged"]) for i in slates["b-slate"]["items"]] == [(0.5, False)]
        assert (slates["a-slate"]["band"], slates["b-slate"]["band"]) == ("low", "low")
        assert _user(worker, a)["band"] == "high"
        # The safe pool seen when a-slate was served excludes a2, which was in the slate itself.
        assert slates["a-slate"]["safe_pool_size"] == 0
        wait_for(lambda: worker.metric("riskgate_slates_matured_total", kind="holdout") == 2, 30,
                 what="the matured-slates counter")
        assert worker.metric("riskgate_slates_matured_total", kind="applied") == 0
        assert _user(worker, a)["pending_slates"] == 0 and _user(worker, a)["recent_slates"] == 1
        assert worker.healthy()
    finally:
        worker.stop()


def test_events_older_than_the_allowed_lateness(kafka_bootstrap, topic_prefix, app_id, tmp_path):
    """Late impressions never calibrate; a late flag still empties the safe pool; the other outcomes.

    Also: a forgotten user's older events are ``erased`` (not re-created), a re-sent
    impression is a ``duplicate`` (pending once), and a slate past ``pending_max`` is
    a ``pending_overflow`` that never calibrates.
    """
    c, d, e, f, g, tick1, tick2 = users_in_partition("late", P, 7, PARTITIONS)
    names, worker = _start(kafka_bootstrap, topic_prefix, app_id, tmp_path, pending_max=3)
    try:
        worker.wait_healthy()
        counts = {}

        def expect(**delta):
            for k, n in delta.items():
                typ, outcome = k.split("__")
                counts[(typ, outcome)] = counts.get((typ, outcome), 0) + n
            _await_counts(worker, counts)

        # 1. In time: c watches both items of its slate (its safe pool: c1, c2); f likewise.
        c_imp = impression_event(c, "c-imp", "c-slate", T0, [("c1", 0.9, 3.0, ()), ("c2", 0.8, 2.0, ())])
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", c_imp), ("watch", watch_event(c, "c-w1", "c1", T0 + 1, 9000, 10000)),
            ("watch", watch_event(c, "c-w2", "c2", T0 + 1, 8000, 10000)),
            ("impressions", impression_event(f, "f-imp", "f-slate", T0 + 2, [("f1", 0.6, 1.0, ())])),
            ("watch", watch_event(f, "f-w", "f1", T0 + 3)),
        ])
        expect(impression__ok=2, watch__ok=3)
        _await_pools(kafka_bootstrap, names, {c: [("c1", 3.0), ("c2", 2.0)], f: [("f1", 1.0)]})

        # 2. A tick at T0 + 1000: watermark T0 + 970, both slates mature.
        wm = T0 + 1000 - LATENESS
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(tick1, "tick1", "tick1", T0 + 1000, [("t", 0.5, 0.0, ())],
                                             policy_applied=True))])
        expect(impression__ok=1)
        _await_n(worker, {"replace:global": 2, "remove:global": 2})
        _await_watermark(worker, wm)

        # 3. Older than the watermark: an impression, a watch, and a flag for c1 timed inside
        # c-slate's label window (T0 + 50 <= T0 + 100) but read after c-slate matured.
        # And f is forgotten (its slate leaves the window).
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(d, "d-imp", "d-slate", T0 + 500, [("d1", 0.5, 1.0, ()),
                                                                              ("d2", 0.4, 0.5, ())])),
            ("watch", watch_event(d, "d-w", "d1", T0 + 501)),
            ("flags", flag_event(c, "c-flag", "c1", T0 + 50)),
            ("forget", forget_event(f, "f-forget", wm - 10)),
        ])
        expect(impression__late=1, watch__late=1, flag__late=1, forget__ok=1)
        # A flag always updates the safe pool, late or not.
        _await_pools(kafka_bootstrap, names, {c: [("c2", 2.0)], f: None})
        assert _user(worker, c)["flagged"] == 1
        # The late impression is remembered (shown, in the history) but awaits no maturity.
        user_d = _user(worker, d)
        assert (user_d["shown"], user_d["history_items"], user_d["pending_slates"]) == (2, 2, 0)
        assert _user(worker, f) == 404
        _await_n(worker, {"replace:global": 1, "remove:global": 1})  # the forgotten user's slate left
        # c-slate's labels were final at maturity: the late flag does not relabel it.
        slates = _window_slates(worker)
        assert set(slates) == {"c-slate"}
        assert [i["flagged"] for i in slates["c-slate"]["items"]] == [False, False]
        _await_watermark(worker, wm)  # late events do not move it

        # 4. In time again: e's slate, sent twice (the second is a duplicate and must not be
        # pending twice), four of g's (pending_max = 3), and a forgotten user's older flag;
        # then a tick past every slate's label window, d-slate's included had it been pending.
        e_imp = impression_event(e, "e-imp", "e-slate", T0 + 1500, [("e1", 0.7, 1.0, ())])
        g_imps = [("impressions", impression_event(g, f"g-imp{j}", f"g-slate{j}", T0 + 1500 + j,
                                                   [("g1", 0.5, 1.0, ())])) for j in range(4)]
        send_events(kafka_bootstrap, topic_prefix, [
            ("flags", flag_event(f, "f-flag", "f1", wm - 20)),  # before the forget: erased
            ("impressions", e_imp), ("impressions", e_imp), *g_imps,
        ])
        expect(flag__erased=1, impression__duplicate=1, impression__ok=4, impression__pending_overflow=1)
        assert _user(worker, e)["pending_slates"] == 1
        assert _user(worker, f) == 404  # not re-created by its older flag
        assert _user(worker, g)["pending_slates"] == 3
        tick2_ts = T0 + 1503 + LABEL_WINDOW + LATENESS
        send_events(kafka_bootstrap, topic_prefix, [
            ("impressions", impression_event(tick2, "tick2", "tick2", tick2_ts, [("t", 0.5, 0.0, ())],
                                             policy_applied=True))])
        expect(impression__ok=1)
        # c-slate + e-slate + the three pending g slates; not d-slate (late), not g-slate3
        # (overflow). All of them were due at the same watermark step, so a window of 5
        # can only be these.
        _await_n(worker, {"replace:global": 5, "remove:global": 5})
        _await_watermark(worker, tick2_ts - LATENESS)
        assert set(_window_slates(worker)) == {"c-slate", "e-slate", "g-slate0", "g-slate1", "g-slate2"}
        user_g = _user(worker, g)
        assert (user_g["pending_slates"], user_g["recent_slates"], user_g["shown"]) == (0, 3, 4)
        # Matured: c, f (stage 2), e and g's three (stage 4) holdout; tick1 policy-applied.
        wait_for(lambda: worker.metric("riskgate_slates_matured_total", kind="holdout") == 6, 30,
                 what="the matured-slates counter")
        assert worker.metric("riskgate_slates_matured_total", kind="applied") == 1
        _await_pools(kafka_bootstrap, names, {c: [("c2", 2.0)], f: None})
        assert outcome_counts(worker) == counts
        assert worker.healthy()
    finally:
        worker.stop()
