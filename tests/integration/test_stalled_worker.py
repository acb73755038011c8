"""A worker stalled past its session timeout, then woken: no flag lost (real broker).

Found by trying it (2026-11-24): a worker paused longer than its session
(SIGSTOP here; a frozen VM or node in production) is dropped from the group,
and another worker takes its partitions and goes on from their committed
offsets. The stalled worker still held users it had applied and not flushed.
When it woke, its heartbeat failed, aiokafka revoked its partitions, and
riskgate's pre-revoke flush wrote those stale users to the changelog after
the new owner's records. The next restore of them lost what the new owner had
applied since: 51 of 133 users lost half their flags, in 3 of 4 runs. Now a
revoke after the broker dropped the member drops what is unflushed, and no
flush, snapshot or publication is written on a stale lease
(:mod:`streams.membership`).

The scenario: worker A holds every user's history; B joins. Half the flags
are produced: A applies its share and does not flush (a long flush
interval). A is stopped (SIGSTOP) until B owns every partition and has
applied the rest of the flags. A is woken, then B is killed, so that A
restores every user from the changelog: each must have all its flags.
"""

from __future__ import annotations

import os
import signal
import uuid

from .harness import (FLAG_EVERY_ITEM_SETTINGS, Worker, flag_every_item, json_of, make_topics, send_events,
                      wait_committed, wait_for)

PARTITIONS = 2
SETTINGS = FLAG_EVERY_ITEM_SETTINGS


def test_a_worker_woken_after_its_session_expired_writes_nothing_stale(kafka_bootstrap, tmp_path):
    app_id = f"rg-stalled-{uuid.uuid4().hex[:8]}"
    prefix = app_id + "."
    make_topics(kafka_bootstrap, prefix, PARTITIONS)
    history, flags, expect = flag_every_item(seed=3, n_users=200, n_items=5000, n_slates=400)
    workers: list[Worker] = []

    def start(name: str, **settings) -> Worker:
        w = Worker(kafka_bootstrap, app_id, tmp_path / f"data-{name}", tmp_path, PARTITIONS, prefix,
                   **{**SETTINGS, **settings})
        workers.append(w)
        return w.start()

    a = None
    try:
        ends = send_events(kafka_bootstrap, prefix, history)
        # A flushes only at rebalances: what it applies between them stays in memory
        a = start("a", flush_interval=300, flush_max_events=10**7).wait_healthy(90)
        wait_for(lambda: a.metric("riskgate_records_applied_total") >= len(history), 120, what="A to apply the history")
        b = start("b").wait_healthy(90)
        wait_for(lambda: a.partitions() and b.partitions(), 90, what="A and B to share the partitions")
        wait_committed(kafka_bootstrap, app_id, ends, timeout=120)  # (A flushed before the rebalance)
        held_by_a = a.partitions()
        applied = a.metric("riskgate_records_applied_total")
        first = send_events(kafka_bootstrap, prefix, flags[0::2])
        # (A's partitions hold about half the users; wait for most of their flags)
        wait_for(lambda: a.metric("riskgate_records_applied_total") - applied >= len(flags[0::2]) * 0.3, 60,
                 what="A to apply its share of the first flags")
        unflushed = a.metric("riskgate_records_applied_total") - applied

        os.kill(a.proc.pid, signal.SIGSTOP)
        wait_for(lambda: b.partitions() == list(range(PARTITIONS)), 90, what="B to take A's partitions")
        second = send_events(kafka_bootstrap, prefix, flags[1::2])
        ends = {tp: max(first.get(tp, 0), second.get(tp, 0)) for tp in {**first, **second}}
        wait_committed(kafka_bootstrap, app_id, ends, timeout=120)  # B applied every flag and flushed
        os.kill(a.proc.pid, signal.SIGCONT)

        wait_for(lambda: (b.partitions() or []) not in ([], list(range(PARTITIONS))), 90,
                 what="the group to give A partitions again")
        b.kill()
        wait_for(lambda: a.partitions() == list(range(PARTITIONS)), 90, what="A to take every partition")
        wait_committed(kafka_bootstrap, app_id, ends, timeout=120)

        def wrong() -> list:
            bad = []
            for uid, n in sorted(expect.items()):
                status, body = a.get(f"/users/{uid}", token=True)
                flagged = json_of(body)["flagged"] if status == 200 else status
                if flagged != n:
                    bad.append((uid, flagged, n))
            return bad

        assert held_by_a and unflushed > 0  # the scenario happened: A held unflushed flags when it stalled
        try:
            wait_for(lambda: not wrong(), 30, interval=0.5, what="every user's flags")
        except AssertionError:
            raise AssertionError(f"users whose flags were lost: {wrong()[:10]} ({len(wrong())} of {len(expect)})") from None
        assert a.metric("riskgate_writes_fenced_total", what="lost") >= 1  # (A found its partitions lost)
    finally:
        if a is not None and a.proc is not None and a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)
        for w in workers:
            w.stop()
