"""Writes alerts_test.yml (the promtool unit tests of alerts.yml) from the cases below.

promtool compares annotations exactly, so this fills ``exp_annotations`` by
rendering the alert templates with the expected labels and value. After
changing alerts.yml or a case: ``python deploy/prometheus/make_alerts_test.py``
(tests/test_deploy.py checks the committed file is up to date).
"""
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yml"
rules = {r["alert"]: r for g in yaml.safe_load(open(ALERTS))["groups"] for r in g["rules"]}

def render(alert, labels, value):
    out = {}
    for k, v in rules[alert]["annotations"].items():
        v = re.sub(r"\{\{ \$value \| humanizePercentage \}\}", value or "", v)
        v = re.sub(r"\{\{ \$value \| humanize \}\}", value or "", v)
        v = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
        assert "{{" not in v, v
        out[k] = v
    return out

def s(name, labels, values, job="riskgate"):
    lab = ",".join([f'job="{job}"'] + [f'{k}="{v}"' for k, v in labels.items()])
    return {"series": f"{name}{{{lab}}}", "values": values}

tests = []
def case(comment, series, checks):
    t = {"name": comment, "interval": "1m", "input_series": series, "alert_rule_test": []}
    for at, alert, expected in checks:
        exp = []
        for labels, value in expected:
            exp.append({"exp_labels": {"severity": rules[alert]["labels"]["severity"], **labels},
                        "exp_annotations": render(alert, labels, value)})
        t["alert_rule_test"].append({"eval_time": at, "alertname": alert, "exp_alerts": exp})
    tests.append(t)

RR, CV, P1 = "RiskgateRealisedRiskAboveAlpha", "RiskgateConstraintViolation", "RiskgateProperty1ReflagRateHigh"
ST, MI, FA = "RiskgateThresholdsStale", "RiskgateThresholdsMissing", "RiskgateFilterAllPublished"
DL, LG, UH = "RiskgateDLQRateHigh", "RiskgateConsumerLagGrowing", "RiskgateWorkerUnhealthy"
UR = "RiskgateUnreadableUserState"
i1, i2, i3 = {"instance": "w1"}, {"instance": "w2"}, {"instance": "w3"}

case("realised risk above alpha over the last hour, weighted over two workers, sustained 30m", [
    s("riskgate_target_risk", {**i1, "alpha": "0.05"}, "0.05x60"),
    s("riskgate_target_risk", {**i2, "alpha": "0.05"}, "0.05x60"),
    s("riskgate_target_risk", {**i1, "alpha": "0.1"}, "0.1x60"),
    s("riskgate_target_risk", {**i2, "alpha": "0.1"}, "0.1x60"),
    # alpha 0.05: 50 slates a minute at 0.08 and 50 at 0.06 -> 0.07 > 0.05
    s("riskgate_realised_risk_sum_total", {**i1, "alpha": "0.05"}, "0+4x60"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "0.05"}, "0+50x60"),
    s("riskgate_realised_risk_sum_total", {**i2, "alpha": "0.05"}, "0+3x60"),
    s("riskgate_realised_slates_total", {**i2, "alpha": "0.05"}, "0+50x60"),
    # alpha 0.1: one worker above (0.12, 10 a minute), weighted mean 0.096 <= 0.1
    s("riskgate_realised_risk_sum_total", {**i1, "alpha": "0.1"}, "0+1.2x60"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "0.1"}, "0+10x60"),
    s("riskgate_realised_risk_sum_total", {**i2, "alpha": "0.1"}, "0+3.6x60"),
    s("riskgate_realised_slates_total", {**i2, "alpha": "0.1"}, "0+40x60"),
], [
    ("20m", RR, []),  # pending, not yet 30m
    ("40m", RR, [({"alpha": "0.05"}, "7%")]),
])

case("realised risk: too few slates, or above alpha only briefly", [
    s("riskgate_target_risk", {**i1, "alpha": "0.05"}, "0.05x60"),
    s("riskgate_target_risk", {**i1, "alpha": "0.2"}, "0.2x60"),
    # far above alpha but 300 slates an hour, under 500: noise, not evidence
    s("riskgate_realised_risk_sum_total", {**i1, "alpha": "0.05"}, "0+1.5x60"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "0.05"}, "0+5x60"),
    # 0.25 for 10 minutes, then 0.15: the hour's mean is above alpha until ~20m only
    s("riskgate_realised_risk_sum_total", {**i1, "alpha": "0.2"}, "0+12.5x10 132.5+7.5x49"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "0.2"}, "0+50x60"),
], [
    ("40m", RR, []),
    ("60m", RR, []),
])

# Two days at 0.03, then 0.08: the mean since the worker's partitions were assigned
# (the riskgate_realised_risk gauge, which the alert used to read) is still ~0.031
# two hours into the breach; the last hour's is 0.08.
case("realised risk: a breach after two healthy days fires within the hour", [
    s("riskgate_target_risk", {**i1, "alpha": "0.05"}, "0.05x3000"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "0.05"}, "0+50x3000"),
    s("riskgate_realised_risk_sum_total", {**i1, "alpha": "0.05"}, "0+1.5x2880 4324+4x119"),
    s("riskgate_realised_risk", {**i1, "alpha": "0.05"}, "0.03x3000"),
], [
    ("2870m", RR, []),
    ("2930m", RR, []),  # above since ~2904m (24 minutes of breach in the hour): pending
    ("2940m", RR, [({"alpha": "0.05"}, "8%")]),
])

RU = "RiskgateRealisedRiskUnchecked"
case("realised risk unchecked: slates with no alpha, or one not published, for 30m; published ones are quiet", [
    s("riskgate_target_risk", {**i1, "alpha": "0.05"}, "0.05x90"),
    s("riskgate_target_risk", {**i1, "alpha": "0.1"}, "0.1x90"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "0.05"}, "0+50x90"),
    s("riskgate_realised_slates_total", {**i2, "alpha": "0.1"}, "0+50x90"),
    s("riskgate_realised_slates_total", {**i1, "alpha": "unknown"}, "0+1x90"),
    s("riskgate_realised_slates_total", {**i2, "alpha": "0.3"}, "0+2x90"),
], [
    ("20m", RU, []),  # since 1m: pending
    ("45m", RU, [({"alpha": "0.3"}, "90"), ({"alpha": "unknown"}, "45")]),  # (45m of data in the hour)
])

case("constraint violation fires at once on any increase", [
    s("riskgate_constraint_violations_total", i1, "0 0 0 1 1 1 1"),
    s("riskgate_constraint_violations_total", i2, "0x6"),
], [
    ("2m", CV, []),
    ("5m", CV, [({}, "1")]),
])

case("constraint violation: none, a worker restart, one that aged out", [
    s("riskgate_constraint_violations_total", i1, "0x30"),
    s("riskgate_constraint_violations_total", i2, "5 5 5 0x30"),
], [
    ("6m", CV, []),
    ("25m", CV, []),
])

case("Property 1: 2% of replacements re-flagged for 30m", [
    s("riskgate_replacements_shown_total", i1, "0+10x120"),
    s("riskgate_replacements_flagged_total", i1, "0+0.2x120"),
], [
    ("30m", P1, []),
    ("90m", P1, [({}, "2%")]),
])

case("Property 1: rate under the bound, or too few replacements shown", [
    s("riskgate_replacements_shown_total", i1, "0+10x120"),
    s("riskgate_replacements_flagged_total", i1, "0+0.05x120"),
    s("riskgate_replacements_shown_total", i2, "0x120"),
    s("riskgate_replacements_flagged_total", i2, "0x120"),
], [
    ("90m", P1, []),
])

case("Property 1: high rate on a trickle of replacements", [
    s("riskgate_replacements_shown_total", i1, "0+1x120"),
    s("riskgate_replacements_flagged_total", i1, "0+0.5x120"),
], [
    ("90m", P1, []),
])

case("thresholds stale: one key stops, another moves to a new aggregator owner", [
    s("up", i1, "1x40"),
    s("up", i2, "1x40"),
    # replace:global last published at 10m by w1, never again
    s("riskgate_threshold_published_timestamp_seconds", {**i1, "strategy": "replace", "group": "global"},
      "0+60x10 600x30"),
    # remove:global: w1 lost the aggregator at 10m (its gauge lingers), w2 took over
    s("riskgate_threshold_published_timestamp_seconds", {**i1, "strategy": "remove", "group": "global"},
      "0+60x10 600x30"),
    s("riskgate_threshold_published_timestamp_seconds", {**i2, "strategy": "remove", "group": "global"},
      "_x10 660+60x30"),
], [
    ("18m", ST, []),  # stale since 15m, pending for 5m
    ("25m", ST, [({"strategy": "replace", "group": "global"}, None)]),
    ("25m", MI, []),
])

case("thresholds missing: workers up, nothing ever published", [
    s("up", i1, "1x30"),
    s("riskgate_healthy", i1, "1x30"),
], [
    ("10m", MI, []),
    ("20m", MI, [({}, None)]),
    ("20m", ST, []),
])

case("thresholds missing: no worker up (WorkerUnhealthy covers it)", [
    s("up", i1, "0x30"),
], [
    ("20m", MI, []),
])

case("filter_all published for 15m on a fresh key", [
    s("riskgate_threshold_published_timestamp_seconds", {**i1, "strategy": "replace", "group": "global"},
      "0+60x40"),
    s("riskgate_threshold_filter_all", {**i1, "strategy": "replace", "group": "global", "alpha": "0.05"}, "1x40"),
    s("riskgate_threshold_filter_all", {**i1, "strategy": "replace", "group": "global", "alpha": "0.1"}, "0x40"),
], [
    ("10m", FA, []),
    ("20m", FA, [({"strategy": "replace", "group": "global", "alpha": "0.05"}, None)]),
])

case("filter_all: a band short of RISKGATE_MIN_SLATES (rankers fall back) is quiet, one with enough fires", [
    s("riskgate_min_slates", i1, "100x40"),
    s("riskgate_threshold_published_timestamp_seconds", {**i1, "strategy": "remove", "group": "band:high"},
      "0+60x40"),
    s("riskgate_threshold_filter_all", {**i1, "strategy": "remove", "group": "band:high", "alpha": "0.05"}, "1x40"),
    s("riskgate_window_slates", {**i1, "strategy": "remove", "group": "band:high"}, "5x40"),
    s("riskgate_threshold_published_timestamp_seconds", {**i1, "strategy": "remove", "group": "band:low"},
      "0+60x40"),
    s("riskgate_threshold_filter_all", {**i1, "strategy": "remove", "group": "band:low", "alpha": "0.05"}, "1x40"),
    s("riskgate_window_slates", {**i1, "strategy": "remove", "group": "band:low"}, "500x40"),
], [
    ("20m", FA, [({"strategy": "remove", "group": "band:low", "alpha": "0.05"}, None)]),
])

case("filter_all: lingering gauge of a former owner, user groups, a short spell", [
    s("riskgate_threshold_published_timestamp_seconds", {**i1, "strategy": "remove", "group": "global"},
      "0+60x10 600x30"),
    s("riskgate_threshold_filter_all", {**i1, "strategy": "remove", "group": "global", "alpha": "0.05"}, "1x40"),
    s("riskgate_threshold_published_timestamp_seconds", {**i2, "strategy": "remove", "group": "global"},
      "_x10 660+60x30"),
    s("riskgate_threshold_filter_all", {**i2, "strategy": "remove", "group": "global", "alpha": "0.05"},
      "_x10 0x30"),
    s("riskgate_threshold_published_timestamp_seconds", {**i2, "strategy": "remove", "group": "user:u1"},
      "0+60x40"),
    s("riskgate_threshold_filter_all", {**i2, "strategy": "remove", "group": "user:u1", "alpha": "0.05"}, "1x40"),
    s("riskgate_threshold_published_timestamp_seconds", {**i2, "strategy": "replace", "group": "band:low"},
      "0+60x40"),
    s("riskgate_threshold_filter_all", {**i2, "strategy": "replace", "group": "band:low", "alpha": "0.05"},
      "1x10 0x30"),
], [
    ("35m", FA, []),
])

case("DLQ: 2% of events rejected for 10m", [
    s("riskgate_events_total", {**i1, "type": "impression", "outcome": "ok"}, "0+100x30"),
    s("riskgate_events_total", {**i1, "type": "impression", "outcome": "invalid"}, "0+2x30"),
    s("riskgate_dlq_total", {**i1, "topic": "impressions", "reason": "schema"}, "0+2x30"),
], [
    ("5m", DL, []),
    ("20m", DL, [({}, "1.961%")]),
])

case("DLQ: half a percent rejected", [
    s("riskgate_events_total", {**i1, "type": "watch", "outcome": "ok"}, "0+200x30"),
    s("riskgate_events_total", {**i1, "type": "watch", "outcome": "invalid"}, "0+1x30"),
    s("riskgate_dlq_total", {**i1, "topic": "watch", "reason": "bad_json"}, "0+1x30"),
], [
    ("20m", DL, []),
])

case("unreadable user state for 5m fires per worker; one that a forget cleared in 3m does not", [
    s("riskgate_unreadable_users", i1, "0x5 2x25"),
    s("riskgate_unreadable_users", i2, "0x5 1x3 0x22"),
], [
    ("8m", UR, []),
    ("20m", UR, [({"instance": "w1"}, "2")]),
])

case("consumer lag: high and growing fires; high but flat, growing but small, lingering gauge do not", [
    s("riskgate_consumer_lag", {**i1, "topic": "impressions", "partition": "0"}, "0+100x40"),
    s("riskgate_consumer_lag", {**i1, "topic": "impressions", "partition": "1"}, "5000x40"),
    s("riskgate_consumer_lag", {**i1, "topic": "watch", "partition": "2"}, "0+10x40"),
    s("riskgate_consumer_lag", {**i1, "topic": "flags", "partition": "3"}, "5000x40"),
    s("riskgate_consumer_lag", {**i2, "topic": "flags", "partition": "3"}, "0x40"),
], [
    ("20m", LG, []),
    ("30m", LG, [({"topic": "impressions", "partition": "0"}, None)]),
])

case("worker unhealthy or not scraped for 5m", [
    s("up", i1, "1x30"),
    s("riskgate_healthy", i1, "1x5 0x25"),
    s("up", i2, "1x10 0x20"),
    s("riskgate_healthy", i2, "1x10 _x20"),
    s("up", i3, "1x30"),
    s("riskgate_healthy", i3, "1 0 0 1x27"),  # a short broker hiccup
], [
    ("8m", UH, []),
    ("20m", UH, [({"job": "riskgate", "instance": "w1"}, None), ({"job": "riskgate", "instance": "w2"}, None)]),
])


RNF, RNR, RB = "RiskgateRankerNotFollowing", "RiskgateRankerNotReady", "RiskgateRankerBehind"
RD = "RiskgateRankerDown"
RJ = "riskgate-ranker"
def r(name, labels, values):
    """A series of a ranker (scrape job riskgate-ranker)."""
    return s(name, labels, values, job=RJ)
r1, r2, r3, r4 = {"instance": "r1"}, {"instance": "r2"}, {"instance": "r3"}, {"instance": "r4"}

case("ranker not following: its read loop failed; another follows", [
    r("riskgate_ranker_following", r1, "1x5 0x20"),
    r("riskgate_ranker_following", r2, "1x25"),
], [
    ("6m", RNF, []),  # pending
    ("10m", RNF, [({"job": RJ, "instance": "r1"}, None)]),
])

case("ranker down: its scrape fails for 5m; one that missed two scrapes; a worker down is not a ranker", [
    r("up", r1, "1x5 0x20"),
    r("up", r2, "1x5 0 0 1x18"),
    s("up", i1, "0x25"),
], [
    ("8m", RD, []),  # down since 6m: pending
    ("15m", RD, [({"job": RJ, "instance": "r1"}, None)]),
])

case("ranker not ready for 10m; one that caught up in 5m, one that failed (NotFollowing says so)", [
    r("riskgate_ranker_following", r1, "1x30"),
    r("riskgate_ranker_ready", r1, "0x30"),
    r("riskgate_ranker_following", r2, "1x30"),
    r("riskgate_ranker_ready", r2, "0x5 1x25"),
    r("riskgate_ranker_following", r3, "0x30"),
    r("riskgate_ranker_ready", r3, "0x30"),
], [
    ("8m", RNR, []),
    ("15m", RNR, [({"job": RJ, "instance": "r1"}, None)]),
])

# Workers publish replace:global every minute (version 100 + 10 a minute; w1's
# gauge lingers after w2 took the aggregator over) and a user's own threshold.
# r1 keeps up, r2 is stuck, r3 is one version behind at every other evaluation.
_pub = [100 + 10 * t for t in range(31)]
case("ranker behind the published version for 5m; one that keeps up, ones that lag only between scrapes", [
    s("riskgate_threshold_version", {**i1, "strategy": "replace", "group": "global"}, "100+10x10 200x20"),
    s("riskgate_threshold_version", {**i2, "strategy": "replace", "group": "global"}, "_x10 210+10x20"),
    s("riskgate_threshold_version", {**i2, "strategy": "replace", "group": "user:u1"}, "900x30"),
    r("riskgate_ranker_threshold_version", {**r1, "strategy": "replace", "group": "global"}, "100+10x30"),
    r("riskgate_ranker_threshold_version", {**r2, "strategy": "replace", "group": "global"}, "100+10x3 130x27"),
    r("riskgate_ranker_threshold_version", {**r3, "strategy": "replace", "group": "global"},
      " ".join(str(v if t % 2 == 0 else v - 10) for t, v in enumerate(_pub))),
    # r4 is scraped just before the workers publish: one version behind at every evaluation
    r("riskgate_ranker_threshold_version", {**r4, "strategy": "replace", "group": "global"},
      " ".join(str(v - 10) for v in _pub)),
], [
    ("6m", RB, []),  # r2 behind since 4m: pending
    ("12m", RB, [({"job": RJ, "instance": "r2", "strategy": "replace", "group": "global"}, None)]),
])


RIF = "RiskgateRankerImpressionsFailing"
case("ranker impressions: 5% fail for 10m; another ranker loses one in a thousand", [
    r("riskgate_ranker_impressions_total", {**r1, "outcome": "sent"}, "0+95x30"),
    r("riskgate_ranker_impressions_total", {**r1, "outcome": "failed"}, "0x10 0+5x20"),
    r("riskgate_ranker_impressions_total", {**r2, "outcome": "sent"}, "0+999x30"),
    r("riskgate_ranker_impressions_total", {**r2, "outcome": "failed"}, "0+1x30"),
], [
    ("12m", RIF, []),  # failing since 10m: pending
    ("25m", RIF, [({"instance": "r1"}, "5%")]),
])


WS = "RiskgateWorkerStalled"
case("a worker finds its partitions lost once; another skips a flush on a slow heartbeat", [
    s("riskgate_writes_fenced_total", {**i1, "what": "lost"}, "0x10 1x40"),
    s("riskgate_writes_fenced_total", {**i2, "what": "lost"}, "0x50"),
    s("riskgate_writes_fenced_total", {**i2, "what": "flush"}, "0x10 3x40"),
], [
    ("5m", WS, []),
    ("12m", WS, [({"instance": "w1"}, None)]),
    ("45m", WS, []),  # the stall is over half an hour old
])


doc = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
header = ("# Unit tests of alerts.yml: every alert fires on a bad stream and stays quiet on\n"
          "# a healthy or borderline one. Run: promtool test rules deploy/prometheus/alerts_test.yml\n"
          "# (tests/test_deploy.py does). exp_annotations are the rendered templates, so a\n"
          "# broken template fails here too.\n")
TEXT = header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)

if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if (HERE / "alerts_test.yml").read_text() == TEXT else 1)
    (HERE / "alerts_test.yml").write_text(TEXT)
