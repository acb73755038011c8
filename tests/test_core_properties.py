"""Hypothesis properties of the core: monotonicity, α-ordering, filter_all, exact add/subtract."""

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from calibration.grid import make_grid
from calibration.slates import Slate, SlateBatch
from calibration.threshold import lambda_hat_index, thresholds
from calibration.window import BucketedWindow, CurveAccumulator

GRID = make_grid(0.0, 1.0, 21)
score = st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))


@st.composite
def slates(draw, max_n=30):
    n = draw(st.integers(0, max_n))
    out = []
    for _ in range(n):
        m = draw(st.integers(1, 6))
        k = draw(st.integers(m, m + 3))
        out.append(Slate(tuple(draw(st.lists(score, min_size=m, max_size=m))),
                         tuple(draw(st.lists(st.booleans(), min_size=m, max_size=m))),
                         k, draw(st.integers(0, 5))))
    return SlateBatch.from_slates(out) if out else SlateBatch.empty()


strategy = st.sampled_from(["remove", "replace"])
loss = st.sampled_from(["fraction", "per_slot"])


@given(slates(), strategy, loss)
def test_empirical_risk_is_non_increasing_and_in_unit_interval(b, strat, ls):
    acc = CurveAccumulator(len(GRID)).add(b, GRID, strat, ls)
    r = acc.risk()
    assert np.all(np.diff(r) <= 0)
    assert r.min() >= 0 and r.max() <= 1
    assert r[-1] == 0  # everything filtered at +inf


@given(slates(), strategy, st.lists(st.floats(0.001, 0.999), min_size=1, max_size=8),
       st.sampled_from(["expectation", "high_probability"]))
def test_lambda_hat_non_increasing_in_alpha(b, strat, alphas, guarantee):
    alphas = sorted(alphas)
    acc = CurveAccumulator(len(GRID)).add(b, GRID, strat)
    idx = lambda_hat_index(acc.sums(), acc.n, alphas, guarantee, 0.1)
    assert np.all(np.diff(idx) <= 0)


@given(slates(), strategy, st.floats(0.0005, 0.9))
def test_filter_all_exactly_when_alpha_below_one_over_n_plus_one(b, strat, alpha):
    acc = CurveAccumulator(len(GRID)).add(b, GRID, strat)
    t = thresholds(acc.sums(), acc.n, GRID, [alpha])[0]
    if alpha < 1 / (acc.n + 1):
        assert t.filter_all and t.lam is None
    if t.filter_all:
        assert t.lam is None
    else:
        # the chosen λ satisfies the CRC inequality
        assert acc.n / (acc.n + 1) * t.risk_at_lambda + 1 / (acc.n + 1) <= alpha + 1e-9


@given(slates(), slates(), strategy, loss)
def test_add_then_subtract_restores_exactly(a, b, strat, ls):
    acc = CurveAccumulator(len(GRID)).add(a, GRID, strat, ls)
    before = acc.copy()
    acc.add(b, GRID, strat, ls).subtract(b, GRID, strat, ls)
    assert acc == before


@given(slates(), slates(), strategy)
def test_merge_is_order_free_and_equals_one_batch(a, b, strat):
    both = SlateBatch.from_slates(a.slates() + b.slates()) if len(a) + len(b) else SlateBatch.empty()
    one = CurveAccumulator(len(GRID)).add(both, GRID, strat)
    parts = CurveAccumulator(len(GRID)).add(b, GRID, strat).merge(CurveAccumulator(len(GRID)).add(a, GRID, strat))
    assert one == parts
    assert CurveAccumulator.from_bytes(one.to_bytes()) == one


@given(hnp.arrays(np.float64, st.integers(1, 200),
                  elements=st.one_of(st.floats(-2, 3, allow_nan=False),
                                     st.sampled_from(list(GRID.values[:-1]) + [-np.inf]))),
       st.sampled_from([make_grid(0, 1, 21), make_grid(-1, 2.5, 8), make_grid(0.1, 0.3, 1001)]))
def test_grid_index_fast_path_equals_binary_search(scores, grid):
    want = np.searchsorted(grid.values, scores, side="right")
    assert grid.index(scores).tolist() == want.tolist()


@settings(max_examples=50)
@given(st.lists(st.tuples(st.floats(0, 10_000), st.integers(1, 3)), max_size=40), st.floats(0, 20_000))
def test_window_keeps_exactly_the_live_buckets(adds, watermark):
    w = BucketedWindow(size=len(GRID), window=3600.0, buckets=4)
    ref = {}
    step = np.zeros(len(GRID), dtype=np.int64)
    step[3] = 7
    for ts, n in adds:
        if w.add_increments(ts, step * n, n):
            ref[w.bucket_of(ts)] = ref.get(w.bucket_of(ts), 0) + n
    w.advance(watermark)
    newest = w.bucket_of(watermark)
    live = {b: n for b, n in ref.items() if newest - 4 < b}
    # buckets newer than the watermark stay (they are future, not stale)
    assert w.total().n == sum(live.values())
    assert int(w.total().increments[3]) == 7 * sum(live.values())


@settings(max_examples=60)
@given(st.integers(1, 48), st.integers(0, 10**6), st.floats(0, 1, exclude_max=True))
@example(buckets=13, b=23, frac=0.5)  # the first id the old path got wrong (random draws rarely hit one)
def test_a_slate_lands_in_the_bucket_of_its_ts_whatever_the_bucket_width(buckets, b, frac):
    # 86400 s in 13 buckets is not a whole number of seconds: folding by a time made back
    # from the bucket id (b * width) put some slates a bucket early, or dropped them
    # from the oldest live bucket while counting them as added.
    from calibration.engine import Calibrator, EngineConfig
    from calibration.user_state import MatureSlate

    cfg = EngineConfig(grid=GRID, strategies=("remove",), alphas=(0.1,), window=86400.0, buckets=buckets)
    cal = Calibrator(cfg)
    clock = BucketedWindow(len(GRID), cfg.window, buckets)
    ts = (b + frac) * clock.width
    bucket = clock.bucket_of(ts)
    cal.advance(ts + (buckets - 1) * clock.width)  # the slate's bucket is now the oldest live one
    if not cal.accepts(ts):
        return  # ts + (buckets-1) * width rounded into a later bucket: nothing to check
    m = MatureSlate("u", "s", ts, 1, 0, "low", False, None, (0.5,), (True,), (False,), (None,))
    assert cal.add([m]) == 1
    window = cal.windows[("remove", "global")]
    assert [k for k, acc in window.items() if acc.n] == [bucket]
    assert cal.result("remove", "global").n == 1


@settings(max_examples=200)
@given(st.sampled_from([(3600.0, 7), (86400.0, 13), (3600.0, 24), (100.0, 3)]), st.integers(-5, 10**6))
@example(layout=(3600.0, 7), b=6)  # 6 * width is an ulp past the edge floor(ts / width) draws
@example(layout=(3600.0, 7), b=511)  # and here an ulp short of it
def test_a_bucket_starts_where_bucket_of_says_it_does(layout, b):
    # The horizon (a user's live slates are those at or after it) and the windows' buckets
    # (bucket_of) must put a slate on the same side of every edge, or a restart's rebuild
    # and a forget's subtraction disagree with the live window (one ulp below an edge).
    import math

    w = BucketedWindow(1, *layout)
    start = w.bucket_start(b)
    assert w.bucket_of(start) >= b > w.bucket_of(math.nextafter(start, -math.inf))
    w.advance(start + (w.buckets - 1) * w.width + w.width / 2)
    if w.oldest_live() == b:  # (the sum may round into the next bucket: then nothing to check here)
        assert w.span()[0] == start


_ENTRY = st.builds(
    lambda i, r, pct, flagged, tags: __import__("calibration.safe_pool", fromlist=["HistoryEntry"]).HistoryEntry(
        f"i{i}", float(r), tuple(tags), pct, pct is not None, True, flagged),
    st.integers(0, 40), st.integers(0, 5), st.none() | st.floats(0, 200), st.booleans(),
    st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True))


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(_ENTRY, max_size=40, unique_by=lambda e: e.item_id),
       beta=st.none() | st.sampled_from([0.0, 50.0]), blocked=st.sets(st.sampled_from(["a", "b", "c"])),
       cap=st.none() | st.integers(0, 12), exclude=st.sets(st.integers(0, 40).map(lambda i: f"i{i}")))
def test_pool_size_is_the_size_of_the_capped_pool_minus_the_excluded(entries, beta, blocked, cap, exclude):
    from calibration.safe_pool import pool_size, safe_pool

    want = sum(1 for s in safe_pool(entries, beta, blocked, cap) if s.item_id not in exclude)
    assert pool_size(entries, beta, blocked, cap, exclude) == want


@settings(max_examples=400, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 60), st.sampled_from([0.0, 1.0, 2.0, 3.5]), st.booleans()),
                        max_size=40, unique_by=lambda x: x[0]),
       keep=st.integers(0, 42))
def test_trimming_evicts_the_least_recently_seen_unflagged_first(entries, keep):
    """trim_history's shortcut is the order it documents: (flagged, last_seen, item_id), the first ones out."""
    from calibration.safe_pool import HistoryEntry, trim_history

    history = {f"i{i}": HistoryEntry(f"i{i}", 1.0, (), None, False, True, flagged, seen)
               for i, seen, flagged in entries}
    order = sorted(history.values(), key=lambda e: (e.flagged, e.last_seen, e.item_id))
    assert trim_history(history, keep) == [e.item_id for e in order[:max(0, len(history) - keep)]]


# -- the watermark: its shortcut against the rule it shortcuts --------------------
class _PlainWatermark:
    """SPEC's rule as written: the least max ts over lagging sources (else over all), minus lateness, never down."""

    def __init__(self, lateness):
        self.lateness, self.value, self.max_ts, self.lagging = lateness, float("-inf"), {}, set()

    def note(self, source, ts):
        self.max_ts[source] = max(ts, self.max_ts.get(source, ts))
        if self.lagging:
            if any(s not in self.max_ts for s in self.lagging):
                return
            base = min(self.max_ts[s] for s in self.lagging)
        else:
            base = max(self.max_ts.values())
        self.value = max(self.value, base - self.lateness)


_SOURCES = ("impressions", "watch", "flags", "constraints")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("note"), st.sampled_from(_SOURCES), st.floats(0, 1000, allow_nan=False)),
    st.tuples(st.just("lag"), st.sampled_from(_SOURCES), st.booleans()),
), max_size=80), st.floats(0, 20))
def test_the_watermark_follows_its_rule_whatever_the_order_of_notes_and_lagging(steps, lateness):
    """Watermark keeps which lagging source holds it back and skips notes of the others: never a different value."""
    from calibration.engine import Watermark

    fast, plain = Watermark(lateness), _PlainWatermark(lateness)
    for op, source, x in steps:
        if op == "note":
            fast.note(source, x)
            plain.note(source, x)
        else:
            fast.set_lagging(source, x)
            (plain.lagging.add if x else plain.lagging.discard)(source)
            fast.update()  # as the stream does once a source's lagging changes (advance_clock)
            if plain.lagging and all(s in plain.max_ts for s in plain.lagging):
                base = min(plain.max_ts[s] for s in plain.lagging)
                plain.value = max(plain.value, base - plain.lateness)
            elif not plain.lagging and plain.max_ts:
                plain.value = max(plain.value, max(plain.max_ts.values()) - plain.lateness)
        assert fast.value == plain.value
