"""``riskgate bench stream`` end to end on a small backlog: its figures exist and hang together.

Figures are never asserted against goals (machines are noisy); what is checked
is that each phase ran and measured what it says: the worker applied the whole
backlog (dead-lettering each malformed event once), and the restore phase's
new worker restored at least every record the first one wrote to the users
changelog, through the bulk path (``streams.restore``), before it applied the
probe event; and a worker started on the directory of that one, killed,
restored them all again (a crash drops the local stores) before it processed
anything.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from streams.bench_stream import StreamBenchConfig, bench_stream

pytestmark = pytest.mark.integration


def test_bench_stream_measures_the_backlog_the_restore_and_a_crash(kafka_bootstrap):
    cfg = StreamBenchConfig(events=20_000, users=2_000, partitions=4, broker=kafka_bootstrap, malformed_share=0.05)
    fig = bench_stream(cfg, Console(quiet=True))
    assert fig["events"] > 0.9 * cfg.events  # (whole slates: a few fewer than asked)
    assert fig["worker_events_per_s"] > 0 and 0 < fig["ratio_to_ceiling"]
    assert fig["dead_lettered"] == fig["malformed"] > 0  # every malformed watch, once
    written = fig["changelog_records_per_event"] * fig["events"]  # by the first worker, to the users changelog
    assert written > fig["events"]  # (~2 an event)
    assert fig["restored_records"] >= round(written)
    assert fig["restart_to_processing_s"] > fig["restore_s"] >= 0
    # The killed worker left no clean-stop marker: its successor restored everything again, and
    # then some (the probe and the user it added, the versions its flushes wrote).
    assert fig["crash_restored_records"] >= fig["restored_records"]
    assert fig["crash_restart_to_processing_s"] > 0


def test_bench_stream_group_phase_splits_the_backlog_between_the_workers(kafka_bootstrap):
    """``--workers 2``: both workers of the one group apply records, together the whole backlog.

    On a backlog this small the group may finish before its last worker's first
    sample, so the rate is either a positive figure with its time base, or
    absent with the reason (``streams.bench_stream.group_rate``), never both.
    """
    cfg = StreamBenchConfig(events=20_000, users=2_000, partitions=4, broker=kafka_bootstrap, workers=2,
                            restore=False, crash=False)
    fig = bench_stream(cfg, Console(quiet=True))
    assert fig["workers"] == 2
    per_worker = fig["per_worker_events"]
    assert len(per_worker) == 2 and min(per_worker) > 0  # the partitions were shared, not left with one
    assert sum(per_worker) >= fig["events"] > 0.9 * cfg.events  # (a record replayed after a rebalance counts twice)
    assert fig["group_seconds_all"] > 0
    if fig["group_events_per_s"] is None:
        assert fig["group_not_settled"] and fig["ratio_to_ceiling"] is None
    else:
        assert fig["group_events_per_s"] > 0 and fig["group_seconds_settled"] > 0 and fig["ratio_to_ceiling"] > 0
        assert "group_not_settled" not in fig
