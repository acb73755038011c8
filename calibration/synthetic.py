"""A seeded, KuaiRand-shaped synthetic world and its event stream (SPEC §2).

The world is shaped by the statistics of section 3 of the paper:

* **Reporting rates** (Table 1). Each user gets a band with probabilities
  ``band_shares`` (60.1 / 25.1 / 10.9 / 3.9 %) over the H_X edges
  0, 0.1 %, 0.3 %, 1 %, and a true rate r_u log-uniform inside the band
  (``rate_floor`` below, ``rate_cap`` above). A user's expected flags / items
  shown is r_u, so realised rates land in the band up to sampling noise.
* **Unwantedness.** Each (user, item) pair has a latent
  z = b_i + A·[item has a tag the user is averse to] + ε_ui, with b_i ~ N(0, σ_b²)
  an item effect, A = ``aversion_strength`` and ε_ui ~ N(0, σ_ε²) drawn from a
  hash of (seed, user, item), so a repeat view of the pair sees the same z
  without any per-pair state. A first view is flagged with probability
  p = min(1, c_u · exp(γ z)), γ = ``harm_concentration``, where the per-user
  scale c_u solves E[p] = r_u over the catalogue and ε (cap included), so a
  user's expected flags / items shown is r_u (times ``rate_multiplier``).
* **Filter score.** s = Φ(−(ρ z̃ + √(1−ρ²) η)), η ~ N(0, 1), z̃ the standardised z
  and ρ = ``informativeness``: s is marginally ≈ U(0, 1), independent of flags
  at ρ = 0 and a monotone (safest-highest) function of z at ρ = 1.
* **Rank score** f = predicted watch seconds, dur · exp(μ + e + σ_n²/2), with e
  the pair's engagement; it is independent of z, because in the data engagement
  and harm are not correlated (Fig. 1a). Slates are ordered by f.
* **Watch time.** A view has watch_ms = 0 with probability ``zero_watch_share``
  (21 %), else dur · exp(μ + e + σ_n ξ) (log-normal W%, a share of views above
  100 %). Watch time does not depend on the flag, so flagged and unflagged
  items have the same W% distribution. ``zero_duration_share`` of items have
  ``duration_ms = 0`` (dynamic photos), watched for a log-normal stay time.
* **Repeat views** (§3.3). Each slot of a user with history shows a
  previously seen item with probability ``repeat_share`` (2.6 %). Property 1
  holds approximately: an item not flagged at its first view is flagged on a
  repeat with probability ``reflag_unflagged`` · exp(−W%₁ / ``reflag_scale``)
  (W%₁ the first-view W%; unknown W% counts as 0), and an item flagged at its
  first view is flagged again with probability ``reflag_flagged``.
  Slates are generated in batches of ``batch_slates`` and the history is
  written at batch ends, so a user's second slate within one batch cannot
  repeat items of the first (with the default 512 slates and 2,000 users this
  lowers the realised repeat share only slightly, to about 2.4 %).
* **Fresh items never repeat by accident**: user u walks the catalogue along
  i_j = (o_u + d_u · j) mod N with gcd(d_u, N) = 1, so its first N fresh items
  are distinct and only the repeat mechanism produces repeat views.

Time: slate n is served at ``start_ts + n / slates_per_second`` to a user drawn
by a heavy-tailed activity weight. The user views the shown items in rank
order starting 1 s after the impression; the watch event is stamped at the end
of each view, the flag at a uniform moment of the view plus up to
``flag_lag`` seconds, capped at ``label_delay`` after the impression — so a flag
often precedes its watch event, and every label lands well inside a label
window larger than ``label_delay``. A share ``out_of_order_share`` of watch and
flag events is emitted up to ``out_of_order_lag`` seconds after its event time
(lateness tests). Otherwise events come out in event-time order.

Policy: a share ``holdout_share`` of slates is a holdout (``policy_applied``
false, all k items shown). Policy-applied slates drop items whose tags the user
has blocked and, if ``policy_lambda`` is set, items with s < λ; no replacement
is simulated (``replacement`` is always false). Constraints: a share
``constraint_user_share`` of users blocks its averse tags (``declared`` or
``inferred``) just before one of its early slates, and a share of those later
unblocks them. ``forget_share`` of slates are followed by a ``forget`` of the
user, which also clears the generator's own history of that user.

State is bounded: O(n_items) catalogue arrays, O(n_users · history_max) ring
buffers and O(batch) working arrays, whatever the number of events. The
generator is pure (numpy, scipy.special); file writing lives in
:mod:`streams.synthetic_io`.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from scipy.special import ndtr, ndtri

__all__ = [
    "TOPICS",
    "TAGS",
    "BAND_EDGES",
    "BAND_LABELS",
    "WorldConfig",
    "World",
    "build_world",
    "generate_events",
    "band_index",
    "pair_normal",
]

TOPICS = ("impressions", "watch", "flags", "constraints", "forget")

#: Tag vocabulary; the first ones are the "sensitive" tags users tend to block.
TAGS = (
    "firearms", "gambling", "violence", "pranks", "diet", "politics",
    "sports", "cooking", "music", "dance", "gaming", "pets",
    "travel", "beauty", "comedy", "education",
)
_N_SENSITIVE = 6

#: Table 1 of the paper: H_X band edges as fractions (0.1 %, 0.3 %, 1 %).
BAND_EDGES = (0.0, 0.001, 0.003, 0.01)
BAND_LABELS = ("<0.1%", "0.1-0.3%", "0.3-1%", ">=1%")


def band_index(rate: np.ndarray | float) -> np.ndarray:
    """Table-1 band of a reporting rate (a fraction): 0 for H < 0.1 %, ..., 3 for H ≥ 1 %.

    Examples
    --------
    >>> band_index(np.array([0.0, 0.001, 0.0029, 0.5])).tolist()
    [0, 1, 1, 3]
    """
    return np.searchsorted(np.asarray(BAND_EDGES[1:]), np.asarray(rate), side="right")


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the synthetic world; the defaults mimic the paper's section 3.

    Rates and shares are fractions in [0, 1]; times are seconds. The model each
    knob enters is stated in the module docstring.

    Attributes
    ----------
    seed : the only source of randomness (world and stream are pure functions of the config).
    n_users, n_items, n_slates, k : world size, stream length (slates) and slate size.
    start_ts, slates_per_second : event time of slate n is ``start_ts + n / slates_per_second``.
    holdout_share : share of slates with ``policy_applied`` false (1.0 for calibration demos).
    policy_lambda : if set, policy-applied slates drop items with s < λ (no replacement).
    band_shares, rate_floor, rate_cap : Table-1 band probabilities and the outer rate bounds.
    rate_multiplier : multiplies every r_u when flags are drawn (Table 1 holds only at 1.0);
        with the paper's rates a slate's flagged share is ~0.25 %, so demos of α = 0.05 need ~20.
    activity_sigma : log-normal spread of user activity (who gets the slates).
    informativeness : ρ in s = Φ(−(ρ z̃ + √(1−ρ²) η)); 0 = random score, 1 = monotone in z.
    harm_concentration : γ in p ∝ exp(γ z); larger = flags concentrated on few pairs.
    item_harm_sd, pair_harm_sd, sensitive_harm_shift, aversion_strength, averse_tag_rate :
        the terms of z = b_i + A·[averse tag] + ε_ui and who is averse to what.
    report_share : share of flags of kind ``report`` (the rest ``not_interested``).
    zero_watch_share, zero_duration_share, duration_median_ms, duration_sigma,
    watch_ratio_median, engagement_sd, watch_noise_sd, repeat_watch_boost :
        watch-time model (zero-inflated log-normal W%).
    repeat_share, reflag_unflagged, reflag_scale, reflag_flagged, history_max :
        repeat views and Property 1; history is a ring of ``history_max`` items per user.
    label_delay, flag_lag, session_cap : flags land within ``label_delay`` of the impression.
    out_of_order_share, out_of_order_lag : deliberately late watch/flag events.
    constraint_user_share, declared_share, unblock_share, forget_share : constraints and forget.
    batch_slates : slates per vectorised batch (memory vs speed); id_prefix : event id prefix.
    """

    seed: int = 0
    n_users: int = 2_000
    n_items: int = 100_000
    n_slates: int = 10_000
    k: int = 20
    start_ts: float = 1_649_376_000.0  # 2022-04-08, the first day of KuaiRand
    slates_per_second: float = 10.0
    holdout_share: float = 0.1
    policy_lambda: float | None = None
    # reporting (Table 1)
    band_shares: tuple[float, float, float, float] = (0.601, 0.251, 0.109, 0.039)
    rate_floor: float = 1e-4
    rate_cap: float = 0.05
    rate_multiplier: float = 1.0
    activity_sigma: float = 1.0
    # unwantedness and scores
    informativeness: float = 0.8
    harm_concentration: float = 1.5
    item_harm_sd: float = 0.7
    pair_harm_sd: float = 0.7
    sensitive_harm_shift: float = 0.5
    aversion_strength: float = 1.0
    averse_tag_rate: float = 0.6
    report_share: float = 0.1
    # watch time (section 3.2)
    zero_watch_share: float = 0.21
    zero_duration_share: float = 0.03
    duration_median_ms: float = 11_000.0
    duration_sigma: float = 0.6
    watch_ratio_median: float = 0.55
    engagement_sd: float = 0.5
    watch_noise_sd: float = 0.7
    repeat_watch_boost: float = 0.7
    # repeat views and Property 1 (section 3.3)
    repeat_share: float = 0.026
    reflag_unflagged: float = 0.005
    reflag_scale: float = 10.0
    reflag_flagged: float = 0.7
    history_max: int = 64
    # timing
    label_delay: float = 300.0
    flag_lag: float = 5.0
    session_cap: float = 600.0
    out_of_order_share: float = 0.0
    out_of_order_lag: float = 600.0
    # constraints and forget
    constraint_user_share: float = 0.02
    declared_share: float = 0.7
    unblock_share: float = 0.2
    forget_share: float = 0.0
    # engine
    batch_slates: int = 512
    id_prefix: str = "e-"

    def __post_init__(self) -> None:
        shares = {
            "holdout_share": self.holdout_share, "informativeness": self.informativeness,
            "report_share": self.report_share, "zero_watch_share": self.zero_watch_share,
            "zero_duration_share": self.zero_duration_share, "repeat_share": self.repeat_share,
            "reflag_unflagged": self.reflag_unflagged, "reflag_flagged": self.reflag_flagged,
            "out_of_order_share": self.out_of_order_share, "averse_tag_rate": self.averse_tag_rate,
            "constraint_user_share": self.constraint_user_share, "declared_share": self.declared_share,
            "unblock_share": self.unblock_share, "forget_share": self.forget_share,
        }
        for name, v in shares.items():
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if len(self.band_shares) != 4 or abs(sum(self.band_shares) - 1.0) > 1e-6 or min(self.band_shares) < 0:
            raise ValueError("band_shares must be 4 non-negative shares summing to 1")
        if not (0 < self.rate_floor < BAND_EDGES[1] and BAND_EDGES[3] < self.rate_cap <= 1):
            raise ValueError("need 0 < rate_floor < 0.1% and 1% < rate_cap <= 1")
        for name in ("n_users", "n_items", "k", "history_max", "batch_slates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.n_slates < 0:
            raise ValueError("n_slates must be >= 0")
        if self.n_items < 2 * self.k:
            raise ValueError("n_items must be at least 2k")
        if not self.rate_multiplier >= 0:
            raise ValueError("rate_multiplier must be >= 0")
        if not self.slates_per_second > 0:
            raise ValueError("slates_per_second must be > 0")
        for name in ("label_delay", "flag_lag", "session_cap", "out_of_order_lag"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if self.policy_lambda is not None and not math.isfinite(self.policy_lambda):
            raise ValueError("policy_lambda must be finite or None")


@dataclass(frozen=True, eq=False)
class World:
    """The static part of a world: catalogue and users (ground truth for tests).

    Attributes are read-only numpy arrays indexed by item / user number; user
    ``j`` is ``"u{j}"`` and item ``j`` is ``"i{j}"`` in events.
    """

    config: WorldConfig
    item_tags: np.ndarray  # uint32 bit mask over TAGS
    item_duration_ms: np.ndarray  # int64, 0 for dynamic photos
    item_harm: np.ndarray  # b_i
    user_rate: np.ndarray  # true reporting rate r_u (a fraction)
    user_band: np.ndarray  # Table-1 band index of r_u
    user_activity: np.ndarray  # probability that a slate goes to the user
    user_averse: np.ndarray  # uint32 tag mask the user dislikes
    user_log_scale: np.ndarray  # log c_u with E[min(1, c_u exp(γ z))] = multiplier · r_u
    user_walk_offset: np.ndarray
    user_walk_stride: np.ndarray
    constraint_at: np.ndarray  # slate ordinal at which the user blocks tags, -1 = never
    unblock_at: np.ndarray  # slate ordinal at which the user unblocks, -1 = never
    z_mean: float
    z_sd: float
    item_tag_lists: tuple = field(repr=False)

    @property
    def user_ids(self) -> list[str]:
        return [f"u{j}" for j in range(len(self.user_rate))]

    def bands(self) -> dict[str, str]:
        """User id → Table-1 band label of its true rate (e.g. ``"0.1-0.3%"``)."""
        return {f"u{j}": BAND_LABELS[b] for j, b in enumerate(self.user_band.tolist())}

    def reporting_bands(self) -> dict[str, str]:
        """User id → ``low`` (r_u < 0.1 %) or ``high``, the two groups of RQ5 and SPEC §3."""
        return {f"u{j}": ("low" if b == 0 else "high") for j, b in enumerate(self.user_band.tolist())}

    def rates(self) -> dict[str, float]:
        """User id → true reporting rate r_u (expected flags per item shown)."""
        return {f"u{j}": r for j, r in enumerate(self.user_rate.tolist())}

    def tags_of(self, item_id: str) -> list[str]:
        return list(self.item_tag_lists[int(item_id[1:])])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective avalanche hash of uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pair_normal(key: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """ε_ui ~ N(0, 1) as a pure function of (key, u, i): u = Φ⁻¹((hash + ½) / 2⁵³)."""
    x = (users.astype(np.uint64) << np.uint64(32)) | items.astype(np.uint64)
    h = _mix64(x ^ np.uint64(key))
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    return ndtri(u)


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """Occurrence number of each element among equal keys, in array order: [7,3,7] → [0,0,1]."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    start = np.r_[True, sk[1:] != sk[:-1]]
    idx = np.arange(n)
    first = np.maximum.accumulate(np.where(start, idx, 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = idx - first
    return out


def _flag_scales(c: WorldConfig, harm: np.ndarray, tags: np.ndarray, masks: np.ndarray,
                 inverse: np.ndarray, target: np.ndarray) -> np.ndarray:
    """log c_u solving E_{i,ε}[min(1, c_u · exp(γ z_ui))] = target_u, exactly up to binning.

    With a = c·exp(γ v), v = b_i + A·[averse hit], and Y = exp(γ σ_ε ε) log-normal(0, s²),
    E[min(1, aY)] = a·e^{s²/2}·Φ((−ln a − s²)/s) + Φ(ln a / s). The expectation over
    the catalogue is taken on a 256-bin histogram of γv per distinct aversion mask,
    tabulated on a grid of ln c and inverted by interpolation (it is increasing in c).
    Targets at or above the attainable maximum get the largest grid value.
    """
    g = c.harm_concentration
    sd = max(g * c.pair_harm_sd, 1e-9)
    log_c = np.linspace(-35.0, 15.0, 601)
    out = np.empty(len(target))
    for j, m in enumerate(masks.tolist()):
        v = g * (harm + c.aversion_strength * ((tags & m) != 0))
        w, edges = np.histogram(v, bins=256)
        keep = w > 0
        centre = 0.5 * (edges[:-1] + edges[1:])[keep]
        w = w[keep] / len(v)
        la = log_c[:, None] + centre[None, :]
        e = np.exp(np.minimum(la + 0.5 * sd * sd, 700.0)) * ndtr((-la - sd * sd) / sd) + ndtr(la / sd)
        F = e @ w
        users = inverse == j
        out[users] = np.interp(target[users], F, log_c)
    return out


def build_world(config: WorldConfig) -> World:
    """Draw the catalogue and the users of ``config`` (deterministic in ``config.seed``).

    Examples
    --------
    >>> w = build_world(WorldConfig(seed=1, n_users=1000, n_items=5000))
    >>> bool(0.5 < (w.user_band == 0).mean() < 0.7), w.item_tags.shape
    (True, (5000,))
    """
    c = config
    rng = np.random.default_rng([c.seed, 0x5EED])
    n_tags = len(TAGS)
    # items: one or two tags, sensitive tags a bit harmful on average
    first = rng.integers(0, n_tags, c.n_items)
    second = rng.integers(0, n_tags, c.n_items)
    two = rng.random(c.n_items) < 0.35
    tags = (np.uint32(1) << first.astype(np.uint32)) | np.where(two, np.uint32(1) << second.astype(np.uint32), np.uint32(0))
    tags = tags.astype(np.uint32)
    sensitive_mask = np.uint32((1 << _N_SENSITIVE) - 1)
    harm = rng.normal(0.0, c.item_harm_sd, c.n_items) + c.sensitive_harm_shift * ((tags & sensitive_mask) != 0)
    dur = np.rint(c.duration_median_ms * np.exp(rng.normal(0.0, c.duration_sigma, c.n_items))).astype(np.int64)
    dur = np.maximum(dur, 1_000)
    dur[rng.random(c.n_items) < c.zero_duration_share] = 0
    tag_lists = tuple(tuple(TAGS[t] for t in range(n_tags) if m >> t & 1) for m in tags.tolist())

    # users: Table-1 band, log-uniform rate inside it
    band = rng.choice(4, size=c.n_users, p=np.asarray(c.band_shares, dtype=float))
    lo = np.array([c.rate_floor, BAND_EDGES[1], BAND_EDGES[2], BAND_EDGES[3]])[band]
    hi = np.array([BAND_EDGES[1], BAND_EDGES[2], BAND_EDGES[3], c.rate_cap])[band]
    rate = np.exp(np.log(lo) + rng.random(c.n_users) * (np.log(hi) - np.log(lo)))
    rate = np.minimum(rate, np.nextafter(hi, 0))  # keep the band exact in floating point
    activity = np.exp(rng.normal(0.0, c.activity_sigma, c.n_users))
    activity /= activity.sum()
    # averse tags: mostly sensitive ones, 0-2 per user
    n_av = rng.binomial(2, c.averse_tag_rate / 2, c.n_users)
    av1 = rng.integers(0, _N_SENSITIVE, c.n_users)
    av2 = rng.integers(0, n_tags, c.n_users)
    averse = np.where(n_av >= 1, np.uint32(1) << av1.astype(np.uint32), np.uint32(0))
    averse |= np.where(n_av >= 2, np.uint32(1) << av2.astype(np.uint32), np.uint32(0))
    averse = averse.astype(np.uint32)

    # catalogue walks: distinct fresh items per user (gcd(stride, N) = 1)
    offset = rng.integers(0, c.n_items, c.n_users)
    stride = rng.integers(1, c.n_items, c.n_users)
    for j in np.flatnonzero(np.gcd(stride, c.n_items) != 1).tolist():
        while math.gcd(int(stride[j]), c.n_items) != 1:
            stride[j] = rng.integers(1, c.n_items)
    if c.n_items == 1:
        stride[:] = 1

    is_c = rng.random(c.n_users) < c.constraint_user_share
    constraint_at = np.where(is_c, rng.geometric(0.2, c.n_users) - 1, -1)
    unblocks = is_c & (rng.random(c.n_users) < c.unblock_share)
    unblock_at = np.where(unblocks, constraint_at + rng.geometric(0.05, c.n_users), -1)
    # a constraint user with no averse tag blocks one sensitive tag
    no_av = is_c & (averse == 0)
    averse[no_av] = (np.uint32(1) << rng.integers(0, _N_SENSITIVE, int(no_av.sum())).astype(np.uint32))

    masks, inverse = np.unique(averse, return_inverse=True)
    hit_by_mask = np.array([np.mean((tags & m) != 0) for m in masks.tolist()])
    log_scale = _flag_scales(c, harm, tags, masks, inverse, rate * c.rate_multiplier)
    # moments of z over (user, fresh item) pairs, for standardising the score
    hit = hit_by_mask[inverse]
    z_mean = float(harm.mean() + c.aversion_strength * np.average(hit, weights=activity))
    z_var = harm.var() + c.pair_harm_sd**2 + c.aversion_strength**2 * np.average(hit * (1 - hit), weights=activity)

    for arr in (tags, harm, dur, rate, band, activity, averse, log_scale, offset, stride, constraint_at, unblock_at):
        arr.setflags(write=False)
    return World(
        config=c, item_tags=tags, item_duration_ms=dur, item_harm=harm, user_rate=rate,
        user_band=band, user_activity=activity, user_averse=averse, user_log_scale=log_scale,
        user_walk_offset=offset, user_walk_stride=stride, constraint_at=constraint_at,
        unblock_at=unblock_at, z_mean=z_mean, z_sd=float(math.sqrt(z_var)), item_tag_lists=tag_lists,
    )


def generate_events(config: WorldConfig, world: World | None = None) -> Iterator[tuple[str, dict]]:
    """Stream ``(topic, event)`` pairs of ``config.n_slates`` slates in event-time order.

    Topics are those of SPEC §2 and every event has exactly its fields. Memory
    is bounded (see the module docstring); the stream is a pure function of
    ``config`` (and of ``world``, which defaults to ``build_world(config)``).

    Examples
    --------
    >>> ev = list(generate_events(WorldConfig(n_slates=50, n_users=20, n_items=1000)))
    >>> ev[0][0], sorted(ev[0][1])
    ('impressions', ['event_id', 'items', 'k', 'policy_applied', 'slate_id', 'ts', 'user_id'])
    >>> all(a[1]["ts"] <= b[1]["ts"] for a, b in zip(ev, ev[1:]))
    True
    """
    return _Engine(config, world or build_world(config)).run()


class _Engine:
    """Mutable per-run state; one instance per call of :func:`generate_events`."""

    def __init__(self, config: WorldConfig, world: World):
        c = self.c = config
        if world.config != config:
            raise ValueError("world was built from a different config")
        self.w = world
        self.rng = np.random.default_rng([c.seed, 0xE7E47])
        self.hash_key = int(np.random.default_rng([c.seed, 0x4A54]).integers(0, 2**63))
        H = c.history_max
        self.hist_item = np.zeros((c.n_users, H), dtype=np.int64)
        self.hist_w = np.zeros((c.n_users, H), dtype=np.float64)  # first-view W%, nan if unknown
        self.hist_flag = np.zeros((c.n_users, H), dtype=bool)
        self.hist_len = np.zeros(c.n_users, dtype=np.int64)
        self.hist_ptr = np.zeros(c.n_users, dtype=np.int64)  # next write slot
        self.walk = np.zeros(c.n_users, dtype=np.int64)
        self.slates_seen = np.zeros(c.n_users, dtype=np.int64)
        self.blocked = np.zeros(c.n_users, dtype=np.uint32)
        self.user_names = np.array([f"u{j}" for j in range(c.n_users)], dtype=object)
        self.item_names = np.array([f"i{j}" for j in range(c.n_items)], dtype=object)
        self.item_tag_objs = np.empty(c.n_items, dtype=object)
        self.item_tag_objs[:] = world.item_tag_lists
        self.n_event = 0

    # ---------------------------------------------------------------- helpers
    def _ids(self, n: int) -> list[str]:
        p, s = self.c.id_prefix, self.n_event
        self.n_event += n
        return [f"{p}{j}" for j in range(s, s + n)]

    def _tags(self, masks: np.ndarray) -> list[list[str]]:
        return [[TAGS[t] for t in range(len(TAGS)) if m >> t & 1] for m in masks.tolist()]

    def run(self) -> Iterator[tuple[str, dict]]:
        c = self.c
        # Events not yet due, as a heap of (ts key, arrival number, event): a batch's
        # watches and flags run up to minutes of event time past its slates, i.e. over
        # many later batches; re-sorting them all with every batch made a long world's
        # events ~10x slower to produce (the live benchmark's producer fell to 3k/s).
        # Arrival numbers break ties in arrival order, as the stable sort did.
        pending: list[tuple[float, int, tuple[str, dict]]] = []
        arrival = itertools.count()
        for b0 in range(0, c.n_slates, c.batch_slates):
            nb = min(c.batch_slates, c.n_slates - b0)
            # the batch's ~10^4 new dicts are acyclic: pausing the cyclic GC while they are built
            # (reference counting still frees them) saves ~40% of the time; the previous state
            # is restored before anything is yielded
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                keys, events = self._batch(b0, nb)
            finally:
                if gc_was_enabled:
                    gc.enable()
            for key, ev in zip(keys.tolist(), events):
                heapq.heappush(pending, (key, next(arrival), ev))
            # nothing later can sort before the next batch's first impression
            horizon = c.start_ts + (b0 + nb) / c.slates_per_second if b0 + nb < c.n_slates else float("inf")
            while pending and pending[0][0] < horizon:
                yield heapq.heappop(pending)[2]

    def _batch(self, b0: int, nb: int) -> tuple[np.ndarray, list[tuple[str, dict]]]:
        c, w, rng, k, H = self.c, self.w, self.rng, self.c.k, self.c.history_max
        slate_no = np.arange(b0, b0 + nb)
        ts = c.start_ts + slate_no / c.slates_per_second
        users = rng.choice(c.n_users, size=nb, p=w.user_activity)
        occ = self.slates_seen[users] + _cumcount(users)  # ordinal of this slate for its user
        np.add.at(self.slates_seen, users, 1)

        keys: list[np.ndarray] = []
        events: list[tuple[str, dict]] = []

        # ---- constraints (just before the slate they first apply to)
        blk = np.flatnonzero(occ == w.constraint_at[users])
        unb = np.flatnonzero(occ == w.unblock_at[users])
        cons_rows = np.concatenate([blk, unb])
        if len(cons_rows):
            is_block = np.r_[np.ones(len(blk), bool), np.zeros(len(unb), bool)]
            cu = users[cons_rows]
            declared = rng.random(len(cons_rows)) < c.declared_share
            tl = self._tags(w.user_averse[cu])
            ids = self._ids(len(cons_rows))
            for j, (u, isb, dec, t, eid) in enumerate(zip(cu.tolist(), is_block.tolist(), declared.tolist(), tl, ids)):
                ev = {"event_id": eid, "user_id": f"u{u}",
                      "block_tags": t if isb else [], "unblock_tags": [] if isb else t,
                      "source": "declared" if dec else "inferred", "ts": float(ts[cons_rows[j]] - 1e-3)}
                events.append(("constraints", ev))
            keys.append(ts[cons_rows] - 1e-3)
        # Each slate is filtered by the user's rules in force at its own ts: walk the slates of users
        # whose rules change in this batch in order. (The state after the whole batch served a user's
        # earlier slates of the batch unfiltered once an unblock came later in it: constraint
        # violations on policy-applied slates, which must be 0.)
        blocked = self.blocked[users]
        if len(cons_rows):
            for r in np.flatnonzero(np.isin(users, users[cons_rows])).tolist():
                u = users[r]
                if occ[r] == w.constraint_at[u]:
                    self.blocked[u] = w.user_averse[u]
                if occ[r] == w.unblock_at[u]:
                    self.blocked[u] = 0
                blocked[r] = self.blocked[u]

        # ---- which slots repeat a previously seen item
        ulen = self.hist_len[users]
        rep = rng.random((nb, k)) < c.repeat_share
        rc = np.cumsum(rep, axis=1) - 1  # repeat ordinal within the slate
        rep &= rc < ulen[:, None]  # distinct history entries only
        start = rng.integers(0, 1 << 30, nb) % np.maximum(ulen, 1)
        back = (start[:, None] + rc) % np.maximum(ulen, 1)[:, None]
        ring = (self.hist_ptr[users][:, None] - 1 - back) % H  # ring index of the repeated entry
        uu = np.broadcast_to(users[:, None], (nb, k))
        items = np.where(rep, self.hist_item[uu, ring], 0)

        # ---- fresh items along each user's catalogue walk
        fresh = ~rep
        fu = uu[fresh]
        j = self.walk[fu] + _cumcount(fu)
        np.add.at(self.walk, fu, 1)
        items[fresh] = (w.user_walk_offset[fu] + w.user_walk_stride[fu] * j) % c.n_items

        # ---- latent unwantedness, score, rank score
        itags = w.item_tags[items]
        av_hit = (itags & w.user_averse[uu]) != 0
        z = w.item_harm[items] + c.aversion_strength * av_hit + c.pair_harm_sd * pair_normal(self.hash_key, uu, items)
        rho = c.informativeness
        zt = (z - w.z_mean) / w.z_sd
        score = ndtr(-(rho * zt + math.sqrt(max(0.0, 1.0 - rho * rho)) * rng.standard_normal((nb, k))))
        dur = w.item_duration_ms[items]
        dur_eff = np.where(dur > 0, dur, c.duration_median_ms)  # stay time base for photos
        e = rng.normal(0.0, c.engagement_sd, (nb, k)) + np.where(rep, c.repeat_watch_boost, 0.0)
        mu = math.log(c.watch_ratio_median)
        rank_score = dur_eff / 1000.0 * np.exp(mu + e + 0.5 * c.watch_noise_sd**2)

        # ---- policy: holdout slates show all k; others drop blocked tags (and s < λ)
        policy = rng.random(nb) >= c.holdout_share
        shown = np.ones((nb, k), dtype=bool)
        drop = (itags & blocked[:, None]) != 0
        if c.policy_lambda is not None:
            drop |= score < c.policy_lambda
        shown &= ~(drop & policy[:, None])
        # rank order: by rank score, shown items first
        order = np.argsort(np.where(shown, -rank_score, np.inf), axis=1, kind="stable")
        take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
        items, score, rank_score, shown, rep, ring, itags, dur, dur_eff, e, z = map(
            take, (items, score, rank_score, shown, rep, ring, itags, dur, dur_eff, e, z))

        # ---- watch
        zero = rng.random((nb, k)) < c.zero_watch_share
        ratio = np.exp(mu + e + c.watch_noise_sd * rng.standard_normal((nb, k)))
        watch_ms = np.where(zero, 0, np.maximum(1, np.rint(dur_eff * ratio))).astype(np.int64)
        watch_s = watch_ms / 1000.0
        skip_s = np.where(shown, watch_s + 0.5, 0.0)  # 0.5 s to swipe to the next item
        view_start = ts[:, None] + 1.0 + np.minimum(np.cumsum(skip_s, axis=1) - skip_s, c.session_cap)
        watch_ts = view_start + watch_s
        wpct = np.where(dur > 0, 100.0 * watch_ms / np.maximum(dur, 1), np.nan)

        # ---- flags: first views by the user's rate, repeats by Property 1
        p_first = np.exp(np.minimum(0.0, w.user_log_scale[uu] + c.harm_concentration * z))
        h_w = self.hist_w[uu, ring]
        p_rep = np.where(self.hist_flag[uu, ring], c.reflag_flagged,
                         c.reflag_unflagged * np.exp(-np.nan_to_num(h_w, nan=0.0) / c.reflag_scale))
        flagged = shown & (rng.random((nb, k)) < np.where(rep, p_rep, p_first))
        flag_ts = np.minimum(view_start + rng.random((nb, k)) * (watch_s + c.flag_lag), ts[:, None] + c.label_delay)
        kind_report = rng.random((nb, k)) < c.report_share

        # ---- update bounded history: repeat flags first, then fresh first views
        rf = rep & flagged
        self.hist_flag[uu[rf], ring[rf]] = True
        fv = shown & ~rep
        fu = uu[fv]
        nf = np.bincount(fu, minlength=c.n_users)
        cc = _cumcount(fu)
        keep = cc >= nf[fu] - H  # only the last H first views of a user can survive
        fu_k, cc_k = fu[keep], cc[keep]
        pos = (self.hist_ptr[fu_k] + cc_k) % H
        self.hist_item[fu_k, pos] = items[fv][keep]
        self.hist_w[fu_k, pos] = wpct[fv][keep]
        self.hist_flag[fu_k, pos] = flagged[fv][keep]
        self.hist_ptr = (self.hist_ptr + nf) % H
        self.hist_len = np.minimum(self.hist_len + nf, H)

        # ---- impressions: one flat pass over shown slots (row-major, so each slate's shown
        # items are a contiguous run) and object arrays of names avoid per-item Python lookups
        rows, cols = np.nonzero(shown)
        flat_items = items[rows, cols]
        names_flat = self.item_names[flat_items].tolist()
        item_dicts = [
            {"item_id": n, "score": sc, "rank_score": rs, "tags": [*tg], "replacement": False}
            for n, sc, rs, tg in zip(names_flat, score[rows, cols].tolist(), rank_score[rows, cols].tolist(),
                                     self.item_tag_objs[flat_items].tolist())
        ]
        bounds = np.r_[0, np.cumsum(shown.sum(axis=1))].tolist()
        slate_ids = [f"s-{c.seed}-{n}" for n in slate_no.tolist()]
        imp_ids = self._ids(nb)
        unames = self.user_names[users].tolist()
        events.extend(
            ("impressions", {"event_id": eid, "user_id": un, "slate_id": sid, "ts": t, "k": k, "policy_applied": pol,
                             "items": item_dicts[a:b]})
            for eid, un, sid, t, pol, a, b in zip(imp_ids, unames, slate_ids, ts.tolist(), policy.tolist(),
                                                  bounds[:-1], bounds[1:])
        )
        keys.append(ts)

        # ---- watch events (every shown item is viewed, possibly for 0 ms)
        wts = watch_ts[rows, cols]
        wkey = wts.copy()
        if c.out_of_order_share > 0:
            late = rng.random(len(wkey)) < c.out_of_order_share
            wkey[late] += rng.random(int(late.sum())) * c.out_of_order_lag
        ids = self._ids(len(rows))
        wu = self.user_names[users[rows]].tolist()
        events.extend([("watch", {"event_id": eid, "user_id": u, "item_id": i, "watch_ms": wm, "duration_ms": d, "ts": t})
                       for eid, u, i, wm, d, t in zip(ids, wu, names_flat, watch_ms[rows, cols].tolist(),
                                                      dur[rows, cols].tolist(), wts.tolist())])
        keys.append(wkey)

        # ---- flag events
        rows, cols = np.nonzero(flagged)
        fts = flag_ts[rows, cols]
        fkey = fts.copy()
        if c.out_of_order_share > 0:
            late = rng.random(len(fkey)) < c.out_of_order_share
            fkey[late] += rng.random(int(late.sum())) * c.out_of_order_lag
        ids = self._ids(len(rows))
        for eid, u, i, rep_k, t in zip(ids, self.user_names[users[rows]].tolist(),
                                       self.item_names[items[rows, cols]].tolist(),
                                       kind_report[rows, cols].tolist(), fts.tolist()):
            events.append(("flags", {"event_id": eid, "user_id": u, "item_id": i,
                                     "kind": "report" if rep_k else "not_interested", "ts": t}))
        keys.append(fkey)

        # ---- forget: after the slate's labels are in; clears the generator's memory too
        if c.forget_share > 0:
            fr = np.flatnonzero(rng.random(nb) < c.forget_share)
            if len(fr):
                fts = ts[fr] + c.label_delay + 1.0
                ids = self._ids(len(fr))
                for eid, u, t in zip(ids, self.user_names[users[fr]].tolist(), fts.tolist()):
                    events.append(("forget", {"event_id": eid, "user_id": u, "ts": t}))
                keys.append(fts)
                fu = users[fr]
                self.hist_len[fu] = 0
                self.hist_ptr[fu] = 0
                self.blocked[fu] = 0

        return np.concatenate(keys), events
