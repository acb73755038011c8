"""The safe pool followed change by change (SafePool, UserState) equals the rule computed from scratch.

The stream publishes a user's pool only when UserState says it may have
changed, and reads it from the incremental SafePool; both must agree with
:func:`calibration.safe_pool.safe_pool` over the history after any sequence of
events, or a ranker would serve a stale (possibly flagged) item. A pool that
only gained items may be published later, so a removal must always be said.
"""

from __future__ import annotations

import heapq
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from calibration.events import Constraints, Flag, Impression, ShownItem, Watch
from calibration.safe_pool import HistoryEntry, SafeSpans, pool_size, pool_size_at, safe_pool
from calibration import user_state
from calibration.user_state import Limits, UserState

ITEMS = [f"i{n}" for n in range(12)]
TAGS = ["a", "b", "c"]

item = st.sampled_from(ITEMS)
ts = st.integers(1, 60).map(float)
impression = st.builds(
    lambda items, t, scores, tags: ("imp", items, t, scores, tags),
    st.lists(item, min_size=1, max_size=4, unique=True), ts,
    st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=4, max_size=4),
    st.lists(st.lists(st.sampled_from(TAGS), max_size=2, unique=True), min_size=4, max_size=4))
watch = st.tuples(st.just("watch"), item, ts, st.integers(0, 100), st.sampled_from([0, 100]))
flag = st.tuples(st.just("flag"), item, ts)
constraints = st.tuples(st.just("constraints"), st.lists(st.sampled_from(TAGS), max_size=2),
                        st.lists(st.sampled_from(TAGS), max_size=2), ts)
event = st.one_of(impression, watch, watch, flag, constraints)


def _blocked(state: UserState) -> frozenset[str]:
    """The blocked tags from the rules themselves (UserState keeps them between constraint events)."""
    return frozenset(t for t, (b, _) in state.tag_rules.items() if b)


def _apply(state: UserState, op, n: int, limits: Limits) -> None:
    kind = op[0]
    if kind == "imp":
        _, items, t, scores, tags = op
        shown = tuple(ShownItem(i, s, None if j % 2 else s * 2, tuple(tg)) for j, (i, s, tg) in
                      enumerate(zip(items, scores, tags)))
        state.on_impression(Impression(f"e{n}", "u", f"s{n}", t, len(items), False, shown), float("-inf"), limits)
    elif kind == "watch":
        _, i, t, w, d = op
        state.on_watch(Watch(f"e{n}", "u", i, float(w), float(d), t), float("-inf"), limits)
    elif kind == "flag":
        _, i, t = op
        state.on_flag(Flag(f"e{n}", "u", i, "report", t), float("-inf"), limits)
    else:
        _, block, unblock, t = op
        state.on_constraints(Constraints(f"e{n}", "u", t, tuple(block), tuple(unblock)), float("-inf"), limits)


_NO = [False] * 60
_EMPTY_TAGS = [[], [], [], []]


@settings(max_examples=300, deadline=None)
@given(st.lists(event, max_size=60), st.sampled_from([None, 0.0, 50.0]), st.sampled_from([None, 0, 1, 3, 100]),
       st.sampled_from([4, 6, 500]), st.lists(st.booleans(), min_size=60, max_size=60),
       st.lists(st.booleans(), min_size=60, max_size=60))
# Found by CI: a watch-made entry handed out, then its first impression (a higher-ranked
# item with it) changes its rank score as it drops past the cap.
@example([("watch", "i0", 1.0, 0, 0), ("watch", "i0", 1.0, 0, 0), ("imp", ["i1", "i0"], 1.0, [0.5] * 4, _EMPTY_TAGS)],
         None, 1, 4, [False, True, True] + _NO, _NO)
# A shown item outranked past the cap by an addition held back, then flagged.
@example([("imp", ["i0"], 1.0, [0.5] * 4, _EMPTY_TAGS), ("imp", ["i1"], 2.0, [2.0] * 4, _EMPTY_TAGS),
          ("flag", "i0", 3.0)], None, 1, 500, [True] * 60, _NO)
def test_incremental_pool_equals_the_rule_after_every_event(ops, beta, cap, history_max, asks, rounds):
    """As the stream uses it: asks at flushes, publishes at once on a removal, else with a round of additions.

    Between publications every item handed out must stay safe exactly as handed
    out, or the user must say ``removal``: hypothesis found a pool whose shown item
    had dropped past the cap (outranked by an addition held back) and was then
    flagged, with no removal said, when removals were judged against the current
    pool instead of the one published.
    """
    limits = Limits(beta=beta, safe_pool_max=cap, history_max=history_max)
    state = UserState("u")
    published = None  # the pool the stream last sent
    last = None  # the pool at the last ask
    pending = False  # changed since sent: goes with the next round
    for n, op in enumerate(ops):
        _apply(state, op, n, limits)
        assert state._pending_items in (None, sum(len(p.item_ids) for p in state.pending))  # the kept count
        if asks[n]:  # the stream asks after some events only: the pool must follow either way
            changed = state.take_pool_changed()
            removal = state.take_pool_removal()
            pool = state.safe_pool(limits)
            assert state.blocked_tags == _blocked(state)  # (kept between constraint events)
            assert pool == safe_pool(state.history.values(), beta, _blocked(state), cap)
            if not changed:
                assert pool == last, "the pool changed but the user did not say so"
            if published is not None and not removal:
                # The stream may hold back a pool that only gained items (or had one outranked past
                # the cap): every item published must still be safe, with its rank score and tags.
                still_safe = set(safe_pool(state.history.values(), beta, _blocked(state), None))
                assert set(published) <= still_safe, "an item became unsafe but the user did not say so"
            pending = pending or changed
            if pending and (removal or rounds[n] or published is None):
                published, pending = pool, False
                state.pool_published(pool)
            last = pool
    assert state.safe_pool(limits) == safe_pool(state.history.values(), beta, _blocked(state), cap)


def _pool_size_at_reference(history, t, beta, blocked, max_size, exclude):
    """The definition: pool_size over the entries as they stood at t."""
    then = []
    for e in history:
        if e.flag_ts is not None and e.flag_ts <= t:
            continue
        watched = e.watched and (e.first_watch_ts is None or e.first_watch_ts <= t)
        if not (e.shown and (e.first_shown is None or e.first_shown <= t)):
            continue  # (never shown, or not yet: its tags are unknown then)
        if beta is not None and not watched:
            continue
        then.append(HistoryEntry(e.item_id, e.first_rank_score, e.tags, e.first_watch_pct, watched, True, False))
    return pool_size(then, beta, blocked, max_size, exclude)


@settings(max_examples=300, deadline=None)
@given(st.lists(event, max_size=40), st.sampled_from([None, 0.0, 50.0]), st.sampled_from([None, 0, 2, 100]),
       ts, st.sets(item, max_size=4))
# W% exactly β: not safe (Eq. 7 asks W% > β).
@example([("imp", ["i0"], 1.0, [1.0] * 4, _EMPTY_TAGS), ("watch", "i0", 2.0, 50, 100)], 50.0, None, 5.0, set())
def test_pool_size_at_equals_its_definition(ops, beta, cap, t, exclude):
    limits = Limits(beta=beta, safe_pool_max=cap)
    state = UserState("u")
    for n, op in enumerate(ops):
        _apply(state, op, n, limits)
    got = pool_size_at(state.history.values(), t, beta, state.blocked_tags, cap, exclude)
    assert got == _pool_size_at_reference(state.history.values(), t, beta, state.blocked_tags, cap, exclude)


@settings(max_examples=400, deadline=None)
@given(st.lists(event, max_size=60), st.sampled_from([None, 0.0, 50.0]), st.sampled_from([None, 0, 1, 3, 100]),
       st.sampled_from([4, 6, 500]), st.lists(st.sampled_from([None, 10.0, 30.0, 50.0]), min_size=60, max_size=60))
def test_p_at_maturity_from_the_spans_equals_the_walk(ops, beta, cap, history_max, maturities):
    """p counted from SafeSpans (kept event by event from the first maturity on) is pool_size_at's.

    Impressions stay pending (the watermark passed to them is -inf); now and then
    the watermark jumps and matures some (``maturities``), with p compared to a
    walk of the history as it stands then. Spans are kept for every history here.
    """
    limits = Limits(beta=beta, safe_pool_max=cap, history_max=history_max)
    state = UserState("u")
    with mock.patch.object(user_state, "SPANS_MIN", 0):
        for n, op in enumerate(ops):
            _apply(state, op, n, limits)
            if maturities[n] is None:
                continue
            due = [p for p in state.pending if p.ts + 1.0 < maturities[n]]
            # (under the tag rules in force at each slate's ts: the spans follow the current ones,
            # and a slate served under others is counted by the walk)
            expected = [pool_size_at(state.history.values(), p.ts, beta, state.blocked_at(p.ts), cap,
                                     set(p.item_ids)) for p in due]
            matured, _ = state.mature(maturities[n], 1.0, float("-inf"), limits)
            assert [m.pool for m in matured] == expected
            assert state._spans is not None


_FEW_TIMES = st.sampled_from([5.0, 20.0, 40.0])  # few: changes that keep an entry's span are common
_ANY_ENTRY = st.builds(
    HistoryEntry, item_id=item, first_rank_score=st.sampled_from([0.0, 1.0, 2.0, 3.0]),
    tags=st.sampled_from([(), ("a",), ("b", "c")]), first_watch_pct=st.none() | st.sampled_from([0.0, 40.0, 90.0]),
    watched=st.booleans(), shown=st.booleans(), flagged=st.booleans(), flag_ts=st.none() | _FEW_TIMES,
    first_shown=st.none() | _FEW_TIMES, first_watch_ts=st.none() | _FEW_TIMES)
_RANKED = lambda i, r: HistoryEntry(i, r, (), 90.0, True, True)  # noqa: E731 (safe at every time)


@settings(max_examples=500, deadline=None)
@given(st.lists(_ANY_ENTRY | item.map(lambda i: ("evict", i)), max_size=40), st.sampled_from([None, 0.0, 50.0]),
       st.sets(st.sampled_from(TAGS), max_size=1), st.sampled_from([None, 0, 1, 2, 3, 5]),
       st.lists(st.booleans(), min_size=40, max_size=40), st.sets(item, max_size=4))
# An entry's rank score changes, its span does not: the order by rank must follow it.
@example([_RANKED("i0", 1.0), _RANKED("i1", 2.0), _RANKED("i0", 3.0)], 50.0, set(), 1, [False, True, True] + [False] * 37,
         {"i0"})
def test_spans_follow_any_change_of_entries(ops, beta, blocked, cap, asks, exclude):
    """SafeSpans.size_at is pool_size_at after any entry changes: ranks, times, flags, evictions.

    Entries here change any field (a rank score with its span unchanged, say), which
    events rarely do; counts are asked now and then at every time, so the order by
    rank is built (once more than the cap count) and then followed change by change.
    """
    blocked = frozenset(blocked)
    history: dict[str, HistoryEntry] = {}
    spans = SafeSpans((), beta, blocked)
    for n, op in enumerate(ops):
        if isinstance(op, tuple):
            old = history.pop(op[1], None)
            if old is not None:
                spans.update(old, None)
        else:
            old = history.get(op.item_id)
            history[op.item_id] = op
            spans.update(old, op)
        if asks[n]:
            for t in range(0, 62, 3):
                assert (spans.size_at(float(t), history, cap, exclude)
                        == pool_size_at(history.values(), float(t), beta, blocked, cap, exclude))


def test_the_cap_keeps_the_highest_rank_scores_as_items_enter():
    limits = Limits(beta=50.0, safe_pool_max=3)
    state = UserState("u")
    for n, score in enumerate([1.0, 5.0, 2.0, 4.0, 3.0]):
        _apply(state, ("imp", [f"x{n}"], 1.0, [score] * 4, [[]] * 4), n, limits)
        state.safe_pool(limits)  # follow incrementally from here on
        _apply(state, ("watch", f"x{n}", 2.0, 90, 100), 100 + n, limits)
    assert [p.item_id for p in state.safe_pool(limits)] == ["x1", "x3", "x4"]
    assert heapq.nlargest(3, [1.0, 5.0, 2.0, 4.0, 3.0]) == [p.rank_score / 2 for p in state.safe_pool(limits)]
