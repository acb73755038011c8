"""The controller: λ̂ for many α at once from a window's curve sum.

Given ``n`` slates and the summed monotonised curve ``S(λ) = n·R̂(λ)`` on Λ
(in the fixed point of :mod:`calibration.risk`, ``S_q = S · SCALE``):

* ``expectation`` (CRC, Theorem 1 with B = 1):
  λ̂ = min{λ ∈ Λ : n/(n+1)·R̂(λ) + 1/(n+1) ≤ α}, i.e. S(λ) + 1 ≤ α(n+1);
* ``high_probability`` (RCPS with Hoeffding–Bentkus at level δ):
  λ̂ = min{λ ∈ Λ : R̂⁺(λ') < α for every λ' ≥ λ}.

If no finite λ qualifies (or n = 0), λ̂ = +inf: filter everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from scipy import special

from .bound import hb_p_value
from .grid import Grid
from .risk import SCALE

__all__ = ["Guarantee", "GUARANTEES", "Threshold", "lambda_hat_index", "thresholds"]

Guarantee = Literal["expectation", "high_probability"]
GUARANTEES: tuple[str, ...] = ("expectation", "high_probability")

# Slack on S(λ) + 1 ≤ α(n+1), in units of one slate's risk. The fixed-point S
# is within n / (2·SCALE) of the exact rational sum, and a float reference is
# within ~1e-15·n; the slack covers both, so an exact tie S = α(n+1) - 1 (which
# happens with small n and round α) resolves the same way whoever computes it.
# Per slate it is < 3e-10 of risk: far below anything that matters.
COMPARE_TOL = 1e-9


def tolerance(n: int) -> float:
    """Slack on a window sum of ``n`` slates: COMPARE_TOL + n / SCALE."""
    return COMPARE_TOL + n / SCALE

# Grid points per binomial-tail evaluation in the RCPS search.
_BLOCK = 32


@dataclass(frozen=True)
class Threshold:
    """λ̂ for one α. ``lam`` is None exactly when ``filter_all``."""

    alpha: float
    lam: float | None
    filter_all: bool
    risk_at_lambda: float | None

    def to_dict(self) -> dict:
        """The wire form of SPEC §7."""
        return {
            "alpha": self.alpha,
            "lambda": self.lam,
            "filter_all": self.filter_all,
            "risk_at_lambda": self.risk_at_lambda,
        }


def _validate(alphas: np.ndarray, guarantee: str, delta: float | None) -> None:
    if guarantee not in GUARANTEES:
        raise ValueError(f"unknown guarantee {guarantee!r}; expected one of {GUARANTEES}")
    if alphas.ndim != 1 or not np.all((alphas > 0) & (alphas < 1)):
        raise ValueError("every alpha must lie in (0, 1)")
    if guarantee == "high_probability" and (delta is None or not 0 < delta < 1):
        raise ValueError("high_probability needs delta in (0, 1)")


def lambda_hat_index(
    sums: np.ndarray,
    n: int,
    alphas: Sequence[float],
    guarantee: Guarantee = "expectation",
    delta: float | None = None,
) -> np.ndarray:
    """Grid index of λ̂ for each α; ``len(sums) - 1`` (the +inf point) means filter all.

    ``sums`` is the fixed-point window sum S_q, non-increasing, as
    :func:`calibration.risk.window_sums` returns it.

    Examples
    --------
    >>> S = np.array([30, 12, 4, 0]) * SCALE          # n = 100 slates, Λ = (0, .5, 1, inf)
    >>> lambda_hat_index(S, 100, [0.05, 0.2, 0.5]).tolist()
    [2, 1, 0]
    """
    S = np.asarray(sums, dtype=np.float64) / SCALE
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    _validate(a, guarantee, delta)
    last = S.size - 1
    if n <= 0:
        return np.full(a.shape, last, dtype=np.int64)
    tol = tolerance(n)
    if guarantee == "expectation":
        # First g with S[g] <= α(n+1) - 1: S is non-increasing, so search -S.
        limit = a * (n + 1) - 1.0 + tol
        idx = np.searchsorted(-S, -limit, side="left")
    else:
        idx = np.array([_rcps_index(S, n, float(al), float(delta), tol) for al in a])
    return np.minimum(idx, last).astype(np.int64)


def _rcps_index(S: np.ndarray, n: int, alpha: float, delta: float, tol: float) -> int:
    """First g such that p(R̂(λ'); n, α) < δ for every λ' ≥ λ_g (a suffix-AND).

    p = min(Hoeffding, Bentkus), so "p < δ" is "Hoeffding < δ or Bentkus < δ".
    Hoeffding is cheap and is evaluated everywhere; the binomial tail only where
    Hoeffding fails, walking down from λ = +inf in blocks and stopping at the
    first failure, which is all a suffix-AND needs. Same answer as evaluating
    p everywhere, without assuming p is monotone in floating point.
    """
    risk_hat = S / n
    m = np.minimum(risk_hat, alpha)
    h1 = special.rel_entr(m, alpha) + special.rel_entr(1.0 - m, 1.0 - alpha)
    bad = np.flatnonzero(~(np.exp(-n * h1) < delta))
    j = bad.size
    while j > 0:
        block = bad[max(0, j - _BLOCK) : j]
        ok = hb_p_value(risk_hat[block], n, alpha, ceil_tol=tol) < delta
        if not ok.all():
            return int(block[np.flatnonzero(~ok)[-1]]) + 1
        j -= _BLOCK
    return 0


def thresholds(
    sums: np.ndarray,
    n: int,
    grid: Grid,
    alphas: Sequence[float],
    guarantee: Guarantee = "expectation",
    delta: float | None = None,
) -> list[Threshold]:
    """λ̂ and R̂(λ̂) for each α, in the order given.

    Examples
    --------
    >>> from calibration.grid import make_grid
    >>> g = make_grid(0, 1, 3)
    >>> [t.lam for t in thresholds(np.array([30, 12, 4, 0]) * SCALE, 100, g, [0.05, 0.2])]
    [1.0, 0.5]
    >>> thresholds(np.zeros(4), 0, g, [0.1])[0].filter_all
    True
    """
    S = np.asarray(sums, dtype=np.float64) / SCALE
    if S.size != len(grid):
        raise ValueError(f"sums has {S.size} points but the grid has {len(grid)}")
    idx = lambda_hat_index(sums, n, alphas, guarantee, delta)
    last = S.size - 1
    out = []
    for alpha, j in zip(np.atleast_1d(alphas), idx):
        filter_all = bool(j >= last)
        out.append(
            Threshold(
                alpha=float(alpha),
                lam=None if filter_all else float(grid.values[j]),
                filter_all=filter_all,
                risk_at_lambda=None if n <= 0 else float(S[j] / n),
            )
        )
    return out
