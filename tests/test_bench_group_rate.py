"""How ``bench stream`` turns a group's samples into a rate (:func:`streams.bench_stream.group_rate`), and prints it."""

from __future__ import annotations

import pytest
from rich.console import Console

from streams.bench_stream import StreamBenchConfig, _print, group_rate


def test_the_rate_counts_only_records_applied_once_every_worker_applies():
    # worker 0 starts at t=0 and applies 100 a second; worker 1 applies its first records at t=3
    w0 = [(t, 100.0 * t) for t in range(11)]
    w1 = [(0, 0.0), (1, 0.0), (2, 0.0), (3, 50.0)] + [(t, 50.0 + 100.0 * (t - 3)) for t in range(4, 11)]
    total = 1000 + 750
    fig = group_rate([w0, w1], total, end=10.0)
    # settled at t=3, when 300 + 50 were applied: the 1400 after it took 7 s
    assert fig["group_seconds_settled"] == 7.0
    assert fig["group_events_after_settled"] == total - 350
    assert fig["group_events_per_s"] == pytest.approx(1400 / 7)


def test_a_backlog_applied_before_the_last_worker_started_has_no_rate():
    # worker 1 applied its share, but only in the sample after the last record: nothing was left
    w0 = [(0, 0.0), (1, 900.0), (2, 1000.0)]
    w1 = [(0, 0.0), (1, 0.0), (2.5, 100.0)]
    fig = group_rate([w0, w1], 1100, end=2.0)
    assert fig["group_events_per_s"] is None
    assert "before every worker" in fig["group_not_settled"]


def test_a_worker_that_never_applied_a_record_is_named():
    fig = group_rate([[(0, 0.0), (1, 500.0)], [(0, 0.0), (1, 0.0)]], 500, end=1.0)
    assert fig["group_events_per_s"] is None
    assert fig["group_not_settled"] == "worker(s) [1] applied no record"


def test_a_group_that_settled_too_late_to_be_timed_has_no_rate():
    # every worker applied records for 0.25 s only, one sample: 500 records in it would read as
    # 2,000 a second whatever the group's real rate, so no figure is given
    w0 = [(0, 0.0), (1, 900.0), (1.25, 1200.0)]
    w1 = [(0, 0.0), (1, 100.0), (1.25, 300.0)]
    fig = group_rate([w0, w1], 1500, end=1.25)
    assert fig["group_events_per_s"] is None
    assert fig["group_not_settled"] == "every worker applied records for only 0.25 s (under 2 s)"
    # the same samples, with the bar lowered below the window, give the figure
    assert group_rate([w0, w1], 1500, end=1.25, min_seconds=0.2)["group_events_per_s"] == pytest.approx(500 / 0.25)


def test_the_table_prints_every_figure_as_it_is():
    # a list of floats looks like a rich markup tag ("[nan, nan]": a group too short to time its
    # cores) and was printed as nothing; a figure not measured prints as a dash
    console = Console(record=True, width=120)
    fig = {"events": 10, "distinct_users": 2, "per_worker_cores": [float("nan"), float("nan")],
           "per_worker_events": [4.0, 6.0], "group_events_per_s": None, "ceiling_events_per_s": 1234.5}
    _print(console, fig, StreamBenchConfig(workers=2))
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in console.export_text().splitlines() if line.count("│") == 3}
    assert rows["per_worker_cores"] == "[nan, nan]"
    assert rows["per_worker_events"] == "[4.0, 6.0]"
    assert rows["group_events_per_s"] == "—"
    assert rows["ceiling_events_per_s"] == "1,234.500"
