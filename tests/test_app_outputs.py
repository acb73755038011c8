"""What a worker's flush publishes to ``safe-pools`` (RiskgateApp._user_outputs), without a broker.

A pool that only gained items waits for the next round of additions
(``POOL_ADDITIONS_INTERVAL``); an item the ranker was given and must stop
using goes out with the flush that saw it, whatever else changed.
"""

from __future__ import annotations

import orjson

from calibration.events import Impression, ShownItem, Watch
from streams.app import RiskgateApp
from streams.settings import load_settings


def _app(tmp_path) -> RiskgateApp:
    # the broker is never contacted: outputs are read from _user_outputs' return value
    return RiskgateApp(load_settings(data_dir=str(tmp_path), broker="kafka://127.0.0.1:1", topic_partitions=1,
                                     safe_pool_max=1, beta=50.0, pool_additions_interval=3600.0))


def _flush(rg: RiskgateApp, part) -> list[list[str]]:
    """One flush's outputs: the safe pools published, as item ids."""
    out = rg._user_outputs(part, part.engine.changed)
    part.engine.changed.clear()
    part.users.flush()
    return [orjson.loads(v)["safe_pool"] for t, _, v in out if t is rg.pools_topic]


def _items(pool) -> list[str]:
    return [p if isinstance(p, str) else p["item_id"] for p in pool]


def test_an_item_made_unsafe_by_a_watch_alone_is_withdrawn_at_once(tmp_path):
    """X handed out, pushed past the cap by an addition held back, then made unsafe by an earlier first view.

    The watch changes no core and the shown pool's top does not change, but
    the ranker holds X: the flush must send the pool without it, not wait for
    the round of additions an hour away.
    """
    rg = _app(tmp_path)
    part = rg._partition(0)
    eng = part.engine
    eng.process(Impression("e1", "u", "s1", 1.0, 2, False, (ShownItem("x", 1.0), ShownItem("y", 0.5, 2.0))),
                "impressions")
    eng.process(Watch("e2", "u", "x", 80.0, 100.0, 10.0), "watch")
    assert [_items(p) for p in _flush(rg, part)] == [["x"]]  # x is safe (y is not watched yet)

    eng.process(Watch("e3", "u", "y", 90.0, 100.0, 11.0), "watch")  # y (rank 2.0) outranks x: an addition
    assert _flush(rg, part) == []  # held for the round of additions

    eng.process(Watch("e4", "u", "x", 10.0, 100.0, 5.0), "watch")  # x's first view was earlier, at W% 10
    state = part.users.get("u")
    assert [s.item_id for s in state.safe_pool(rg.config.limits)] == ["y"]
    assert [_items(p) for p in _flush(rg, part)] == [["y"]]
