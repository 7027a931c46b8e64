"""The Grafana dashboards (grafana/dashboards/*.json) and the docker-compose demo (examples/compose).

Static checks: every dashboard is current-schema JSON with unique panel ids, panels that do not
overlap, and no data source but the `datasource` variable; the compose stack's Prometheus config
passes `promtool check config` and its Envoy configs pass `envoy --mode validate` with our modules.

The acceptance test boots a real Envoy 1.40.0 with every module (JSON and OTLP access loggers,
tracer, Prometheus and OTLP stats sinks), drives 2xx, 4xx and 5xx traffic through two clusters
while a real Prometheus scrapes our sink every second, resolves each dashboard variable the way
Grafana does (label_values / metrics + the variable's regex) and runs EVERY panel query of both
dashboards through Prometheus's HTTP API: each must return at least one series with a number."""
import json
import math
import re
import shutil
import subprocess
import time

import pytest
import yaml

from harness import (ENVOY_BIN, MODULE_DIR, ROOT, Envoy, Prometheus, direct_response_listener, free_port,
                     hcm_listener, hcm_tracing, our_json_logger, our_otlp_logger, our_tracer, poll_until, route,
                     router, static_cluster)
from otlp_receiver import OtlpReceiver
from test_stats_sink import our_sink

DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
COMPOSE = ROOT / "examples" / "compose"
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's built-in variables, as the test substitutes them (Prometheus scrapes every second).
BUILTINS = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m", "__range_s": "300",
            "__interval_ms": "15000"}
VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def load(path) -> dict:
    return json.loads(path.read_text())


def all_panels(d: dict) -> list[dict]:
    """Every panel, including those nested in (collapsed) rows."""
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def targets(d: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query target."""
    return [(p, t) for p in all_panels(d) for t in p.get("targets", [])]


def variables(d: dict) -> dict[str, dict]:
    return {v["name"]: v for v in d["templating"]["list"]}


def var_query(v: dict) -> str:
    q = v["query"]
    return q["query"] if isinstance(q, dict) else q


def used_vars(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VAR_RE.finditer(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m):
        name = next(g for g in m.groups() if g)
        if name in values:
            return values[name]
        if name in BUILTINS:
            return BUILTINS[name]
        raise KeyError(f"unknown variable ${name} in {expr!r}")
    return VAR_RE.sub(repl, expr)


# ----------------------------------------------------------------------------- static checks

def test_both_dashboards_are_there():
    assert {p.name for p in DASHBOARDS} >= {"envoy-overview.json", "envoy-obs-pack-health.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    d = load(path)
    assert d["schemaVersion"] >= 39 and d["uid"] and d["title"]
    assert d.get("id") is None, "no instance-specific numeric id"
    panels = all_panels(d)
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"

    # Grid: inside the 24 columns, no two panels (rows included) on the same cells. Panels inside a
    # collapsed row are laid out separately, so they are checked among themselves.
    def check_grid(group):
        cells = {}
        for p in group:
            g = p["gridPos"]
            assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, (p["title"], g)
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                    cells[(x, y)] = p["title"]
    check_grid(d["panels"])
    for row in d["panels"]:
        if row.get("panels"):
            check_grid(row["panels"])

    # Data sources: only the `datasource` variable (type datasource, Prometheus), referenced as
    # ${datasource} by every panel, target and query variable; no hard-coded UID anywhere.
    vs = variables(d)
    ds = vs.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    refs = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "datasource" and not (node is ds):
                    refs.append((where, v))
                elif k == "uid" and node is not d and v != "${datasource}":
                    raise AssertionError(f"hard-coded uid {v!r} at {where}")
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
    walk(d, "$")
    bad = [(w, r) for w, r in refs if r != DS_REF]
    assert not bad, bad
    for p in panels:
        if p["type"] != "row":
            assert p.get("datasource") == DS_REF and p.get("targets"), p["title"]
    for v in vs.values():
        if v["type"] == "query":
            assert v.get("datasource") == DS_REF, v["name"]

    # Every target is PromQL using only defined variables; refIds unique per panel.
    for p in panels:
        ref_ids = [t["refId"] for t in p.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p.get("targets", []):
            assert t.get("expr"), (p["title"], t)
            unknown = used_vars(t["expr"]) - set(vs) - set(BUILTINS)
            assert not unknown, (p["title"], t["expr"], unknown)
            # The admin listener's own HCM (Prometheus scraping /stats/prometheus is a request
            # to it) stays out of the traffic panels even when "All" is chosen.
            if 'envoy_http_conn_manager_prefix=~"$hcm"' in t["expr"]:
                assert t["expr"].count('envoy_http_conn_manager_prefix!="admin"') == t["expr"].count("$hcm"), \
                    (p["title"], t["expr"])
    for row in (p for p in panels if p.get("repeat")):
        assert row["repeat"] in vs, row["title"]


def test_grafana_provisioning_files():
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/envoy-obs.yml").read_text())
    provider = prov["providers"][0]
    assert provider["type"] == "file"
    # The compose stack mounts grafana/dashboards exactly where the provider looks.
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../../grafana/dashboards:{provider['options']['path']}:ro" in mounts, mounts


def test_compose_file_is_consistent():
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    for name in ("upstream", "jaeger", "prometheus", "grafana"):
        assert name in services, name
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    # Every bind-mounted host path exists in the repository (target/release once built).
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            assert (COMPOSE / src).exists(), f"{src} (mounted by the compose file) does not exist"
    # The modules' directory is never created by Docker (it would be root-owned): build first.
    modules = next(v for v in services["envoy"]["volumes"] if isinstance(v, dict))
    assert (modules["target"], modules["read_only"], modules["bind"]["create_host_path"]) == ("/opt/envoy-obs", True, False)
    assert services["envoy"]["platform"] == "linux/amd64"
    # The OTLP collector config parses and has the pipelines the Envoy config sends to.
    otel = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    assert set(otel["service"]["pipelines"]) >= {"logs", "metrics"}


def test_compose_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    assert promtool, "scripts/setup.sh installs Debian's prometheus package"
    p = subprocess.run([promtool, "check", "config", str(COMPOSE / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    cfg = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets_ = [t for sc in cfg["scrape_configs"] for c in sc["static_configs"] for t in c["targets"]]
    assert "envoy:9102" in targets_


@pytest.mark.parametrize("name", ["envoy.yaml", "upstream.yaml"])
def test_compose_envoy_config_validates(tmp_path, name):
    text = (COMPOSE / "envoy" / name).read_text()
    if name == "envoy.yaml":
        for so in ("access_log", "tracer", "stats_sink"):
            assert f"/opt/envoy-obs/libenvoy_obs_{so}.so" in text, so
        for needle in ("logger_name: json", "logger_name: otlp", "tracer_name: opentelemetry",
                       "sink_name: prometheus", "sink_name: otlp", '"0.0.0.0:9102"', "http://jaeger:4317"):
            assert needle in text, needle
    # The container's module directory -> ours. Validate mode neither resolves STRICT_DNS hosts
    # (upstream) nor connects to collectors (jaeger, otel-collector), so host names stay.
    text = text.replace("/opt/envoy-obs", str(MODULE_DIR))
    cfg = tmp_path / name
    cfg.write_text(text)
    p = subprocess.run([str(ENVOY_BIN), "--mode", "validate", "-c", str(cfg), "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "OK" in out, out[-3000:]


# ----------------------------------------------------------------------------- acceptance

TRAFFIC_S = 20


def resolve_variable(prom: Prometheus, v: dict, known: dict[str, str]) -> list[str]:
    """The values Grafana would offer for a query variable (label_values / metrics + regex)."""
    q = substitute(var_query(v), known)
    if m := re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", q):
        series = prom.api("series", **{"match[]": m.group(1)})
        values = sorted({s[m.group(2)] for s in series if m.group(2) in s})
    elif m := re.fullmatch(r"\s*metrics\((.+)\)\s*", q):
        values = sorted(n for n in prom.api("label/__name__/values") if re.fullmatch(m.group(1), n))
    else:
        raise AssertionError(f"variable {v['name']}: unsupported query {q!r}")
    if v.get("regex"):
        rx = re.compile(v["regex"].strip("/"))
        values = sorted({(mm.group(1) if mm.groups() else mm.group(0)) for x in values if (mm := rx.search(x))})
    return values


def front_envoy(tmp_path, rx: OtlpReceiver):
    """Every module: JSON + OTLP loggers and the tracer on the `ingress` HCM, Prometheus + OTLP
    sinks; clusters `backend` (an upstream answering 200) and `down` (a closed port: 503s)."""
    front, up, metrics, closed = free_port(), free_port(), free_port(), free_port()
    loggers = [our_json_logger({"path": str(tmp_path / "access.json")}),
               our_otlp_logger({"endpoint": rx.endpoint, "flush_interval_ms": 200})]
    tracer = our_tracer({"endpoint": rx.endpoint, "service_name": "edge", "flush_interval_ms": 200})
    routes = [{"match": {"prefix": "/missing"}, "direct_response": {"status": 404}},
              route("/down", "down"), route("/", "backend")]
    ingress = hcm_listener("ingress", front, routes, access_log=loggers, tracing=hcm_tracing(tracer))
    ingress["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = [router(start_child_span=True)]
    clusters = [static_cluster("backend", up), static_cluster("down", closed)]
    for c in clusters:
        c["outlier_detection"] = {"consecutive_5xx": 5, "interval": "1s", "base_ejection_time": "5s",
                                "max_ejection_percent": 100}
    boot = {"stats_sinks": [our_sink({"address": f"127.0.0.1:{metrics}"}),
                            our_sink({"endpoint": rx.endpoint}, name="otlp")],
            "stats_flush_interval": "1s"}
    res = {"listeners": [ingress, direct_response_listener("up", up)], "clusters": clusters}
    return Envoy(tmp_path / "envoy", res, extra_bootstrap=boot), front, metrics


def test_every_panel_query_returns_data(tmp_path):
    with OtlpReceiver("grpc") as rx:
        e, front, metrics = front_envoy(tmp_path, rx)
        with e, Prometheus(tmp_path / "prom", [f"127.0.0.1:{metrics}"], scrape_interval="1s") as prom:
            # 2xx (backend), 4xx (a 404 direct response), 5xx (the cluster whose host is down),
            # paced so the rates are steady over the whole window.
            loads = [subprocess.Popen(["h2load", "--h1", "-n", str(rps * TRAFFIC_S), "-c", "2", "-t", "1",
                                       f"--rps={rps // 2}", f"http://127.0.0.1:{front}{path}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for path, rps in (("/app", 40), ("/missing", 10), ("/down", 10))]
            try:
                prom.wait_up(timeout=30)
                for p in loads:
                    p.wait(TRAFFIC_S + 30)
            finally:
                for p in loads:
                    if p.poll() is None:
                        p.kill()
            assert [p.returncode for p in loads] == [0, 0, 0]
            # Every response class, span and export has reached Prometheus (values of the last flush).
            must = ['sum(envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="ingress",envoy_response_code_class="2"}) > 0',
                    'sum(envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="ingress",envoy_response_code_class="4"}) > 0',
                    'sum(envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix="ingress",envoy_response_code_class="5"}) > 0',
                    "envoy_obs_access_log_json_records_written > 0", "envoy_obs_access_log_otlp_records_exported > 0",
                    "envoy_obs_tracer_otel_spans_exported > 0", "envoy_obs_sink_otlp_exports_ok > 0",
                    "envoy_obs_sink_prometheus_scrapes_served > 0"]
            poll_until(lambda: all(prom.query(q) for q in must), timeout=15, interval=0.5,
                       what="traffic and module counters in Prometheus")

            failures, checked = [], 0
            for path in DASHBOARDS:
                d = load(path)
                vs = variables(d)
                # Resolve variables in dashboard order (later ones may use earlier ones), as Grafana
                # would, preferring the values that carry this test's traffic.
                prefer = {"hcm": "ingress", "cluster": "backend", "listener": f"127.0.0.1_{front}"}
                chosen: dict[str, list[str]] = {"datasource": ["prometheus"]}
                for v in d["templating"]["list"]:
                    if v["type"] != "query":
                        continue
                    first = {k: vals[0] for k, vals in chosen.items()}
                    values = resolve_variable(prom, v, first)
                    if not values:
                        failures.append(f"{path.name}: variable ${v['name']} has no values: {var_query(v)}")
                        chosen[v["name"]] = ["__none__"]
                        continue
                    p = prefer.get(v["name"])
                    # Repeated rows run once per value: keep them all for those variables.
                    repeated = any(x.get("repeat") == v["name"] for x in all_panels(d))
                    chosen[v["name"]] = values if repeated else [p if p in values else values[0]]
                for panel, t in targets(d):
                    multi = [n for n in used_vars(t["expr"]) if len(chosen.get(n, [])) > 1]
                    combos = [{}] if not multi else [{multi[0]: x} for x in chosen[multi[0]]]
                    for combo in combos:
                        values = {k: vals[0] for k, vals in chosen.items()} | combo
                        expr = substitute(t["expr"], values)
                        checked += 1
                        label = f"{path.name} / {panel['title']!r} / {t['refId']}: {expr}"
                        try:
                            result = prom.query(expr)
                        except ValueError as err:
                            failures.append(f"{label}\n    -> error {err}")
                            continue
                        if not result:
                            failures.append(f"{label}\n    -> no series")
                        elif not any(math.isfinite(float(s["value"][1])) for s in result):
                            failures.append(f"{label}\n    -> only NaN/Inf: {result[:3]}")
            assert not failures, f"{len(failures)} of {checked} panel queries failed:\n" + "\n".join(failures)
            assert checked >= 60, checked
