"""A real Prometheus scrapes a running ``riskgate worker`` (issue 5), and the example ranker.

The worker (tests/integration/harness.py, the same ``riskgate worker`` process
the stream tests use) runs against the test broker; a seeded synthetic stream
is produced; a Prometheus server (Debian package, installed by
deploy/ensure-prometheus.sh when missing) bound to loopback on a free port,
with a temporary TSDB, scrapes the worker's ``/metrics``. The test then reads
``riskgate_`` series back through Prometheus's HTTP API: events processed,
the configured α, the worker's health, and only metric names the worker
declares in ``streams.metrics.METRIC_NAMES``. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from calibration.synthetic import WorldConfig, generate_events
from streams.broker import free_port
from streams.metrics import METRIC_NAMES
from streams.producer import produce_events

from .harness import Worker, make_topics, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ALPHAS = (0.05, 0.1)


def _prometheus_binary() -> str:
    out = subprocess.run(["sh", str(REPO / "deploy" / "ensure-prometheus.sh")], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        pytest.fail(f"prometheus unavailable: {out.stderr.strip()}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "prometheus")


class Prometheus:
    """``prometheus`` on 127.0.0.1:<free port> scraping ``targets`` every second, TSDB in ``tmp``."""

    def __init__(self, binary: str, tmp: Path, targets: list[str], job: str = "riskgate", rules: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}],
        }
        if rules is not None:
            config["rule_files"] = [str(rules)]
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp / "prometheus.log"
        self.cmd = [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Prometheus":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self._ready, 30, what=f"prometheus ready on :{self.port} (log {self.log_path})")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read()
        except OSError:
            return None, b""

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return self._get("/-/ready")[0] == 200

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API: the result vector (empty on errors, so callers can poll)."""
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if status != 200:
            return []
        data = json.loads(body)
        return data["data"]["result"] if data.get("status") == "success" else []

    def names(self) -> list[str]:
        status, body = self._get("/api/v1/label/__name__/values")
        return json.loads(body)["data"] if status == 200 else []


def _events():
    world = WorldConfig(seed=3, n_users=30, n_items=2000, n_slates=300, slates_per_second=1.0, holdout_share=0.5)
    return list(generate_events(world))


def test_prometheus_scrapes_worker_series(kafka_bootstrap, app_id, topic_prefix, tmp_path):
    binary = _prometheus_binary()
    make_topics(kafka_bootstrap, topic_prefix, 2)
    worker = Worker(kafka_bootstrap, app_id, tmp_path / "data", tmp_path, partitions=2, prefix=topic_prefix,
                    alphas=",".join(map(str, ALPHAS)), label_window=60, allowed_lateness=5, min_slates=10)
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    started = time.time()
    worker.start()
    try:
        worker.wait_healthy(90)
        sent = asyncio.run(produce_events(kafka_bootstrap, _events(), prefix=topic_prefix))
        assert sum(sent.values()) > 0
        wait_for(lambda: worker.metric("riskgate_events_total", outcome="ok") > 0, 60,
                 what="the worker to count processed events")
        with Prometheus(binary, prom_dir, [f"127.0.0.1:{worker.port}"]) as prom:
            up = wait_for(lambda: prom.query('up{job="riskgate"} == 1'), 30, what="a successful scrape")
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{worker.port}"

            # events processed, read back through PromQL
            ok = wait_for(lambda: prom.query('sum(riskgate_events_total{job="riskgate", outcome="ok"}) > 0'), 30,
                          what="riskgate_events_total in Prometheus")
            assert float(ok[0]["value"][1]) > 0
            impressions = prom.query('sum(riskgate_events_total{type="impression"})')
            assert impressions and float(impressions[0]["value"][1]) > 0

            # the configured α, one series each
            targets = wait_for(lambda: prom.query("riskgate_target_risk"), 30, what="riskgate_target_risk")
            assert sorted(float(r["value"][1]) for r in targets) == sorted(ALPHAS)
            assert {r["metric"]["alpha"] for r in targets} == {str(a) for a in ALPHAS}

            healthy = wait_for(lambda: prom.query("riskgate_healthy == 1"), 30, what="riskgate_healthy == 1")
            assert healthy

            # the changelog's write volume: every event changed a user, each record a key and most a value
            written = wait_for(lambda: prom.query("riskgate_changelog_records_total > 0"), 30,
                               what="riskgate_changelog_records_total")
            records = float(written[0]["value"][1])
            assert records >= float(ok[0]["value"][1]) / 25  # (a flush writes a user's changes once)
            size = float(prom.query("riskgate_changelog_bytes_total")[0]["value"][1])
            assert 20 * records < size < 4000 * records

            # the input loop's waits for records (all of its time once caught up): what the dashboard's
            # busy share is 1 minus; and the fetches that brought the events
            waited = wait_for(lambda: prom.query("riskgate_fetch_wait_seconds_total > 0"), 30,
                              what="riskgate_fetch_wait_seconds_total")
            assert 0 < float(waited[0]["value"][1]) < time.time() - started
            assert 0 < float(prom.query("riskgate_fetches_total")[0]["value"][1]) <= float(ok[0]["value"][1])

            # the process's own CPU and memory (what the dashboard's capacity panels read): the worker
            # used CPU applying the events, and holds at least the interpreter and its libraries
            cpu = wait_for(lambda: prom.query("riskgate_process_cpu_seconds_total > 0"), 30,
                           what="riskgate_process_cpu_seconds_total")
            assert 0 < float(cpu[0]["value"][1]) < 2 * (time.time() - started)  # (two cores at most)
            rss = float(prom.query("riskgate_process_resident_memory_bytes")[0]["value"][1])
            assert 20e6 < rss < 4e9

            # everything the worker exports is declared in METRIC_NAMES (what dashboards and alerts may use)
            exported = {n for n in prom.names() if n.startswith("riskgate_")}
            assert "riskgate_events_total" in exported
            assert exported - METRIC_NAMES == set()
    finally:
        worker.stop()


def test_prometheus_scrapes_the_example_ranker_with_the_shipped_rules(kafka_bootstrap, topic_prefix, tmp_path):
    """``riskgate example-ranker``'s ``/metrics`` through a real Prometheus that loads deploy/prometheus/alerts.yml."""
    import sys

    binary = _prometheus_binary()
    make_topics(kafka_bootstrap, topic_prefix, 2)
    port = free_port()
    log = tmp_path / "ranker.log"
    with open(log, "wb") as out:
        ranker = subprocess.Popen([sys.executable, "-m", "streams.cli", "example-ranker", "--broker",
                                   f"kafka://{kafka_bootstrap}", "--port", str(port), "--topic-prefix", topic_prefix],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    try:
        def ready():
            if ranker.poll() is not None:
                raise AssertionError(f"the ranker exited with {ranker.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, 60, what=f"the example ranker to be ready (log {log})")
        with Prometheus(binary, prom_dir, [f"127.0.0.1:{port}"], job="riskgate-ranker",
                        rules=REPO / "deploy" / "prometheus" / "alerts.yml") as prom:
            up = wait_for(lambda: prom.query('riskgate_ranker_ready{job="riskgate-ranker"} == 1'), 30,
                          what="riskgate_ranker_ready == 1 in Prometheus")
            assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
            assert prom.query("riskgate_ranker_following == 1")
            rss = float(wait_for(lambda: prom.query("riskgate_ranker_process_resident_memory_bytes"), 30,
                                 what="the ranker's memory")[0]["value"][1])
            assert 20e6 < rss < 4e9

            def ranker_rules():  # the shipped rules on rankers, evaluated at least once
                status, body = prom._get("/api/v1/rules")
                groups = json.loads(body)["data"]["groups"] if status == 200 else []
                rules = [r for g in groups if g["name"] == "riskgate-ranker" for r in g["rules"]]
                return rules if rules and all(r.get("lastEvaluation", "").startswith("20") and
                                              r["health"] == "ok" for r in rules) else None

            rules = wait_for(ranker_rules, 30, what="the riskgate-ranker rules evaluated")
            assert {r["name"] for r in rules} == {"RiskgateRankerNotFollowing", "RiskgateRankerNotReady",
                                                  "RiskgateRankerBehind", "RiskgateRankerImpressionsFailing",
                                                  "RiskgateRankerDown"}
            assert all(r["state"] == "inactive" for r in rules)  # a following, ready ranker alerts nothing
            exported = {n for n in prom.names() if n.startswith("riskgate_")}
            assert "riskgate_ranker_ready" in exported and exported - METRIC_NAMES == set()
    finally:
        ranker.terminate()
        try:
            ranker.wait(15)
        except subprocess.TimeoutExpired:
            ranker.kill()
            ranker.wait()
