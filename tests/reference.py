"""Brute-force reference for the calibration core: plain loops, no vectorisation.

Written from SPEC §4–5 directly, sharing nothing with ``calibration`` but the
comparison slack (``calibration.threshold.tolerance``). The binomial tail comes
from ``scipy.stats.binom`` rather than ``scipy.special.bdtr`` as in the core.
"""

from __future__ import annotations

import math

from scipy import stats

from calibration.threshold import tolerance


def slate_curve(scores, flags, k, pool, grid, strategy, loss):
    """r̃(λ) at every grid point for one slate, by the definitions."""
    raw = []
    for lam in grid:
        a = sum(1 for s in scores if s >= lam)
        f = sum(1 for s, h in zip(scores, flags) if s >= lam and h)
        if loss == "per_slot":
            den = k
        elif strategy == "remove":
            den = a
        else:
            den = min(k, a + pool)
        raw.append(f / den if den > 0 else 0.0)
    curve = list(raw)
    for g in range(len(curve) - 2, -1, -1):
        curve[g] = max(curve[g], curve[g + 1])
    return curve


def window_sum(slates, grid, strategy, loss):
    """S(λ) = Σ_j r̃_j(λ), summed in slate order."""
    S = [0.0] * len(grid)
    for s in slates:
        c = slate_curve(s.scores, s.flags, s.k, s.pool, grid, strategy, loss)
        for g in range(len(grid)):
            S[g] += c[g]
    return S


def hb_p(risk_hat, n, alpha, tol):
    """Hoeffding–Bentkus p-value, scalar, from the formula of Bates et al. (2021)."""
    m = min(risk_hat, alpha)

    def xlogy(x, y):
        return 0.0 if x == 0 else x * math.log(x / y)

    h1 = xlogy(m, alpha) + xlogy(1 - m, 1 - alpha)
    hoeffding = math.exp(-n * h1)
    bentkus = math.e * stats.binom.cdf(math.ceil(n * risk_hat - tol), n, alpha)
    return min(hoeffding, bentkus, 1.0)


def lambda_hat(slates, grid, alphas, strategy, loss="fraction", guarantee="expectation", delta=None):
    """Index of λ̂ on the grid for each α (``len(grid) - 1`` = filter all)."""
    n = len(slates)
    last = len(grid) - 1
    S = window_sum(slates, grid, strategy, loss)
    tol = tolerance(n)
    out = []
    for alpha in alphas:
        found = last
        if n > 0:
            for g in range(last):  # finite points only, lowest first
                if guarantee == "expectation":
                    ok = S[g] + 1.0 <= alpha * (n + 1) + tol
                else:
                    ok = all(hb_p(S[h] / n, n, alpha, tol) < delta for h in range(g, last + 1))
                if ok:
                    found = g
                    break
        out.append(found)
    return out, S
