"""Back-testing a threshold on a later holdout slate "as if the policy had been applied".

A holdout slate was served unfiltered, so every shown item has a label. To ask
what λ̂ would have done, we re-run Algorithm 1 (:func:`calibration.policy.apply_policy`)
on the slate's items in their served order, with the user's safe pool and
blocked tags as they were when the slate was served, and score the result:

* **risk** (SPEC §4, Eq. 5): r = (flagged served items) / |served|, 0 when nothing
  is served. A kept item's label is its slate label (flagged by the maturity
  cutoff). A replacement's label is what the log says: flagged by the user
  at or before the cutoff (the safe pool only holds items unflagged at serve
  time, so such a flag came later, typically from a real repeat view).
* **re-flag-adjusted risk**: the log cannot say whether a replacement that was
  never re-shown *would* have been flagged. The adjusted risk counts each such
  replacement as flagged with probability q(b), the re-flag rate of real repeat
  views whose first-view W% fell in the same bin b (:data:`REFLAG_BINS`),
  measured on the same log: r_adj = (f + Σ_replacements q(b)) / |served|.
  This is the figure that can show Property 1 failing (the β ablation).
* **nDCG@k**: gain g = min(W%, 100) / 100 with W% the user's watch of the item
  on *this* view (0 if not watched by the cutoff); for a replacement, its
  first-view W% (the paper reuses the original watch time).
  nDCG = Σ_j g_j / log2(j + 1) / IDCG, with IDCG the same sum over the k best
  gains of (original items ∪ the user's safe pool at serve time), so it is
  comparable across strategies and α of one safe-pool rule.
* **Recall@k**: share of the slate's relevant original items (this-view
  W% ≥ ``relevant_pct``) still served; undefined (skipped) when there are none.
  Replacements never count as relevant (as the paper's test set holds unseen items only).
* **size** |served| and **replaced** (number of safe-pool fills).

Everything here is pure: the replay (:mod:`streams.replay`) feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .policy import Candidate, apply_policy
from .safe_pool import SafeItem

__all__ = [
    "ABLATION_BETAS",
    "REFLAG_BINS",
    "Decision",
    "SlateMetrics",
    "Accumulator",
    "Summary",
    "gain",
    "reflag_bin",
    "decide",
    "evaluate",
    "ndcg_at_k",
    "reduction",
    "target_reduction",
    "beta_label",
]

#: The β arms of the paper's Fig. 5: W% > 0 %, 50 %, 100 %, and no watch-time rule.
ABLATION_BETAS: tuple[float | None, ...] = (0.0, 50.0, 100.0, None)
#: First-view W% bins for the re-flag rate q(b): unwatched or unknown, (0, 50], (50, 100], > 100.
REFLAG_BINS = ("zero_or_unknown", "0-50", "50-100", ">100")


def beta_label(beta: float | None) -> str:
    """``"0%"``, ``"50%"``, ``"none"``: how a β arm is named in outputs."""
    return "none" if beta is None else f"{beta:g}%"


def gain(pct: float | None) -> float:
    """Graded relevance g = min(max(W%, 0), 100) / 100; 0 when W% is unknown.

    Examples
    --------
    >>> gain(50.0), gain(250.0), gain(None)
    (0.5, 1.0, 0.0)
    """
    if pct is None or not math.isfinite(pct):
        return 0.0
    return min(max(float(pct), 0.0), 100.0) / 100.0


def reflag_bin(pct: float | None) -> int:
    """Index into :data:`REFLAG_BINS` of a first-view W%.

    Examples
    --------
    >>> [reflag_bin(p) for p in (None, 0.0, 30.0, 100.0, 180.0)]
    [0, 0, 1, 2, 3]
    """
    if pct is None or pct <= 0:
        return 0
    if pct <= 50:
        return 1
    if pct <= 100:
        return 2
    return 3


@dataclass(frozen=True)
class Decision:
    """What Algorithm 1 would have served for one slate at one λ̂.

    ``origin[j]`` is the index of served item j in the original slate, or -1 for
    a replacement; ``item_ids`` and ``first_pct`` (first-view W% of a
    replacement, None for original items) run along the served order.
    """

    item_ids: tuple[str, ...]
    origin: tuple[int, ...]
    first_pct: tuple[float | None, ...]

    @property
    def size(self) -> int:
        return len(self.item_ids)

    @property
    def replaced(self) -> int:
        return sum(1 for o in self.origin if o < 0)


def decide(
    candidates: Sequence[Candidate],
    k: int,
    lam: float | None,
    strategy: str,
    pool: Sequence[SafeItem] = (),
    blocked_tags: Iterable[str] = (),
    first_pct: Mapping[str, float | None] | None = None,
) -> Decision:
    """Run :func:`apply_policy` on a served slate and remember where each served item came from.

    Examples
    --------
    >>> c = [Candidate("a", 0.9, 3.0), Candidate("b", 0.1, 2.0)]
    >>> d = decide(c, 2, 0.5, "replace", [SafeItem("x", 1.0)], first_pct={"x": 80.0})
    >>> d.item_ids, d.origin, d.first_pct, d.replaced
    (('a', 'x'), (0, -1), (None, 80.0), 1)
    """
    served = apply_policy(candidates, k, lam, strategy, pool, blocked_tags)
    index = {c.item_id: j for j, c in enumerate(candidates[:k])}
    pcts = first_pct or {}
    origin = tuple(-1 if s.replacement else index[s.item_id] for s in served)
    return Decision(
        tuple(s.item_id for s in served),
        origin,
        tuple(pcts.get(s.item_id) if s.replacement else None for s in served),
    )


@dataclass(frozen=True)
class SlateMetrics:
    """One slate's figures under one decision (see the module docstring)."""

    risk: float
    size: int
    replaced: int
    ndcg: float
    recall: float | None
    reflag_unflagged: tuple[int, int, int, int]  # replacements not seen flagged, per REFLAG_BINS


def _dcg(gains: Sequence[float]) -> float:
    g = np.asarray(gains, dtype=np.float64)
    if g.size == 0:
        return 0.0
    return float(np.sum(g / np.log2(np.arange(2, g.size + 2))))


def ndcg_at_k(gains: Sequence[float], ideal_pool: Sequence[float], k: int) -> float:
    """nDCG@k = Σ_{j≤k} g_j / log2(j+1) / Σ_{j≤k} g*_j / log2(j+1), g* = ``ideal_pool`` sorted; 0 if IDCG = 0.

    Examples
    --------
    >>> ndcg_at_k([1.0, 0.0], [1.0, 0.0], 2), round(ndcg_at_k([0.0, 1.0], [1.0, 0.0], 2), 4)
    (1.0, 0.6309)
    """
    ideal = _dcg(sorted(ideal_pool, reverse=True)[:k])
    return 0.0 if ideal <= 0 else _dcg(list(gains)[:k]) / ideal


def evaluate(
    decision: Decision,
    flags: Sequence[bool],
    view_pct: Sequence[float | None],
    replacement_flagged: Sequence[bool],
    k: int,
    ideal_pool: Sequence[float],
    relevant_pct: float = 50.0,
) -> SlateMetrics:
    """Score one decision against the slate's labels.

    ``flags``/``view_pct`` run along the original slate (label and this-view W%);
    ``replacement_flagged`` along the decision's replacements, in served order.

    Examples
    --------
    >>> d = Decision(("a", "x"), (0, -1), (None, 100.0))
    >>> m = evaluate(d, [False, True], [60.0, 10.0], [False], 2, [0.6, 0.1, 1.0])
    >>> m.risk, m.size, m.replaced, m.recall, round(m.ndcg, 3)
    (0.0, 2, 1, 1.0, 0.893)
    """
    flagged = 0
    gains = []
    counts = [0, 0, 0, 0]
    reps = iter(replacement_flagged)
    for o, pct in zip(decision.origin, decision.first_pct):
        if o >= 0:
            flagged += bool(flags[o])
            gains.append(gain(view_pct[o]))
        else:
            h = bool(next(reps))
            flagged += h
            if not h:
                counts[reflag_bin(pct)] += 1
            gains.append(gain(pct))
    size = decision.size
    relevant = [j for j, p in enumerate(view_pct) if p is not None and p >= relevant_pct]
    kept = {o for o in decision.origin if o >= 0}
    recall = None if not relevant else sum(1 for j in relevant if j in kept) / len(relevant)
    return SlateMetrics(
        risk=flagged / size if size else 0.0,
        size=size,
        replaced=decision.replaced,
        ndcg=ndcg_at_k(gains, ideal_pool, k),
        recall=recall,
        reflag_unflagged=tuple(counts),  # type: ignore[arg-type]
    )


# Columns of an Accumulator row.
_N, _RISK, _RISK2, _SIZE, _REPLACED, _NDCG, _RECALL, _NRECALL = range(8)
_BINS = 8  # then len(REFLAG_BINS) columns of Σ (unflagged replacements in bin b) / |served|
_WIDTH = _BINS + len(REFLAG_BINS)


class Accumulator:
    """Running sums of :class:`SlateMetrics`: O(1) memory per population.

    Examples
    --------
    >>> a = Accumulator()
    >>> a.add(SlateMetrics(0.5, 2, 0, 1.0, None, (0, 0, 0, 0)))
    >>> a.add(SlateMetrics(0.0, 4, 2, 0.5, 1.0, (1, 0, 1, 0)))
    >>> s = a.summary(k=4, q=(0.5, 0.0, 0.0, 0.0))
    >>> s.n, s.risk, s.size, s.recall, s.risk_adjusted, s.replaced_share
    (2, 0.25, 3.0, 1.0, 0.3125, 0.25)
    """

    __slots__ = ("sums",)

    def __init__(self, sums: np.ndarray | None = None):
        self.sums = np.zeros(_WIDTH) if sums is None else np.asarray(sums, dtype=np.float64).copy()

    def add(self, m: SlateMetrics) -> None:
        s = self.sums
        s[_N] += 1
        s[_RISK] += m.risk
        s[_RISK2] += m.risk * m.risk
        s[_SIZE] += m.size
        s[_REPLACED] += m.replaced
        s[_NDCG] += m.ndcg
        if m.recall is not None:
            s[_RECALL] += m.recall
            s[_NRECALL] += 1
        if m.size:
            s[_BINS:] += np.asarray(m.reflag_unflagged, dtype=np.float64) / m.size

    def merge(self, other: "Accumulator") -> "Accumulator":
        self.sums += other.sums
        return self

    @property
    def n(self) -> int:
        return int(self.sums[_N])

    def summary(self, k: int, q: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> "Summary":
        """Means over slates; ``q`` are the re-flag rates per :data:`REFLAG_BINS`."""
        s = self.sums
        n = s[_N]
        if n == 0:
            nan = float("nan")
            return Summary(0, nan, nan, nan, nan, nan, nan, nan, nan)
        risk = s[_RISK] / n
        var = max(0.0, s[_RISK2] / n - risk * risk) * n / max(n - 1, 1)
        adjusted = risk + float(np.dot(s[_BINS:], np.asarray(q, dtype=np.float64))) / n
        return Summary(
            n=int(n),
            risk=float(risk),
            risk_se=float(math.sqrt(var / n)),
            risk_adjusted=float(adjusted),
            size=float(s[_SIZE] / n),
            replaced=float(s[_REPLACED] / n),
            replaced_share=float(s[_REPLACED] / n / k),
            ndcg=float(s[_NDCG] / n),
            recall=float(s[_RECALL] / s[_NRECALL]) if s[_NRECALL] else float("nan"),
        )


@dataclass(frozen=True)
class Summary:
    """Means over a population of evaluated slates (``risk_se``: standard error of ``risk``)."""

    n: int
    risk: float
    risk_se: float
    risk_adjusted: float
    size: float
    replaced: float
    replaced_share: float  # mean replacements / k
    ndcg: float
    recall: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def reduction(risk: float, base: float) -> float:
    """Realised reduction 1 − R / R_base (nan when R_base = 0).

    Examples
    --------
    >>> reduction(0.02, 0.08)
    0.75
    """
    return float("nan") if not base > 0 else 1.0 - risk / base


def target_reduction(alpha: float, base: float) -> float:
    """The reduction α promises, 1 − α / R_base: realised ≥ target ⇔ R ≤ α.

    Examples
    --------
    >>> target_reduction(0.02, 0.08)
    0.75
    """
    return float("nan") if not base > 0 else 1.0 - alpha / base
