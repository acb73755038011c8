"""The users table's layout (streams/state.py): a user's core and history entries round-trip exactly,
and a watch changes one small entry, not the core."""

from __future__ import annotations

import orjson

from calibration.engine import Engine, EngineConfig
from calibration.synthetic import WorldConfig, generate_events
from calibration.events import Impression, ShownItem, event_from_dict
from calibration.user_state import Limits
from streams.state import decode_user, encode_core, encode_entry


def _users():
    cfg = EngineConfig(label_window=60.0, allowed_lateness=5.0, limits=Limits(history_max=40))
    eng = Engine(cfg)
    world = WorldConfig(seed=3, n_users=30, n_items=2000, n_slates=300, slates_per_second=0.5, holdout_share=0.5, label_delay=30.0,
                        constraint_user_share=0.3, rate_multiplier=20.0)
    for topic, v in generate_events(world):
        eng.process(event_from_dict(topic, v), source=topic)
    # one slate still awaiting its labels
    uid = next(iter(eng.users))
    eng.process(Impression("late-imp", uid, "s-pending", eng.watermark + 100.0, 3, False,
                           (ShownItem("p1", 0.4, 2.0, ("news",)), ShownItem("p2", 0.9, 1.0))), source="impressions")
    return eng


def _round_trip(state):
    return decode_user(state.user_id, encode_core(state),
                       [(item, encode_entry(e)) for item, e in state.history.items()])


def test_every_user_round_trips_through_core_and_entries():
    eng = _users()
    users = list(eng.users.values())
    assert any(u.pending for u in users) and any(u.recent for u in users) and any(u.tag_rules for u in users)
    for state in users:
        assert _round_trip(state) == state


def test_a_format_1_json_user_still_loads():
    state = next(u for u in _users().users.values() if u.history and u.pending)
    assert decode_user(state.user_id, orjson.dumps(state.to_dict())) == state


def test_a_watch_changes_one_entry_and_not_the_core():
    from calibration.events import Watch

    eng = _users()
    uid, state = next((u, s) for u, s in eng.users.items() if s.history)
    item = next(iter(state.history))
    core = encode_core(state)
    before = dict(state.history)
    eng.process(Watch("w-extra", uid, item, 10.0, 20.0, max(e.last_seen for e in before.values()) + 1), "watch")
    after = eng.users[uid]
    assert encode_core(after) == core
    changed = [i for i, e in after.history.items() if before.get(i) is not e]
    assert changed == [item]
    assert len(encode_entry(after.history[item])) < 100


# -- flushes write exactly what changed ------------------------------------------

class _Store:
    """The two things TableUsers asks of a Faust RocksDB store, over one real RocksDB."""

    offset_key = b"__faust\x00offset__"

    def __init__(self, db):
        self.db = db

    def _db_for_partition(self, partition):
        return self.db


class _Table:
    def __init__(self, db):
        self.data = _Store(db)


def _replay_through_table(tmp_path, seed: int, flush_every: int, cache_max: int, sync_interval: float = 3600.0):
    """Events through an Engine over TableUsers; the flushed groups applied to a dict as a compacted changelog."""
    import random

    from rocksdict import Options, Rdict

    from calibration.events import Forget
    from streams.state import TableUsers

    db = Rdict(str(tmp_path / f"db-{seed}-{flush_every}-{cache_max}"), options=Options(raw_mode=True))
    users = TableUsers(_Table(db), 0, cache_max=cache_max, sync_interval=sync_interval)
    cfg = EngineConfig(label_window=60.0, allowed_lateness=5.0, limits=Limits(history_max=25, user_window_max=15))
    eng = Engine(cfg, users=users)
    world = WorldConfig(seed=seed, n_users=25, n_items=400, n_slates=250, slates_per_second=0.5, holdout_share=0.5,
                        label_delay=30.0, constraint_user_share=0.3, rate_multiplier=20.0)
    rng = random.Random(seed)
    changelog: dict[bytes, bytes] = {}
    forgotten = 0

    def flush():
        _, _, groups = users.flush()
        for group in groups:
            for k, v in group:
                if v is None:
                    changelog.pop(k, None)
                else:
                    changelog[k] = v

    for n, (topic, v) in enumerate(generate_events(world), 1):
        ev = event_from_dict(topic, v)
        eng.process(ev, source=topic, position=n)
        if rng.random() < 0.003:  # forget a user, who may come back with later events
            eng.process(Forget(f"f{n}", ev.user_id, ev.ts), source="forget")
            forgotten += 1
        if n % flush_every == 0:
            flush()
    flush()
    return eng, users, db, changelog, forgotten


def _users_of(records: dict[bytes, bytes]) -> dict[str, object]:
    from streams.state import SEP

    from streams.state import POSITIONS_SUFFIX

    cores = {k.decode(): v for k, v in records.items() if SEP not in k}
    entries: dict[str, list] = {}
    positions: dict[str, bytes] = {}
    for k, v in records.items():
        if SEP in k:
            uid, _, item = k.partition(SEP)
            if item == POSITIONS_SUFFIX:
                positions[uid.decode()] = v
            else:
                entries.setdefault(uid.decode(), []).append((item.decode(), v))
    assert set(entries) | set(positions) <= set(cores), "history entries without their user's core"
    return {uid: decode_user(uid, core, entries.get(uid, ()), positions.get(uid)) for uid, core in cores.items()}


import pytest  # noqa: E402


@pytest.mark.parametrize("seed,flush_every,cache_max,sync_interval",
                         [(1, 1, 1000, 3600.0), (2, 7, 5, 3600.0), (3, 50, 3, 3600.0), (4, 333, 1000, 3600.0),
                          (5, 3, 1000, 0.0), (6, 11, 4, 0.0)])
def test_flushed_changes_rebuild_every_user_exactly(tmp_path, seed, flush_every, cache_max, sync_interval):
    """The changelog (and the local database, once synced) written change by change equals every user's live state.

    Small flush intervals, a cache smaller than the users (evicted users are
    written locally, read back and changed again), trimmed histories, maturity
    and forgets (tombstones for entries the local database never got): any
    change a user failed to note would be missing from the rebuilt state.
    """
    eng, users, db, changelog, forgotten = _replay_through_table(tmp_path, seed, flush_every, cache_max, sync_interval)
    assert forgotten > 0
    live = dict(users.items())
    rebuilt = _users_of(changelog)
    assert set(rebuilt) == set(live)
    for uid, state in live.items():
        assert rebuilt[uid] == state, uid
    offset_key = _Store.offset_key
    local = {k: v for k, v in db.items() if k != offset_key}
    if sync_interval > 1000 and cache_max > 100:
        # nothing evicted, no sync due: the local database got only forgotten users' deletes
        assert local == {}
    users.note_sent(41)
    users.note_sent(40)  # callbacks may come out of order: the highest counts
    users.sync()
    local = {k: v for k, v in db.items() if k != offset_key}
    assert local == changelog
    assert db[offset_key] == b"41"  # a restart on this database may skip the changelog up to here
    # the live states really were trimmed, matured and carried slates of their own
    assert any(s.recent for s in live.values()) and any(len(s.history) >= 25 for s in live.values())
    assert all(s.positions for s in live.values())


@pytest.mark.parametrize("n", [2, 3, 8, 16, 64, 100])
def test_partitions_sync_at_spread_phases(n):
    """Periodic work of a worker's partitions (local syncs, pool-addition rounds) starts at spread phases.

    All partitions syncing in one flush make that flush as long as all their
    syncs together. With golden-ratio phases every gap on the circle is within
    [0.5/n, 2/n]: no two phases coincide, none is left waiting long.
    """
    from streams.state import phase

    ph = sorted(phase(p) for p in range(n))
    assert all(0.0 <= x < 1.0 for x in ph)
    gaps = [b - a for a, b in zip(ph, ph[1:])] + [1.0 - ph[-1] + ph[0]]
    assert min(gaps) >= 0.5 / n and max(gaps) <= 2.0 / n
