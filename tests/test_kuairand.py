"""KuaiRand log → SPEC §2 events: slate grouping, watch/flag mapping, holdouts, scores, file reading."""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from calibration.kuairand import KuaiRandConfig, convert_rows, parse_row
from streams.kuairand_io import iter_rows, read_kuairand
from tests.test_synthetic import Z, check_event

PUBLIC_COLUMNS = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
    "comment_stay_time", "is_profile_enter", "is_rand", "tab",
]
SLICE = Path("/work/shared/data/kuairand-kcore15/processed_standard_kcore_15.tsv")
T0 = 1_649_400_000_000  # ms, 2022-04-08


def _row(user, video, t_ms, play, dur, hate=0, rand=0):
    return {"user_id": user, "video_id": video, "date": 20220408, "hourmin": 1400, "time_ms": t_ms,
            "is_click": 1, "is_like": 0, "is_follow": 0, "is_comment": 0, "is_forward": 0, "is_hate": hate,
            "long_view": int(play >= dur), "play_time_ms": play, "duration_ms": dur, "profile_stay_time": 0,
            "comment_stay_time": 0, "is_profile_enter": 0, "is_rand": rand, "tab": 1}


def _public_rows() -> list[dict]:
    """Two users, written user by user like the public logs (so not in time order)."""
    rows = []
    # user 1: 25 views 10 s apart -> slates of 20 and 5 (k = 20); hate on the 4th view
    for j in range(25):
        rows.append(_row(1, 100 + j, T0 + 10_000 * j, 4_000 + j, 8_000, hate=int(j == 3)))
    t = T0 + 250_000 + 1_000_000  # a gap > session_gap
    # three random-exposure views (a holdout slate); the middle one hated, zero duration
    rows += [_row(1, 200, t, 1_500, 9_000, rand=1), _row(1, 201, t + 5_000, 0, 0, hate=1, rand=1),
             _row(1, 202, t + 9_000, 12_000, 9_000, rand=1)]
    # back to normal traffic: a new slate; then the same video twice in a row -> split
    rows += [_row(1, 203, t + 30_000, 3_000, 9_000), _row(1, 204, t + 40_000, 3_000, 9_000),
             _row(1, 204, t + 50_000, 9_500, 9_000)]
    # user 2 interleaves in time with user 1's first slate
    rows += [_row(2, 100 + j, T0 + 5_000 + 20_000 * j, 2_000, 10_000, hate=int(j == 1)) for j in range(4)]
    return rows


def _write(path: Path, rows: list[dict], delimiter: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=PUBLIC_COLUMNS, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture()
def public_csv(tmp_path) -> Path:
    p = tmp_path / "log_standard_4_08_to_4_21_tiny.csv"
    _write(p, _public_rows(), ",")
    return p


def test_public_csv_layout_becomes_the_expected_slates(public_csv):
    assert next(csv.reader(open(public_csv))) == PUBLIC_COLUMNS
    events = list(read_kuairand(public_csv))
    for topic, ev in events:
        check_event(topic, ev)
    ts = [ev["ts"] for _, ev in events]
    assert ts == sorted(ts), "events must come out in event-time order"
    assert len({ev["event_id"] for _, ev in events}) == len(events)

    slates = {u: [ev for t, ev in events if t == "impressions" and ev["user_id"] == u] for u in ("1", "2")}
    assert [len(s["items"]) for s in slates["1"]] == [20, 5, 3, 2, 1]
    assert [s["policy_applied"] for s in slates["1"]] == [True, True, False, True, True]
    assert [len(s["items"]) for s in slates["2"]] == [4]
    assert len({s["slate_id"] for s in slates["1"] + slates["2"]}) == 6
    first = slates["1"][0]
    assert first["ts"] == pytest.approx(T0 / 1000 - 1.0) and first["k"] == 20
    assert {it["item_id"] for it in first["items"]} == {str(100 + j) for j in range(20)}
    rank = [it["rank_score"] for it in first["items"]]
    assert rank == sorted(rank, reverse=True) and rank[0] == pytest.approx(4.019)
    assert all(it["tags"] == [] and it["replacement"] is False and 0 <= it["score"] <= 1 for it in first["items"])

    watch = [ev for t, ev in events if t == "watch"]
    assert len(watch) == len(_public_rows())
    w201 = next(ev for ev in watch if ev["item_id"] == "201")
    assert (w201["watch_ms"], w201["duration_ms"]) == (0, 0)
    w103 = next(ev for ev in watch if ev["item_id"] == "103" and ev["user_id"] == "1")
    assert w103["ts"] == pytest.approx(T0 / 1000 + 30 + 4.003) and w103["watch_ms"] == 4_003

    flags = [ev for t, ev in events if t == "flags"]
    assert sorted((f["user_id"], f["item_id"]) for f in flags) == [("1", "103"), ("1", "201"), ("2", "101")]
    assert all(f["kind"] == "not_interested" for f in flags)
    f103 = next(f for f in flags if f["item_id"] == "103")
    assert f103["ts"] == pytest.approx(T0 / 1000 + 30 + 4.003 / 2)
    assert f103["ts"] < w103["ts"], "the flag is stamped mid-view, before the watch event"
    assert {t for t, _ in events} == {"impressions", "watch", "flags"}


def test_comma_and_tab_files_give_the_same_stream(public_csv, tmp_path):
    tsv = tmp_path / "same.tsv"
    _write(tsv, _public_rows(), "\t")
    assert list(read_kuairand(tsv)) == list(read_kuairand(public_csv))
    assert next(iter_rows(tsv))["is_rand"] == "0"


def test_rows_out_of_time_order_are_refused(public_csv):
    with pytest.raises(ValueError, match="time_ms order"):
        list(read_kuairand(public_csv, assume_sorted=True))
    rows = sorted(_public_rows(), key=lambda r: r["time_ms"])
    assert list(convert_rows(rows)) == list(read_kuairand(public_csv))


def test_layouts_parse_to_the_same_row():
    pub = _row(7, 9, T0, 1_200, 0, hate=1, rand=1)
    sl = {"user_id": "7", "video_id": "9", "date": "20220408", "hourmin": "1400", "time_ms": str(T0),
          "is_click": "1", "is_follow": "0", "is_comment": "0", "is_forward": "0", "long_view": "0",
          "play_time_ms": "1200", "duration_ms": "0", "comment_stay_time": "0", "is_profile_enter": "0",
          "label": "0", "timestamp": "2022-04-08 14:00:00"}
    a, b = parse_row({k: str(v) for k, v in pub.items()}), parse_row(sl)
    assert (a.user, a.video, a.t, a.play_ms, a.duration_ms, a.hate) == (b.user, b.video, b.t, b.play_ms, b.duration_ms, b.hate)
    assert a.rand is True and b.rand is None
    assert parse_row({**sl, "label": "1"}).hate is False
    assert parse_row({**sl, "duration_ms": "-5"}).duration_ms == 0  # would be malformed downstream


def _single_view_rows(n: int, hate_share: float, seed: int, with_rand: bool) -> list[dict]:
    """n views, each its own slate (an hour apart per user), some hated."""
    rng = np.random.default_rng(seed)
    hate = rng.random(n) < hate_share
    rows = []
    for j in range(n):
        r = _row(j % 50, 10_000 + j, T0 + 3_600_000 * (j // 50) + j, 3_000, 6_000, hate=int(hate[j]))
        if not with_rand:
            del r["is_rand"]
        rows.append(r)
    return rows


def _auc_of(events) -> tuple[float, int, int]:
    events = list(events)
    flagged = {(ev["user_id"], ev["item_id"]) for t, ev in events if t == "flags"}
    pos, neg = [], []
    for t, ev in events:
        if t == "impressions":
            for it in ev["items"]:
                (pos if (ev["user_id"], it["item_id"]) in flagged else neg).append(it["score"])
    return stats.mannwhitneyu(neg, pos).statistic / (len(pos) * len(neg)), len(neg), len(pos)


def test_noisy_label_score_has_the_configured_informativeness():
    rows = _single_view_rows(4_000, 0.2, seed=1, with_rand=True)
    for rho in (1.0, 0.5):
        auc, n1, n2 = _auc_of(convert_rows(rows, KuaiRandConfig(informativeness=rho, seed=3)))
        target = stats.norm.cdf(rho * 4.0 / math.sqrt(2))  # AUC of two unit normals δρ apart
        se = math.sqrt(target * (1 - target) * (1 / n1 + 1 / n2) * 2)  # generous Hanley-McNeil-like bound
        assert abs(auc - target) < Z * se + 0.01, (rho, auc, target)
    auc, n1, n2 = _auc_of(convert_rows(rows, KuaiRandConfig(informativeness=0.0, seed=3)))
    assert abs(auc - 0.5) < Z * math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


def test_holdout_follows_is_rand_else_a_seeded_share():
    rows = _single_view_rows(4_000, 0.0, seed=2, with_rand=False)
    imps = [ev for t, ev in convert_rows(rows, KuaiRandConfig(holdout_share=0.3, seed=5)) if t == "impressions"]
    assert len(imps) == 4_000
    held = sum(not ev["policy_applied"] for ev in imps)
    assert abs(held - 1_200) <= Z * math.sqrt(4_000 * 0.3 * 0.7)
    # "share" also overrides an is_rand column that is present (here all zero)
    with_rand = _single_view_rows(4_000, 0.0, seed=2, with_rand=True)
    share = [ev["policy_applied"] for t, ev in convert_rows(with_rand, KuaiRandConfig(holdout="share", holdout_share=0.3, seed=5))
             if t == "impressions"]
    assert share == [ev["policy_applied"] for ev in imps]
    again = [ev for t, ev in convert_rows(rows, KuaiRandConfig(holdout_share=0.3, seed=5)) if t == "impressions"]
    assert [e["policy_applied"] for e in again] == [e["policy_applied"] for e in imps]
    rand_rows = _single_view_rows(200, 0.0, seed=2, with_rand=True)
    for r in rand_rows[::3]:
        r["is_rand"] = 1
    imps = [ev for t, ev in convert_rows(rand_rows, KuaiRandConfig(holdout_share=0.3)) if t == "impressions"]
    assert sum(not ev["policy_applied"] for ev in imps) == len(rand_rows[::3])
    assert [not ev["policy_applied"] for ev in imps] == [r["is_rand"] == 1 for r in rand_rows]
    imps = [ev for t, ev in convert_rows(rand_rows, KuaiRandConfig(holdout="all")) if t == "impressions"]
    assert len(imps) == 200 and not any(ev["policy_applied"] for ev in imps)
    with pytest.raises(ValueError):
        KuaiRandConfig(holdout="sometimes")


def test_causal_item_rate_uses_only_earlier_labels():
    a, b = 1.0, 99.0
    rows = [_row(1, 5, T0, 3_000, 6_000)]
    rows += [_row(u, 5, T0 + 100_000 + 1_000 * u, 3_000, 6_000, hate=1) for u in range(2, 7)]
    rows += [_row(7, 5, T0 + 5_000_000, 3_000, 6_000)]
    events = list(convert_rows(rows, KuaiRandConfig(score_model="causal_item_rate", prior_hates=a, prior_views=b)))
    score = {ev["user_id"]: ev["items"][0]["score"] for t, ev in events if t == "impressions"}
    assert score["1"] == pytest.approx(1 - a / (a + b))  # its own and later hates must not leak in
    assert score["7"] == pytest.approx(1 - (5 + a) / (6 + a + b))  # six earlier views, five hated
    assert all(score[str(u)] >= score["7"] for u in range(2, 7))


def test_first_rows_of_the_shipped_slice():
    if not SLICE.exists():
        pytest.skip("shipped KuaiRand slice not present")
    n = 400
    raw = list(itertools.islice(iter_rows(SLICE), n))
    assert "label" in raw[0] and "is_hate" not in raw[0]
    events = list(read_kuairand(SLICE, KuaiRandConfig(seed=1), limit=n))
    counts = Counter(t for t, _ in events)
    for topic, ev in events:
        check_event(topic, ev)
    assert counts["watch"] == n
    assert counts["flags"] == sum(r["label"] == "0" for r in raw)
    assert sum(len(ev["items"]) for t, ev in events if t == "impressions") == n
    ts = [ev["ts"] for _, ev in events]
    assert ts == sorted(ts)
    zero = [ev for t, ev in events if t == "watch" and ev["duration_ms"] == 0]
    assert zero, "the slice has zero-duration videos; they must pass through as 0"
    watch = {(ev["user_id"], ev["item_id"], ev["watch_ms"]) for t, ev in events if t == "watch"}
    assert {(r["user_id"], r["video_id"], int(r["play_time_ms"])) for r in raw} == watch


@pytest.mark.parametrize("assume_sorted", [False, True])
def test_a_row_the_converter_cannot_read_is_named_by_its_line(tmp_path, assume_sorted):
    from streams.kuairand_io import KuaiRandFileError

    rows = sorted(_public_rows(), key=lambda r: r["time_ms"])
    p = tmp_path / "bad.csv"
    _write(p, rows, ",")
    lines = p.read_text().splitlines()
    lines[5] = lines[5].replace(str(rows[4]["time_ms"]), "soon")  # line 6: the 5th row
    lines.insert(3, "")  # a blank line is skipped, and still counted
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(KuaiRandFileError, match=rf"^{p}:7: could not convert string to float: 'soon'$"):
        list(read_kuairand(p, assume_sorted=assume_sorted))
    p.write_text("user_id,video_id,time_ms\n1,2,3\n")
    with pytest.raises(KuaiRandFileError, match=rf"^{p}:2: row has neither is_hate"):
        list(read_kuairand(p, assume_sorted=assume_sorted))


def test_a_line_that_is_not_utf8_is_named_by_its_line(tmp_path):
    from streams.kuairand_io import KuaiRandFileError

    p = tmp_path / "latin1.tsv"
    p.write_bytes(b"user_id\tvideo_id\ttime_ms\tplay_time_ms\tduration_ms\tlabel\n"
                  b"1\t2\t1649581149287\t5\t10\t1\n1\t3\t16495811492\xe987\t5\t10\t1\n")
    with pytest.raises(KuaiRandFileError, match=rf"^{p}:3: not UTF-8"):
        list(read_kuairand(p))
