"""Convert KuaiRand interaction-log rows to the event stream of SPEC §2.

Pure: rows in (dicts of strings or numbers, as ``csv.DictReader`` yields them),
``(topic, event)`` pairs out, in event-time order. File reading lives in
:mod:`streams.kuairand_io`. Two row layouts are accepted, detected per row:

* the public KuaiRand standard log (``user_id, video_id, date, hourmin,
  time_ms, is_click, is_like, ..., is_hate, long_view, play_time_ms,
  duration_ms, ..., is_rand, tab``): the flag is ``is_hate``;
* the processed 15-core slice (``... play_time_ms, duration_ms, ..., label,
  timestamp``): the flag is ``label == 0`` and there is no ``is_rand``.

Rules (the logs carry neither slates nor filter scores, so these are choices):

* **Slates.** A user's views, in time order, are cut into slates of at most
  ``k`` consecutive views; a slate also ends at a gap of more than
  ``session_gap`` seconds, when it has spanned ``max_slate_span`` seconds, when
  ``is_rand`` changes (so a slate is either all random exposure or none), and
  before a video already in it (slates list distinct items); ``is_rand``
  cuts slates only under ``holdout="auto"``. The impression is stamped
  ``impression_lead`` seconds before the slate's first view; items are listed
  in rank-score order.
* **Watch.** One ``watch`` per row: ``watch_ms = play_time_ms``,
  ``duration_ms = duration_ms`` (negative values, which would be malformed,
  are clipped to 0), stamped at the end of the view, t + play_time_ms / 1000
  with t = ``time_ms`` / 1000.
* **Flags.** A hated row (``is_hate == 1``; ``label == 0`` in the slice) gives
  a ``not_interested`` flag stamped midway through the view,
  t + play_time_ms / 2000, so it may precede the watch event, as live flags do.
* **Holdout** (``holdout``). ``"auto"`` (default): with an ``is_rand``
  column, a slate is a holdout (``policy_applied`` false) iff its views were
  random exposures (``is_rand == 1``) — KuaiRand's randomly inserted videos
  are exactly "served without the policy"; without the column, ``"share"``.
  ``"share"``: a seeded share ``holdout_share`` of slates, decided by a hash
  of (seed, user, slate ordinal). ``"all"``: every slate is a holdout (the
  paper's offline setting, where any logged interaction may calibrate).
* **Filter score** s in [0, 1] (higher = safer), by ``score_model``:

  - ``"noisy_label"`` (default): s = Φ((η + ρ·δ·(½ − h)) / √(1 + (ρδ/2)²)),
    η ~ N(0, 1) hashed from (seed, user, video), h the row's flag,
    ρ = ``informativeness``, δ = ``separation``. A simulated upstream model of
    known quality (AUC = Φ(ρδ/√2) for flags): it *uses the label*, so it
    exercises the mechanics of calibration, not a real model's skill.
  - ``"causal_item_rate"``: s = 1 − (hates_i + a) / (views_i + a + b), the
    Beta(a, b)-smoothed hate rate of the video over the views whose label
    (stamped mid-view) precedes the impression of every still-open slate —
    fitted on strictly earlier data only, so honest, but weak on a sparse
    log where most videos are new.
* **Rank score** f = play_time_ms / 1000: the realised watch seconds, i.e. an
  oracle watch-time ranker (the log has no ranker scores; replay measures
  what filtering costs relative to this ranking).
* **Tags**: the standard log has none (they live in KuaiRand's video features
  table), so ``tags`` is ``[]``. No ``constraints`` or ``forget`` events.

Input rows must be in non-decreasing ``time_ms`` order (``ValueError``
otherwise); :func:`streams.kuairand_io.read_kuairand` sorts files that are
not. Memory is bounded by the open slates (≤ k rows per active user) and
by the events of the last ``max_slate_span`` seconds awaiting emission,
plus one counter pair per video for ``causal_item_rate``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from scipy.special import ndtr

from .synthetic import pair_normal

__all__ = ["KuaiRandConfig", "Row", "parse_row", "convert_rows", "SCORE_MODELS", "HOLDOUT_RULES"]

SCORE_MODELS = ("noisy_label", "causal_item_rate")
HOLDOUT_RULES = ("auto", "share", "all")


@dataclass(frozen=True)
class KuaiRandConfig:
    """Conversion knobs (times in seconds)."""

    k: int = 20
    session_gap: float = 600.0
    max_slate_span: float = 1800.0
    impression_lead: float = 1.0
    score_model: str = "noisy_label"
    informativeness: float = 0.8
    separation: float = 4.0
    prior_hates: float = 1.0  # a of the Beta(a, b) prior
    prior_views: float = 99.0  # b of the Beta(a, b) prior
    holdout: str = "auto"
    holdout_share: float = 0.1
    seed: int = 0
    id_prefix: str = "kr-"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if self.holdout not in HOLDOUT_RULES:
            raise ValueError(f"holdout must be one of {HOLDOUT_RULES}")
        if self.score_model not in SCORE_MODELS:
            raise ValueError(f"score_model must be one of {SCORE_MODELS}")
        for name in ("informativeness", "holdout_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not (self.session_gap > 0 and self.max_slate_span > 0 and self.impression_lead >= 0):
            raise ValueError("session_gap, max_slate_span must be > 0 and impression_lead >= 0")
        if not (self.prior_hates > 0 and self.prior_views > 0 and self.separation >= 0):
            raise ValueError("prior_hates, prior_views must be > 0 and separation >= 0")


@dataclass(frozen=True, slots=True)
class Row:
    """One view, normalised from either layout."""

    user: int
    video: int
    t: float  # seconds
    play_ms: int
    duration_ms: int
    hate: bool
    rand: bool | None  # None when the layout has no is_rand


def _num(row: Mapping[str, Any], key: str) -> float:
    v = row[key]
    if isinstance(v, str):
        v = v.strip()
        return float(v) if v else 0.0
    return float(v)


def parse_row(row: Mapping[str, Any]) -> Row:
    """Normalise a row of either layout (see the module docstring).

    Examples
    --------
    >>> r = parse_row({"user_id": "7", "video_id": "9", "time_ms": "1649581149287",
    ...                "play_time_ms": "1200", "duration_ms": "0", "label": "0"})
    >>> r.user, r.video, r.t, r.hate, r.rand
    (7, 9, 1649581149.287, True, None)
    """
    if "is_hate" in row:
        hate = _num(row, "is_hate") >= 1
    elif "label" in row:
        hate = _num(row, "label") == 0
    else:
        raise KeyError("row has neither is_hate (public log) nor label (processed slice)")
    rand = (_num(row, "is_rand") >= 1) if "is_rand" in row and str(row["is_rand"]).strip() != "" else None
    return Row(
        user=int(_num(row, "user_id")),
        video=int(_num(row, "video_id")),
        t=_num(row, "time_ms") / 1000.0,
        play_ms=max(0, int(_num(row, "play_time_ms"))),
        duration_ms=max(0, int(_num(row, "duration_ms"))),
        hate=hate,
        rand=rand,
    )


def convert_rows(rows: Iterable[Mapping[str, Any] | Row], config: KuaiRandConfig = KuaiRandConfig()) -> Iterator[tuple[str, dict]]:
    """Stream ``(topic, event)`` pairs for time-ordered log rows (rules in the module docstring).

    Examples
    --------
    >>> rows = [{"user_id": 1, "video_id": v, "time_ms": 1_000_000 + 10_000 * v, "play_time_ms": 5000,
    ...          "duration_ms": 10000, "is_hate": int(v == 2), "is_rand": 0} for v in range(3)]
    >>> [t for t, _ in convert_rows(rows)]
    ['impressions', 'watch', 'watch', 'flags', 'watch']
    """
    return _Converter(config).run(rows)


class _Converter:
    def __init__(self, c: KuaiRandConfig):
        self.c = c
        self.n_event = 0
        self.n_slate = 0
        self.open: dict[int, list[Row]] = {}  # user -> rows of the open slate
        self.opened: deque[tuple[float, int, int]] = deque()  # (start, user, serial) in start order
        self.serial: dict[int, int] = {}  # user -> serial of its open slate
        self.user_slates: dict[int, int] = {}  # user -> slates closed so far (holdout hash input)
        self.heap: list[tuple[float, int, str, dict]] = []
        self.item_counts: dict[int, list[int]] = {}  # video -> [hates, views], causal model only
        self.pending: list[tuple[float, int, int, bool]] = []  # (label ts, seq, video, hate) not yet learnt
        self.key = int(np.random.default_rng([c.seed, 0x4B52]).integers(0, 2**63))

    def _id(self) -> str:
        self.n_event += 1
        return f"{self.c.id_prefix}{self.n_event - 1}"

    def run(self, rows: Iterable[Mapping[str, Any] | Row]) -> Iterator[tuple[str, dict]]:
        c = self.c
        last_t = -math.inf
        for raw in rows:
            r = raw if isinstance(raw, Row) else parse_row(raw)
            if r.t < last_t:
                raise ValueError(f"rows must be in non-decreasing time_ms order ({r.t} after {last_t}); sort the input")
            last_t = r.t
            # close slates that can no longer grow (span exceeded), oldest first
            while self.opened and self.opened[0][0] < r.t - c.max_slate_span:
                _, u, s = self.opened.popleft()
                if self.serial.get(u) == s:
                    self._close(u)
            cur = self.open.get(r.user)
            if cur is not None and (
                len(cur) >= c.k
                or r.t - cur[-1].t > c.session_gap
                or (r.rand != cur[0].rand and c.holdout == "auto")
                or any(x.video == r.video for x in cur)
            ):
                self._close(r.user)
                cur = None
            if cur is None:
                self.open[r.user] = [r]
                self.serial[r.user] = self.n_slate
                self.opened.append((r.t, r.user, self.n_slate))
                self.n_slate += 1
            else:
                cur.append(r)
            # every event still to come has ts >= (start of an open slate) - lead >= watermark
            yield from self._drain(r.t - c.max_slate_span - c.impression_lead)
        for u in [u for _, u, s in self.opened if self.serial.get(u) == s]:
            self._close(u)
        yield from self._drain(math.inf)

    def _drain(self, watermark: float) -> Iterator[tuple[str, dict]]:
        h = self.heap
        while h and h[0][0] < watermark:
            _, _, topic, ev = heapq.heappop(h)
            yield topic, ev

    def _push(self, topic: str, ev: dict) -> None:
        # the event id's number breaks ts ties, so the order is deterministic
        heapq.heappush(self.heap, (ev["ts"], self.n_event, topic, ev))

    def _scores(self, u: int, rows: list[Row]) -> list[float]:
        c = self.c
        if c.score_model == "noisy_label":
            eta = pair_normal(self.key, np.full(len(rows), u), np.array([r.video for r in rows]))
            h = np.array([r.hate for r in rows], dtype=float)
            d = c.informativeness * c.separation
            return ndtr((eta + d * (0.5 - h)) / math.sqrt(1.0 + (d / 2) ** 2)).tolist()
        # learn only labels older than every open slate: strictly earlier data
        while self.opened and self.serial.get(self.opened[0][1]) != self.opened[0][2]:
            self.opened.popleft()
        horizon = min(rows[0].t, self.opened[0][0]) if self.opened else rows[0].t
        while self.pending and self.pending[0][0] < horizon - c.impression_lead:
            _, video, _, hate = heapq.heappop(self.pending)
            cnt = self.item_counts.setdefault(video, [0, 0])
            cnt[0] += hate
            cnt[1] += 1
        a, b = c.prior_hates, c.prior_views
        out = []
        for r in rows:
            hates, views = self.item_counts.get(r.video, (0, 0))
            out.append(1.0 - (hates + a) / (views + a + b))
        return out

    def _close(self, u: int) -> None:
        c = self.c
        rows = self.open.pop(u)
        serial = self.serial.pop(u)
        ordinal = self.user_slates.get(u, 0)
        self.user_slates[u] = ordinal + 1
        if c.holdout == "all":
            policy = False
        elif c.holdout == "auto" and rows[0].rand is not None:
            policy = not rows[0].rand
        else:
            x = pair_normal(self.key ^ 0x5A5A, np.array([u]), np.array([ordinal]))[0]
            policy = bool(ndtr(x) >= c.holdout_share)
        scores = self._scores(u, rows)  # after the pop: this slate's start is passed explicitly
        rank = [r.play_ms / 1000.0 for r in rows]
        order = sorted(range(len(rows)), key=lambda j: -rank[j])
        uid = str(u)
        ts0 = rows[0].t - c.impression_lead
        self._push("impressions", {
            "event_id": self._id(), "user_id": uid, "slate_id": f"{c.id_prefix}s{serial}",
            "ts": ts0, "k": c.k, "policy_applied": policy,
            "items": [{"item_id": str(rows[j].video), "score": scores[j], "rank_score": rank[j],
                       "tags": [], "replacement": False} for j in order],
        })
        for r in rows:
            self._push("watch", {"event_id": self._id(), "user_id": uid, "item_id": str(r.video),
                                 "watch_ms": r.play_ms, "duration_ms": r.duration_ms, "ts": r.t + r.play_ms / 1000.0})
            if r.hate:
                self._push("flags", {"event_id": self._id(), "user_id": uid, "item_id": str(r.video),
                                     "kind": "not_interested", "ts": r.t + r.play_ms / 2000.0})
        if c.score_model == "causal_item_rate":
            for r in rows:
                heapq.heappush(self.pending, (r.t + r.play_ms / 2000.0, r.video, r.user, r.hate))
