"""Checks of deploy/ with real tools and parsers (issue 5).

* promtool (Debian package ``prometheus``, installed by deploy/ensure-prometheus.sh
  when missing): ``check config``, ``check rules``, ``test rules``, and the
  dashboard's PromQL parsed by ``check rules`` as recording rules;
* every ``riskgate_`` identifier in alerts and dashboard is a series a worker
  exports (:data:`streams.metrics.METRIC_NAMES`);
* compose and Kubernetes manifests, parsed: image, ports, volumes, probes, and
  every ``RISKGATE_*`` name is one the settings object really reads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "riskgate.json"
WEB_PORT = 6066
DATA_DIR = "/var/lib/riskgate"
METRIC_RE = re.compile(r"\briskgate_[A-Za-z0-9_:]*")


@cache
def promtool() -> str:
    out = subprocess.run(["sh", str(DEPLOY / "ensure-prometheus.sh")], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        pytest.fail(f"promtool unavailable: {out.stderr.strip()}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "promtool")


def run_promtool(*args: str, cwd: Path = PROM) -> str:
    out = subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, f"promtool {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def settings_env_names() -> set[str]:
    """``RISKGATE_*`` names the settings object reads: its fields with the env prefix (read at test time)."""
    from streams import settings as mod

    prefix = getattr(mod, "ENV_PREFIX", None) or mod.Settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in mod.Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        names.add((alias or prefix + name).upper())
    return names


def metric_names() -> frozenset[str]:
    from streams.metrics import METRIC_NAMES

    return METRIC_NAMES


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL string of the dashboard: panel targets and templating queries."""
    out = []

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("expr", "query", "definition"):
            out.append(node)

    walk(json.loads(DASHBOARD.read_text()))
    return out


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def k8s(kind: str, name: str | None = None) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# -- promtool ------------------------------------------------------------------

def test_promtool_check_config():
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules():
    assert "SUCCESS" in run_promtool("check", "rules", "alerts.yml")


def test_promtool_unit_tests_fire_and_stay_quiet_for_every_alert():
    run_promtool("test", "rules", "alerts_test.yml")
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for t in tests:
        for check in t["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"


def test_alert_unit_tests_are_generated_from_the_current_rules():
    # alerts_test.yml holds the rendered annotations; make_alerts_test.py regenerates it.
    out = subprocess.run([sys.executable, str(PROM / "make_alerts_test.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, "deploy/prometheus/alerts_test.yml is stale: run python deploy/prometheus/make_alerts_test.py"


def test_dashboard_promql_parses(tmp_path):
    # Grafana's variables replaced by values, then Prometheus's own parser via recording rules.
    rules = []
    for i, q in enumerate(dashboard_queries()):
        if q.startswith("label_values(") or q == "prometheus":
            continue
        expr = q.replace("$__rate_interval", "5m").replace("$__range", "6h").replace("$strategy", ".*").replace("$group", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    assert len(rules) >= 15
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


# -- metric names ------------------------------------------------------------------

def test_alert_expressions_use_only_exported_metrics():
    used = set()
    for rule in alert_rules():
        used |= set(METRIC_RE.findall(rule["expr"]))
    assert used, "no riskgate_ metric in the alert rules"
    assert used - metric_names() == set()


def test_dashboard_uses_only_exported_metrics():
    used = set()
    for q in dashboard_queries():
        used |= set(METRIC_RE.findall(q))
    assert used - metric_names() == set()


def test_dashboard_covers_what_operators_read():
    used = {m for q in dashboard_queries() for m in METRIC_RE.findall(q)}
    for needed in ("riskgate_threshold_lambda", "riskgate_window_slates", "riskgate_realised_risk_sum_total",
                   "riskgate_target_risk", "riskgate_property1_reflagged_total", "riskgate_property1_repeats_total",
                   "riskgate_events_total",
                   "riskgate_consumer_lag", "riskgate_recompute_seconds_bucket",
                   "riskgate_threshold_published_timestamp_seconds", "riskgate_process_cpu_seconds_total",
                   "riskgate_process_resident_memory_bytes", "riskgate_users_cached"):
        assert needed in used, needed
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_alerts_carry_runbooks_that_exist():
    ops = (REPO / "docs" / "operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.*)$", ops, flags=re.M)}
    names = set()
    for rule in alert_rules():
        names.add(rule["alert"])
        ann = rule["annotations"]
        assert ann.get("runbook", "").strip() and ann.get("summary"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        url = ann["runbook_url"]
        assert url.startswith("docs/operations.md#") and url.split("#", 1)[1] in anchors, url
    assert len(names) == len(alert_rules())


# -- Grafana provisioning and Prometheus config ------------------------------------

def test_grafana_provisioning_matches_compose_mounts():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"] and ds[0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/riskgate.yml").read_text())["providers"][0]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose()["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_prometheus_scrapes_both_workers_and_loads_the_rules():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "riskgate")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    workers = {n for n in compose()["services"] if n.startswith("worker-")}
    assert targets == {f"{w}:{WEB_PORT}" for w in workers}
    mounted = {v.split(":")[1] for v in compose()["services"]["prometheus"]["volumes"] if v.startswith("./")}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted


def test_prometheus_scrapes_the_example_ranker_where_compose_runs_it():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "riskgate-ranker")
    ranker = compose()["services"]["ranker"]
    args = ranker["command"]
    assert ranker["entrypoint"] == ["riskgate", "example-ranker"] and args[args.index("--host") + 1] == "0.0.0.0"
    port = args[args.index("--port") + 1]
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == [f"ranker:{port}"]
    assert job["metrics_path"] == "/metrics" and f"127.0.0.1:{port}/ready" in " ".join(ranker["healthcheck"]["test"])
    # the alerts on rankers read what the ranker's client exports
    ranker_alerts = [r for r in alert_rules() if r["alert"].startswith("RiskgateRanker")]
    assert len(ranker_alerts) == 5
    assert all("riskgate_ranker_" in r["expr"] or r["expr"] == f'up{{job="{job["job_name"]}"}} == 0'
               for r in ranker_alerts)


# -- Dockerfile -------------------------------------------------------------------

def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    instr = [ln.split(None, 1) for ln in lines]
    first = [i for i in instr if i[0] == "FROM"]
    assert [f[1] for f in first] == ["python:3.11-slim"]
    assert any(i[0] == "RUN" and "pip install -c requirements.lock ." in i[1] for i in instr)
    user = [i[1] for i in instr if i[0] == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert any(i[0] == "VOLUME" and DATA_DIR in i[1] for i in instr)
    assert f"RISKGATE_DATA_DIR={DATA_DIR}" in text and "RISKGATE_WEB_HOST=0.0.0.0" in text
    assert any(i[0] == "EXPOSE" and i[1].split()[0] == str(WEB_PORT) for i in instr)
    health = next(i[1] for i in instr if i[0] == "HEALTHCHECK")
    assert "/health" in health and "curl" not in health and "urllib.request" in health
    assert any(i[0] == "ENTRYPOINT" and json.loads(i[1]) == ["riskgate", "worker"] for i in instr)
    env = set(re.findall(r"\b(RISKGATE_[A-Z_]+)=", text))
    assert env - settings_env_names() == set()


def test_dockerfile_healthcheck_command_runs(tmp_path):
    # The healthcheck's python snippet against a stand-in /health: exit 0 on 200, non-zero on 503.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    status = {"code": 200}

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    text = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"HEALTHCHECK .*?CMD (\[.*\])", re.sub(r"\\\n", " ", text)).group(1))
    assert cmd[0] == "python"
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = {"RISKGATE_WEB_PORT": str(srv.server_address[1]), "PATH": "/usr/bin:/bin"}
        assert subprocess.run([sys.executable, *cmd[1:]], env=env, timeout=10, capture_output=True).returncode == 0
        status["code"] = 503
        assert subprocess.run([sys.executable, *cmd[1:]], env=env, timeout=10, capture_output=True).returncode != 0
    finally:
        srv.shutdown()


# -- compose ----------------------------------------------------------------------

def test_compose_kafka_is_kraft():
    kafka = compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"] and "KAFKA_ZOOKEEPER_CONNECT" not in env


def test_compose_two_workers_one_group_own_volumes():
    c = compose()
    workers = {n: s for n, s in c["services"].items() if n.startswith("worker-")}
    assert len(workers) == 2
    app_ids = {s["environment"]["RISKGATE_APP_ID"] for s in workers.values()}
    assert len(app_ids) == 1
    volumes, host_ports = [], []
    for name, s in workers.items():
        assert s["image"] == "riskgate:local" and s["build"]["dockerfile"] == "deploy/Dockerfile"
        env = s["environment"]
        assert env["RISKGATE_BROKER"] == "kafka://kafka:9092"
        assert env["RISKGATE_DATA_DIR"] == DATA_DIR and env["RISKGATE_WEB_HOST"] == "0.0.0.0"
        assert int(env["RISKGATE_WEB_PORT"]) == WEB_PORT
        (vol,) = [v for v in s["volumes"] if v.endswith(":" + DATA_DIR)]
        volumes.append(vol.split(":")[0])
        host_ports += [p.split(":")[0] for p in s["ports"]]
        assert all(p.split(":")[1] == str(WEB_PORT) for p in s["ports"])
        assert "/health" in " ".join(s["healthcheck"]["test"])
        assert s["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    assert len(set(volumes)) == 2 and set(volumes) <= set(c["volumes"])
    assert len(set(host_ports)) == len(host_ports)


def test_compose_producer_is_an_optional_profile():
    p = compose()["services"]["producer"]
    assert p["profiles"] == ["producer"]
    assert p["entrypoint"] == ["riskgate", "produce"]
    args = p["command"]
    assert args[args.index("--broker") + 1] == "kafka://kafka:9092" and float(args[args.index("--rate") + 1]) > 0
    for name, s in compose()["services"].items():
        if name != "producer":
            assert "profiles" not in s, name


def test_compose_topic_init_creates_the_workers_topics():
    from streams.topics import DLQ, INPUT_TOPICS, PARTIALS, SAFE_POOLS, THRESHOLDS

    c = compose()
    script = "\n".join(c["services"]["topic-init"]["command"])
    partitions = c["services"]["worker-1"]["environment"]["RISKGATE_TOPIC_PARTITIONS"]
    for t in (*INPUT_TOPICS, SAFE_POOLS, THRESHOLDS, DLQ, PARTIALS):
        assert re.search(rf"(^|\s){re.escape(t)}(\s|;|$)", script), t
    assert f"--partitions {partitions}" in script and "cleanup.policy=compact" in script
    # what the worker would create itself (streams.topics.Topics.create): compaction for the
    # latest-value topics, and room for dead letters that carry a whole bad value
    from streams.topics import DLQ_MAX_BYTES

    lines = {t: next(line for line in script.splitlines() if re.search(rf"--topic {re.escape(t)}(\s|$)", line))
             for t in (SAFE_POOLS, THRESHOLDS, DLQ)}
    assert "cleanup.policy=compact" in lines[SAFE_POOLS] and "cleanup.policy=compact" in lines[THRESHOLDS]
    assert f"max.message.bytes={DLQ_MAX_BYTES}" in lines[DLQ]
    from streams.topics import PARTIALS_CONFIG

    partials = next(line for line in script.splitlines() if f"--topic {PARTIALS}" in line)
    assert f"retention.ms={PARTIALS_CONFIG['retention.ms']}" in partials  # only the latest round is read


def test_compose_env_names_are_settings():
    known = settings_env_names()
    for name, s in compose()["services"].items():
        env = s.get("environment") or {}
        used = {k for k in (env if isinstance(env, dict) else (e.split("=")[0] for e in env)) if k.startswith("RISKGATE_")}
        assert used - known == set(), name


# -- Kubernetes ----------------------------------------------------------------------

def _container():
    return k8s("StatefulSet", "riskgate")["spec"]["template"]["spec"]["containers"][0]


def test_k8s_statefulset_volume_probes_ports():
    sts = k8s("StatefulSet", "riskgate")
    spec = sts["spec"]
    assert spec["replicas"] >= 2 and spec["serviceName"] == k8s("Service", "riskgate-headless")["metadata"]["name"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = _container()
    assert c["image"] and ":" in c["image"] and not c["image"].endswith(":latest")
    (port,) = c["ports"]
    assert port["containerPort"] == WEB_PORT and port["name"] == "web"
    (claim,) = spec["volumeClaimTemplates"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == DATA_DIR
    env = {e["name"]: e for e in c["env"]}
    assert env["RISKGATE_DATA_DIR"]["value"] == DATA_DIR and env["RISKGATE_WEB_HOST"]["value"] == "0.0.0.0"
    assert int(env["RISKGATE_WEB_PORT"]["value"]) == WEB_PORT
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "web"}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "web" and c[probe]["httpGet"]["path"] in ("/metrics", "/health")


def test_k8s_config_and_secrets_are_wired():
    cm = k8s("ConfigMap", "riskgate-config")
    secret = k8s("Secret", "riskgate-kafka")
    c = _container()
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in c["envFrom"]
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for name in ("RISKGATE_SASL_USERNAME", "RISKGATE_SASL_PASSWORD"):
        assert from_secret[name]["name"] == secret["metadata"]["name"] and from_secret[name]["key"] in keys
    assert not ({"RISKGATE_SASL_PASSWORD", "RISKGATE_SASL_USERNAME", "RISKGATE_WEB_TOKEN"} & set(cm["data"]))
    # TLS files: the ConfigMap's paths point into the mounted Secret
    pod = k8s("StatefulSet", "riskgate")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    for var in ("RISKGATE_SSL_CAFILE", "RISKGATE_SSL_CERTFILE", "RISKGATE_SSL_KEYFILE"):
        if var not in cm["data"]:
            continue
        path = Path(cm["data"][var])
        mount = next(m for m in c["volumeMounts"] if str(path.parent) == m["mountPath"].rstrip("/"))
        vol = vols[mount["name"]]["secret"]
        assert vol["secretName"] == secret["metadata"]["name"]
        assert path.name in {i["path"] for i in vol.get("items", [])} or path.name in keys
    assert cm["data"]["RISKGATE_SECURITY_PROTOCOL"] in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def test_k8s_env_names_are_settings():
    known = settings_env_names()
    used = set(k8s("ConfigMap", "riskgate-config")["data"]) | {e["name"] for e in _container()["env"]}
    assert {n for n in used if n.startswith("RISKGATE_")} == used
    assert used - known == set()


def test_k8s_service_and_scraping():
    svc = k8s("Service", "riskgate")
    pod_labels = k8s("StatefulSet", "riskgate")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(WEB_PORT, "web")]
    pm = k8s("PodMonitor", "riskgate")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "web" and ep["path"] == "/metrics"
    assert ep["relabelings"] == [{"targetLabel": "job", "replacement": "riskgate"}]  # what the alerts select
    # no prometheus.io/* annotations beside the PodMonitor: a Prometheus reading both kept two
    # copies of every series, and the alerts' sums over workers doubled
    meta = k8s("StatefulSet", "riskgate")["spec"]["template"]["metadata"]
    assert not any(k.startswith("prometheus.io/") for k in meta.get("annotations", {}))
    ranker = k8s("PodMonitor", "riskgate-ranker")
    assert ranker["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ranker"
    (ep,) = ranker["spec"]["podMetricsEndpoints"]
    assert ep["relabelings"] == [{"targetLabel": "job", "replacement": "riskgate-ranker"}]


def test_k8s_workers_are_spread_and_disrupted_one_at_a_time_and_sized_for_their_cache():
    sts = k8s("StatefulSet", "riskgate")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    pdb = k8s("PodDisruptionBudget", "riskgate")
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (spread,) = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    res = _container()["resources"]
    assert res["requests"]["cpu"] == "1"  # one worker process uses a core at saturation

    def gib(q):
        return float(q.removesuffix("Gi"))

    # ~0.2 GB + 35 kB a cached user; the limit must hold one pod with every partition's cache
    cm = k8s("ConfigMap", "riskgate-config")["data"]
    users = int(cm["RISKGATE_USER_CACHE"]) * int(cm["RISKGATE_TOPIC_PARTITIONS"])
    assert gib(res["limits"]["memory"]) * 2**30 >= 0.2e9 + 35e3 * users


def test_k8s_network_policy_admits_only_the_web_port_and_leaves_kafka_reachable():
    pol = k8s("NetworkPolicy", "riskgate-web")
    labels = k8s("StatefulSet", "riskgate")["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    # Ingress only: an Egress policy type with no rule would cut the workers off their brokers.
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    web = {p["name"]: p for p in _container()["ports"]}["web"]
    assert rule["ports"] == [{"port": "web", "protocol": web["protocol"]}]
    sources = rule["from"]
    assert {"podSelector": {}} in sources  # this namespace: operators' tools
    # Prometheus's namespace: without it every scrape stops and RiskgateWorkerUnhealthy fires
    assert any("monitoring" in s.get("namespaceSelector", {}).get("matchLabels", {}).values() for s in sources)


def test_k8s_kustomization_lists_every_manifest_but_the_secret_template():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.yaml"}
    # applied, the placeholder Secret overwrote the real one (and its CA stopped the workers)
    assert set(kust["resources"]) == files and "CHANGE-ME" in (K8S / "secret.yaml").read_text()


def test_settings_accept_the_shipped_configuration(monkeypatch, tmp_path):
    """The ConfigMap + compose env load through the real settings object (TLS paths swapped for temp files
    of a throwaway CA: the settings read them at start)."""
    import trustme

    from streams.settings import load_settings

    ca = trustme.CA()
    leaf = ca.issue_cert("riskgate")
    pem = {"CAFILE": ca.cert_pem.bytes(), "CERTFILE": leaf.cert_chain_pems[0].bytes(),
           "KEYFILE": leaf.private_key_pem.bytes()}

    for source in (dict(compose()["services"]["worker-1"]["environment"]), dict(k8s("ConfigMap", "riskgate-config")["data"])):
        for k in list(__import__("os").environ):
            if k.startswith("RISKGATE_"):
                monkeypatch.delenv(k)
        for k, v in source.items():
            if k.startswith("RISKGATE_SSL_") and k.endswith("FILE"):
                f = tmp_path / Path(v).name
                f.write_bytes(pem[k.removeprefix("RISKGATE_SSL_")])
                v = str(f)
            monkeypatch.setenv(k, str(v))
        monkeypatch.setenv("RISKGATE_SASL_USERNAME", "u")
        monkeypatch.setenv("RISKGATE_SASL_PASSWORD", "p")
        load_settings()


def test_every_series_a_worker_exports_is_documented_in_the_operations_guide():
    from streams.metrics import Metrics

    ops = (REPO / "docs" / "operations.md").read_text()
    section = ops.split("### Every series a worker exports", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(riskgate_\w+)` \|", section, re.M))
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()
                if not f.name.startswith("riskgate_process_")}
    assert listed == exported


def test_every_setting_is_documented_in_the_operations_guide():
    """An operator looks settings up in docs/operations.md; one missing there is one they cannot find
    (RISKGATE_HOLDOUT_SHARE was a setting no code read, and several real ones were absent)."""
    doc = (REPO / "docs" / "operations.md").read_text()
    assert sorted(n for n in settings_env_names() if n not in doc) == []
