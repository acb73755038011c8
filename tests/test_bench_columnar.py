"""`riskgate bench columnar`: the floor of a columnar users' state does the history's work the engine does."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.engine import Engine, EngineConfig
from calibration.events import Flag, Impression, ShownItem, Watch
from streams.bench_columnar import STEPS, ColumnarPartition, bench_columnar
from streams.bench_inprocess import InprocessConfig, backlog
from streams.schemas import decode_event


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12))


def _as_row(e) -> tuple:
    """A :class:`calibration.safe_pool.HistoryEntry` as :meth:`ColumnarPartition.history` gives its row."""
    return (e.first_rank_score if e.shown else None, e.tags, e.first_watch_pct, e.watched, e.shown, e.flagged,
            e.last_seen, e.flag_ts, e.first_shown, e.first_watch_ts)


def test_the_columnar_rows_hold_what_the_engine_holds_in_every_history_entry():
    cfg = InprocessConfig(events=6000, users=400, partitions=4, chunk=500, flush_every=1500)
    records = backlog(cfg)
    engine = Engine(EngineConfig(label_window=120.0, allowed_lateness=5.0))  # the bench worker's settings
    parts = {p: ColumnarPartition() for p in range(cfg.partitions)}
    kinds = set()
    for topic, p, offset, key, value in records:
        ev = decode_event(topic, value, key)
        kinds.add(ev.event_type)
        if ev.event_type in ("watch", "impression", "flag"):
            engine.process(ev, topic, offset)
            assert parts[p].apply(ev, topic, offset) == "ok"
            assert parts[p].apply(ev, topic, offset) == "replayed"  # read again after a crash
    assert {"watch", "impression", "flag"} <= kinds
    compared = 0
    for p, part in parts.items():
        for uid in part.users:
            rows = part.history(uid)
            history = engine.users[uid].history
            assert rows.keys() == history.keys()
            for item_id, e in history.items():
                want, got = _as_row(e), rows[item_id]
                assert all(_same(x, y) for x, y in zip(got, want)), (uid, item_id, got, want)
                compared += 1
    assert compared > 1000


def test_the_columnar_bench_times_its_steps_and_writes_each_changed_user_once_a_flush():
    cfg = InprocessConfig(events=4000, users=300, chunk=500, flush_every=1000)
    fig, parts = bench_columnar(cfg)
    assert fig["applied"] + fig["skipped"] == fig["events"] > 3000
    assert all(fig[f"{k}_us"] > 0 for k in STEPS)
    assert fig["total_us"] >= sum(fig[f"{k}_us"] for k in STEPS) * 0.99
    # at most a rows record and a core record per user and flush, so fewer records than events
    assert 0.05 < fig["changelog_records_per_event"] < 1.0
    assert all(not part.changed and all(u.dirty is None for u in part.users.values()) for part in parts.values())


def _event(i, kind, user, item, ts, x):
    if kind == "watch":
        return Watch(f"e{i}", user, item, watch_ms=x * 100.0, duration_ms=float(x % 3) * 50.0, ts=ts)
    if kind == "flag":
        return Flag(f"e{i}", user, item, "report", ts)
    items = tuple(ShownItem(f"i{(int(item[1:]) + j) % 5}", score=x + j, tags=(f"t{x % 2}",)) for j in range(3))
    return Impression(f"e{i}", user, f"s{i}", ts, 3, False, items)


_events = st.lists(st.tuples(st.sampled_from(["watch", "flag", "impression"]), st.sampled_from(["u1", "u2"]),
                             st.sampled_from([f"i{j}" for j in range(5)]), st.floats(1000.0, 1100.0),
                             st.integers(0, 9)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(_events)
def test_out_of_order_events_leave_the_same_rows_as_the_engines_entries(events):
    # The backlog above is mostly in event-time order; here every order: earliest view, first sight
    # and earliest flag win, a later impression keeps the first rank score and tags.
    engine, part = Engine(EngineConfig(label_window=120.0, allowed_lateness=5.0)), ColumnarPartition()
    for i, (kind, user, item, ts, x) in enumerate(events):
        ev = _event(i, kind, user, item, ts, x)
        engine.process(ev, kind, i)
        part.apply(ev, kind, i)
    for uid in part.users:
        history = engine.users[uid].history
        assert part.history(uid) == {k: _as_row(e) for k, e in history.items()}
