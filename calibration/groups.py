"""Calibration populations: ``global``, reporting bands, and single users (SPEC §1, §5).

A user's reporting rate is H_X = flagged / shown over the items shown to them;
following Table 1 of the paper, H_X < 0.1% is ``low`` and anything else ``high``.
Every mature holdout slate counts toward ``global``, its user's band and
``user:<id>``. A consumer uses the most specific group that has at least
``min_slates`` slates: ``user:<id>`` → ``band:<band>`` → ``global``.
"""

from __future__ import annotations

from typing import Mapping

__all__ = [
    "GLOBAL",
    "LOW_REPORTING_RATE",
    "band_of",
    "band_group",
    "user_group",
    "groups_for",
    "resolve_group",
    "fallback_chain",
]

GLOBAL = "global"
#: Table 1 of the paper: 60.1% of users report under 0.1% of what they see.
LOW_REPORTING_RATE = 0.001


def band_of(shown: int, flagged: int) -> str:
    """``low`` if flagged / shown < 0.1% (or nothing shown yet), else ``high``.

    Examples
    --------
    >>> band_of(0, 0), band_of(2000, 1), band_of(1000, 1)
    ('low', 'low', 'high')
    """
    if shown < 0 or flagged < 0:
        raise ValueError("counts must be non-negative")
    if shown == 0:
        return "low"
    return "low" if flagged / shown < LOW_REPORTING_RATE else "high"


def band_group(band: str) -> str:
    return f"band:{band}"


def user_group(user_id: str) -> str:
    return f"user:{user_id}"


def groups_for(user_id: str, band: str) -> tuple[str, str, str]:
    """The three populations a slate of ``user_id`` calibrates: global, band, user."""
    return (GLOBAL, band_group(band), user_group(user_id))


def fallback_chain(user_id: str, band: str) -> tuple[str, str, str]:
    """Most specific first: ``user:<id>``, ``band:<band>``, ``global``."""
    return (user_group(user_id), band_group(band), GLOBAL)


def resolve_group(user_id: str, band: str, counts: Mapping[str, int], min_slates: int) -> str:
    """The most specific group with at least ``min_slates`` slates; ``global`` otherwise.

    ``global`` is the last resort even when it is short of ``min_slates``: its λ̂
    is then conservative (with n = 0 it filters everything), never absent.

    Examples
    --------
    >>> counts = {"user:u1": 40, "band:high": 500, "global": 9000}
    >>> resolve_group("u1", "high", counts, 100)
    'band:high'
    >>> resolve_group("u1", "high", {**counts, "user:u1": 100}, 100)
    'user:u1'
    >>> resolve_group("u2", "low", counts, 100)
    'global'
    """
    for g in fallback_chain(user_id, band)[:-1]:
        if counts.get(g, 0) >= min_slates:
            return g
    return GLOBAL
