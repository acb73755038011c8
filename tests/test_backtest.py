"""Back-testing one slate: Algorithm 1 as if applied, risk, nDCG, Recall, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.backtest import (
    Accumulator, Decision, SlateMetrics, decide, evaluate, gain, ndcg_at_k, reduction, target_reduction,
)
from calibration.policy import Candidate
from calibration.risk import raw_risk
from calibration.safe_pool import SafeItem


def _slate(rng, m):
    cands = [Candidate(f"i{j}", float(rng.random()), float(m - j)) for j in range(m)]
    flags = rng.random(m) < 0.3
    return cands, flags


@pytest.mark.parametrize("strategy", ["remove", "replace"])
def test_served_risk_is_the_calibrated_raw_risk(strategy):
    """With unflagged replacements, the served slate's risk is SPEC §4's r(λ) = f / a or f / min(k, a + p).

    This is what ties the back-test to the calibration: the risk the replay
    measures is the un-monotonised curve of the same slate at λ̂.
    """
    rng = np.random.default_rng(7)
    for _ in range(300):
        k = int(rng.integers(1, 12))
        m = int(rng.integers(0, k + 1))
        cands, flags = _slate(rng, m)
        p = int(rng.integers(0, 15))
        pool = [SafeItem(f"p{j}", float(rng.random())) for j in range(p)]
        lam = float(rng.random()) if rng.random() < 0.9 else None
        d = decide(cands, k, lam, strategy, pool)
        met = evaluate(d, flags, [None] * m, [False] * d.replaced, k, [])
        scores = np.array([c.score for c in cands])
        kept = scores >= lam if lam is not None else np.zeros(m, bool)
        expected = float(raw_risk(kept.sum(), (kept & flags).sum(), k, p, strategy))
        assert met.risk == pytest.approx(expected, abs=1e-12)
        assert met.size == (kept.sum() if strategy == "remove" else min(k, kept.sum() + p))


def test_replacement_labels_and_relevance():
    cands = [Candidate("a", 0.9, 3.0), Candidate("b", 0.1, 2.0), Candidate("c", 0.8, 1.0)]
    pool = [SafeItem("x", 5.0), SafeItem("y", 1.0)]
    d = decide(cands, 3, 0.5, "replace", pool, first_pct={"x": 100.0, "y": 20.0})
    assert d.item_ids == ("a", "x", "c") and d.origin == (0, -1, 2) and d.first_pct == (None, 100.0, None)
    # the replacement was flagged later in the log: it counts
    met = evaluate(d, [False, True, False], [80.0, 0.0, 30.0], [True], 3, [0.8, 0.0, 0.3, 1.0, 0.2])
    assert met.risk == pytest.approx(1 / 3)
    assert met.reflag_unflagged == (0, 0, 0, 0)
    # unflagged: it is binned by its first-view W% for the re-flag adjustment
    met = evaluate(d, [False, True, False], [80.0, 0.0, 30.0], [False], 3, [0.8, 0.0, 0.3, 1.0, 0.2])
    assert met.risk == 0.0 and met.reflag_unflagged == (0, 0, 1, 0)
    assert met.recall == 1.0  # the only relevant item (a, W% 80) is still served
    ideal = [1.0, 0.8, 0.3]  # the relevances in their best order
    got = (0.8 + 1.0 / math.log2(3) + 0.3 / 2) / sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    assert met.ndcg == pytest.approx(got)


def test_remove_with_filter_all_serves_nothing():
    cands = [Candidate("a", 0.9, 3.0)]
    d = decide(cands, 2, None, "remove")
    met = evaluate(d, [True], [90.0], [], 2, [0.9])
    assert (met.size, met.risk, met.ndcg, met.recall) == (0, 0.0, 0.0, 0.0)


def test_ndcg_and_recall_edges():
    assert ndcg_at_k([0.3, 0.2, 0.1], [0.1, 0.2, 0.3], 3) == pytest.approx(1.0)
    assert ndcg_at_k([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], 3) < 1.0
    assert ndcg_at_k([0.0], [0.0], 1) == 0.0
    d = Decision(("a",), (0,), (None,))
    assert evaluate(d, [False], [10.0], [], 1, [0.1]).recall is None  # nothing relevant: undefined
    assert gain(-5.0) == 0.0 and gain(float("nan")) == 0.0


def test_accumulator_matches_numpy():
    rng = np.random.default_rng(3)
    ms = []
    for _ in range(200):
        size = int(rng.integers(0, 6))
        bins = tuple(int(x) for x in rng.integers(0, 2, 4)) if size else (0, 0, 0, 0)
        ms.append(SlateMetrics(float(rng.random()) * (size > 0), size, int(rng.integers(0, size + 1)),
                               float(rng.random()), None if rng.random() < 0.2 else float(rng.random()), bins))
    halves = Accumulator(), Accumulator()
    for j, m in enumerate(ms):
        halves[j % 2].add(m)
    acc = halves[0].merge(halves[1])
    q = (0.5, 0.1, 0.0, 0.0)
    s = acc.summary(k=5, q=q)
    risk = np.array([m.risk for m in ms])
    assert s.n == 200
    assert s.risk == pytest.approx(risk.mean())
    assert s.risk_se == pytest.approx(risk.std(ddof=1) / math.sqrt(200))
    assert s.recall == pytest.approx(np.mean([m.recall for m in ms if m.recall is not None]))
    adj = np.mean([m.risk + (np.dot(m.reflag_unflagged, q) / m.size if m.size else 0.0) for m in ms])
    assert s.risk_adjusted == pytest.approx(adj)
    assert s.replaced_share == pytest.approx(np.mean([m.replaced for m in ms]) / 5)
    assert math.isnan(Accumulator().summary(5).risk)


def test_reduction_axes_agree_with_the_bound():
    base = 0.06
    for alpha, risk in [(0.02, 0.019), (0.02, 0.021), (0.05, 0.05)]:
        assert (reduction(risk, base) >= target_reduction(alpha, base) - 1e-12) == (risk <= alpha)
    assert math.isnan(reduction(0.0, 0.0))
