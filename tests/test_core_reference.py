"""The vectorised core against the brute-force reference on many random slate sets."""

import numpy as np
import pytest

from calibration.grid import make_grid
from calibration.risk import SCALE, fold, risk_curves, window_sums
from calibration.threshold import lambda_hat_index
from calibration.toy import toy_batch

from . import reference as ref

STRATEGIES = ["remove", "replace"]
LOSSES = ["fraction", "per_slot"]


def _grids():
    yield make_grid(0.0, 1.0, 41)
    yield make_grid(0.2, 0.9, 17)
    # explicit values, some of them equal to item scores below
    yield make_grid(values=[0.0, 0.125, 0.25, 0.3, 0.5, 0.75, 0.8, 1.0])


def _case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    m = int(rng.integers(1, 8))
    b = toy_batch(rng, n, m=m, k=m + int(rng.integers(0, 3)), rate=float(rng.uniform(0.02, 0.4)),
                  informativeness=float(rng.uniform(0, 1)), pool_mean=float(rng.uniform(0, 4)),
                  ragged=bool(rng.integers(0, 2)))
    if n and rng.random() < 0.5:
        # Put scores on grid points and make ties: the edge cases of "s ≥ λ".
        snapped = np.round(b.scores * 8) / 8
        shown = np.isfinite(b.scores)
        b.scores[shown] = snapped[shown]
    return b


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_curves_and_sums_match_reference(seed, strategy):
    b = _case(seed)
    for grid in _grids():
        for loss in LOSSES:
            dense = risk_curves(b, grid, strategy, loss)
            slates = b.slates()
            for j, s in enumerate(slates):
                want = ref.slate_curve(s.scores, s.flags, s.k, s.pool, grid.values, strategy, loss)
                np.testing.assert_allclose(dense[j], want, rtol=0, atol=1e-12)
            S_ref = ref.window_sum(slates, grid.values, strategy, loss)
            S = window_sums(fold(b, grid, strategy, loss)) / SCALE
            # fixed point: each slate's curve is within 2**-33 of the exact value
            np.testing.assert_allclose(S, S_ref, rtol=0, atol=len(b) / SCALE + 1e-12)


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("guarantee", ["expectation", "high_probability"])
def test_lambda_hat_identical_to_reference(seed, strategy, guarantee):
    b = _case(1000 + seed)
    rng = np.random.default_rng(seed)
    # Round α values make exact ties S = α(n+1) - 1 possible: the hard case.
    alphas = sorted({0.05, 0.1, 0.2, 0.25, 0.5, float(rng.uniform(0.01, 0.6))})
    delta = 0.1
    for grid in _grids():
        for loss in LOSSES:
            want, _ = ref.lambda_hat(b.slates(), grid.values, alphas, strategy, loss, guarantee, delta)
            got = lambda_hat_index(window_sums(fold(b, grid, strategy, loss)), len(b), alphas, guarantee, delta)
            assert got.tolist() == want, (grid.values, loss)


def test_exact_tie_resolves_as_reference():
    # n = 3 slates with remove-risk 1/2 each at low λ: S = 1.5 = α(n+1) - 1 for α = 0.625.
    from calibration.slates import Slate, SlateBatch

    grid = make_grid(0, 1, 3)
    b = SlateBatch.from_slates([Slate((0.1, 0.9), (True, False), k=2)] * 3)
    want, S = ref.lambda_hat(b.slates(), grid.values, [0.625, 0.6], "remove")
    assert S[0] == 1.5
    assert want == [0, 1]
    assert lambda_hat_index(window_sums(fold(b, grid, "remove")), 3, [0.625, 0.6]).tolist() == want
