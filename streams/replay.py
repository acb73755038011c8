"""Event-time replay of an event stream through :class:`calibration.engine.Engine`.

What the replay answers: *had riskgate been on, what would each α have done?*
Every event goes through the same :class:`Engine` the stream uses (validation,
maturity, rolling window, safe pools, groups). Each holdout slate
(``policy_applied=false``) is evaluated "as if the policy had been applied"
(:mod:`calibration.backtest`) with

* the λ̂ **current at its serve time**: computed from the slates that had
  matured before it was served, so calibration only ever sees the past (no
  ``recompute_interval`` staleness: the replay uses the freshest λ̂);
* the user's safe pool and blocked tags **at serve time**, read from the
  engine's user state just before the impression is applied;
* its labels once it matures in the engine (``ts + label_window``), and the
  user's watch of each item on this view (first watch event for the pair in
  ``[ts, ts + label_window]``) for nDCG / Recall.

A slate is evaluated only once the ``global`` window holds ``min_slates`` mature
slates (warm-up; counted as ``skipped_warmup``). λ̂ comes from ``global`` (the
paper's setting, ``group_policy="global"``) or from the ranker's fallback
chain ``user:<id>`` → band → ``global`` (SPEC §8, ``"fallback"``).

The β ablation (the paper's Fig. 5) runs one extra engine per β with
``Limits(beta=β)`` and the ``replace`` strategy, in lock-step on the same single
pass over the events, so iterators work and the safe-pool sizes that enter
the replace-risk are each arm's own.

Low vs high reporting (RQ5): a user's band is the engine's ``band_of`` over the
whole replayed log (its reporting rate at the end), as the paper groups users by
their overall rate; a forgotten user keeps the band of its last mature slate.

At the end of the stream the watermark is pushed past the last label window
(``flush``), so the last slates mature on the labels the log holds.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import orjson

from calibration.backtest import (
    REFLAG_BINS, Accumulator, Decision, Summary, beta_label, decide, evaluate, gain,
    reflag_bin, reduction, target_reduction,
)
from calibration.engine import Engine, EngineConfig, GroupResult, user_result
from calibration.events import Event, Forget, Impression, Watch, event_from_dict
from calibration.groups import GLOBAL, band_group, band_of
from calibration.policy import Candidate
from calibration.safe_pool import watch_pct
from calibration.user_state import MatureSlate

from .slate_file import item_json

__all__ = [
    "ReplayConfig",
    "ArmResult",
    "ReplayResult",
    "replay",
    "to_event",
    "write_slates_jsonl",
    "synthetic_world",
    "GROUP_POLICIES",
]

GROUP_POLICIES = ("global", "fallback")
BASELINE = "none"  # the strategy name of the unfiltered baseline rows
POPULATIONS = ("all", "low", "high")


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay: the engine's settings plus what to evaluate."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    ablation_betas: tuple[float | None, ...] | None = None  # e.g. ABLATION_BETAS; None: no ablation
    group_policy: str = "global"
    relevant_pct: float = 50.0
    flush: bool = True
    keep_window: bool = False  # keep the main arm's final window slates (for cross-checks)
    max_items: int = 1000  # longest accepted impression (SPEC: oversized lists are invalid)
    progress: bool = False

    def __post_init__(self) -> None:
        if self.group_policy not in GROUP_POLICIES:
            raise ValueError(f"group_policy must be one of {GROUP_POLICIES}")


@dataclass(frozen=True)
class ArmResult:
    """One engine's outcome: final thresholds and the evaluation rows.

    ``rows`` has one dict per (strategy, α, population) plus the unfiltered
    baseline (``strategy="none"``, ``alpha=None``); see :func:`_rows`.
    """

    name: str
    beta: float | None
    strategies: tuple[str, ...]
    thresholds: tuple[GroupResult, ...]
    rows: tuple[dict, ...]

    def row(self, strategy: str, alpha: float | None, population: str = "all") -> dict:
        for r in self.rows:
            if r["strategy"] == strategy and r["alpha"] == alpha and r["population"] == population:
                return r
        raise KeyError((strategy, alpha, population))

    def threshold(self, strategy: str, group: str = GLOBAL) -> GroupResult:
        for r in self.thresholds:
            if r.strategy == strategy and r.group == group:
                return r
        raise KeyError((strategy, group))


@dataclass(frozen=True)
class ReplayResult:
    """Everything one replay measured (all plain numbers: :meth:`to_dict` is the JSON)."""

    alphas: tuple[float, ...]
    k: int
    guarantee: str
    loss: str
    group_policy: str
    beta: float | None
    main: ArmResult
    ablation: tuple[ArmResult, ...]
    reflag: dict  # bin -> {"repeats", "flagged", "rate"}
    counts: dict
    groups_used: dict
    window_slates: tuple[MatureSlate, ...] = ()

    def to_dict(self) -> dict:
        def arm(a: ArmResult) -> dict:
            return {"name": a.name, "beta": beta_label(a.beta), "strategies": list(a.strategies),
                    "thresholds": [{"strategy": t.strategy, "group": t.group, "n": t.n,
                                    "thresholds": [x.to_dict() for x in t.thresholds]} for t in a.thresholds],
                    "rows": list(a.rows)}

        return {
            "alphas": list(self.alphas), "k": self.k, "guarantee": self.guarantee, "loss": self.loss,
            "group_policy": self.group_policy, "beta": beta_label(self.beta), "main": arm(self.main),
            "ablation": [arm(a) for a in self.ablation], "reflag": self.reflag, "counts": self.counts,
            "groups_used": self.groups_used,
        }


# ------------------------------------------------------------------ validation
_ITEM_FIELDS = (("item_id", str), ("score", (int, float)))
_REQUIRED = {
    "impressions": (("event_id", str), ("user_id", str), ("slate_id", str), ("ts", (int, float)), ("k", int),
                    ("policy_applied", bool), ("items", list)),
    "watch": (("event_id", str), ("user_id", str), ("item_id", str), ("watch_ms", (int, float)),
              ("duration_ms", (int, float)), ("ts", (int, float))),
    "flags": (("event_id", str), ("user_id", str), ("item_id", str), ("kind", str), ("ts", (int, float))),
    "constraints": (("event_id", str), ("user_id", str), ("ts", (int, float))),
    "forget": (("event_id", str), ("user_id", str)),
}


def _finite(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _check(topic: str, v: dict, max_items: int) -> str | None:
    """A reason the value is malformed, or None. The minimal rules of SPEC §2."""
    spec = _REQUIRED.get(topic)
    if spec is None:
        return f"unknown topic {topic!r}"
    for name, typ in spec:
        x = v.get(name)
        if x is None or isinstance(x, bool) and typ is not bool or not isinstance(x, typ):
            return f"{name}: missing or mistyped"
        if typ == (int, float) and not _finite(x):
            return f"{name}: not a finite number"
    if topic == "impressions":
        if v["k"] < 1:
            return "k must be >= 1"
        if len(v["items"]) > min(v["k"], max_items):
            return "more items than k"
        for it in v["items"]:
            if not isinstance(it, dict):
                return "items: not an object"
            for name, typ in _ITEM_FIELDS:
                x = it.get(name)
                if x is None or isinstance(x, bool) or not isinstance(x, typ):
                    return f"items.{name}: missing or mistyped"
            if not _finite(it["score"]) or ("rank_score" in it and not _finite(it["rank_score"])):
                return "items: non-finite score"
    elif topic == "watch" and (v["watch_ms"] < 0 or v["duration_ms"] < 0):
        return "negative watch_ms or duration_ms"
    elif topic == "flags" and v["kind"] not in ("not_interested", "report"):
        return f"unknown kind {v['kind']!r}"
    return None


def _schemas_decode() -> Callable | None:
    try:  # the stream's validator, when it exists: the replay then rejects exactly what the stream does
        from streams.schemas import InvalidEvent, decode  # type: ignore[import-not-found]
    except ImportError:
        return None
    return lambda topic, value, max_items: _via_schemas(decode, InvalidEvent, topic, value, max_items)


def _via_schemas(decode, invalid, topic: str, value: dict, max_items: int) -> tuple[Event | None, str | None]:
    try:
        model = decode(topic, orjson.dumps(value), str(value.get("user_id", "")).encode(), max_items)
    except invalid as err:
        return None, str(err) or "invalid"
    return event_from_dict(topic, model.model_dump()), None


def to_event(topic: str, value: dict, max_items: int = 1000, decoder: Callable | None = None
             ) -> tuple[Event | None, str | None]:
    """``(record, None)`` for a valid value of ``topic``, ``(None, reason)`` otherwise.

    ``decoder`` is what :func:`_schemas_decode` returns: ``streams.schemas.decode``
    when that module exists (the replay then rejects exactly what the stream
    does); without it, the minimal checks of :func:`_check`.

    Examples
    --------
    >>> to_event("flags", {"event_id": "e", "user_id": "u", "item_id": "i", "kind": "nope", "ts": 1.0})[1]
    "unknown kind 'nope'"
    """
    if decoder is not None:
        return decoder(topic, value, max_items)
    if not isinstance(value, dict):
        return None, "value is not an object"
    reason = _check(topic, value, max_items)
    if reason is not None:
        return None, reason
    return event_from_dict(topic, value), None


# ---------------------------------------------------------------------- arms
class _Arm:
    """One engine plus the bookkeeping of its evaluation."""

    def __init__(self, name: str, config: EngineConfig, beta: float | None):
        self.name, self.beta = name, beta
        self.engine = Engine(config)
        self.engine.keep_matured = True  # we drain engine.matured after every event
        self.config = config
        self.folded = 0
        self.forgets = 0
        self._cache_key = None
        self._cache: dict[tuple[str, str], GroupResult] = {}
        # (strategy, alpha index or -1 for the baseline) -> user -> Accumulator
        self.acc: dict[tuple[str, int], dict[str, Accumulator]] = defaultdict(lambda: defaultdict(Accumulator))

    def drain(self) -> list[MatureSlate]:
        out = self.engine.matured
        if out:
            self.engine.matured = []
            self.folded += len(out)
        return out

    def results(self) -> dict[tuple[str, str], GroupResult]:
        """Current λ̂ of the shared groups, recomputed only when a window changed."""
        key = (self.folded, self.engine.calibrator.horizon(), self.forgets)
        if key != self._cache_key:
            self._cache = {(r.strategy, r.group): r for r in self.engine.results()}
            self._cache_key = key
        return self._cache


class _Pending:
    """A holdout slate being evaluated: decisions at serve time, labels at maturity."""

    __slots__ = ("user", "ts", "cutoff", "k", "item_ids", "view_pct", "watched", "decisions", "ideal", "open")

    def __init__(self, ev: Impression, cutoff: float):
        self.user = ev.user_id
        self.ts = ev.ts
        self.cutoff = cutoff
        self.k = ev.k
        self.item_ids = tuple(it.item_id for it in ev.items)
        self.view_pct: list[float | None] = [None] * len(ev.items)
        self.watched = [False] * len(ev.items)
        self.decisions: dict[int, dict[tuple[str, int], Decision]] = {}  # arm -> (strategy, alpha idx) -> decision
        self.ideal: dict[int, list[float]] = {}
        self.open: set[int] = set()  # arms still waiting for maturity


def _progress(enabled: bool, total: int | None):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("replaying events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def replay(events: Iterable[tuple[str, dict]], config: ReplayConfig = ReplayConfig(),
           total: int | None = None) -> ReplayResult:
    """Replay ``(topic, value)`` pairs in the given order; see the module docstring.

    Single pass, memory bounded by the engines' state plus the slates awaiting
    maturity and one accumulator per (user, strategy, α).
    """
    ecfg = config.engine
    arms = [_Arm("main", ecfg, ecfg.limits.beta)]
    ablation_idx: list[int] = []
    for b in config.ablation_betas or ():
        if b == ecfg.limits.beta and "replace" in ecfg.strategies:
            ablation_idx.append(0)  # the main arm already is this β
            continue
        cfg = replace(ecfg, strategies=("replace",), limits=replace(ecfg.limits, beta=b))
        arms.append(_Arm(f"beta={beta_label(b)}", cfg, b))
        ablation_idx.append(len(arms) - 1)

    pending: dict[tuple[str, str], _Pending] = {}
    watch_slots: dict[tuple[str, str], list[tuple[_Pending, int]]] = defaultdict(list)
    reflag_seen = [0] * len(REFLAG_BINS)
    reflag_flagged = [0] * len(REFLAG_BINS)
    last_band: dict[str, str] = {}
    counts: Counter = Counter()
    invalid: Counter = Counter()
    groups_used: Counter = Counter()
    k_seen: Counter = Counter()
    label_window = ecfg.label_window
    decoder = _schemas_decode()  # resolved once: a failed import is not cached by Python

    def close(p: _Pending, key: tuple[str, str]) -> None:
        for j, item in enumerate(p.item_ids):
            slots = watch_slots.get((p.user, item))
            if slots is not None:
                slots[:] = [s for s in slots if s[0] is not p]
                if not slots:
                    del watch_slots[(p.user, item)]
        del pending[key]

    def on_mature(ai: int, arm: _Arm, m: MatureSlate) -> None:
        if ai == 0:
            last_band[m.user_id] = m.band
            for pct, h in zip(m.repeat_pct, m.flags):
                if pct is not None:  # a repeat of an item unflagged at its first view
                    b = reflag_bin(pct)
                    reflag_seen[b] += 1
                    reflag_flagged[b] += int(h)
        key = (m.user_id, m.slate_id)
        p = pending.get(key)
        if p is None or ai not in p.open:
            return
        p.open.discard(ai)
        state = arm.engine.users.get(m.user_id)
        hist = state.history if state is not None else {}

        def flagged_by_cutoff(item: str) -> bool:
            h = hist.get(item)
            return bool(h is not None and h.flag_ts is not None and h.flag_ts <= p.cutoff)

        for (strategy, a_idx), d in p.decisions[ai].items():
            rep_flags = [flagged_by_cutoff(i) for i, o in zip(d.item_ids, d.origin) if o < 0]
            ideal = p.ideal[ai] + [gain(v) for v in p.view_pct]
            met = evaluate(d, m.flags, p.view_pct, rep_flags, p.k, ideal, config.relevant_pct)
            arm.acc[(strategy, a_idx)][m.user_id].add(met)
        if not p.open:
            close(p, key)

    def on_serve(ev: Impression) -> None:
        if ev.policy_applied:
            return
        key = (ev.user_id, ev.slate_id)
        if key in pending:
            return  # a duplicate impression (the engine ignores it too)
        p = None
        cands = [Candidate(it.item_id, it.score, it.score if it.rank_score is None else it.rank_score, it.tags)
                 for it in ev.items]
        for ai, arm in enumerate(arms):
            res = arm.results()
            if res[(arm.config.strategies[0], GLOBAL)].n < arm.config.min_slates:
                counts[f"skipped_warmup:{arm.name}"] += 1
                continue
            if p is None:
                p = _Pending(ev, ev.ts + label_window)
            state = arm.engine.users.get(ev.user_id)
            pool = state.safe_pool(arm.config.limits) if state is not None else []
            blocked = state.blocked_tags if state is not None else frozenset()
            first = {s.item_id: state.history[s.item_id].first_watch_pct for s in pool} if state is not None else {}
            decisions: dict[tuple[str, int], Decision] = {
                (BASELINE, -1): Decision(tuple(c.item_id for c in cands[: ev.k]), tuple(range(min(len(cands), ev.k))),
                                         (None,) * min(len(cands), ev.k))}
            for strategy in arm.config.strategies:
                lams, group = _lambdas(arm, res, strategy, ev.user_id, state, config.group_policy)
                if ai == 0:
                    groups_used[f"{strategy}:{'user' if group.startswith('user:') else group}"] += 1
                for a_idx, lam in enumerate(lams):
                    decisions[(strategy, a_idx)] = decide(cands, ev.k, lam, strategy, pool, blocked, first)
            p.decisions[ai] = decisions
            p.ideal[ai] = [gain(first.get(s.item_id)) for s in pool]  # the slate's own gains join at maturity
            p.open.add(ai)
        if p is not None:
            pending[key] = p
            for j, item in enumerate(p.item_ids):
                watch_slots[(ev.user_id, item)].append((p, j))
            counts["evaluated_slates"] += 1
            k_seen[ev.k] += 1

    def on_watch(ev: Watch) -> None:
        for p, j in watch_slots.get((ev.user_id, ev.item_id), ()):
            if not p.watched[j] and p.ts <= ev.ts <= p.cutoff:
                p.watched[j] = True
                p.view_pct[j] = watch_pct(ev.watch_ms, ev.duration_ms)

    def on_forget(ev: Forget) -> None:
        for key in [k for k, p in pending.items() if p.user == ev.user_id]:
            counts["forgotten_slates"] += 1
            close(pending[key], key)
        for arm in arms:
            arm.forgets += 1

    def step(topic: str, value: dict) -> None:
        counts[f"events:{topic}"] += 1
        ev, reason = to_event(topic, value, config.max_items, decoder)
        if ev is None:
            invalid[reason] += 1
            return
        if isinstance(ev, Impression):
            on_serve(ev)  # before the engine records the slate: pools and λ̂ as at serve time
        elif isinstance(ev, Watch):
            on_watch(ev)
        elif isinstance(ev, Forget):
            on_forget(ev)
        for ai, arm in enumerate(arms):
            arm.engine.process(ev)
            for m in arm.drain():
                on_mature(ai, arm, m)

    bar = _progress(config.progress, total)
    if bar is None:
        for topic, value in events:
            step(topic, value)
    else:
        with bar:
            task = bar.add_task("events", total=total)
            n = 0
            for topic, value in events:
                step(topic, value)
                n += 1
                if n % 4096 == 0:
                    bar.update(task, completed=n)
            bar.update(task, completed=n)

    if config.flush:
        for ai, arm in enumerate(arms):
            eng = arm.engine
            if eng.max_ts is not None:
                eng.push_watermark(eng.max_ts + ecfg.label_window + 1.0)
                for m in arm.drain():
                    on_mature(ai, arm, m)
    counts["unresolved_slates"] = len(pending)
    counts["invalid_events"] = sum(invalid.values())

    # the pool's own gains were known at serve time; the slate's come with its watches
    q = [reflag_flagged[b] / reflag_seen[b] if reflag_seen[b] else 0.0 for b in range(len(REFLAG_BINS))]
    final_band = {}
    for arm in arms[:1]:
        for uid, st in arm.engine.users.items():
            final_band[uid] = band_of(st.shown, st.flagged)
    k = k_seen.most_common(1)[0][0] if k_seen else 0
    arm_results = [_arm_result(a, ecfg.alphas, k, q, final_band, last_band) for a in arms]
    window: tuple[MatureSlate, ...] = ()
    if config.keep_window:
        eng = arms[0].engine
        horizon = eng.calibrator.horizon()
        window = tuple(sorted((m for st in eng.users.values() for m in st.live_recent(horizon)),
                              key=lambda m: (m.ts, m.user_id, m.slate_id)))
    return ReplayResult(
        alphas=tuple(ecfg.alphas), k=k, guarantee=ecfg.guarantee, loss=ecfg.loss,
        group_policy=config.group_policy, beta=ecfg.limits.beta, main=arm_results[0],
        ablation=tuple(arm_results[i] for i in ablation_idx),
        reflag={REFLAG_BINS[b]: {"repeats": reflag_seen[b], "flagged": reflag_flagged[b], "rate": q[b]}
                for b in range(len(REFLAG_BINS))},
        counts={**dict(sorted(counts.items())), "invalid_reasons": dict(invalid)},
        groups_used=dict(sorted(groups_used.items())),
        window_slates=window,
    )


def _lambdas(arm: _Arm, res: dict, strategy: str, user_id: str, state, policy: str) -> tuple[list[float | None], str]:
    """λ̂ for every α of ``strategy`` for this user, and the group it came from."""
    cfg = arm.config
    chosen = res[(strategy, GLOBAL)]
    if policy == "fallback" and state is not None:
        own = user_result(state, cfg, strategy, arm.engine.calibrator.horizon())
        band = res[(strategy, band_group(state.band))]
        if own is not None:
            chosen = own
        elif band.n >= cfg.min_slates:
            chosen = band
    return [t.lam for t in chosen.thresholds], chosen.group


def _arm_result(arm: _Arm, alphas: Sequence[float], k: int, q: Sequence[float],
                final_band: dict, last_band: dict) -> ArmResult:
    def band(uid: str) -> str:
        return final_band.get(uid) or last_band.get(uid, "low")

    pops: dict[tuple[str, int], dict[str, Accumulator]] = {}
    for key, users in arm.acc.items():
        agg = {p: Accumulator() for p in POPULATIONS}
        for uid, acc in users.items():
            agg["all"].merge(acc)
            agg[band(uid)].merge(acc)
        pops[key] = agg
    rows = []
    for pop in POPULATIONS:
        base_acc = pops.get((BASELINE, -1), {}).get(pop, Accumulator())
        base = base_acc.summary(k, q)
        rows.append(_row(BASELINE, None, pop, base, base))
        for strategy in arm.config.strategies:
            for a_idx, alpha in enumerate(alphas):
                s = pops.get((strategy, a_idx), {}).get(pop, Accumulator()).summary(k, q)
                rows.append(_row(strategy, float(alpha), pop, s, base))
    return ArmResult(arm.name, arm.beta, tuple(arm.config.strategies), tuple(arm.engine.results()), tuple(rows))


def _row(strategy: str, alpha: float | None, pop: str, s: Summary, base: Summary) -> dict:
    out = {"strategy": strategy, "alpha": alpha, "population": pop, **s.to_dict(), "base_risk": _num(base.risk)}
    out["reduction"] = _num(reduction(s.risk, base.risk))
    out["reduction_adjusted"] = _num(reduction(s.risk_adjusted, base.risk))
    out["target_reduction"] = None if alpha is None else _num(target_reduction(alpha, base.risk))
    return out


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------ helpers
def write_slates_jsonl(slates: Iterable[MatureSlate], path: str | Path) -> int:
    """Write mature slates in the ``riskgate calibrate`` input format; returns how many.

    One line per slate: ``{"k", "safe_pool_size", "items": [{"score", "flagged"}]}`` (an item its
    user's tag rules dropped: ``"blocked": true``, see :mod:`streams.slate_file`).
    """
    n = 0
    with open(path, "wb") as fh:
        for m in slates:
            fh.write(orjson.dumps({"k": m.k, "safe_pool_size": m.pool,
                                   "items": [item_json(s, f) for s, f in zip(m.scores, m.flags)]}) + b"\n")
            n += 1
    return n


def synthetic_world(seed: int = 0, users: int = 2_000, slates: int = 20_000, *, hours: float = 12.0,
                    table1: bool = False, **overrides):
    """A :class:`calibration.synthetic.WorldConfig` sized for a replay.

    ``table1=True`` keeps the paper's Table-1 reporting rates (mean flag rate
    about 0.3 %, so only α of that order filter anything). The default is a
    *dense* world, so α of a few percent are meaningful and both bands are
    populated: 40 % of users report under 0.1 %, 60 % between 1 % and 30 %
    (log-uniform); half the slates are holdouts; and Property 1 is violated
    visibly for unwatched items (an unflagged repeat is flagged again with
    probability 0.3 · exp(−W%₁ / 10)) so the β ablation has something to show.
    """
    from calibration.synthetic import WorldConfig

    # Spread the slates over `hours` of event time, so slates mature (label
    # window) and age out (window) many times during the replay.
    base: dict = dict(seed=seed, n_users=users, n_items=max(20_000, 40 * users), n_slates=slates,
                      slates_per_second=max(slates, 1) / (hours * 3600.0))
    if not table1:
        base.update(band_shares=(0.4, 0.0, 0.0, 0.6), rate_cap=0.3, holdout_share=0.5, reflag_unflagged=0.3)
    base.update(overrides)
    return WorldConfig(**base)

