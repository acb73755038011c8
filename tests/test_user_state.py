"""Per-user state transitions and the single-partition engine."""

import msgspec
import numpy as np
import pytest

from calibration.engine import Engine, EngineConfig, Monitors, Watermark, erasure_key
from calibration.events import Constraints, Flag, Forget, Impression, ShownItem, Watch
from calibration.grid import make_grid
from calibration.slates import Slate, SlateBatch
from calibration.threshold import thresholds
from calibration.user_state import Limits, UserState
from calibration.window import CurveAccumulator

LIM = Limits(beta=50.0)


def imp(eid, slate, ts, items, user="u1", applied=False, k=3, alpha=None):
    return Impression(eid, user, slate, ts, k, applied, tuple(items), alpha)


def item(i, score=0.5, rank=1.0, tags=(), rep=False):
    return ShownItem(i, score, rank, tuple(tags), rep)


def test_labels_use_flags_up_to_maturity_only():
    s = UserState("u1")
    s.on_impression(imp("e1", "s1", 100.0, [item("a"), item("b"), item("c")]), 0.0, LIM)
    s.on_flag(Flag("f1", "u1", "a", "report", 150.0), 0.0, LIM)
    s.on_flag(Flag("f2", "u1", "b", "not_interested", 250.0), 0.0, LIM)  # after ts + label_window
    assert s.mature(199.0, 100.0, 0.0, LIM) == ([], [])  # not yet: 100 + 100 > 199
    # nor at 200: a flag stamped 200 is still on time (not late) and must count (SPEC §1: matures
    # once event time *passes* ts + label_window)
    assert s.mature(200.0, 100.0, 0.0, LIM) == ([], [])
    s.on_flag(Flag("f3", "u1", "c", "report", 200.0), 200.0, LIM)
    (m,), _ = s.mature(200.5, 100.0, 0.0, LIM)
    assert m.flags == (True, False, True)
    assert s.pending == []


def test_flag_before_impression_counts_and_earliest_flag_time_wins():
    s = UserState("u1")
    s.on_flag(Flag("f2", "u1", "a", "report", 500.0), 0.0, LIM)
    s.on_flag(Flag("f1", "u1", "a", "report", 90.0), 0.0, LIM)  # out of order
    assert s.history["a"].flag_ts == 90.0 and s.flagged == 1
    s.on_impression(imp("e1", "s1", 100.0, [item("a", rank=7.0, tags=("x",))]), 0.0, LIM)
    assert s.history["a"].first_rank_score == 7.0 and s.history["a"].tags == ("x",)  # impression fills in
    (m,), _ = s.mature(1000.0, 100.0, 0.0, LIM)
    assert m.flags == (True,)


def test_duplicates_change_nothing():
    s = UserState("u1")
    ev = imp("e1", "s1", 100.0, [item("a")])
    assert s.on_impression(ev, 0.0, LIM) == "ok"
    before = s.to_dict()
    assert s.on_impression(ev, 0.0, LIM) == "duplicate"
    f = Flag("f1", "u1", "a", "report", 101.0)
    s.on_flag(f, 0.0, LIM)
    after_flag = s.to_dict()
    assert s.on_flag(f, 0.0, LIM) == "duplicate"
    assert s.to_dict() == after_flag and before != after_flag


def test_a_replayed_log_is_recognised_however_long_it_is():
    """Log positions catch a replay that runs past the remembered event ids (dedup_max)."""
    lim = Limits(beta=50.0, dedup_max=8)
    cfg = EngineConfig(label_window=50.0, allowed_lateness=0.0, limits=lim)
    log = []
    for n in range(40):
        log.append(("impressions", imp(f"e{n}", f"s{n}", 10.0 + n, [item(f"i{n}")])))
        log.append(("flags", Flag(f"f{n}", "u1", f"i{n}", "report", 10.5 + n)))
    eng = Engine(cfg)
    for pos, (topic, ev) in enumerate(log):
        assert eng.process(ev, topic, position=pos) == "ok"
    state = eng.users["u1"]
    before = (state.shown, state.flagged, len(state.pending) + len(state.recent), dict(state.positions))
    # a crash before the offsets were committed: the whole log again, in order
    outcomes = [eng.process(ev, topic, position=pos) for pos, (topic, ev) in enumerate(log)]
    assert set(outcomes) == {"replayed"}
    assert (state.shown, state.flagged, len(state.pending) + len(state.recent), dict(state.positions)) == before
    # without positions the ids of all but the last 8 events are forgotten: counted again
    eng.process(log[0][1], "impressions")
    assert state.shown == before[0] + 1
    # a producer's duplicate further on in the log is still caught by its event id
    assert eng.process(log[-1][1], "flags", position=len(log)) == "duplicate"
    assert state.positions["flags"] == len(log)


def test_late_impression_never_calibrates_but_late_flag_updates_pool():
    s = UserState("u1")
    assert s.on_impression(imp("e1", "s1", 100.0, [item("a")]), 500.0, LIM) == "late"
    assert s.pending == [] and "a" in s.history
    s.on_watch(Watch("w1", "u1", "a", 9000, 10000, 101.0), 500.0, LIM)
    assert [p.item_id for p in s.safe_pool(LIM)] == ["a"]
    assert s.on_flag(Flag("f1", "u1", "a", "report", 102.0), 500.0, LIM) == "late"
    assert s.safe_pool(LIM) == []


def test_safe_pool_size_at_serve_time_excludes_items_in_the_slate():
    s = UserState("u1")
    for i in "abc":
        s.on_impression(imp(f"e{i}", f"s{i}", 10.0, [item(i)]), 0.0, LIM)
        s.on_watch(Watch(f"w{i}", "u1", i, 80, 100, 11.0), 0.0, LIM)
    s.on_constraints(Constraints("c1", "u1", 12.0, block_tags=("guns",)), 0.0, LIM)
    s.on_impression(imp("e9", "s9", 20.0, [item("a"), item("z", tags=("guns",))], applied=True), 0.0, LIM)
    assert s.violations(imp("e10", "s10", 21.0, [item("q", tags=("guns",))])) == 1
    matured, _ = s.mature(1e9, 1.0, 0.0, LIM)
    assert [m.pool for m in matured if m.slate_id == "s9"] == [2]  # b and c; a is in the slate
    assert [m.repeat_pct for m in matured if m.slate_id == "s9"] == [(80.0, None)]  # a was viewed before


def test_a_holdout_item_of_a_tag_blocked_at_ts_calibrates_as_dropped_and_keeps_its_flag():
    """SPEC §8 drops an item of a blocked tag whatever λ̂: a holdout slate calibrates that filter.

    Calibrating on scores alone, dropping an unflagged blocked item raised the
    flagged share of what the policy serves above what the window measured
    (one flagged item in 10 is 0.1; served without five unflagged blocked
    ones, 0.2).
    """
    from calibration.engine import calibration_slate
    from calibration.risk import fold

    s = UserState("u1")
    s.on_constraints(Constraints("c1", "u1", 10.0, block_tags=("guns",)), 0.0, LIM)
    s.on_constraints(Constraints("c2", "u1", 30.0, block_tags=("dice",)), 0.0, LIM)  # after s1, before s2
    shown = [item("bad", 0.9), item("g1", 0.8, tags=("guns",)), item("g2", 0.7, tags=("guns", "x")),
             item("d", 0.6, tags=("dice",)), item("ok", 0.5)]
    s.on_impression(imp("e1", "s1", 20.0, shown, k=5), 0.0, LIM)
    s.on_impression(imp("e2", "s2", 40.0, [item("p1", 0.9, tags=("guns",))], applied=True, k=5), 0.0, LIM)
    s.on_flag(Flag("f1", "u1", "bad", "report", 21.0), 0.0, LIM)
    s.on_flag(Flag("f2", "u1", "g1", "report", 22.0), 0.0, LIM)
    holdout, applied = s.mature(1e9, 10.0, 0.0, LIM)[0]
    ninf = float("-inf")
    assert holdout.scores == (0.9, ninf, ninf, 0.6, 0.5)  # dice was blocked after the slate was served
    assert holdout.flags == (True, True, False, False, False)  # as read: the monitors count served flags
    assert applied.scores == (0.9,)  # a policy-applied slate does not calibrate: left as served
    grid = make_grid(0, 1, 11)
    got = fold(SlateBatch.from_slates([calibration_slate(holdout)]), grid, "remove")
    want = fold(SlateBatch.from_slates([Slate((0.9, 0.6, 0.5), (True, False, False), 5)]), grid, "remove")
    assert got.tolist() == want.tolist()  # the same curve as the slate the policy serves
    import orjson  # the JSON form keeps the dropped items (JSON has no -inf: orjson wrote null)

    assert UserState.from_dict(orjson.loads(orjson.dumps(s.to_dict()))).recent == s.recent == [holdout]


def test_an_item_is_judged_by_the_tags_it_was_served_with_not_those_of_its_first_showing():
    """A history entry keeps the tags of the item's first showing; moderation may tag it later. The
    ranker and the violation count use the slate's own tags, and so must calibration."""
    s = UserState("u1")
    s.on_impression(imp("e0", "s0", 5.0, [item("x", 0.5), item("y", 0.6, tags=("guns",))], applied=True), 0.0, LIM)
    s.on_constraints(Constraints("c1", "u1", 10.0, block_tags=("guns",)), 0.0, LIM)
    later = imp("e1", "s1", 20.0, [item("x", 0.5, tags=("guns",)), item("y", 0.6), item("z", 0.9)])  # re-tagged
    assert s.violations(later) == 1
    s.on_impression(later, 0.0, LIM)
    (_, m), _ = s.mature(1e9, 10.0, 0.0, LIM)
    assert m.slate_id == "s1" and m.scores == (float("-inf"), 0.6, 0.9)


def test_pending_slates_keep_their_items_tags_through_storage_and_older_ones_still_load():
    from streams.state import _pending, encode_pending, _dec

    s = UserState("u1")
    s.on_impression(imp("e1", "s1", 20.0, [item("x", tags=("guns", "b")), item("y")]), 0.0, LIM)
    (p,) = s.pending
    assert p.tags == (("guns", "b"), ())
    assert _pending(_dec.decode(encode_pending(p)), p.seq) == p
    older = msgspec.structs.replace(p, tags=None)  # a slate stored before riskgate kept tags: ten fields
    raw = encode_pending(older)
    assert len(_dec.decode(raw)) == 10 and _pending(_dec.decode(raw), p.seq).tags is None
    assert UserState.from_dict(s.to_dict()).pending == [p]


def test_pending_slates_keep_the_violations_counted_at_their_impression_through_storage():
    from streams.state import _dec, _pending, encode_pending

    s = UserState("u1")
    s.on_impression(imp("e1", "s1", 20.0, [item("x", tags=("guns",))], applied=True), 0.0, LIM, violations=1)
    (p,) = s.pending
    assert p.violations == 1
    assert _pending(_dec.decode(encode_pending(p)), p.seq) == p
    assert UserState.from_dict(s.to_dict()).pending == [p]
    # stored before the count was kept: eleven fields, and maturity adds nothing (it cannot know)
    older = msgspec.structs.replace(p, violations=None)
    assert len(_dec.decode(encode_pending(older))) == 11
    assert _pending(_dec.decode(encode_pending(older)), p.seq).violations is None


def test_pool_size_is_as_of_the_slates_ts_whatever_order_the_topics_were_read_in():
    def run(order):
        s = UserState("u1")
        events = {
            "show": lambda: [s.on_impression(imp(f"e{i}", f"s{i}", 10.0, [item(i)]), 0.0, LIM) for i in "abc"],
            "early": lambda: s.on_watch(Watch("wa", "u1", "a", 80, 100, 11.0), 0.0, LIM),  # before the slate
            "slate": lambda: s.on_impression(imp("e9", "s9", 20.0, [item("q")]), 0.0, LIM),
            "later": lambda: s.on_watch(Watch("wb", "u1", "b", 90, 100, 25.0), 0.0, LIM),  # after it
            "flag": lambda: s.on_flag(Flag("fa", "u1", "a", "report", 30.0), 0.0, LIM),  # after it too
        }
        for name in order:
            events[name]()
        return [m.pool for m in s.mature(1e9, 1.0, 0.0, LIM)[0] if m.slate_id == "s9"]

    # only a counts: viewed before ts 20, flagged after; b was viewed after the slate was served
    assert run(["show", "early", "slate", "later", "flag"]) == [1]
    assert run(["show", "slate", "flag", "later", "early"]) == [1]  # the early watch read last


def test_the_first_view_is_the_earliest_watch_whatever_the_arrival_order():
    s = UserState("u1")
    s.on_watch(Watch("w2", "u1", "a", 10, 100, 20.0), 0.0, LIM)
    s.on_watch(Watch("w1", "u1", "a", 90, 100, 10.0), 0.0, LIM)  # earlier, read later
    assert s.history["a"].first_watch_pct == 90.0 and s.history["a"].first_watch_ts == 10.0


def test_constraints_latest_ts_wins_whatever_the_order():
    s = UserState("u1")
    s.on_constraints(Constraints("c2", "u1", 20.0, unblock_tags=("guns",)), 0.0, LIM)
    s.on_constraints(Constraints("c1", "u1", 10.0, block_tags=("guns", "gambling")), 0.0, LIM)
    assert s.blocked_tags == {"gambling"}


def test_history_is_bounded_and_keeps_flags_longest():
    lim = Limits(history_max=5)
    s = UserState("u1")
    s.on_flag(Flag("f0", "u1", "bad", "report", 1.0), 0.0, lim)
    for j in range(20):
        s.on_impression(imp(f"e{j}", f"s{j}", 10.0 + j, [item(f"i{j}")]), 0.0, lim)
        held = 5 + sum(len(p.item_ids) for p in s.pending)  # the cap, plus what pending slates need
        assert len(s.history) <= held + max(1, held // 10)  # plus the trimming step
        s.mature(1e9, 1.0, 0.0, lim)  # nothing pending keeps items alive
    assert "bad" in s.history and len(s.history) <= 5 + 2


def test_the_cap_keeps_the_most_recent_entries_that_no_pending_slate_needs_and_trims_seldom(monkeypatch):
    """A user with thousands of pending items (an impression every second over a label window) re-sorted
    its whole history every few maturities (3.4 ms an event at 1 impression/s, against ~0.1 ms), and the
    cap was taken from all entries, pending ones included."""
    import calibration.user_state as us

    trims = []
    real = us.trim_history
    monkeypatch.setattr(us, "trim_history", lambda h, n: trims.append(len(h)) or real(h, n))
    lim = Limits(history_max=50)
    s = UserState("u1")
    shown = {}
    for j in range(3000):  # a slate of 5 items a second, each maturing 10 minutes later
        items = [f"i{j}-{k}" for k in range(5)]
        shown.update(dict.fromkeys(items, 10.0 + j))
        s.on_impression(imp(f"e{j}", f"s{j}", 10.0 + j, [item(i) for i in items]), 0.0, lim)
        s.mature(10.0 + j, 600.0, 0.0, lim)
    pending = {i for p in s.pending for i in p.item_ids}
    assert len(s.pending) == 601 and pending <= s.history.keys()  # (strict maturity) items of pending slates all kept
    # a trim per ~10 % of what is held, not every few maturities: the entries sorted stay a few times
    # the items shown (38 trims of 13,680 entries here, against 199 of 610,930 before)
    assert len(trims) <= 3000 // 20 and sum(trims) <= 3 * 3000 * 5, (len(trims), sum(trims))
    rest = {k: shown[k] for k in s.history if k not in pending}
    held = 50 + len(pending)
    assert 50 <= len(rest) <= 50 + max(1, held // 10)
    evicted = [t for k, t in shown.items() if k not in s.history]
    assert evicted and min(rest.values()) >= max(evicted)  # the most recent ones stay


def test_state_round_trips_through_dict():
    s = UserState("u1")
    s.on_impression(imp("e1", "s1", 100.0, [item("a", tags=("t",)), item("b")], alpha=0.1), 0.0, LIM)
    s.on_watch(Watch("w1", "u1", "a", 0, 0, 101.0), 0.0, LIM)
    s.on_flag(Flag("f1", "u1", "b", "report", 102.0), 0.0, LIM)
    s.on_constraints(Constraints("c1", "u1", 103.0, block_tags=("t",)), 0.0, LIM)
    s.mature(1e9, 1.0, 0.0, LIM)
    s.on_impression(imp("e2", "s2", 200.0, [item("c")]), 0.0, LIM)
    import orjson

    assert UserState.from_dict(orjson.loads(orjson.dumps(s.to_dict()))) == s


def test_engine_folds_exactly_the_matured_holdout_slates():
    rng = np.random.default_rng(5)
    cfg = EngineConfig(alphas=(0.1, 0.2), label_window=50.0, allowed_lateness=5.0, grid=make_grid(0, 1, 101))
    eng = Engine(cfg)
    eng.keep_matured = True
    ts = 1000.0
    events = []
    for j in range(400):
        ts += 1.0
        items = [item(f"i{j}-{x}", float(rng.random())) for x in range(5)]
        events.append(imp(f"e{j}", f"s{j}", ts, items, user=f"u{j % 7}", applied=j % 4 == 0, k=5))
        for it in items:
            if rng.random() < 0.4 * (1 - it.score):
                events.append(Flag(f"f{it.item_id}", f"u{j % 7}", it.item_id, "report", ts + rng.uniform(0, 40)))
    events.sort(key=lambda e: e.ts)
    for ev in events:
        assert eng.process(ev) == "ok"
    matured = eng.matured
    assert 200 < len(matured) < 300 and all(not m.policy_applied for m in matured)
    for strategy in ("remove", "replace"):
        batch = SlateBatch.from_slates([Slate(m.scores, m.flags, m.k, m.pool) for m in matured])
        acc = CurveAccumulator(len(cfg.grid)).add(batch, cfg.grid, strategy)
        want = thresholds(acc.sums(), acc.n, cfg.grid, cfg.alphas)
        got = eng.calibrator.result(strategy, "global")
        assert got.n == len(matured) and list(got.thresholds) == want
    bands = eng.calibrator.result("remove", "band:low").n + eng.calibrator.result("remove", "band:high").n
    assert bands == len(matured)
    assert eng.monitors.realised_slates  # policy-applied slates reached the monitors


def test_engine_forget_removes_user():
    eng = Engine(EngineConfig())
    eng.process(imp("e1", "s1", 10.0, [item("a")]))
    eng.process(Forget("x", "u1", 11.0))
    assert "u1" not in eng.users
    eng.process(imp("e2", "s2", 1e6, [item("b")], user="u2"))  # stale maturity entry is skipped
    assert set(eng.users) == {"u2"}


def test_a_forget_at_or_before_one_applied_leaves_a_user_who_came_back():
    """A forget read again (a replay after a crash) or an older one arriving late erases nothing new."""
    eng = Engine(EngineConfig())
    eng.process(imp("e1", "s1", 10.0, [item("a")]))
    eng.process(Forget("x", "u1", 11.0))
    eng.process(imp("e2", "s2", 12.0, [item("b")]))  # the user comes back after the forget
    assert eng.process(Forget("x", "u1", 11.0)) == "duplicate"
    assert eng.process(Forget("y", "u1", 5.0)) == "duplicate"
    assert set(eng.users["u1"].history) == {"b"}
    assert eng.process(imp("e0", "s0", 10.5, [item("c")])) == "erased"  # from before the forget: still dropped
    assert eng.process(Forget("z", "u1", 13.0)) == "ok"  # a later forget takes everything
    assert "u1" not in eng.users
    assert eng.process(imp("e3", "s3", 12.5, [item("d")])) == "erased"


def _random_stream(seed, n=600, users=9):
    rng = np.random.default_rng(seed)
    events, ts = [], 0.0
    for j in range(n):
        ts += float(rng.exponential(20.0))
        u = f"u{rng.integers(users)}"
        items = [item(f"i{rng.integers(200)}", float(rng.random()), float(rng.random())) for _ in range(4)]
        events.append(imp(f"e{j}", f"s{j}", ts, items, user=u, applied=bool(rng.random() < 0.3), k=4))
        for it in items:
            r = rng.random()
            if r < 0.3 * (1 - it.score):
                events.append(Flag(f"f{j}{it.item_id}", u, it.item_id, "report", ts + float(rng.uniform(0, 50))))
            elif r < 0.6:
                events.append(Watch(f"w{j}{it.item_id}", u, it.item_id, float(rng.integers(0, 100)), 100.0,
                                    ts + float(rng.uniform(0, 30))))
        if rng.random() < 0.02:
            events.append(Forget(f"x{j}", u, ts + 1))
    events.sort(key=lambda e: e.ts)
    return events


@pytest.mark.parametrize("seed", range(5))
def test_windows_always_equal_the_fold_of_the_users_recent_slates(seed):
    # Small windows, buckets and per-user caps so eviction, ageing and forgetting all happen.
    cfg = EngineConfig(label_window=60.0, allowed_lateness=10.0, window=2400.0, buckets=6, grid=make_grid(0, 1, 51),
                       limits=Limits(user_window_max=7))
    eng = Engine(cfg)
    for k, ev in enumerate(_random_stream(seed)):
        eng.process(ev)
        if k % 150 == 0 or k == 0:
            again = Engine(cfg, users=eng.users, clock=Watermark(cfg.allowed_lateness, eng.clock.value, eng.clock.max_ts))
            again.rebuild()
            assert again.calibrator.snapshot() == eng.calibrator.snapshot()
    assert eng.calibrator.result("replace", "global").n > 0
    assert eng.counts[("forget", "ok")] > 0


def test_a_slate_an_ulp_below_a_bucket_edge_is_live_for_its_user_as_for_the_window():
    # 3600 s in 7 buckets: 6 * width is an ulp past where bucket_of starts bucket 6. A slate
    # there was in the live window but not among its user's live slates, so a restart's rebuild
    # dropped it and a forget left it in the window.
    import math

    cfg = EngineConfig(alphas=(0.1,), grid=make_grid(0, 1, 11), label_window=100.0, allowed_lateness=0.0,
                       window=3600.0, buckets=7, min_slates=1)
    ts = math.nextafter(6 * (3600.0 / 7), 0)
    eng = Engine(cfg)
    eng.process(imp("e1", "s1", ts, [item("i1")]))
    eng.process(Watch("e2", "u2", "i9", 1.0, 10.0, 6200.0))  # the slate matures in the oldest live bucket
    assert eng.calibrator.result("remove", "global").n == 1
    again = Engine(cfg, users=dict(eng.users), clock=eng.clock)
    again.rebuild()
    assert again.calibrator.snapshot() == eng.calibrator.snapshot()
    eng.process(Forget("f1", "u1", 6201.0))
    assert eng.calibrator.result("remove", "global").n == 0


def test_forget_takes_the_users_slates_out_of_the_windows():
    cfg = EngineConfig(label_window=10.0, allowed_lateness=0.0, grid=make_grid(0, 1, 11))
    eng = Engine(cfg)
    for j, u in enumerate(["a", "b", "a"]):
        eng.process(imp(f"e{j}", f"s{j}", 100.0 + j, [item("x", 0.3)], user=u))
    eng.process(Flag("f", "a", "x", "report", 103.0))
    eng.process(imp("late-tick", "s9", 200.0, [item("y")], user="c"))
    assert eng.calibrator.result("remove", "global").n == 3
    eng.process(Forget("x1", "a", 201.0))
    assert eng.calibrator.result("remove", "global").n == 1
    assert "a" not in eng.users and erasure_key("a") in eng.erased


def test_a_record_applied_before_a_forget_and_read_again_after_a_crash_stays_erased():
    # Read in this order: an impression stamped after the forget (the forget topic was behind),
    # then the forget, which erases what is held (README, "Forget"). A crash before the input
    # offsets were committed reads the impression again: it must be a replay, not a new user.
    import copy

    cfg = EngineConfig(label_window=20.0, allowed_lateness=5.0, min_slates=1)
    served = imp("e1", "s1", 200.0, [item("i1")])
    eng = Engine(cfg)
    assert eng.process(served, "impressions", position=7) == "ok"
    assert eng.process(Forget("f1", "u1", 100.0), "forget", position=3) == "ok"
    assert "u1" not in eng.users
    # the state a restart restores: no users, the markers (deep-copied, as a store's would be)
    again = Engine(cfg, users={}, clock=eng.clock, erased=copy.deepcopy(eng.erased))
    assert again.process(served, "impressions", position=7) == "replayed"
    assert again.process(Forget("f1", "u1", 100.0), "forget", position=3) == "duplicate"
    assert "u1" not in again.users
    # and the user's next record (past those positions) is a user who came back, as without the crash
    assert again.process(imp("e2", "s2", 210.0, [item("i2")]), "impressions", position=8) == "ok"
    assert list(again.users["u1"].history) == ["i2"]


def test_pending_items_beyond_the_cap_do_not_make_every_event_trim():
    import calibration.user_state as us

    lim = Limits(history_max=5)
    s = UserState("u1")
    for j in range(3):  # 3 pending slates of 4 items: 12 items that may not be evicted, cap 5
        s.on_impression(imp(f"e{j}", f"s{j}", 10.0 + j, [item(f"i{j}{x}") for x in range(4)], k=4), 0.0, lim)
    calls = []
    real = us.trim_history
    us.trim_history = lambda h, n: calls.append(n) or real(h, n)
    try:
        for j in range(20):
            s.on_watch(Watch(f"w{j}", "u1", f"i0{j % 4}", 50, 100, 20.0 + j), 0.0, lim)
    finally:
        us.trim_history = real
    assert calls == []  # nothing to evict: no sorting on every event
    assert len(s.history) == 12


def test_an_item_no_impression_has_shown_is_not_safe_until_one_does():
    # Watched from another surface (or read before its slate): rank score and tags are unknown, and
    # offering it would let a ranker serve a tag the user blocked as a "safe" replacement.
    s = UserState("u1")
    s.on_constraints(Constraints("c1", "u1", 1.0, block_tags=("guns",)), 0.0, LIM)
    s.on_watch(Watch("w1", "u1", "g", 90, 100, 2.0), 0.0, LIM)
    s.on_watch(Watch("w2", "u1", "h", 90, 100, 2.0), 0.0, LIM)
    assert s.safe_pool(LIM) == []
    s.on_impression(imp("e1", "s1", 3.0, [item("g", tags=("guns",)), item("h", tags=("news",))]), 0.0, LIM)
    assert [p.item_id for p in s.safe_pool(LIM)] == ["h"]  # g's tag is known now: blocked


@pytest.mark.parametrize("alphas, served_alpha, key", [
    ((0.1,), None, 0.1),  # one α configured: the only one a ranker following riskgate applies
    ((0.05, 0.1), None, "unknown"),  # several: nothing to compare with (RiskgateRealisedRiskUnchecked)
    ((0.05, 0.1), 0.1 + 5e-13, 0.1),  # a requested α echoed through JSON: the published one
    ((0.05, 0.1), 0.3, 0.3),  # an α riskgate does not publish stays itself
])
def test_realised_risk_is_counted_under_the_alpha_its_target_is_published_for(alphas, served_alpha, key):
    # SPEC §2's impressions carry no α: with the key "unknown" the realised-risk alert, which
    # compares per α with the targets, could never fire for a ranker written to the spec.
    eng = Engine(EngineConfig(alphas=alphas, label_window=10.0, allowed_lateness=0.0))
    eng.process(imp("e1", "s1", 100.0, [item("x"), item("y")], applied=True, alpha=served_alpha))
    eng.process(Flag("f1", "u1", "x", "report", 101.0))
    eng.push_watermark(200.0)
    assert eng.monitors.realised_risk() == {key: 0.5}


def test_alphas_riskgate_does_not_publish_make_a_bounded_number_of_keys():
    # A ranker writing ever new α values (a float it computes per request) made a series set each,
    # never removed: the first few stay themselves, the rest count as "unknown".
    eng = Engine(EngineConfig(alphas=(0.05, 0.1), label_window=10.0, allowed_lateness=0.0))
    for j in range(40):
        eng.process(imp(f"e{j}", f"s{j}", 100.0 + j, [item(f"x{j}")], applied=True, alpha=0.2 + j / 1000))
    eng.process(imp("e-0.1", "s-0.1", 150.0, [item("y")], applied=True, alpha=0.1))
    eng.push_watermark(1000.0)
    keys = set(eng.monitors.realised_slates)
    assert 0.1 in keys and "unknown" in keys and 0.2 in keys
    assert len(keys) <= len(eng.config.alphas) + Monitors.UNMATCHED_MAX + 1
    assert sum(eng.monitors.realised_slates.values()) == 41  # every slate counted somewhere


def test_the_engine_counts_slates_held_for_maturity_not_its_queue_entries():
    # riskgate_pending_slates showed the maturity queue's length: 3,600 against 2,000 slates held by a
    # heavy user (stale entries), and now recent slates' expiry entries would be counted too.
    eng = Engine(EngineConfig(label_window=100.0, allowed_lateness=0.0, window=3600.0, buckets=4))
    for j in range(3):
        eng.process(imp(f"e{j}", f"s{j}", 10.0 * j, [item(f"i{j}")]))
    eng.process(imp("e0", "s0", 0.0, [item("i0")]))  # a duplicate: not held again
    eng.process(imp("v0", "sv0", 25.0, [item("z")], user="v"))
    assert eng.pending == 4
    eng.process(imp("v1", "sv1", 1.0, [item("y")], user="v"))  # late (the watermark is 25): not held
    assert eng.pending == 4
    eng.process(imp("v2", "sv2", 112.0, [item("x")], user="v"))  # held; ts 0 and 10 mature
    assert eng.pending == 3
    eng.process(Forget("f", "u1", 113.0))  # u1's slate of ts 20 goes with it
    assert eng.pending == 2
    eng.rebuild()
    assert eng.pending == 2 == sum(len(s.pending) for s in eng.users.values())
