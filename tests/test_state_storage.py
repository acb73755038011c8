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
