"""Prometheus metrics of a worker (SPEC "Monitoring") and of a ranker's client, in one registry per app.

No module-level registry: each :class:`Metrics` owns its own
``CollectorRegistry``, so two workers (or tests) in one process never share
counters. :class:`RankerMetrics` reads a :class:`streams.ranker.RankerClient` at
each scrape (``riskgate_ranker_*``). Every name starts with ``riskgate_``; the
Grafana dashboard and the alert rules in ``deploy/`` use only the names listed
in :data:`METRIC_NAMES` (a test checks that).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .topics import SAFE_POOLS, THRESHOLDS

__all__ = ["Metrics", "RankerMetrics", "METRIC_NAMES"]


class Metrics:
    """All metrics a worker exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # The process's CPU and memory (riskgate_process_cpu_seconds_total, ..._resident_memory_bytes;
        # on Linux, read from /proc at each scrape). One Python thread does a worker's work, so its
        # CPU near 1 core is what says it is saturated, and CPU over records applied is what one
        # record costs: capacity is planned from those, not from the fetch-wait share.
        ProcessCollector(namespace="riskgate", registry=r)
        # stream health
        self.events = Counter("riskgate_events", "Events consumed, by type and outcome (ok, late, duplicate, "
                              "invalid, pending_overflow, unreadable_state, replayed, erased).", ["type", "outcome"],
                              registry=r)
        self.dlq = Counter("riskgate_dlq", "Events sent to the dead-letter topic, by source topic and reason.",
                           ["topic", "reason"], registry=r)
        self.lag = Gauge("riskgate_consumer_lag", "Messages behind the log end, by topic and partition.",
                         ["topic", "partition"], registry=r)
        self.watermark = Gauge("riskgate_watermark_seconds", "Event-time watermark (max ts - allowed lateness), "
                               "by partition.", ["partition"], registry=r)
        self.pending = Gauge("riskgate_pending_slates", "Slates awaiting maturity on this worker.", registry=r)
        self.matured = Counter("riskgate_slates_matured", "Slates that matured, by kind (holdout, applied).",
                               ["kind"], registry=r)
        self.refused = Counter("riskgate_window_refused", "Mature holdout slates whose window bucket had "
                               "already aged out.", registry=r)
        self.window_slates = Gauge("riskgate_window_slates", "Slates in the calibration window, by strategy and "
                                   "group.", ["strategy", "group"], registry=r)
        self.recompute = Histogram("riskgate_recompute_seconds", "Time to recompute every threshold.", registry=r,
                                   buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.healthy = Gauge("riskgate_healthy", "1 when the worker is connected and processing, else 0.", registry=r)
        # thresholds
        self.lam = Gauge("riskgate_threshold_lambda", "Published λ̂ (+Inf when filter_all), by strategy, group, "
                         "alpha.", ["strategy", "group", "alpha"], registry=r)
        self.filter_all = Gauge("riskgate_threshold_filter_all", "1 when λ̂ = +inf was published.",
                                ["strategy", "group", "alpha"], registry=r)
        self.risk_at_lambda = Gauge("riskgate_threshold_risk_at_lambda", "Window risk R̂(λ̂).",
                                    ["strategy", "group", "alpha"], registry=r)
        self.version = Gauge("riskgate_threshold_version", "Last published version, by strategy and group.",
                             ["strategy", "group"], registry=r)
        self.published_at = Gauge("riskgate_threshold_published_timestamp_seconds", "Wall time of the last "
                                  "threshold update (threshold age = time() - this).", ["strategy", "group"],
                                  registry=r)
        # the guarantee's live checks
        self.target_risk = Gauge("riskgate_target_risk", "Configured α (for plotting against realised risk).",
                                 ["alpha"], registry=r)
        self.min_slates = Gauge("riskgate_min_slates", "Configured RISKGATE_MIN_SLATES: a group with fewer "
                                "slates has no λ̂ of its own and rankers fall back from it.", registry=r)
        self.realised_risk = Gauge("riskgate_realised_risk", "Mean flagged fraction of mature policy-applied "
                                   "slates, by the α the ranker applied.", ["alpha"], registry=r)
        self.realised_slates = Counter("riskgate_realised_slates", "Mature policy-applied slates, by α applied.",
                                       ["alpha"], registry=r)
        # The gauge above is a mean since this worker's partitions were last assigned: weeks of
        # traffic dilute a breach, and a fresh assignment's few slates stand for all of it. The
        # alert divides increases of this sum by those of the slates instead (recent traffic only).
        self.realised_risk_sum = Counter("riskgate_realised_risk_sum", "Sum of the flagged fractions of "
                                         "mature policy-applied slates, by α applied (÷ slates = realised "
                                         "risk over any range).", ["alpha"], registry=r)
        self.replacements_shown = Counter("riskgate_replacements_shown", "Replacement items in mature "
                                          "policy-applied slates.", registry=r)
        self.replacements_flagged = Counter("riskgate_replacements_flagged", "Replacement items flagged again "
                                            "(Property 1 failures).", registry=r)
        self.property1 = Gauge("riskgate_property1_reflag_rate", "P(h=1 | repeat, unflagged first view, W% > β), "
                               "since this worker's partitions were assigned.", ["beta"], registry=r)
        # The same as counters, so that a range reads recent traffic (the gauge is diluted by all of it)
        self.property1_repeats = Counter("riskgate_property1_repeats", "Repeat views on mature slates of items "
                                         "unflagged at a first view with W% > β, by β.", ["beta"], registry=r)
        self.property1_reflagged = Counter("riskgate_property1_reflagged", "Of riskgate_property1_repeats, those "
                                           "flagged (÷ repeats = the Property-1 curve over any range).", ["beta"],
                                           registry=r)
        self.served_items = Counter("riskgate_policy_served_items", "Items served on policy-applied slates.",
                                    registry=r)
        self.violations = Counter("riskgate_constraint_violations", "Items served on policy-applied slates "
                                  "with a tag the user blocked (must stay 0).", registry=r)
        # throughput and freshness (riskgate bench stream reads these)
        self.applied = Counter("riskgate_records_applied", "Input records applied (valid or dead-lettered), "
                               "counted when applied; they are acked at the next flush.", registry=r)
        self.first_record_at = Gauge("riskgate_first_record_timestamp_seconds", "Wall time this process started "
                                     "applying its first input batch.", registry=r)
        self.last_applied_at = Gauge("riskgate_last_applied_timestamp_seconds", "Wall time this process finished "
                                     "applying its latest input batch.", registry=r)
        self.flush = Histogram("riskgate_flush_seconds", "Time to write changed users and ack their records.",
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.fenced = Counter("riskgate_writes_fenced", "Flushes, snapshot rounds and publications skipped, and "
                              "revokes whose unflushed state was dropped, because this worker could not show it "
                              "still belonged to its group (no heartbeat answered for half the session timeout), "
                              "by what (flush, snapshot, publish, lost).", ["what"], registry=r)
        for what in ("flush", "snapshot", "publish", "lost"):
            self.fenced.labels(what)  # (at 0: rate() cannot see a series' first sample)
        self.changelog_records = Counter("riskgate_changelog_records", "Records (changes and tombstones) this "
                                         "worker sent to the users table's changelog.", registry=r)
        self.changelog_bytes = Counter("riskgate_changelog_bytes", "Bytes of keys and values in those records "
                                       "(before compression): the changelog's write volume.", registry=r)
        self.users_cached = Gauge("riskgate_users_cached", "Users held in memory by this worker's write-back "
                                  "caches (at most RISKGATE_USER_CACHE per partition): most of its RSS.", registry=r)
        self.fetch_wait = Counter("riskgate_fetch_wait_seconds", "Time the input loop waited for its next fetch: "
                                  "all of it when caught up; while behind, the share of time not spent working "
                                  "(near 0: the worker is the bottleneck).", registry=r)
        self.fetches = Counter("riskgate_fetches", "Fetches that brought records, of any topic (input records "
                               "per fetch: at most riskgate_records_applied_total / this).", registry=r)
        self.restored = Counter("riskgate_changelog_restored_records", "Changelog records written to a table's "
                                "local store while restoring it, by table (a fetch at a time: streams.restore).",
                                ["table"], registry=r)
        self.unreadable_users = Gauge("riskgate_unreadable_users", "Users whose stored state this worker cannot "
                                      "read (corrupt, or from a newer riskgate): set aside, their events "
                                      "dead-lettered as unreadable_state.", registry=r)
        self.inputs_age = Gauge("riskgate_threshold_inputs_age_seconds", "computed_at minus inputs_through of the "
                                "last publication: how old the newest inputs every partition had applied were.",
                                ["strategy", "group"], registry=r)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class RankerMetrics:
    """What a ranker's client holds and whether it follows riskgate, read from the client at each scrape.

    ``riskgate_ranker_threshold_version`` is the version of each shared group's
    threshold the ranker holds (the book keeps no ``strategy:user:<id>`` key: a
    user's own λ̂ is read from its pool), to compare with the
    ``riskgate_threshold_version`` the workers published (alert ``RiskgateRankerBehind``).
    """

    def __init__(self, client) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace="riskgate_ranker", registry=r)  # the book's memory: why shards exist
        r.register(_RankerCollector(client))
        # Served slates reported to `impressions` (SPEC §2): a ranker that stops reporting them
        # starves the calibration window, while every threshold is still republished on time.
        self.impressions = Counter("riskgate_ranker_impressions", "Served slates produced to the impressions "
                                   "topic, by outcome (sent: acknowledged; failed: the broker refused or timed out).",
                                   ["outcome"], registry=r)
        # (at 0 from the start: rate() and increase() cannot see a series' first sample, so the
        # first failures were invisible to RiskgateRankerImpressionsFailing and the dashboard)
        for outcome in ("sent", "failed"):
            self.impressions.labels(outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RankerCollector:
    def __init__(self, client) -> None:
        self.client = client

    def collect(self):
        c, book = self.client, self.client.book
        yield GaugeMetricFamily("riskgate_ranker_following", "1 while the client reads riskgate's outputs (its read "
                                "loop has not failed), else 0.", value=float(c.healthy))
        yield GaugeMetricFamily("riskgate_ranker_ready", "1 once the client has caught up with riskgate's outputs as "
                                "they were when it started (serve only then), else 0.", value=float(c.ready))
        lag = GaugeMetricFamily("riskgate_ranker_lag_records", "Records of each output topic the client has not "
                                "taken yet (high watermark of its latest fetch minus its position), by topic.",
                                labels=["topic"])
        for topic, n in sorted(c.lag().items()):
            lag.add_metric([topic], float(n))
        yield lag
        yield GaugeMetricFamily("riskgate_ranker_pools", "Users' safe-pools values held (this shard's).",
                                value=float(len(book.pools)))
        yield GaugeMetricFamily("riskgate_ranker_thresholds", "risk-thresholds keys held.",
                                value=float(len(book.thresholds)))
        rejected = CounterMetricFamily("riskgate_ranker_rejected", "Output values the client refused (not JSON, or "
                                       "missing what it reads), by topic; each key kept its last good value.",
                                       labels=["topic"])
        for topic in sorted({THRESHOLDS, SAFE_POOLS} | set(book.rejected)):  # (both at 0 from the start)
            rejected.add_metric([topic], float(book.rejected.get(topic, 0)))
        yield rejected
        version = GaugeMetricFamily("riskgate_ranker_threshold_version", "Version of each shared group's threshold "
                                    "the ranker holds, by strategy and group.", labels=["strategy", "group"])
        for key, msg in sorted(book.thresholds.items()):
            strategy, _, group = key.partition(":")
            version.add_metric([strategy, group], float(msg["version"]))
        yield version


_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}


def _names() -> frozenset[str]:
    # From the metric families where they have no samples: a labelled metric has
    # none until a label set is used, but its series names are fixed. Where they
    # have (the process collector's: no _created), from the samples.
    from .ranker import RankerClient

    out = set()
    families = [*Metrics().registry.collect(), *RankerMetrics(RankerClient("unused:1")).registry.collect()]
    for family in families:
        if family.samples:
            out.update(sample.name for sample in family.samples)
        else:
            out.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(out)


#: Every series name a worker or a ranker's client can export (counters with ``_total``, histograms with ``_bucket``).
METRIC_NAMES: frozenset[str] = _names()
