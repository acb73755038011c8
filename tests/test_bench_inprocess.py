"""`riskgate bench inprocess` runs the worker's own batch and flush path without a broker (a small run)."""

from streams.bench_inprocess import STEPS, InprocessConfig, bench_inprocess


def test_the_in_process_bench_times_every_step_of_the_worker_path():
    fig = bench_inprocess(InprocessConfig(events=4000, users=300, chunk=500, flush_every=1000))
    assert fig["events"] > 3000  # the synthetic world's events, all fed through
    assert all(fig[f"{k}_us"] > 0 for k in STEPS)
    assert fig["total_us"] >= sum(fig[f"{k}_us"] for k in STEPS) * 0.99
    # an impression writes its 20 entries, a watch one: the flushes did send what users changed
    assert 1.0 < fig["changelog_records_per_event"] < 5.0
    assert 60 < fig["changelog_bytes_per_event"] / fig["changelog_records_per_event"] < 2000  # keys and values
    assert fig["outputs_per_event"] > 0


def test_the_fetch_wait_share_and_records_per_fetch_come_from_the_samples_inside_the_window():
    from streams.bench_stream import _fetch_share

    # (t, seconds waited, fetches, records applied), sampled every second; the backlog ran from 1 to 4
    samples = [(0.0, 5.0, 0, 0), (1.0, 5.5, 1, 0), (2.0, 5.6, 3, 4000), (3.0, 5.7, 5, 8000), (4.0, 5.8, 7, 12000),
               (5.0, 6.8, 7, 12000)]
    share, per_fetch = _fetch_share(samples, 1.0, 4.0)
    assert abs(share - 0.1) < 1e-9 and per_fetch == 2000.0
    assert all(x != x for x in _fetch_share(samples[:1], 0.0, 4.0))  # one sample: no rate (nan)
