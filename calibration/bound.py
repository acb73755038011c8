"""Upper confidence bounds for a mean risk in [0, 1]: the Hoeffding–Bentkus bound.

Bates et al. (2021), "Distribution-free, risk-controlling prediction sets", §3.
For n i.i.d. losses in [0, 1] with empirical mean r̂, the HB p-value of the null
"true risk ≥ α" is

    p(r̂; n, α) = min( exp(-n · h₁(min(r̂, α), α)),  e · P[Binom(n, α) ≤ ⌈n r̂⌉] ),
    h₁(a, b)   = a log(a/b) + (1 - a) log((1 - a)/(1 - b)),

and the upper confidence bound is R̂⁺ = sup{R : p(r̂; n, R) ≥ δ}. ``R̂⁺ < α`` holds
exactly when ``p(r̂; n, α) < δ``, which is what the threshold search uses: no
root-finding on the hot path.
"""

from __future__ import annotations

import numpy as np
from scipy import special

__all__ = ["hb_p_value", "hb_ucb"]

# Tolerance on n·r̂ before taking the ceiling: a sum of fractions that should be
# the integer 3 may come out as 3.0000000000000004, and ⌈·⌉ would jump to 4.
_CEIL_TOL = 1e-9


def hb_p_value(risk_hat, n: int, alpha, ceil_tol: float = _CEIL_TOL) -> np.ndarray:
    """Hoeffding–Bentkus p-value of H₀: risk ≥ α, given empirical risk ``risk_hat`` over ``n``.

    Broadcasts over ``risk_hat`` and ``alpha``. With ``n = 0`` the p-value is 1.

    Examples
    --------
    >>> round(float(hb_p_value(0.0, 100, 0.1)), 6)    # (1 - α)^n
    2.7e-05
    >>> float(hb_p_value(0.2, 100, 0.1))
    1.0
    """
    r = np.clip(np.asarray(risk_hat, dtype=np.float64), 0.0, 1.0)
    a = np.asarray(alpha, dtype=np.float64)
    if n <= 0:
        return np.ones(np.broadcast(r, a).shape)
    m = np.minimum(r, a)
    h1 = special.rel_entr(m, a) + special.rel_entr(1.0 - m, 1.0 - a)
    hoeffding = np.exp(-n * h1)
    kk = np.ceil(n * r - ceil_tol)
    bentkus = np.e * special.bdtr(kk, n, a)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def hb_ucb(risk_hat: float, n: int, delta: float, tol: float = 1e-10) -> float:
    """R̂⁺ = sup{R ∈ [r̂, 1] : p(r̂; n, R) ≥ δ}, by bisection (p falls as R grows).

    For reporting; the threshold search itself only needs :func:`hb_p_value`.

    Examples
    --------
    >>> u = hb_ucb(0.05, 1000, 0.1)
    >>> 0.05 < u < 0.07
    True
    """
    if n <= 0:
        return 1.0
    lo, hi = float(np.clip(risk_hat, 0.0, 1.0)), 1.0
    if hb_p_value(risk_hat, n, hi - 1e-15) >= delta:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if hb_p_value(risk_hat, n, mid) >= delta:
            lo = mid
        else:
            hi = mid
    return hi
