"""The synthetic world: SPEC §2 event shapes, the paper's section-3 statistics, streaming.

Statistical checks use fixed seeds and tolerances of Z = 4.5 standard errors
(binomial or Poisson), so a correct generator fails with probability < 1e-5
per check and a fixed seed makes every run identical anyway.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import tracemalloc
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from calibration.synthetic import (
    BAND_EDGES, BAND_LABELS, TAGS, TOPICS, WorldConfig, band_index, build_world, generate_events,
)
from streams.synthetic_io import EventFileError, read_jsonl, write_jsonl

Z = 4.5
TABLE1 = (0.601, 0.251, 0.109, 0.039)

# ----------------------------------------------------------------- SPEC §2 shapes

_ITEM_FIELDS = {"item_id": str, "score": float, "rank_score": float, "tags": list, "replacement": bool}
_FIELDS = {
    "impressions": {"event_id": str, "user_id": str, "slate_id": str, "ts": float, "k": int,
                    "policy_applied": bool, "items": list},
    "watch": {"event_id": str, "user_id": str, "item_id": str, "watch_ms": int, "duration_ms": int, "ts": float},
    "flags": {"event_id": str, "user_id": str, "item_id": str, "kind": str, "ts": float},
    "constraints": {"event_id": str, "user_id": str, "block_tags": list, "unblock_tags": list,
                    "source": str, "ts": float},
    "forget": {"event_id": str, "user_id": str, "ts": float},
}


def _typed(v: object, t: type) -> bool:
    # bool is an int subclass: an int field must not hold a bool, nor a float a bool/int
    if t is int:
        return type(v) is int
    if t is float:
        return type(v) is float and math.isfinite(v)
    return type(v) is t


def check_event(topic: str, ev: dict) -> None:
    """Assert that ``ev`` has exactly the SPEC §2 fields of ``topic`` with the right types."""
    assert topic in _FIELDS, topic
    spec = _FIELDS[topic]
    assert set(ev) == set(spec), (topic, sorted(ev))
    for key, t in spec.items():
        assert _typed(ev[key], t), (topic, key, ev[key])
    assert ev["event_id"] and ev["user_id"]
    if topic == "impressions":
        assert 1 <= ev["k"] and len(ev["items"]) <= ev["k"]
        ids = [it["item_id"] for it in ev["items"]]
        assert len(set(ids)) == len(ids), "an item twice in one slate"
        for it in ev["items"]:
            assert set(it) == set(_ITEM_FIELDS), sorted(it)
            for key, t in _ITEM_FIELDS.items():
                assert _typed(it[key], t), (key, it[key])
            assert all(type(tag) is str for tag in it["tags"])
    elif topic == "watch":
        assert ev["watch_ms"] >= 0 and ev["duration_ms"] >= 0
    elif topic == "flags":
        assert ev["kind"] in ("not_interested", "report")
    elif topic == "constraints":
        assert ev["source"] in ("declared", "inferred")
        assert all(type(t) is str for t in ev["block_tags"] + ev["unblock_tags"])


def _binom_ok(successes: int, n: int, p: float, z: float = Z) -> bool:
    return abs(successes - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# ----------------------------------------------------------------- one pass, many statistics


@dataclass
class Summary:
    config: WorldConfig
    n_events: Counter = field(default_factory=Counter)
    watch: int = 0
    zero_watch: int = 0
    views: int = 0
    repeats: int = 0
    eligible_slots: int = 0
    first_w_flagged: list = field(default_factory=list)
    first_w_unflagged: list = field(default_factory=list)
    shown_by_user: Counter = field(default_factory=Counter)
    flags_by_user: Counter = field(default_factory=Counter)
    score_flagged: list = field(default_factory=list)
    score_unflagged: list = field(default_factory=list)
    holdout: int = 0
    slates: int = 0
    flag_before_watch: int = 0
    flags_matched: int = 0
    flag_delay_max: float = 0.0
    unsorted: int = 0
    # Property 1: repeat views of items unflagged at first view, by first-view W%
    rep_hi: int = 0  # first W% > 50
    rep_hi_flagged: int = 0
    rep_zero: int = 0  # first W% == 0
    rep_zero_flagged: int = 0
    rep_zero_expected: float = 0.0


def summarise(config: WorldConfig) -> Summary:
    """One streaming pass that reconstructs everything the tests check, from events only."""
    s = Summary(config)
    seen_batch: dict[str, int] = {}  # user -> batch of its first slate
    first: dict[tuple[str, str], list] = {}  # pair -> [first W%, first imp ts, flagged at first view]
    pending_rep: dict[tuple[str, str], tuple[float, float]] = {}  # pair -> (repeat imp ts, first W%)
    pending_order: deque = deque()  # (repeat imp ts, pair), in ts order
    imp_ts: dict[tuple[str, str], float] = {}  # pair -> ts of its latest impression
    watch_ts: dict[tuple[str, str], float] = {}
    flag_ts: dict[tuple[str, str], float] = {}
    slate_scores: dict[tuple[str, str], float] = {}
    last = -math.inf
    B = config.batch_slates
    for topic, ev in generate_events(config):
        s.n_events[topic] += 1
        if ev["ts"] < last:
            s.unsorted += 1
        last = max(last, ev["ts"])
        u = ev["user_id"]
        if topic == "impressions":
            s.slates += 1
            s.holdout += not ev["policy_applied"]
            batch = int(ev["slate_id"].rsplit("-", 1)[1]) // B
            # the generator writes history at batch boundaries: only users with a slate in an
            # earlier batch can be shown repeats
            eligible = seen_batch.setdefault(u, batch) < batch
            for it in ev["items"]:
                pair = (u, it["item_id"])
                s.views += 1
                s.eligible_slots += eligible
                s.shown_by_user[u] += 1
                slate_scores[pair] = it["score"]
                if pair in first:
                    s.repeats += 1
                    f = first[pair]
                    if not f[2] and f[0] is not None and f[1] + config.label_delay < ev["ts"]:
                        pending_rep[pair] = (ev["ts"], f[0])
                        pending_order.append((ev["ts"], pair))
                else:
                    first[pair] = [None, ev["ts"], False]
                imp_ts[pair] = ev["ts"]
        elif topic == "watch":
            pair = (u, ev["item_id"])
            s.watch += 1
            s.zero_watch += ev["watch_ms"] == 0
            f = first[pair]
            if f[0] is None and imp_ts[pair] == f[1] and ev["duration_ms"] > 0:
                f[0] = 100.0 * ev["watch_ms"] / ev["duration_ms"]
            watch_ts[pair] = ev["ts"]
            if pair in flag_ts and flag_ts[pair] >= imp_ts[pair]:
                s.flag_before_watch += 1
        elif topic == "flags":
            pair = (u, ev["item_id"])
            s.flags_by_user[u] += 1
            delay = ev["ts"] - imp_ts[pair]
            assert delay > 0
            s.flag_delay_max = max(s.flag_delay_max, delay)
            flag_ts[pair] = ev["ts"]
            s.flags_matched += 1
            if imp_ts[pair] == first[pair][1]:
                first[pair][2] = True
            if pair in pending_rep and pending_rep[pair][0] == imp_ts[pair]:
                w = pending_rep.pop(pair)[1]
                if w > 50:
                    s.rep_hi_flagged += 1
                elif w == 0:
                    s.rep_zero_flagged += 1
        # a repeat view is classified once its label window has passed
        if topic == "impressions":
            while pending_order and pending_order[0][0] + config.label_delay < ev["ts"]:
                t, pair = pending_order.popleft()
                if pending_rep.get(pair, (None,))[0] != t:
                    continue  # flagged (and counted) already, or superseded
                _, w = pending_rep.pop(pair)
                if w > 50:
                    s.rep_hi += 1
                elif w == 0:
                    s.rep_zero += 1
    # first-view W% of flagged vs unflagged items (positive durations only)
    for w, _, flagged in first.values():
        if w is not None:
            (s.first_w_flagged if flagged else s.first_w_unflagged).append(w)
    for pair, sc in slate_scores.items():
        (s.score_flagged if pair in flag_ts else s.score_unflagged).append(sc)
    return s


@pytest.fixture(scope="module")
def big() -> Summary:
    # one slate a second keeps most repeats outside the first view's label window, so the
    # first view's label is final when the repeat is served (needed to test Property 1)
    cfg = WorldConfig(seed=11, n_users=400, n_slates=20_000, slates_per_second=1.0, informativeness=0.8)
    s = summarise(cfg)
    # flagged repeats were popped at flag time, before classification: add them back
    s.rep_hi += s.rep_hi_flagged
    s.rep_zero += s.rep_zero_flagged
    return s


# ----------------------------------------------------------------- tests: shapes


def test_every_event_matches_spec_fields_and_types():
    cfg = WorldConfig(seed=3, n_users=150, n_items=5_000, n_slates=3_000, constraint_user_share=0.3,
                      forget_share=0.01, out_of_order_share=0.05, policy_lambda=0.05)
    counts = Counter()
    ids = set()
    for topic, ev in generate_events(cfg):
        check_event(topic, ev)
        counts[topic] += 1
        ids.add(ev["event_id"])
        if topic == "impressions":
            assert ev["k"] == cfg.k
            assert all(it["replacement"] is False for it in ev["items"])
            assert all(0.0 <= it["score"] <= 1.0 and it["rank_score"] >= 0 for it in ev["items"])
            assert all(set(it["tags"]) <= set(TAGS) and it["tags"] for it in ev["items"])
            if ev["policy_applied"]:
                assert all(it["score"] >= 0.05 for it in ev["items"])
            rs = [it["rank_score"] for it in ev["items"]]
            assert rs == sorted(rs, reverse=True), "items must be in rank order"
    assert set(counts) == set(TOPICS), counts
    assert len(ids) == sum(counts.values()), "event ids must be unique"


@pytest.mark.parametrize("unblock_share", [0.0, 0.5])
def test_policy_slates_never_show_blocked_tags_and_holdouts_may(unblock_share):
    # (with unblocks: a user's slates before a later unblock in the same generated batch were served
    # under the state after it, unfiltered: violations that fired RiskgateConstraintViolation on the demo)
    cfg = WorldConfig(seed=5, n_users=100, n_items=5_000, n_slates=4_000, constraint_user_share=0.5,
                      unblock_share=unblock_share)
    blocked: dict[str, set] = {}
    violations_holdout = 0
    for topic, ev in generate_events(cfg):
        if topic == "constraints":
            blocked.setdefault(ev["user_id"], set()).update(ev["block_tags"])
            blocked[ev["user_id"]] -= set(ev["unblock_tags"])
        elif topic == "impressions":
            b = blocked.get(ev["user_id"], set())
            hit = sum(bool(b & set(it["tags"])) for it in ev["items"])
            if ev["policy_applied"]:
                assert hit == 0
            else:
                violations_holdout += hit
    assert blocked, "some users must declare constraints"
    assert violations_holdout > 0, "holdouts are unfiltered, so blocked tags do appear there"


def test_same_seed_same_stream_other_seed_other_stream():
    cfg = WorldConfig(seed=7, n_users=50, n_items=2_000, n_slates=600, out_of_order_share=0.1, forget_share=0.01)
    a = list(generate_events(cfg))
    b = list(generate_events(cfg))
    c = list(generate_events(WorldConfig(**{**cfg.__dict__, "seed": 8})))
    assert a == b
    assert a != c


def test_events_are_in_event_time_order_and_labels_arrive_within_label_delay(big):
    assert big.unsorted == 0
    assert 0 < big.flag_delay_max <= big.config.label_delay
    # flags arrive mid-view, so a good share of them precede the watch event of their view
    assert big.flag_before_watch > 0.2 * big.flags_matched


def test_out_of_order_share_makes_some_events_late_but_bounded():
    cfg = WorldConfig(seed=2, n_users=100, n_items=5_000, n_slates=2_000, out_of_order_share=0.1,
                      out_of_order_lag=120.0)
    last, late, worst, n = -math.inf, 0, 0.0, 0
    for topic, ev in generate_events(cfg):
        n += topic in ("watch", "flags")
        if ev["ts"] < last:
            late += 1
            worst = max(worst, last - ev["ts"])
        last = max(last, ev["ts"])
    assert late > 0.02 * n
    assert worst <= cfg.out_of_order_lag


# ----------------------------------------------------------------- tests: section-3 statistics


def test_table1_user_shares_by_band():
    w = build_world(WorldConfig(seed=1, n_users=20_000, n_items=2_000))
    counts = np.bincount(w.user_band, minlength=4)
    for b, p in enumerate(TABLE1):
        assert _binom_ok(int(counts[b]), 20_000, p), (BAND_LABELS[b], counts[b] / 20_000, p)
    assert (band_index(w.user_rate) == w.user_band).all()
    bands = w.bands()
    assert Counter(bands.values())["<0.1%"] == counts[0]
    assert Counter(w.reporting_bands().values())["high"] == counts[1:].sum()


def test_realised_reporting_rates_follow_each_users_band(big):
    w = build_world(big.config)
    rate = w.rates()
    band_of = w.bands()
    for b, label in enumerate(BAND_LABELS):
        users = [u for u in big.shown_by_user if band_of[u] == label]
        shown = sum(big.shown_by_user[u] for u in users)
        flags = sum(big.flags_by_user[u] for u in users)
        expected = sum(rate[u] * big.shown_by_user[u] for u in users)
        # Poisson noise plus 5% for repeats, which are flagged by Property 1 rather than by r_u
        assert abs(flags - expected) <= Z * math.sqrt(expected) + 0.05 * expected, (label, flags, expected)
        lo, hi = BAND_EDGES[b], (BAND_EDGES[b + 1] if b < 3 else 1.0)
        assert lo <= flags / shown < hi, (label, flags / shown)


def test_rate_multiplier_scales_flags():
    cfg = WorldConfig(seed=12, n_users=300, n_items=20_000, n_slates=3_000, rate_multiplier=10.0, repeat_share=0.0)
    rate = build_world(cfg).rates()
    shown, flags = Counter(), 0
    for topic, ev in generate_events(cfg):
        if topic == "impressions":
            shown[ev["user_id"]] += len(ev["items"])
        flags += topic == "flags"
    expected = sum(10.0 * rate[u] * n for u, n in shown.items())
    # per-user scales solve E[min(1, c·exp(γz))] = 10·r_u, so the cap costs nothing;
    # 3% for the histogram used to solve them
    assert abs(flags - expected) <= Z * math.sqrt(expected) + 0.03 * expected, (flags, expected)


def test_about_21_percent_of_views_have_zero_watch_time(big):
    assert _binom_ok(big.zero_watch, big.watch, 0.21), big.zero_watch / big.watch
    assert big.watch == big.views, "every shown item is viewed once"


def test_about_2_6_percent_of_views_are_repeats(big):
    assert _binom_ok(big.repeats, big.eligible_slots, 0.026), big.repeats / big.eligible_slots
    assert 0.022 < big.repeats / big.views < 0.027  # the headline figure, diluted by first slates


def test_flagged_and_unflagged_items_have_the_same_watch_distribution(big):
    f, u = np.asarray(big.first_w_flagged), np.asarray(big.first_w_unflagged)
    assert len(f) > 300
    assert stats.ks_2samp(f, u).pvalue > 1e-3
    # both zero-inflated, with a share watched beyond full length (lingering)
    for x in (f, u):
        assert 0.15 < (x == 0).mean() < 0.28 and 0.05 < (x > 100).mean() < 0.5


def test_property1_high_watch_unflagged_items_are_rarely_flagged_on_repeat(big):
    c = big.config
    assert big.rep_hi > 2_000 and big.rep_zero > 1_000
    hi_bound = c.reflag_unflagged * math.exp(-50 / c.reflag_scale)
    assert big.rep_hi_flagged <= stats.poisson.ppf(0.99999, big.rep_hi * hi_bound)
    assert big.rep_hi_flagged / big.rep_hi < 1e-3
    # zero first watch: re-flagged at reflag_unflagged, visibly more often
    mu = big.rep_zero * c.reflag_unflagged
    lo, hi = stats.poisson.ppf([1e-5, 1 - 1e-5], mu)
    assert lo <= big.rep_zero_flagged <= hi, (big.rep_zero_flagged, mu)


def test_score_informativeness_orders_flags(big):
    auc = _auc(big.score_unflagged, big.score_flagged)
    assert auc > 0.75, auc  # higher score = safer
    cfg = WorldConfig(seed=11, n_users=300, n_slates=8_000, informativeness=0.0)
    s = summarise(cfg)
    n1, n2 = len(s.score_unflagged), len(s.score_flagged)
    sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))  # Mann-Whitney AUC under no association
    assert abs(_auc(s.score_unflagged, s.score_flagged) - 0.5) < Z * sd


def _auc(neg_higher: list, pos: list) -> float:
    return stats.mannwhitneyu(neg_higher, pos).statistic / (len(neg_higher) * len(pos))


def test_holdout_share(big):
    assert _binom_ok(big.holdout, big.slates, big.config.holdout_share)
    n = 0
    for topic, ev in generate_events(WorldConfig(seed=1, n_users=20, n_items=1_000, n_slates=300, holdout_share=1.0)):
        if topic == "impressions":
            assert ev["policy_applied"] is False and len(ev["items"]) == ev["k"]
            n += 1
    assert n == 300


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        WorldConfig(holdout_share=1.5)
    with pytest.raises(ValueError):
        WorldConfig(band_shares=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError):
        list(generate_events(WorldConfig(seed=1), build_world(WorldConfig(seed=2))))


# ----------------------------------------------------------------- tests: streaming and files


def test_streaming_state_does_not_grow_with_the_stream():
    """tracemalloc peak over 600 vs 2,400 slates: retaining the extra ~20k events would add > 5 MB.

    At 0.5 slates/s a batch of 256 slates spans longer than a viewing session, so
    the events carried over between batches (bounded by session length × rate)
    are already at their maximum after the first batches.
    """
    cfg = WorldConfig(seed=4, n_users=300, n_items=20_000, k=10, slates_per_second=0.5, batch_slates=256)
    peaks = []
    for n in (600, 2_400):
        tracemalloc.start()
        for _ in generate_events(WorldConfig(**{**cfg.__dict__, "n_slates": n})):
            pass
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 1e6, peaks


def test_a_million_events_stream_in_bounded_memory():
    """Max RSS of a child generating ~1e6 events vs 1e5: the difference stays small."""
    code = textwrap.dedent("""
        import resource, sys, time
        from calibration.synthetic import WorldConfig, generate_events
        n = 0
        t = time.perf_counter()
        for _ in generate_events(WorldConfig(seed=9, n_slates=int(sys.argv[1]))):
            n += 1
        print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)
    """)
    out = {}
    for slates in (5_000, 48_000):
        res = subprocess.run([sys.executable, "-c", code, str(slates)], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        n, rss_kb, secs = res.stdout.split()
        out[slates] = (int(n), int(rss_kb), float(secs))
    assert out[48_000][0] >= 1_000_000
    # retaining a million events would take > 500 MB
    assert out[48_000][1] - out[5_000][1] < 40_000, out


def test_jsonl_round_trip(tmp_path):
    cfg = WorldConfig(seed=6, n_users=30, n_items=1_000, n_slates=200, constraint_user_share=0.5)
    events = list(generate_events(cfg))
    for name, progress in (("ev.jsonl", False), ("ev.jsonl.gz", True)):
        p = tmp_path / name
        assert write_jsonl(iter(events), p, progress=progress, total=len(events)) == len(events)
        back = list(read_jsonl(p))
        assert back == events
    lines = (tmp_path / "ev.jsonl").read_bytes().splitlines()
    assert len(lines) == len(events)
    assert all(line.startswith(b'{"topic":"') and b'","value":{"event_id":"' in line for line in lines)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"topic": "watch", "value": {}}\n\n[1, 2]\n')
    with pytest.raises(EventFileError, match=":3:"):
        list(read_jsonl(bad))


def test_command_line_writes_a_stream_with_overrides(tmp_path):
    from streams.synthetic_io import main

    out = tmp_path / "demo.jsonl"
    assert main([str(out), "--slates", "300", "--seed", "4", "--set", "holdout_share=1.0",
                 "--set", "n_users=40", "--quiet"]) == 0
    events = list(read_jsonl(out))
    imps = [ev for t, ev in events if t == "impressions"]
    assert len(imps) == 300 and not any(ev["policy_applied"] for ev in imps)
    assert events == list(generate_events(WorldConfig(seed=4, n_slates=300, holdout_share=1.0, n_users=40)))
    with pytest.raises(SystemExit):
        main([str(out), "--set", "no_such_field=1"])


def test_command_line_refuses_a_bad_value_or_log_with_status_2_and_writes_nothing(tmp_path, capsys):
    from streams.synthetic_io import main

    out = tmp_path / "never.jsonl"
    log = tmp_path / "slice.tsv"
    log.write_text("user_id\tvideo_id\ttime_ms\tplay_time_ms\tduration_ms\tlabel\n1\t2\tnoon\t5\t10\t1\n")
    for argv, says in [(["--set", "holdout_share=abc"], "--set holdout_share=abc: the value is not JSON"),
                       (["--set", "holdout_share=5"], "bad world: holdout_share must be in [0, 1]"),
                       (["--kuairand", str(log)], f"{log}:2: could not convert string to float: 'noon'")]:
        with pytest.raises(SystemExit) as exit_:
            main([str(out), "--quiet", *argv])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
        assert not out.exists()
