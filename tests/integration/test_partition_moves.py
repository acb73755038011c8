"""Partitions moving while a worker reads a backlog in small chunks: no flag lost (real broker).

Found by an audit (2026-11-24): the worker's drain loop stopped delivering a
fetch's chunks only when the group's generation changed, at the next
assignment, and Faust stops the flow only after riskgate's pre-revoke flush.
Chunks applied after that flush rebuilt engines for the dropped partitions
from a local store that lacked what had just been flushed, and moved the
users' positions past records that were then lost for good (six users lost
15-17 flags each in this scenario, 1,639 chunk applies after revokes).

The scenario: users' histories applied by one worker; then a backlog of one
flag per item each user saw, read in chunks of 20 with flushes every 50 ms,
while a second and a third worker join, the second stops (SIGTERM) and the
third is killed (SIGKILL), each right after a further part of the backlog is
produced, and the second comes back. Every flag must be
applied once: each user's ``flagged`` is the number of items it saw, and no
safe pool is left.
"""

from __future__ import annotations

import signal
import uuid

from .harness import (
    FLAG_EVERY_ITEM_SETTINGS,
    Worker,
    committed_offsets,
    flag_every_item,
    json_of,
    make_topics,
    send_events,
    wait_committed,
    wait_for,
)

PARTITIONS = 6
SETTINGS = dict(FLAG_EVERY_ITEM_SETTINGS, batch_max=20, flush_interval=0.05, flush_max_events=100)


def test_no_flag_is_lost_when_partitions_move_under_a_backlog(kafka_bootstrap, tmp_path):
    app_id = f"rg-moves-{uuid.uuid4().hex[:8]}"
    prefix = app_id + "."
    make_topics(kafka_bootstrap, prefix, PARTITIONS)
    history, flags, expect = flag_every_item(seed=12, n_users=600, n_items=20_000, n_slates=1500)
    workers: list[Worker] = []

    def start(name: str) -> Worker:
        w = Worker(kafka_bootstrap, app_id, tmp_path / f"data-{name}", tmp_path, PARTITIONS, prefix, **SETTINGS)
        workers.append(w)
        return w.start()

    try:
        ends = send_events(kafka_bootstrap, prefix, history)
        w1 = start("w1").wait_healthy(90)
        wait_committed(kafka_bootstrap, app_id, ends, timeout=300)
        base = w1.metric("riskgate_records_applied_total")

        def applied() -> float:
            return w1.metric("riskgate_records_applied_total") - base

        # The backlog in three parts: the first read while the second and third workers join, each
        # of the others produced right before a stop, so that every stop lands while it is read.
        first, second = int(len(flags) * 0.4), int(len(flags) * 0.7)
        ends = send_events(kafka_bootstrap, prefix, flags[:first])
        wait_for(lambda: applied() >= first * 0.1, 120, interval=0.05, what="a tenth of the flags applied")
        w2 = start("w2")
        wait_for(lambda: w2.partitions(), 90, interval=0.1, what="the second worker to hold partitions")
        w3 = start("w3")
        wait_for(lambda: w3.partitions(), 90, interval=0.1, what="the third worker to hold partitions")

        def committed(part_ends) -> int:
            return sum(v or 0 for v in committed_offsets(kafka_bootstrap, app_id, part_ends).values())

        for part, stop in ((flags[first:second], lambda: w2.stop(signal.SIGTERM)), (flags[second:], w3.kill)):
            part_ends = send_events(kafka_bootstrap, prefix, part)
            ends = {tp: max(end, ends.get(tp, 0)) for tp, end in {**ends, **part_ends}.items()}
            mark = committed(part_ends)
            assert mark < sum(part_ends.values()), "the backlog was read before the partitions moved: nothing tested"
            wait_for(lambda: committed(part_ends) > mark, 60, interval=0.1, what="the group to read on")
            stop()
        w2b = start("w2")
        wait_for(lambda: w2b.partitions(), 90, interval=0.1, what="the second worker back")
        live = [w1, w2b]
        wait_committed(kafka_bootstrap, app_id, ends, timeout=300)
        wait_for(lambda: sum(len(w.partitions() or ()) for w in live) == PARTITIONS, 60, what="one owner each")

        def wrong() -> list:
            bad = []
            for uid, n in sorted(expect.items()):
                views = [json_of(body) for w in live for status, body in [w.get(f"/users/{uid}", token=True)]
                         if status == 200]
                if len(views) != 1:
                    bad.append((uid, "held by", len(views)))
                elif views[0]["flagged"] != n or views[0]["safe_pool"]:
                    bad.append((uid, "flagged", views[0]["flagged"], "of", n, "pool", views[0]["safe_pool"]))
            return bad

        # (committed offsets cover every record; the owners' views settle with their last flush)
        try:
            wait_for(lambda: not wrong(), 30, interval=0.5, what="every user's flags")
        except AssertionError:
            raise AssertionError(f"users whose flags were lost or doubled: {wrong()[:10]}") from None
    finally:
        for w in workers:
            w.stop()
